"""Statistics of a paired ablation: per-condition summaries, paired comparisons, factorial
effects, with family-wise correction, effect sizes and what the run could have detected.
Pure functions on numbers; scipy and statsmodels do the tests.

A design maps each factor to its levels; the first level is ``None``, the reference (off).
Binary factors: ``kd`` (None, "kd"), ``at`` (None, "at"); the overlay is a factor whose
levels are map sources: (None, "ig") by default, or e.g. (None, "ig", "shuffled", "gradcam").
A condition is the frozenset of its non-reference levels: frozenset() is the student alone,
{"kd", "ig"} is KD+IG, {"kd", "shuffled"} is KD with shuffled maps.

Controls: map sources run with KD on only (``KD+shuffled``, ``KD+random``, ...) beside the
factorial design, compared with KD and with KD+IG; they take no part in the effects.

A result table is ``{condition: {seed: value}}``. Paired statistics use the seeds present
in every condition compared.

The primary comparison is declared in advance (``[analysis] primary``, by default KD+IG -
KD on test accuracy). Every other comparison and every effect is secondary; p-values are
given raw and Holm-adjusted within the family of one metric (all its comparisons and
effects, the primary included), separately for the t-test, the Wilcoxon test and the
equivalence test.

Each row gets a verdict from its numbers: *better* or *worse* where the Holm-adjusted t-test
is below alpha; else *equivalent* within +-margin where the Holm-adjusted TOST (two one-sided
t-tests against -margin and +margin) is below alpha, its (1 - 2 alpha) interval inside the
margin; else *inconclusive*, with the n at which each test would reach 80% power at this
run's sd. A large p-value alone never makes a row equivalent.
"""

from __future__ import annotations

import itertools
import math
import statistics
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from scipy import stats as sps
from statsmodels.stats.power import TTestPower
from statsmodels.stats.weightstats import DescrStatsW
from statsmodels.tools.sm_exceptions import ConvergenceWarning

from kdig_study.config import BINARY_FACTORS, KD_METHOD_NAMES, AnalysisConfig, condition_name
from kdig_study.errors import KdigError

Condition = frozenset[str]
Table = dict[Condition, dict[int, float]]
Design = Mapping[str, tuple[str | None, ...]]  # factor -> levels, levels[0] is None

# Where each factor's level stands in a condition's name: KD first, then the overlay, then AT.
_ORDER = ("kd", "overlay", "at")
# Smallest n at which the exact two-sided Wilcoxon signed-rank test can reach p < 0.05
# (n = 5: 2 / 2^5 = 0.0625 at best).
WILCOXON_MIN_N = 6
ALPHA = 0.05
POWER = 0.8
PRIMARY = (frozenset({"kd", "ig"}), frozenset({"kd"}))


def design_of(factors: Sequence[str]) -> dict[str, tuple[str | None, ...]]:
    """The design of binary factor names (``kd``, ``ig``, ``at``); ``ig`` is the overlay
    factor with levels none and ig."""
    out: dict[str, tuple[str | None, ...]] = {}
    for f in factors:
        out["overlay" if f == "ig" else f] = BINARY_FACTORS[f]
    return out


def _factor_order(design: Design) -> list[str]:
    return sorted(design, key=lambda f: _ORDER.index(f) if f in _ORDER else len(_ORDER))


def overlay_sources(design: Design, controls: Sequence[str] = ()) -> list[str]:
    """The map sources a design overlays (its overlay levels but none), then the controls."""
    return [str(x) for x in design.get("overlay", (None,))[1:]] + list(controls)


