"""The claim-a-slot-then-run loop that the search and the ablation share, on a real SQLite
store, in-process (the command-line tests run it across worker processes)."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import optuna
import pytest
import sqlalchemy
from optuna.trial import TrialState

from kdig_study.optuna_adapter import trial_id
from kdig_study.slots import DONE, RUN, Next, SlotLock, claim_and_run
from kdig_study.store import open_storage


@pytest.fixture
def store(tmp_path: Path) -> Any:
    return open_storage(f"sqlite:///{tmp_path / 'slots.db'}", heartbeat_interval=60)


def _beating(storage: Any) -> set[int]:
    with storage.engine.connect() as con:
        return {r[0] for r in con.execute(sqlalchemy.text("SELECT trial_id FROM trial_heartbeats"))}


def test_runs_until_done_releasing_the_lock_and_beating_at_once(store: Any) -> None:
    study = optuna.create_study(study_name="s", storage=store)
    lock = SlotLock(store, "s")
    seen: list[tuple[int, bool, bool]] = []

    def objective(trial: optuna.Trial) -> float:
        # the slot is taken (lock released) and the first heartbeat is already written
        seen.append((trial.number, lock.held, trial_id(trial) in _beating(store)))
        return float(trial.number)

    def decide() -> Next:
        done = len(study.get_trials(states=(TrialState.COMPLETE,)))
        assert lock.held
        return DONE if done >= 3 else RUN

    calls: list[Any] = []
    finished = claim_and_run(study, lock, decide, objective, poll_s=0.01,
                             callbacks=[lambda s, t: calls.append(t.number)])
    assert finished and not lock.held
    assert seen == [(0, False, True), (1, False, True), (2, False, True)]
    assert calls == [0, 1, 2]
    assert [t.state for t in study.get_trials()] == [TrialState.COMPLETE] * 3


def test_waits_saying_each_new_line_once_and_stops_at_the_timeout(store: Any) -> None:
    study = optuna.create_study(study_name="w", storage=store)
    lines = iter(["waiting for A", "waiting for A", "waiting for B", "waiting for B"] * 50)
    logged: list[str] = []

    def objective(trial: optuna.Trial) -> float:
        raise AssertionError("nothing is to run")

    finished = claim_and_run(study, SlotLock(store, "w"),
                             lambda: Next("wait", lambda: next(lines)), objective, poll_s=0.01,
                             log=lambda line, **_: logged.append(line), timeout=1.0)
    assert not finished and study.get_trials() == []
    assert logged[:2] == ["waiting for A", "waiting for B"]
    assert all(a != b for a, b in itertools.pairwise(logged))


def test_an_interrupted_trial_fails_frees_the_lock_and_is_queued_again(store: Any) -> None:
    study = optuna.create_study(study_name="i", storage=store)
    lock = SlotLock(store, "i")

    def objective(trial: optuna.Trial) -> float:
        trial.suggest_float("x", 0, 1)
        trial.report(0.5, 1)
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        claim_and_run(study, lock, lambda: RUN, objective, poll_s=0.01)
    assert not lock.held
    failed, retry = study.get_trials()
    assert (failed.state, retry.state) == (TrialState.FAIL, TrialState.WAITING)
    # its own parameters and the epochs it reported, to go on from its checkpoint
    assert retry.params == failed.params and retry.intermediate_values == {1: 0.5}
    assert retry.system_attrs["failed_trial"] == failed.number
    lock.acquire()  # nobody holds it any more
    lock.release()


class _InterruptedSampler(optuna.samplers.RandomSampler):
    """Interrupts inside Optuna's ask, after the trial is RUNNING in the store and before
    the objective begins (where a worker's parent-watch SIGTERM once landed in CI)."""

    def before_trial(self, study: optuna.Study, trial: Any) -> None:
        raise KeyboardInterrupt


@pytest.mark.parametrize("queued", [False, True])
def test_an_interrupt_inside_ask_leaves_no_running_trial(store: Any, queued: bool) -> None:
    """A trial interrupted between its creation (or its taking from the queue) and its
    objective stayed RUNNING until its heartbeat went stale."""
    study = optuna.create_study(study_name="a", storage=store, sampler=_InterruptedSampler())
    if queued:
        study.enqueue_trial({"x": 0.25})
    lock = SlotLock(store, "a")

    def objective(trial: optuna.Trial) -> float:
        raise AssertionError("the interrupt comes first")

    with pytest.raises(KeyboardInterrupt):
        claim_and_run(study, lock, lambda: RUN, objective, poll_s=0.01)
    assert not lock.held
    failed, retry = study.get_trials()
    assert (failed.state, retry.state) == (TrialState.FAIL, TrialState.WAITING)
    assert retry.system_attrs["failed_trial"] == failed.number
    assert retry.system_attrs.get("fixed_params") == failed.system_attrs.get("fixed_params")


@pytest.mark.parametrize("where", ["report", "tell"])
def test_a_trial_another_worker_failed_is_never_told_twice(store: Any, where: str) -> None:
    """Another process failed this worker's live trial (its heartbeat looked stale there):
    the worker died with UpdateFinishedTrialError / "Cannot tell a FAIL trial"."""
    study = optuna.create_study(study_name="t", storage=store)
    lock = SlotLock(store, "t")
    logged: list[str] = []

    def objective(trial: optuna.Trial) -> float:
        if trial.number == 0:  # as another worker's fail_stale would
            store.set_trial_state_values(trial_id(trial), TrialState.FAIL)
            if where == "report":
                trial.report(0.5, 1)
        return 1.0

    def decide() -> Next:
        return DONE if study.get_trials(states=(TrialState.COMPLETE,)) else RUN

    assert claim_and_run(study, lock, decide, objective, poll_s=0.01,
                         log=lambda line, **_: logged.append(line))
    assert [t.state for t in study.get_trials()] == [TrialState.FAIL, TrialState.COMPLETE]
    assert logged == ["trial 0 was failed by another worker while it ran (its heartbeat looked "
                      "stale there); its result is not recorded and its queued retry runs it "
                      "again"]


def test_the_heartbeat_interval_is_the_studys(tmp_path: Path) -> None:
    from kdig_study.config import load_study
    from kdig_study.store import open_study

    url = f"sqlite:///{tmp_path / 'hb.db'}"
    cfg = load_study("kd_ig", "smoke")

    def opened(interval: int, lines: list[str]) -> Any:
        storage = open_storage(url, heartbeat_interval=interval)
        open_study(storage, "hb", cfg, optuna.samplers.RandomSampler(),
                   optuna.pruners.NopPruner(), ["maximize"], url, data_fingerprint="d",
                   data_origin="o", precision={"teacher": "fp32"}, device="cpu",
                   log=lambda line, **_: lines.append(line))
        return storage

    first: list[str] = []
    assert opened(60, first).heartbeat_interval == 60 and first == []
    later: list[str] = []
    storage = opened(1, later)
    assert (storage.heartbeat_interval, storage.grace_period) == (60, 120)
    assert later == ["--heartbeat 1: study 'hb' beats every 60 s (set when it was made; every "
                     "worker uses it): using 60 s"]


# --- a journal file as the store (Optuna's JournalStorage, with our heartbeats) ---

@pytest.mark.filterwarnings("ignore:Heartbeat of storage is supposed to be used")
def test_a_journal_store_fails_and_retries_a_dead_workers_trial_only(tmp_path: Path) -> None:
    """Optuna 5's journal has no heartbeats: a trial whose worker was SIGKILLed stayed
    RUNNING for ever. Ours beats into the journal; a silent trial is failed and retried with
    its parameters, a beating one is left alone."""
    import time

    from optuna.distributions import FloatDistribution

    from kdig_study.optuna_adapter import JOURNAL_BEAT
    from kdig_study.store import fail_stale, open_storage

    storage = open_storage(f"journal://{tmp_path}/runs/kdig.journal", heartbeat_interval=1)
    assert (tmp_path / "runs" / "kdig.journal").is_file()
    study = optuna.create_study(storage=storage, study_name="j")
    space = {"x": FloatDistribution(0, 1)}
    dead, alive = study.ask(space), study.ask(space)
    storage.record_heartbeat(trial_id(dead))  # it beat once, then its worker died
    time.sleep(2.3)  # past the grace period (2 x 1 s)
    storage.record_heartbeat(trial_id(alive))
    fail_stale(study)
    trials = study.get_trials()
    assert trials[dead.number].state == TrialState.FAIL
    assert trials[alive.number].state == TrialState.RUNNING
    assert JOURNAL_BEAT in trials[alive.number].system_attrs
    retry = [t for t in trials if t.system_attrs.get("failed_trial") == dead.number]
    assert len(retry) == 1 and retry[0].state == TrialState.WAITING
    assert retry[0].params == trials[dead.number].params
    study.tell(alive, 0.5)
    storage.record_heartbeat(trial_id(alive))  # a late beat of a finished trial: ignored


def test_a_journal_store_hands_out_slots_under_a_lock_beside_its_file(tmp_path: Path) -> None:
    from kdig_study.store import open_storage

    storage = open_storage(f"journal://{tmp_path}/kdig.journal")
    lock = SlotLock(storage, "s")
    with lock.held_until_released():
        assert lock.held and list(tmp_path.glob("kdig.journal.*.slots.lock"))
    assert not lock.held


@pytest.mark.parametrize("url,existing,fragment", [
    ("journal:", False, "a journal store needs a file"),
    ("journal:///nowhere/kdig.journal", True, "no journal store at /nowhere/kdig.journal"),
])
def test_journal_urls_are_checked_in_one_line(url: str, existing: bool,
                                              fragment: str) -> None:
    from kdig_study.errors import KdigError
    from kdig_study.store import open_storage

    with pytest.raises(KdigError, match=fragment):
        open_storage(url, existing=existing)
