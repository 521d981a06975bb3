"""Experiment tracking, optional (`--track mlflow|tensorboard`): each trial or ablation run as
a run of the tracker, with its per-epoch curves as they are trained, then its parameters,
final metrics and state.

The study store stays the record; a tracker is a view for those whose lab already uses one.
Written here rather than with optuna-integration's callbacks: those log a trial once it has
ended (no per-epoch curves), and its TensorBoard callback needs TensorFlow.

    pip install -e ".[track]"     (mlflow-skinny, tensorboard)

MLflow logs to $MLFLOW_TRACKING_URI, else the SQLite file storage/mlflow.db (MLflow 3
refuses its old folder store); one experiment per study. TensorBoard writes under
storage/tensorboard/<study>/trial-NNNN (`tensorboard --logdir storage/tensorboard`).
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import FrozenTrial

from kdig_study.engine import EpochStats
from kdig_study.errors import KdigError
from kdig_study.paths import safe_name, storage_dir

# --track's names, and the package each needs (the `track` extra)
TRACKERS = {"mlflow": "mlflow", "tensorboard": "tensorboard"}
_EXTRA = 'pip install -e ".[track]"'


def _numbers(d: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """The numeric leaves of a trial attribute (bools and text left out)."""
    return {f"{prefix}{k}": float(v) for k, v in d.items()
            if isinstance(v, int | float) and not isinstance(v, bool)}


def final_metrics(study: optuna.Study, trial: FrozenTrial) -> dict[str, float]:
    """A finished trial's objectives (named as the study names them) and the numbers it
    recorded: test accuracy, the run's metrics, accuracy per corruption."""
    names = study.metric_names or (["val_acc"] if len(study.directions) == 1 else
                                   [f"objective_{i}" for i in range(len(study.directions))])
    out = dict(zip(names, map(float, trial.values or ()), strict=False))
    attrs = trial.user_attrs
    if isinstance(attrs.get("test_acc"), int | float):
        out["test_acc"] = float(attrs["test_acc"])
    out |= _numbers(attrs.get("metrics") or {}, "metrics/")
    out |= _numbers(attrs.get("robust") or {}, "robust/")
    return out


def run_name(trial: FrozenTrial) -> str:
    """"trial 12", or an ablation run's label ("KD+IG r3", "KD+IG r3 t1")."""
    p = trial.params
    if "condition" in p and "replicate" in p:
        return f"{p['condition']} r{p['replicate']}" + (
            f" t{p['teacher']}" if "teacher" in p else "")
    return f"trial {trial.number}"


class Tracker:
    """One backend. ``epoch`` is called as each epoch ends (live curves), ``finished`` as an
    Optuna callback once the trial has ended, whatever its state."""

    def epoch(self, study: str, number: int, stats: EpochStats) -> None:
        raise NotImplementedError

    def finished(self, study: optuna.Study, trial: FrozenTrial) -> None:
        raise NotImplementedError


class MLflowTracker(Tracker):
    def __init__(self, uri: str) -> None:
        from mlflow.tracking import MlflowClient

        # MLflow and its migrations announce each table they make, on stderr, at INFO
        for name in ("mlflow", "alembic"):
            logging.getLogger(name).setLevel(logging.WARNING)
        self.uri = uri
        self.client = MlflowClient(uri)
        self._runs: dict[tuple[str, int], str] = {}  # (study, trial number) -> run id

    def _experiment(self, study: str) -> str:
        found = self.client.get_experiment_by_name(study)
        if found is not None:
            return str(found.experiment_id)
        try:
            return str(self.client.create_experiment(study))
        except Exception:  # noqa: BLE001 -- another worker made it first: use theirs
            found = self.client.get_experiment_by_name(study)
            if found is None:
                raise
            return str(found.experiment_id)

    def _run(self, study: str, number: int) -> str:
        key = (study, number)
        if key not in self._runs:
            run = self.client.create_run(self._experiment(study), run_name=f"trial {number}",
                                         tags={"optuna.study": study,
                                               "optuna.trial": str(number)})
            self._runs[key] = run.info.run_id
        return self._runs[key]

    def epoch(self, study: str, number: int, stats: EpochStats) -> None:
        run = self._run(study, number)
        for k, v in _numbers(dataclasses.asdict(stats)).items():
            if k != "epoch":
                self.client.log_metric(run, f"epoch/{k}", v, step=stats.epoch)

    def finished(self, study: optuna.Study, trial: FrozenTrial) -> None:
        run = self._run(study.study_name, trial.number)
        for k, v in trial.params.items():
            self.client.log_param(run, k, v)
        for k, v in final_metrics(study, trial).items():
            self.client.log_metric(run, k, v)
        self.client.set_tag(run, "mlflow.runName", run_name(trial))
        self.client.set_tag(run, "optuna.state", trial.state.name)
        self.client.set_terminated(run, "FINISHED" if trial.state.name in
                                   ("COMPLETE", "PRUNED") else "FAILED")
        self._runs.pop((study.study_name, trial.number), None)


