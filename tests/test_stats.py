"""Statistics against values computed by hand on fixed numbers."""

from __future__ import annotations

import math

import pytest
from scipy import stats as sps

from kdig_study.stats import (
    Judgement,
    analyse,
    condition_name,
    conditions,
    design_of,
    effects,
    minimum_detectable,
    paired,
    plain_words,
    summarise,
)

S, KD, IG, KDIG = frozenset(), frozenset({"kd"}), frozenset({"ig"}), frozenset({"kd", "ig"})
TABLE = {
    S: {0: 0.70, 1: 0.72, 2: 0.71},
    KD: {0: 0.74, 1: 0.77, 2: 0.75},
    IG: {0: 0.71, 1: 0.72, 2: 0.73},
    KDIG: {0: 0.76, 1: 0.78, 2: 0.79},
}


def test_summary_by_hand() -> None:
    s = summarise("KD", TABLE[KD].values())
    assert s.n == 3 and s.mean == pytest.approx(2.26 / 3)
    # deviations -0.04/3, +0.05/3, -0.01/3: sum of squares 42e-4/9, over n - 1 = 2
    assert s.sd == pytest.approx(math.sqrt(42e-4 / 18))
    assert (s.min, s.max) == (0.74, 0.77)


def test_paired_t_ci_and_wilcoxon_by_hand() -> None:
    # KD - student per seed: 0.04, 0.05, 0.04
    p = paired("KD", TABLE[KD], "student", TABLE[S])
    d = [0.04, 0.05, 0.04]
    mean = sum(d) / 3
    sd = math.sqrt(sum((x - mean) ** 2 for x in d) / 2)
    t = mean / (sd / math.sqrt(3))
    # Student's t with 2 degrees of freedom: F(t) = 1/2 + t / (2 sqrt(2 + t^2)), so the
    # two-sided p = 1 - |t| / sqrt(2 + t^2); the 97.5% quantile is 4.302653
    assert p.n == 3 and p.mean == pytest.approx(mean)
    assert p.t_p == pytest.approx(1 - t / math.sqrt(2 + t * t), rel=1e-6)
    half = 4.302653 * sd / math.sqrt(3)
    assert (p.ci_low, p.ci_high) == (pytest.approx(mean - half, rel=1e-5),
                                     pytest.approx(mean + half, rel=1e-5))
    # Wilcoxon, n = 3: the exact two-sided p is at least 2 / 2^3 = 0.25, never below 0.05:
    # reported as n/a, with the reason
    assert math.isnan(p.wilcoxon_p) and "n = 3 < 6" in p.wilcoxon_note
    assert p.d_z == pytest.approx(mean / sd)


def test_wilcoxon_from_six_replicates_by_hand() -> None:
    a = {s: 1.0 + 0.1 * s for s in range(6)}
    p = paired("a", a, "b", {s: 0.0 for s in range(6)})
    # all six differences positive: W- = 0; exact two-sided p = 2 / 2^6
    assert p.wilcoxon_p == pytest.approx(2 / 64) and p.wilcoxon_note == ""
    q = paired("a", {s: 1.0 for s in range(5)}, "b", {s: 0.0 for s in range(5)})
    assert math.isnan(q.wilcoxon_p)


def test_minimum_detectable_difference_has_80_percent_power() -> None:
    n, sd = 10, 0.004
    mde = minimum_detectable(n, sd)
    # power of the two-sided paired t-test at that true mean, from the noncentral t
    crit = sps.t.ppf(0.975, n - 1)
    nc = mde / (sd / math.sqrt(n))
    power = sps.nct.sf(crit, n - 1, nc) + sps.nct.cdf(-crit, n - 1, nc)
    assert power == pytest.approx(0.8, abs=1e-3)
    assert mde == pytest.approx(0.996 * sd, rel=1e-3)
    assert minimum_detectable(5, sd) > mde  # fewer replicates: only larger effects
    assert math.isnan(minimum_detectable(1, sd))


def test_pairing_uses_only_shared_seeds() -> None:
    p = paired("a", {0: 1.0, 1: 2.0, 5: 9.0}, "b", {0: 0.5, 1: 1.0, 7: 0.0})
    assert p.n == 2 and p.mean == pytest.approx(0.75)


