"""The teacher: trained once per fingerprint of (data, teacher config, training, scale), then
read from the cache by every later run, on this machine or any worker sharing the cache."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from kdig_study.config import StudyConfig
from kdig_study.data import DataBundle
from kdig_study.engine import (load_checkpoint, resolve_precision, save_checkpoint,
                               seeded_model, train)
from kdig_study.models import Net, build_model, count_params
from kdig_study.paths import cache_dir, locked


@dataclass
class Teacher:
    model: Net
    fingerprint: str
    path: Path  # its .safetensors file
    meta: dict[str, Any]  # config, accuracies, wall time
    trained_now: bool


def teacher_fingerprint(cfg: StudyConfig, data: DataBundle, device: torch.device) -> str:
    key = [data.fingerprint, dataclasses.asdict(cfg.teacher),
           dataclasses.asdict(cfg.teacher_train), cfg.scale,
           resolve_precision(cfg.teacher_train.precision, device)]
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()


def teacher_path(fingerprint: str) -> Path:
    return cache_dir() / "teachers" / fingerprint[:20] / "teacher.safetensors"


def get_teacher(cfg: StudyConfig, data: DataBundle, device: torch.device,
                progress: bool = True, log: Any = print) -> Teacher:
    """Load the cached teacher, or train it (under a lock, so one worker trains it)."""
    fp = teacher_fingerprint(cfg, data, device)
    path = teacher_path(fp)
    model = build_model(cfg.teacher, len(data.classes))
    with locked(path):
        meta_path = path.with_suffix(".json")
        if path.is_file() and meta_path.is_file():
            load_checkpoint(path, model)
            meta = json.loads(meta_path.read_text())
            return Teacher(model.to(device).eval(), fp, path, meta, trained_now=False)
        train_set, _ = data.train_subset(cfg.teacher_train.train_size)
        log(f"training teacher {cfg.teacher.arch} width {cfg.teacher.width} "
            f"({count_params(model):,} parameters) on {len(train_set):,} images for "
            f"{cfg.teacher_train.epochs} epochs; cached at {path}")
        model = seeded_model(lambda: build_model(cfg.teacher, len(data.classes)),
                             cfg.teacher_train.seed)
        result = train(model, train_set, data, cfg.teacher_train, device=device,
                       progress=progress, desc="teacher")
        meta = {
            "fingerprint": fp,
            "model": dataclasses.asdict(cfg.teacher),
            "train": dataclasses.asdict(cfg.teacher_train),
            "scale": cfg.scale,
            "data": {"fingerprint": data.fingerprint, "origin": data.origin,
                     "train_images": len(train_set)},
            "val_acc": result.val_acc,
            "test_acc": result.test_acc,
            "best_epoch": result.best_epoch,
            "wall_s": result.wall_s,
            "images_per_s": result.images_per_s,
            "params": count_params(model),
            "precision": result.precision,
        }
        save_checkpoint(path, result.state, meta)
        return Teacher(model.eval(), fp, path, meta, trained_now=True)
