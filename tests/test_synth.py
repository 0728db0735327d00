"""The data-free units: generator, BN prior, loss terms, φ, buffer and prioritized replay."""
import math

import pytest
import torch
from torch import nn

from kdpipe.synth.bn_hooks import BNPrior
from kdpipe.synth.generator import Generator
from kdpipe.synth.losses import adv_term, ce_term, ie_term
from kdpipe.synth.phi import phi_weights
from kdpipe.synth.replay import (ReplayBuffer, Reservoir, anneal_beta, importance_weights, priority_probs,
                                 prioritized_sample)


@pytest.mark.parametrize("size, ch", [(8, 1), (28, 1), (32, 3), (224, 3)])
def test_generator_shapes_and_range(size, ch):
    g = Generator(nz=16, img_size=size, channels=ch, ngf=8)
    x = g(torch.randn(2, 16))
    assert x.shape == (2, ch, size, size)
    assert x.min() >= 0 and x.max() <= 1


def test_bn_loss_zero_when_batch_stats_equal_running():
    torch.manual_seed(0)
    x = torch.randn(16, 3, 5, 5) * 2 + 1
    bn = nn.BatchNorm2d(3).eval()
    bn.running_mean.copy_(x.mean((0, 2, 3)))
    bn.running_var.copy_(x.var((0, 2, 3), unbiased=False))
    prior = BNPrior(nn.Sequential(bn))
    bn(x)
    assert prior.loss().item() == pytest.approx(0.0, abs=1e-5)
    # shifted input: ‖Δμ‖₂ = ‖(0.5, 0.5, 0.5)‖ = 0.866, variance unchanged
    bn(x + 0.5)
    assert prior.loss().item() == pytest.approx(math.sqrt(3) * 0.5, abs=1e-4)
    prior.remove()


def test_loss_terms_values():
    t = torch.tensor([[4.0, 0.0, 0.0], [0.0, 4.0, 0.0]])
    assert ce_term(t, torch.tensor([0, 1])).tolist() == pytest.approx([0.0361, 0.0361], abs=1e-3)
    # student agrees on sample 0 only -> adv is −KL there, 0 on sample 1
    s = torch.tensor([[1.0, 0.0, 0.0], [1.0, 0.0, 0.0]])
    a = adv_term(s, t)
    assert a[0] < 0 and a[1] == 0
    # entropy term: −H(p̄) is −log C for a perfectly balanced batch
    balanced = torch.eye(3) * 50
    assert ie_term(balanced).item() == pytest.approx(-math.log(3), abs=1e-4)
    assert ie_term(torch.tensor([[50.0, 0, 0]] * 3)).item() == pytest.approx(0.0, abs=1e-4)


def test_phi_monotone_in_teacher_confidence():
    # same predicted class (0), growing confidence -> φ decreases
    logits = torch.tensor([[m, 0.0, 0.0] for m in (0.5, 1.0, 2.0, 4.0, 8.0)])
    w = phi_weights(logits, gamma=2.0, clip=100.0, class_freq=torch.full((3,), 1 / 3))
    assert torch.all(w[1:] < w[:-1])
    assert w.mean().item() == pytest.approx(1.0, abs=1e-5)


def test_phi_down_weights_over_represented_class():
    # equal confidence; class 0 predicted 8 times, class 1 twice -> class-0 samples weigh less
    logits = torch.tensor([[3.0, 0.0]] * 8 + [[0.0, 3.0]] * 2)
    w = phi_weights(logits, gamma=2.0, clip=100.0)
    assert w[:8].max() < w[8:].min()
    # p = softmax(3, 0) = (0.9526, 0.0474): p̄ = (0.7716, 0.2284), ratio 3.378
    assert (w[8] / w[0]).item() == pytest.approx(3.378, rel=1e-3)


def test_sampler_frequencies_match_p_alpha():
    pr = torch.tensor([1.0, 2.0, 4.0, 8.0, 0.5])
    alpha, n = 0.6, 100_000
    idx, _ = prioritized_sample(pr, n, alpha, 0.4, torch.Generator().manual_seed(0))
    freq = torch.bincount(idx, minlength=5).double() / n
    expected = pr.double() ** alpha / (pr.double() ** alpha).sum()
    # binomial standard error at n=1e5 is ≤ 0.0016; 4.5 sigma tolerance
    assert torch.allclose(freq, expected, atol=0.007)


