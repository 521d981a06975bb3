"""What a model costs: parameters, FLOPs, bytes, and latency measured the careful way."""

from __future__ import annotations

import contextlib
import os
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from typing import Any

import torch

from kdig_study.config import MeasureConfig
from kdig_study.models import Net, count_flops, count_params, serialized_bytes


@dataclass(frozen=True)
class Latency:
    device: str
    batch_size: int
    threads: int  # torch intra-op threads during the measurement (CPU)
    warmup: int
    runs: int
    median_ms: float
    p90_ms: float

    @property
    def method(self) -> str:
        return (f"{self.device}, batch {self.batch_size}, {self.threads} threads, fp32, "
                f"eval mode, channels_last, {self.warmup} warm-up passes, then median and p90 "
                f"of {self.runs} timed forward passes")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self) | {"method": self.method}


@dataclass(frozen=True)
class Timing:
    median_ms: float
    p90_ms: float
    runs: int


def time_calls(fn: Callable[[], Any], warmup: int = 10, runs: int = 50) -> Timing:
    """Warm wall-clock time of ``fn``: ``warmup`` untimed calls, then the median and p90 of
    ``runs`` timed ones, in ms. Every latency and benchmark timer goes through here."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1000.0)
    times.sort()
    return Timing(statistics.median(times), times[min(runs - 1, round(0.9 * (runs - 1)))], runs)


def default_threads() -> int:
    """The cores this process may use (what a deployment on this box would have)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@torch.inference_mode()
def measure_latency(model: Net, batch_size: int = 1, device: torch.device | str = "cpu",
                    threads: int | None = None, warmup: int = 10, runs: int = 50, *,
                    image_size: int) -> Latency:
    """Warm forward-pass latency: ``warmup`` untimed passes, then ``runs`` timed ones.

    A single cold pass (how the paper got 140 ms vs 13 ms) mostly times allocation and
    kernel selection; warm medians are what a deployed model sees.
    """
    device = torch.device(device)
    threads = threads or default_threads()
    was_training = model.training
    model = model.to(device).eval()
    x = torch.randn(batch_size, 3, image_size, image_size, device=device).contiguous(
        memory_format=torch.channels_last)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def forward() -> None:
        model(x)
        sync()

    with torch_threads(threads):
        t = time_calls(forward, warmup, runs)
    model.train(was_training)
    return Latency(device=str(device), batch_size=batch_size, threads=threads, warmup=warmup,
                   runs=runs, median_ms=t.median_ms, p90_ms=t.p90_ms)


def model_cost(model: Net, image_size: int) -> dict[str, int]:
    """Parameters, forward FLOPs per image of ``image_size`` px, and safetensors size in
    bytes."""
    return {"params": count_params(model), "flops": count_flops(model, image_size),
            "bytes": serialized_bytes(model)}


def profile(model: Net, device: torch.device | str = "cpu", batch: int = 64,
            how: MeasureConfig | None = None, *, image_size: int) -> dict[str, Any]:
    """Cost plus latency at batch 1 and batch ``batch`` of ``image_size`` px images (on the
    CPU, and on CUDA if used), with the study's warm-up and timed pass counts (``[measure]``;
    default 10 and 50)."""
    how = how or MeasureConfig()
    out: dict[str, Any] = model_cost(model, image_size)
    devices = ["cpu"] + ([str(device)] if torch.device(device).type == "cuda" else [])
    for dev in devices:
        tag = "" if dev == "cpu" else "_cuda"
        for b in (1, batch):
            lat = measure_latency(model, b, dev, warmup=how.latency_warmup,
                                  runs=how.latency_runs, image_size=image_size)
            out[f"latency{tag}_b{b}"] = lat.to_dict()
    model.to(device)
    return out


def latency_columns(prof: dict[str, Any]) -> dict[str, float]:
    """A profile's latencies as flat columns: latency_b1_median_ms, latency_b1_p90_ms, ...
    (what a trial records beside its metrics)."""
    return {f"{k}_{stat}_ms": v[f"{stat}_ms"] for k, v in prof.items()
            if k.startswith("latency") for stat in ("median", "p90")}
