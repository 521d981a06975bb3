"""One student run from a study config: the glue between config, data, the cached teacher, the
engine and the measurements. The train CLI, the Optuna objective and the ablation runner all
call :func:`run_student`."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch

from kdig_study.config import StudyConfig
from kdig_study.data import DataBundle, load_bundle
from kdig_study.engine import (Distillation, EpochCallback, TrainResult, resolve_device,
                               seeded_model, train)
from kdig_study.measure import model_cost
from kdig_study.models import Net, build_model, count_params, tap_index
from kdig_study.teacher import Teacher, get_teacher


@dataclass
class Context:
    """What every run of one study shares: data, device, and (lazily) the teacher."""

    cfg: StudyConfig
    data: DataBundle
    device: torch.device
    progress: bool = True
    _teacher: Teacher | None = field(default=None, repr=False)

    @classmethod
    def create(cls, cfg: StudyConfig, data_dir: str | None = None, device: str = "auto",
               progress: bool = True) -> Context:
        return cls(cfg, load_bundle(cfg.data, data_dir), resolve_device(device), progress)

    def teacher(self) -> Teacher:
        if self._teacher is None:
            self._teacher = get_teacher(self.cfg, self.data, self.device, self.progress)
        return self._teacher


@dataclass
class StudentRun:
    model: Net
    result: TrainResult
    metrics: dict[str, Any]


def teacher_params(cfg: StudyConfig, num_classes: int = 10) -> int:
    return count_params(build_model(cfg.teacher, num_classes))


def run_student(ctx: Context, cfg: StudyConfig | None = None, *,
                on_epoch: EpochCallback | None = None, desc: str = "student") -> StudentRun:
    """Train one student with the method switches of ``cfg`` (default: the context's)."""
    cfg = cfg or ctx.cfg
    data = ctx.data
    t0 = time.perf_counter()
    n_classes = len(data.classes)
    model = seeded_model(lambda: build_model(cfg.student, n_classes), cfg.student_train.seed)
    distill = None
    if cfg.method.kd or cfg.method.at:
        teacher = ctx.teacher()
        distill = Distillation(teacher=teacher.model, kd=cfg.kd if cfg.method.kd else None,
                               at_weight=cfg.at.weight if cfg.method.at else 0.0,
                               tap=tap_index(model, cfg.student.arch))
    train_set, _ = data.train_subset(cfg.student_train.train_size)
    result = train(model, train_set, data, cfg.student_train, device=ctx.device,
                   distill=distill, on_epoch=on_epoch, progress=ctx.progress, desc=desc)
    cost = model_cost(model)
    metrics: dict[str, Any] = {
        "val_acc": result.val_acc,
        "test_acc": result.test_acc,
        "best_epoch": result.best_epoch,
        "epochs_run": result.epochs_run,
        "train_images": len(train_set),
        "train_images_per_s": result.images_per_s,
        "params": cost["params"],
        "flops": cost["flops"],
        "bytes": cost["bytes"],
        "compression": teacher_params(cfg, n_classes) / cost["params"],
        "seed": cfg.student_train.seed,
        "wall_s": time.perf_counter() - t0,
    }
    return StudentRun(model, result, metrics)