def test_importance_weights():
    pr = torch.tensor([1.0, 2.0, 4.0, 8.0])
    probs = priority_probs(pr, 0.6)
    idx = torch.arange(4)
    w = importance_weights(probs, idx, 0.7)
    assert w.max().item() == pytest.approx(1.0)
    assert torch.all(w[1:] < w[:-1])  # rarer samples weigh more
    assert torch.allclose(importance_weights(probs, idx, 0.0), torch.ones(4))
    equal = priority_probs(torch.ones(4), 0.6)
    assert torch.allclose(importance_weights(equal, idx, 1.0), torch.ones(4))
    assert anneal_beta(0.4, 0, 10) == 0.4 and anneal_beta(0.4, 10, 10) == 1.0
    # norm="mean": the same ratios, mean 1 (the uniform sampler's loss scale); golden for P ∝ p^0.6, β 0.7
    wm = importance_weights(probs, idx, 0.7, norm="mean")
    assert wm.mean().item() == pytest.approx(1.0)
    assert torch.allclose(wm / wm.max(), w)
    ref = (4 * pr ** 0.6 / (pr ** 0.6).sum()) ** -0.7
    assert torch.allclose(wm, (ref / ref.mean()).float())
    assert torch.allclose(importance_weights(equal, idx, 1.0, norm="mean"), torch.ones(4))


def test_buffer_partial_update_and_balanced_eviction():
    buf = ReplayBuffer(capacity=10, shape=(1, 2, 2), num_classes=2)
    onehot = lambda c, n: torch.nn.functional.one_hot(torch.full((n,), c), 2).float() * 5  # noqa: E731
    buf.add(torch.rand(8, 1, 2, 2), onehot(0, 8))  # 8 of class 0
    buf.add(torch.rand(2, 1, 2, 2), onehot(1, 2))  # full: 8 vs 2
    assert buf.size == 10 and buf.histogram().tolist() == [8, 2]
    buf.update_priority(torch.arange(10), torch.arange(10).float())
    buf.add(torch.rand(3, 1, 2, 2), onehot(1, 3))  # evicts 3 oldest of class 0
    assert buf.histogram().tolist() == [5, 5]
    ages = buf.age[: buf.size]
    assert sorted(ages[buf.preds() == 0].tolist()) == [3, 4, 5, 6, 7]
    # new entries enter with the current max priority (9 + eps)
    new = ages >= 10
    assert torch.all(buf.priority[new] == buf.priority.max())
    # images are stored exactly as saved (uint8)
    assert buf.x.dtype == torch.uint8


def test_buffer_fifo_eviction_keeps_the_newest():
    buf = ReplayBuffer(capacity=4, shape=(1, 1, 1), num_classes=2, eviction="fifo")
    onehot = lambda c, n: torch.nn.functional.one_hot(torch.full((n,), c), 2).float() * 5  # noqa: E731
    buf.add(torch.rand(3, 1, 1, 1), onehot(0, 3))
    buf.add(torch.rand(3, 1, 1, 1), onehot(0, 3))
    assert sorted(buf.age[: buf.size].tolist()) == [2, 3, 4, 5]


def test_sample_grid_puts_each_sample_in_its_class_row(tmp_path):
    import numpy as np
    from PIL import Image

    from kdpipe.stages.synthesize import sample_grid

    # class c's samples are all of grey level 25·(c+1); class 2 has none
    labels = torch.tensor([0, 1, 0, 1, 3, 3, 3])
    x = (25 * (labels + 1)).to(torch.uint8).view(-1, 1, 1, 1).expand(-1, 1, 8, 8).contiguous()
    sample_grid(x, labels, ["zero", "one", "two", "three"], tmp_path / "grid.png", per_class=3)
    img = torch.tensor(np.array(Image.open(tmp_path / "grid.png").convert("L")))
    pad = 2  # 8 px enlarged ×4 to 32; 2 px between cells
    label_w = 8 * len("three") + 4
    assert img.shape == (4 * (32 + pad) + pad, label_w + 3 * (32 + pad) + pad)
    for c, n in enumerate([2, 2, 0, 3]):
        row = img[pad + c * (32 + pad) + 16]  # the middle line of the row
        cells = [int(row[label_w + j * (32 + pad) + pad + 16]) for j in range(3)]
        assert cells == [25 * (c + 1)] * n + [255] * (3 - n)  # its samples, then white
        assert (img[pad + c * (32 + pad): pad + c * (32 + pad) + 32, :label_w] < 128).any()  # the class name


