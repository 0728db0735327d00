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
    """Hinton et al. 2015: KL(log_softmax(s/T) ‖ softmax(t/T)), reduction batchmean, × T²
    (:func:`kd_loss_probs` with p = softmax(t/T))."""
    return kd_loss_probs(student_logits, F.softmax(teacher_logits / T, dim=1), T)


def distill_loss(student_logits, teacher_logits, T: float, alpha: float, weights=None, *, gamma: float | None = None,
                 labels=None, feature=None, beta: float = 0.0) -> torch.Tensor:
    """The KD objective, the one that synthesize's proxy student and distill train with:
        L = Σ_i w_i·[α·T²·KL(softmax(t_i/T) ‖ softmax(s_i/T)) + γ·CE(s_i, y_i)] / N  +  β·feature
    (the KD term: :func:`kd_per_sample`, whose batch mean is :func:`kd_loss`). γ None = 1 − α; y_i:
    ``labels`` when given, else argmax t_i; ``weights`` (N) re-weight samples (φ · importance weights);
    ``feature``: the hint loss (kdpipe/feature_kd.py), added × β when β ≠ 0."""
    gamma = 1 - alpha if gamma is None else gamma
    per = alpha * kd_per_sample(student_logits, teacher_logits, T)
    if gamma:
        target = labels if labels is not None else teacher_logits.argmax(1)
        per = per + gamma * F.cross_entropy(student_logits, target, reduction="none")
    if weights is not None:
        per = per * weights
    loss = per.mean()
    return loss + beta * feature if beta and feature is not None else loss


def multi_teacher_targets(teacher_logits, T: float, weights=None) -> torch.Tensor:
    """Soft targets of K teachers: p = Σ_k w_k softmax(t_k/T) / Σ_k w_k (plain mean when weights is None).
    ``teacher_logits``: K×N×C tensor or a sequence of K N×C tensors; ``weights``: K."""
    t = torch.stack(list(teacher_logits)) if not torch.is_tensor(teacher_logits) else teacher_logits
    w = torch.ones(len(t), device=t.device) if weights is None else torch.as_tensor(weights, dtype=t.dtype, device=t.device)
    return (w.view(-1, 1, 1) * F.softmax(t / T, dim=2)).sum(0) / w.sum()


def kd_loss_probs(student_logits: torch.Tensor, target_probs: torch.Tensor, T: float) -> torch.Tensor:
    """KD against given soft targets p (e.g. :func:`multi_teacher_targets`): T² · KL(p ‖ softmax(s/T)), batchmean."""
    return F.kl_div(F.log_softmax(student_logits / T, dim=1), target_probs, reduction="batchmean") * (T * T)
