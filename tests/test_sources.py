"""Map sources: the controls (shuffled, random) and Captum's other methods, through the same
store as IG; the deletion-curve sanity check; the attribute CLI over every source."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
from captum.attr import (
    GradientShap,
    InputXGradient,
    LayerAttribution,
    LayerGradCam,
    NoiseTunnel,
    Saliency,
)

from kdig_study.attribution.deletion import area, deletion_curve
from kdig_study.attribution.numerics import make_baseline
from kdig_study.attribution.sources import (
    CAPTUM,
    autocorrelation_width,
    captum_chunks,
    chunk_seed,
    class_derangement,
    derangement,
    smooth_random_maps,
    source_spec,
)
from kdig_study.config import MAP_SOURCES, load_study
from kdig_study.data import load_bundle
from kdig_study.experiment import Context

from cli_helpers import assert_one_line_error, run_cli

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def ctx(tmp_path_factory: pytest.TempPathFactory, warm_cache_source: Path):
    """A smoke context (fp32 maps) with its own cache for the module, which starts with the
    session's smoke teacher (the maps are computed here: fp32 is another store)."""
    import os
    import shutil
    from unittest import mock

    cache = tmp_path_factory.mktemp("cache")
    shutil.copytree(warm_cache_source / "teachers", cache / "teachers")
    with mock.patch.dict(os.environ, {"KDIG_CACHE": str(cache)}):
        cfg = load_study("kd_ig", "smoke")
        cfg = dataclasses.replace(
            cfg, ig=dataclasses.replace(cfg.ig, precision="fp32", smoothgrad_samples=4,
                                        shap_samples=4),
            # the maps of a 120-image training subset
            student_train=dataclasses.replace(cfg.student_train, train_size=120))
        c = Context(cfg, load_bundle(cfg.data), CPU, progress=False, log=lambda *a: None)
        c.teacher()
        yield c


def test_derangement_has_no_fixed_point_and_is_seeded() -> None:
    for n in (2, 3, 10, 1000):
        p = derangement(n, seed=4)
        assert sorted(p.tolist()) == list(range(n))
        assert not bool((p == torch.arange(n)).any())
    assert torch.equal(derangement(500, 1), derangement(500, 1))
    assert not torch.equal(derangement(500, 1), derangement(500, 2))


def test_shuffled_maps_are_other_images_ig_maps(ctx) -> None:
    ig = ctx.maps(None, "ig").store
    sh = ctx.maps(None, "shuffled").store
    assert sh.source == "shuffled" and sh.counts == ig.counts
    assert np.array_equal(sh.index(), ig.index())  # rows are still training images 0..N-1
    perm = derangement(len(ig.index()), ctx.cfg.ig.source_seed).numpy()
    for steps in ig.counts:
        a, b = np.asarray(ig.maps(steps)), np.asarray(sh.maps(steps))
        assert np.array_equal(b, a[perm])  # row i holds the IG map of image perm[i] != i
        # exactly the IG maps' value distribution
        assert np.array_equal(np.sort(a, axis=None), np.sort(b, axis=None))
        assert not any(np.array_equal(a[i], b[i]) for i in range(20))


def test_random_maps_have_each_rows_ig_values_at_ig_s_spatial_scale() -> None:
    g = torch.Generator().manual_seed(0)
    # blobby "IG" maps: smoothed noise, squared (non-negative, heavy-tailed)
    import torchvision.transforms.functional as TF
    base = TF.gaussian_blur(torch.randn(200, 1, 32, 32, generator=g), [9, 9], [1.5, 1.5])
    ig = (base[:, 0] ** 2).numpy()
    width = autocorrelation_width(ig)
    rnd = smooth_random_maps(ig, seed=3, width=width)
    for i in range(5):
        assert np.array_equal(np.sort(rnd[i], axis=None), np.sort(ig[i], axis=None))
        assert not np.array_equal(rnd[i], ig[i])
    # the spatial scale is matched (within a pixel), not white noise (width ~ 0.5 px)
    assert abs(autocorrelation_width(rnd) - width) < 1.0 and width > 1.5
    assert np.array_equal(rnd, smooth_random_maps(ig, seed=3, width=width))


def test_random_source_through_the_store(ctx) -> None:
    ig = ctx.maps(None, "ig").store
    rnd = ctx.maps(None, "random").store
    measured = rnd.meta["measured"]
    steps = ig.counts[0]
    assert {f"ig_autocorrelation_width_s{steps}",
            f"random_autocorrelation_width_s{steps}"} <= set(measured)
    a, b = np.asarray(ig.maps(steps)), np.asarray(rnd.maps(steps))
    assert np.array_equal(np.sort(a[7], axis=None), np.sort(b[7], axis=None))