def conditions(design: Design | Sequence[str], controls: Sequence[str] = (),
               only: Sequence[str] = ()) -> list[Condition]:
    """Every combination of levels, from none (the student) to all factors on, in a stable
    order: by how many factors are on, then by factor and level order; then each control
    source with KD on (with each KD level, where the kd factor has several). ``only``: the
    names of the conditions an ablation runs (--conditions), all where empty."""
    d = design_of(design) if not isinstance(design, Mapping) else design
    factors = _factor_order(d)
    out = []
    for r in range(len(factors) + 1):
        for subset in itertools.combinations(factors, r):
            for levels in itertools.product(*(d[f][1:] for f in subset)):
                out.append(frozenset(str(x) for x in levels))
    kd_levels = [str(k) for k in d.get("kd", (None, "kd"))[1:]]
    out += [c for c in (frozenset({k, src}) for k in kd_levels for src in controls)
            if c not in out]
    return [c for c in out if condition_name(c) in only] if only else out


def named_conditions(design: Design | Sequence[str], controls: Sequence[str] = (),
                     only: Sequence[str] = ()) -> dict[str, Condition]:
    """:func:`conditions` by name, in the same order."""
    return {condition_name(c): c for c in conditions(design, controls, only)}


@dataclass(frozen=True)
class ConditionSummary:
    condition: str
    n: int
    mean: float
    sd: float  # sample standard deviation (n - 1); nan for n < 2
    min: float
    max: float


def summarise(name: str, values: Iterable[float]) -> ConditionSummary:
    v = list(values)
    if not v:
        nan = float("nan")
        return ConditionSummary(name, 0, nan, nan, nan, nan)
    sd = statistics.stdev(v) if len(v) > 1 else float("nan")
    return ConditionSummary(name, len(v), statistics.fmean(v), sd, min(v), max(v))


@dataclass(frozen=True)
class Paired:
    """A per-seed contrast summarised over seeds: a comparison ``a - b`` or an effect."""

    name: str  # "KD+IG - KD", or an effect: "KD", "IG", "KD x IG"
    kind: str  # "comparison" or "effect"
    n: int
    mean: float  # mean of the per-seed values (for a comparison: mean paired difference)
    ci_low: float  # 95% t-interval of the mean
    ci_high: float
    t_p: float  # one-sample t-test of the per-seed values against 0, two-sided
    wilcoxon_p: float  # Wilcoxon signed-rank, two-sided, exact; nan where n < 6 (see note)
    d_z: float  # Cohen's d_z: mean / sd of the per-seed values
    sd: float  # sample sd of the per-seed values (nan for n < 2)
    mde: float  # smallest mean the t-test detects with 80% power at the row's Holm level
    tost_p: float = float("nan")  # two one-sided t-tests against -margin and +margin
    eq_ci_low: float = float("nan")  # (1 - 2 alpha) t-interval: TOST's interval
    eq_ci_high: float = float("nan")
    a: str = ""
    b: str = ""
    primary: bool = False
    t_p_holm: float = float("nan")  # Holm-adjusted within the metric's family
    wilcoxon_p_holm: float = float("nan")
    tost_p_holm: float = float("nan")
    level: float = float("nan")  # the alpha this row's t-test is judged at by Holm's steps
    verdict: str = ""  # better, worse, equivalent, inconclusive (see the module's doc)
    n_equivalence: int | None = None  # n at which TOST has 80% power if the truth is 0
    n_detect: int | None = None  # n at which the t-test detects this mean with 80% power
    wilcoxon_note: str = ""


def _ci(values: Sequence[float], level: float = 0.95) -> tuple[float, float]:
    n = len(values)
    if n < 2:
        return float("nan"), float("nan")
    m, sd = statistics.fmean(values), statistics.stdev(values)
    half = sps.t.ppf(0.5 + level / 2, n - 1) * sd / math.sqrt(n)
    return m - half, m + half


def _t_p(values: Sequence[float]) -> float:
    if len(values) < 2:
        return float("nan")
    if all(d == values[0] for d in values):  # no spread: t undefined
        return float("nan") if values[0] != 0 else 1.0
    return float(sps.ttest_1samp(values, 0.0).pvalue)


# Differences of accuracies are multiples of 1 / (images evaluated), up to float noise
# (1e-17): rounded to 10 decimals, true ties tie again (0.0012000000000000001 == 0.0012)
# whatever the metric's resolution.
_TIE_DECIMALS = 10
# Up to this many non-zero differences the signed-rank test with ties enumerates all 2^n
# sign flips (a permutation test: exact with ties); above, the tie-corrected normal
# approximation.
_EXACT_TIES_N = 16


