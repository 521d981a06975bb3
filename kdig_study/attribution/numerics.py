"""Integrated Gradients numerics: the quadrature rules, baselines, channel reduction, the
shared gradient pass and the batched integrator.

IG of image x for its label y against a baseline b (Sundararajan et al. 2017):
    attr = (x - b) * integral_0^1 d f_y(b + a (x - b)) / dx da,
approximated by a weighted sum over points a_k. Map = a channel reduction of attr
(the paper: sum over channels of |attr|), one 32x32 map per training image.

Why a hand-written integrator instead of calling Captum for every image: Captum is the
reference (tests compare against it), but it evaluates one step count per call. A study
searches over step counts; with a nested rule (trapezoid on 8/16/32/64 intervals: every
coarser grid is a subset of the finest) one pass over the finest grid yields the maps of
every count at once, for 65 gradient evaluations per image instead of 9+17+33+65 = 124.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torchvision.transforms.functional as TF
from captum.attr._utils.approximation_methods import approximation_parameters

from kdig_study.models import Net

# Our own nested rules plus Captum's rules, used through Captum's own alpha/weight builders.
METHODS: tuple[str, ...] = ("trapezoid", "clenshaw_curtis", "gausslegendre", "riemann_middle",
                            "riemann_left", "riemann_right", "riemann_trapezoid")


def quadrature(method: str, steps: int) -> tuple[list[float], list[float]]:
    """Points a_k in [0, 1] and weights w_k of one rule with ``steps`` steps.

    ``trapezoid``: ``steps`` intervals, so steps + 1 points (both ends), weights summing to 1.
    (Captum's ``riemann_trapezoid`` with n steps puts n points on linspace(0, 1, n) but gives
    them weights 1/n, which sum to (n - 1)/n: every attribution comes out (n - 1)/n too small.
    Ours on ``steps`` intervals equals Captum's on steps + 1 points times (steps + 1)/steps.)
    Every other method is Captum's, with Captum's alphas and step sizes.
    """
    if method == "trapezoid":
        if steps < 1:
            raise ValueError("trapezoid needs at least one interval")
        alphas = [i / steps for i in range(steps + 1)]
        weights = [1.0 / steps] * (steps + 1)
        weights[0] /= 2
        weights[-1] /= 2
        return alphas, weights
    if method == "clenshaw_curtis":
        return clenshaw_curtis(steps)
    step_sizes, alpha_fn = approximation_parameters(method)
    return list(alpha_fn(steps)), list(step_sizes(steps))


def clenshaw_curtis(n: int) -> tuple[list[float], list[float]]:
    """Clenshaw-Curtis on [0, 1] with n intervals: the n + 1 points (1 - cos(j pi / n)) / 2
    and weights that integrate every polynomial of degree <= n exactly. Written here
    because neither Captum nor SciPy has it; it nests like the trapezoid rule (the points of
    n are among those of 2n) and converges like Gauss for smooth integrands.

    Weights: the moment equations in the Chebyshev basis, sum_j w_j T_k(t_j) =
    integral_{-1}^{1} T_k = 2 / (1 - k^2) (k even; 0 for odd k), solved exactly (the
    Chebyshev-Vandermonde matrix on these points is well conditioned), halved for [0, 1]."""
    if n < 1:
        raise ValueError("Clenshaw-Curtis needs at least one interval")
    j = np.arange(n + 1)
    t = np.cos(np.pi * j / n)  # 1 .. -1
    k = np.arange(n + 1)
    vander = np.cos(np.outer(k, np.arccos(t)))  # T_k(t_j)
    moments = np.zeros(n + 1)
    even = k[k % 2 == 0]
    moments[even] = 2.0 / (1.0 - even.astype(float) ** 2)
    w = np.linalg.solve(vander, moments) / 2
    alphas = (1 - t) / 2  # 0 .. 1
    return [float(a) for a in alphas], [float(x) for x in w]


def union_rule(method: str, counts: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """One set of points serving several step counts.

    Returns alphas [K] and weights [len(counts), K] (zero where a count does not use a
    point). With a nested rule K is the finest count's points; otherwise the union.
    """
    keyed: dict[float, int] = {}
    per_count = []
    for n in counts:
        alphas, weights = quadrature(method, n)
        per_count.append((alphas, weights))
        for a in alphas:
            keyed.setdefault(round(a, 12), len(keyed))
    alpha_t = torch.zeros(len(keyed), dtype=torch.float64)
    for a, k in keyed.items():
        alpha_t[k] = a
    weight_t = torch.zeros(len(counts), len(keyed), dtype=torch.float64)
    for c, (alphas, weights) in enumerate(per_count):
        for a, w in zip(alphas, weights, strict=True):
            weight_t[c, keyed[round(a, 12)]] += w
    return alpha_t, weight_t


def make_baseline(kind: str, x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor
                  ) -> torch.Tensor:
    """Baselines in the normalised input space. x: [B, 3, H, W] normalised.

    zeros: the all-zero normalised input (the data set's mean colour; the paper's choice);
    black: a black image; blur: the image under a strong Gaussian blur (sigma 5 px).
    """
    if kind == "zeros":
        return torch.zeros_like(x)
    if kind == "black":
        return ((0.0 - mean) / std).expand_as(x).contiguous(memory_format=torch.channels_last)
    if kind == "blur":
        return TF.gaussian_blur(x, kernel_size=[21, 21], sigma=[5.0, 5.0])
    raise ValueError(f"unknown baseline {kind!r}")


def reduce_channels(attr: torch.Tensor, how: str) -> torch.Tensor:
    """[..., 3, H, W] -> [..., H, W]."""
    if how == "abs_sum":
        return attr.abs().sum(-3)
    if how == "sum_abs":
        return attr.sum(-3).abs()
    if how == "l2":
        return attr.pow(2).sum(-3).sqrt()
    raise ValueError(f"unknown reduction {how!r}")


@contextlib.contextmanager
def frozen(model: Net) -> Iterator[Net]:
    """Eval mode with no parameter gradients: IG needs gradients w.r.t. the input only."""
    flags = [p.requires_grad for p in model.parameters()]
    was_training = model.training
    model.eval().requires_grad_(False)
    try:
        yield model
    finally:
        for p, f in zip(model.parameters(), flags, strict=True):
            p.requires_grad_(f)
        model.train(was_training)


def path_gradients(model: Net, baseline: torch.Tensor, diff: torch.Tensor,
                   alphas: torch.Tensor, target: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """The gradient pass every integrator here shares: input gradients of the target logit
    at the k path points baseline + a * diff, for every a in ``alphas`` and each of B images,
    in one forward/backward of k * B inputs.

    baseline, diff [B, 3, H, W] and target [B] on the model's device; alphas [k] (any dtype
    or device: evaluated in float32). Returns the gradients [k, B*3*H*W] float32 (one
    flattened row per point, ready to be weighted into a rule's sum) and f_y at the points
    [k, B] float32, detached (at a = 0 and a = 1: the path's ends, for the completeness gap).
    Call it inside :func:`frozen`, and inside the autocast of the caller's precision.
    """
    device = diff.device
    a = alphas.to(device=device, dtype=torch.float32)
    k, b = a.numel(), diff.shape[0]
    with torch.enable_grad():
        pts = (baseline.unsqueeze(0) + a.view(k, 1, 1, 1, 1) * diff.unsqueeze(0)).reshape(
            k * b, *diff.shape[1:]).contiguous(memory_format=torch.channels_last)
        pts.requires_grad_(True)
        picked = model(pts).float().gather(1, target.repeat(k).view(-1, 1)).view(k, b)
        (grad,) = torch.autograd.grad(picked.sum(), pts)
    return grad.reshape(k, -1).float(), picked.detach()


@dataclass
class IGBatch:
    attributions: torch.Tensor  # [C, B, 3, H, W] float32, one per step count
    delta: torch.Tensor  # [B] f_y(x) - f_y(baseline)


def integrated_gradients(model: Net, x: torch.Tensor, target: torch.Tensor,
                         baseline: torch.Tensor, alphas: torch.Tensor, weights: torch.Tensor,
                         internal_batch: int = 256) -> IGBatch:
    """IG for images ``x`` ([B, 3, H, W] normalised) at several step counts in one pass.

    alphas [K], weights [C, K] from :func:`union_rule`. Gradients are evaluated at
    min(K, internal_batch // B) points at a time (at least one), i.e. about
    ``internal_batch`` images per forward/backward.
    """
    b = x.shape[0]
    device = x.device
    diff = x - baseline
    w = weights.to(device=device, dtype=torch.float32)
    acc = torch.zeros((w.shape[0], *x.shape), device=device)  # [C, B, 3, H, W]
    per_pass = max(1, internal_batch // b)
    tgt = target.to(device)
    # f_y at the path's ends, for the completeness check; a rule that evaluates a = 0 or
    # a = 1 (trapezoid) gets them from its own pass instead of extra forwards.
    ends: dict[float, torch.Tensor] = {}
    with frozen(model):
        for start in range(0, alphas.numel(), per_pass):
            a = alphas[start: start + per_pass]
            k = a.numel()
            grad, picked = path_gradients(model, baseline, diff, a, tgt)
            # [C, k] x [k, B*3*H*W]: weight the gradients of this pass into each count's sum
            acc += (w[:, start: start + k] @ grad).view_as(acc)
            for j, alpha in enumerate(a.tolist()):
                if alpha in (0.0, 1.0):
                    ends[alpha] = picked[j]
        missing = [alpha for alpha in (1.0, 0.0) if alpha not in ends]
        if missing:
            with torch.no_grad():
                inputs = torch.cat([x if alpha == 1.0 else baseline for alpha in missing])
                out = model(inputs.contiguous(memory_format=torch.channels_last))
                fy = out.gather(1, tgt.repeat(len(missing)).view(-1, 1)).view(-1, b).float()
            ends.update(zip(missing, fy, strict=True))
    return IGBatch(attributions=diff.unsqueeze(0).float() * acc, delta=ends[1.0] - ends[0.0])


def relative_gap(attr: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """Completeness gap |sum(attr) - (f(x) - f(b))| / max(|f(x) - f(b)|, 1e-6).

    attr [..., B, 3, H, W], delta [B] -> [..., B]."""
    total = attr.flatten(-3).sum(-1)
    return (total - delta).abs() / delta.abs().clamp_min(1e-6)
