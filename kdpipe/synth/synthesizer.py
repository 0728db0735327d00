"""One round of the data-free algorithm (Fast-Datafree's ``synthesize()`` with SSD-KD's balancing and replay).

Per round r, with teacher T (frozen), generator g (warm-started from round r−1), proxy student S, buffer B:
  1. g_steps generator steps on fresh latent codes z (targets y: uniform, or ∝ 1/(hist_B + 1)), x = g(z);
     with ``latent: nayer`` z_i = W_{k_i}·e_{y_i} + b_{k_i}, fresh noisy layers each round (NoisyLatent):
       L_G = Σ_i [φ_i·(w_adv·ℓ_adv + w_act·ℓ_act) + φ_i^{phi_ce}·w_ce·ℓ_ce]/N + w_bn·L_BN + w_ie·L_ie
           + Σ_i (w_tv·ℓ_tv + w_l2·ℓ_l2)/N        (image prior: stands in for L_BN when T has no BN)
       θ_g, z ← Adam(∇L_G; lr_g / lr_z, betas adam_beta1, adam_beta2)      (nayer: θ_g, W, b ← Adam(lr_g))
     optionally Reptile: θ ← θ + η(θ_fast − θ)                                         (meta, meta_lr)
  2. BN prior: the momentum statistics move once, from the last generator step's batch statistics:
       μ̄_l ← m·μ̄_l + (1−m)·μ_l,  σ̄²_l ← m·σ̄²_l + (1−m)·σ²_l                           (bn_momentum m)
  3. x_q = quantize(g(z)) enters B with T(x_q) (partial update, balanced eviction) and, with
     ``keep: reservoir``, the reservoir; this forward of T leaves the BN prior untouched.
  4. kd_steps of S on n = min(batch_size, kd_batch_cap·|B|) samples drawn from B (uniform, or prioritized):
       L_S = Σ_i w_i·φ_i·KL_T(T(x_i) ‖ S(x_i))·T² / n,   p_i ← KL_i + replay.eps
       θ_S ← SGD(∇L_S; kd_lr, kd_momentum (Nesterov), kd_weight_decay)
No host sync per step: a round's loss terms stay on the device and are checked once per round.
"""
from __future__ import annotations

import copy
import time

import torch

from kdpipe.accel import Accel
from kdpipe.losses import distill_loss, kd_per_sample
from kdpipe.models import penultimate
from kdpipe.synth.bn_hooks import BNPrior
from kdpipe.synth.generator import Generator, NoisyLatent
from kdpipe.synth.losses import act_term, adv_term, ce_term, ie_term, l2_term, tv_term
from kdpipe.synth.phi import phi_weights
from kdpipe.synth.replay import ReplayBuffer, Reservoir, anneal_beta
from kdpipe.train import check_finite_steps, random_translations, shift_by


def class_entropy(hist: torch.Tensor) -> float:
    """Entropy (nats) of a class histogram; log(C) when perfectly balanced."""
    p = hist.float() / hist.sum().clamp_min(1)
    return float(-(p[p > 0] * p[p > 0].log()).sum())


