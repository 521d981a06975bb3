"""The Optuna objective: suggest -> config -> one student run -> report, prune, record.

Validation accuracy is the objective; test accuracy is recorded on every trial and never
optimised (DESIGN.md defect 2).
"""

from __future__ import annotations

import dataclasses
import tempfile
from pathlib import Path
from typing import Any

import optuna
from optuna.artifacts import get_all_artifact_meta, upload_artifact
from optuna.trial import FrozenTrial, TrialState
from optuna_dashboard import save_note
from safetensors.torch import save_file

from kdig_study.config import ParamSpec, StudyConfig
from kdig_study.experiment import Context, run_student
from kdig_study.measure import profile
from kdig_study.paths import storage_dir


def relevant_space(cfg: StudyConfig) -> dict[str, ParamSpec]:
    """The search parameters that matter for the study's method switches."""
    needs = {"temperature": cfg.method.kd, "alpha": cfg.method.kd,
             "overlay_strength": cfg.method.ig, "overlay_prob": cfg.method.ig,
             # adaptive IG has one map per image: the step count changes nothing
             "ig_steps": cfg.method.ig and not cfg.ig.target_gap,
             "at_weight": cfg.method.at, "lr": True,
             "source": cfg.method.ig}
    return {k: v for k, v in cfg.search.space.items() if needs[k]}


def suggest(trial: optuna.Trial, space: dict[str, ParamSpec]) -> dict[str, Any]:
    params: dict[str, Any] = {}
    for name, spec in space.items():
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


def apply_params(cfg: StudyConfig, params: dict[str, Any]) -> StudyConfig:
    """The study config with one trial's parameters filled in."""
    kd = dataclasses.replace(cfg.kd, temperature=params.get("temperature", cfg.kd.temperature),
                             alpha=params.get("alpha", cfg.kd.alpha))
    ig = dataclasses.replace(
        cfg.ig, overlay_strength=params.get("overlay_strength", cfg.ig.overlay_strength),
        overlay_prob=params.get("overlay_prob", cfg.ig.overlay_prob),
        steps=int(params.get("ig_steps", cfg.ig.steps)))
    at = dataclasses.replace(cfg.at, weight=params.get("at_weight", cfg.at.weight))
    ig = dataclasses.replace(ig, source=params.get("source", cfg.ig.source))
    student_train = dataclasses.replace(cfg.student_train,
                                        lr=params.get("lr", cfg.student_train.lr))
    return dataclasses.replace(cfg, kd=kd, ig=ig, at=at, student_train=student_train)


def _note(trial: optuna.Trial, cfg: StudyConfig, params: dict[str, Any],
          m: dict[str, Any]) -> str:
    rows = "\n".join(f"| {k} | {v:.4g} |" if isinstance(v, float) else f"| {k} | {v} |"
                     for k, v in params.items())
    mode = "+".join(k.upper() for k in ("kd", "ig", "at") if getattr(cfg.method, k)) or "alone"
    gap = f"{m['ig_gap_median']:.2%}" if "ig_gap_median" in m else "n/a"
    return (f"## Trial {trial.number}: student ({mode}), scale `{cfg.scale}`\n\n"
            f"**Validation accuracy {m['val_acc']:.2%}** (objective); test accuracy "
            f"{m['test_acc']:.2%} (recorded, never optimised).\n\n"
            + (f"Under the corruption suite: validation {m['robust_val_acc']:.2%}, test "
               f"{m['robust_test_acc']:.2%}.\n\n" if "robust_test_acc" in m else "") +
            f"| parameter | value |\n|---|---|\n{rows}\n\n"
            f"{m['params']:,} parameters ({m['compression']:.2f}x fewer than the teacher), "
            f"{m['flops'] / 1e6:.1f} MFLOPs/image; best epoch {m['best_epoch']} of "
            f"{m['epochs_run']}; {m['wall_s']:.0f} s; seed {m['seed']}; IG completeness gap "
            f"{gap}.\n\nArtifacts: the best epoch's weights (safetensors) and the IG preview.")


