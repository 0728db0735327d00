"""SSD-KD's modulating function φ (diversity- and difficulty-aware sample weights).

With p = softmax(teacher(x)), ŷ = argmax p, C classes and p̄_c the mean of p_c over the reference
set (the batch, or the buffer):
    w_div(x) = (1/C) / p̄_ŷ            (over-represented predicted class → below 1)
    w_dif(x) = (1 − p_ŷ(x))^γ          (focal: the less sure the teacher, the larger)
    φ(x)     = clip(w_div · w_dif / mean(w_div · w_dif), 0, φ_max), renormalised to mean 1.
"""
from __future__ import annotations

import torch


def phi_weights(t_logits: torch.Tensor, gamma: float = 2.0, clip: float = 5.0,
                class_freq: torch.Tensor | None = None, eps: float = 1e-3) -> torch.Tensor:
    """Per-sample φ (shape N, mean 1, no gradient). ``class_freq``: p̄ over a reference set (e.g. the
    buffer); default the batch's own mean probabilities."""
    with torch.no_grad():
        p = torch.softmax(t_logits.float(), dim=1)
        conf, pred = p.max(dim=1)
        C = p.shape[1]
        p_bar = class_freq if class_freq is not None else p.mean(0)
        w_div = (1.0 / C) / p_bar.clamp_min(1e-6)[pred]
        w_dif = (1.0 - conf + eps) ** gamma
        w = w_div * w_dif
        w = (w / w.mean()).clamp(max=clip)
        return w / w.mean()
