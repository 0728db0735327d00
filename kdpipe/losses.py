"""Distillation losses."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def kd_per_sample(student_logits: torch.Tensor, teacher_logits: torch.Tensor, T: float) -> torch.Tensor:
    """T² · KL(softmax(t/T) ‖ softmax(s/T)) for each sample (shape N)."""
    log_p_s = F.log_softmax(student_logits / T, dim=1)
    log_p_t = F.log_softmax(teacher_logits / T, dim=1)
    return (log_p_t.exp() * (log_p_t - log_p_s)).sum(dim=1) * (T * T)


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, T: float) -> torch.Tensor:
    """Hinton et al. 2015: KL(log_softmax(s/T) ‖ softmax(t/T)), reduction batchmean, × T²."""
    return F.kl_div(
        F.log_softmax(student_logits / T, dim=1), F.softmax(teacher_logits / T, dim=1), reduction="batchmean"
    ) * (T * T)


def distill_loss(student_logits, teacher_logits, T: float, alpha: float, weights=None) -> torch.Tensor:
    """α · KD + (1 − α) · CE(s, argmax t); ``weights`` (N) re-weight samples (φ · importance weights):
    loss = Σ_i w_i · ℓ_i / N."""
    per = alpha * kd_per_sample(student_logits, teacher_logits, T)
    if alpha < 1:
        per = per + (1 - alpha) * F.cross_entropy(student_logits, teacher_logits.argmax(1), reduction="none")
    if weights is not None:
        per = per * weights
    return per.mean()
