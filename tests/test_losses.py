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


# -- DKD, DIST, LSKD (issue 27) ------------------------------------------------------------

def test_dkd_decomposes_the_classical_kl_and_matches_a_hand_computation() -> None:
    from kdig_study.losses import dkd_terms

    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(6, 5, generator=g), torch.randn(6, 5, generator=g) * 2
    y = torch.tensor([0, 1, 2, 3, 4, 0])
    T = 3.0
    tckd, nckd = dkd_terms(s, t, y, T)
    p_s, p_t = F.softmax(s / T, 1), F.softmax(t / T, 1)
    kl = (p_t * (p_t.log() - p_s.log())).sum(1)
    pt_target = p_t[torch.arange(6), y]
    # Zhao et al.'s identity: KL = TCKD + (1 - p_t) * NCKD, per sample
    assert torch.allclose(tckd + (1 - pt_target) * nckd, kl, atol=1e-6)
    # by hand for sample 0: the binary and the renormalised non-target distributions
    i = 0
    b_s = torch.tensor([p_s[i, y[i]], 1 - p_s[i, y[i]]])
    b_t = torch.tensor([p_t[i, y[i]], 1 - p_t[i, y[i]]])
    assert tckd[i].item() == pytest.approx((b_t * (b_t / b_s).log()).sum().item(), rel=1e-5)
    keep = torch.arange(5) != y[i]
    q_s, q_t = p_s[i, keep] / p_s[i, keep].sum(), p_t[i, keep] / p_t[i, keep].sum()
    assert nckd[i].item() == pytest.approx((q_t * (q_t / q_s).log()).sum().item(), rel=1e-5)


def test_dkd_gradients_are_finite_and_its_loss_weights_its_terms() -> None:
    from kdig_study.losses import dkd_loss, dkd_terms

    s = torch.randn(8, 10, requires_grad=True)
    t = torch.randn(8, 10)
    y = torch.randint(0, 10, (8,))
    loss = dkd_loss(s, t, y, 4.0, 1.0, 8.0)
    loss.backward()
    assert torch.isfinite(s.grad).all()  # the target's -inf never reaches a gradient
    tckd, nckd = dkd_terms(s.detach(), t, y, 4.0)
    assert loss.item() == pytest.approx(16 * (tckd + 8 * nckd).mean().item(), rel=1e-5)


def test_dist_relations_ignore_positive_affine_changes_and_match_by_hand() -> None:
    from kdig_study.losses import dist_loss, pearson

    g = torch.Generator().manual_seed(1)
    a, b = torch.rand(4, 6, generator=g), torch.rand(4, 6, generator=g)
    r = pearson(a, b)
    assert torch.allclose(pearson(3.0 * a + 2.0, b), r, atol=1e-6)
    assert torch.allclose(pearson(a, 0.5 * b - 7.0), r, atol=1e-6)
    x, z = a[0].numpy(), b[0].numpy()
    import numpy as np
    assert r[0].item() == pytest.approx(float(np.corrcoef(x, z)[0, 1]), rel=1e-5)
    s, t = torch.randn(5, 4, generator=g), torch.randn(5, 4, generator=g)
    y_s, y_t = F.softmax(s / 2, 1), F.softmax(t / 2, 1)
    inter = 1 - np.mean([np.corrcoef(y_s[i], y_t[i])[0, 1] for i in range(5)])
    intra = 1 - np.mean([np.corrcoef(y_s[:, j], y_t[:, j])[0, 1] for j in range(4)])
    assert dist_loss(s, t, 2.0, 1.5, 0.5).item() == pytest.approx(
        4 * (1.5 * inter + 0.5 * intra), rel=1e-5)
    assert dist_loss(t, t, 2.0, 1.0, 1.0).item() == pytest.approx(0.0, abs=1e-6)


def test_lskd_is_unchanged_by_scaling_and_shifting_the_students_logits() -> None:
    from kdig_study.config import KDConfig
    from kdig_study.losses import distill_loss

    g = torch.Generator().manual_seed(2)
    s, t = torch.randn(6, 10, generator=g), torch.randn(6, 10, generator=g)
    y = torch.randint(0, 10, (6,), generator=g)
    kd = KDConfig(method="lskd", temperature=2.0, ce_weight=0.0, kd_weight=1.0)
    base = distill_loss(s, t, y, kd).item()
    assert distill_loss(4.0 * s + 3.0, t, y, kd).item() == pytest.approx(base, rel=1e-4)
    assert distill_loss(s, 0.5 * t - 1.0, y, kd).item() == pytest.approx(base, rel=1e-4)
    # the plain Hinton term is not invariant: the standardisation is what makes it so
    hinton = KDConfig(method="hinton", temperature=2.0, ce_weight=0.0, kd_weight=1.0)
    assert distill_loss(4.0 * s, t, y, hinton).item() != pytest.approx(
        distill_loss(s, t, y, hinton).item(), rel=1e-2)