class TensorBoardTracker(Tracker):
    def __init__(self, root: Path) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.root = root
        self._writer = SummaryWriter
        self._open: dict[tuple[str, int], Any] = {}

    def _writer_for(self, study: str, number: int) -> Any:
        key = (study, number)
        if key not in self._open:
            self._open[key] = self._writer(
                log_dir=str(self.root / safe_name(study) / f"trial-{number:04d}"))
        return self._open[key]

    def epoch(self, study: str, number: int, stats: EpochStats) -> None:
        w = self._writer_for(study, number)
        for k, v in _numbers(dataclasses.asdict(stats)).items():
            if k != "epoch":
                w.add_scalar(f"epoch/{k}", v, stats.epoch)
        w.flush()

    def finished(self, study: optuna.Study, trial: FrozenTrial) -> None:
        w = self._writer_for(study.study_name, trial.number)
        hparams = {k: v if isinstance(v, int | float | str | bool) else str(v)
                   for k, v in trial.params.items()}
        metrics = final_metrics(study, trial)
        # run_name "." : the hyperparameters beside the curves, not in a sub-folder
        w.add_hparams(hparams | {"state": trial.state.name}, metrics, run_name=".")
        w.add_text("run", f"{run_name(trial)}: {trial.state.name}")
        w.close()
        self._open.pop((study.study_name, trial.number), None)


class Trackers(Tracker):
    """Several backends as one."""

    def __init__(self, trackers: list[Tracker]) -> None:
        self.trackers = trackers

    def epoch(self, study: str, number: int, stats: EpochStats) -> None:
        for t in self.trackers:
            t.epoch(study, number, stats)

    def finished(self, study: optuna.Study, trial: FrozenTrial) -> None:
        for t in self.trackers:
            t.finished(study, trial)


def mlflow_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or \
        f"sqlite:///{(storage_dir() / 'mlflow.db').resolve()}"


def tensorboard_dir() -> Path:
    return storage_dir() / "tensorboard"


def make_tracker(text: str | None) -> Tracker | None:
    """The trackers of ``--track mlflow,tensorboard`` (None for none); a name not known or a
    package not installed is one line, before anything is trained."""
    if not text:
        return None
    names = list(dict.fromkeys(n.strip() for n in text.split(",") if n.strip()))
    for name in names:
        if name not in TRACKERS:
            raise KdigError(f"--track {text}: unknown tracker '{name}'; allowed: "
                            f"{', '.join(TRACKERS)} (comma-separated)")
    build: dict[str, Callable[[], Tracker]] = {
        "mlflow": lambda: MLflowTracker(mlflow_uri()),
        "tensorboard": lambda: TensorBoardTracker(tensorboard_dir())}
    made: list[Tracker] = []
    for name in names:
        try:
            made.append(build[name]())
        except ModuleNotFoundError as e:
            raise KdigError(f"--track {name} needs the package '{TRACKERS[name]}' ({e.name} "
                            f"is missing): {_EXTRA}") from None
    return made[0] if len(made) == 1 else Trackers(made)


def where(tracker: Tracker | None) -> str:
    """Where the tracker logs, for the command's banner."""
    parts = tracker.trackers if isinstance(tracker, Trackers) else [tracker] if tracker else []
    out = []
    for t in parts:
        if isinstance(t, MLflowTracker):
            out.append(f"MLflow at {t.uri}")
        elif isinstance(t, TensorBoardTracker):
            out.append(f"TensorBoard under {t.root}")
    return "; ".join(out)