def test_same_class_shuffled_maps_come_from_other_images_of_the_same_class(ctx) -> None:
    ig = ctx.maps(None, "ig").store
    sc = ctx.maps(None, "shuffled_same_class").store
    labels = ctx.data.train_subset(ctx.cfg.student_train.train_size)[0].labels
    a = np.asarray(ig.maps(ig.counts[0]))
    b = np.asarray(sc.maps(ig.counts[0]))
    # each row's map is the IG map of another row of its class
    perm = class_derangement(labels, ctx.cfg.ig.source_seed)
    assert np.array_equal(b, a[perm.numpy()])
    assert bool((perm != torch.arange(len(perm))).all())
    assert torch.equal(labels[perm], labels)
    assert sc.meta["measured"][f"own_map_kept_s{ig.counts[0]}"] == 0
    # unlike shuffled, whose maps mostly come from other classes
    sh = derangement(len(labels), ctx.cfg.ig.source_seed)
    assert float((labels[sh] != labels).float().mean()) > 0.5


def test_a_class_of_one_keeps_its_map_and_the_rest_are_deranged() -> None:
    labels = torch.tensor([0, 1, 1, 2, 2, 2, 0])
    perm = class_derangement(labels, 5)
    assert torch.equal(labels[perm], labels)
    assert bool((perm != torch.arange(7)).all())
    lone = class_derangement(torch.tensor([0, 1, 1]), 5)
    assert lone[0] == 0 and lone[1] == 2 and lone[2] == 1


def test_the_constant_control_overlays_the_ig_maps_mean_overlay_value(ctx) -> None:
    from kdig_study.overlay import IGOverlay

    ig = ctx.maps(None, "ig").store
    const = ctx.maps(None, "constant").store
    steps = ig.counts[0]
    maps = np.asarray(const.maps(steps))
    value = const.meta["measured"][f"constant_value_s{steps}"]
    assert np.all(maps == maps.flat[0]) and abs(float(maps.flat[0]) - value) < 1e-3
    # what the IG overlay blends in on average, measured through the overlay itself (prob 1,
    # strength 1: x' = M), against the flat map's value
    overlay = IGOverlay(1.0, 1.0, ctx.cfg.ig.exponent_low, ctx.cfg.ig.exponent_high)
    g = torch.Generator().manual_seed(0)
    planes = torch.from_numpy(np.asarray(ig.maps(steps), dtype=np.float32)).unsqueeze(1)
    x = torch.zeros(len(planes), 3, *planes.shape[-2:])
    seen = torch.stack([overlay(x, planes, g).mean() for _ in range(20)])
    assert abs(float(seen.mean()) - value) < 0.01
    # the flat map overlays its own value on every pixel (not minmax's 0)
    flat = torch.from_numpy(maps[:8].astype(np.float32)).unsqueeze(1)
    out = overlay(torch.zeros(8, 3, *flat.shape[-2:]), flat, g)
    assert torch.allclose(out, flat.expand(-1, 3, -1, -1))


def _captum_direct(source: str, model, x, y, base, cfg) -> torch.Tensor:
    if source == "saliency":
        return Saliency(model).attribute(x, target=y, abs=True).abs().sum(1)
    if source == "input_x_gradient":
        return InputXGradient(model).attribute(x, target=y).abs().sum(1)
    if source == "smoothgrad":
        return NoiseTunnel(Saliency(model)).attribute(
            x, nt_type="smoothgrad", nt_samples=cfg.smoothgrad_samples,
            stdevs=cfg.smoothgrad_sigma, target=y, abs=True).abs().sum(1)
    if source == "gradient_shap":
        return GradientShap(model).attribute(x, baselines=base, n_samples=cfg.shap_samples,
                                             target=y).abs().sum(1)
    cam = LayerGradCam(model, model.features[-1]).attribute(x, target=y, relu_attributions=True)
    return LayerAttribution.interpolate(cam, (32, 32), interpolate_mode="bilinear")[:, 0]


@pytest.mark.parametrize("source", CAPTUM)
def test_captum_sources_match_captum_called_directly(ctx, source: str) -> None:
    cfg, data = ctx.cfg, ctx.data
    spec = source_spec(ctx.map_spec(), source, cfg.ig)
    assert spec.precision == "fp32" and spec.counts == (0,)
    model = ctx.teacher().model.eval()
    chunk = captum_chunks(spec, model, data.train.images, data.train.labels, data.mean,
                          data.std, cfg.ig, CPU)
    ours, gaps, _ = chunk(0, 16)
    assert ours.shape == (1, 16, 32, 32) and np.isnan(gaps).all()
    mean = torch.tensor(data.mean).view(1, 3, 1, 1)
    std = torch.tensor(data.std).view(1, 3, 1, 1)
    x = (data.train.images[:16].float() / 255 - mean) / std
    base = make_baseline(cfg.ig.baseline, x, mean, std)
    with torch.random.fork_rng(devices=[]):
        seed = chunk_seed(cfg.ig.source_seed, source, 0)
        torch.manual_seed(seed)
        np.random.seed(seed % 2 ** 32)  # GradientShap draws from NumPy's global generator
        ref = _captum_direct(source, model, x, data.train.labels[:16], base, cfg.ig)
    ref = ref.detach().numpy()
    assert np.abs(ours[0] - ref).max() <= 1e-5 * max(1.0, np.abs(ref).max()), source
    assert np.abs(ref).sum() > 0