def test_weights_forms_and_the_dkd_warm_up() -> None:
    from kdig_study.config import KDConfig
    from kdig_study.losses import distill_loss, dkd_loss, kd_loss

    g = torch.Generator().manual_seed(3)
    s, t = torch.randn(6, 10, generator=g), torch.randn(6, 10, generator=g)
    y = torch.randint(0, 10, (6,), generator=g)
    ce = F.cross_entropy(s, y).item()
    # the paper's alpha form is the old loss, bit for bit
    paper = KDConfig(temperature=4.0, alpha=0.3)
    assert torch.equal(distill_loss(s, t, y, paper), kd_loss(s, t, y, 4.0, 0.3))
    # mdistiller's form: separate weights (the CE weight need not be 1 - the KD weight)
    dkd = KDConfig(method="dkd", temperature=4.0, ce_weight=1.0, kd_weight=1.0,
                   dkd_alpha=1.0, dkd_beta=8.0, dkd_warmup=20)
    full = dkd_loss(s, t, y, 4.0, 1.0, 8.0).item()
    assert distill_loss(s, t, y, dkd, epoch=5).item() == pytest.approx(ce + full * 5 / 20,
                                                                        rel=1e-5)
    assert distill_loss(s, t, y, dkd, epoch=40).item() == pytest.approx(ce + full, rel=1e-5)


def test_the_weights_forms_are_one_per_table_and_a_later_layer_replaces() -> None:
    from kdig_study.config import load_study
    from kdig_study.errors import KdigError

    with pytest.raises(KdigError, match="search.space.alpha searches the alpha form"):
        load_study("kd_ig", "smoke", ["kd.ce_weight=1", "kd.kd_weight=2"])
    with pytest.raises(KdigError, match="kd.ce_weight without its pair"):
        load_study("kd_ig", "smoke", ["kd.ce_weight=1"])
    with pytest.raises(KdigError, match="two weight conventions"):
        from kdig_study.config import KDConfig, _build
        _build(KDConfig, {"alpha": 0.5, "kd_weight": 1.0}, "study.toml", "kd")
    with pytest.raises(KdigError, match="kd.method = 'crd'"):
        load_study("kd_ig", "smoke", ["kd.method=crd"])


def test_a_later_layer_s_weights_form_replaces_the_earlier_one() -> None:
    from kdig_study.config import _merge

    assert _merge({"kd": {"alpha": 0.5, "temperature": 4}},
                  {"kd": {"ce_weight": 1, "kd_weight": 2}}) == \
        {"kd": {"temperature": 4, "ce_weight": 1, "kd_weight": 2}}
    assert _merge({"kd": {"ce_weight": 1, "kd_weight": 2}}, {"kd": {"alpha": 0.1}}) == \
        {"kd": {"alpha": 0.1}}


@pytest.mark.parametrize("method", ["dkd", "dist", "lskd"])
def test_each_kd_method_trains_a_student_end_to_end(method: str, warm_cache) -> None:
    from kdig_study.config import load_study
    from kdig_study.experiment import Context, run_student

    sets = ["method.kd=true", "method.ig=false", "student_train.epochs=1",
            f"kd.method={method}", "kd.alpha=0.5"]
    ctx = Context.create(load_study("kd_ig", "smoke", sets), progress=False)
    ctx.log = lambda *a, **k: None
    run = run_student(ctx)
    hinton = run_student(ctx, load_study("kd_ig", "smoke", sets[:-2] + ["kd.alpha=0.5"]))
    assert math.isfinite(run.result.history[0].loss)
    assert run.result.history[0].loss != hinton.result.history[0].loss  # another loss ran


def test_the_kd_method_is_searched_with_its_own_parameters_only_where_chosen() -> None:
    import optuna

    from kdig_study.config import load_study, relevant_space
    from kdig_study.objectives import suggest

    cfg = load_study("kd_ig", "smoke", [
        'search.space.kd_method.choices=["hinton", "dkd", "dist"]',
        "search.space.dkd_beta.low=1.0", "search.space.dkd_beta.high=10.0",
        "search.space.dist_gamma.low=0.5", "search.space.dist_gamma.high=4.0"])
    space = relevant_space(cfg)
    assert next(iter(space)) == "kd_method" and {"dkd_beta", "dist_gamma"} <= set(space)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    seen = {}
    for _ in range(30):
        trial = study.ask()
        params = suggest(trial, space, cfg)
        seen.setdefault(params["kd_method"], set()).update(params)
        study.tell(trial, 0.5)
    assert "dkd_beta" in seen["dkd"] and "dist_gamma" not in seen["dkd"]
    assert "dist_gamma" in seen["dist"] and "dkd_beta" not in seen["dist"]
    assert not {"dkd_beta", "dist_gamma"} & seen["hinton"]
    # without KD, none of it is searched
    off = load_study("kd_ig", "smoke", ["method.kd=false",
                                        'search.space.kd_method.choices=["hinton", "dkd"]'])
    assert "kd_method" not in relevant_space(off)


def test_bad_kd_method_choices_and_a_fixed_trial_outside_the_space_are_one_line() -> None:
    from kdig_study.config import fixed_trial, load_study
    from kdig_study.errors import KdigError

    with pytest.raises(KdigError, match="a list of KD methods; allowed: hinton, dkd"):
        load_study("kd_ig", "smoke", ['search.space.kd_method.choices=["hinton", "crd"]'])
    cfg = load_study("kd_ig", "smoke", ['search.space.kd_method.choices=["dkd", "dist"]'])
    with pytest.raises(KdigError, match="kd_method = 'hinton' is outside"):
        fixed_trial(cfg)
    dkd = load_study("kd_ig", "smoke", ['search.space.kd_method.choices=["dkd", "dist"]',
                                        "kd.method=dkd", "search.space.dkd_beta.low=1.0",
                                        "search.space.dkd_beta.high=10.0"])
    fixed = fixed_trial(dkd)
    assert fixed["kd_method"] == "dkd" and fixed["dkd_beta"] == 8.0
    assert "dist_gamma" not in fixed
