from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from captum.attr import IntegratedGradients

from kdig_study.attribution import store as store_mod
from kdig_study.attribution.numerics import (
    integrated_gradients,
    make_baseline,
    quadrature,
    reduce_channels,
    relative_gap,
    union_rule,
)
from kdig_study.attribution.store import MapSpec, build_store, index_hash, open_store

CPU = torch.device("cpu")


def _inputs(data, mean, std, rows):
    x = ((data.train.images[rows].float() / 255 - mean) / std).contiguous(
        memory_format=torch.channels_last)
    return x, data.train.labels[rows]


def test_rules() -> None:
    a, w = quadrature("trapezoid", 8)
    assert len(a) == 9 and sum(w) == pytest.approx(1.0) and a[0] == 0 and a[-1] == 1
    alphas, weights = union_rule("trapezoid", [8, 16, 32, 64])
    assert alphas.numel() == 65  # nested: the finest grid serves every count
    assert torch.allclose(weights.sum(1), torch.ones(4, dtype=torch.float64))
    alphas, weights = union_rule("gausslegendre", [16, 32])
    assert alphas.numel() == 48  # not nested: the union
    # Captum's trapezoid weights sum to (n - 1) / n: the defect our own rule avoids
    _, cw = quadrature("riemann_trapezoid", 9)
    assert sum(cw) == pytest.approx(8 / 9)


@pytest.mark.parametrize("method", ["riemann_middle", "gausslegendre", "riemann_left"])
@pytest.mark.parametrize("baseline", ["zeros", "black", "blur"])
def test_matches_captum(setup, method: str, baseline: str) -> None:
    cfg, data, teacher, mean, std = setup
    x, y = _inputs(data, mean, std, torch.arange(6))
    base = make_baseline(baseline, x, mean, std)
    alphas, weights = union_rule(method, [12])
    ours = integrated_gradients(teacher, x, y, base, alphas, weights, internal_batch=32)
    ref = IntegratedGradients(teacher).attribute(x, baselines=base, target=y, n_steps=12,
                                                 method=method, internal_batch_size=32)
    err = (ours.attributions[0] - ref).abs().max() / ref.abs().max()
    assert err < 1e-5, err


def test_trapezoid_equals_captums_up_to_its_weight_factor(setup) -> None:
    cfg, data, teacher, mean, std = setup
    x, y = _inputs(data, mean, std, torch.arange(4))
    base = torch.zeros_like(x)
    alphas, weights = union_rule("trapezoid", [16])
    ours = integrated_gradients(teacher, x, y, base, alphas, weights)
    ref = IntegratedGradients(teacher).attribute(x, baselines=base, target=y, n_steps=17,
                                                 method="riemann_trapezoid")
    assert torch.allclose(ours.attributions[0], ref * 17 / 16, rtol=1e-4, atol=1e-7)


def test_one_nested_pass_equals_separate_passes(setup) -> None:
    cfg, data, teacher, mean, std = setup
    x, y = _inputs(data, mean, std, torch.arange(5))
    base = torch.zeros_like(x)
    alphas, weights = union_rule("trapezoid", [4, 8, 16])
    joint = integrated_gradients(teacher, x, y, base, alphas, weights, internal_batch=40)
    for i, n in enumerate([4, 8, 16]):
        a, w = union_rule("trapezoid", [n])
        alone = integrated_gradients(teacher, x, y, base, a, w)
        assert torch.allclose(joint.attributions[i], alone.attributions[0], rtol=1e-4, atol=1e-6)


def test_completeness_gap_within_bound_and_shrinks_with_steps(setup) -> None:
    cfg, data, teacher, mean, std = setup
    x, y = _inputs(data, mean, std, torch.arange(40))
    alphas, weights = union_rule("trapezoid", [4, 16, 64])
    res = integrated_gradients(teacher, x, y, torch.zeros_like(x), alphas, weights)
    gaps = relative_gap(res.attributions, res.delta).median(dim=1).values
    assert gaps[2] < cfg.ig.max_gap  # the stated bound: 5% median relative gap
    assert gaps[2] < gaps[0]


def _spec(cfg, data, teacher_fp="t", counts=(4, 8), n=None):
    n = n or len(data.train)
    return MapSpec(teacher=teacher_fp, data=data.fingerprint,
                   images=index_hash(data.train_index[:n]), n_images=n, method="trapezoid",
                   baseline="zeros", reduce="abs_sum", counts=counts, precision="fp32")


def _build(setup, spec, n, **kw):
    cfg, data, teacher, _, _ = setup
    ig = dataclasses.replace(cfg.ig, batch_size=32, internal_batch=64)
    return build_store(spec, teacher, data.train.images[:n], data.train.labels[:n],
                       data.train_index[:n], data.mean, data.std, ig, CPU, progress=False,
                       log=kw.get("log", lambda *_: None))


