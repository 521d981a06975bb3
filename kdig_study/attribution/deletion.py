"""Sanity check of a map source: the deletion curve.

A faithful attribution ranks the pixels the model relies on first, so removing pixels in
the order of the map should drop the model's true-class probability faster than removing
them in a random order or in the order of another image's map (:func:`deletion_curve`); the
area under the curve (:func:`area`) sums it up.
"""

from __future__ import annotations

import torch

from kdig_study.data import normalize_uint8
from kdig_study.models import Net


def deletion_curve(model: Net, images: torch.Tensor, labels: torch.Tensor, maps: torch.Tensor,
                   mean: tuple[float, ...], std: tuple[float, ...], device: torch.device,
                   steps: int = 16, order: str = "map", seed: int = 0
                   ) -> tuple[list[float], list[float]]:
    """The teacher's mean true-class probability as the top-ranked pixels are removed.

    images [N, 3, H, W] uint8, maps [N, H, W]; pixels (all three channels) are replaced by
    the zero baseline of the normalised input space (the data set's mean colour), highest
    map value first (``order="map"``), in a seeded random order (``order="random"``), or
    highest value first of another image's map (``order="other"``: image i ranked by the
    map of image i - 1, a derangement), in ``steps`` equal fractions. Returns (fractions,
    probabilities); a faithful attribution drops the probability faster than either
    reference: a smaller area under the curve. Random order scatters single pixels, which
    a CNN misses less than the contiguous blobs a smooth map removes; the other images'
    maps remove blobs of the same shapes, so only their alignment with the image differs.
    """
    n, _, h, w = images.shape
    x = normalize_uint8(images, mean, std)
    if order == "other":
        maps, order = maps.roll(1, dims=0), "map"
    if order == "map":
        # ties broken at random, so a flat map deletes like random order
        g = torch.Generator().manual_seed(seed)
        jitter = torch.rand(n, h * w, generator=g) * 1e-6
        score = maps.reshape(n, -1).float()
        scale = score.abs().amax(dim=1, keepdim=True).clamp_min(1e-12)
        rank = torch.argsort(score / scale + jitter, dim=1, descending=True)
    elif order == "random":
        g = torch.Generator().manual_seed(seed)
        rank = torch.stack([torch.randperm(h * w, generator=g) for _ in range(n)])
    else:
        raise ValueError(f"order {order!r}: allowed map, random, other")
    fractions = [k / steps for k in range(steps + 1)]
    probs = []
    model = model.to(device).eval()
    with torch.inference_mode():
        for f in fractions:
            k = round(f * h * w)
            keep = torch.ones(n, h * w)
            keep.scatter_(1, rank[:, :k], 0.0)
            xd = (x * keep.view(n, 1, h, w)).to(device)
            p = torch.softmax(model(xd).float(), dim=1)
            probs.append(p.gather(1, labels.to(device).view(-1, 1)).mean().item())
    return fractions, probs


def area(fractions: list[float], values: list[float]) -> float:
    """Trapezoid area under a curve sampled at ``fractions``."""
    return float(sum((fractions[i + 1] - fractions[i]) * (values[i] + values[i + 1]) / 2
                     for i in range(len(fractions) - 1)))