def _signed_rank_exact(nonzero: Sequence[float]) -> float:
    """Two-sided p of the signed-rank statistic (the sum of the positive differences' ranks,
    midranks for ties) over all 2^n sign flips of the ``nonzero`` differences: Wilcoxon's
    zero method, exact with ties. Not ``sps.wilcoxon(method=PermutationMethod(...))``: it
    flips the zeros too, so its 2^n_nonzero resamples were a random draw from the 2^n flips
    (another p on every call wherever a difference was zero), and it calls its statistic
    once per flip in Python (30x slower than this vectorised one)."""
    x = np.asarray(nonzero, dtype=float)  # [n]
    ranks = sps.rankdata(np.abs(x))  # [n]

    def r_plus(flipped: np.ndarray, axis: int = -1) -> np.ndarray:  # [..., n] -> [...]
        return np.sum(ranks * (flipped > 0), axis=axis)

    return float(sps.permutation_test((x,), r_plus, permutation_type="samples",
                                      vectorized=True, n_resamples=np.inf,
                                      alternative="two-sided").pvalue)


def _wilcoxon_p(values: Sequence[float]) -> tuple[float, str]:
    n = len(values)
    if n < WILCOXON_MIN_N:
        return float("nan"), (f"n/a: n = {n} < {WILCOXON_MIN_N}, where the exact two-sided "
                              f"test cannot reach p < 0.05")
    d = [round(v, _TIE_DECIMALS) for v in values]
    nonzero = [x for x in d if x != 0]
    if not nonzero:
        return 1.0, ""
    ties = len({abs(x) for x in nonzero}) < len(nonzero) or len(nonzero) < n
    try:
        if not ties:
            return float(sps.wilcoxon(d, zero_method="wilcox", method="exact").pvalue), ""
        if len(nonzero) <= _EXACT_TIES_N:
            return _signed_rank_exact(nonzero), "ties or zeros: exact over all sign flips"
        return float(sps.wilcoxon(d, zero_method="wilcox", method="asymptotic").pvalue), \
            "ties or zeros: tie-corrected normal approximation"
    except ValueError as e:  # e.g. every difference zero after ties
        return float("nan"), f"n/a: {e}"


def _tost_p(values: Sequence[float], margin: float) -> float:
    """p of two one-sided t-tests of the mean against -margin and +margin (equivalence
    within the margin where p < alpha); nan where undefined."""
    n = len(values)
    if n < 2 or not math.isfinite(margin) or margin <= 0:
        return float("nan")
    if all(v == values[0] for v in values):
        # no spread (e.g. students that all stayed at chance): the t statistics are
        # undefined, and equivalence is never claimed from a degenerate test
        return float("nan")
    return float(DescrStatsW(list(values)).ttost_mean(-margin, margin)[0])


def n_for_equivalence(sd: float, margin: float, alpha: float, power: float = POWER,
                      n_max: int = 100_000) -> int | None:
    """The smallest n at which TOST at ``alpha`` shows equivalence within +-margin with
    ``power`` when the true mean is 0 and the sd is ``sd``. Then T = mean / se is central
    t(n - 1), and TOST rejects both hypotheses when |T| < delta - t(1 - alpha), delta =
    margin * sqrt(n) / sd: power = 2 F(delta - t(1 - alpha)) - 1, exactly.

    Power reaches ``power`` > 0 only where delta - t(1 - alpha) > 0, and from there it grows
    with n (delta grows, the critical value falls, and F at a positive point grows with the
    degrees of freedom): so the first n is found by doubling and bisection (about 35
    evaluations, where counting up took thousands for a wide sd)."""
    if not (math.isfinite(sd) and sd > 0 and margin > 0):
        return None

    def reaches(n: int) -> bool:
        delta = margin * math.sqrt(n) / sd
        crit = sps.t.ppf(1 - alpha, n - 1)
        return bool(2 * sps.t.cdf(delta - crit, n - 1) - 1 >= power)

    if n_max < 2 or not reaches(n_max):
        return None
    below, at = 1, 2  # reaches(below) is false (n = 1 has no test), reaches(at) unknown
    while not reaches(at):
        below, at = at, min(2 * at, n_max)
    while at - below > 1:
        mid = (below + at) // 2
        below, at = (below, mid) if reaches(mid) else (mid, at)
    return at


