from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from torch import nn

from kdig_study.config import load_study
from kdig_study.data import BatchLoader, ImageSet, load_bundle
from kdig_study.engine import Distillation, seeded_model, train
from kdig_study.models import build_model
from kdig_study.overlay import IGOverlay, minmax, preview_grid

CPU = torch.device("cpu")


def _set(n: int = 64, seed: int = 0) -> tuple[ImageSet, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 3, 32, 32), generator=g, dtype=torch.uint8)
    maps = torch.rand(n, 1, 32, 32, generator=g)
    return ImageSet(images, torch.zeros(n, dtype=torch.long)), maps


def _batches(data, planes, overlay, seed=3):
    loader = BatchLoader(data, batch_size=32, mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3),
                         train=True, seed=seed, planes=planes, overlay=overlay)
    return list(loader)


@pytest.mark.parametrize("prob,lam", [(0.0, 0.5), (0.7, 0.0), (0.0, 0.0)])
def test_p0_or_lam0_leaves_the_batch_bit_identical(prob: float, lam: float) -> None:
    data, maps = _set()
    plain = _batches(data, None, None)
    over = _batches(data, maps, IGOverlay(prob, lam))
    for a, b in zip(plain, over, strict=True):
        assert torch.equal(a.x, b.x) and torch.equal(a.index, b.index)


def test_full_overlay_is_minmax_of_the_map_power() -> None:
    data, maps = _set()
    ov = IGOverlay(prob=1.0, strength=1.0, exponent_low=1.7, exponent_high=1.7)
    x01 = data.images[:8].float() / 255
    out = ov(x01, maps[:8], torch.Generator().manual_seed(0))
    expect = minmax(maps[:8, 0].pow(1.7)).unsqueeze(1).expand(-1, 3, -1, -1)
    assert torch.allclose(out, expect, atol=1e-6)
    flat = out[:, 0].flatten(1)
    assert torch.allclose(flat.min(1).values, torch.zeros(8))
    assert torch.allclose(flat.max(1).values, torch.ones(8))
    half = IGOverlay(prob=1.0, strength=0.5, exponent_low=1.7, exponent_high=1.7)
    out = half(x01, maps[:8], torch.Generator().manual_seed(0))
    assert torch.allclose(out, 0.5 * x01 + 0.5 * expect, atol=1e-6)
    assert torch.equal(x01, data.images[:8].float() / 255)  # input untouched


def test_probability_and_exponent_range() -> None:
    data, maps = _set(4000)
    ov = IGOverlay(prob=0.25, strength=1.0, exponent_low=1.0, exponent_high=2.0)
    x01 = torch.full((4000, 3, 32, 32), 0.123)
    out = ov(x01, maps, torch.Generator().manual_seed(1))
    changed = (out != x01).flatten(1).any(1).float().mean().item()
    assert 0.22 < changed < 0.28


def test_planted_map_follows_its_image_through_crop_and_flip() -> None:
    # The map of each image is planted as that image's red channel. After the loader's
    # crop/flip and a full overlay with exponent 1, the student's input must be minmax of
    # the red channel of the teacher's (clean, equally cropped) input.
    data, _ = _set(96, seed=4)
    planted = data.images[:, :1].float()
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    loader = BatchLoader(data, batch_size=32, mean=mean, std=std, train=True, seed=9,
                         planes=planted, overlay=IGOverlay(1.0, 1.0, 1.0, 1.0))
    m = torch.tensor(mean).view(1, 3, 1, 1)
    s = torch.tensor(std).view(1, 3, 1, 1)
    for batch in loader:
        student = batch.x * s + m
        clean = batch.x_clean * s + m
        expect = minmax(clean[:, 0]).unsqueeze(1).expand(-1, 3, -1, -1)
        assert torch.allclose(student, expect, atol=1e-5)
        # wrong pairing (another image's map) would not match
        assert not torch.allclose(student, expect.roll(1, 0), atol=1e-3)


class _Spy(nn.Module):
    """Wraps a model and keeps every input it is called with."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner, self.seen = inner, []
        self.features = inner.features

    def forward(self, x):
        self.seen.append(x.detach().clone())
        return self.inner(x)

    def forward_tap(self, x, tap):
        self.seen.append(x.detach().clone())
        return self.inner.forward_tap(x, tap)


def test_kd_ig_teacher_sees_the_clean_augmented_image() -> None:
    cfg = load_study("kd_ig", "smoke")
    data = load_bundle(cfg.data)
    mean = torch.tensor(data.mean).view(1, 3, 1, 1)
    std = torch.tensor(data.std).view(1, 3, 1, 1)
    teacher = _Spy(seeded_model(lambda: build_model(cfg.teacher), 1))
    student = _Spy(seeded_model(lambda: build_model(cfg.student), 2))
    maps = torch.rand(len(data.train), 1, 32, 32)
    tc = dataclasses.replace(cfg.student_train, epochs=1, precision="fp32")
    train(student, data.train, data, tc, device=CPU, progress=False, evaluate_test=False,
          distill=Distillation(teacher, cfg.kd), planes=maps, overlay=IGOverlay(1.0, 0.5))
    n_steps = len(teacher.seen)
    assert n_steps > 0
    for t_in, s_in in zip(teacher.seen, student.seen[:n_steps], strict=True):
        pixels = (t_in.float() * std + mean) * 255
        # the teacher's input is a real image: every pixel an integer 0..255
        assert (pixels - pixels.round()).abs().max() < 2e-3
        assert not torch.allclose(t_in, s_in)  # the student's input was overlaid


def test_preview_grid() -> None:
    data, maps = _set(5)
    img = preview_grid(data.images, maps[:, 0], scale=2)
    assert img.size == (2 * (3 * 34 + 2), 2 * (5 * 34 + 2))
    arr = torch.from_numpy(np.asarray(img, dtype=np.float32))
    assert arr.std() > 20  # not blank
