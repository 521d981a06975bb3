"""The IG overlay (applied by the loader after crop/flip, before normalisation) and the
preview grid of images, maps and overlays."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from kdig_study.paths import atomic_write


def minmax(m: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Per-image min-max to [0, 1]. m: [B, H, W]."""
    flat = m.flatten(1)
    lo = flat.min(1).values.view(-1, 1, 1)
    hi = flat.max(1).values.view(-1, 1, 1)
    return (m - lo) / (hi - lo).clamp_min(eps)


class IGOverlay:
    """With probability ``prob`` per image: x' = (1 - lam) x + lam M, M = minmax(map ** s)
    repeated over the 3 channels, s log-uniform in [low, high] per image (docs/design.md,
    section 4).

    Works on [0, 1] images, after the crop/flip that the map shared, before normalisation.
    """

    def __init__(self, prob: float, strength: float, exponent_low: float = 1.0,
                 exponent_high: float = 2.0) -> None:
        self.prob, self.strength = prob, strength
        self.log_low, self.log_high = math.log(exponent_low), math.log(exponent_high)

    @property
    def active(self) -> bool:
        return self.prob > 0 and self.strength > 0

    def __call__(self, x01: torch.Tensor, planes: torch.Tensor,
                 gen: torch.Generator) -> torch.Tensor:
        """x01 [B, 3, H, W] in [0, 1], planes [B, 1, H, W] (the maps) -> a new [B, 3, H, W]."""
        if not self.active:
            return x01
        b = x01.shape[0]
        device = x01.device
        chosen = (torch.rand(b, generator=gen) < self.prob).to(device)  # [B]
        s = torch.exp(self.log_low + (self.log_high - self.log_low)
                      * torch.rand(b, generator=gen)).to(device)  # [B]
        p = planes[:, 0].float().clamp_min(0)  # [B, H, W]
        m = minmax(p.pow(s.view(b, 1, 1)))
        # a flat map (the constant control) has no contrast to stretch: it overlays its own
        # value (an all-zero map overlays 0 either way)
        flat = p.flatten(1).amax(1) == p.flatten(1).amin(1)  # [B]
        m = torch.where(flat.view(b, 1, 1), p, m)
        blended = torch.lerp(x01, m.unsqueeze(1).expand_as(x01), self.strength)
        return torch.where(chosen.view(b, 1, 1, 1), blended, x01)


def _heat(m: np.ndarray) -> np.ndarray:
    """[H, W] in [0, 1] -> [H, W, 3] uint8, black-red-yellow-white."""
    r = np.clip(3 * m, 0, 1)
    g = np.clip(3 * m - 1, 0, 1)
    b = np.clip(3 * m - 2, 0, 1)
    return (np.stack([r, g, b], -1) * 255).astype(np.uint8)


def preview_grid(images: torch.Tensor, maps: torch.Tensor, strength: float = 0.5,
                 exponent: float = 1.5, scale: int = 4) -> Image.Image:
    """One row per sample: image | map | overlay (at ``strength``, map ** ``exponent``).

    images [n, 3, H, W] uint8, maps [n, H, W]."""
    n, _, h, w = images.shape
    x01 = images.float() / 255
    m = minmax(maps.float().clamp_min(0).pow(exponent))
    over = torch.lerp(x01, m.unsqueeze(1).expand_as(x01), strength)
    pad = 2
    canvas = np.full((n * (h + pad) + pad, 3 * (w + pad) + pad, 3), 255, np.uint8)
    for i in range(n):
        cells = [(x01[i].permute(1, 2, 0).numpy() * 255).astype(np.uint8),
                 _heat(m[i].numpy()),
                 (over[i].permute(1, 2, 0).numpy() * 255).astype(np.uint8)]
        for j, cell in enumerate(cells):
            y0, x0 = pad + i * (h + pad), pad + j * (w + pad)
            canvas[y0:y0 + h, x0:x0 + w] = cell
    img = Image.fromarray(canvas)
    return img.resize((img.width * scale, img.height * scale), Image.NEAREST)


def save_preview(path: Path, images: torch.Tensor, maps: torch.Tensor,
                 strength: float = 0.5) -> Path:
    grid = preview_grid(images, maps, strength)
    atomic_write(path, lambda tmp: grid.save(tmp, format="PNG"))
    return path


def source_gallery(images: torch.Tensor, maps: dict[str, torch.Tensor], strength: float = 0.5,
                   exponent: float = 1.5, scale: int = 3) -> Image.Image:
    """One row per map source, labelled: for each of the n images, image | map | overlay.

    images [n, 3, H, W] uint8 (the same images in every row), maps {source: [n, H, W]}."""
    from PIL import ImageDraw

    rows = [preview_grid(images, m, strength, exponent, scale=1) for m in maps.values()]
    # preview_grid stacks images vertically; lay each source's cells out in one row instead
    n, _, h, w = images.shape
    pad, label_w = 2, 110
    cell_w = 3 * (w + pad)
    canvas = Image.new("RGB", (label_w + n * cell_w + pad, len(rows) * (h + pad) + pad),
                       "white")
    for r, grid in enumerate(rows):
        for i in range(n):
            cells = grid.crop((pad, pad + i * (h + pad), pad + cell_w - pad,
                               pad + i * (h + pad) + h))
            canvas.paste(cells, (label_w + i * cell_w, pad + r * (h + pad)))
    big = canvas.resize((canvas.width * scale, canvas.height * scale), Image.NEAREST)
    draw = ImageDraw.Draw(big)
    for r, name in enumerate(maps):
        draw.text((6, (pad + r * (h + pad)) * scale + h * scale // 2 - 6), name, fill="black")
    return big
