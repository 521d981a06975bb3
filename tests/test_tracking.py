"""--track mlflow|tensorboard: each trial's per-epoch curves, parameters and metrics, read back
from local file stores (MLflow's SQLite file, TensorBoard's event files)."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from kdig_study.errors import KdigError
from kdig_study.tracking import make_tracker

from cli_helpers import assert_one_line_error, run_cli, trials_of


def test_unknown_tracker_and_missing_package_are_one_line(
        monkeypatch: pytest.MonkeyPatch) -> None:
    for none in (None, ""):  # no tracker made: an empty one that logs nothing
        assert not make_tracker(none) and make_tracker(none).trackers == []
    with pytest.raises(KdigError, match=r"--track wandb: unknown tracker 'wandb'; allowed: "
                                        r"mlflow, tensorboard"):
        make_tracker("wandb")
    monkeypatch.setitem(sys.modules, "mlflow", None)  # as if not installed
    monkeypatch.setitem(sys.modules, "mlflow.tracking", None)
    with pytest.raises(KdigError, match=r"--track mlflow needs the package 'mlflow'.*"
                                        r"pip install -e \"\.\[track\]\""):
        make_tracker("mlflow")


def test_a_failing_tracker_says_so_once_and_is_switched_off(
        capsys: pytest.CaptureFixture[str]) -> None:
    """A tracker is a view: a server down or a locked file must not fail the trial (its
    calls ran inside the objective's epoch callback) nor the worker."""
    from kdig_study.engine import EpochStats
    from kdig_study.tracking import Guarded, Tracker

    calls: list[str] = []

    class Broken(Tracker):
        def where(self) -> str:
            return "Broken at nowhere"

        def epoch(self, study: str, number: int, stats: EpochStats) -> None:
            raise ConnectionError("server down\nmore lines")

    class Fine(Tracker):
        def where(self) -> str:
            return "Fine"

        def epoch(self, study: str, number: int, stats: EpochStats) -> None:
            calls.append(f"{study} {number} {stats.epoch}")

        def close(self) -> None:
            calls.append("closed")

    both = Guarded([Broken(), Fine()])
    stats = EpochStats(epoch=1, loss=1.0, train_acc=0.5, val_acc=0.4, lr=0.1, seconds=1.0,
                       images_per_s=10.0)
    both.epoch("s", 0, stats)
    both.epoch("s", 0, dataclasses.replace(stats, epoch=2))
    both.close()
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(
        "tracking: Broken at nowhere failed (ConnectionError: server down); no more tracking")
    assert calls == ["s 0 1", "s 0 2", "closed"] and both.where() == "Fine"


def test_a_bad_tracker_fails_before_any_training(isolated_storage: Path) -> None:
    proc = run_cli("optimize", "--study", "kd_ig", "--scale", "smoke", "--no-progress",
                   "--n-trials", "1", "--track", "mlflow,nope")
    assert_one_line_error(proc, "unknown tracker 'nope'")
    assert not (isolated_storage / "cache").exists()  # nothing trained, no data decoded


def _scalars(folder: Path, tag: str) -> dict[int, float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder))
    acc.Reload()
    return {e.step: e.value for e in acc.Scalars(tag)}


def test_a_search_is_tracked_in_mlflow_and_tensorboard(isolated_storage: Path,
                                                       warm_cache: Path) -> None:
    pytest.importorskip("mlflow", reason="the track extra: pip install -e \".[track]\"")
    pytest.importorskip("tensorboard", reason="the track extra: pip install -e \".[track]\"")
    from mlflow.tracking import MlflowClient

    proc = run_cli("optimize", "--study", "kd_ig", "--scale", "smoke", "--no-progress",
                   "--n-trials", "2", "--set", "student_train.epochs=2",
                   "--track", "mlflow,tensorboard", env={"MLFLOW_TRACKING_URI": ""})
    assert proc.returncode == 0, proc.stderr
    db = (isolated_storage / "mlflow.db").resolve()
    assert f"tracking to MLflow at sqlite:///{db}; TensorBoard under " \
           f"{isolated_storage / 'tensorboard'}" in proc.stdout
    trials = {t.number: t for t in trials_of(f"sqlite:///{isolated_storage}/kdig.db",
                                             "kd_ig-smoke")}
    assert len(trials) == 2 and all(t.state == TrialState.COMPLETE for t in trials.values())

    client = MlflowClient(f"sqlite:///{db}")
    experiment = client.get_experiment_by_name("kd_ig-smoke")
    runs = {int(r.data.tags["optuna.trial"]): r
            for r in client.search_runs([experiment.experiment_id])}
    assert set(runs) == set(trials)
    for n, t in trials.items():
        r = runs[n]
        assert r.data.tags["mlflow.runName"] == f"trial {n}"
        assert r.data.tags["optuna.state"] == "COMPLETE" and r.info.status == "FINISHED"
        assert r.data.params == {k: str(v) for k, v in t.params.items()}
        assert r.data.metrics["val_acc"] == pytest.approx(t.values[0])
        assert r.data.metrics["test_acc"] == pytest.approx(t.user_attrs["test_acc"])
        curve = client.get_metric_history(r.info.run_id, "epoch/val_acc")
        assert {m.step: m.value for m in curve} == pytest.approx(t.intermediate_values)
        assert len(client.get_metric_history(r.info.run_id, "epoch/loss")) == 2

        folder = isolated_storage / "tensorboard" / "kd_ig-smoke" / f"trial-{n:04d}"
        assert _scalars(folder, "epoch/val_acc") == pytest.approx(t.intermediate_values)
        assert sorted(_scalars(folder, "epoch/lr")) == [1, 2]


@pytest.mark.slow
def test_an_ablation_is_tracked_run_by_run(isolated_storage: Path, warm_cache: Path,
                                           tmp_path: Path) -> None:
    pytest.importorskip("mlflow", reason="the track extra: pip install -e \".[track]\"")
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'elsewhere.db'}"  # MLflow's own variable is honoured
    proc = run_cli("ablate", "--study", "kd_ig", "--scale", "smoke", "--no-progress",
                   "--seeds", "2", "--factors", "kd", "--out", str(tmp_path),
                   "--set", "student_train.epochs=2", "--track", "mlflow",
                   env={"MLFLOW_TRACKING_URI": uri})
    assert proc.returncode == 0, proc.stderr
    assert f"tracking every run to MLflow at {uri}" in proc.stdout
    study = optuna.load_study(study_name="kd_ig-smoke.ablation",
                              storage=f"sqlite:///{isolated_storage}/kdig.db")
    done = [t for t in study.get_trials() if t.state == TrialState.COMPLETE]
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("kd_ig-smoke.ablation")
                               .experiment_id])
    names = sorted(r.data.tags["mlflow.runName"] for r in runs)
    assert names == sorted(f"{t.params['condition']} r{t.params['replicate']}" for t in done)
    assert names == ["KD r0", "KD r1", "student r0", "student r1"]
    for r in runs:
        assert len(client.get_metric_history(r.info.run_id, "epoch/val_acc")) == 2
        assert 0 < r.data.metrics["test_acc"] <= 1