def test_factorial_effects_by_hand() -> None:
    eff = {e.name: e for e in effects(TABLE, design_of(["kd", "ig"]))}
    per_seed_kd = [((TABLE[KDIG][s] - TABLE[IG][s]) + (TABLE[KD][s] - TABLE[S][s])) / 2
                   for s in range(3)]
    per_seed_ig = [((TABLE[KDIG][s] - TABLE[KD][s]) + (TABLE[IG][s] - TABLE[S][s])) / 2
                   for s in range(3)]
    per_seed_x = [(TABLE[KDIG][s] - TABLE[KD][s]) - (TABLE[IG][s] - TABLE[S][s])
                  for s in range(3)]
    assert eff["KD"].mean == pytest.approx(sum(per_seed_kd) / 3)
    assert eff["IG"].mean == pytest.approx(sum(per_seed_ig) / 3)
    assert eff["KD x IG"].mean == pytest.approx(sum(per_seed_x) / 3)
    assert eff["KD"].mean == pytest.approx(0.05)  # per seed 0.045, 0.055, 0.05


def test_analyse_covers_every_condition_and_kdig_vs_kd() -> None:
    a = analyse(TABLE, ["kd", "ig"])
    assert [s["condition"] for s in a["summaries"]] == ["student", "KD", "IG", "KD+IG"]
    pairs = [(c["a"], c["b"]) for c in a["comparisons"]]
    assert pairs == [("KD", "student"), ("IG", "student"), ("KD+IG", "student"),
                     ("KD+IG", "KD")]
    assert [c["primary"] for c in a["comparisons"]] == [False, False, False, True]
    assert a["primary"] == "KD+IG - KD"
    assert len(conditions(["kd", "ig", "at"])) == 8
    assert len(analyse({}, ["kd", "ig", "at"])["effects"]) == 7


def test_holm_within_the_metric_family_by_hand() -> None:
    a = analyse(TABLE, ["kd", "ig"])
    rows = a["comparisons"] + a["effects"]
    raw = [r["t_p"] for r in rows]
    m = len(raw)
    order = sorted(range(m), key=lambda i: raw[i])
    expected, running = [0.0] * m, 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * raw[i]))
        expected[i] = running
    assert [r["t_p_holm"] for r in rows] == pytest.approx(expected)
    assert all(r["t_p_holm"] >= r["t_p"] for r in rows)
    # n = 3: no Wilcoxon p, so nothing to adjust
    assert all(math.isnan(r["wilcoxon_p_holm"]) for r in rows)


def test_holm_agrees_with_statsmodels_on_ties_nans_and_caps(monkeypatch: pytest.MonkeyPatch
                                                            ) -> None:
    """stats._holm is written by hand (statsmodels' Holm runs gc.collect() on every call):
    it must give statsmodels' adjusted p-values, nan left out of the family."""
    import gc
    import random

    monkeypatch.setattr(gc, "collect", lambda *a: 0)  # the reference's cost, not its result

    from statsmodels.stats.multitest import multipletests

    from kdig_study.stats import _holm

    rng = random.Random(0)
    cases = [[0.01, 0.04, 0.03, 0.005], [0.2, 0.2, 0.2], [0.5, 0.9, 0.01], [0.03]]
    cases += [[rng.choice([rng.random(), rng.random() / 50, 0.02]) for _ in range(rng.randint(2, 12))]
              for _ in range(30)]
    for ps in cases:
        expected = multipletests(ps, method="holm")[1]
        assert _holm(ps) == pytest.approx(list(expected), abs=1e-15), ps
    ps = [0.01, float("nan"), 0.04, float("nan"), 0.02]
    got = _holm(ps)
    assert math.isnan(got[1]) and math.isnan(got[3])
    assert [got[0], got[2], got[4]] == pytest.approx(list(multipletests([0.01, 0.04, 0.02],
                                                                       method="holm")[1]))
    assert _holm([]) == [] and all(math.isnan(p) for p in _holm([float("nan")] * 2))