def test_reservoir_keeps_each_sample_with_probability_capacity_over_n():
    # Algorithm R: after n samples each one is kept with probability capacity/n (here 0.1), whatever its round
    cap, n, trials = 50, 500, 1000
    kept = torch.zeros(n)
    for t in range(trials):
        r = Reservoir(cap, (1, 1, 1), 2, seed=t)
        for b in range(0, n, 32):  # rounds of 32, as the stage adds a round's batch at once
            r.add(torch.rand(min(32, n - b), 1, 1, 1), torch.zeros(min(32, n - b), 2))
        assert r.size == cap and r.age.unique().numel() == cap  # full, every slot a different sample
        kept[r.age] += 1
    freq = kept / trials
    sd = (0.1 * 0.9 / trials) ** 0.5  # binomial sd of one sample's frequency: 0.0095
    assert freq.mean().item() == pytest.approx(0.1)
    assert (freq - 0.1).abs().max() < 5 * sd  # 5 sd over 500 samples: a false alarm < 1e-3
    # the first and the last round are kept alike (FIFO would keep only the last 50, the buffer's eviction the newest)
    assert abs(freq[:32].mean() - freq[-32:].mean()) < 4 * sd


def test_reservoir_fills_then_resumes_bit_for_bit():
    onehot = lambda n: torch.nn.functional.one_hot(torch.arange(n) % 3, 3).float()  # noqa: E731
    xs = [torch.rand(7, 1, 2, 2) for _ in range(6)]
    r = Reservoir(10, (1, 2, 2), 3, seed=1)
    r.add(xs[0], onehot(7))
    assert r.size == 7 and r.age[:7].tolist() == list(range(7))  # not full: every sample kept, in order
    r.add(xs[1], onehot(7))
    assert r.size == 10 and r.seen == 14
    r2 = Reservoir(10, (1, 2, 2), 3, seed=99)
    r2.load_state_dict(r.state_dict())  # a resumed run: same slots, same generator state
    for x in xs[2:]:
        r.add(x, onehot(7))
        r2.add(x, onehot(7))
    assert torch.equal(r.x, r2.x) and torch.equal(r.age, r2.age) and torch.equal(r.logits, r2.logits)
    st = r.state()
    assert st["x"].dtype == torch.uint8 and len(st["x"]) == 10 and torch.equal(st["x"], r.x)


def _tiny_synthesizer(momentum: float, **update):
    from kdpipe.accel import Accel
    from kdpipe.config import Config
    from kdpipe.synth.synthesizer import Synthesizer

    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                            nn.Flatten(), nn.Linear(4, 3))
    teacher[1].running_mean.copy_(torch.tensor([0.1, -0.2, 0.3, 0.0]))
    teacher[1].running_var.copy_(torch.tensor([1.0, 0.5, 2.0, 1.5]))
    teacher.eval().requires_grad_(False)
    student = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                            nn.Linear(4, 3))
    cfg = Config()
    s = cfg.synthesize.model_copy(update=dict(capacity=16, rounds=2, batch_size=8, g_steps=3, kd_steps=2,
                                              warmup_rounds=0, nz=8, ngf=8, bn_momentum=momentum, **update))
    spec = {"num_classes": 3, "in_channels": 1, "image_size": 8}
    acc = Accel(cfg.speed, torch.device("cpu"))
    return Synthesizer(s, acc, teacher, student, spec, torch.Generator().manual_seed(0), replay=cfg.replay, phi=cfg.phi)


