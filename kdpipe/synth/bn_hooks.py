"""BatchNorm-statistics prior (DeepInversion, as in Fast-Datafree), and the same prior on the data owner's
activation statistics for a teacher without BatchNorm.

For every BN layer l of the frozen teacher, with batch statistics μ_l, σ²_l of its input, mixed with the
momentum statistics μ̄_l, σ̄²_l of earlier rounds (as Fast does; momentum m, ``synthesize.bn_momentum``):
    μ_l ← m·μ̄_l + (1−m)·μ_l,   σ²_l ← m·σ̄²_l + (1−m)·σ²_l        (until the first update: the batch's own)
    L_BN = Σ_l ‖μ_l − μ_l^run‖₂ + ‖σ²_l − σ²_l^run‖₂
and ``update()``, called once per round (Fast's ``update_mmt``), moves the momentum statistics with the last
forward's batch statistics: μ̄_l ← m·μ̄_l + (1−m)·μ_l^batch (the first update: μ̄_l ← μ_l^batch); a forward
under ``paused()`` (the buffer's no-grad forward) changes neither the loss nor what ``update()`` reads.
Without BN (folded by the exporter), the targets can come from the data owner instead (``kdpipe activation-stats``,
``synthesize.stats``): per-channel mean and variance of every convolution's output on their data, μ_l^own, σ²_l^own,
the same kind of aggregate as BN's running statistics; then L_BN = Σ_l ‖μ_l − μ_l^own‖₂ + ‖σ²_l − σ²_l^own‖₂ with
μ_l, σ²_l the batch statistics of that convolution's output. With no owner either (``synthesize.stats: standard``),
the targets are μ_l^std = 0, σ²_l^std = 1 for every convolution: a BN folded into its convolution leaves that
convolution's output distributed as the BN's output, per channel mean β_c and variance γ_c², and the standard
prior takes BN's initial γ = 1, β = 0 (trained values stay near them: docs/benchmarks.md measures both).
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

from kdpipe.config import ConfigError


def channel_stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and (biased) variance of an N×C×H×W batch, in fp32."""
    x = x.float()  # fp32 statistics under bf16 autocast (a no-op on fp32)
    return x.mean(dim=(0, 2, 3)), x.permute(1, 0, 2, 3).flatten(1).var(dim=1, unbiased=False)


class BNStatsHook:
    """The prior's term for one layer: the statistics of the BN layer's input against its running statistics,
    or (``target``) of the module's output against given statistics."""

    def __init__(self, module: nn.Module, momentum: float = 0.0, target: tuple[torch.Tensor, torch.Tensor] | None = None):
        self.module, self.momentum, self.target = module, momentum, target
        self.mean_prev = self.var_prev = None  # μ̄, σ̄²: the momentum statistics (None until the first update)
        self.batch: tuple[torch.Tensor, torch.Tensor] | None = None  # the last forward's (μ, σ²), for update()
        self.active = True  # False: forwards leave the hook alone (BNPrior.paused)
        self.loss = torch.zeros(())
        self.handle = module.register_forward_hook(self._hook)

    def _hook(self, module, inputs, output):
        if not self.active:
            return
        mean, var = channel_stats(inputs[0] if self.target is None else output)
        self.batch = (mean.detach(), var.detach())
        if self.momentum > 0 and self.mean_prev is not None:
            mean = self.momentum * self.mean_prev + (1 - self.momentum) * mean
            var = self.momentum * self.var_prev + (1 - self.momentum) * var
        run_mean, run_var = (module.running_mean, module.running_var) if self.target is None else self.target
        self.loss = torch.norm(mean - run_mean, 2) + torch.norm(var - run_var, 2)

    def update(self) -> None:
        """μ̄ ← m·μ̄ + (1−m)·μ_batch, σ̄² likewise, from the last forward (the first: μ̄ ← μ_batch)."""
        if self.momentum == 0 or self.batch is None:
            return
        mean, var = self.batch
        if self.mean_prev is not None:
            mean = self.momentum * self.mean_prev + (1 - self.momentum) * mean
            var = self.momentum * self.var_prev + (1 - self.momentum) * var
        self.mean_prev, self.var_prev = mean, var

    def remove(self):
        self.handle.remove()


