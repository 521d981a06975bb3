"""Integrated Gradients to a target accuracy: adaptive points per image.

A fixed step count pays the worst image's price for every image; most images converge with
few points. Here every image starts with ``start`` intervals of a nested rule (trapezoid or
Clenshaw-Curtis: the points of n intervals are among those of 2n), and only the images
whose completeness gap is still above ``target`` get the next level's new points, until
the cap. The gap needs no extra work: f(x) and f(baseline) come from the rule's own end
points, so sum(attr) - (f(x) - f(b)) is known after every level.

Bookkeeping: the union of every level's points, with one weight row per level (as
``union_rule`` builds for the study's step counts), so an image stopping at level L has
exactly the attribution of the fixed rule with L's intervals, from the same gradients.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kdig_study.attribution.numerics import frozen, path_gradients, relative_gap, union_rule
from kdig_study.models import Net


def levels(start: int, cap: int) -> list[int]:
    """Interval counts start, 2 start, ... up to cap (cap itself if not a doubling)."""
    out = [start]
    while out[-1] * 2 <= cap:
        out.append(out[-1] * 2)
    return out


@dataclass
class AdaptiveBatch:
    attributions: torch.Tensor  # [B, 3, H, W]
    gap: torch.Tensor  # [B] relative completeness gap at the level each image stopped
    points: torch.Tensor  # [B] gradient evaluations each image used
    level: torch.Tensor  # [B] index into levels(start, cap)


def adaptive_ig(model: Net, x: torch.Tensor, target: torch.Tensor, baseline: torch.Tensor,
                rule: str, start: int, cap: int, target_gap: float,
                internal_batch: int = 256) -> AdaptiveBatch:
    """IG of ``x`` ([B, 3, H, W] normalised) for labels ``target`` against ``baseline``,
    each image refined until its relative completeness gap is <= ``target_gap``."""
    counts = levels(start, cap)
    alphas, weights = union_rule(rule, counts)  # [K], [L, K]
    device = x.device
    b = x.shape[0]
    w = weights.to(device=device, dtype=torch.float32)
    diff = x - baseline
    acc = torch.zeros((len(counts), *x.shape), device=device)  # per level: sum_j w_j g_j
    seen = torch.zeros(alphas.numel(), dtype=torch.bool)
    active = torch.arange(b, device=device)
    ends = torch.zeros(2, b, device=device)  # f_y(baseline), f_y(x)
    out_attr = torch.zeros_like(x, dtype=torch.float32)
    out_gap = torch.full((b,), float("nan"), device=device)
    out_points = torch.zeros(b, dtype=torch.long, device=device)
    out_level = torch.zeros(b, dtype=torch.long, device=device)
    tgt = target.to(device)
    with frozen(model):
        for li in range(len(counts)):
            new = ((w[li] != 0).cpu() & ~seen).nonzero().squeeze(1)  # this level's new points
            seen[new] = True
            ba, da, ta = baseline[active], diff[active], tgt[active]
            m = active.numel()
            per_pass = max(1, internal_batch // m)
            for s in range(0, new.numel(), per_pass):
                idx = new[s: s + per_pass]
                grad, picked = path_gradients(model, ba, da, alphas[idx], ta)
                # [L, k] x [k, m*3*H*W] into every level's running sum, active rows only
                acc[:, active] += (w[:, idx.to(device)] @ grad).view(
                    len(counts), m, *x.shape[1:])
                for j, alpha in enumerate(alphas[idx].tolist()):
                    if alpha in (0.0, 1.0):  # both nested rules include the path's ends
                        ends[int(alpha), active] = picked[j]
            attr = da.float() * acc[li, active]
            gap = relative_gap(attr, ends[1, active] - ends[0, active])
            done = gap <= target_gap
            if li == len(counts) - 1:
                done = torch.ones_like(done)
            rows = active[done]
            out_attr[rows] = attr[done]
            out_gap[rows] = gap[done]
            out_points[rows] = int(seen.sum())
            out_level[rows] = li
            active = active[~done]
            if active.numel() == 0:
                break
    return AdaptiveBatch(out_attr, out_gap, out_points, out_level)
