"""The Optuna objective: suggest -> config -> one student run -> report, prune, record.

Validation accuracy is the objective; test accuracy is recorded on every trial and never
optimised (docs/design.md, defect 2).
"""

from __future__ import annotations

import tempfile
import warnings
from pathlib import Path
from typing import Any

import optuna
from optuna.artifacts import get_all_artifact_meta, upload_artifact
from optuna.storages import RetryHeartbeatStaleTrialCallback
from optuna.trial import FrozenTrial, TrialState
from optuna_dashboard import save_note
from safetensors.torch import save_file

from kdig_study import formats
from kdig_study.config import (
    ParamSpec,
    StudyConfig,
    apply_params,
    method_name,
    relevant_space,
    used_by,
)
from kdig_study.experiment import Context, RunMetrics, run_student
from kdig_study.measure import latency_columns, profile
from kdig_study.optuna_adapter import stored_trial
from kdig_study.paths import atomic_write, file_sha256, storage_dir
from kdig_study.tracking import Guarded, Tracker


def suggest(trial: optuna.Trial, space: dict[str, ParamSpec],
            cfg: StudyConfig | None = None) -> dict[str, Any]:
    """A trial's parameters, define-by-run: with ``cfg``, a parameter the values suggested so
    far do not use (DKD's, in a trial that chose dist) is not suggested at all."""
    params: dict[str, Any] = {}
    for name, spec in space.items():
        if cfg is not None and not used_by(cfg, name, params):
            continue
        if spec.choices:
            choices = [int(c) for c in spec.choices] if name == "ig_steps" \
                else list(spec.choices)  # numbers, or map sources for `source`
            params[name] = trial.suggest_categorical(name, choices)
        else:
            assert spec.low is not None and spec.high is not None
            params[name] = trial.suggest_float(name, spec.low, spec.high, log=spec.log)
    return params


BEST_RULE_SINGLE = "the highest validation accuracy"
BEST_RULE_PARETO = ("on the Pareto front of (validation accuracy, robust validation accuracy), "
                    "the trial with the highest mean of the two; ties: the higher validation "
                    "accuracy")


def choose_best(study: optuna.Study) -> tuple[FrozenTrial | None, str]:
    """The trial whose parameters stand for a search, and the rule that chose it.

    One objective: the highest validation accuracy. Several (clean and robust validation
    accuracy): among the Pareto-optimal trials, the highest mean of the objectives, so
    neither clean nor robust accuracy alone decides; ties go to clean accuracy.
    """
    done = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if not done:
        return None, ""
    if len(study.directions) == 1:
        return max(done, key=lambda t: (t.values[0], -t.number)), BEST_RULE_SINGLE
    front = study.best_trials
    best = max(front, key=lambda t: (sum(t.values) / len(t.values), t.values[0], -t.number))
    return best, BEST_RULE_PARETO


def _note(trial: optuna.Trial, cfg: StudyConfig, params: dict[str, Any], m: RunMetrics) -> str:
    rows = "\n".join(f"| {k} | {formats.param(v)} |" for k, v in params.items())
    mode = method_name(cfg.method)
    gap = "n/a" if m.ig_gap_median is None else f"{m.ig_gap_median:.2%}"
    return (f"## Trial {trial.number}: student ({mode}), scale `{cfg.scale}`\n\n"
            f"**Validation accuracy {m.val_acc:.2%}** (objective); test accuracy "
            f"{m.test_acc:.2%} (recorded, never optimised).\n\n"
            + (f"Under the corruption suite: validation {m.robust.val_acc:.2%}, test "
               f"{m.robust.test_acc:.2%}.\n\n" if m.robust is not None else "") +
            f"| parameter | value |\n|---|---|\n{rows}\n\n"
            f"{m.params:,} parameters ({m.compression:.2f}x fewer than the teacher), "
            f"{m.flops / 1e6:.1f} MFLOPs/image; best epoch {m.best_epoch} of "
            f"{m.epochs_run}; {m.wall_s:.0f} s; seed {m.seed}; IG completeness gap "
            f"{gap}.\n\nArtifacts: the best epoch's weights (safetensors) and the IG preview.")


def record_run(trial: optuna.Trial, m: RunMetrics, latency: dict[str, float]) -> None:
    """A run's results as trial attributes: ``test_acc`` (its own column in the dashboard's
    trial table), ``metrics`` (the rest), ``robust`` (accuracy per corruption and per
    corruption-severity on the test split). Each attribute is one store transaction, and the
    dashboard shows at most 1,024 characters of one, hence three."""
    def short(v: Any) -> Any:
        return float(f"{v:.5g}") if isinstance(v, float) else v

    trial.set_user_attr("test_acc", m.test_acc)
    trial.set_user_attr("metrics", {k: short(v) for k, v in m.stored().items()}
                        | {k: short(v) for k, v in latency.items()})
    if m.robust is not None:
        trial.set_user_attr("robust", {k: round(v, 4) for k, v in m.robust.breakdown().items()})


def record_provenance(trial: optuna.Trial, ctx: Context, cfg: StudyConfig) -> None:
    """The data and the teacher a run learns from, on the run itself (``provenance``): a
    trial's numbers mean something only with them. The teacher is None where the run uses
    none (no KD, IG or AT); one that does loads it here, as its run would."""
    m = cfg.method
    uses_teacher = m.kd or m.ig or m.at
    teacher = ctx.teacher() if uses_teacher else None
    trial.set_user_attr("provenance", {
        "data": ctx.data.fingerprint, "data_origin": ctx.data.origin,
        "teacher": teacher.fingerprint if teacher else None,
        # its weights' checksum: a teacher trained again elsewhere must be the same file
        "teacher_sha256": teacher.meta.get("sha256") if teacher else None})


