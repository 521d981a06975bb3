"""Trial slots shared by any number of workers: a lock held from "is a trial still wanted?"
until that trial is RUNNING in the store, and the one loop that claims a slot and runs it.

Used by the search (kdig_study.search.run_worker: trials until a total is reached) and the
ablation (kdig_study.ablation.AblationRunner: the planned runs), so that workers on one
machine or many never start more trials than wanted, a trial whose worker died is failed and
retried once its heartbeat is stale, and a worker with nothing to start waits and says for
what.
"""

from __future__ import annotations

import contextlib
import time
import warnings
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import optuna
import sqlalchemy
from filelock import FileLock
from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback
from optuna.trial import FrozenTrial, TrialState

from kdig_study.optuna_adapter import HeartbeatJournalStorage, record_heartbeat
from kdig_study.store import MAX_RETRY, FailedElsewhere, fail_stale


class SlotLock:
    """Held from 'are trials still wanted?' until the new trial is RUNNING in the store, so
    that N workers never start more trials than asked for. SQLite (one machine) and a
    journal file (shared storage): a file lock beside it (POSIX locks: on NFS, v4 or lockd);
    PostgreSQL (many machines): a session-level advisory lock."""

    def __init__(self, storage: RDBStorage | HeartbeatJournalStorage, study_name: str) -> None:
        self._key = zlib.crc32(f"kdig-slots:{study_name}".encode()) & 0x7FFFFFFF
        self._file: FileLock | None = None
        self._conn: sqlalchemy.Connection | None = None
        if isinstance(storage, HeartbeatJournalStorage):
            self._file = FileLock(f"{storage.path}.{self._key}.slots.lock")
        elif storage.engine.dialect.name == "sqlite":
            self._file = FileLock(f"{storage.engine.url.database}.{self._key}.slots.lock")
        else:
            self._engine = storage.engine
        self.held = False

    def acquire(self) -> None:
        if self._file is not None:
            self._file.acquire()
        else:
            self._conn = self._engine.connect()
            self._conn.execute(sqlalchemy.text("SELECT pg_advisory_lock(:k)"), {"k": self._key})
        self.held = True

    def release(self) -> None:
        if not self.held:
            return
        self.held = False
        if self._file is not None:
            self._file.release()
        elif self._conn is not None:
            self._conn.execute(sqlalchemy.text("SELECT pg_advisory_unlock(:k)"),
                               {"k": self._key})
            self._conn.close()
            self._conn = None

    @contextlib.contextmanager
    def held_until_released(self) -> Iterator[SlotLock]:
        self.acquire()
        try:
            yield self
        finally:
            self.release()


def held_runs(study: optuna.Study, params: list[dict[str, Any]] | None = None) -> str:
    """The RUNNING trials (those with ``params``, if given), for a line that says what a
    worker waits for: "trial 3 (condition=KD, replicate=1); trial 5 (...)"."""
    parts = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        p = dict(t.params) or dict(t.system_attrs.get("fixed_params", {}))
        if params is not None and not any(all(p.get(k) == v for k, v in q.items())
                                          for q in params):
            continue
        shown = {k: v for k, v in p.items() if k in ("condition", "replicate")} or p
        parts.append(f"trial {t.number}" + (f" ({', '.join(f'{k}={v}' for k, v in shown.items())})"
                                            if shown else ""))
    return "; ".join(parts) or "none"


@dataclass(frozen=True)
class Next:
    """What a worker does next, decided with the slot lock held: ``run`` a trial (the next
    WAITING one, else a new one), ``wait`` for other workers' trials (``waiting`` gives the
    line to show, asked once the lock is released), or stop: everything wanted is ``done``."""

    action: Literal["run", "wait", "done"]
    waiting: Callable[[], str] | None = None


RUN = Next("run")
DONE = Next("done")