def test_store_row_i_is_the_map_of_training_image_i(setup) -> None:
    cfg, data, teacher, mean, std = setup
    n = 120
    report = _build(setup, _spec(cfg, data, n=n), n)
    store = report.store
    assert report.computed_images == n
    assert np.array_equal(store.index(), data.train_index[:n].numpy())
    maps = store.maps(8)
    assert maps.dtype == np.float16 and maps.shape == (n, 32, 32)
    # Recompute a random sample of rows with Captum, from the un-augmented images.
    rows = torch.randperm(n, generator=torch.Generator().manual_seed(0))[:6]
    x, y = _inputs(data, mean, std, rows)
    ref = IntegratedGradients(teacher).attribute(x, baselines=torch.zeros_like(x), target=y,
                                                 n_steps=9, method="riemann_trapezoid")
    expect = reduce_channels(ref * 9 / 8, "abs_sum")
    got = torch.from_numpy(maps[rows.numpy()].astype(np.float32))
    # Per-image relative L2 error: fp32 sums in another order (BN folded into the convs;
    # oneDNN picks kernels per CPU) plus float16 storage give 2e-4 to 7e-3; a wrong row gives ~1.
    def rel_err(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return (a - b).flatten(1).norm(dim=1) / b.flatten(1).norm(dim=1)

    assert rel_err(got, expect).max() < 2e-2
    # and a shuffled pairing would not match: the check has teeth
    assert rel_err(got, expect.roll(1, 0)).min() > 0.1
    assert store.gap(8)["median"] < cfg.ig.max_gap


def test_interrupted_build_resumes_and_matches(setup, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg, data, teacher, _, _ = setup
    n = 128
    spec = _spec(cfg, data, teacher_fp="resume", n=n)
    real = store_mod.integrated_gradients
    calls = {"n": 0}

    def flaky(*a, **k):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(store_mod, "integrated_gradients", flaky)
    with pytest.raises(KeyboardInterrupt):
        _build(setup, spec, n)
    root = store_mod.store_root(spec)
    assert json.loads((root / "progress.json").read_text())["done"] == 64
    assert open_store(spec) is None
    monkeypatch.setattr(store_mod, "integrated_gradients", real)
    report = _build(setup, spec, n)
    assert report.computed_images == 64  # only what was missing
    fresh = _build(setup, _spec(cfg, data, teacher_fp="fresh", n=n), n)
    assert np.array_equal(report.store.maps(4), fresh.store.maps(4))
    again = _build(setup, spec, n)
    assert again.computed_images == 0


@pytest.mark.parametrize("damage", ["corrupt", "truncate", "delete"])
def test_damaged_store_is_detected_reported_and_recomputed(setup, damage: str) -> None:
    cfg, data, teacher, _, _ = setup
    n = 40
    spec = _spec(cfg, data, teacher_fp=f"damage-{damage}", n=n)
    good = _build(setup, spec, n).store.maps(8).copy()
    f = store_mod.store_root(spec) / "maps_s8.npy"
    if damage == "corrupt":
        raw = bytearray(f.read_bytes())
        raw[-7] ^= 0xFF
        f.write_bytes(bytes(raw))
    elif damage == "truncate":
        f.write_bytes(f.read_bytes()[:-100])
    else:
        f.unlink()
    assert open_store(spec) is None
    notes: list[str] = []
    report = _build(setup, spec, n, log=notes.append)
    assert report.computed_images == n
    assert notes and "damaged" in notes[0]
    assert np.array_equal(report.store.maps(8), good)


# the maps of a 200-image training subset (the teacher comes from the warm cache)
SUBSET = ("--set", "student_train.train_size=100")


def test_attribute_cli_computes_once(tmp_path: Path, isolated_storage: Path,
                                     warm_teacher: Path) -> None:
    from cli_helpers import run_cli

    subset = SUBSET
    first = run_cli("attribute", "--study", "kd_ig", "--scale", "smoke", "--no-progress", *subset)
    assert first.returncode == 0, first.stderr
    assert "computed 100 maps" in first.stdout and "steps 8: completeness gap" in first.stdout
    store = Path(first.stdout.strip().splitlines()[-1].split(": ", 1)[1])
    assert (store / "maps_s8.npy").is_file() and (store / "maps_s16.npy").is_file()
    assert list(store.glob("preview_s8_n8.png"))
    second = run_cli("attribute", "--study", "kd_ig", "--scale", "smoke", "--no-progress", *subset)
    assert "ig: store already complete" in second.stdout and "nothing computed" in second.stdout


@pytest.mark.slow  # two worker processes (about 20 s)
def test_attribute_cli_concurrent_workers_share(tmp_path: Path, isolated_storage: Path,
                                                warm_teacher: Path) -> None:
    """Two workers asking for a new store at once: one computes it, the other waits for it."""
    subset = SUBSET
    procs = [subprocess.Popen([sys.executable, "-m", "kdig_study.attribute", "--study", "kd_ig",
                               "--scale", "smoke", "--steps", "6", "--no-progress",
                               "--preview", "0", *subset],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs)
    assert sum("computed 100 maps" in o for o in outs) == 1
    assert sum("store already complete" in o for o in outs) == 1


def test_bf16_maps_stay_within_tolerance_of_captum_fp32(setup) -> None:
    # The map store runs IG under bf16 autocast where the hardware is fast at it
    # (AMX, AVX512-BF16, CUDA).
    # Stated tolerance: 5% relative L2 error of the maps (measured: 1.8% on the cpu-scale
    # teacher, 3.0% on this smoke one; bf16 keeps 8 mantissa bits).
    cfg, data, teacher, mean, std = setup
    x, y = _inputs(data, mean, std, torch.arange(16))
    base = torch.zeros_like(x)
    from kdig_study.models import fold_batchnorm

    alphas, weights = union_rule("riemann_middle", [16])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = integrated_gradients(fold_batchnorm(teacher), x, y, base, alphas, weights)
    ref = IntegratedGradients(teacher).attribute(x, baselines=base, target=y, n_steps=16,
                                                 method="riemann_middle")
    m, r = reduce_channels(ours.attributions[0], "abs_sum"), reduce_channels(ref, "abs_sum")
    assert ((m - r).norm() / r.norm()).item() < 0.05
