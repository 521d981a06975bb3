"""Statistics against values computed by hand on fixed numbers."""

from __future__ import annotations

import math

import pytest

from kdig_study.stats import analyse, conditions, effects, paired, summarise

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
    assert p.n == 3 and p.mean_diff == pytest.approx(mean)
    assert p.t_p == pytest.approx(1 - t / math.sqrt(2 + t * t), rel=1e-6)
    half = 4.302653 * sd / math.sqrt(3)
    assert (p.ci_low, p.ci_high) == (pytest.approx(mean - half, rel=1e-5),
                                     pytest.approx(mean + half, rel=1e-5))
    # Wilcoxon, n = 3, all differences positive: W- = 0; exact two-sided p = 2 / 2^3
    assert p.wilcoxon_p == pytest.approx(0.25)


def test_pairing_uses_only_shared_seeds() -> None:
    p = paired("a", {0: 1.0, 1: 2.0, 5: 9.0}, "b", {0: 0.5, 1: 1.0, 7: 0.0})
    assert p.n == 2 and p.mean_diff == pytest.approx(0.75)


def test_factorial_effects_by_hand() -> None:
    eff = {e.effect: e for e in effects(TABLE, ["kd", "ig"])}
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
    assert len(conditions(["kd", "ig", "at"])) == 8
    assert len(analyse({}, ["kd", "ig", "at"])["effects"]) == 7


def test_degenerate_inputs_do_not_crash() -> None:
    one = paired("a", {0: 1.0}, "b", {0: 0.0})
    assert one.n == 1 and math.isnan(one.ci_low) and math.isnan(one.t_p)
    same = paired("a", {0: 1.0, 1: 1.0}, "b", {0: 1.0, 1: 1.0})
    assert same.t_p == 1.0 and same.wilcoxon_p == 1.0
    assert summarise("x", []).n == 0
