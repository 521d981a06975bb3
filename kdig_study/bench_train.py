"""Benchmarks of the training side, each against a baseline measured in the same run: the
batch loader against torchvision's DataLoader, the engine's epoch against pure compute, a
search's trial overhead and its pruning, the corruption suite's evaluation (run by `bench`)."""

from __future__ import annotations

import dataclasses
import statistics
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import torch
from optuna.artifacts import FileSystemArtifactStore

from kdig_study.bench_result import Result, median_time
from kdig_study.config import ModelConfig, StudyConfig, TrainConfig, load_study
from kdig_study.data import BatchLoader, DataBundle, load_bundle
from kdig_study.engine import (
    cpu_bf16_kernels,
    make_optimizer,
    plain_steps,
    resolve_precision,
    seeded_model,
    train,
)
from kdig_study.experiment import Context
from kdig_study.models import build_model

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
    from torchvision import transforms as T
    from torchvision.transforms import v2

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
            sweeps[f"{name}, num_workers={workers}"] = n / median_time(
                lambda ld=loader: _epoch(ld), repeats)
    # the fastest baseline of the whole sweep, whatever its family (PIL or tensor-v2)
    best = max(sweeps, key=sweeps.__getitem__)
    return Result("batched loader (crop+flip+normalise)", ours, sweeps[best], "img/s",
                  f"torchvision DataLoader, fastest of the sweep ({best})", True, ">= 10x",
                  {"images": n, "batch": batch, "baseline_sweep_img_s": sweeps})


# ---------------------------------------------------------------------------------------------
# The precision "auto" picks against the other one


def bench_precision(cfg: StudyConfig, data: DataBundle, n: int, repeats: int,
                    device: torch.device) -> list[Result]:
    """A training step of the teacher and of the student at the precision ``auto`` resolves
    to here against the other of fp32 and bf16 autocast: whether auto's choice is the faster
    on this machine. Which is faster depends on the CPU's bf16 kernels (AMX, AVX512-BF16 with
    or without AVX512-FP16) and on the architecture, so it is measured, not assumed. Each
    role takes its own batch size and ``n`` images' worth of steps (at least 2); the two
    precisions alternate, so drift in machine speed hits both alike."""
    auto = resolve_precision("auto", device)
    other = "fp32" if auto == "bf16" else "bf16"
    kernels = cpu_bf16_kernels() if device.type == "cpu" else device.type
    out = []
    for role, model_cfg, tc in (("teacher", cfg.teacher, cfg.teacher_train),
                                ("student", cfg.student, cfg.student_train)):
        steps = max(2, n // tc.batch_size)
        run_steps = _pure_steps(model_cfg, tc, data, steps, device)
        times: dict[str, list[float]] = {auto: [], other: []}
        for prec in times:  # warm-up: oneDNN builds each precision's kernels on first use
            run_steps(prec)
        for _ in range(repeats):
            for prec in times:
                t0 = time.perf_counter()
                run_steps(prec)
                times[prec].append((time.perf_counter() - t0) / steps)
        ours, base = statistics.median(times[auto]), statistics.median(times[other])
        out.append(Result(
            f"training step, {role} {model_cfg.arch} at batch {tc.batch_size}: precision auto "
            f"= {auto} ({kernels or 'no bf16 kernels'})", ours, base, "s/step",
            f"the same step at {other}", False, ">= 1x: auto picks the faster precision",
            {"steps": steps, "batch": tc.batch_size, "kernels": kernels,
             f"{auto}_s_per_step": times[auto], f"{other}_s_per_step": times[other]},
            headline=f"{base / ours:.2f}x: {auto} takes {ours:.3g} s a step, {other} "
                     f"{base:.3g} s"))
    return out


# ---------------------------------------------------------------------------------------------
# Engine epoch vs pure compute


def _pure_steps(model_cfg: ModelConfig, tc: TrainConfig, data: DataBundle, steps: int,
                device: torch.device) -> Callable[[str], None]:
    """``run(precision)``: a fresh model (seed 0) trained ``steps`` steps at ``precision``
    on tensors made beforehand ([steps][batch, C, H, W] at the data's size, labels of its
    classes), with the engine's optimizer: forward, loss, backward, step and nothing else."""
    classes = len(data.classes)
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(tc.batch_size, *data.train.images.shape[1:], generator=g).to(device)
          .contiguous(memory_format=torch.channels_last) for _ in range(steps)]
    ys = [torch.randint(0, classes, (tc.batch_size,), generator=g).to(device)
          for _ in range(steps)]

    def run(precision: str) -> None:
        model = seeded_model(lambda: build_model(model_cfg, classes), 0).to(device).to(
            memory_format=torch.channels_last).train()
        plain_steps(model, make_optimizer(model, tc), zip(xs, ys, strict=True), precision,
                    device)
    return run