class Synthesizer:
    """The generator, the proxy student, their optimizers, the BN prior and the buffer (and reservoir) of one
    synthesis run; ``round(r)`` runs round r and returns its metrics; ``state_dict`` is what a resume carries."""

    def __init__(self, s, acc: Accel, teacher, student, spec: dict, generator: torch.Generator,
                 stats: dict | None = None, seed: int = 0, *, replay, phi):
        self.s, self.acc, self.g = s, acc, generator  # acc: the speed knobs on the device (acc.device)
        device = acc.device
        self.replay, self.phi = replay, phi  # the sections replay and phi (shared with distill)
        self.teacher, self.student = teacher, student
        C, ch, size = spec["num_classes"], spec["in_channels"], spec["image_size"]
        self.num_classes = C
        self.gen = Generator(s.nz, size, ch, s.ngf).to(device)
        self.latent = NoisyLatent(C, s.nz, seed).to(device) if s.latent == "nayer" else None
        for m in (teacher, student, self.gen):
            acc.frozen_module(m)  # the memory format (channels_last on CUDA), in place
        self.opt_g = acc.adam(self.gen.parameters(), s.lr_g, (s.adam_beta1, s.adam_beta2))
        self.opt_s = acc.sgd(student.parameters(), s.kd_lr, s.kd_momentum, s.kd_weight_decay, s.kd_nesterov)
        self.bn = BNPrior(teacher, s.bn_momentum, stats)
        self.feats: dict = {}  # the teacher's penultimate features, for the DAFL activation term
        self.feat_hook = penultimate(teacher).register_forward_hook(
            lambda m, i, o: self.feats.__setitem__("f", i[0])) if s.w_act > 0 else None
        self.buf = ReplayBuffer(s.capacity, (ch, size, size), C, device, s.eviction, replay.eps)
        self.kept = Reservoir(s.capacity, (ch, size, size), C, seed=seed) if s.keep == "reservoir" else None
        self.kd_total, self.kd_step, self.t_gen = s.rounds * s.kd_steps, 0, 0.0

    def round(self, r: int) -> dict:
        """Round r (steps 1-4 above); its metrics: loss_g and bn (the unweighted BN prior) of the last generator
        step, the buffer's size, class entropy and smallest / largest class count."""
        tg = time.perf_counter()
        fast, z, m = self._generator_steps(r)
        self._add_to_buffer(fast, z)
        self.t_gen += time.perf_counter() - tg
        self._replay(r)
        hist = self.buf.histogram()
        return {**m, "buffer": self.buf.size, "class_entropy": class_entropy(hist), "hist_min": int(hist.min()),
                "hist_max": int(hist.max())}

    def _generator_steps(self, r: int):
        """Step 1: g_steps steps of the generator (and the latent codes) against the teacher."""
        s, acc, device, g, buf = self.s, self.acc, self.acc.device, self.g, self.buf
        teacher, student = self.teacher, self.student
        if s.balanced_targets and buf.size:  # targets: uniform, or inversely to the buffer's class histogram
            w_t = 1.0 / (buf.histogram().float().cpu() + 1.0)
            targets = torch.multinomial(w_t / w_t.sum(), s.batch_size, replacement=True, generator=g)
        else:
            targets = torch.randint(self.num_classes, (s.batch_size,), generator=g)
        targets = targets.to(device)
        betas = (s.adam_beta1, s.adam_beta2)
        if self.latent is not None:  # NAYER: fresh noisy layers, trained with the generator this round
            self.latent.reset(targets, g)
            code = lambda: self.latent(targets)  # noqa: E731
            opt_z = acc.adam(self.latent.parameters(), s.lr_g, betas)
        else:
            z = torch.randn(s.batch_size, s.nz, generator=g).to(device).requires_grad_(s.lr_z > 0)
            code = lambda: z  # noqa: E731
            opt_z = acc.adam([z], s.lr_z, betas) if s.lr_z > 0 else None
        fast = copy.deepcopy(self.gen) if s.meta else self.gen
        opt = acc.adam(fast.parameters(), s.lr_g, betas) if s.meta else self.opt_g
        student.eval().requires_grad_(False)  # the adversarial term needs grads through it, not of its weights
        use_adv = s.w_adv > 0 and r >= s.warmup_rounds
        terms = []  # per step: the loss terms, on the device, checked once per round (no host sync per step)
        for _ in range(s.g_steps):
            with acc.autocast():
                x = acc.inputs(fast(code()))
                if s.jitter:  # DeepInversion's random jitter: the image must hold under small shifts
                    x = shift_by(x, random_translations(len(x), s.jitter, generator=g))
                t_logits = teacher(x).float()
                s_logits = student(x).float() if use_adv else None
            w = phi_weights(t_logits, self.phi.gamma, self.phi.clip, buf.class_freq()) if s.phi \
                else torch.ones(len(x), device=device)
            ce = s.w_ce * ce_term(t_logits, targets)
            per = torch.zeros_like(ce)
            if use_adv:
                per = per + s.w_adv * adv_term(s_logits, t_logits)
            if s.w_act > 0:
                per = per + s.w_act * act_term(self.feats["f"].float())
            l_ce, l_per = ((w if s.phi_ce else 1.0) * ce).mean(), (w * per).mean()
            bn = self.bn.loss()
            l_bn, l_ie = s.w_bn * bn, s.w_ie * ie_term(t_logits)
            l_img = (s.w_tv * tv_term(x.float()) + s.w_l2 * l2_term(x.float())).mean() if s.w_tv or s.w_l2 \
                else torch.zeros_like(l_ie)  # the image prior (DeepInversion)
            loss_g = l_per + l_ce + l_bn + l_ie + l_img
            terms.append(torch.stack([loss_g, l_ce, l_per, l_bn, l_ie, l_img]).detach())
            opt.zero_grad(set_to_none=True)
            if opt_z:
                opt_z.zero_grad(set_to_none=True)
            loss_g.backward()
            opt.step()
            if opt_z:
                opt_z.step()
        names = ("total", "ce", "adv_act", "bn", "ie", "image")
        check_finite_steps(f"synthesize (generator, round {r})", r * s.g_steps,
                           **dict(zip(names, torch.stack(terms).unbind(1))))
        self.bn.update()  # step 2: the momentum statistics move once a round, from the last step's batch
        if s.meta:  # Reptile: θ ← θ + η (θ_fast − θ)
            with torch.no_grad():
                for p, q in zip(self.gen.parameters(), fast.parameters()):
                    p.add_(q - p, alpha=s.meta_lr)
                for b, bq in zip(self.gen.buffers(), fast.buffers()):
                    b.copy_(bq)
        with torch.no_grad():
            z = code().detach()
        return fast, z, {"loss_g": loss_g.item(), "bn": bn.item()}

    @torch.no_grad()
    def _add_to_buffer(self, fast, z) -> None:
        """Step 3: partial buffer update, with teacher logits of exactly the stored (quantized) images."""
        xq = ReplayBuffer.quantize(fast(z)).float() / 255.0
        with self.bn.paused():
            t_xq = self.teacher(xq)
        self.buf.add(xq, t_xq)
        if self.kept:
            self.kept.add(xq, t_xq)

    def _replay(self, r: int) -> None:
        """Step 4: kd_steps of the proxy student on the buffer (uniform or prioritized), refreshing priorities."""
        s, acc, buf, student, g = self.s, self.acc, self.buf, self.student, self.g
        student.train().requires_grad_(True)
        n = min(s.batch_size, s.kd_batch_cap * buf.size)
        ones = torch.ones(n, device=acc.device)
        # uniform draws: the round's indices at once; prioritized ones read the priorities the last step refreshed
        uniform = None if s.priority else torch.randint(buf.size, (s.kd_steps, n), generator=g).to(acc.device)
        kd_losses, kd_first = [], self.kd_step
        rp = self.replay
        for k in range(s.kd_steps):
            beta = anneal_beta(rp.beta0, self.kd_step, self.kd_total)
            idx, iw = buf.sample(n, rp.alpha, beta, g, norm=rp.iw_norm) if uniform is None else (uniform[k], ones)
            xb, tb = buf.images(idx), buf.logits[idx]
            with acc.autocast():
                sl = student(acc.inputs(xb)).float()
            phi = phi_weights(tb, self.phi.gamma, self.phi.clip, buf.class_freq()) if s.phi else 1.0
            loss = distill_loss(sl, tb, s.temperature, 1.0, iw * phi)
            kd_losses.append(loss.detach())
            self.opt_s.zero_grad(set_to_none=True)
            loss.backward()
            self.opt_s.step()
            buf.update_priority(idx, kd_per_sample(sl.detach(), tb, s.temperature))
            self.kd_step += 1
        if kd_losses:
            check_finite_steps(f"synthesize (proxy student, round {r})", kd_first, kd=torch.stack(kd_losses))

    def output(self) -> dict:
        """What the stage writes: the reservoir (``keep: reservoir``) or the buffer as it ends."""
        return self.kept.state() if self.kept else self.buf.state()

    def close(self) -> None:
        """Remove the hooks on the teacher."""
        self.bn.remove()
        if self.feat_hook:
            self.feat_hook.remove()

    def state_dict(self) -> dict:
        """Everything that carries over from one round to the next."""
        st = {"gen": self.gen.state_dict(), "opt_g": self.opt_g.state_dict(), "student": self.student.state_dict(),
              "opt_s": self.opt_s.state_dict(), "buffer": self.buf.state_dict(), "kd_step": self.kd_step,
              "t_gen": self.t_gen, "bn_prev": self.bn.state()}
        if self.kept:
            st["kept"] = self.kept.state_dict()
        return st

    def load_state_dict(self, st: dict) -> None:
        for obj, k in ((self.gen, "gen"), (self.opt_g, "opt_g"), (self.student, "student"), (self.opt_s, "opt_s"),
                       (self.buf, "buffer")):
            obj.load_state_dict(st[k])
        if self.kept:
            self.kept.load_state_dict(st["kept"])
        self.bn.load_state(st["bn_prev"])
        self.kd_step, self.t_gen = st["kd_step"], st["t_gen"]
