"""Loss functions, pure: tensors in, a scalar out."""

from __future__ import annotations

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
