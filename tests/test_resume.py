"""Mid-run checkpoints: a teacher, a KD+IG student and an ablation run interrupted after
epoch 2 of 6 (in epoch 3, after epoch 2's checkpoint) and run again end with exactly the weights and metrics of the same run
uninterrupted; the checkpoint is removed when the run ends; an unreadable or foreign one is
said in one line and the run starts over."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import optuna
import pytest
import torch
from optuna.trial import TrialState

from kdig_study import ablation
from kdig_study.checkpoint import FORMAT, Resume, run_resume
from kdig_study.config import CheckpointConfig, load_study
from kdig_study.engine import Distillation
from kdig_study.experiment import Context, StudentRun, run_student
from kdig_study.teacher import get_teacher

from cli_helpers import run_cli

KD_IG = ["method.kd=true", "method.ig=true", "student_train.epochs=6"]


class Interrupt:
    """An on_epoch callback that raises KeyboardInterrupt (what Ctrl-C, SIGTERM and SIGHUP
    raise in every command) at the end of epoch ``at``, before its checkpoint: as a signal
    during that epoch would."""

    def __init__(self, at: int) -> None:
        self.at, self.seen = at, []

    def __call__(self, stats: Any) -> None:
        self.seen.append(stats.epoch)
        if stats.epoch == self.at:
            raise KeyboardInterrupt


def _checkpoints(cache: Path) -> list[Path]:
    return sorted((cache / "checkpoints").glob("*.pt"))


def _same(a: StudentRun, b: StudentRun) -> None:
    sa, sb = a.model.state_dict(), b.model.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k  # bit for bit
    ma, mb = a.metrics.to_dict(), b.metrics.to_dict()
    for k in ("val_acc", "test_acc", "best_epoch", "epochs_run", "robust_test_acc"):
        assert ma[k] == mb[k], k
    # every step counted once over the sittings (which were read from the teacher-output
    # cache depends on what an earlier sitting wrote)
    assert ma["teacher_steps_cached"] + ma["teacher_steps_computed"] == \
        mb["teacher_steps_cached"] + mb["teacher_steps_computed"] > 0
    assert [(h.epoch, h.loss, h.train_acc, h.val_acc, h.lr) for h in a.result.history] == \
        [(h.epoch, h.loss, h.train_acc, h.val_acc, h.lr) for h in b.result.history]


@pytest.mark.parametrize("teacher_cache", [False, True])
def test_an_interrupted_kd_ig_run_resumes_to_the_uninterrupted_bits(
        teacher_cache: bool, warm_cache: Path) -> None:
    cache = [f"teacher_cache.enabled={str(teacher_cache).lower()}"]
    lines: list[str] = []
    ctx = Context.create(load_study("kd_ig", "smoke", [*KD_IG, *cache]), progress=False)
    ctx.log = lambda *a, **k: lines.append(" ".join(map(str, a)))
    reference = run_student(ctx, load_study("kd_ig", "smoke", [
        *KD_IG, *cache, "checkpoint.enabled=false"]))
    assert not _checkpoints(warm_cache)
    if teacher_cache:  # the reference wrote the stream: start the resumed run without it
        shutil.rmtree(warm_cache / "teacher_outputs")

    first = Interrupt(at=3)
    with pytest.raises(KeyboardInterrupt):
        run_student(ctx, on_epoch=first, desc="trial 7")
    assert first.seen == [1, 2, 3]
    assert len(_checkpoints(warm_cache)) == 1  # kept for the run's next sitting

    rest = Interrupt(at=0)
    resumed = run_student(ctx, on_epoch=rest, desc="trial 7")
    assert "resumed trial 7 from epoch 3 of 6 (epochs 1-2 from its checkpoint)" in lines
    assert rest.seen == [3, 4, 5, 6]  # restored epochs are not reported again
    _same(reference, resumed)
    assert len(resumed.result.history) == 6
    assert not _checkpoints(warm_cache)  # removed when the run ended


def test_the_teacher_resumes_to_the_uninterrupted_bits(warm_cache: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = load_study("kd_ig", "smoke", ["teacher_train.seed=11"])  # not the cached teacher
    data = Context.create(cfg, progress=False).data
    device = torch.device("cpu")
    reference = get_teacher(cfg, data, device, progress=False, log=lambda *a, **k: None)
    assert reference.trained_now and reference.meta["best_epoch"] > 0
    shutil.rmtree(reference.path.parent)

    from kdig_study import teacher as teacher_module
    real_train = teacher_module.train

    def interrupted(*args: Any, **kwargs: Any) -> Any:
        return real_train(*args, **kwargs, on_epoch=Interrupt(at=3))

    monkeypatch.setattr(teacher_module, "train", interrupted)
    with pytest.raises(KeyboardInterrupt):
        get_teacher(cfg, data, device, progress=False, log=lambda *a, **k: None)
    assert len(_checkpoints(warm_cache)) == 1
    assert not reference.path.exists()
    monkeypatch.setattr(teacher_module, "train", real_train)

    lines: list[str] = []
    again = get_teacher(cfg, data, device, progress=False,
                        log=lambda *a, **k: lines.append(" ".join(map(str, a))))
    assert "resumed teacher from epoch 3 of 6 (epochs 1-2 from its checkpoint)" in lines
    for k, v in reference.model.state_dict().items():
        assert torch.equal(v, again.model.state_dict()[k]), k
    for k in ("val_acc", "test_acc", "best_epoch"):
        assert again.meta[k] == reference.meta[k], k
    assert again.fingerprint == reference.fingerprint
    assert not _checkpoints(warm_cache)


def test_an_interrupted_ablation_run_is_retried_with_its_parameters_and_resumes(
        tmp_path: Path, isolated_storage: Path, warm_cache: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    params = tmp_path / "params.toml"
    params.write_text("[params]\ntemperature = 4.0\nalpha = 0.5\noverlay_strength = 0.5\n"
                      "overlay_prob = 0.2\nig_steps = 8\n")
    args = ["--study", "kd_ig", "--scale", "smoke", "--no-progress", "--seeds", "1",
            "--factors", "kd,ig", "--params", str(params), "--set", "student_train.epochs=6"]

    def values(storage: str) -> dict[str, tuple]:
        trials = optuna.load_study(study_name="kd_ig-smoke.ablation",
                                   storage=storage).get_trials()
        return {t.params["condition"]: (t.value, t.user_attrs["test_acc"],
                                        t.user_attrs["metrics"]["best_epoch"],
                                        t.user_attrs["metrics"].get("robust_test_acc"))
                for t in trials if t.state == TrialState.COMPLETE}

    ref_url = f"sqlite:///{tmp_path}/reference.db"
    ref = run_cli("ablate", *args, "--storage", ref_url, "--out", str(tmp_path / "ref"),
                  "--set", "checkpoint.enabled=false")
    assert ref.returncode == 0, ref.stderr
    reference = values(ref_url)
    assert set(reference) == {"student", "KD", "IG", "KD+IG"}

    real_run = ablation.run_student
    calls = {"n": 0}

    def interrupt_kd_ig(ctx: Context, cfg: Any = None, **kw: Any) -> StudentRun:
        if kw.get("desc", "").startswith("KD+IG") and not calls["n"]:
            calls["n"] += 1
            assert kw.pop("on_epoch") is None  # (a --track tracker's, where one is given)
            return real_run(ctx, cfg, on_epoch=Interrupt(at=3), **kw)
        return real_run(ctx, cfg, **kw)

    url = f"sqlite:///{isolated_storage}/kdig.db"
    monkeypatch.setattr(ablation, "run_student", interrupt_kd_ig)
    stopped = run_cli("ablate", *args, "--storage", url, "--out", str(tmp_path / "a"))
    assert stopped.returncode != 0 and calls["n"] == 1
    trials = optuna.load_study(study_name="kd_ig-smoke.ablation", storage=url).get_trials()
    failed = [t for t in trials if t.state == TrialState.FAIL]
    waiting = [t for t in trials if t.state == TrialState.WAITING]
    assert len(failed) == 1 and len(waiting) == 1  # the interrupted run, queued again
    assert waiting[0].system_attrs["fixed_params"] == failed[0].system_attrs["fixed_params"]

    monkeypatch.setattr(ablation, "run_student", real_run)
    again = run_cli("ablate", *args, "--storage", url, "--out", str(tmp_path / "a"))
    assert again.returncode == 0, again.stderr
    assert "resumed KD+IG r0 from epoch 3 of 6 (epochs 1-2 from its checkpoint)" in again.stdout
    assert values(url) == reference
    assert not _checkpoints(warm_cache)


def test_an_unreadable_or_foreign_checkpoint_is_one_line_and_a_fresh_start(
        warm_cache: Path) -> None:
    lines: list[str] = []
    resume = run_resume(CheckpointConfig(), ["some run"], lines.append)
    assert isinstance(resume, Resume)
    resume.path.parent.mkdir(parents=True, exist_ok=True)
    resume.path.write_bytes(b"PK\x03\x04 not a zip")
    assert resume.load() is None
    assert len(lines) == 1 and lines[0].startswith(f"checkpoint {resume.path} is unreadable (")
    assert lines[0].endswith("); starting from epoch 1")
    torch.save({"format": FORMAT, "key": "another run"}, resume.path)
    assert resume.load() is None
    assert "of another run or format" in lines[-1]
    assert run_resume(CheckpointConfig(enabled=False), ["some run"]) is None
    # a checkpoint loads without unpickling code: weights_only refuses other objects
    torch.save({"format": FORMAT, "key": resume.key, "x": Distillation}, resume.path)
    assert resume.load() is None and "unreadable" in lines[-1]


def test_checkpoint_keys_are_validated_like_every_key() -> None:
    from kdig_study.errors import KdigError
    with pytest.raises(KdigError, match="checkpoint.every_epochs"):
        load_study("kd_ig", "smoke", ["checkpoint.every_epochs=0"])
    cfg = load_study("kd_ig", "smoke", ["checkpoint.every_minutes=5"])
    assert cfg.checkpoint.every_minutes == 5.0
    # not part of what a result depends on
    assert cfg.fingerprint() == load_study("kd_ig", "smoke").fingerprint()


def test_a_teacher_trains_with_checkpoints_off(warm_cache: Path) -> None:
    """With checkpoints off the teacher was taken for a given one (teacher.weights) and
    refused: "teacher.weights = '': no such file"."""
    cfg = load_study("kd_ig", "smoke", ["teacher_train.seed=12", "teacher_train.epochs=1",
                                        "checkpoint.enabled=false"])
    data = Context.create(cfg, progress=False).data
    teacher = get_teacher(cfg, data, torch.device("cpu"), progress=False,
                          log=lambda *a, **k: None)
    assert teacher.trained_now and teacher.meta["best_epoch"] == 1
    assert not _checkpoints(warm_cache)
