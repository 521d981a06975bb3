"""Benchmarks: every figure a ratio against a named baseline measured in the same run.

    python -m kdig_study.bench                  # all benchmarks, real CIFAR-10 when found
    python -m kdig_study.bench --only loader --repeats 7 --json bench.json

Each baseline runs at its own best settings: its knobs are swept and the best is compared.
Times are medians over ``--repeats`` runs, after a warm-up run.
"""

from __future__ import annotations

import argparse
import dataclasses
import platform
import statistics
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from kdig_study.cli import Parser, run
from kdig_study.config import DataConfig, StudyConfig, load_study
from kdig_study.data import BatchLoader, DataBundle, ImageSet, load_bundle
from kdig_study.engine import autocast, resolve_device, resolve_precision, seeded_model, train
from kdig_study.errors import KdigError
from kdig_study.models import build_model
from kdig_study.paths import write_json


@dataclass
class Result:
    name: str
    ours: float
    baseline: float
    unit: str
    baseline_name: str
    higher_is_better: bool
    goal: str = ""
    detail: dict[str, Any] = field(default_factory=dict)

    @property
    def ratio(self) -> float:
        """How many times better ours is (>1: ours wins)."""
        return self.ours / self.baseline if self.higher_is_better else self.baseline / self.ours


def median_time(fn: Callable[[], object], repeats: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


# ---------------------------------------------------------------------------------------------
# Loader: ours vs torchvision DataLoader pipelines


class _PILDataset(torch.utils.data.Dataset):
    """The textbook pipeline: one PIL image per sample through torchvision transforms."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, transform: Any) -> None:
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        from PIL import Image

        return self.transform(Image.fromarray(self.images[i])), int(self.labels[i])


class _TensorDataset(_PILDataset):
    """The same on uint8 tensors with transforms.v2 (no PIL), also per sample."""

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.transform(self.images[i]), int(self.labels[i])


def _epoch(loader: Iterable[Any]) -> int:
    """Consume one epoch; both loaders yield (images, labels, ...) first."""
    return sum(len(batch[0]) for batch in loader)


def bench_loader(data: DataBundle, n: int, batch: int, repeats: int, device: torch.device
                 ) -> Result:
    from torchvision.transforms import v2
    from torchvision import transforms as T

    subset = data.train.take(torch.arange(min(n, len(data.train))))
    n = len(subset)
    ours_loader = BatchLoader(subset, batch_size=batch, mean=data.mean, std=data.std,
                              device=device, train=True, pad=4, flip=True, seed=0)
    ours = n / median_time(lambda: _epoch(ours_loader), repeats)

    hwc = subset.images.permute(0, 2, 3, 1).contiguous().numpy()
    labels = subset.labels.numpy()
    pil = T.Compose([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), T.ToTensor(),
                     T.Normalize(data.mean, data.std)])
    tv2 = v2.Compose([v2.RandomCrop(32, padding=4), v2.RandomHorizontalFlip(),
                      v2.ToDtype(torch.float32, scale=True), v2.Normalize(data.mean, data.std)])
    sweeps: dict[str, float] = {}
    for name, ds in (("PIL", _PILDataset(hwc, labels, pil)),
                     ("tensor-v2", _TensorDataset(subset.images, labels, tv2))):
        for workers in (0, 1, 2):
            loader = torch.utils.data.DataLoader(ds, batch_size=batch, shuffle=True,
                                                 num_workers=workers,
                                                 persistent_workers=workers > 0)
            sweeps[f"{name}, num_workers={workers}"] = n / median_time(lambda: _epoch(loader),
                                                                       repeats)
            del loader
    best_pil = max((k for k in sweeps if k.startswith("PIL")), key=sweeps.__getitem__)
    return Result("batched loader (crop+flip+normalise)", ours, sweeps[best_pil], "img/s",
                  f"torchvision DataLoader + PIL transforms ({best_pil})", True, ">= 10x",
                  {"images": n, "batch": batch, "baseline_sweep_img_s": sweeps})


# ---------------------------------------------------------------------------------------------
# Engine epoch vs pure compute


def bench_engine(cfg: StudyConfig, data: DataBundle, n: int, repeats: int,
                 device: torch.device) -> Result:
    tc = dataclasses.replace(cfg.student_train, epochs=1, train_size=0)
    subset = data.train.take(torch.arange(min(n, len(data.train))))
    steps = len(subset) // tc.batch_size
    n_used = steps * tc.batch_size

    def build() -> torch.nn.Module:
        return seeded_model(lambda: build_model(cfg.student), 0).to(device).to(
            memory_format=torch.channels_last)

    # Pure compute: forward, loss, backward, step on tensors made beforehand.
    g = torch.Generator().manual_seed(0)
    xs = torch.randn(steps, tc.batch_size, 3, 32, 32, generator=g).to(device)
    xs = [x.contiguous(memory_format=torch.channels_last) for x in xs]
    ys = torch.randint(0, 10, (steps, tc.batch_size), generator=g).to(device)

    precision = resolve_precision(tc.precision, device)

    def pure() -> None:
        model = build().train()
        opt = torch.optim.Adam(model.parameters(), lr=tc.lr)
        for x, y in zip(xs, ys):
            with autocast(precision, device):
                loss = F.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize()

    # The engine's training phase of one epoch (its own timer; validation is not counted).
    tiny_val = dataclasses.replace(data, val=data.val.take(torch.arange(10)))
    engine_times = []
    pure_times = []
    pure()  # warm-up
    train(build(), subset, tiny_val, tc, device=device, progress=True, desc="engine warm-up",
          evaluate_test=False)
    for _ in range(repeats):  # interleaved, so drift in machine speed hits both alike
        t0 = time.perf_counter()
        pure()
        pure_times.append(time.perf_counter() - t0)
        res = train(build(), subset, tiny_val, tc, device=device, progress=True,
                    desc="engine", evaluate_test=False)
        engine_times.append(res.history[0].seconds)
    eng, base = statistics.median(engine_times), statistics.median(pure_times)
    return Result(f"engine training epoch ({cfg.student.arch} student, batch {tc.batch_size}, "
                  f"{precision})",
                  eng, base, "s/epoch", "same model, pure compute on pre-made tensors", False,
                  "<= 1.15x time (ratio >= 0.87)",
                  {"images": n_used, "steps": steps, "engine_s": engine_times,
                   "pure_s": pure_times, "time_ratio": eng / base})


# ---------------------------------------------------------------------------------------------


BENCHES = ("loader", "engine")


def _parser() -> argparse.ArgumentParser:
    p = Parser(prog="python -m kdig_study.bench", description=__doc__,
               formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--study", default="kd_ig")
    p.add_argument("--scale", default="cpu", help="whose data, models and batch sizes")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--synthetic", action="store_true", help="synthetic data instead of CIFAR-10")
    p.add_argument("--device", default="auto")
    p.add_argument("--only", default=",".join(BENCHES), help=f"comma list of {', '.join(BENCHES)}")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--images", type=int, default=5000, help="images per timed pass")
    p.add_argument("--json", default=None, metavar="FILE")
    return p


def main() -> int:
    args = _parser().parse_args()
    only = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = [s for s in only if s not in BENCHES]
    if unknown:
        raise KdigError(f"--only {','.join(unknown)}: unknown benchmark; allowed: "
                        f"{', '.join(BENCHES)}")
    if args.repeats < 1:
        raise KdigError(f"--repeats {args.repeats}: allowed: >= 1")
    cfg = load_study(args.study, args.scale)
    if args.synthetic:
        cfg = dataclasses.replace(cfg, data=DataConfig(dataset="synthetic",
                                                       synthetic_train=args.images + 200,
                                                       val_size=100))
    device = resolve_device(args.device)
    data = load_bundle(cfg.data, args.data_dir)
    print(f"benchmarks on {device} ({platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}); data {data.origin}; "
          f"median of {args.repeats} repeats", flush=True)
    results: list[Result] = []
    if "loader" in only:
        results.append(bench_loader(data, args.images, cfg.student_train.batch_size,
                                    args.repeats, device))
    if "engine" in only:
        results.append(bench_engine(cfg, data, args.images, args.repeats, device))
    print()
    for r in results:
        print(f"{r.name}: ours {r.ours:,.2f} {r.unit} vs {r.baseline:,.2f} {r.unit} "
              f"[{r.baseline_name}] -> {r.ratio:.2f}x better (goal {r.goal})")
        for k, v in r.detail.items():
            if isinstance(v, dict):
                for kk, vv in v.items():
                    print(f"    {k}: {kk}: {vv:,.1f}")
    if args.json:
        write_json(Path(args.json), {
            "device": str(device), "torch": torch.__version__, "repeats": args.repeats,
            "data": data.origin,
            "results": [dataclasses.asdict(r) | {"ratio": r.ratio} for r in results]})
    return 0


if __name__ == "__main__":
    run(main)