def test_multi_level_overlay_factor() -> None:
    design = {"kd": (None, "kd"), "overlay": (None, "ig", "shuffled")}
    conds = conditions(design)
    assert [condition_name(c) for c in conds] == \
        ["student", "KD", "IG", "shuffled", "KD+IG", "KD+shuffled"]
    sh, kdsh = frozenset({"shuffled"}), frozenset({"kd", "shuffled"})
    table = dict(TABLE) | {sh: {0: 0.70, 1: 0.71, 2: 0.72}, kdsh: {0: 0.75, 1: 0.76, 2: 0.74}}
    a = analyse(table, design)
    pairs = [(c["a"], c["b"]) for c in a["comparisons"]]
    for pair in [("KD+IG", "KD"), ("shuffled", "student"), ("shuffled", "IG"),
                 ("KD+shuffled", "KD"), ("KD+shuffled", "KD+IG"), ("KD+shuffled", "student")]:
        assert pair in pairs, pair
    assert len(pairs) == len(set(pairs))
    eff = {e["name"]: e for e in a["effects"]}
    assert set(eff) == {"KD", "IG", "shuffled", "KD x IG", "KD x shuffled"}
    # KD's main effect: the mean over the three overlay levels of (with KD - without)
    per_seed = [sum(table[c | {"kd"}][s] - table[c][s] for c in (S, IG, sh)) / 3
                for s in range(3)]
    assert eff["KD"]["mean"] == pytest.approx(sum(per_seed) / 3)
    # shuffled against none, averaged over KD off and on
    per_seed = [((table[sh][s] - table[S][s]) + (table[kdsh][s] - table[KD][s])) / 2
                for s in range(3)]
    assert eff["shuffled"]["mean"] == pytest.approx(sum(per_seed) / 3)
    x = [(table[kdsh][s] - table[sh][s]) - (table[KD][s] - table[S][s]) for s in range(3)]
    assert eff["KD x shuffled"]["mean"] == pytest.approx(sum(x) / 3)


def test_controls_beside_the_factorial_design() -> None:
    design = design_of(["kd", "ig"])
    conds = conditions(design, ("shuffled", "random"))
    assert [condition_name(c) for c in conds] == \
        ["student", "KD", "IG", "KD+IG", "KD+shuffled", "KD+random"]
    ksh, krnd = frozenset({"kd", "shuffled"}), frozenset({"kd", "random"})
    table = dict(TABLE) | {ksh: {0: 0.75, 1: 0.76, 2: 0.74}, krnd: {0: 0.73, 1: 0.79, 2: 0.75}}
    a = analyse(table, design, ("shuffled", "random"))
    cmp = {c["name"]: c for c in a["comparisons"]}
    assert set(cmp) == {"KD - student", "IG - student", "KD+IG - student", "KD+shuffled - student",
                        "KD+random - student", "KD+IG - KD", "KD+shuffled - KD",
                        "KD+shuffled - KD+IG", "KD+random - KD", "KD+random - KD+IG"}
    d = [table[ksh][s] - table[KDIG][s] for s in range(3)]
    assert cmp["KD+shuffled - KD+IG"]["mean"] == pytest.approx(sum(d) / 3)
    # effects as without the controls; the controls widen the Holm family
    plain = analyse(TABLE, design)
    assert [e["mean"] for e in a["effects"]] == pytest.approx([e["mean"] for e in plain["effects"]])
    p_plain = {c["name"]: c["t_p_holm"] for c in plain["comparisons"]}
    assert cmp["KD+IG - KD"]["t_p"] == pytest.approx(
        next(c["t_p"] for c in plain["comparisons"] if c["name"] == "KD+IG - KD"))
    assert cmp["KD+IG - KD"]["t_p_holm"] >= p_plain["KD+IG - KD"]