class Objective:
    """One trial = one student run with suggested parameters. Reports validation accuracy
    every epoch; the pruner may stop it early."""

    def __init__(self, ctx: Context, prune: bool = True, artifacts: Any = None,
                 tracker: Tracker | None = None) -> None:
        self.ctx = ctx
        self.tracker = tracker or Guarded([])
        self.space = relevant_space(ctx.cfg)
        self.objectives = ctx.cfg.search.objectives
        # Optuna cannot prune multi-objective trials (Trial.report/should_prune).
        self.prune = prune and len(self.objectives) == 1
        self.artifacts = artifacts
        self._latency: dict[str, Any] | None = None  # the student's shape is fixed per study

    def __call__(self, trial: optuna.Trial) -> float | tuple[float, ...]:
        params = suggest(trial, self.space, self.ctx.cfg)
        cfg = apply_params(self.ctx.cfg, params)
        stored = stored_trial(trial.study, trial)
        # a retry (of an interrupted trial, or a dead worker's) inherits the epochs it
        # reported, and its run goes on from its last checkpoint
        reported = set(stored.intermediate_values)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            retry_of = RetryHeartbeatStaleTrialCallback.retried_trial_number(stored)
        last_epoch = [0]

        def on_epoch(stats: Any) -> None:
            last_epoch[0] = stats.epoch
            self.tracker.epoch(trial.study.study_name, trial.number, stats)
            if len(self.objectives) > 1:
                return
            if stats.epoch not in reported:
                trial.report(stats.val_acc, stats.epoch)
            if self.prune and trial.should_prune():
                raise optuna.TrialPruned(f"pruned after epoch {stats.epoch}: "
                                         f"val acc {stats.val_acc:.4f}")

        record_provenance(trial, self.ctx, cfg)
        desc = f"trial {trial.number}" + (f" (retry of trial {retry_of})"
                                          if retry_of is not None else "")
        try:
            run = run_student(self.ctx, cfg, on_epoch=on_epoch, desc=desc)
        except optuna.TrialPruned:
            trial.set_user_attr("metrics", {"epochs_run": last_epoch[0]})
            raise
        m = run.metrics
        if self._latency is None:
            prof = profile(run.model, self.ctx.device, batch=cfg.student_train.batch_size,
                           how=cfg.measure, image_size=self.ctx.data.image_size)
            self._latency = latency_columns(prof)
        # m.wall_s, recorded as train_eval_s: training and evaluation with their setup
        # (model, data, maps); the rest of the trial is sampling, store writes,
        # measurement and artifacts
        record_run(trial, m, self._latency)
        if self.artifacts is not None:
            self._upload(trial, run.result.state, m)
        save_note(trial, _note(trial, cfg, params, m))
        if len(self.objectives) > 1:
            stored = m.stored()
            return tuple(float(stored[o]) for o in self.objectives)
        return float(m.val_acc)

    def _upload(self, trial: optuna.Trial, state: dict[str, Any], m: RunMetrics) -> None:
        tmp_dir = storage_dir() / "tmp"
        tmp_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=tmp_dir) as tmp:
            ckpt = Path(tmp) / f"trial{trial.number}-best.safetensors"
            atomic_write(ckpt, lambda f: save_file({k: v.contiguous() for k, v in state.items()},
                                                   str(f)))
            # checked when read back (export, report): flipped or cut bytes must not export
            trial.set_user_attr("weights_sha256", file_sha256(ckpt))
            upload_artifact(artifact_store=self.artifacts, file_path=str(ckpt),
                            study_or_trial=trial, mimetype="application/octet-stream")
        preview = m.ig_preview
        if preview and Path(preview).is_file():
            upload_artifact(artifact_store=self.artifacts, file_path=preview,
                            study_or_trial=trial, mimetype="image/png")


def attach_gallery(study: optuna.Study, artifacts: Any, path: Path) -> None:
    """The map sources' gallery (kdig_study.experiment.Context.gallery) as an artifact of
    the study, once per content (its file name carries the content's key)."""
    name = f"gallery-{path.stem}.png"
    if any(m.filename == name for m in get_all_artifact_meta(study)):
        return
    tmp_dir = storage_dir() / "tmp"
    tmp_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=tmp_dir) as tmp:
        target = Path(tmp) / name
        target.write_bytes(path.read_bytes())
        upload_artifact(artifact_store=artifacts, file_path=str(target), study_or_trial=study,
                        mimetype="image/png")


def teacher_cache_line(trials: list[FrozenTrial], whose: str) -> str:
    """How many KD/AT steps of ``trials`` read the teacher's outputs from the cache. Only
    a finished run records its counts: a pruned trial's steps are not in them (said)."""
    cached = computed = 0
    pruned = sum(t.state == TrialState.PRUNED for t in trials)
    for t in trials:
        m = t.user_attrs.get("metrics", {})
        cached += m.get("teacher_steps_cached", 0)
        computed += m.get("teacher_steps_computed", 0)
    if cached + computed == 0:
        return f"teacher outputs: none of {whose} ran the teacher (no KD or AT)"
    return (f"teacher outputs: {cached:,} of {cached + computed:,} KD/AT steps of {whose} "
            f"read from the teacher-output cache ({cached / (cached + computed):.0%})"
            + (f"; the {pruned} pruned trial(s) record no count" if pruned else ""))
