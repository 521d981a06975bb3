"""The private Optuna API kdig_study.optuna_adapter relies on is still there and still means
what the adapter assumes: these fail first when an Optuna upgrade changes it."""

from __future__ import annotations

import inspect
import time
from pathlib import Path

import optuna
import pytest
import sqlalchemy
from optuna.storages import RDBStorage
from optuna.trial import TrialState

from kdig_study.optuna_adapter import (
    OPTUNA_MAJOR,
    StaleAwareRDBStorage,
    heartbeat_interval,
    rdb_storage_of,
    record_heartbeat,
    storage_of,
    stored_trial,
    study_id,
    trial_id,
)
from kdig_study.store import fail_stale, open_storage

# study.ask() on a store with heartbeats: Optuna warns that only optimize() beats for it
pytestmark = pytest.mark.filterwarnings("ignore:Heartbeat of storage:UserWarning")


def _storage(tmp_path: Path, heartbeat: int = 60) -> RDBStorage:
    return open_storage(f"sqlite:///{tmp_path / 'adapter.db'}", heartbeat_interval=heartbeat)


def _heartbeats(storage: RDBStorage) -> set[int]:
    with storage.engine.connect() as con:
        rows = con.execute(sqlalchemy.text("SELECT trial_id FROM trial_heartbeats"))
        return {row[0] for row in rows}


def test_the_installed_optuna_is_the_major_version_the_adapter_was_written_for() -> None:
    assert int(optuna.__version__.split(".")[0]) == OPTUNA_MAJOR


def test_the_stale_trial_hook_has_the_signature_the_override_expects() -> None:
    hook = RDBStorage.__dict__.get("_get_stale_trial_ids")
    assert hook is not None, "RDBStorage no longer defines _get_stale_trial_ids"
    assert list(inspect.signature(hook).parameters) == ["self", "study_id"]
    assert StaleAwareRDBStorage.__dict__["_get_stale_trial_ids"] is not hook
    # fail_stale_trials must still ask the storage for stale ids through this hook
    source = inspect.getsource(optuna.storages.fail_stale_trials)
    assert "_get_stale_trial_ids(" in source


def test_storage_study_and_trial_ids_reach_the_stored_trials(tmp_path: Path) -> None:
    storage = _storage(tmp_path, heartbeat=7)
    assert isinstance(storage, StaleAwareRDBStorage)
    study = optuna.create_study(study_name="a", storage=storage)
    other = optuna.create_study(study_name="b", storage=storage)
    assert rdb_storage_of(study) is storage  # under Optuna's cache
    assert study_id(study) != study_id(other)
    assert storage.get_study_name_from_id(study_id(study)) == "a"
    study.enqueue_trial({"x": 0.25})
    first, second = study.ask(), study.ask()
    second.suggest_float("x", 0, 1)
    assert trial_id(first) != trial_id(second)
    got = storage_of(study).get_trial(trial_id(second))
    assert got.number == second.number == 1 and "x" in got.params
    assert storage.get_trial(trial_id(first)).number == 0
    assert stored_trial(study, first).system_attrs["fixed_params"] == {"x": 0.25}
    frozen = study.get_trials()[1]
    assert trial_id(frozen) == trial_id(second)
    assert heartbeat_interval(study) == 7


def test_a_study_opened_by_url_is_reached_through_the_cache(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'plain.db'}"
    study = optuna.create_study(study_name="p", storage=url)
    rdb = rdb_storage_of(study)
    assert type(rdb) is RDBStorage and storage_of(study) is not rdb
    assert heartbeat_interval(study) is None  # heartbeats were not switched on


def test_record_heartbeat_writes_the_trials_row(tmp_path: Path) -> None:
    storage = _storage(tmp_path)
    study = optuna.create_study(study_name="h", storage=storage)
    quiet, beating = study.ask(), study.ask()
    assert _heartbeats(storage) == set()
    record_heartbeat(study, beating)
    assert _heartbeats(storage) == {trial_id(beating)}
    fail_stale(study)  # both are well within the grace period
    assert [t.state for t in study.get_trials()] == [TrialState.RUNNING] * 2
    assert trial_id(quiet) not in _heartbeats(storage)


def test_a_running_trial_without_a_heartbeat_goes_stale_after_the_grace_period(
        tmp_path: Path) -> None:
    storage = _storage(tmp_path, heartbeat=60)  # grace 120 s
    study = optuna.create_study(study_name="s", storage=storage)
    study.enqueue_trial({"x": 0.5})
    trial = study.ask()  # RUNNING, never a heartbeat: as if its worker died at once
    trial.suggest_float("x", 0, 1)
    assert StaleAwareRDBStorage._get_stale_trial_ids(storage, study_id(study)) == []
    storage.grace_period = 1  # seconds (an int, as Optuna types it)
    time.sleep(1.1)
    assert storage._get_stale_trial_ids(study_id(study)) == [trial_id(trial)]
    # Optuna's own check alone skips it (the reason for the override)
    assert RDBStorage._get_stale_trial_ids(storage, study_id(study)) == []
    fail_stale(study)
    states = [t.state for t in study.get_trials()]
    assert states[0] == TrialState.FAIL and states[1:] == [TrialState.WAITING]
    assert study.get_trials()[1].system_attrs["fixed_params"] == {"x": 0.5}


@pytest.mark.parametrize("name", ["record_heartbeat", "get_heartbeat_interval", "get_trial"])
def test_the_storage_methods_the_adapter_calls_exist(name: str) -> None:
    assert callable(getattr(RDBStorage, name, None)), name
