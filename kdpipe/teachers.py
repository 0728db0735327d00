"""The teacher(s): the one of data/teacher, or the ensemble of ``teachers`` (each a trained stage
folder or a checkpoint file for an architecture, with a weight w_k).

Soft targets of the ensemble at temperature T: p = Σ_k w_k softmax(z_k/T) / Σ_k w_k
(:func:`kdpipe.losses.multi_teacher_targets`). As one module (synthesis's guide, the teacher that
labels images) the ensemble outputs the log of its mean probability at T = 1:
    guide(x) = log Σ_k w_k softmax(z_k(x)) / Σ_k w_k
so CE to a target class, the adversarial term and argmax all read the averaged probabilities.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from kdpipe import paths
from kdpipe.checkpoints import load_checkpoint
from kdpipe.config import Config, ConfigError
from kdpipe.losses import multi_teacher_targets
from kdpipe.models import build_model
from kdpipe.utils import load_json, load_torch, sha256_file


def _load_folder(folder: Path, where: str) -> tuple[nn.Module, dict, str]:
    if not (folder / "model.pt").is_file() or not (folder / "spec.json").is_file():
        raise ConfigError(f"{where}: '{folder}' holds no model.pt + spec.json (a trained teacher stage)")
    spec = load_json(folder / "spec.json")
    model = build_model(spec)
    model.load_state_dict(load_torch(folder / "model.pt"))
    return model, spec, sha256_file(folder / "model.pt")


def load_member(ref, i: int, base: dict) -> tuple[nn.Module, str]:
    """Member ``teachers[i]`` -> (model, sha256 of its weights file); it must take the same input and
    classes as data/teacher (``base``: that teacher's spec)."""
    where = f"teachers.{i}"
    if ref.checkpoint is None or Path(ref.checkpoint).is_dir():
        model, spec, digest = _load_folder(Path(ref.checkpoint or paths.TEACHER), where)
        if ref.arch is not None and ref.arch != spec["arch"]:
            raise ConfigError(f"{where}.arch '{ref.arch}' differs from the trained teacher's '{spec['arch']}'")
    else:
        if ref.arch is None:
            raise ConfigError(f"{where}.arch is needed with the checkpoint file '{ref.checkpoint}'")
        spec = {**base, "arch": ref.arch}
        model = build_model(spec)
        try:
            digest = load_checkpoint(model, ref.checkpoint)[1]
        except ConfigError as e:
            raise ConfigError(f"{where}: {e}") from None
    keys = ("classes", "in_channels", "image_size")
    if any(spec[k] != base[k] for k in keys):
        raise ConfigError(f"{where} takes {[spec[k] for k in keys]} (classes, channels, size), but the teacher of "
                          f"'{paths.TEACHER}' takes {[base[k] for k in keys]}")
    return model, digest


class Ensemble(nn.Module):
    """K frozen teachers with weights w_k; ``forward`` is the guide (log mean probability),
    ``logits`` each member's logits (K×N×C)."""

    def __init__(self, members: list[nn.Module], weights: list[float]):
        super().__init__()
        self.members = nn.ModuleList(members)
        self.register_buffer("weights", torch.tensor(weights, dtype=torch.float32))

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([m(x) for m in self.members])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return multi_teacher_targets(self.logits(x), 1.0, self.weights).clamp_min(1e-12).log()


def base_teacher(cfg: Config) -> tuple[nn.Module, dict, str]:
    """The project's teacher: the card's (``teacher.source``, kdpipe/teacher_card.py) or train-teacher's
    data/teacher -> (model, spec, sha256 of its weights file)."""
    if cfg.teacher.source:
        from kdpipe.teacher_card import card_spec, load_card

        model, card = load_card(cfg.teacher)
        return model, card_spec(card), card.sha256
    return _load_folder(paths.TEACHER, "teacher")


def teacher_files(cfg: Config) -> list[str]:
    """What the project's teacher is read from (DVC deps, resume fingerprints): the card's files or data/teacher."""
    if cfg.teacher.source:
        from kdpipe.teacher_card import card_files

        return card_files(cfg.teacher)
    return [str(paths.TEACHER)]


def teacher_digest(cfg: Config) -> str:
    """sha256 of the project's teacher weights: the card's ONNX/TorchScript file or checkpoint, else data/teacher/model.pt."""
    return sha256_file(teacher_files(cfg)[0] if cfg.teacher.source else paths.TEACHER / "model.pt")


def load_teacher(cfg: Config, device) -> tuple[nn.Module, dict]:
    """The project's teacher alone (frozen, eval, on ``device``) and its spec."""
    model, spec, _ = base_teacher(cfg)
    return model.to(device).eval().requires_grad_(False), spec


def load_teachers(cfg: Config, device) -> tuple[nn.Module, dict, list[str]]:
    """(teacher, spec of data/teacher, sha256 of each member's weights). With ``teachers`` empty the
    teacher is data/teacher's own model, else an :class:`Ensemble`; frozen, in eval mode, on ``device``."""
    first, spec, digest = base_teacher(cfg)
    if not cfg.teachers:
        return first.to(device).eval().requires_grad_(False), spec, [digest]
    members = [load_member(ref, i, spec) for i, ref in enumerate(cfg.teachers)]
    ens = Ensemble([m for m, _ in members], [ref.weight for ref in cfg.teachers])
    return ens.to(device).eval().requires_grad_(False), spec, [d for _, d in members]


def teacher_logits(teacher: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """K×N×C logits of the teacher(s) (K = 1 for a single teacher)."""
    return teacher.logits(x) if isinstance(teacher, Ensemble) else teacher(x).unsqueeze(0)


def first_member(teacher: nn.Module) -> nn.Module:
    """The model whose modules ``distill.hints`` name: the single teacher, or the ensemble's first."""
    return teacher.members[0] if isinstance(teacher, Ensemble) else teacher


def target_logits(t: torch.Tensor, T: float, weights=None) -> torch.Tensor:
    """Logits z whose softmax(z/T) is the soft target: the teacher's own (K = 1), else
    z = T·log p with p the ensemble's mean tempered probability, so that
    kd_per_sample(s, z, T) = T²·KL(p ‖ softmax(s/T)) (batch mean: kdpipe.losses.kd_loss_probs)."""
    if len(t) == 1:
        return t[0]
    return T * multi_teacher_targets(t, T, weights).clamp_min(1e-12).log()


def guide_logits(t: torch.Tensor, weights=None) -> torch.Tensor:
    """The teacher's logits (K = 1), else the ensemble's guide: log of the mean probability at T = 1."""
    return target_logits(t, 1.0, weights)


def hard_labels(y: torch.Tensor | None, t: torch.Tensor, weights=None) -> torch.Tensor:
    """The real label where there is one (y ≥ 0), else the teacher's (ensemble's) argmax."""
    a = guide_logits(t, weights).argmax(1)
    return a if y is None else torch.where(y >= 0, y, a)
