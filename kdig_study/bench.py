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
from pathlib import Path
from typing import TYPE_CHECKING

from kdig_study.cli import Parser, run
from kdig_study.config import DataConfig, StudyConfig, load_study
from kdig_study.errors import KdigError
from kdig_study.paths import write_json

if TYPE_CHECKING:
    import torch

    from kdig_study.bench_result import Result
    from kdig_study.experiment import Context

BENCHES = ("loader", "engine", "ig", "adaptive", "sources", "cache", "trials", "robustness",
           "compile", "deploy", "teacher-cache", "precision")


def _deploy_student(cfg: StudyConfig, ctx: Context) -> tuple[torch.nn.Module, str]:
    """The search's chosen student (its weights artifact) where the default store has one;
    else a freshly initialised student (latency does not depend on the weights; the
    accuracy rows then say so)."""
    import optuna

    from kdig_study.engine import seeded_model
    from kdig_study.models import build_model
    from kdig_study.store import default_url, open_storage
    from kdig_study.trials import pick_trial, student_weights

    name = f"{cfg.name}-{cfg.scale}"
    try:
        study = optuna.load_study(study_name=name, storage=open_storage(default_url()))
        trial = pick_trial(study, "best")
        return student_weights(study, trial, cfg, len(ctx.data.classes)), \
            f"trial {trial.number} of {name}"
    except (KeyError, KdigError):
        return seeded_model(lambda: build_model(cfg.student), 0).eval(), \
            "untrained (no searched trial in the default store)"


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
    p.add_argument("--ig-images", type=int, default=32, help="images per timed IG call")
    p.add_argument("--adaptive-images", type=int, default=512,
                   help="images brought under the target gap in 'adaptive'")
    p.add_argument("--trials", type=int, default=8, help="trials per search in 'trials'")
    p.add_argument("--pruning-scale", default="smoke",
                   help="scale of the pruning comparison (cpu: the real figure, ~1 h)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   dest="overrides", help="override a study-file value, as in the other "
                   "commands (e.g. --set teacher_train.epochs=1: timings do not depend on "
                   "the teacher's accuracy)")
    p.add_argument("--json", default=None, metavar="FILE")
    return p


def main() -> int:
    args = _parser().parse_args()
    only = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = [s for s in only if s not in BENCHES]
    if unknown:
        raise KdigError(f"--only {','.join(unknown)}: unknown benchmark; allowed: "
                        f"{', '.join(BENCHES)}")
    for flag in ("repeats", "images", "ig_images", "adaptive_images", "trials"):
        value = getattr(args, flag)
        if value < 1:
            raise KdigError(f"--{flag.replace('_', '-')} {value}: allowed: a whole number >= 1")
    cfg = load_study(args.study, args.scale, args.overrides)
    import torch

    from kdig_study.bench_deploy import bench_compile, bench_deploy
    from kdig_study.bench_ig import (
        bench_adaptive,
        bench_cache,
        bench_ig,
        bench_second_trial,
        bench_sources,
    )
    from kdig_study.bench_train import (
        bench_engine,
        bench_loader,
        bench_precision,
        bench_robustness,
        bench_teacher_cache,
        bench_trials,
    )
    from kdig_study.data import load_bundle
    from kdig_study.engine import resolve_device
    from kdig_study.experiment import Context

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
    if {"ig", "cache", "adaptive", "sources"} & set(only):
        ctx = Context(cfg, data, device, progress=True)
        if "ig" in only:
            results += bench_ig(cfg, ctx, args.ig_images, args.repeats)
        if "adaptive" in only:
            results.append(bench_adaptive(cfg, ctx, args.adaptive_images))
        if "sources" in only:
            results += bench_sources(cfg, ctx, args.ig_images * 8, args.repeats)
        if "cache" in only:
            results.append(bench_cache(ctx))
            results.append(bench_second_trial(device))
    if "compile" in only:
        results += bench_compile(cfg, data, args.images, args.repeats, device)
    if "deploy" in only:
        from kdig_study.deploy import require_deploy
        require_deploy()
        ctx = Context(cfg, data, torch.device("cpu"), progress=True)
        student, trained = _deploy_student(cfg, ctx)
        results += bench_deploy(ctx, student, trained)
    if "precision" in only:
        results += bench_precision(cfg, data, args.images, args.repeats, device)
    if "robustness" in only:
        results.append(bench_robustness(cfg, data, device, args.repeats))
    if "teacher-cache" in only:
        results += bench_teacher_cache(Context(cfg, data, device, progress=True), args.repeats)
    if "trials" in only:
        results += bench_trials(args.data_dir, device, args.trials, args.pruning_scale)
    print()
    for r in results:
        verdict = r.headline or f"{r.ratio:.2f}x better"
        print(f"{r.name}: ours {r.ours:,.3g} {r.unit} vs {r.baseline:,.3g} {r.unit} "
              f"[{r.baseline_name}] -> {verdict} (goal {r.goal})")
        for k, v in r.detail.items():
            if isinstance(v, dict):
                for kk, vv in v.items():
                    print(f"    {k}: {kk}: {vv}")
            else:
                print(f"    {k}: {v}")
    if args.json:
        write_json(Path(args.json), {
            "device": str(device), "torch": torch.__version__, "repeats": args.repeats,
            "data": data.origin,
            "results": [dataclasses.asdict(r) | {"ratio": r.ratio} for r in results]})
    return 0


if __name__ == "__main__":
    run(main)