def n_for_detection(mean: float, sd: float, alpha: float, power: float = POWER
                    ) -> int | None:
    """The smallest n at which a two-sided paired t-test at ``alpha`` detects a true mean of
    ``mean`` with ``power`` at this sd (statsmodels' power analysis)."""
    if not (math.isfinite(sd) and sd > 0 and math.isfinite(mean) and mean != 0):
        return None
    try:
        with warnings.catch_warnings():  # no root found: said by returning None
            warnings.simplefilter("ignore", ConvergenceWarning)
            n = float(TTestPower().solve_power(effect_size=abs(mean) / sd, nobs=None,
                                               alpha=alpha, power=power,
                                               alternative="two-sided"))
    except (ValueError, RuntimeError):
        return None
    return max(2, math.ceil(n)) if math.isfinite(n) else None


def minimum_detectable(n: int, sd: float, alpha: float = ALPHA, power: float = POWER) -> float:
    """The smallest true mean a two-sided paired t-test of n per-seed values with this sd
    detects with ``power`` (statsmodels' power analysis); nan where undefined."""
    if n < 2 or not math.isfinite(sd):
        return float("nan")
    d = TTestPower().solve_power(effect_size=None, nobs=n, alpha=alpha, power=power,
                                 alternative="two-sided")
    return float(d) * sd


@dataclass(frozen=True)
class Judgement:
    """How rows are judged: the family-wise ``alpha`` and the equivalence ``margin`` (in the
    metric's units: accuracy fractions)."""

    alpha: float = ALPHA
    margin: float = float("nan")  # nan: no equivalence test


def contrast(name: str, kind: str, values: Sequence[float], judge: Judgement = Judgement(),
             **extra: Any) -> Paired:
    n = len(values)
    mean = statistics.fmean(values) if values else float("nan")
    sd = statistics.stdev(values) if n > 1 else float("nan")
    lo, hi = _ci(values)
    eq_lo, eq_hi = _ci(values, 1 - 2 * judge.alpha)
    w_p, note = _wilcoxon_p(values)
    d_z = mean / sd if n > 1 and sd > 0 else float("nan")
    return Paired(name, kind, n, mean, lo, hi, _t_p(values), w_p, d_z, sd,
                  minimum_detectable(n, sd, judge.alpha), tost_p=_tost_p(values, judge.margin),
                  eq_ci_low=eq_lo, eq_ci_high=eq_hi, wilcoxon_note=note, **extra)


def paired(a_name: str, a: dict[int, float], b_name: str, b: dict[int, float],
           primary: bool = False, judge: Judgement = Judgement()) -> Paired:
    seeds = sorted(set(a) & set(b))
    return contrast(f"{a_name} - {b_name}", "comparison", [a[s] - b[s] for s in seeds],
                    judge, a=a_name, b=b_name, primary=primary)