class BNPrior:
    """Hooks on every BatchNorm2d of ``model`` or, with ``stats`` ({module name: {"mean", "var"}}, the owner's
    activation statistics), on those modules' outputs; ``loss()`` is Σ_l of the last forward's terms;
    ``update()`` moves the momentum statistics (once per round); ``state``/``load_state`` for a resume."""

    def __init__(self, model: nn.Module, momentum: float = 0.0, stats: dict | None = None):
        ref = next(iter([*model.parameters(), *model.buffers()]), None)
        self.device = ref.device if ref is not None else torch.device("cpu")
        if stats:
            modules = dict(model.named_modules())
            self.hooks = [BNStatsHook(modules[name], momentum, (s["mean"].to(self.device), s["var"].to(self.device)))
                          for name, s in stats.items()]
        else:
            self.hooks = [BNStatsHook(m, momentum) for m in model.modules() if isinstance(m, nn.BatchNorm2d)]

    def loss(self) -> torch.Tensor:
        if not self.hooks:  # a teacher without BatchNorm (e.g. BN folded by an exporter): no prior, a zero on its device
            return torch.zeros((), device=self.device)
        return torch.stack([h.loss for h in self.hooks]).sum()

    def update(self) -> None:
        """Move every layer's momentum statistics once (called once per round, after the generator steps)."""
        for h in self.hooks:
            h.update()

    @contextmanager
    def paused(self):
        """Forwards inside leave the prior as it was (loss, batch statistics, momentum statistics)."""
        for h in self.hooks:
            h.active = False
        try:
            yield
        finally:
            for h in self.hooks:
                h.active = True

    def state(self) -> list:
        return [(h.mean_prev, h.var_prev) for h in self.hooks]

    def load_state(self, state: list) -> None:
        for h, (mp, vp) in zip(self.hooks, state):
            h.mean_prev, h.var_prev = (None, None) if mp is None else (mp.to(self.device), vp.to(self.device))

    def remove(self):
        for h in self.hooks:
            h.remove()


def standard_stats(model: nn.Module) -> dict[str, dict[str, torch.Tensor]]:
    """``synthesize.stats: standard``: N(0, 1) targets for every Conv2d's output -> {module name: {"mean", "var"}}."""
    if any(isinstance(m, nn.BatchNorm2d) for m in model.modules()):
        raise ConfigError("synthesize.stats: standard is for a teacher without BatchNorm; this teacher has BatchNorm "
                          "layers, whose own running statistics are the prior (set synthesize.stats: null)")
    return {name: {"mean": torch.zeros(m.out_channels), "var": torch.ones(m.out_channels)}
            for name, m in model.named_modules() if isinstance(m, nn.Conv2d)}


@torch.no_grad()
def activation_stats(model: nn.Module, batches) -> dict[str, dict[str, torch.Tensor]]:
    """The data owner's side: per-channel mean and variance of every Conv2d's output over all ``batches``
    (exact over the whole set: running sums of x and x², in float64) -> {module name: {"mean", "var"}}."""
    convs = {name: m for name, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    acc: dict[str, list] = {name: [0.0, 0.0, 0] for name in convs}

    def hook(name):
        def fn(module, inputs, output):
            y = output.double()
            acc[name][0] = acc[name][0] + y.sum(dim=(0, 2, 3))
            acc[name][1] = acc[name][1] + y.pow(2).sum(dim=(0, 2, 3))
            acc[name][2] += y.shape[0] * y.shape[2] * y.shape[3]
        return fn

    handles = [m.register_forward_hook(hook(name)) for name, m in convs.items()]
    try:
        for x in batches:
            model(x)
    finally:
        for h in handles:
            h.remove()
    out = {}
    for name, (s, s2, n) in acc.items():
        mean = s / n
        out[name] = {"mean": mean.float(), "var": (s2 / n - mean.pow(2)).clamp_min(0).float()}
    return out
