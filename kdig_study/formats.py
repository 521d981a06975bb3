"""How numbers read in what the commands print and the report shows: one formatter per kind
of number, so a parameter, a p-value or a latency looks the same everywhere."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any


def missing(x: Any) -> bool:
    """None, or a float that is not finite (NaN stands for "not computed")."""
    return x is None or (isinstance(x, float) and not math.isfinite(x))


def param(value: Any, digits: int = 4) -> str:
    """A hyperparameter's value: floats to ``digits`` significant digits (4; a trial's
    progress line uses 3), the rest as they are."""
    return f"{value:.{digits}g}" if isinstance(value, float) else str(value)


def params(values: Mapping[str, Any], digits: int = 4) -> str:
    """``temperature=4.5, alpha=0.3, source=ig``."""
    return ", ".join(f"{k}={param(v, digits)}" for k, v in values.items())


def points(x: float | None, sign: bool = False) -> str:
    """A fraction as percentage points with 2 decimals ("74.31", "+0.22"); "n/a" if missing."""
    if missing(x):
        return "n/a"
    assert x is not None
    return f"{100 * x:+.2f}" if sign else f"{100 * x:.2f}"


def number(x: float | None, sign: bool = False) -> str:
    """A plain number with 2 decimals (an effect size); "n/a" if missing."""
    if missing(x):
        return "n/a"
    assert x is not None
    return f"{x:+.2f}" if sign else f"{x:.2f}"


def p_value(x: float | None) -> str:
    """A p-value to 3 significant digits; "n/a" if missing."""
    return "n/a" if missing(x) else f"{x:.3g}"


def latency(t: Mapping[str, Any] | None, digits: int = 2) -> str:
    """A latency summary ``{"median_ms": .., "p90_ms": ..}`` as "0.52 / 0.61 ms"."""
    if not t:
        return "n/a"
    return f"{t['median_ms']:.{digits}f} / {t['p90_ms']:.{digits}f} ms"
