"""The teacher: trained once per fingerprint of (data, teacher config, training, scale), then
read from the cache by every later run, on this machine or any worker sharing the cache.
Or the user's own: ``[teacher] weights = "FILE.safetensors"``, loaded strictly and
fingerprinted by the file's hash, evaluated once and cached like a trained one.

Every cached checkpoint carries the SHA-256 of its weights; a damaged file (truncated,
overwritten) is reported and retrained, never loaded silently.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from kdig_study.checkpoint import Resume, run_resume, until_ended
from kdig_study.config import StudyConfig, model_identity, parse_arch
from kdig_study.data import DataBundle
from kdig_study.engine import (
    evaluate,
    load_checkpoint,
    non_finite,
    resolve_precision,
    save_checkpoint,
    seeded_model,
    train,
)
from kdig_study.errors import KdigError
from kdig_study.models import Net, build_model, count_params, python_arch_sha256
from kdig_study.paths import cache_dir, file_sha256, locked, write_json
from kdig_study.teacher_outputs import device_kind


@dataclass
class Teacher:
    model: Net
    fingerprint: str
    path: Path  # its .safetensors file
    meta: dict[str, Any]  # config, accuracies, wall time
    trained_now: bool



def teacher_fingerprint(cfg: StudyConfig, data: DataBundle, device: torch.device,
                        precision: str | None = None) -> str:
    """``precision``: the one it was trained at, where that is not what the config resolves
    to on ``device`` (a study made on other hardware, read here)."""
    model = model_identity(cfg.teacher)
    spec = parse_arch(cfg.teacher.arch)
    if spec is not None and spec.family == "python":
        # your architecture's source decides the network as much as its name does
        model["source_sha256"] = python_arch_sha256(spec.ref)
    if cfg.teacher.weights:
        # a given teacher: its weights decide it, not how it would have been trained
        model["weights"] = file_sha256(_given(cfg))
        key: list[Any] = [data.fingerprint, model]
    else:
        key = [data.fingerprint, model, dataclasses.asdict(cfg.teacher_train), cfg.scale,
               precision or resolve_precision(cfg.teacher_train.precision, device)]
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()


def teacher_path(fingerprint: str) -> Path:
    return cache_dir() / "teachers" / fingerprint[:20] / "teacher.safetensors"


def _given(cfg: StudyConfig) -> Path:
    path = Path(cfg.teacher.weights).expanduser()
    if not path.is_file():
        raise KdigError(f"{cfg.source}: teacher.weights = {cfg.teacher.weights!r}: no such file "
                        f"(a .safetensors file of a {cfg.teacher.arch} teacher)")
    return path


def _intact(path: Path) -> tuple[dict[str, Any] | None, str]:
    """(meta, "") for a cached checkpoint whose weights match their recorded checksum."""
    meta_path = path.with_suffix(".json")
    if not path.is_file() or not meta_path.is_file():
        return None, "not cached"
    try:
        meta = json.loads(meta_path.read_text())
        expected = meta["sha256"]
    except (ValueError, KeyError, TypeError):
        return None, "its record is unreadable or has no checksum"
    if file_sha256(path) != expected:
        return None, "checksum mismatch (truncated or overwritten)"
    return meta, ""


def cached_teacher(cfg: StudyConfig, data: DataBundle, device: torch.device,
                   precision: str | None = None) -> Teacher | None:
    """The intact cached teacher, or None: for a command that only reads (export), e.g. a
    teacher trained at the ``precision`` a study recorded on other hardware."""
    fp = teacher_fingerprint(cfg, data, device, precision)
    path = teacher_path(fp)
    meta, _ = _intact(path)
    return None if meta is None else _loaded(cfg, data, device, fp, path, meta)


def _loaded(cfg: StudyConfig, data: DataBundle, device: torch.device, fp: str, path: Path,
            meta: dict[str, Any]) -> Teacher:
    model = build_model(cfg.teacher, len(data.classes))
    load_checkpoint(path, model)
    return Teacher(model.to(device).eval(), fp, path, meta, trained_now=False)


def get_teacher(cfg: StudyConfig, data: DataBundle, device: torch.device,
                progress: bool = True, log: Any = print) -> Teacher:
    """Load the cached teacher, or train it (under a lock, so one worker trains it)."""
    fp = teacher_fingerprint(cfg, data, device)
    path = teacher_path(fp)
    with locked(path):
        meta, why = _intact(path)
        if meta is not None:
            return _loaded(cfg, data, device, fp, path, meta)
        if why != "not cached":
            log(f"teacher checkpoint {path} is damaged ({why}); "
                + ("evaluating the given weights again" if cfg.teacher.weights
                   else "training it again"))
            shutil.rmtree(path.parent, ignore_errors=True)
        resume = None if cfg.teacher.weights else run_resume(
            cfg.checkpoint, ["teacher", fp, device_kind(device)], log)
        with until_ended(resume):  # until the trained teacher is cached
            if cfg.teacher.weights:
                model, meta = _load_given(cfg, data, device,
                                          build_model(cfg.teacher, len(data.classes)))
            else:
                model, meta = _train(cfg, data, device, progress, log, path, resume)
            return _cache(cfg, model, meta, fp, path, device)


def _cache(cfg: StudyConfig, model: Net, meta: dict[str, Any], fp: str, path: Path,
           device: torch.device) -> Teacher:
    """Check a new teacher's weights and write it, with its checksummed record, to the cache."""
    bad = non_finite(dict(model.state_dict()))
    if bad:  # never cached: every later run would build maps and trials on it
        raise KdigError(f"the teacher's training diverged: NaN or infinite weights in "
                        f"{len(bad)} tensor(s) ({bad[0]}, ...); lower teacher_train.lr "
                        f"or use teacher_train.precision = \"fp32\"")
    meta |= {"fingerprint": fp, "model": dataclasses.asdict(cfg.teacher),
             "scale": cfg.scale, "params": count_params(model)}
    save_checkpoint(path, {k: v.detach().cpu() for k, v in model.state_dict().items()},
                    meta)
    meta["sha256"] = file_sha256(path)
    write_json(path.with_suffix(".json"), meta)
    return Teacher(model.to(device).eval(), fp, path, meta, trained_now=True)


