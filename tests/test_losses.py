"""Golden values for the distillation loss (hand-computed with numpy, not with the code under test)."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from kdpipe.losses import distill_loss, kd_loss, kd_per_sample

S = torch.tensor([[1.0, 2.0, 3.0], [0.5, -1.0, 2.0]])
T_ = torch.tensor([[3.0, 2.0, 1.0], [0.0, 0.0, 4.0]])


def _np_kl(t, s, T):
    def softmax(a):
        e = np.exp(a - a.max(1, keepdims=True))
        return e / e.sum(1, keepdims=True)

    pt, ps = softmax(t / T), softmax(s / T)
    return (pt * (np.log(pt) - np.log(ps))).sum(1)


def test_kd_loss_golden_T1():
    # sample 0: teacher = reversed student logits -> KL(pt||ps) = sum pt*(log pt - log ps)
    pt = np.exp([3, 2, 1]) / np.exp([3, 2, 1]).sum()
    ps = pt[::-1]
    kl0 = float((pt * np.log(pt / ps)).sum())
    assert kl0 == pytest.approx(1.1504, abs=1e-4)  # = 2·(p0 − p2), p = softmax(3,2,1)
    got = kd_per_sample(S, T_, 1.0)
    assert got[0].item() == pytest.approx(kl0, rel=1e-4)


def test_kd_loss_batchmean_and_T_squared():
    for T in (1.0, 4.0, 20.0):
        expected = _np_kl(T_.numpy().astype(np.float64), S.numpy().astype(np.float64), T).sum() / 2 * T * T
        assert kd_loss(S, T_, T).item() == pytest.approx(expected, rel=1e-4)
        # batchmean = sum over the batch / N (not the mean over N·C elements)
        assert kd_loss(S, T_, T).item() == pytest.approx(kd_per_sample(S, T_, T).mean().item(), rel=1e-4)


def test_kd_loss_fixed_golden_number():
    # fixed tensor, T=4: hand-computed with numpy above, frozen here as a number
    assert kd_loss(S, T_, 4.0).item() == pytest.approx(0.924257, abs=1e-5)


def test_kd_loss_argument_order():
    # KL(teacher || student): swapping the arguments changes the value (KL is not symmetric)
    a, b = kd_loss(S, T_, 2.0).item(), kd_loss(T_, S, 2.0).item()
    assert a != pytest.approx(b, rel=1e-3)
    ref = F.kl_div(F.log_softmax(S / 2, 1), F.softmax(T_ / 2, 1), reduction="batchmean").item() * 4
    assert a == pytest.approx(ref, rel=1e-6)


def test_kd_loss_zero_when_equal():
    assert kd_loss(S, S, 3.0).item() == pytest.approx(0.0, abs=1e-6)


def test_distill_loss_alpha_mix_and_weights():
    T, alpha = 4.0, 0.7
    ce = F.cross_entropy(S, T_.argmax(1), reduction="none")
    per = alpha * kd_per_sample(S, T_, T) + (1 - alpha) * ce
    assert distill_loss(S, T_, T, alpha).item() == pytest.approx(per.mean().item(), rel=1e-6)
    w = torch.tensor([2.0, 0.0])
    assert distill_loss(S, T_, T, alpha, w).item() == pytest.approx((per[0] * 2 / 2).item(), rel=1e-6)
    assert distill_loss(S, T_, T, 1.0).item() == pytest.approx(kd_loss(S, T_, T).item(), rel=1e-6)
    assert math.isfinite(distill_loss(S * 100, T_ * 100, 1.0, 0.5).item())
