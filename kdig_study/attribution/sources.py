"""Map sources besides the teacher's IG maps: two controls and Captum's other attribution
methods, each through the same map store, reduction and overlay as IG.

* ``shuffled``: the IG maps of other training images, by a seeded derangement (no image
  gets its own map). Same maps, same values, no alignment with the image: the control for
  "does the content of the map matter?".
* ``shuffled_same_class``: the IG maps of other training images of the same class, by a
  seeded derangement within each class: "wrong image" without "wrong class" (``shuffled``
  gives about 90% of images a map from another class).
* ``random``: smooth random fields at the spatial scale of the IG maps (their measured
  autocorrelation width), each given exactly the values of its image's IG map by rank
  (histogram matching): the same per-map value distribution, blobs in random places. The
  control for "does any blob do?".
* ``constant``: one flat map at the mean value the IG maps overlay (the mean of
  minmax(map ** s) over maps and the exponent range): the overlay's photometric part alone,
  a contrast reduction toward that grey, with no spatial content (a flat map overlays its
  own value: kdig_study.overlay).
* ``saliency`` (|gradient|), ``input_x_gradient``, ``smoothgrad`` (NoiseTunnel over
  saliency), ``gradient_shap``, ``gradcam`` (LayerGradCam on the last feature block,
  upsampled by Captum's LayerAttribution.interpolate): Captum's implementations on the same
  teacher, target (the true label) and baseline as IG. Written by hand here: only the
  derangements, the random fields, the flat map and the chunked store around them; Captum
  has none of them.

Every map is reduced like IG's (sum over channels of |attr|, or the configured reduction),
except Grad-CAM, whose map is its own single channel (ReLU of the weighted activations).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
import torchvision.transforms.functional as TF
from captum.attr import (
    GradientShap,
    InputXGradient,
    LayerAttribution,
    LayerGradCam,
    NoiseTunnel,
    Saliency,
)

from kdig_study.attribution.numerics import frozen, make_baseline, reduce_channels
from kdig_study.attribution.store import ChunkFn, MapSpec, MapStore
from kdig_study.config import IGConfig
from kdig_study.data import normalize_uint8
from kdig_study.engine import autocast
from kdig_study.models import Net
from kdig_study.seeds import derive_seed

# computed from the IG maps, no attribution
DERIVED: tuple[str, ...] = ("shuffled", "shuffled_same_class", "random", "constant")
CAPTUM: tuple[str, ...] = ("saliency", "input_x_gradient", "smoothgrad", "gradient_shap",
                           "gradcam")


def uses_steps(source: str) -> bool:
    """Whether the source's maps depend on the IG step count."""
    return source == "ig" or source in DERIVED


def options(source: str, cfg: IGConfig, parent: MapStore | None = None) -> dict[str, Any]:
    """The settings that decide a source's maps (part of its store key)."""
    if source == "constant":  # its value depends on the overlay's exponent range
        assert parent is not None
        return {"parent": parent.root.name, "exponents": [cfg.exponent_low, cfg.exponent_high]}
    if source in DERIVED:
        assert parent is not None
        return {"seed": cfg.source_seed, "parent": parent.root.name}
    if source == "smoothgrad":
        return {"seed": cfg.source_seed, "samples": cfg.smoothgrad_samples,
                "sigma": cfg.smoothgrad_sigma}
    if source == "gradient_shap":
        return {"seed": cfg.source_seed, "samples": cfg.shap_samples}
    return {}


def source_spec(ig_spec: MapSpec, source: str, cfg: IGConfig,
                parent: MapStore | None = None) -> MapSpec:
    """The store spec of ``source`` beside the IG store spec ``ig_spec``."""
    if source == "ig":
        return ig_spec
    opts = json.dumps(options(source, cfg, parent), sort_keys=True)
    if source in DERIVED:
        return dataclasses.replace(ig_spec, source=source, options=opts)
    return dataclasses.replace(ig_spec, source=source, options=opts, method="", counts=(0,),
                               reduce="gradcam" if source == "gradcam" else ig_spec.reduce)


# ---------------------------------------------------------------------------------------------
# Controls derived from the IG maps


def derangement(n: int, seed: int) -> torch.Tensor:
    """A uniformly random permutation of range(n) without fixed points (rejection sampling:
    about e draws), seeded."""
    if n < 2:
        raise ValueError("a derangement needs at least 2 items")
    g = torch.Generator().manual_seed(derive_seed(seed, "derangement"))
    while True:
        perm = torch.randperm(n, generator=g)
        if not bool((perm == torch.arange(n)).any()):
            return perm