_CORE = ("val_acc", "test_acc", "robust_test_acc", "robust_val_acc", "params", "flops", "bytes",
         "compression", "best_epoch", "epochs_run", "seed", "precision", "train_images",
         "source", "ig_steps", "ig_gap_median", "eval_s", "robust_eval_s", "train_eval_s")


def record_run(trial: optuna.Trial, m: dict[str, Any], latency: dict[str, float]) -> None:
    """A run's results as trial attributes: ``test_acc`` (its own column in the dashboard's
    trial table), ``metrics`` (the rest), ``robust`` (accuracy per corruption and per
    corruption-severity on the test split). Each attribute is one store transaction, and the
    dashboard shows at most 1,024 characters of one, hence three."""
    def short(v: Any) -> Any:
        return float(f"{v:.5g}") if isinstance(v, float) else v

    trial.set_user_attr("test_acc", m["test_acc"])
    trial.set_user_attr("metrics", {k: short(m[k]) for k in _CORE if k in m}
                        | {k: short(v) for k, v in latency.items()})
    robust = {k.removeprefix("robust_test_"): round(v, 4) for k, v in m.items()
              if k.startswith("robust_test_") and k != "robust_test_acc"}
    if robust:
        trial.set_user_attr("robust", robust)


class Objective:
    """One trial = one student run with suggested parameters. Reports validation accuracy
    every epoch; the pruner may stop it early."""

    def __init__(self, ctx: Context, prune: bool = True, artifacts: Any = None) -> None:
        self.ctx = ctx
        self.space = relevant_space(ctx.cfg)
        self.objectives = ctx.cfg.search.objectives
        # Optuna cannot prune multi-objective trials (Trial.report/should_prune).
        self.prune = prune and len(self.objectives) == 1
        self.artifacts = artifacts
        self._latency: dict[str, Any] | None = None  # the student's shape is fixed per study

    def __call__(self, trial: optuna.Trial) -> float | tuple[float, ...]:
        params = suggest(trial, self.space)
        cfg = apply_params(self.ctx.cfg, params)
        epochs: list[float] = []

        def on_epoch(stats: Any) -> None:
            epochs.append(stats.val_acc)
            if len(self.objectives) > 1:
                return
            trial.report(stats.val_acc, stats.epoch)
            if self.prune and trial.should_prune():
                raise optuna.TrialPruned(f"pruned after epoch {stats.epoch}: "
                                         f"val acc {stats.val_acc:.4f}")

        try:
            run = run_student(self.ctx, cfg, on_epoch=on_epoch, desc=f"trial {trial.number}")
        except optuna.TrialPruned:
            trial.set_user_attr("metrics", {"epochs_run": len(epochs)})
            raise
        m = run.metrics
        # Training and evaluation, with their setup (model, data, maps); the rest of the
        # trial is sampling, store writes, measurement and artifacts.
        train_s = m["wall_s"]
        if self._latency is None:
            prof = profile(run.model, self.ctx.device, batch=cfg.student_train.batch_size)
            self._latency = {k: v for k, v in prof.items() if k.startswith("latency")}
        lat = {f"{k}_{stat}_ms": v[f"{stat}_ms"] for k, v in self._latency.items()
               for stat in ("median", "p90")}
        record_run(trial, m | {"train_eval_s": train_s}, lat)
        if self.artifacts is not None:
            self._upload(trial, run.result.state, m)
        save_note(trial, _note(trial, cfg, params, m))
        if len(self.objectives) > 1:
            return tuple(float(m[o]) for o in self.objectives)
        return float(m["val_acc"])

    def _upload(self, trial: optuna.Trial, state: dict[str, Any], m: dict[str, Any]) -> None:
        tmp_dir = storage_dir() / "tmp"
        tmp_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=tmp_dir) as tmp:
            ckpt = Path(tmp) / f"trial{trial.number}-best.safetensors"
            save_file({k: v.contiguous() for k, v in state.items()}, str(ckpt))
            upload_artifact(artifact_store=self.artifacts, file_path=str(ckpt),
                            study_or_trial=trial, mimetype="application/octet-stream")
        preview = m.get("ig_preview")
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