def test_plain_words_compare_kd_methods_and_ig_with_its_controls_under_any_kd() -> None:
    """The plain words answer the KD-methods study (each method against the reference one)
    and, under a KD method, whether IG adds to it and whether the map's content matters
    (IG against its control)."""
    design = {"kd": (None, "hinton", "dkd"), "overlay": (None, "ig")}
    rng = [0.0, 0.01, -0.01, 0.02, 0.0, -0.02, 0.01, -0.01]  # mean 0
    h, d = frozenset({"hinton"}), frozenset({"dkd"})
    hig, dig, dsh = h | {"ig"}, d | {"ig"}, d | {"shuffled"}
    table = {h: {r: 0.70 + x for r, x in enumerate(rng)},
             d: {r: 0.72 + x / 2 for r, x in enumerate(rng)},
             hig: {r: 0.70 + x / 3 for r, x in enumerate(rng)},
             dig: {r: 0.71 + x for r, x in enumerate(rng)},
             dsh: {r: 0.71 + x / 4 for r, x in enumerate(rng)}}
    a = analyse(table, design, ("shuffled",), Judgement(margin=0.004), None,
                ("Hinton", "DKD", "Hinton+IG", "DKD+IG", "DKD+shuffled"))
    words = plain_words(a | {"equivalence_margin": 0.004})
    rows = {r["name"]: r for r in a["comparisons"]}
    assert rows["DKD - Hinton"]["verdict"] == "better"
    assert f"DKD - Hinton: +2.00 points, 95% CI [{100 * rows['DKD - Hinton']['ci_low']:+.2f}" \
        in words[0] and words[0].endswith(": better.")
    # IG's effect under each method: -1.00 (DKD), +0.00 (Hinton)
    assert [w.split(" points")[0] for w in words[1:3]] == \
        ["Hinton+IG - Hinton: +0.00", "DKD+IG - DKD: -1.00"]
    assert words[3].startswith("DKD+shuffled - DKD+IG: +0.00 points, 90% CI [")
    assert words[3].endswith("against +-0.40 (TOST Holm p "
                             f"{rows['DKD+shuffled - DKD+IG']['tost_p_holm']:.3g}): "
                             "inconclusive (equivalence n=54).")
    # a control against no overlay is not a question the words answer
    assert len(words) == 4 and "DKD+shuffled - DKD:" not in " ".join(words)


def test_degenerate_inputs_do_not_crash() -> None:
    one = paired("a", {0: 1.0}, "b", {0: 0.0})
    assert one.n == 1 and math.isnan(one.ci_low) and math.isnan(one.t_p)
    same = paired("a", {0: 1.0, 1: 1.0}, "b", {0: 1.0, 1: 1.0})
    assert same.t_p == 1.0 and math.isnan(same.d_z)
    assert summarise("x", []).n == 0


# -- equivalence, verdicts, ties, levels -------------------------------------------------

def test_verdicts_come_from_the_numbers_never_from_a_large_p() -> None:
    from kdig_study.stats import Judgement

    judge = Judgement(alpha=0.05, margin=0.004)  # +-0.4 points
    student = {s: 0.50 for s in range(10)}
    table = {frozenset(): student,
             # tight around 0: inside the margin, shown by TOST
             frozenset({"kd"}): {s: 0.5 + (0.0002 if s % 2 else -0.0002) for s in range(10)},
             # +0.1 points, tight: a difference, and a negligible one
             frozenset({"kd", "at"}): {s: 0.501 + (1e-4 if s % 2 else -1e-4)
                                       for s in range(10)},
             # +2 points: better
             frozenset({"ig"}): {s: 0.52 + (0.001 if s % 2 else -0.001) for s in range(10)},
             # mean +0.1 points, sd 1 point: neither shown
             frozenset({"kd", "ig"}): {s: 0.501 + (0.01 if s % 2 else -0.01) for s in range(10)}}
    a = analyse(table, {"kd": (None, "kd"), "overlay": (None, "ig"), "at": (None, "at")},
                judge=judge)
    rows = {r["name"]: r for r in a["comparisons"]}
    assert rows["KD+AT - student"]["verdict"] == "better, within +-0.40"
    assert rows["KD - student"]["verdict"] == "equivalent within +-0.40"
    assert -0.004 < rows["KD - student"]["eq_ci_low"] < rows["KD - student"]["eq_ci_high"] < 0.004
    assert rows["IG - student"]["verdict"] == "better"
    noisy = rows["KD+IG - student"]
    assert noisy["t_p"] > 0.5 and noisy["verdict"] == "inconclusive"  # not "no difference"
    assert noisy["n_equivalence"] > noisy["n"] and noisy["n_detect"] > noisy["n"]
    assert a["alpha"] == 0.05 and a["equivalence_margin"] == 0.004


def test_the_equivalence_sample_size_is_where_tost_reaches_80_percent_power() -> None:
    import numpy as np

    from kdig_study.stats import n_for_equivalence

    sd, margin, alpha = 0.01, 0.004, 0.05
    n = n_for_equivalence(sd, margin, alpha)
    assert n is not None and n > 10

    def power(n: int, reps: int = 20000) -> float:
        rng = np.random.default_rng(0)
        x = rng.normal(0.0, sd, size=(reps, n))
        m, se = x.mean(1), x.std(1, ddof=1) / np.sqrt(n)
        crit = sps.t.ppf(1 - alpha, n - 1)
        return float(np.mean(((m + margin) / se > crit) & ((m - margin) / se < -crit)))

    assert power(n) >= 0.78 and power(n - 2) < 0.8  # simulated, not the formula again