def autocorrelation_width(maps: np.ndarray) -> float:
    """The lag (pixels) at which the maps' mean normalised autocorrelation falls to 1/e.

    maps [N, H, W]; circular autocorrelation by FFT, averaged over maps and over the row and
    column directions, linearly interpolated between integer lags."""
    z = maps.astype(np.float64) - maps.mean(axis=(1, 2), keepdims=True)
    power = np.abs(np.fft.fft2(z)) ** 2
    ac = np.fft.ifft2(power).real  # [N, H, W]
    ac = ac / np.maximum(ac[:, :1, :1], 1e-30)
    h, w = ac.shape[1:]
    curve = 0.5 * (ac[:, 0, : w // 2].mean(0) + ac[:, : h // 2, 0].mean(0))  # lags 0..
    target = math.exp(-1)
    for lag in range(1, len(curve)):
        if curve[lag] < target:
            prev = curve[lag - 1]
            return float(lag - 1 + (prev - target) / max(prev - curve[lag], 1e-12))
    return float(len(curve))


def smooth_random_maps(ig_maps: np.ndarray, seed: int, width: float) -> np.ndarray:
    """[N, H, W]: Gaussian-filtered white noise whose autocorrelation falls to 1/e at
    ``width`` pixels (filtered noise correlates as exp(-r^2 / 4 sigma^2), so sigma = width/2),
    each then given the sorted values of the IG map of the same row, by rank."""
    n, h, w = ig_maps.shape
    g = torch.Generator().manual_seed(derive_seed(seed, "random-maps"))
    noise = torch.randn(n, 1, h, w, generator=g, dtype=torch.float64)
    sigma = max(width / 2, 1e-3)
    k = 2 * math.ceil(3 * sigma) + 1
    if sigma >= 0.2:  # below that the filter is the identity at this resolution
        noise = TF.gaussian_blur(noise, kernel_size=[k, k], sigma=[sigma, sigma])
    ranks = noise.view(n, -1).argsort(dim=1).argsort(dim=1).numpy()  # [N, H*W]
    values = np.sort(ig_maps.reshape(n, -1).astype(np.float32), axis=1)
    return np.take_along_axis(values, ranks, axis=1).reshape(n, h, w)


def class_derangement(labels: torch.Tensor, seed: int) -> torch.Tensor:
    """A permutation of range(len(labels)) that sends every row to another row of the same
    class (a seeded derangement within each class); a class of one image keeps its own map
    (said by the caller)."""
    perm = torch.arange(len(labels))
    for c in torch.unique(labels).tolist():
        rows = torch.nonzero(labels == c).flatten()
        if len(rows) >= 2:
            perm[rows] = rows[derangement(len(rows), derive_seed(seed, f"class-{c}"))]
    return perm


def overlay_mean(ig_maps: np.ndarray, exponent_low: float, exponent_high: float,
                 grid: int = 16) -> float:
    """The mean value the IG overlay blends in: minmax(map ** s) averaged over pixels, maps
    (up to 2,000) and s log-uniform in [low, high] (the midpoints of ``grid`` equal-
    probability bins)."""
    from kdig_study.overlay import minmax

    maps = torch.from_numpy(np.asarray(ig_maps[:2000], dtype=np.float32)).clamp_min(0)
    logs = np.linspace(math.log(exponent_low), math.log(exponent_high), 2 * grid + 1)[1::2]
    return float(np.mean([minmax(maps.pow(math.exp(e))).mean().item() for e in logs]))


def derived_maps(source: str, ig_maps: np.ndarray, seed: int,
                 labels: torch.Tensor | None = None,
                 exponents: tuple[float, float] = (1.0, 2.0)) -> tuple[np.ndarray, dict]:
    """The maps of a control (``shuffled``, ``shuffled_same_class``, ``random``,
    ``constant``) of one IG step count, and what was measured."""
    if source == "shuffled":
        perm = derangement(len(ig_maps), seed).numpy()
        return np.asarray(ig_maps)[perm], {}
    if source == "shuffled_same_class":
        assert labels is not None
        perm = class_derangement(labels, seed).numpy()
        kept = int((perm == np.arange(len(perm))).sum())
        return np.asarray(ig_maps)[perm], {"own_map_kept": kept}
    if source == "constant":
        value = overlay_mean(ig_maps, *exponents)
        return np.full(np.shape(ig_maps), value, np.float32), {"constant_value": value}
    sample = np.asarray(ig_maps[: min(len(ig_maps), 2000)], dtype=np.float32)
    width = autocorrelation_width(sample)
    maps = smooth_random_maps(np.asarray(ig_maps), seed, width)
    return maps, {"ig_autocorrelation_width": width,
                  "random_autocorrelation_width": autocorrelation_width(maps[:2000])}


def derived_chunks(source: str, parent: MapStore, counts: tuple[int, ...], cfg: IGConfig,
                   labels: torch.Tensor, measured: dict[str, Any]) -> ChunkFn:
    """A chunk function over the whole derived arrays (computed once, sliced per chunk);
    ``labels``: the stored images' classes, row for row."""
    full: dict[int, np.ndarray] = {}
    for c in counts:
        full[c], info = derived_maps(source, parent.maps(c), cfg.source_seed, labels,
                                     (cfg.exponent_low, cfg.exponent_high))
        measured.update({f"{k}_s{c}": v for k, v in info.items()})

    def chunk(start: int, stop: int) -> tuple[np.ndarray, np.ndarray, dict]:
        maps = np.stack([full[c][start:stop] for c in counts])
        return maps, np.full((len(counts), stop - start), np.nan, np.float32), {}
    return chunk


# ---------------------------------------------------------------------------------------------
# Captum's methods


def captum_attribute(source: str, model: Net, x: torch.Tensor, target: torch.Tensor,
                     baseline: torch.Tensor, cfg: IGConfig) -> torch.Tensor:
    """Captum's attribution of ``x`` ([B, 3, H, W] normalised) for ``target`` ([B]):
    [B, 3, H, W], or [B, 1, H, W] upsampled for Grad-CAM. Draws noise from the global torch
    generator (seed it around the call)."""
    if source == "saliency":
        return Saliency(model).attribute(x, target=target, abs=True)
    if source == "input_x_gradient":
        return InputXGradient(model).attribute(x, target=target)
    if source == "smoothgrad":
        return NoiseTunnel(Saliency(model)).attribute(
            x, nt_type="smoothgrad", nt_samples=cfg.smoothgrad_samples,
            nt_samples_batch_size=max(1, cfg.internal_batch // x.shape[0]),
            stdevs=cfg.smoothgrad_sigma, target=target, abs=True)
    if source == "gradient_shap":
        return GradientShap(model).attribute(x, baselines=baseline, n_samples=cfg.shap_samples,
                                             stdevs=0.0, target=target)
    if source == "gradcam":
        cam = LayerGradCam(model, model.cam_layer(x.shape[-1])).attribute(x, target=target,
                                                                relu_attributions=True)
        return LayerAttribution.interpolate(cam, tuple(x.shape[-2:]), interpolate_mode="bilinear")
    raise ValueError(f"not a Captum source: {source!r}")


def captum_chunks(spec: MapSpec, teacher: Net, images: torch.Tensor, labels: torch.Tensor,
                  mean: tuple[float, ...], std: tuple[float, ...], cfg: IGConfig,
                  device: torch.device) -> ChunkFn:
    """Chunks of a Captum source's maps, on the eval-mode teacher (no parameter gradients),
    under the store's precision; noise seeded per chunk from the source seed."""
    mean_t = torch.tensor(mean, device=device).view(1, 3, 1, 1)
    std_t = torch.tensor(std, device=device).view(1, 3, 1, 1)
    model = teacher.to(device)

    def chunk(start: int, stop: int) -> tuple[np.ndarray, np.ndarray, dict]:
        x = normalize_uint8(images[start:stop], mean_t, std_t, device).contiguous()
        base = make_baseline(spec.baseline, x, mean_t, std_t)
        with frozen(model), seeded(chunk_seed(cfg.source_seed, spec.source, start)), \
                autocast(spec.precision, device):
            attr = captum_attribute(spec.source, model, x, labels[start:stop].to(device), base,
                                    cfg).float()
        maps = attr[:, 0] if spec.source == "gradcam" else reduce_channels(attr, spec.reduce)
        return (maps.detach().cpu().numpy()[None],
                np.full((1, stop - start), np.nan, np.float32), {})
    return chunk


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Torch's and NumPy's global generators seeded for the block, restored after it:
    Captum draws SmoothGrad's noise from torch and GradientShap's path points and baselines
    from NumPy's global generator."""
    state = np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        np.random.seed(seed % (2 ** 32))
        try:
            yield
        finally:
            np.random.set_state(state)


def chunk_seed(seed: int, source: str, start: int) -> int:
    """The torch seed of the chunk starting at row ``start`` (so a resumed store draws the
    same noise as an uninterrupted one)."""
    return derive_seed(seed, f"{source}:{start}")
