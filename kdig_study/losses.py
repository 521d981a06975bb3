"""Loss functions, pure: tensors in, a scalar out."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
            temperature: float, alpha: float, label_smoothing: float = 0.0) -> torch.Tensor:
    """alpha * T^2 * KL(softmax(t/T) || softmax(s/T)) + (1 - alpha) * CE(s, y).

    The paper's convention: alpha weights the distillation term (torchdistill puts it on CE).
    The T^2 factor keeps the soft term's gradient scale independent of T (Hinton et al.).
    Logits: [B, classes]; labels: [B].
    """
    ce = F.cross_entropy(student_logits, labels, label_smoothing=label_smoothing)
    if alpha == 0.0:
        return ce
    t = temperature
    kl = F.kl_div(F.log_softmax(student_logits / t, dim=1),
                  F.log_softmax(teacher_logits.detach() / t, dim=1),
                  reduction="batchmean", log_target=True)
    return alpha * t * t * kl + (1.0 - alpha) * ce


def _kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, t: float) -> torch.Tensor:
    """T^2 * KL(softmax(t/T) || softmax(s/T)), averaged over the batch."""
    return t * t * F.kl_div(F.log_softmax(student_logits / t, dim=1),
                            F.log_softmax(teacher_logits.detach() / t, dim=1),
                            reduction="batchmean", log_target=True)


def dkd_terms(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
              labels: torch.Tensor, t: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Decoupled KD (Zhao et al., CVPR 2022), per sample ([B] each, no T^2):

    TCKD = KL(b_T || b_S) over the binary split [p_target, 1 - p_target];
    NCKD = KL(q_T || q_S) over the non-target classes, renormalised among themselves.
    They decompose the classical KL: KL(p_T || p_S) = TCKD + (1 - p_T,target) * NCKD."""
    target = F.one_hot(labels, student_logits.shape[1]).bool()  # [B, C]
    log_p_s = F.log_softmax(student_logits / t, dim=1)
    log_p_t = F.log_softmax(teacher_logits.detach() / t, dim=1)
    # binary: log p_target and log(1 - p_target), the latter as logsumexp of the others
    masked_s = log_p_s.masked_fill(target, float("-inf"))
    masked_t = log_p_t.masked_fill(target, float("-inf"))
    b_s = torch.stack([log_p_s[target], torch.logsumexp(masked_s, dim=1)], dim=1)  # [B, 2]
    b_t = torch.stack([log_p_t[target], torch.logsumexp(masked_t, dim=1)], dim=1)
    tckd = (b_t.exp() * (b_t - b_s)).sum(1)
    # non-target: log-softmax over the other classes (the target's logit pushed to -inf)
    q_s = F.log_softmax((student_logits / t).masked_fill(target, float("-inf")), dim=1)
    q_t = F.log_softmax((teacher_logits.detach() / t).masked_fill(target, float("-inf")), dim=1)
    # the target's -inf zeroed before the product: -inf - -inf would be NaN, and a NaN in
    # the branch torch.where drops still poisons its gradient
    q_s, q_t0 = q_s.masked_fill(target, 0.0), q_t.masked_fill(target, 0.0)
    nckd = (q_t.exp() * (q_t0 - q_s)).sum(1)
    return tckd, nckd


def dkd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
             t: float, alpha: float, beta: float) -> torch.Tensor:
    """T^2 * mean over the batch of (alpha * TCKD + beta * NCKD)."""
    tckd, nckd = dkd_terms(student_logits, teacher_logits, labels, t)
    return t * t * (alpha * tckd + beta * nckd).mean()


def pearson(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Row-wise Pearson correlation of two [N, D] tensors ([N]): unchanged by a positive
    affine change of either input's rows."""
    a = a - a.mean(1, keepdim=True)
    b = b - b.mean(1, keepdim=True)
    return (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1)).clamp_min(1e-12)


def dist_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, t: float,
              beta: float, gamma: float) -> torch.Tensor:
    """DIST (Huang et al., NeurIPS 2022): with Y = softmax(logits / T) ([B, C]),
    T^2 * (beta * inter + gamma * intra), inter = 1 - mean over samples of the Pearson
    correlation of the student's and the teacher's class distributions (each row), intra =
    1 - mean over classes of the correlation across the batch (each column)."""
    y_s = F.softmax(student_logits / t, dim=1)
    y_t = F.softmax(teacher_logits.detach() / t, dim=1)
    inter = 1 - pearson(y_s, y_t).mean()
    intra = 1 - pearson(y_s.T, y_t.T).mean()
    return t * t * (beta * inter + gamma * intra)


def standardize(logits: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """Logit standardisation (Sun et al., CVPR 2024): each sample's logits z-scored,
    (z - mean) / sd, so a student need not match the teacher's logit scale or shift."""
    return (logits - logits.mean(1, keepdim=True)) / (logits.std(1, keepdim=True) + eps)


def distill_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                 labels: torch.Tensor, kd: Any, label_smoothing: float = 0.0,
                 epoch: int = 1) -> torch.Tensor:
    """The study's KD loss (``kd``: a KDConfig): ce_weight * CE + kd_weight * the method's
    term; ``epoch`` (1-based) for DKD's linear warm-up of its term over kd.dkd_warmup
    epochs."""
    if kd.method == "hinton" and kd.kd_weight < 0:  # the paper's loss, as it always ran
        return kd_loss(student_logits, teacher_logits, labels, kd.temperature, kd.alpha,
                       label_smoothing)
    ce_w, kd_w = kd.weights
    ce = F.cross_entropy(student_logits, labels, label_smoothing=label_smoothing)
    if kd_w == 0.0:
        return ce_w * ce
    t = kd.temperature
    if kd.method == "hinton":
        term = _kl(student_logits, teacher_logits, t)
    elif kd.method == "lskd":
        term = _kl(standardize(student_logits), standardize(teacher_logits), t)
    elif kd.method == "dkd":
        warm = min(epoch / kd.dkd_warmup, 1.0) if kd.dkd_warmup > 0 else 1.0
        term = warm * dkd_loss(student_logits, teacher_logits, labels, t, kd.dkd_alpha,
                               kd.dkd_beta)
    else:  # dist
        term = dist_loss(student_logits, teacher_logits, t, kd.dist_beta, kd.dist_gamma)
    return ce_w * ce + kd_w * term


def attention_map(fmap: torch.Tensor) -> torch.Tensor:
    """[B, C, h, w] -> [B, h*w]: channel mean of squares, L2-normalised (Zagoruyko & Komodakis)."""
    return F.normalize(fmap.pow(2).mean(dim=1).flatten(1), dim=1)


def at_loss(student_fmap: torch.Tensor, teacher_fmap: torch.Tensor) -> torch.Tensor:
    """Mean squared difference of the two attention maps (same h, w; channels may differ)."""
    return at_loss_to(student_fmap, attention_map(teacher_fmap.detach()))


def at_loss_to(student_fmap: torch.Tensor, teacher_attention: torch.Tensor) -> torch.Tensor:
    """``at_loss`` against the teacher's attention map ([B, h*w]) computed beforehand (the
    teacher-output cache stores maps, not feature maps)."""
    return (attention_map(student_fmap) - teacher_attention.detach()).pow(2).mean()
