from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from kdig_study.config import ModelConfig, load_study
from kdig_study.data import load_bundle
from kdig_study.engine import (
    Distillation,
    EpochStats,
    evaluate,
    load_checkpoint,
    save_checkpoint,
    seeded_model,
    train,
)
from kdig_study.errors import KdigError
from kdig_study.experiment import Context, run_student
from kdig_study.models import build_model
from kdig_study.teacher import get_teacher, teacher_fingerprint

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def smoke():
    cfg = load_study("kd_ig", "smoke")
    return cfg, load_bundle(cfg.data)


def _small(cfg_model: ModelConfig, seed: int = 0):
    return seeded_model(lambda: build_model(cfg_model), seed)


def test_synthetic_set_is_learnable_at_smoke_scale(smoke) -> None:
    cfg, data = smoke
    model = _small(cfg.teacher)
    res = train(model, data.train, data, cfg.teacher_train, device=CPU, progress=False)
    assert res.epochs_run == cfg.teacher_train.epochs
    assert res.val_acc > 0.6 and res.test_acc > 0.6  # chance is 0.1
    assert res.history[-1].loss < res.history[0].loss
    # the returned model holds the best epoch's weights, which scored val_acc
    assert evaluate(model, data.val, data.mean, data.std, CPU, res.precision) == \
        pytest.approx(res.val_acc)


def test_same_seed_same_run_and_callback_sees_every_epoch(smoke) -> None:
    cfg, data = smoke
    tc = dataclasses.replace(cfg.student_train, epochs=2)
    seen: list[EpochStats] = []
    a = train(_small(cfg.student), data.train, data, tc, device=CPU, progress=False,
              on_epoch=seen.append)
    b = train(_small(cfg.student), data.train, data, tc, device=CPU, progress=False)
    assert [s.epoch for s in seen] == [1, 2]
    assert [h.loss for h in a.history] == [h.loss for h in b.history]
    assert a.val_acc == b.val_acc


def test_callback_can_stop_training(smoke) -> None:
    cfg, data = smoke

    class Stop(Exception):
        pass

    def stop_after_one(stats: EpochStats) -> None:
        if stats.epoch == 1:
            raise Stop

    with pytest.raises(Stop):
        train(_small(cfg.student), data.train, data, cfg.student_train, device=CPU,
              progress=False, on_epoch=stop_after_one)


def test_kd_and_at_train_the_student_and_leave_the_teacher_alone(smoke) -> None:
    cfg, data = smoke
    teacher = _small(cfg.teacher, seed=1)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    student = _small(cfg.student)
    tc = dataclasses.replace(cfg.student_train, epochs=1)
    res = train(student, data.train, data, tc, device=CPU, progress=False,
                distill=Distillation(teacher, cfg.kd, at_weight=0.8, tap=2))
    assert res.history[0].loss > 0
    after = teacher.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # incl. BN running stats


def test_checkpoint_roundtrip_and_mismatch(smoke, tmp_path: Path) -> None:
    cfg, _ = smoke
    m = _small(cfg.student)
    path = tmp_path / "m.safetensors"
    save_checkpoint(path, m.state_dict(), {"note": "x"})
    assert path.with_suffix(".json").is_file()
    m2 = _small(cfg.student, seed=9)
    load_checkpoint(path, m2)
    assert all(torch.equal(a, b) for a, b in zip(m.state_dict().values(),
                                                  m2.state_dict().values(), strict=True))
    with pytest.raises(KdigError, match="does not fit this model"):
        load_checkpoint(path, _small(cfg.teacher))


def test_teacher_is_trained_once_then_loaded(smoke, isolated_storage: Path) -> None:
    cfg, data = smoke
    cfg = dataclasses.replace(cfg, teacher_train=dataclasses.replace(cfg.teacher_train, epochs=1))
    first = get_teacher(cfg, data, CPU, progress=False, log=lambda *_: None)
    assert first.trained_now and first.path.is_file()
    assert str(first.path).startswith(str(isolated_storage / "cache" / "teachers"))
    second = get_teacher(cfg, data, CPU, progress=False, log=lambda *_: None)
    assert not second.trained_now and second.fingerprint == first.fingerprint
    assert all(torch.equal(a, b) for a, b in zip(first.model.state_dict().values(),
                                                  second.model.state_dict().values(), strict=True))
    assert second.meta["test_acc"] == first.meta["test_acc"]
    other = dataclasses.replace(cfg, teacher_train=dataclasses.replace(cfg.teacher_train, seed=1))
    assert teacher_fingerprint(other, data, CPU) != first.fingerprint


