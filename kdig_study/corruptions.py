"""Distribution shift on the evaluation splits: JPEG, Gaussian noise, Gaussian blur, contrast
and brightness, each at three severities, as batched tensor operations (JPEG through Pillow,
one image at a time); and, with the `corruptions` extra, ImageNet-C's (``ic_<name>``,
kdig_study.corruptions_ic).

Every corrupted image is quantised back to uint8, as a camera would deliver it. The
corrupted sets are deterministic under a seed and cached once per data set. To keep their
cost within a quarter of a run's evaluation time, each (corruption, severity) setting is
evaluated on its own stratified slice of the split (``test_per_setting`` images; 0 = every
image under every setting). The severities of one corruption share its slice, so severity
curves compare the same images; slices of different corruptions are disjoint where the
split is large enough, so the suite covers many images.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import time
import zipfile
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torchvision.transforms.v2.functional as TF
from PIL import Image

from kdig_study import corruptions_ic
from kdig_study.config import RobustnessConfig
from kdig_study.data import DataBundle, ImageSet, stratified_order
from kdig_study.errors import KdigError
from kdig_study.paths import atomic_write, cache_dir, locked

# Severity 1, 2, 3 of each corruption; severity 0 is the clean image.
SEVERITY: dict[str, tuple[float, float, float]] = {
    "jpeg": (60, 35, 15),  # JPEG quality
    "gaussian_noise": (0.03, 0.06, 0.10),  # sd on the [0, 1] scale
    "gaussian_blur": (0.6, 1.0, 1.5),  # sigma in pixels
    "contrast": (0.6, 0.4, 0.25),  # factor towards each image's mean grey
    "brightness": (0.15, 0.30, 0.45),  # added to every pixel on the [0, 1] scale
}
_CACHE_VERSION = 2  # 2: one slice per corruption


def jpeg_bytes(images: torch.Tensor, quality: int) -> list[bytes]:
    """Encoded JPEG files of uint8 images [N, 3, H, W], by Pillow (libjpeg; torchvision's
    own JPEG codec is deprecated since 0.29)."""
    files = []
    for img in images.permute(0, 2, 3, 1).numpy():
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format="JPEG", quality=int(quality))
        files.append(buf.getvalue())
    return files


def _jpeg(images: torch.Tensor, quality: float) -> torch.Tensor:
    decoded = [np.asarray(Image.open(io.BytesIO(f)).convert("RGB"))
               for f in jpeg_bytes(images, int(quality))]
    return torch.from_numpy(np.stack(decoded)).permute(0, 3, 1, 2).contiguous()


def gaussian_noise(x: torch.Tensor, sd: float, gen: torch.Generator) -> torch.Tensor:
    """x [N, 3, H, W] on [0, 1]; unclipped."""
    return x + sd * torch.randn(x.shape, generator=gen)


def gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    k = 2 * math.ceil(3 * sigma) + 1
    return TF.gaussian_blur(x, kernel_size=[k, k], sigma=[sigma, sigma])


def contrast(x: torch.Tensor, factor: float) -> torch.Tensor:
    """Towards each image's mean grey: m + factor (x - m)."""
    grey = x.mean(dim=(1, 2, 3), keepdim=True)
    return grey + factor * (x - grey)


def brightness(x: torch.Tensor, delta: float) -> torch.Tensor:
    return x + delta


def corrupt(images: torch.Tensor, name: str, severity: int, seed: int = 0) -> torch.Tensor:
    """uint8 [N, 3, H, W] -> uint8 [N, 3, H, W] under one corruption at one severity."""
    if severity == 0:
        return images.clone()
    if corruptions_ic.is_ic(name):
        return corruptions_ic.corrupt(images, name, severity, seed)
    level = SEVERITY[name][severity - 1]
    if name == "jpeg":
        return _jpeg(images, level)
    x = images.float() / 255
    ops: dict[str, Callable[[], torch.Tensor]] = {
        "gaussian_noise": lambda: gaussian_noise(
            x, level, torch.Generator().manual_seed(seed * 1000 + severity)),
        "gaussian_blur": lambda: gaussian_blur(x, level),
        "contrast": lambda: contrast(x, level),
        "brightness": lambda: brightness(x, level),
    }
    return (ops[name]().clamp(0, 1) * 255).round().to(torch.uint8)


@dataclass(frozen=True)
class Setting:
    corruption: str
    severity: int

    @property
    def key(self) -> str:
        return f"{self.corruption}-{self.severity}"


def settings(cfg: RobustnessConfig) -> list[Setting]:
    return [Setting(c, s) for c in cfg.corruptions for s in cfg.severities]


@dataclass
class CorruptedSplit:
    """One split under every setting: images [S, M, 3, H, W], labels [S, M]."""

    settings: list[Setting]
    images: torch.Tensor
    labels: torch.Tensor
    rows: torch.Tensor  # [S, M]: the split's row of every image, per setting


def _slices(labels: torch.Tensor, sets: list[Setting], per_setting: int, seed: int
            ) -> list[torch.Tensor]:
    """Row indices per setting: one stratified slice per corruption, shared by all its
    severities (a severity curve then compares the same images, not image difficulty), and
    disjoint across corruptions while the split has room."""
    if per_setting == 0 or per_setting >= len(labels):
        return [torch.arange(len(labels))] * len(sets)
    order = stratified_order(labels, seed)
    n = len(order)
    names = list(dict.fromkeys(s.corruption for s in sets))
    rows = {c: order[(torch.arange(per_setting) + k * per_setting) % n].sort().values
            for k, c in enumerate(names)}
    return [rows[s.corruption] for s in sets]


