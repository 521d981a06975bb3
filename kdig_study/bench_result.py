"""A benchmark figure: ours against a named baseline measured in the same run, and the median
timer every benchmark uses."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from kdig_study.measure import time_calls


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
    headline: str = ""  # the figure in words, where "N x better" would mislead

    @property
    def ratio(self) -> float:
        """How many times better ours is (>1: ours wins)."""
        return self.ours / self.baseline if self.higher_is_better else self.baseline / self.ours


def median_time(fn: Callable[[], object], repeats: int, warmup: int = 1) -> float:
    """Median seconds of ``repeats`` warm calls."""
    return time_calls(fn, warmup, repeats).median_ms / 1000.0
