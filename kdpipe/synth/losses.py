"""The generator's loss terms (each returned per sample, shape N, so φ can weight it).

- CE   (inversion):   ℓ_ce(x)  = −log p_t(y* | x), y* the sampled target class.
- adv  (DFAD/Fast):   ℓ_adv(x) = −KL(p_t(x) ‖ p_s(x)) · 1[argmax p_t = argmax p_s]
                      (the generator seeks samples where teacher and student still disagree).
- act  (DAFL):        ℓ_act(x) = −‖f_t(x)‖₁ / d, f_t the teacher's penultimate features.
- ie   (DAFL):        L_ie = −H(p̄),  p̄ = mean_i p_t(x_i)  (a batch term: balanced classes).
- tv   (DeepInversion image prior): ℓ_tv(x) = mean (x_{h+1,w} − x_{h,w})² + mean (x_{h,w+1} − x_{h,w})²
- l2   (DeepInversion image prior): ℓ_l2(x) = mean (x − ½)²   (x ∈ [0, 1]: pulls pixels off the extremes)
The image prior stands in for the BN prior when the teacher has no BatchNorm (folded by the exporter, ViTs).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def ce_term(t_logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(t_logits, targets, reduction="none")


def adv_term(s_logits: torch.Tensor, t_logits: torch.Tensor, T: float = 1.0) -> torch.Tensor:
    agree = (s_logits.argmax(1) == t_logits.argmax(1)).float()
    log_p_t = F.log_softmax(t_logits / T, dim=1)
    kl = (log_p_t.exp() * (log_p_t - F.log_softmax(s_logits / T, dim=1))).sum(1)
    return -kl * agree


def act_term(features: torch.Tensor) -> torch.Tensor:
    return -features.abs().flatten(1).mean(1)


def ie_term(t_logits: torch.Tensor) -> torch.Tensor:
    p_mean = F.softmax(t_logits, dim=1).mean(0)
    return (p_mean * torch.log(p_mean + 1e-8)).sum()  # = −H(p̄)


def tv_term(x: torch.Tensor) -> torch.Tensor:
    dh = (x[:, :, 1:, :] - x[:, :, :-1, :]).pow(2).flatten(1).mean(1)
    dw = (x[:, :, :, 1:] - x[:, :, :, :-1]).pow(2).flatten(1).mean(1)
    return dh + dw


def l2_term(x: torch.Tensor) -> torch.Tensor:
    return (x - 0.5).pow(2).flatten(1).mean(1)