def build_split(data: ImageSet, cfg: RobustnessConfig, per_setting: int, fingerprint: str,
                split: str) -> CorruptedSplit:
    """The corrupted split, from the cache when it is there (built once, atomically)."""
    sets = settings(cfg)
    # the package's version where its corruptions are in (the suite's own keep their keys)
    ic = [corruptions_ic.version()] if any(map(corruptions_ic.is_ic, cfg.corruptions)) else []
    key = hashlib.sha256(json.dumps([_CACHE_VERSION, fingerprint, split, per_setting,
                                     asdict(cfg), *ic], sort_keys=True).encode()
                         ).hexdigest()[:20]
    path = cache_dir() / "corrupted" / f"{split}-{key}.npz"
    with locked(path):
        done = _read_split(path, sets)
        if done is not None:
            return done
        if path.is_file():  # damaged (a BadZipFile failed every trial after it had trained)
            print(f"corrupted-split cache {path} is unreadable; building it again", flush=True)
            path.unlink()
        rows = _slices(data.labels, sets, per_setting, cfg.seed + 7)
        imgs = torch.stack([corrupt(data.images[r], s.corruption, s.severity, cfg.seed)
                            for r, s in zip(rows, sets, strict=True)])
        labs = torch.stack([data.labels[r] for r in rows])

        def write(tmp):  # type: ignore[no-untyped-def]
            with tmp.open("wb") as f:
                np.savez(f, images=imgs.numpy(), labels=labs.numpy(),
                         rows=torch.stack(rows).numpy())

        atomic_write(path, write)
        done = _read_split(path, sets)
        if done is None:  # pragma: no cover - the disk failed under us
            raise KdigError(f"corrupted-split cache {path}: unreadable right after writing it")
        return done


def _read_split(path: Path, sets: list[Setting]) -> CorruptedSplit | None:
    """The cached split, or None where it is missing, unreadable or of another shape."""
    try:
        with np.load(path) as z:
            images, labels, rows = z["images"], z["labels"], z["rows"]
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
        return None
    if images.ndim != 5 or images.shape[0] != len(sets) or labels.shape != images.shape[:2] \
            or rows.shape != images.shape[:2]:
        return None
    return CorruptedSplit(sets, torch.from_numpy(images), torch.from_numpy(labels),
                          torch.from_numpy(rows))


# Per-corruption and per-setting accuracies are named robust_test_<key> wherever they
# stand beside other metrics (an ablation's metric names, its JSON rows).
ROBUST_PREFIX = "robust_test_"


def robust_metric(key: str) -> str:
    """The metric name of a breakdown key: "jpeg" -> "robust_test_jpeg"."""
    return ROBUST_PREFIX + key


def robust_key(metric: str) -> str | None:
    """The breakdown key of a metric name ("robust_test_jpeg-2" -> "jpeg-2"); None for a
    metric that is not one (robust_test_acc is the suite's mean, not a breakdown)."""
    if metric.startswith(ROBUST_PREFIX) and metric != "robust_test_acc":
        return metric.removeprefix(ROBUST_PREFIX)
    return None


@dataclass(frozen=True)
class RobustAccuracy:
    """A model's accuracy under the corruption suite."""

    test_acc: float  # test split, mean over every (corruption, severity) setting
    val_acc: float  # validation split, likewise
    by_corruption: dict[str, float]  # test split, mean over each corruption's severities
    by_setting: dict[str, float]  # test split, per setting ("jpeg-1")
    eval_s: float = 0.0  # wall time of the evaluation

    def breakdown(self) -> dict[str, float]:
        """{"jpeg": ..., "jpeg-1": ...}: what a trial records as its "robust" attribute."""
        return self.by_setting | self.by_corruption


class RobustSuite:
    """The corrupted validation and test splits of one data bundle, and their evaluation."""

    def __init__(self, data: DataBundle, cfg: RobustnessConfig) -> None:
        self.cfg = cfg
        self.test = build_split(data.test, cfg, cfg.test_per_setting, data.fingerprint, "test")
        self.val = build_split(data.val, cfg, cfg.val_per_setting, data.fingerprint, "val")
        self.mean, self.std = data.mean, data.std

    def evaluate(self, model: torch.nn.Module, device: torch.device, precision: str
                 ) -> RobustAccuracy:
        """Accuracy on both corrupted splits, and on the test split per corruption and per
        setting."""
        from kdig_study.engine import predict

        t0 = time.perf_counter()
        acc: dict[str, torch.Tensor] = {}
        for split_name, split in (("test", self.test), ("val", self.val)):
            s, m = split.images.shape[:2]
            # one pass over every setting in large batches
            pred = predict(model, split.images.reshape(s * m, *split.images.shape[2:]),
                           self.mean, self.std, device, precision=precision).view(s, m)
            acc[split_name] = (pred == split.labels).float().mean(dim=1)  # [S]
        test = acc["test"]
        sets = self.test.settings
        return RobustAccuracy(
            test_acc=test.mean().item(), val_acc=acc["val"].mean().item(),
            by_corruption={c: test[[i for i, st in enumerate(sets) if st.corruption == c]]
                           .mean().item() for c in self.cfg.corruptions},
            by_setting={st.key: test[i].item() for i, st in enumerate(sets)},
            eval_s=time.perf_counter() - t0)
