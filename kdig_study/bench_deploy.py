"""Benchmarks of compiled training and of the deployable student: torch.compile against eager
training epochs, and ONNX Runtime (fp32, int8) against PyTorch eager and torch.compile."""

from __future__ import annotations

import dataclasses
import statistics
import tempfile
from pathlib import Path
from typing import Any

import torch

from kdig_study.bench_result import Result
from kdig_study.config import StudyConfig
from kdig_study.data import DataBundle
from kdig_study.engine import seeded_model, train
from kdig_study.experiment import Context
from kdig_study.measure import default_threads
from kdig_study.models import Net, build_model


def bench_compile(cfg: StudyConfig, data: DataBundle, n: int, repeats: int,
                  device: torch.device) -> list[Result]:
    """One training epoch (engine, no validation) eager against torch.compile, for the
    student and the teacher of the scale; the compiled run's first epoch (compilation
    included) is reported, not timed."""
    results = []
    tiny_val = dataclasses.replace(data, val=data.val.take(torch.arange(10)))
    subset = data.train.take(torch.arange(min(n, len(data.train))))
    for role in ("student", "teacher"):
        model_cfg = getattr(cfg, role)
        base = dataclasses.replace(getattr(cfg, f"{role}_train"), epochs=1, train_size=0)
        times: dict[bool, list[float]] = {False: [], True: []}
        first: dict[bool, float] = {}
        for compiled in (False, True):
            tc = dataclasses.replace(base, compile=compiled)
            model = seeded_model(lambda model_cfg=model_cfg: build_model(model_cfg), 0)
            for i in range(repeats + 1):  # the first epoch warms up (and compiles)
                res = train(model, subset, tiny_val, tc, device=device, progress=False,
                            evaluate_test=False)
                if i == 0:
                    first[compiled] = res.history[0].seconds
                else:
                    times[compiled].append(res.history[0].seconds)
        eager, comp = statistics.median(times[False]), statistics.median(times[True])
        results.append(Result(
            f"training epoch with torch.compile ({role}, {model_cfg.arch}, batch "
            f"{base.batch_size}, {len(subset)} images)", comp, eager, "s/epoch",
            "the same epoch in eager mode", False, "a speed-up, else off by default",
            {"eager_s": times[False], "compiled_s": times[True],
             "first_epoch_s": {"eager": first[False], "compiled (with compilation)":
                               first[True]}},
            headline=f"{eager / comp:.2f}x eager's speed (compilation: "
                     f"{first[True] - comp:.0f} s once)"))
    return results


def bench_deploy(ctx: Context, student: Net, trained: str) -> list[Result]:
    """The student exported, checked and timed as `export` does it (fp32 and int8 ONNX
    Runtime against PyTorch eager and torch.compile, batch 1 and 128, same threads)."""
    from kdig_study.deploy_measure import measure_role

    threads = default_threads()
    with tempfile.TemporaryDirectory() as tmp:
        rows = measure_role("student", student, ctx, Path(tmp), int8=True, compile_=True,
                            threads=threads, log=lambda *a: None)
    by = {r["format"].split(" (")[0]: r for r in rows}
    eager = by["PyTorch eager fp32"]
    results = []
    for fmt in ("PyTorch torch.compile fp32", "ONNX Runtime fp32", "ONNX Runtime int8"):
        r = by[fmt]
        for b in ("b1", "b128"):
            ours, base = r["latency"][b]["median_ms"], eager["latency"][b]["median_ms"]
            detail: dict[str, Any] = {"p90_ms": r["latency"][b]["p90_ms"],
                                      "eager_p90_ms": eager["latency"][b]["p90_ms"],
                                      "threads": threads, "weights": trained}
            if r.get("bytes"):
                detail |= {"bytes": r["bytes"], "test_acc": r["test_acc"],
                           "robust_test_acc": r["robust_test_acc"]}
            if "delta_test_acc" in r:
                detail |= {"delta_test_acc": r["delta_test_acc"],
                           "delta_robust_test_acc": r["delta_robust_test_acc"]}
            results.append(Result(
                f"student latency, {fmt}, batch {b[1:]}", ours, base, "ms",
                f"PyTorch eager fp32, same threads ({threads})", False,
                "lower latency; int8 accuracy within a point", detail))
    q, f = by["ONNX Runtime int8"], by["ONNX Runtime fp32"]
    rob = q["delta_robust_test_acc"]
    results.append(Result(
        "student int8 against fp32 (ONNX Runtime): size", q["bytes"], f["bytes"], "bytes",
        "the fp32 ONNX file", False, "smaller, accuracy within a point",
        {"delta_test_acc": q["delta_test_acc"], "delta_robust_test_acc": rob,
         "weights": trained},
        headline=f"{q['bytes'] / f['bytes']:.2f}x the size; test accuracy "
                 f"{100 * q['delta_test_acc']:+.2f} points, under corruptions "
                 + ("n/a" if rob is None else f"{100 * rob:+.2f} points")))
    return results