def effects(table: Table, design: Design, judge: Judgement = Judgement(),
            only: Sequence[str] = ()) -> list[Paired]:
    """Factorial effects, per seed, summarised over seeds.

    For a set S of factors, each at one non-reference level L_f: at every setting o of the
    other factors (all their levels), D(o) = sum over on/off assignments a of S of
    prod(+1 on, -1 off) * value(o + a); the effect is the mean of D over o. For one factor
    that is the main effect, mean over the others of (on - off); for two, the interaction,
    the mean difference of differences. With binary factors only this is the classical
    2^k factorial contrast; a multi-level factor gives each level its effect against none.
    An ablation that runs only some conditions (``only``) has no effects unless it runs
    every cell of the factorial.
    """
    conds = conditions(design)
    if only and any(condition_name(c) not in only for c in conds):
        return []
    present = [set(table.get(c, {})) for c in conds]
    seeds = sorted(set.intersection(*present)) if present else []
    factors = _factor_order(design)
    out = []
    for r in range(1, len(factors) + 1):
        for subset in itertools.combinations(factors, r):
            others = [f for f in factors if f not in subset]
            for on in itertools.product(*(design[f][1:] for f in subset)):
                per_seed = []
                for s in seeds:
                    total, count = 0.0, 0
                    for o in itertools.product(*(design[f] for f in others)):
                        base = {x for x in o if x is not None}
                        for mask in itertools.product((0, 1), repeat=r):
                            cond = frozenset(base | {str(lv) for lv, m
                                                     in zip(on, mask, strict=True) if m})
                            sign = math.prod(1 if m else -1 for m in mask)
                            total += sign * table[cond][s]
                        count += 1
                    per_seed.append(total / count)
                name = " x ".join(condition_name([str(lv)]) for lv in on)
                out.append(contrast(name, "effect", per_seed, judge))
    return out


def comparisons(table: Table, design: Design, controls: Sequence[str] = (),
                judge: Judgement = Judgement(),
                primary: tuple[Condition, Condition] | None = PRIMARY,
                only: Sequence[str] = ()) -> list[Paired]:
    """Each condition against the student; the primary comparison (by default KD+IG - KD);
    where the kd factor has several methods, each method against the first one and IG with
    each method against that method alone; and for every other overlay level and control:
    against no overlay and against IG, at each setting of the other factors. ``only``:
    the conditions run (--conditions); a pair needs both."""
    conds = conditions(design, controls, only)
    student = frozenset()
    pairs: list[tuple[Condition, Condition]] = \
        [(c, student) for c in conds if c != student] if student in conds else []
    primary_pair = primary if primary is not None and all(c in conds for c in primary) \
        else None
    if primary_pair is not None and primary_pair not in pairs:
        pairs.append(primary_pair)
    methods = [str(k) for k in design.get("kd", (None,))[1:]]
    if len(methods) > 1:
        first = methods[0]
        for m in methods[1:]:  # which method distils best, with no overlay
            if frozenset({m}) in conds and frozenset({first}) in conds:
                pairs.append((frozenset({m}), frozenset({first})))
        for m in methods:  # the overlay's effect with each method
            pair = (frozenset({m, "ig"}), frozenset({m}))
            if all(c in conds for c in pair) and pair not in pairs:
                pairs.append(pair)
    for level in overlay_sources(design, controls):
        if level == "ig":
            continue
        for c in conds:
            if level not in c:
                continue
            rest = c - {level}
            for ref in (rest, rest | {"ig"}):
                if ref in conds and (c, ref) not in pairs:
                    pairs.append((c, ref))
    return [paired(condition_name(a), table.get(a, {}), condition_name(b), table.get(b, {}),
                   primary=(a, b) == primary_pair, judge=judge) for a, b in pairs]


def _holm(ps: list[float]) -> list[float]:
    """Holm-adjusted p-values; nan stays nan and is not counted.

    By hand rather than statsmodels' ``multipletests(method="holm")``, whose Holm branch runs
    a full ``gc.collect()`` on every call (about 0.7 s in a process holding torch, six calls
    per ablation analysis); tests/test_stats.py checks this against statsmodels. Step-down:
    the i-th smallest of m p-values is multiplied by m - i (i from 0), made monotone by a
    running maximum, and capped at 1."""
    idx = sorted((i for i, p in enumerate(ps) if math.isfinite(p)), key=lambda i: ps[i])
    out = [float("nan")] * len(ps)
    running = 0.0
    for rank, i in enumerate(idx):
        running = max(running, min(1.0, (len(idx) - rank) * ps[i]))
        out[i] = running
    return out