@pytest.mark.parametrize("source", CAPTUM)
def test_captum_sources_through_the_store(ctx, source: str) -> None:
    store = ctx.maps(None, source).store
    assert store.source == source and store.counts == (0,)
    n = len(ctx.data.train_subset(ctx.cfg.student_train.train_size)[0])
    assert n == 120 and store.maps(16).shape == (n, 32, 32)  # any step count: one map
    assert np.isnan(store.gap(8)["median"])
    assert ctx.maps(None, source).store.root == store.root  # cached


def test_deletion_curve_ends_and_area() -> None:
    torch.manual_seed(0)
    from kdig_study.config import ModelConfig
    from kdig_study.models import build_model
    model = build_model(ModelConfig(arch="convnet", width=0.125)).eval()
    images = torch.randint(0, 256, (6, 3, 32, 32), dtype=torch.uint8)
    labels = torch.arange(6)
    maps = torch.rand(6, 32, 32)
    mean, std = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
    f, p = deletion_curve(model, images, labels, maps, mean, std, CPU, steps=4)
    assert f == [0, 0.25, 0.5, 0.75, 1.0]
    x = (images.float() / 255 - 0.5) / 0.25
    with torch.no_grad():
        clean = torch.softmax(model(x), 1)[torch.arange(6), labels].mean().item()
        blank = torch.softmax(model(torch.zeros_like(x)), 1)[torch.arange(6), labels].mean()
    assert p[0] == pytest.approx(clean, rel=1e-5) and p[-1] == pytest.approx(blank.item(),
                                                                            rel=1e-5)
    assert area([0, 0.5, 1], [1, 1, 0]) == pytest.approx(0.75)


class _BlobDetector(torch.nn.Module):
    """Class 0's logit is the image's total brightness: only the bright blob matters."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = x.clamp_min(0).sum(dim=(1, 2, 3)) / 64
        return torch.stack([s, torch.zeros_like(s)], dim=1)


def test_deletion_against_other_images_maps_sees_alignment_not_shape() -> None:
    """Each image has one bright 8x8 blob at its own place; its map marks that blob. Random
    order scatters pixels and misses the blob, so any blob-shaped map beats it; the other
    images' maps have the same shape and must not: only the aligned map does."""
    n = 8
    images = torch.zeros(n, 3, 32, 32, dtype=torch.uint8)
    maps = torch.zeros(n, 32, 32)
    for i in range(n):
        r, c = 8 * (i // 4), 8 * (i % 4)
        images[i, :, r:r + 8, c:c + 8] = 255
        maps[i, r:r + 8, c:c + 8] = 1.0
    args = (_BlobDetector(), images, torch.zeros(n, dtype=torch.long), maps, (0, 0, 0),
            (1, 1, 1), CPU)
    f, own = deletion_curve(*args, order="map")
    _, rnd = deletion_curve(*args, order="random")
    _, other = deletion_curve(*args, order="other")
    assert area(f, own) < area(f, other) - 0.2  # 0.51 vs 0.81 (both floor at p = 0.5)
    # the other order is the map order of the maps rolled by one image
    _, rolled = deletion_curve(*args[:3], maps.roll(1, dims=0), *args[4:], order="map")
    assert other == rolled
    # the shape alone: a blob at the wrong place deletes no faster than scattered pixels
    assert area(f, other) >= area(f, rnd) - 0.02
    with pytest.raises(ValueError, match="allowed map, random, other"):
        deletion_curve(*args, order="shuffle")


@pytest.mark.slow
def test_attribute_cli_every_source(tmp_path: Path, warm_teacher: Path) -> None:
    # the maps of a 100-image training subset: every source's path, not its throughput
    proc = run_cli("attribute", "--study", "kd_ig", "--scale", "smoke", "--no-progress",
                   "--source", "all", "--preview", "2", "--set", "student_train.train_size=100")
    assert proc.returncode == 0, proc.stderr
    for source in MAP_SOURCES:
        assert f"{source}: computed 100 maps" in proc.stdout, source
    assert proc.stdout.count("deletion check") == len(MAP_SOURCES)
    assert "deletion ratio: vs random order, vs other images' maps" in proc.stdout
    assert_one_line_error(run_cli("attribute", "--study", "kd_ig", "--scale", "smoke",
                                  "--source", "ig,lime"), "--source ig,lime", "'lime'",
                          "gradcam")