def test_bn_momentum_statistics_move_once_per_round_not_on_the_buffer_forward():
    """Fast's update_mmt: μ̄ ← m·μ̄ + (1−m)·μ_batch once per round, from the last generator step's batch (the
    first round: μ̄ ← μ_batch); the buffer's no-grad forward of the teacher neither moves μ̄ nor sets the loss,
    and the logged ``bn`` is the last generator step's L_BN = ‖m·μ̄ + (1−m)·μ − μ_run‖ + ‖m·σ̄² + (1−m)·σ² − σ²_run‖."""
    m = 0.9
    synth = _tiny_synthesizer(m)
    bn_layer, hook = synth.teacher[1], synth.bn.hooks[0]
    seen = []  # per teacher forward: (grad enabled = a generator step, μ, σ², μ̄ as the prior held it)
    bn_layer.register_forward_hook(lambda mod, i, o: seen.append(
        (torch.is_grad_enabled(), *[t.detach().clone() for t in
                                    (i[0].mean((0, 2, 3)), i[0].var((0, 2, 3), unbiased=False))],
         None if hook.mean_prev is None else hook.mean_prev.clone())))
    golden_mean = None
    for r in range(2):
        seen.clear()
        metrics = synth.round(r)
        steps = [e for e in seen if e[0]]
        assert len(steps) == synth.s.g_steps and len(seen) == synth.s.g_steps + 1  # + the buffer's no-grad forward
        assert not seen[-1][0]
        # μ̄ did not move during the generator steps; it moved once after them, and the buffer's forward (which
        # saw the moved μ̄) left it there
        for e in steps:
            assert (e[3] is None) if golden_mean is None else torch.equal(e[3], golden_mean)
        assert torch.equal(seen[-1][3], hook.mean_prev)
        _, mu, var, _ = steps[-1]  # the last generator step's batch statistics
        if golden_mean is None:
            gm, gv = mu, var
            loss = torch.norm(mu - bn_layer.running_mean) + torch.norm(var - bn_layer.running_var)
        else:
            gm, gv = m * golden_mean + (1 - m) * mu, m * golden_var + (1 - m) * var
            loss = (torch.norm(m * golden_mean + (1 - m) * mu - bn_layer.running_mean)
                    + torch.norm(m * golden_var + (1 - m) * var - bn_layer.running_var))
        assert metrics["bn"] == pytest.approx(loss.item(), rel=1e-5)
        assert torch.allclose(hook.mean_prev, gm, atol=1e-6) and torch.allclose(hook.var_prev, gv, atol=1e-6)
        # ... and not what the buffer's forward would have given
        assert not torch.allclose(hook.mean_prev, m * (gm if golden_mean is None else golden_mean)
                                  + (1 - m) * seen[-1][1], atol=1e-6) or golden_mean is None
        golden_mean, golden_var = hook.mean_prev.clone(), hook.var_prev.clone()  # equal to gm, gv up to rounding
    # the state a resume carries: the momentum statistics
    fresh = _tiny_synthesizer(m)
    fresh.load_state_dict(synth.state_dict())
    assert torch.equal(fresh.bn.hooks[0].mean_prev, golden_mean) and torch.equal(fresh.bn.hooks[0].var_prev, golden_var)
    synth.close()
    fresh.close()


# ------------------------------------------------------------------ NAYER's noisy layer (synthesize.latent: nayer)
def test_noisy_latent_gives_each_same_class_sample_its_own_layer():
    """z_i = W_{k_i}·e_{y_i} + b_{k_i}, k_i = i's rank among the batch's samples of class y_i: the exact value, one
    layer per rank (K = the largest class count), and distinct codes for two samples of one class."""
    from kdpipe.synth.generator import NoisyLatent

    lat = NoisyLatent(num_classes=3, nz=4, seed=0)
    y = torch.tensor([2, 0, 2, 2, 1, 0])
    assert NoisyLatent.ranks(y).tolist() == [0, 0, 1, 2, 0, 1]
    lat.reset(y, torch.Generator().manual_seed(0))
    assert lat.weight.shape == (3, 4, 4) and torch.equal(lat.bias, torch.zeros(3, 4))
    z = lat(y)
    assert torch.allclose(z[3], lat.weight[2] @ lat.emb[2]) and torch.allclose(z[5], lat.weight[1] @ lat.emb[0])
    assert not torch.allclose(z[0], z[2]) and torch.equal(lat.emb, NoisyLatent(3, 4, seed=0).emb)
    z.sum().backward()  # the layers learn within the round
    assert lat.weight.grad is not None and lat.weight.grad.abs().sum() > 0


def test_nayer_rounds_draw_new_layers_and_train_them():
    """With latent: nayer each round re-draws the noisy layers (so two rounds start from different codes); the
    rounds' images enter the buffer with finite logits; noise mode has no noisy layer."""
    synth = _tiny_synthesizer(0.9, latent="nayer")
    synth.round(0)
    w0 = synth.latent.weight.detach().clone()
    synth.round(1)
    assert synth.latent.weight.shape[1:] == (8, 8) and not torch.allclose(w0[:1], synth.latent.weight.detach()[:1])
    assert synth.buf.size == 16 and torch.isfinite(synth.buf.logits).all()
    plain = _tiny_synthesizer(0.9)
    assert plain.latent is None
    synth.close()
    plain.close()