def primary_pair(analysis: AnalysisConfig, design: Design, controls: tuple[str, ...] = (),
                 only: Sequence[str] = ()) -> tuple[Condition, Condition] | None:
    """The declared primary comparison ("A - B") as two of the ablation's conditions. The
    default (KD+IG - KD) is simply absent from an ablation without those conditions; one
    declared in the study file or with --set must be among them (one line otherwise)."""
    names = named_conditions(design, controls, only)
    parts = [x.strip() for x in analysis.primary.split(" - ")]
    if len(parts) == 2 and all(x in names for x in parts):
        return names[parts[0]], names[parts[1]]
    if analysis.primary == AnalysisConfig().primary:
        return None
    raise KdigError(f"analysis.primary = {analysis.primary!r}: give 'A - B' with A and B "
                    f"among this ablation's conditions: {', '.join(names)}")


def design_from_levels(levels: Mapping[str, Sequence[str]]) -> dict[str, tuple[str | None, ...]]:
    """A design from the levels an ablation records ("none" first): {"kd": ["none", "kd"]}
    -> {"kd": (None, "kd")}."""
    return {f: tuple(None if lv == "none" else lv for lv in v) for f, v in levels.items()}


def holm_levels(ps: list[float], alpha: float) -> list[float]:
    """The level each p-value is compared with in Holm's step-down procedure: alpha / m for
    the smallest of m finite p-values, alpha / (m - 1) for the next, ...; alpha / m where p
    is nan."""
    idx = sorted((i for i, p in enumerate(ps) if math.isfinite(p)), key=lambda i: ps[i])
    m = max(1, len(idx))
    out = [alpha / m] * len(ps)
    for rank, i in enumerate(idx):
        out[i] = alpha / (m - rank)
    return out


def verdict(row: Mapping[str, Any], alpha: float, margin: float) -> str:
    """A row's verdict from its Holm-adjusted p-values (see the module's doc)."""
    within = f"within +-{100 * margin:.2f}"
    if row["t_p_holm"] < alpha:  # a difference, and, where shown, a negligible one
        return ("better" if row["mean"] > 0 else "worse") + \
            (f", {within}" if row["tost_p_holm"] < alpha else "")
    if row["tost_p_holm"] < alpha:
        return f"equivalent {within}"
    return "inconclusive"


def verdict_text(row: Mapping[str, Any]) -> str:
    """A row's verdict, an inconclusive one with the replicates that would decide it."""
    if row["verdict"] != "inconclusive":
        return row["verdict"]
    need = [f"{what} n={n}" for what, n in (("equivalence", row.get("n_equivalence")),
                                            ("difference", row.get("n_detect")))
            if n is not None]
    return "inconclusive" + (f" ({', '.join(need)})" if need else "")


def analyse(table: Table, design: Design | Sequence[str], controls: Sequence[str] = (),
            judge: Judgement = Judgement(),
            primary: tuple[Condition, Condition] | None = PRIMARY,
            only: Sequence[str] = ()) -> dict[str, Any]:
    """Summaries, comparisons and effects of one metric, with Holm-adjusted p-values over
    that family (comparisons and effects together), equivalence tests within
    ``judge.margin``, each row's Holm level, MDE at that level, and verdict."""
    d = design_of(design) if not isinstance(design, Mapping) else design
    conds = conditions(d, controls, only)
    summaries = [summarise(condition_name(c), table.get(c, {}).values()) for c in conds]
    family = comparisons(table, d, controls, judge, primary, only) + \
        effects(table, d, judge, only)
    t_holm = _holm([x.t_p for x in family])
    w_holm = _holm([x.wilcoxon_p for x in family])
    e_holm = _holm([x.tost_p for x in family])
    levels = holm_levels([x.t_p for x in family], judge.alpha)
    rows = []
    for x, t, w, e, level in zip(family, t_holm, w_holm, e_holm, levels, strict=True):
        row = asdict(x) | {"t_p_holm": t, "wilcoxon_p_holm": w, "tost_p_holm": e,
                           "level": level, "mde": minimum_detectable(x.n, x.sd, level),
                           "n_equivalence": n_for_equivalence(x.sd, judge.margin, level)
                           if math.isfinite(judge.margin) else None,
                           "n_detect": n_for_detection(x.mean, x.sd, level)}
        row["verdict"] = verdict(row, judge.alpha, judge.margin)
        rows.append(row)
    return {"summaries": [asdict(s) for s in summaries],
            "comparisons": [r for r in rows if r["kind"] == "comparison"],
            "effects": [r for r in rows if r["kind"] == "effect"],
            "correction": "Holm, within this metric's comparisons and effects, separately "
                          "for the t-test, the Wilcoxon test and the equivalence test (TOST)",
            "alpha": judge.alpha, "equivalence_margin": judge.margin,
            "primary": next((r["name"] for r in rows if r["primary"]), None)}


