"""Adaptive IG: Clenshaw-Curtis, per-image refinement to a target gap, the store."""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest
import torch
from test_attribution import _inputs

from kdig_study.attribution import store as store_mod
from kdig_study.attribution.adaptive import adaptive_ig, levels
from kdig_study.attribution.numerics import (
    clenshaw_curtis,
    integrated_gradients,
    quadrature,
    relative_gap,
    union_rule,
)
from kdig_study.attribution.store import MapSpec, build_store, index_hash
from kdig_study.models import fold_batchnorm

CPU = torch.device("cpu")


@pytest.mark.parametrize("n", [1, 2, 4, 8, 16, 32])
def test_clenshaw_curtis_is_exact_for_polynomials_up_to_its_degree(n: int) -> None:
    a, w = clenshaw_curtis(n)
    assert a[0] == 0.0 and a[-1] == pytest.approx(1.0) and sum(w) == pytest.approx(1.0)
    for degree in range(n + 1):  # integral of t^d over [0, 1] is 1 / (d + 1)
        assert sum(wi * ai ** degree for ai, wi in zip(a, w, strict=True)) == pytest.approx(
            1 / (degree + 1), abs=1e-12)
    finer, _ = clenshaw_curtis(2 * n)
    assert all(any(abs(x - y) < 1e-12 for y in finer) for x in a)  # nested
    assert quadrature("clenshaw_curtis", n) == (a, w)


def test_levels() -> None:
    assert levels(4, 128) == [4, 8, 16, 32, 64, 128]
    assert levels(4, 100) == [4, 8, 16, 32, 64]
    assert levels(8, 8) == [8]


@pytest.mark.parametrize("rule", ["trapezoid", "clenshaw_curtis"])
def test_images_equal_the_fixed_rule_of_the_level_they_stopped_at(setup, rule: str) -> None:
    cfg, data, teacher, mean, std = setup
    folded = fold_batchnorm(teacher)
    x, y = _inputs(data, mean, std, torch.arange(48))
    base = torch.zeros_like(x)
    counts = levels(2, 64)
    res = adaptive_ig(folded, x, y, base, rule, 2, 64, target_gap=0.01, internal_batch=64)
    assert len(set(res.level.tolist())) > 1  # the images really stopped at different levels
    for li, n in enumerate(counts):
        rows = (res.level == li).nonzero().squeeze(1)
        if rows.numel() == 0:
            continue
        alphas, weights = union_rule(rule, [n])
        fixed = integrated_gradients(folded, x[rows], y[rows], base[rows], alphas, weights, 64)
        assert torch.allclose(res.attributions[rows], fixed.attributions[0], rtol=1e-4,
                              atol=1e-6)
        assert (res.points[rows] == n + 1).all()
        gap = relative_gap(fixed.attributions[0], fixed.delta)
        # (a gap is a small difference of large sums: equal to 0.1 percentage point)
        assert torch.allclose(res.gap[rows], gap, rtol=0, atol=1e-3)
    # every image is under the target, or it used the cap's points
    assert bool(((res.gap <= 0.01) | (res.points == 65)).all())
    # and the work is less than the cap's for every image
    assert res.points.float().mean() < 65


def _adaptive_spec(cfg, data, teacher_fp: str, n: int) -> MapSpec:
    return MapSpec(teacher=teacher_fp, data=data.fingerprint,
                   images=index_hash(data.train_index[:n]), n_images=n,
                   method="adaptive-clenshaw_curtis", baseline="zeros", reduce="abs_sum",
                   counts=(0,), precision="fp32",
                   options=json.dumps({"target_gap": 0.01, "start": 2, "cap": 32}))


def _build(setup, spec, n):
    cfg, data, teacher, _, _ = setup
    ig = dataclasses.replace(cfg.ig, batch_size=32, internal_batch=64, target_gap=0.01,
                             adaptive_rule="clenshaw_curtis", adaptive_start=2,
                             adaptive_cap=32)
    return build_store(spec, teacher, data.train.images[:n], data.train.labels[:n],
                       data.train_index[:n], data.mean, data.std, ig, CPU, progress=False,
                       log=lambda *_: None)


def test_store_holds_each_images_points_and_gap_and_resumes(
        setup, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg, data, _, _, _ = setup
    n = 96
    spec = _adaptive_spec(cfg, data, "adaptive-resume", n)
    real = store_mod.adaptive_ig
    calls = {"n": 0}

    def flaky(*a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(store_mod, "adaptive_ig", flaky)
    with pytest.raises(KeyboardInterrupt):
        _build(setup, spec, n)
    root = store_mod.store_root(spec)
    assert json.loads((root / "progress.json").read_text())["done"] == 32
    monkeypatch.setattr(store_mod, "adaptive_ig", real)
    report = _build(setup, spec, n)
    assert report.computed_images == 64  # only what was missing
    store = report.store
    points = np.load(store.root / "points.npy")
    gaps = np.load(store.root / "gaps.npy")[0]
    assert points.shape == (n,) and set(points.tolist()) <= {3, 5, 9, 17, 33}
    capped = points == 33
    assert bool(((gaps <= 0.01) | capped).all())  # under the target, or at the cap
    measured = store.meta["measured"]
    assert measured["points_mean"] == pytest.approx(points.mean())
    assert sum(measured["points_histogram"].values()) == n
    fresh = _build(setup, _adaptive_spec(cfg, data, "adaptive-fresh", n), n).store
    assert np.array_equal(np.load(fresh.root / "points.npy"), points)  # levels kept on resume
    assert np.array_equal(fresh.maps(0), store.maps(0))
    assert store.maps(16).shape == (n, 32, 32)  # any step count reads the one map
    assert not math.isnan(store.gap(8)["median"])


@pytest.mark.slow
def test_adaptive_mode_through_the_attribute_cli(tmp_path, warm_teacher) -> None:
    from cli_helpers import run_cli

    proc = run_cli("attribute", "--study", "kd_ig", "--scale", "smoke", "--no-progress",
                   "--set", "ig.target_gap=0.01", "--set", "ig.adaptive_cap=64",
                   "--no-sanity", "--preview", "0")
    assert proc.returncode == 0, proc.stderr
    assert "adaptive-clenshaw_curtis to a gap of 1.00%" in proc.stdout
    assert "points per image on average" in proc.stdout
