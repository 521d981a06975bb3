"""A searched trial, picked by rule or number, and its student's weights from the artifact
store (for export, the benchmarks and anything else that reuses a trained student)."""

from __future__ import annotations

import tempfile
from pathlib import Path

import optuna
from optuna.artifacts import download_artifact, get_all_artifact_meta
from optuna.trial import FrozenTrial, TrialState

from kdig_study.config import StudyConfig
from kdig_study.engine import load_checkpoint
from kdig_study.errors import KdigError
from kdig_study.models import Net, build_model
from kdig_study.objectives import choose_best
from kdig_study.optuna_adapter import storage_of
from kdig_study.paths import file_sha256
from kdig_study.store import artifact_store


def pick_trial(study: optuna.Study, which: str) -> FrozenTrial:
    if which == "best":
        best, _ = choose_best(study)
        if best is None:
            raise KdigError(f"study '{study.study_name}' has no completed trial to export")
        return best
    try:
        number = int(which)
    except ValueError:
        raise KdigError(f"--trial {which}: allowed: best or a trial number") from None
    trials = {t.number: t for t in study.get_trials(deepcopy=False)}
    if number not in trials:
        raise KdigError(f"--trial {number}: study '{study.study_name}' has trials "
                        f"0..{max(trials, default=-1)}")
    t = trials[number]
    if t.state != TrialState.COMPLETE:
        done = [u.number for u in trials.values() if u.state == TrialState.COMPLETE]
        hint = f"try --trial best, or one of {', '.join(map(str, done[:10]))}" if done else \
            "the study has no completed trial yet"
        raise KdigError(f"trial {number} of '{study.study_name}' is {t.state.name.lower()}: "
                        f"only completed trials keep their weights; {hint}")
    return t


def student_weights(study: optuna.Study, trial: FrozenTrial, cfg: StudyConfig, n_classes: int
                    ) -> Net:
    """The trial's best-epoch weights (its safetensors artifact), loaded strictly."""
    metas = [m for m in get_all_artifact_meta(trial, storage=storage_of(study))
             if m.filename.endswith(".safetensors")]
    if not metas:
        raise KdigError(f"trial {trial.number} of '{study.study_name}' has no weights artifact "
                        f"(it ran without an artifact store); choose another --trial")
    model = build_model(cfg.student, n_classes)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "w.safetensors"
        try:
            download_artifact(artifact_store=artifact_store(), file_path=str(path),
                              artifact_id=metas[0].artifact_id)
        except Exception as e:  # the artifact folder is elsewhere, or the file is gone
            raise KdigError(f"trial {trial.number}: its weights artifact could not be read "
                            f"({e}); is KDIG_ARTIFACTS the folder the search wrote to?") from None
        want = trial.user_attrs.get("weights_sha256")
        if want is not None and file_sha256(path) != want:
            raise KdigError(f"trial {trial.number} of '{study.study_name}': its weights "
                            f"artifact {metas[0].artifact_id} is damaged (its sha256 is not the "
                            f"one recorded when it was written); choose another --trial, or "
                            f"run the search again")
        load_checkpoint(path, model)
    return model.eval()
