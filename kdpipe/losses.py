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


def multi_teacher_targets(teacher_logits, T: float, weights=None) -> torch.Tensor:
    """Soft targets of K teachers: p = Σ_k w_k softmax(t_k/T) / Σ_k w_k (plain mean when weights is None).
    ``teacher_logits``: K×N×C tensor or a sequence of K N×C tensors; ``weights``: K."""
    t = torch.stack(list(teacher_logits)) if not torch.is_tensor(teacher_logits) else teacher_logits
    w = torch.ones(len(t), device=t.device) if weights is None else torch.as_tensor(weights, dtype=t.dtype, device=t.device)
    return (w.view(-1, 1, 1) * F.softmax(t / T, dim=2)).sum(0) / w.sum()


def kd_loss_probs(student_logits: torch.Tensor, target_probs: torch.Tensor, T: float) -> torch.Tensor:
    """KD against given soft targets p (e.g. :func:`multi_teacher_targets`): T² · KL(p ‖ softmax(s/T)), batchmean."""
    return F.kl_div(F.log_softmax(student_logits / T, dim=1), target_probs, reduction="batchmean") * (T * T)
