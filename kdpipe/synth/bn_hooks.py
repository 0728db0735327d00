"""BatchNorm-statistics prior (DeepInversion, as in Fast-Datafree).

For every BN layer l of the frozen teacher, with batch statistics μ_l, σ²_l of its input
(mixed with the previous batch's by momentum m, as Fast does: μ ← m·μ_prev + (1−m)·μ_batch):
    L_BN = Σ_l ‖μ_l − μ_l^run‖₂ + ‖σ²_l − σ²_l^run‖₂
"""
from __future__ import annotations

import torch
from torch import nn


class BNStatsHook:
    def __init__(self, module: nn.BatchNorm2d, momentum: float = 0.0):
        self.module, self.momentum = module, momentum
        self.mean_prev = self.var_prev = None
        self.loss = torch.zeros(())
        self.handle = module.register_forward_hook(self._hook)

    def _hook(self, module, inputs, output):
        x = inputs[0].float()  # fp32 statistics under bf16 autocast (a no-op on fp32)
        mean = x.mean(dim=(0, 2, 3))
        var = x.permute(1, 0, 2, 3).flatten(1).var(dim=1, unbiased=False)
        if self.momentum > 0 and self.mean_prev is not None:
            mean = self.momentum * self.mean_prev + (1 - self.momentum) * mean
            var = self.momentum * self.var_prev + (1 - self.momentum) * var
        self.loss = torch.norm(mean - module.running_mean, 2) + torch.norm(var - module.running_var, 2)
        self.mean_prev, self.var_prev = mean.detach(), var.detach()

    def remove(self):
        self.handle.remove()


class BNPrior:
    """Hooks on every BatchNorm2d of ``model``; ``loss()`` is Σ_l of the last forward's terms."""

    def __init__(self, model: nn.Module, momentum: float = 0.0):
        self.hooks = [BNStatsHook(m, momentum) for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
        ref = next(iter([*model.parameters(), *model.buffers()]), None)
        self.device = ref.device if ref is not None else torch.device("cpu")

    def loss(self) -> torch.Tensor:
        if not self.hooks:  # a teacher without BatchNorm (e.g. BN folded by an exporter): no prior, a zero on its device
            return torch.zeros((), device=self.device)
        return torch.stack([h.loss for h in self.hooks]).sum()

    def remove(self):
        for h in self.hooks:
            h.remove()