def carried_by(aggregate: Mapping[str, Any], families: Mapping[str, Mapping[str, Any]],
               threshold: float = 0.5) -> dict[str, Any] | None:
    """Where one family carries most of a difference in the aggregate: for a row judged
    better or worse on the mean over K families, each family's share of the aggregate mean is
    (its own mean difference / K) / the aggregate's; the largest, where above ``threshold``,
    with the mean over the other families (what the difference is without that one).
    ``families``: family -> the same row in that family's analysis."""
    total = aggregate["mean"]
    if not aggregate["verdict"].startswith(("better", "worse")) or not families or \
            not math.isfinite(total) or total == 0:
        return None
    k = len(families)
    shares = {f: r["mean"] / k / total for f, r in families.items() if math.isfinite(r["mean"])}
    if not shares:
        return None
    top = max(shares, key=lambda f: shares[f])
    if shares[top] <= threshold:
        return None
    rest = [r["mean"] for f, r in families.items() if f != top and math.isfinite(r["mean"])]
    return {"family": top, "share": shares[top], "family_mean": families[top]["mean"],
            "rest_mean": statistics.fmean(rest) if rest else float("nan")}


def by_family(aggregate: Mapping[str, Any], families: Mapping[str, Mapping[str, Any]]
              ) -> dict[str, Any]:
    """Each comparison of the aggregate robust analysis beside its per-family rows, and the
    family that carries it where one does (:func:`carried_by`)."""
    rows = []
    for row in aggregate["comparisons"]:
        per = {f: next(r for r in a["comparisons"] if r["name"] == row["name"])
               for f, a in families.items()}
        rows.append({"name": row["name"], "mean": row["mean"], "verdict": row["verdict"],
                     "families": {f: {"mean": r["mean"], "verdict": r["verdict"],
                                      "t_p_holm": r["t_p_holm"]} for f, r in per.items()},
                     "carried_by": carried_by(row, per)})
    return {"comparisons": rows}


_KD_NAMES = frozenset(KD_METHOD_NAMES.values())  # as they appear in condition names


