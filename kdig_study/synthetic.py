"""A small, learnable stand-in for CIFAR-10, for tests and the smoke scale.

Each class is a shape (disk, square, triangle, ring, plus, striped patches, checker, X,
diamond) drawn at a random position, size and colour on a noisy background. Every shape is
symmetric under a horizontal flip, so flip augmentation keeps labels right; a small CNN
learns it in a few hundred steps, and IG maps should fall on the shape.
"""

from __future__ import annotations

import torch

CLASSES: tuple[str, ...] = ("disk", "square", "triangle", "ring", "plus", "hbars", "vbars",
                            "checker", "cross", "diamond")


def _masks(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Shape masks on object coordinates u, v ([N, H, W], the object spans about [-1, 1]).

    Returns [10, N, H, W] bool, one plane per class.
    """
    r = torch.sqrt(u * u + v * v)
    box = torch.maximum(u.abs(), v.abs())
    inside = box < 1.0
    return torch.stack([
        r < 1.0,
        box < 0.8,
        (v > -0.9) & (v < 0.8) & (u.abs() < (v + 0.9) * 0.55),
        (r > 0.55) & (r < 1.0),
        ((u.abs() < 0.3) | (v.abs() < 0.3)) & inside,
        inside & (torch.floor((v + 1.0) * 2.5).remainder(2) == 0),
        inside & (torch.floor((u + 1.0) * 2.5).remainder(2) == 0),
        inside & ((torch.floor((u + 1.0) * 2.0) + torch.floor((v + 1.0) * 2.0)).remainder(2) == 0),
        ((u.abs() - v.abs()).abs() < 0.3) & inside,
        (u.abs() + v.abs()) < 1.0,
    ])


def generate(n: int, seed: int, size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` images ([n, 3, size, size] uint8) and labels ([n] int64), balanced over classes."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % len(CLASSES)
    labels = labels[torch.randperm(n, generator=g)]
    ys, xs = torch.meshgrid(torch.arange(size, dtype=torch.float32),
                            torch.arange(size, dtype=torch.float32), indexing="ij")
    cy = size / 2 + (torch.rand(n, generator=g) - 0.5) * size * 0.35  # [n]
    cx = size / 2 + (torch.rand(n, generator=g) - 0.5) * size * 0.35
    radius = size * (0.22 + 0.12 * torch.rand(n, generator=g))
    u = (xs[None] - cx[:, None, None]) / radius[:, None, None]  # [n, H, W]
    v = (ys[None] - cy[:, None, None]) / radius[:, None, None]
    mask = _masks(u, v)[labels, torch.arange(n)]  # [n, H, W]: each image's own class
    bg = 0.45 * torch.rand(n, 3, 1, 1, generator=g)
    fg = 0.55 + 0.45 * torch.rand(n, 3, 1, 1, generator=g)
    swap = torch.rand(n, 1, 1, 1, generator=g) < 0.5  # dark shapes on light ground, too
    bg, fg = torch.where(swap, fg, bg), torch.where(swap, bg, fg)
    img = torch.where(mask[:, None], fg, bg)
    img = img + 0.06 * torch.randn(img.shape, generator=g)
    images = (img.clamp(0, 1) * 255).round().to(torch.uint8)
    return images, labels.long()
