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
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from kdig_study.errors import KdigError
from kdig_study.paths import safe_name, storage_dir

if TYPE_CHECKING:
    import optuna
    from optuna.trial import FrozenTrial

    from kdig_study.engine import EpochStats

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


def _epoch_values(stats: EpochStats) -> dict[str, float]:
    return {k: v for k, v in _numbers(dataclasses.asdict(stats)).items() if k != "epoch"}


class Tracker:
    """One backend. ``epoch`` is called as each epoch ends (live curves), ``finished`` as an
    Optuna callback once a trial has ended in a state, ``close`` when the command ends (it
    closes the runs of trials that ended without a callback: interrupted, or failed by an
    error)."""

    name: ClassVar[str]
    package: ClassVar[str]  # what the `track` extra installs for it

    @classmethod
    def default(cls) -> Tracker:
        raise NotImplementedError

    def where(self) -> str:
        raise NotImplementedError

    def epoch(self, study: str, number: int, stats: EpochStats) -> None:
        raise NotImplementedError

    def finished(self, study: optuna.Study, trial: FrozenTrial) -> None:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError


class MLflowTracker(Tracker):
    name, package = "mlflow", "mlflow"

    def __init__(self, uri: str) -> None:
        from mlflow.tracking import MlflowClient

        # MLflow and its migrations announce each table they make, on stderr, at INFO
        for logger in ("mlflow", "alembic"):
            logging.getLogger(logger).setLevel(logging.WARNING)
        self.uri = uri
        self.client = MlflowClient(uri)
        self._runs: dict[tuple[str, int], str] = {}  # (study, trial number) -> run id

    @classmethod
    def default(cls) -> Tracker:
        """$MLFLOW_TRACKING_URI, else an SQLite file in the storage folder (MLflow 3 refuses
        its old folder store)."""
        return cls(os.environ.get("MLFLOW_TRACKING_URI") or
                   f"sqlite:///{(storage_dir() / 'mlflow.db').resolve()}")

    def where(self) -> str:
        return f"MLflow at {self.uri}"

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
        from mlflow.entities import Metric

        stamp = int(1000 * time.time())
        self.client.log_batch(self._run(study, number), metrics=[
            Metric(f"epoch/{k}", v, stamp, stats.epoch) for k, v in _epoch_values(stats).items()])

    def finished(self, study: optuna.Study, trial: FrozenTrial) -> None:
        from mlflow.entities import Metric, Param, RunTag

        run = self._run(study.study_name, trial.number)
        stamp = int(1000 * time.time())
        self.client.log_batch(
            run, metrics=[Metric(k, v, stamp, 0) for k, v in final_metrics(study, trial).items()],
            params=[Param(k, str(v)) for k, v in trial.params.items()],
            tags=[RunTag("mlflow.runName", run_name(trial)),
                  RunTag("optuna.state", trial.state.name)])
        self.client.set_terminated(run, "FINISHED" if trial.state.name in
                                   ("COMPLETE", "PRUNED") else "FAILED")
        del self._runs[(study.study_name, trial.number)]

    def close(self) -> None:
        for run in self._runs.values():
            self.client.set_terminated(run, "KILLED")
        self._runs.clear()


class TensorBoardTracker(Tracker):
    name, package = "tensorboard", "tensorboard"

    def __init__(self, root: Path) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.root = root
        self._writer = SummaryWriter
        self._open: dict[tuple[str, int], Any] = {}

    @classmethod
    def default(cls) -> Tracker:
        return cls(storage_dir() / "tensorboard")

    def where(self) -> str:
        return f"TensorBoard under {self.root}"

    def _writer_for(self, study: str, number: int) -> Any:
        key = (study, number)
        if key not in self._open:
            self._open[key] = self._writer(
                log_dir=str(self.root / safe_name(study) / f"trial-{number:04d}"))
        return self._open[key]

    def epoch(self, study: str, number: int, stats: EpochStats) -> None:
        w = self._writer_for(study, number)
        for k, v in _epoch_values(stats).items():
            w.add_scalar(f"epoch/{k}", v, stats.epoch)
        w.flush()

    def finished(self, study: optuna.Study, trial: FrozenTrial) -> None:
        w = self._writer_for(study.study_name, trial.number)
        hparams = {k: v if isinstance(v, int | float | str | bool) else str(v)
                   for k, v in trial.params.items()}
        # run_name "." : the hyperparameters beside the curves, not in a sub-folder
        w.add_hparams(hparams | {"state": trial.state.name}, final_metrics(study, trial),
                      run_name=".")
        w.add_text("run", f"{run_name(trial)}: {trial.state.name}")
        w.close()
        del self._open[(study.study_name, trial.number)]

    def close(self) -> None:
        for w in self._open.values():
            w.close()
        self._open.clear()


# --track's names: the one table (the CLI's help, the error messages and make_tracker)
TRACKERS: dict[str, type[Tracker]] = {t.name: t for t in (MLflowTracker, TensorBoardTracker)}


class Guarded(Tracker):
    """The trackers of one command. A tracker is a view, never the record: one that fails
    (a server down, a locked file, a full disk) says so once on stderr and is switched off
    for the rest of the command; the trial and the study store go on unaffected."""

    def __init__(self, trackers: list[Tracker]) -> None:
        self.trackers = trackers

    def __bool__(self) -> bool:  # any tracker left to log to
        return bool(self.trackers)

    def where(self) -> str:
        return "; ".join(t.where() for t in self.trackers)

    def _each(self, call: str, *args: Any) -> None:
        for t in list(self.trackers):
            try:
                getattr(t, call)(*args)
            except Exception as e:  # noqa: BLE001 -- any failure of an optional view
                self.trackers.remove(t)
                print(f"tracking: {t.where()} failed ({type(e).__name__}: "
                      f"{str(e).splitlines()[0] if str(e) else ''}); no more tracking to it "
                      f"in this command (the study store is unaffected)", file=sys.stderr,
                      flush=True)

    def epoch(self, study: str, number: int, stats: EpochStats) -> None:
        self._each("epoch", study, number, stats)

    def finished(self, study: optuna.Study, trial: FrozenTrial) -> None:
        self._each("finished", study, trial)

    def close(self) -> None:
        self._each("close")


def make_tracker(text: str | None) -> Guarded:
    """The trackers of ``--track mlflow,tensorboard`` (none: an empty, falsy Guarded that
    logs nothing); a name not known or a package not installed is one line, before anything
    is trained."""
    names = list(dict.fromkeys(n.strip() for n in (text or "").split(",") if n.strip()))
    for name in names:
        if name not in TRACKERS:
            raise KdigError(f"--track {text}: unknown tracker '{name}'; allowed: "
                            f"{', '.join(TRACKERS)} (comma-separated)")
    made: list[Tracker] = []
    for name in names:
        try:
            made.append(TRACKERS[name].default())
        except ModuleNotFoundError as e:
            raise KdigError(f"--track {name} needs the package '{TRACKERS[name].package}' "
                            f"({e.name} is missing): {_EXTRA}") from None
    return Guarded(made)
