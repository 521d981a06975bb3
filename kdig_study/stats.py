"""Statistics of a paired ablation: per-condition summaries, paired comparisons, factorial
effects. Pure functions on numbers; scipy does the tests.

A result table is ``{condition: {seed: value}}``; a condition is a frozenset of the factors
switched on (frozenset() is the student alone). Paired statistics use the seeds present in
every condition compared.
"""

from __future__ import annotations

import itertools
import math
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from scipy import stats as sps

Condition = frozenset[str]
Table = dict[Condition, dict[int, float]]


def condition_name(cond: Condition, order: Sequence[str] = ("kd", "ig", "at")) -> str:
    return "+".join(f.upper() for f in order if f in cond) or "student"


def conditions(factors: Sequence[str]) -> list[Condition]:
    """Every on/off combination, from none (the student) to all, in a stable order."""
    return [frozenset(c) for r in range(len(factors) + 1)
            for c in itertools.combinations(factors, r)]


@dataclass(frozen=True)
class Summary:
    condition: str
    n: int
    mean: float
    sd: float  # sample standard deviation (n - 1); nan for n < 2
    min: float
    max: float


def summarise(name: str, values: Iterable[float]) -> Summary:
    v = list(values)
    if not v:
        nan = float("nan")
        return Summary(name, 0, nan, nan, nan, nan)
    sd = statistics.stdev(v) if len(v) > 1 else float("nan")
    return Summary(name, len(v), statistics.fmean(v), sd, min(v), max(v))


@dataclass(frozen=True)
class Paired:
    """``a`` against ``b`` over the seeds both have: differences a - b."""

    a: str
    b: str
    n: int
    mean_diff: float
    ci_low: float  # 95% t-interval of the mean difference
    ci_high: float
    t_p: float  # paired t-test, two-sided
    wilcoxon_p: float  # Wilcoxon signed-rank, two-sided (exact for small n); nan if undefined


def _ci(diffs: Sequence[float], level: float = 0.95) -> tuple[float, float]:
    n = len(diffs)
    if n < 2:
        return float("nan"), float("nan")
    m, sd = statistics.fmean(diffs), statistics.stdev(diffs)
    half = sps.t.ppf(0.5 + level / 2, n - 1) * sd / math.sqrt(n)
    return m - half, m + half


def _tests(diffs: Sequence[float]) -> tuple[float, float]:
    """(paired t p-value, Wilcoxon p-value) for differences against zero."""
    n = len(diffs)
    if n < 2:
        return float("nan"), float("nan")
    if all(d == diffs[0] for d in diffs):  # no spread: t undefined
        t_p = float("nan") if diffs[0] != 0 else 1.0
    else:
        t_p = float(sps.ttest_1samp(diffs, 0.0).pvalue)
    if all(d == 0 for d in diffs):
        w_p = 1.0
    else:
        try:
            w_p = float(sps.wilcoxon(diffs, zero_method="wilcox").pvalue)
        except ValueError:  # e.g. every difference zero after ties
            w_p = float("nan")
    return t_p, w_p


def paired(a_name: str, a: dict[int, float], b_name: str, b: dict[int, float]) -> Paired:
    seeds = sorted(set(a) & set(b))
    diffs = [a[s] - b[s] for s in seeds]
    mean = statistics.fmean(diffs) if diffs else float("nan")
    lo, hi = _ci(diffs)
    t_p, w_p = _tests(diffs)
    return Paired(a_name, b_name, len(seeds), mean, lo, hi, t_p, w_p)


@dataclass(frozen=True)
class Effect:
    """A factorial effect, estimated per seed and summarised over seeds.

    Main effect of f: the mean over the other factors' settings of (f on - f off).
    Interaction of f and g: the mean of the difference of differences
    (fg - f - g + none for two factors)."""

    effect: str
    n: int
    mean: float
    ci_low: float
    ci_high: float
    t_p: float
    wilcoxon_p: float


def effects(table: Table, factors: Sequence[str]) -> list[Effect]:
    conds = conditions(factors)
    seeds = sorted(set.intersection(*(set(table.get(c, {})) for c in conds))) if conds else []
    out = []
    k = len(factors)
    for r in range(1, k + 1):
        for subset in itertools.combinations(factors, r):
            per_seed = []
            for s in seeds:
                total = 0.0
                for c in conds:
                    sign = math.prod(1 if f in c else -1 for f in subset)
                    total += sign * table[c][s]
                per_seed.append(total / 2 ** (k - r))
            mean = statistics.fmean(per_seed) if per_seed else float("nan")
            lo, hi = _ci(per_seed)
            t_p, w_p = _tests(per_seed)
            name = " x ".join(f.upper() for f in subset)
            out.append(Effect(name, len(per_seed), mean, lo, hi, t_p, w_p))
    return out


def analyse(table: Table, factors: Sequence[str]) -> dict[str, Any]:
    """Summaries, comparisons (each condition vs the student; KD+IG vs KD), effects."""
    conds = conditions(factors)
    names = {c: condition_name(c) for c in conds}
    base = frozenset()
    summaries = [summarise(names[c], table.get(c, {}).values()) for c in conds]
    comparisons = [paired(names[c], table.get(c, {}), names[base], table.get(base, {}))
                   for c in conds if c != base]
    kd, kdig = frozenset({"kd"}), frozenset({"kd", "ig"})
    if kd in names and kdig in names:
        comparisons.append(paired(names[kdig], table.get(kdig, {}), names[kd],
                                  table.get(kd, {})))
    return {"summaries": [asdict(s) for s in summaries],
            "comparisons": [asdict(p) for p in comparisons],
            "effects": [asdict(e) for e in effects(table, factors)]}