def plain_words(analysis: Mapping[str, Any], split: Mapping[str, Any] | None = None
                ) -> list[str]:
    """What one metric's analysis says, in sentences made only from its verdicts and
    numbers (points): the primary comparison; every comparison of IG with another map source
    (does the map's content matter?); every comparison of two KD methods (which one distils
    best here?) and of a KD method with and without IG (does IG add to it?); and, from
    ``split`` (:func:`by_family`), each difference one corruption family carries. Nothing
    here is written by hand over them."""
    def pt(x: float) -> str:
        return f"{100 * x:+.2f}" if math.isfinite(x) else "n/a"

    def difference(r: Mapping[str, Any]) -> str:
        return (f"{r['name']}: {pt(r['mean'])} points, 95% CI [{pt(r['ci_low'])}, "
                f"{pt(r['ci_high'])}] (Holm p {r['t_p_holm']:.3g}): {verdict_text(r)}.")

    lines = []
    rows = analysis["comparisons"]
    for r in rows:
        if r["primary"]:
            lines.append(f"{r['name']} (primary): {pt(r['mean'])} points, 95% CI "
                         f"[{pt(r['ci_low'])}, {pt(r['ci_high'])}]: {verdict_text(r)}.")
    for r in (r for r in rows if not r["primary"]):
        # the parts of the two conditions ("DKD+shuffled": DKD, shuffled) that differ say
        # what the row compares
        a, b = (set(r.get(k, "").split("+")) for k in ("a", "b"))
        differ = a ^ b
        if differ == {"IG"} and a & b & _KD_NAMES:  # does IG add to this KD method?
            lines.append(difference(r))
        elif len(differ) == 2 and differ <= _KD_NAMES:  # which KD method distils best?
            lines.append(difference(r))
        elif len(differ) == 2 and "IG" in differ and not differ & (_KD_NAMES | {"KD", "AT"}):
            # IG against another map source: does the map's content matter?
            lines.append(f"{r['name']}: {pt(r['mean'])} points, 90% CI [{pt(r['eq_ci_low'])}, "
                         f"{pt(r['eq_ci_high'])}] against +-{100 * analysis['equivalence_margin']:.2f}"
                         f" (TOST Holm p {r['tost_p_holm']:.3g}): {verdict_text(r)}.")
    for r in (split or {}).get("comparisons", []):
        c = r.get("carried_by")
        if c is not None:
            lines.append(f"{r['name']} under corruptions: {pt(r['mean'])} points ({r['verdict']}),"
                         f" {c['share']:.0%} of it from {c['family']} ({pt(c['family_mean'])} "
                         f"there; {pt(c['rest_mean'])} on average under the other families).")
    return lines


def random_teacher(diffs: Mapping[int, Sequence[float]], alpha: float = ALPHA
                   ) -> dict[str, Any]:
    """A paired difference pooled over teachers with a random teacher effect: d[t, r] =
    mu + u_t + e_tr, u_t ~ N(0, tau^2), fitted by REML (statsmodels MixedLM), so that the
    claim about mu is not conditional on one teacher. ``diffs``: teacher -> its
    replicates' differences. The interval and p are Wald (normal) ones: with few teachers
    tau rests on few values and they are optimistic; the per-teacher rows beside it show
    the spread. Balanced, mu's estimate is the mean of the teacher means and its SE theirs,
    so the t interval on the K teacher means (K - 1 degrees of freedom: the conservative
    reading, very wide for K = 2) is given too. Fit warnings (e.g. tau on the boundary, 0)
    are returned, not hidden."""
    import warnings

    from statsmodels.regression.mixed_linear_model import MixedLM

    groups = [t for t, v in diffs.items() for _ in v]
    y = np.array([x for v in diffs.values() for x in v], dtype=float)
    out: dict[str, Any] = {"teachers": len(diffs), "n": int(y.size), "model":
                           "d ~ 1 + (1 | teacher), REML (statsmodels MixedLM); Wald interval"}
    if len(diffs) < 2 or y.size < 3 or not np.isfinite(y).all():
        return out | {"mean": float("nan"), "note": "needs 2 or more teachers"}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit = MixedLM(y, np.ones((y.size, 1)), groups=np.array(groups)).fit(reml=True)
    mean, se = float(fit.fe_params[0]), float(fit.bse_fe[0])
    z = float(sps.norm.ppf(1 - alpha / 2))
    means = np.array([np.mean(v) for v in diffs.values()])
    half = float(sps.t.ppf(1 - alpha / 2, len(means) - 1) * means.std(ddof=1)
                 / np.sqrt(len(means)))
    return out | {"mean": mean, "se": se, "ci_low": mean - z * se, "ci_high": mean + z * se,
                  "p": float(2 * sps.norm.sf(abs(mean / se))) if se > 0 else float("nan"),
                  "teacher_sd": float(np.sqrt(max(0.0, float(np.asarray(fit.cov_re)[0, 0])))),
                  "residual_sd": float(np.sqrt(fit.scale)),
                  "teacher_means": {str(t): float(np.mean(v)) for t, v in diffs.items()},
                  "means_t_ci": [float(means.mean()) - half, float(means.mean()) + half],
                  "warnings": sorted({str(w.message) for w in caught})}