def test_the_equivalence_sample_size_search_finds_the_first_n_counting_up_finds() -> None:
    """The n is found by bisection (power grows with n): the same n as counting up from 2,
    at small, large and unreachable sizes and at the bounds."""
    from kdig_study.stats import n_for_equivalence

    def counted(sd: float, margin: float, alpha: float, n_max: int) -> int | None:
        for n in range(2, n_max + 1):
            crit = sps.t.ppf(1 - alpha, n - 1)
            if 2 * sps.t.cdf(margin * math.sqrt(n) / sd - crit, n - 1) - 1 >= 0.8:
                return n
        return None

    cases = [(sd, margin, alpha, n_max) for sd in (0.0001, 0.001, 0.0036, 0.01, 0.05, 0.4)
             for margin in (0.003, 0.004) for alpha in (0.05, 0.005) for n_max in (2, 3000)]
    found = [n_for_equivalence(sd, m, a, n_max=k) for sd, m, a, k in cases]
    assert found == [counted(*c) for c in cases]
    assert {n is None for n in found} == {True, False} and 2 in found
    assert any(n is not None and n > 1000 for n in found)


def test_wilcoxon_float_noise_ties_tie_and_ties_are_tested_exactly() -> None:
    import itertools

    from kdig_study.stats import contrast

    clean = [0.0012, 0.0012, 0.003, -0.001, 0.002, 0.0005, 0.0012, 0.0007]
    noisy = [0.0012000000000000001, 0.0011999999999999999, *clean[2:]]
    a, b = contrast("a", "comparison", clean), contrast("b", "comparison", noisy)
    assert a.wilcoxon_p == b.wilcoxon_p and "ties" in a.wilcoxon_note
    # by hand: the signed-rank statistic over all 2^8 sign flips, midranks for the ties
    ranks = sps.rankdata([abs(x) for x in clean])
    observed = sum(r for r, x in zip(ranks, clean, strict=True) if x > 0)
    total = ranks.sum()
    extreme = 0
    for signs in itertools.product((0, 1), repeat=len(clean)):
        w = sum(r for r, on in zip(ranks, signs, strict=True) if on)
        extreme += abs(w - total / 2) >= abs(observed - total / 2) - 1e-9
    assert a.wilcoxon_p == pytest.approx(extreme / 2 ** len(clean))


def test_wilcoxon_with_zero_differences_is_exact_and_the_same_every_time() -> None:
    """Two replicates at the same accuracy give a zero difference: Wilcoxon drops it and
    flips the signs of the others. scipy's permutation method flipped the zeros too, so its
    2^8 resamples were a random draw from 2^10 flips: p was 0.093, 0.125, 0.117... call by
    call (exact: 0.1016)."""
    import itertools

    from kdig_study.stats import contrast

    d = [0.0, 0.003, -0.001, 0.002, 0.0, 0.002, 0.004, -0.002, 0.001, 0.005]
    ps = {contrast("a", "comparison", d).wilcoxon_p for _ in range(5)}
    assert len(ps) == 1
    nonzero = [x for x in d if x != 0]
    ranks = sps.rankdata([abs(x) for x in nonzero])
    observed = sum(r for r, x in zip(ranks, nonzero, strict=True) if x > 0)
    extreme = sum(abs(sum(r for r, on in zip(ranks, signs, strict=True) if on)
                      - ranks.sum() / 2) >= abs(observed - ranks.sum() / 2) - 1e-9
                  for signs in itertools.product((0, 1), repeat=len(nonzero)))
    assert ps.pop() == pytest.approx(extreme / 2 ** len(nonzero)) == pytest.approx(0.1015625)