def test_run_student_records_metrics(smoke, warm_cache) -> None:
    cfg, data = smoke  # the teacher, maps and corrupted splits come from the warm cache
    cfg = dataclasses.replace(cfg, student_train=dataclasses.replace(cfg.student_train, epochs=1))
    ctx = Context(cfg, data, CPU, progress=False)
    run = run_student(ctx)
    m = run.metrics.to_dict()
    assert set(m) >= {"val_acc", "test_acc", "params", "flops", "compression", "epochs_run",
                      "wall_s", "seed", "robust_test_acc", "robust_test_jpeg-1"}
    assert m["compression"] == pytest.approx(124_722 / m["params"])
    assert m["epochs_run"] == 1
    stored = run.metrics.stored()  # what a trial records: no paths, no breakdown
    assert stored["train_eval_s"] == m["wall_s"] and "ig_store" not in stored
    assert not any(k.startswith("robust_test_j") for k in stored)
    assert run.metrics.robust is not None
    assert run.metrics.robust.breakdown()["jpeg"] == m["robust_test_jpeg"]


@pytest.mark.parametrize("steps", range(1, 13))
def test_onecycle_schedule_runs_for_any_number_of_steps(steps: int) -> None:
    from kdig_study.engine import _scheduler

    tc = dataclasses.replace(load_study("kd_ig", "cpu").student_train, schedule="onecycle")
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=tc.lr)
    sched = _scheduler(opt, tc, steps)
    lrs = []
    for _ in range(steps):  # as the engine does: one scheduler step per optimiser step
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        if sched is not None:
            sched.step()
    assert all(0 < lr <= tc.lr * (1 + 1e-9) for lr in lrs)
    if steps >= 8:  # a real warm-up and annealing: rises to near max_lr, then falls
        peak = lrs.index(max(lrs))
        assert max(lrs) > 0.9 * tc.lr and lrs[0] < tc.lr / 10 and 0 < peak < steps - 1


def test_kd_and_at_losses_are_fp32_under_bf16_autocast() -> None:
    """Under bf16 autocast the logits came out of the classifier in bf16; on near-converged
    logits the KD gradient was ~9% off. Now the head and both losses run in fp32: the
    gradient of the classifier matches an fp64 reference computed from the same features."""
    from kdig_study.config import KDConfig, TrainConfig
    from kdig_study.engine import _step_loss, teacher_forward

    torch.manual_seed(0)
    cfg_model = ModelConfig(arch="convnet", width=0.25)
    student = build_model(cfg_model)
    teacher = build_model(cfg_model)
    with torch.no_grad():  # a near-converged student: the teacher's twin, slightly perturbed
        for ps, pt in zip(student.parameters(), teacher.parameters(), strict=True):
            ps.copy_(pt + 1e-3 * torch.randn_like(pt))
        teacher.classifier.weight.mul_(20)  # confident logits, as near convergence
        student.classifier.weight.copy_(teacher.classifier.weight * 1.001)
    student.eval(), teacher.eval()  # no BN batch statistics: the same features both ways
    x = torch.randn(64, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (64,))
    kd = KDConfig(temperature=4.0, alpha=0.9)
    distill = Distillation(teacher=teacher, kd=kd, at_weight=0.5, tap=2)
    tc = TrainConfig()
    student.zero_grad()
    t_out = teacher_forward(teacher, x, distill, "bf16", CPU)
    assert t_out.logits.dtype == torch.float32 and t_out.attention.dtype == torch.float32
    loss, logits = _step_loss(student, x, y, tc, distill, t_out, "bf16", CPU)
    assert logits.dtype == torch.float32 and loss.dtype == torch.float32
    loss.backward()
    ours = student.classifier.weight.grad.clone()
    # reference: the same bf16 features, then head and losses in fp64
    from kdig_study.losses import at_loss, kd_loss
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad():
        s_feat = student.features(x)
        t_feat = teacher.features(x)
        s_map = student.features[:3](x)
        t_map = teacher.features[:3](x)
    w = student.classifier.weight.detach().double().requires_grad_(True)
    s_logits = torch.nn.functional.linear(student.pool(s_feat).flatten(1).double(), w,
                                          student.classifier.bias.double())
    t_logits = teacher.classifier(teacher.pool(t_feat).flatten(1).float()).double()
    ref = kd_loss(s_logits, t_logits, y, kd.temperature, kd.alpha) + \
        0.5 * at_loss(s_map.double(), t_map.double())
    ref.backward()
    rel = (ours.double() - w.grad).norm() / w.grad.norm()
    assert rel < 1e-3, rel
    assert float(loss) == pytest.approx(float(ref), rel=1e-4)


def test_a_bad_ig_integration_stops_the_run_in_one_line(smoke, warm_cache) -> None:
    """A median completeness gap above ig.max_gap used to print a warning and train on."""
    cfg, data = smoke  # the teacher and its maps come from the warm cache
    tight = dataclasses.replace(cfg, ig=dataclasses.replace(cfg.ig, max_gap=1e-6))
    lines: list[str] = []
    ctx = Context(tight, data, CPU, progress=False, log=lines.append)
    with pytest.raises(KdigError) as e:
        run_student(ctx)
    msg = str(e.value)
    assert "\n" not in msg and "completeness gap above ig.max_gap" in msg
    assert "use more steps" in msg
    # under bf16 autocast it first recomputed the maps in fp32, and said so
    if ctx.map_spec().precision == "bf16":
        assert any("using fp32 maps instead" in line for line in lines)
