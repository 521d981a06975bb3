"""The device check: what one GPU does for the paper-scale protocol, in a few minutes.

    bash scripts/gpu_check.sh OUT            # on a GPU machine (about 6 minutes)
    python -m kdig_study.gpu_check --out OUT --tiny   # anywhere, seconds (tests run it)

Measures on one device, with synthetic images resident on it (speed does not depend on
pixel values):
  * training throughput of the paper-scale teacher and student (MobileNetV2, batch 64,
    bf16 where supported) with 1, 2, 4 and 8 worker processes sharing the device;
  * IG image-steps/s, ours (BN folded, all counts in one pass) against Captum's
    IntegratedGradients at its best internal batch size, same rule, precision and device;
  * the map store's build rate, extrapolated to the 45,000 training images;
and from these projects the wall time of the full paper protocol (teacher 100 epochs, maps,
50 trials with pruning, a 10-seed ablation of 4 conditions). Writes gpu_check.json and
summary.txt to OUT.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kdig_study.cli import Parser, run
from kdig_study.config import ModelConfig, load_study
from kdig_study.errors import KdigError
from kdig_study.paths import atomic_write, writable_folder, write_json

if TYPE_CHECKING:
    import torch

# The paper protocol (docs/design.md, section 6): 45,000 training images, 100 epochs,
# batch 64; 50 trials; 10 seeds x 4 conditions. The share of epochs a pruned search trains,
# measured at cpu scale (89 of 160 epochs with the median pruner): used for the projection,
# and said so.
PAPER = {"train_images": 45_000, "epochs": 100, "trials": 50, "ablation_runs": 40,
         "search_epoch_share": 89 / 160, "ig_points": 98, "kd_cost": 1.35}


@dataclass(frozen=True)
class Sizes:
    images: int  # per worker per timed run
    ig_images: int
    workers: tuple[int, ...]
    repeats: int


FULL = Sizes(images=6400, ig_images=64, workers=(1, 2, 4, 8), repeats=3)
TINY = Sizes(images=640, ig_images=4, workers=(1, 2), repeats=1)


def _model(role: str, tiny: bool) -> torch.nn.Module:
    from kdig_study.models import build_model

    cfg = load_study("kd_ig", "paper")
    m: ModelConfig = getattr(cfg, role)
    if tiny:  # a CPU-sized stand-in, so the script runs everywhere in seconds
        m = ModelConfig(arch="convnet", width=0.125)
    return build_model(m)


def _train_steps(role: str, n_images: int, batch: int, device: torch.device, tiny: bool,
                 barrier: tuple[Path, int] | None = None) -> dict[str, float]:
    """Plain training steps on device-resident synthetic data (one process): the images
    trained and the timed window (wall-clock start and end, comparable across processes).
    ``barrier`` (folder, processes): after its warm-up, each process waits there until all
    are warm, so that the timed windows overlap."""
    import torch

    from kdig_study.engine import plain_steps, resolve_precision

    model = _model(role, tiny).to(device).to(memory_format=torch.channels_last)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    precision = resolve_precision("auto", device)
    x = torch.randn(batch, 3, 32, 32, device=device).contiguous(
        memory_format=torch.channels_last)
    y = torch.randint(0, 10, (batch,), device=device)
    steps = max(1, n_images // batch)

    def run_steps(k: int) -> None:
        plain_steps(model, opt, itertools.repeat((x, y), k), precision, device)

    run_steps(min(steps, 10))  # warm-up
    if barrier is not None:
        folder, n = barrier
        (folder / f"ready-{os.getpid()}").touch()
        while len(list(folder.glob("ready-*"))) < n:
            time.sleep(0.01)
    start = time.time()
    run_steps(steps)
    return {"images": steps * batch, "start": start, "end": time.time()}


def _workers_throughput(role: str, workers: int, sizes: Sizes, tiny: bool) -> float:
    """Total img/s of ``workers`` processes training at once on the one device."""
    env = os.environ.copy() | {"OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // workers))}
    with tempfile.TemporaryDirectory() as barrier:
        cmd = [sys.executable, "-m", "kdig_study.gpu_check", "--worker", role, "--images",
               str(sizes.images), "--barrier", barrier, "--barrier-n", str(workers)] + \
            (["--tiny"] if tiny else [])
        procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True, env=env) for _ in range(workers)]
        runs = []
        for p in procs:
            out, err = p.communicate(timeout=600)
            if p.returncode != 0:
                raise KdigError(f"a {role} worker failed: {err.strip().splitlines()[-1:]}")
            runs.append(json.loads(out.strip().splitlines()[-1]))
    return shared_window_rate(runs)


def shared_window_rate(runs: list[dict[str, float]]) -> float:
    """All images over one shared wall window, from the first start to the last end. The
    sum of each worker's rate over its own window overstated it (2 workers 3.8x one on 2
    cores): windows that did not overlap were counted as if they had."""
    return sum(r["images"] for r in runs) / (max(r["end"] for r in runs) -
                                              min(r["start"] for r in runs))


def _ig(sizes: Sizes, device: torch.device, tiny: bool) -> dict[str, Any]:
    """IG image-steps/s: ours (the store's integrator, all of the paper's counts in one
    pass) against Captum at its best internal batch size, one call per count."""
    import torch
    from captum.attr import IntegratedGradients

    from kdig_study.attribution.numerics import integrated_gradients, union_rule
    from kdig_study.engine import autocast, resolve_precision
    from kdig_study.models import fold_batchnorm

    cfg = load_study("kd_ig", "paper")
    counts = (4, 8) if tiny else (16, 32, 50)
    teacher = _model("teacher", tiny).to(device).eval().to(memory_format=torch.channels_last)
    folded = fold_batchnorm(teacher).to(memory_format=torch.channels_last)
    precision = resolve_precision(cfg.ig.precision, device)
    x = torch.randn(sizes.ig_images, 3, 32, 32, device=device).contiguous(
        memory_format=torch.channels_last)
    y = torch.randint(0, 10, (sizes.ig_images,), device=device)
    base = torch.zeros_like(x)
    alphas, weights = union_rule(cfg.ig.method, counts)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def timed(fn: Any) -> float:
        fn()
        sync()
        times = []
        for _ in range(sizes.repeats):
            t0 = time.perf_counter()
            fn()
            sync()
            times.append(time.perf_counter() - t0)
        return statistics.median(times)

    ours_best, captum_best = float("inf"), {}
    for internal in ((64, 256) if tiny else (256, 1024, 4096)):
        def ours(internal: int = internal) -> None:
            with autocast(precision, device):
                integrated_gradients(folded, x, y, base, alphas, weights, internal)
        ours_best = min(ours_best, timed(ours))
    for n in counts:
        best = float("inf")
        for ibs in ((64, 256) if tiny else (256, 1024, 4096)):
            def captum(n: int = n, ibs: int = ibs) -> None:
                with autocast(precision, device):
                    IntegratedGradients(teacher).attribute(
                        x, baselines=base, target=y, n_steps=n, method=cfg.ig.method,
                        internal_batch_size=ibs)
            best = min(best, timed(captum))
        captum_best[n] = best
    points = int(alphas.numel())
    return {"counts": list(counts), "points_ours": points,
            "ours_img_steps_per_s": sizes.ig_images * points / ours_best,
            "ours_images_per_s": sizes.ig_images / ours_best,
            "captum_images_per_s_all_counts": sizes.ig_images / sum(captum_best.values()),
            "ratio_all_counts": sum(captum_best.values()) / ours_best,
            "precision": precision}


def project(measured: dict[str, Any]) -> dict[str, float]:
    """Hours of the full paper protocol from the measured rates (best worker count)."""
    best = {role: max(measured["training"][role].values()) for role in ("teacher", "student")}
    one = {role: measured["training"][role]["1"] for role in ("teacher", "student")}
    images = PAPER["train_images"] * PAPER["epochs"]
    teacher_h = images / one["teacher"] / 3600
    maps_h = PAPER["train_images"] / measured["ig"]["ours_images_per_s"] / 3600
    # KD runs also forward the teacher: kd_cost x a plain student step (an estimate)
    run_h = images * PAPER["kd_cost"] / best["student"] / 3600
    search_h = PAPER["trials"] * PAPER["search_epoch_share"] * run_h
    ablation_h = PAPER["ablation_runs"] * run_h
    return {"teacher_h": teacher_h, "maps_h": maps_h, "search_h": search_h,
            "ablation_h": ablation_h, "total_h": teacher_h + maps_h + search_h + ablation_h}


def main() -> int:
    p = Parser(prog="python -m kdig_study.gpu_check", description=__doc__,
               formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.environ.get("OUT", "gpu_check_out"))
    p.add_argument("--device", default="auto")
    p.add_argument("--tiny", action="store_true", help="tiny models and sizes (CPU tests)")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--images", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--barrier", default=None, help=argparse.SUPPRESS)
    p.add_argument("--barrier-n", type=int, default=1, help=argparse.SUPPRESS)
    args = p.parse_args()
    import torch

    from kdig_study.engine import resolve_device

    device = resolve_device(args.device)
    sizes = TINY if args.tiny else FULL
    if args.worker:  # one training worker: print its images and timed window (JSON)
        barrier = (Path(args.barrier), args.barrier_n) if args.barrier else None
        print(json.dumps(_train_steps(args.worker, args.images or sizes.images, 64, device,
                                      args.tiny, barrier)))
        return 0
    if device.type == "cpu" and not args.tiny:
        print("device check without --tiny on a CPU: the full sizes are made for a GPU and "
              "take a long time here; Ctrl-C and add --tiny for a quick check", flush=True)
    out = writable_folder(Path(args.out), "--out")  # before minutes of measuring
    t0 = time.perf_counter()
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"device check on {name} ({'tiny' if args.tiny else 'full'} sizes)", flush=True)
    training: dict[str, dict[str, float]] = {}
    for role in ("student", "teacher"):
        training[role] = {}
        for w in sizes.workers:
            training[role][str(w)] = _workers_throughput(role, w, sizes, args.tiny)
            print(f"  {role} training, batch 64, {w} worker(s): "
                  f"{training[role][str(w)]:,.0f} img/s", flush=True)
    ig = _ig(sizes, device, args.tiny)
    print(f"  IG, counts {ig['counts']} in one pass of {ig['points_ours']} points: "
          f"{ig['ours_img_steps_per_s']:,.0f} image-steps/s; against Captum at its best, one "
          f"call per count: {ig['ratio_all_counts']:.2f}x", flush=True)
    measured = {"device": name, "date": time.strftime("%Y-%m-%d"), "torch": torch.__version__,
                "tiny": args.tiny, "training": training, "ig": ig}
    measured["map_store_45k_minutes"] = PAPER["train_images"] / ig["ours_images_per_s"] / 60
    measured["projection_hours"] = project(measured)
    measured["assumptions"] = {k: v for k, v in PAPER.items()}
    measured["wall_s"] = time.perf_counter() - t0
    best_w = {r: max(v, key=v.get) for r, v in training.items()}
    lines = [f"kdig_study device check, {measured['date']}, {name}, torch {torch.__version__}",
             *[f"{r} training img/s by workers: " + ", ".join(
                 f"{w}: {v:,.0f}" for w, v in training[r].items()) + f" (best: {best_w[r]})"
               for r in training],
             f"IG: ours {ig['ours_img_steps_per_s']:,.0f} image-steps/s, "
             f"{ig['ratio_all_counts']:.2f}x Captum at its best for the counts {ig['counts']}",
             f"map store of 45,000 images: {measured['map_store_45k_minutes']:.1f} min "
             f"(extrapolated from {sizes.ig_images} images)",
             "paper protocol, projected: " + ", ".join(
                 f"{k.removesuffix('_h')} {v:.1f} h" for k, v in
                 measured["projection_hours"].items()),
             f"check took {measured['wall_s']:.0f} s"]
    write_json(out / "gpu_check.json", measured)
    atomic_write(out / "summary.txt", lambda tmp: tmp.write_text("\n".join(lines) + "\n"))
    print("\n".join(lines))
    print(f"written: {out / 'gpu_check.json'}, {out / 'summary.txt'}")
    return 0


if __name__ == "__main__":
    run(main)