def test_each_row_is_judged_and_its_mde_given_at_its_holm_level() -> None:
    from kdig_study.stats import holm_levels, minimum_detectable

    assert holm_levels([0.01, 0.04, float("nan"), 0.03], 0.05) == \
        [0.05 / 3, 0.05 / 1, 0.05 / 3, 0.05 / 2]
    noise = [0.004, -0.006, 0.01, -0.002, 0.007, -0.009, 0.003, 0.001]
    table = {frozenset(): {s: 0.5 for s in range(8)},
             frozenset({"kd"}): {s: 0.51 + e for s, e in enumerate(noise)}}
    a = analyse(table, ["kd"])
    row = a["comparisons"][0]
    assert row["level"] < 0.05
    sd = abs(row["mean"] / row["d_z"])
    assert row["mde"] == pytest.approx(minimum_detectable(row["n"], sd, row["level"]))
    assert row["mde"] > minimum_detectable(row["n"], sd, 0.05)


def test_a_family_that_carries_most_of_a_robust_difference_is_named() -> None:
    """The review's case: Grad-CAM's +1.84 over KD under corruptions was +8.40 under
    contrast and +0.20 on average under the other four families."""
    from kdig_study.stats import by_family, carried_by

    fam = {"contrast": 0.084, "jpeg": -0.0149, "gaussian_noise": 0.006, "gaussian_blur": 0.01,
           "brightness": 0.0069}
    aggregate = {"mean": sum(fam.values()) / 5, "verdict": "better"}
    rows = {f: {"mean": m, "verdict": "inconclusive", "t_p_holm": 0.5} for f, m in fam.items()}
    c = carried_by(aggregate, rows)
    assert c is not None and c["family"] == "contrast"
    assert c["share"] == pytest.approx(0.084 / 5 / aggregate["mean"])
    assert c["rest_mean"] == pytest.approx((-0.0149 + 0.006 + 0.01 + 0.0069) / 4)
    # spread evenly, or not a difference at all: nothing to name
    even = {f: {"mean": 0.01, "verdict": "better", "t_p_holm": 0.01} for f in fam}
    assert carried_by({"mean": 0.01, "verdict": "better"}, even) is None
    assert carried_by(aggregate | {"verdict": "inconclusive"}, rows) is None
    split = by_family({"comparisons": [{"name": "KD+gradcam - KD", **aggregate}]},
                      {f: {"comparisons": [{"name": "KD+gradcam - KD", **r}]}
                       for f, r in rows.items()})
    assert split["comparisons"][0]["carried_by"]["family"] == "contrast"
    assert set(split["comparisons"][0]["families"]) == set(fam)


def test_no_spread_is_never_called_equivalent() -> None:
    """Students that all stayed at chance differ by exactly 0 in every replicate: the t
    statistics are undefined, and TOST gave p = 0 ("equivalent") from 2 replicates."""
    from kdig_study.stats import Judgement

    table = {frozenset(): {0: 0.1, 1: 0.1}, frozenset({"kd"}): {0: 0.1, 1: 0.1}}
    row = analyse(table, ["kd"], judge=Judgement(margin=0.004))["comparisons"][0]
    assert math.isnan(row["tost_p"]) and row["verdict"] == "inconclusive"


def test_an_ablation_of_some_conditions_keeps_its_pairs_and_its_effects_only_if_whole() -> None:
    """--conditions: a comparison needs both of its conditions, the factorial effects every
    cell; the student is no reference where it is not run."""
    const = frozenset({"kd", "constant"})
    table = TABLE | {const: {0: 0.73, 1: 0.74, 2: 0.74}}
    design = design_of(["kd", "ig"])
    whole = analyse(table, design, ["constant"],
                    only=["student", "KD", "IG", "KD+IG", "KD+constant"])
    assert [e["name"] for e in whole["effects"]] == ["KD", "IG", "KD x IG"]
    assert "KD+constant - student" in [c["name"] for c in whole["comparisons"]]
    kd_on = analyse(table, design, ["constant"], only=["KD", "KD+IG", "KD+constant"])
    assert [c["name"] for c in kd_on["comparisons"]] == \
        ["KD+IG - KD", "KD+constant - KD", "KD+constant - KD+IG"]
    assert kd_on["effects"] == [] and kd_on["primary"] == "KD+IG - KD"
    # the Holm family is the three rows run: the smallest p is multiplied by 3, not by 12
    ps = sorted(c["t_p"] for c in kd_on["comparisons"])
    assert min(c["t_p_holm"] for c in kd_on["comparisons"]) == pytest.approx(3 * ps[0])
    assert conditions(design, ["constant"], ["KD+constant", "KD"]) == [KD, const]
