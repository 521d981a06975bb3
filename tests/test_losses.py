from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from kdig_study.losses import at_loss, attention_map, kd_loss


def _logits(seed: int) -> torch.Tensor:
    return torch.randn(8, 10, generator=torch.Generator().manual_seed(seed)) * 3


def test_alpha_zero_is_cross_entropy() -> None:
    s, t, y = _logits(0), _logits(1), torch.arange(8) % 10
    assert kd_loss(s, t, y, 4.0, 0.0).item() == pytest.approx(F.cross_entropy(s, y).item())


def test_hand_computed_kd_with_t_squared() -> None:
    s, t, y = _logits(2), _logits(3), torch.arange(8) % 10
    T, alpha = 2.5, 0.3
    total = 0.0
    for i in range(8):  # KL(p_t || p_s) per sample, by hand, averaged over the batch
        ps = [math.exp(v / T) for v in s[i].tolist()]
        pt = [math.exp(v / T) for v in t[i].tolist()]
        ps = [v / sum(ps) for v in ps]
        pt = [v / sum(pt) for v in pt]
        total += sum(a * math.log(a / b) for a, b in zip(pt, ps, strict=True))
    kl = total / 8
    ce = F.cross_entropy(s, y).item()
    expect = alpha * T * T * kl + (1 - alpha) * ce
    assert kd_loss(s, t, y, T, alpha).item() == pytest.approx(expect, rel=1e-5)
    # alpha = 1: only the soft term, exactly T^2 times the KL
    assert kd_loss(s, t, y, T, 1.0).item() == pytest.approx(T * T * kl, rel=1e-5)


def test_kd_term_vanishes_when_student_matches_teacher() -> None:
    s, y = _logits(4), torch.arange(8) % 10
    assert kd_loss(s, s.clone(), y, 3.0, 1.0).item() == pytest.approx(0.0, abs=1e-6)


def test_no_gradient_flows_into_the_teacher() -> None:
    s = _logits(5).requires_grad_()
    t = _logits(6).requires_grad_()
    kd_loss(s, t, torch.zeros(8, dtype=torch.long), 2.0, 0.5).backward()
    assert s.grad is not None and t.grad is None


def test_attention_transfer() -> None:
    f = torch.randn(2, 16, 8, 8)
    a = attention_map(f)
    assert a.shape == (2, 64) and torch.allclose(a.norm(dim=1), torch.ones(2))
    assert at_loss(f, f).item() == 0.0
    # channel count may differ; scaling a feature map does not change its attention
    g = torch.cat([f, f], 1) * 5
    assert at_loss(g, f).item() == pytest.approx(0.0, abs=1e-10)
    assert at_loss(torch.randn(2, 16, 8, 8), f).item() > 1e-3
