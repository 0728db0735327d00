"""Feature (hint) distillation: intermediate outputs of named modules, teacher vs student.

Hint layers are chosen by their ``named_modules()`` name (``distill.hints``: [teacher, student] pairs);
forward hooks keep each module's output. Per pair:
  mse (FitNets, Romero et al. 2015): mean((A(F_s) − F_t)²), A a learned adapter: 1×1 conv for
      N×C×H×W features, linear for N×D; spatial sizes matched by adaptive_avg_pool2d to the smaller;
  at  (Zagoruyko & Komodakis 2017): AT(F) = normalize(vec(mean_c F²)) (L2 per sample),
      loss = mean_n ‖AT(F_s) − AT(F_t)‖² (no adapter: the channel mean removes the channel count).
The pair losses are summed. Combined objective: α·KD + β·feature + γ·CE (:func:`kdpipe.losses.distill_loss`).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kdpipe.config import ConfigError
from kdpipe.losses import distill_loss


def capture(model: nn.Module, names: list[str], who: str) -> tuple[dict, list]:
    """Forward hooks keeping the output of each named module: (store name -> tensor, hook handles)."""
    modules = dict(model.named_modules())
    missing = [n for n in names if n not in modules or n == ""]
    if missing:
        avail = ", ".join(n for n in modules if n)
        raise ConfigError(f"distill.hints: the {who} has no module {', '.join(map(repr, missing))}; available: {avail}")
    store: dict[str, torch.Tensor] = {}

    def hook(name):  # clone: a following in-place op (ReLU(inplace=True)) must not change the kept output
        return lambda m, i, o: store.__setitem__(name, o.clone())

    return store, [modules[n].register_forward_hook(hook(n)) for n in names]


def match_spatial(fs: torch.Tensor, ft: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Pool 4-D features to the smaller H and W of the two (adaptive_avg_pool2d)."""
    if fs.dim() == 4 and fs.shape[-2:] != ft.shape[-2:]:
        size = (min(fs.shape[-2], ft.shape[-2]), min(fs.shape[-1], ft.shape[-1]))
        fs, ft = F.adaptive_avg_pool2d(fs, size), F.adaptive_avg_pool2d(ft, size)
    return fs, ft


def make_adapter(fs: torch.Tensor, ft: torch.Tensor) -> nn.Module:
    """Student feature -> teacher channels: 1×1 conv (4-D) or linear (2-D)."""
    if fs.dim() != ft.dim() or fs.dim() not in (2, 4):
        raise ConfigError(f"distill.hints: features must both be N×C×H×W or both N×D, got {tuple(fs.shape)} "
                          f"(student) and {tuple(ft.shape)} (teacher)")
    return nn.Conv2d(fs.shape[1], ft.shape[1], 1) if fs.dim() == 4 else nn.Linear(fs.shape[1], ft.shape[1])


def hint_mse(fs: torch.Tensor, ft: torch.Tensor, adapter: nn.Module) -> torch.Tensor:
    """mean((A(F_s) − F_t)²) after the spatial match."""
    fs, ft = match_spatial(adapter(fs), ft.detach())
    return F.mse_loss(fs, ft)


def attention_map(f: torch.Tensor) -> torch.Tensor:
    """AT(F) = normalize(vec(mean_c F²)): N×(H·W), unit L2 norm per sample."""
    return F.normalize(f.pow(2).mean(1).flatten(1), dim=1)


def at_loss(fs: torch.Tensor, ft: torch.Tensor) -> torch.Tensor:
    """mean over the batch of ‖AT(F_s) − AT(F_t)‖² (after the spatial match)."""
    if fs.dim() != 4 or ft.dim() != 4:
        raise ConfigError(f"distill.feature_loss 'at' needs N×C×H×W features, got {tuple(fs.shape)} and {tuple(ft.shape)}")
    fs, ft = match_spatial(fs, ft.detach())
    return (attention_map(fs) - attention_map(ft)).pow(2).sum(1).mean()


class FeatureKD(nn.Module):
    """Hooks on the hint modules of ``teacher`` and ``student`` plus the learned adapters (its
    parameters: give them to the optimizer). After ``teacher(x)`` and ``student(x)``, ``self()`` is
    the summed hint loss. ``example``: one input batch, used once to size the adapters."""

    def __init__(self, teacher: nn.Module, student: nn.Module, hints, kind: str = "mse", example=None):
        super().__init__()
        if not hints:
            raise ConfigError("distill.hints is empty: give [teacher_module, student_module] pairs for feature KD")
        self.pairs, self.kind = [(str(t), str(s)) for t, s in hints], kind
        self.t_feats, t_handles = capture(teacher, [t for t, _ in self.pairs], "teacher")
        self.s_feats, s_handles = capture(student, [s for _, s in self.pairs], "student")
        self.handles = t_handles + s_handles
        self.adapters = nn.ModuleList()
        if kind == "mse":
            if example is None:
                raise ValueError("FeatureKD(kind='mse') needs an example batch to size the adapters")
            modes = teacher.training, student.training
            with torch.no_grad():
                teacher.eval()(example), student.eval()(example)
            teacher.train(modes[0]), student.train(modes[1])
            self.adapters.extend(make_adapter(self.s_feats[s], self.t_feats[t]).to(example.device)
                                 for t, s in self.pairs)

    def forward(self) -> torch.Tensor:
        losses = []
        for i, (t, s) in enumerate(self.pairs):
            fs, ft = self.s_feats[s], self.t_feats[t]
            losses.append(hint_mse(fs, ft, self.adapters[i]) if self.kind == "mse" else at_loss(fs, ft))
        return torch.stack(losses).sum()

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


combined_loss = distill_loss  # the one KD objective (kdpipe/losses.py), under the name this module had