def bench_engine(cfg: StudyConfig, data: DataBundle, n: int, repeats: int,
                 device: torch.device) -> Result:
    tc = dataclasses.replace(cfg.student_train, epochs=1, train_size=0)
    subset = data.train.take(torch.arange(min(n, len(data.train))))
    steps = len(subset) // tc.batch_size
    n_used = steps * tc.batch_size

    def build() -> torch.nn.Module:
        return seeded_model(lambda: build_model(cfg.student, len(data.classes)), 0).to(
            device).to(memory_format=torch.channels_last)

    precision = resolve_precision(tc.precision, device)
    run_pure = _pure_steps(cfg.student, tc, data, steps, device)

    def pure() -> None:
        run_pure(precision)

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
                  "<= 1.15x the pure compute time",
                  {"images": n_used, "steps": steps, "engine_s": engine_times,
                   "pure_s": pure_times}, headline=f"{eng / base:.3f}x the pure compute time")


def _study_run(cfg: StudyConfig, ctx: Context, url: str, name: str, n_trials: int,
               prune: bool) -> tuple[optuna.Study, float]:
    """A search in-process, as `optimize` runs it; returns the study and its wall time."""
    from kdig_study.objectives import Objective
    from kdig_study.search import make_pruner, make_sampler, run_worker
    from kdig_study.slots import SlotLock
    from kdig_study.store import open_storage, open_study, quiet_optuna_logs

    quiet_optuna_logs()
    storage = open_storage(url)
    pruner = make_pruner(cfg) if prune else optuna.pruners.NopPruner()
    study = open_study(storage, name, cfg, make_sampler(cfg, None), pruner, ["maximize"], url,
                       **ctx.study_identity())
    t0 = time.perf_counter()
    artifacts = FileSystemArtifactStore(Path(url.removeprefix("sqlite:///")).parent)
    run_worker(study, Objective(ctx, prune=prune, artifacts=artifacts), n_trials, None,
               SlotLock(storage, name), poll_s=1.0, prefix="    ")
    return study, time.perf_counter() - t0


def bench_trials(data_dir: str | None, device: torch.device, n_trials: int,
                 pruning_scale: str) -> list[Result]:
    """Trial overhead at smoke scale, and pruning against no pruning with the same seed."""
    from optuna.trial import TrialState

    results = []
    with tempfile.TemporaryDirectory() as tmp:
        smoke = load_study("kd_ig", "smoke")
        ctx = Context(smoke, load_bundle(smoke.data), device, progress=False)
        study, _ = _study_run(smoke, ctx, f"sqlite:///{tmp}/overhead.db", "overhead",
                              n_trials, prune=False)
        fractions, overheads = [], []
        for t in study.get_trials(states=(TrialState.COMPLETE,)):
            total = (t.datetime_complete - t.datetime_start).total_seconds()
            overheads.append(total - t.user_attrs["metrics"]["train_eval_s"])
            fractions.append(overheads[-1] / total)
        results.append(Result(
            "trial time outside training and evaluation (smoke scale)",
            statistics.median(overheads), statistics.median(
                [(t.datetime_complete - t.datetime_start).total_seconds()
                 for t in study.get_trials(states=(TrialState.COMPLETE,))]), "s",
            "the whole trial, ask to tell", False, "<= 5% of the trial",
            {"median_fraction": statistics.median(fractions), "max_fraction": max(fractions),
             "trials": len(fractions)},
            headline=f"{statistics.median(fractions):.1%} of the trial (median over "
                     f"{len(fractions)} trials; the first also measures latency: "
                     f"{fractions[0]:.0%})"))

        cfg = load_study("kd_ig", pruning_scale)
        pctx = Context(cfg, load_bundle(cfg.data, data_dir), device, progress=False)
        runs = {}
        for prune in (True, False):
            study, wall = _study_run(cfg, pctx, f"sqlite:///{tmp}/prune{int(prune)}.db",
                                     f"prune-{prune}", n_trials, prune)
            trials = study.get_trials(states=(TrialState.COMPLETE, TrialState.PRUNED))
            runs[prune] = {
                "epochs": sum(t.user_attrs["metrics"]["epochs_run"] for t in trials),
                "best_val": max((t.value for t in trials if t.value is not None), default=0.0),
                "pruned": sum(t.state == TrialState.PRUNED for t in trials),
                "wall_s": wall, "trials_per_hour": 3600 * len(trials) / wall}
        results.append(Result(
            f"epochs trained by {n_trials} trials, median pruner vs none ({pruning_scale} "
            f"scale, same sampler seed)", runs[True]["epochs"], runs[False]["epochs"],
            "epochs", "no pruning", False, "fewer epochs, same best",
            {"with_pruning": runs[True], "without_pruning": runs[False]},
            headline=f"{runs[False]['epochs'] - runs[True]['epochs']} epochs saved "
                     f"({1 - runs[True]['epochs'] / runs[False]['epochs']:.0%}); best val "
                     f"{runs[True]['best_val']:.2%} vs {runs[False]['best_val']:.2%}; "
                     f"{runs[True]['trials_per_hour']:.0f} vs "
                     f"{runs[False]['trials_per_hour']:.0f} trials/hour"))
    return results


