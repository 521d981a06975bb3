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
"""

from __future__ import annotations

import datetime

import optuna
import sqlalchemy
from optuna.storages import BaseStorage, RDBStorage
from optuna.trial import FrozenTrial, TrialState

OPTUNA_MAJOR = 5  # the major version this module was written against


def storage_of(study: optuna.Study) -> BaseStorage:
    """The storage the study reads and writes through (Optuna's cache over an RDB store)."""
    return study._storage


def rdb_storage_of(study: optuna.Study) -> RDBStorage:
    """The RDBStorage under the study (its database engine, heartbeat settings)."""
    storage = storage_of(study)
    storage = getattr(storage, "_backend", storage)  # _CachedStorage wraps the RDBStorage
    if not isinstance(storage, RDBStorage):
        raise TypeError(f"study '{study.study_name}' is not in an RDB store "
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
