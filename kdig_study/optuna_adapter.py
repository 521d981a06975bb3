"""Every use of Optuna's private API, behind small typed functions.

Written against Optuna 5.0 (pyproject pins ``optuna>=5.0,<6``). Nothing else in kdig_study
touches an Optuna name that starts with an underscore; when Optuna changes one of these,
tests/test_optuna_adapter.py fails and this module is the one place to fix. What is relied on:

* ``Study._storage``: the study's storage; for an RDB store Optuna wraps it in
  ``optuna.storages._cached_storage._CachedStorage``, whose ``_backend`` is the RDBStorage.
* ``Trial._trial_id`` / ``FrozenTrial._trial_id``: the trial's id in the storage.
* ``RDBStorage.record_heartbeat(trial_id)`` and ``get_heartbeat_interval()`` (storage
  methods of the heartbeat mix-in, not part of the user-facing API).
* ``RDBStorage._get_stale_trial_ids(self, study_id) -> list[int]``, which
  ``optuna.storages.fail_stale_trials`` calls: overridden by :class:`StaleAwareRDBStorage`.
* ``optuna.storages._heartbeat.BaseHeartbeat``: the heartbeat protocol (record_heartbeat,
  _get_stale_trial_ids, get_heartbeat_interval, get_heartbeat_stale_trial_callback) that
  Optuna's heartbeat thread, ``fail_stale_trials`` and ``RetryHeartbeatStaleTrialCallback``
  use; :class:`HeartbeatJournalStorage` implements it for a journal file.
"""

from __future__ import annotations

import datetime
import time
from collections.abc import Callable

import optuna
import sqlalchemy
from optuna.storages import BaseStorage, JournalStorage, RDBStorage
from optuna.storages._heartbeat import BaseHeartbeat
from optuna.storages.journal import JournalFileBackend, JournalFileOpenLock
from optuna.trial import FrozenTrial, TrialState

OPTUNA_MAJOR = 5  # the major version this module was written against


def storage_of(study: optuna.Study) -> BaseStorage:
    """The storage the study reads and writes through (Optuna's cache over an RDB store)."""
    return study._storage


def rdb_storage_of(study: optuna.Study) -> RDBStorage | HeartbeatJournalStorage:
    """The storage under the study, RDB or journal (its lock, heartbeat settings)."""
    storage = storage_of(study)
    if not isinstance(storage, HeartbeatJournalStorage):  # (a journal's _backend: its file)
        storage = getattr(storage, "_backend", storage)  # _CachedStorage wraps an RDBStorage
    if not isinstance(storage, RDBStorage | HeartbeatJournalStorage):
        raise TypeError(f"study '{study.study_name}' is not in an RDB or journal store "
                        f"({type(storage).__name__})")
    return storage


def study_id(study: optuna.Study) -> int:
    """The study's id in its storage."""
    return study._study_id


def trial_id(trial: optuna.Trial | FrozenTrial) -> int:
    """The trial's id in its storage (not its number within the study)."""
    return trial._trial_id


def stored_trial(study: optuna.Study, trial: optuna.Trial) -> FrozenTrial:
    """The running trial as the storage holds it (its system attributes, e.g. the
    ``fixed_params`` of a queued trial)."""
    return storage_of(study).get_trial(trial_id(trial))


def record_heartbeat(study: optuna.Study, trial: optuna.Trial) -> None:
    """Write the trial's heartbeat now (Optuna's own first one comes a heartbeat interval
    later; a worker killed before it would otherwise leave no trace)."""
    rdb_storage_of(study).record_heartbeat(trial_id(trial))


def heartbeat_interval(study: optuna.Study) -> int | None:
    """Seconds between heartbeats of the study's store (None: heartbeats off)."""
    return rdb_storage_of(study).get_heartbeat_interval()


class StaleAwareRDBStorage(RDBStorage):
    """RDBStorage whose stale trials also include RUNNING trials that never wrote a
    heartbeat and started more than the grace period ago: a worker killed between creating
    its trial and its first heartbeat. Optuna skips those, so they stayed RUNNING for ever
    and the next run waited on them."""

    def _get_stale_trial_ids(self, study_id: int) -> list[int]:
        stale = super()._get_stale_trial_ids(study_id)
        grace = self.grace_period or 2 * (self.heartbeat_interval or 60)
        now = datetime.datetime.now()  # the clock that stamped datetime_start
        old = [trial_id(t) for t in self.get_all_trials(study_id, deepcopy=False,
                                                        states=(TrialState.RUNNING,))
               if t.datetime_start is not None and
               (now - t.datetime_start).total_seconds() > grace and trial_id(t) not in stale]
        if not old:
            return stale
        query = sqlalchemy.text("SELECT trial_id FROM trial_heartbeats WHERE trial_id IN :ids"
                                ).bindparams(sqlalchemy.bindparam("ids", expanding=True))
        with self.engine.connect() as con:
            beating = {row[0] for row in con.execute(query, {"ids": old})}
        return stale + [i for i in old if i not in beating]


# the trial system attribute a journal heartbeat writes: seconds since the epoch
JOURNAL_BEAT = "kdig:heartbeat"


class HeartbeatJournalStorage(JournalStorage, BaseHeartbeat):
    """Optuna's JournalStorage on one file (shared storage, no database server), with the
    heartbeats Optuna 5's journal lacks: without them a worker killed by SIGKILL or a lost
    machine left its trial RUNNING for ever, and a resumed search waited on it.

    A beat is a trial system attribute, ``JOURNAL_BEAT`` (one journal line a heartbeat
    interval); a RUNNING trial whose last beat (or, before its first, its start) is older
    than the grace period is stale, as with RDBStorage. The clocks are the workers' own, so
    machines sharing a journal need synchronised clocks (NTP); the grace period, twice the
    interval, absorbs small skews."""

    def __init__(self, path: str, heartbeat_interval: int, grace_period: int,
                 heartbeat_stale_trial_callback: Callable[[optuna.Study, FrozenTrial], None]
                 | None = None) -> None:
        # the open lock (O_EXCL files) works on NFS, where symlink locks may not
        super().__init__(JournalFileBackend(path, lock_obj=JournalFileOpenLock(path)))
        self.path = path
        self.heartbeat_interval = heartbeat_interval
        self.grace_period = grace_period
        self.heartbeat_stale_trial_callback = heartbeat_stale_trial_callback

    def record_heartbeat(self, trial_id: int) -> None:
        try:
            self.set_trial_system_attr(trial_id, JOURNAL_BEAT, time.time())
        except optuna.exceptions.UpdateFinishedTrialError:
            pass  # it ended (or another process failed it) since the beat was due

    def _get_stale_trial_ids(self, study_id: int) -> list[int]:
        now = time.time()
        stale = []
        for t in self.get_all_trials(study_id, deepcopy=False, states=(TrialState.RUNNING,)):
            beat = t.system_attrs.get(JOURNAL_BEAT)
            last = beat if beat is not None else (
                t.datetime_start.timestamp() if t.datetime_start is not None else now)
            if now - last > self.grace_period:
                stale.append(trial_id(t))
        return stale

    def get_heartbeat_interval(self) -> int | None:
        return self.heartbeat_interval

    def get_heartbeat_stale_trial_callback(
            self) -> Callable[[optuna.Study, FrozenTrial], None] | None:
        return self.heartbeat_stale_trial_callback