def _train(cfg: StudyConfig, data: DataBundle, device: torch.device, progress: bool,
           log: Any, path: Path, resume: Resume | None) -> tuple[Net, dict[str, Any]]:
    train_set, _ = data.train_subset(cfg.teacher_train.train_size)
    model = seeded_model(lambda: build_model(cfg.teacher, len(data.classes)),
                         cfg.teacher_train.seed)
    log(f"training teacher {cfg.teacher.arch} width {cfg.teacher.width} "
        f"({count_params(model):,} parameters) on {len(train_set):,} images for "
        f"{cfg.teacher_train.epochs} epochs; cached at {path}")
    result = train(model, train_set, data, cfg.teacher_train, device=device,
                   progress=progress, desc="teacher", resume=resume)
    return model, {
        "train": dataclasses.asdict(cfg.teacher_train),
        "data": {"fingerprint": data.fingerprint, "origin": data.origin,
                 "train_images": len(train_set)},
        "val_acc": result.val_acc, "test_acc": result.test_acc,
        "best_epoch": result.best_epoch, "wall_s": result.wall_s,
        "images_per_s": result.images_per_s, "precision": result.precision,
    }


def _load_given(cfg: StudyConfig, data: DataBundle, device: torch.device, model: Net
                ) -> tuple[Net, dict[str, Any]]:
    """The user's own teacher, loaded strictly and evaluated once on this study's splits."""
    path = _given(cfg)
    try:
        state = load_file(str(path))
    except Exception as e:  # safetensors raises its own error type for a bad file
        raise KdigError(f"teacher.weights {path}: not a readable safetensors file "
                        f"({str(e).splitlines()[0]})") from None
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        first = " ".join(str(e).split())[:300]
        raise KdigError(f"teacher.weights {path} does not fit a {cfg.teacher.arch} teacher of "
                        f"width {cfg.teacher.width} ({count_params(model):,} parameters): "
                        f"{first}") from None
    bad = non_finite(state)
    if bad:
        raise KdigError(f"teacher.weights {path}: NaN or infinite values in {len(bad)} of "
                        f"{len(state)} tensors ({bad[0]}, ...); a teacher needs finite weights")
    model = model.to(device).eval()
    t0 = time.perf_counter()
    precision = resolve_precision(cfg.teacher_train.precision, device)
    val = evaluate(model, data.val, data.mean, data.std, device, precision)
    test = evaluate(model, data.test, data.mean, data.std, device, precision)
    return model, {"given": str(path), "val_acc": val, "test_acc": test, "best_epoch": 0,
                   "wall_s": time.perf_counter() - t0, "precision": precision,
                   "data": {"fingerprint": data.fingerprint, "origin": data.origin}}