def claim_and_run(study: optuna.Study, lock: SlotLock, decide: Callable[[], Next],
                  objective: Callable[[optuna.Trial], float], poll_s: float,
                  log: Callable[..., Any] = print, timeout: float | None = None,
                  callbacks: Sequence[Callable[[optuna.Study, FrozenTrial], None]] = ()) -> bool:
    """Claim a slot, run its trial, repeat: True once ``decide`` says done, False when
    ``timeout`` seconds have passed (no trial is started after that).

    Each round holds ``lock`` while it fails (and queues again) the trials of dead workers
    and asks ``decide``. To run, Optuna creates the trial RUNNING in the store, the lock is
    released (the slot is taken), the trial's first heartbeat is written at once (a worker
    killed before Optuna's first one is caught too) and ``objective`` runs. To wait, the
    lock is released, the waiting line is logged when it changed, and the worker sleeps
    ``poll_s`` seconds. Ctrl-C (and SIGTERM, SIGHUP: the commands raise KeyboardInterrupt
    for them) fails the running trial, queues its retry and propagates."""
    start = time.monotonic()
    said = ""
    current: list[int] = []  # the number of the trial in flight

    def released_then_run(trial: optuna.Trial) -> float:
        current[:] = [trial.number]  # before the release: see _claimed_by_us
        lock.release()  # the trial is RUNNING in the store: its slot is taken
        record_heartbeat(study, trial)
        value = objective(trial)
        if _failed(study, trial.number):
            raise FailedElsewhere  # Optuna would tell it, and fail on the finished trial
        return value

    while timeout is None or time.monotonic() - start < timeout:
        with lock.held_until_released():
            fail_stale(study)
            step = decide()
            if step.action == "done":
                return True
            if step.action == "run":
                current.clear()
                running = _running(study)
                try:
                    study.optimize(released_then_run, n_trials=1, callbacks=list(callbacks))
                except KeyboardInterrupt:
                    if not current and lock.held:
                        # interrupted inside Optuna's ask, after it made (or took from the
                        # queue) the trial RUNNING and before the objective began; only a
                        # lock holder starts trials, so it is the new one
                        current[:] = [n for n in _running(study) - running][:1]
                    for number in set(current) & _running(study):
                        # Optuna left it RUNNING (interrupted in ask or in its own tell), to
                        # be failed only once its heartbeat went stale
                        study.tell(number, state=TrialState.FAIL)
                    if current:
                        retry_interrupted(study, current[0])
                    raise
                except (ValueError, FailedElsewhere,
                        optuna.exceptions.UpdateFinishedTrialError):
                    # "Cannot tell a FAIL trial": another process failed it meanwhile
                    if not current or not _failed(study, current[0]):
                        raise
                    log(f"trial {current[0]} was failed by another worker while it ran (its "
                        f"heartbeat looked stale there); its result is not recorded and its "
                        f"queued retry runs it again", flush=True)
                continue
        line = step.waiting() if step.waiting is not None else ""
        if line != said:
            log(line, flush=True)
            said = line
        time.sleep(poll_s)
    return False


def _running(study: optuna.Study) -> set[int]:
    return {t.number for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))}


def _failed(study: optuna.Study, number: int) -> FrozenTrial | None:
    """Trial ``number`` where it is FAIL (failed by an interrupt, or by another process)."""
    trial = next((t for t in study.get_trials(deepcopy=False) if t.number == number), None)
    return trial if trial is not None and trial.state == TrialState.FAIL else None


def retry_interrupted(study: optuna.Study, number: int) -> None:
    """Queue the retry of trial ``number`` when an interrupt failed it: with its own
    parameters (a search trial's; an ablation run's fixed ones, in its system attributes)
    and intermediate values, as Optuna's heartbeat retry does for a killed worker's trial, so
    that the next run of the command goes on from the trial's last checkpoint."""
    trial = _failed(study, number)
    if trial is None:
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        RetryHeartbeatStaleTrialCallback(max_retry=MAX_RETRY,
                                         inherit_intermediate_values=True)(study, trial)