def bench_robustness(cfg: StudyConfig, data: DataBundle, device: torch.device,
                     repeats: int) -> Result:
    """The corruption suite's evaluation against the run's clean evaluation (every epoch's
    validation pass plus the final test pass), for the study's student."""
    from kdig_study.corruptions import RobustSuite
    from kdig_study.engine import evaluate

    t0 = time.perf_counter()
    suite = RobustSuite(data, cfg.robustness)  # built once per data set, then cached
    build_s = time.perf_counter() - t0
    model = seeded_model(lambda: build_model(cfg.student), 0).to(device).to(
        memory_format=torch.channels_last)
    precision = resolve_precision(cfg.student_train.precision, device)
    epochs = cfg.student_train.epochs

    def clean() -> None:
        for _ in range(epochs):
            evaluate(model, data.val, data.mean, data.std, device, precision)
        evaluate(model, data.test, data.mean, data.std, device, precision)

    clean_s = median_time(clean, repeats)
    robust_s = median_time(lambda: suite.evaluate(model, device, precision), repeats)
    n = suite.test.images.shape[0] * suite.test.images.shape[1] + \
        suite.val.images.shape[0] * suite.val.images.shape[1]
    return Result(
        f"corruption suite evaluation per run ({cfg.scale} scale, {n:,} corrupted images)",
        robust_s, clean_s, "s", f"the run's clean evaluation ({epochs} validation passes of "
        f"{len(data.val):,} + test {len(data.test):,})", False, "adds <= 25%",
        {"added_fraction": robust_s / clean_s, "suite_build_or_load_s": build_s},
        headline=f"adds {robust_s / clean_s:.0%} to the evaluation time")


# ---------------------------------------------------------------------------------------------
# The teacher-output cache: a KD+IG trial reading it, computing the teacher, the student alone


def bench_teacher_cache(ctx: Context, repeats: int) -> list[Result]:
    """Whole trials (run_student: training, validation, test, corruption suite) of the
    study's scale: KD+IG reading the teacher-output cache, the same trial computing the
    teacher (cache off), and the student alone (no KD, no overlay). The cached variant's
    warm-up run writes the stream; the others need no warm-up (nothing to fill). The cached
    and computing runs must end with the same weights: the figure is void otherwise."""
    from kdig_study.experiment import run_student

    cfg = ctx.cfg

    def variant(kd: bool, ig: bool, cache: bool) -> StudyConfig:
        return dataclasses.replace(
            cfg, method=dataclasses.replace(cfg.method, kd=kd, ig=ig, at=False),
            teacher_cache=dataclasses.replace(cfg.teacher_cache, enabled=cache))

    ctx.teacher()
    ctx.maps()  # the overlay's maps, before any timing
    runs: dict[str, Any] = {}

    def timed(name: str, c: StudyConfig, warmup: int) -> float:
        def one() -> None:
            runs[name] = run_student(ctx, c)
        return median_time(one, repeats, warmup=warmup)

    alone = timed("alone", variant(False, False, False), 0)
    computing = timed("computing", variant(True, True, False), 0)
    cached = timed("cached", variant(True, True, True), 1)
    a, b = runs["computing"], runs["cached"]
    same = all(torch.equal(x, y) for x, y in zip(a.model.state_dict().values(),
                                                  b.model.state_dict().values(), strict=True))
    if not same or a.metrics.test_acc != b.metrics.test_acc:
        raise RuntimeError("the cached KD+IG trial differs from the computing one: the "
                           "teacher-output cache is not exact here")
    tc = cfg.student_train
    what = (f"KD+IG trial, {cfg.scale} scale ({a.metrics.train_images:,} images x "
            f"{tc.epochs} epochs, {b.metrics.teacher_steps_cached:,} teacher steps read)")
    # the training passes alone (no evaluation, which every variant pays the same), last run
    passes = {k: sum(h.seconds for h in r.result.history) for k, r in runs.items()}
    detail = {"student_alone_s": alone, "kd_ig_computing_s": computing,
              "kd_ig_cached_s": cached, "cached_over_alone": cached / alone,
              "computing_over_alone": computing / alone,
              "training_passes_s": passes,
              "training_passes_cached_over_alone": passes["cached"] / passes["alone"],
              "training_passes_computing_over_alone": passes["computing"] / passes["alone"],
              "teacher_epochs": cfg.teacher_train.epochs,
              "identical_weights_and_metrics": same}
    return [Result(f"{what}: reading the teacher-output cache", cached, computing, "s",
                   "the same trial computing the teacher", False,
                   "the cached trial <= 1.25x the student alone (next row)", detail),
            Result(f"{what}: cached, against the student alone", cached, alone, "s",
                   "a student-only trial (no KD, no overlay)", False, "<= 1.25x its time",
                   {}, headline=f"costs {cached / alone:.2f}x the student-only trial "
                                f"(computing the teacher: {computing / alone:.2f}x)")]
