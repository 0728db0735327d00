"""What the distill stage trains on (``distill.data``), as pools of samples drawn into batches.

  synthetic (default, data-free): data/synthetic only;
  real:  the real train split (data/prepared), labelled by the teacher(s) for KD, real labels for CE;
  mixed: each batch holds round(real_fraction·B) real samples and the rest synthetic.
An epoch is one pass over the first pool (synthetic, or real for ``real``); a second pool (mixed:
the real one) is drawn from fresh permutations, as many as the epoch's steps need. With
``distill.priority`` each pool is drawn by prioritized replay δ on its own priorities instead.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from kdpipe import data, paths
from kdpipe.errors import DataError
from kdpipe.synth.replay import prioritized_sample
from kdpipe.teachers import teacher_logits
from kdpipe.utils import load_json, load_torch, sha256_tensors


@dataclass
class Pool:
    kind: str  # "synthetic" | "real" (the data kind logged with the MLflow input)
    x: torch.Tensor  # N×C×H×W float in [0, 1]
    t: torch.Tensor  # K×N×C teacher logits of x (K teachers)
    y: torch.Tensor | None  # real labels; None: the teacher's argmax is the hard label
    batch: int  # samples of this pool in each batch
    priority: torch.Tensor  # N: prioritized-replay priorities

    def __len__(self) -> int:
        return len(self.x)


@dataclass
class Batch:
    x: torch.Tensor
    t: torch.Tensor  # K×B×C
    y: torch.Tensor | None  # B real labels, −1 where none (synthetic); None when no sample has one
    iw: torch.Tensor | float  # importance weights (prioritized replay), 1.0 without
    idx: list[torch.Tensor]  # per pool


@torch.no_grad()
def label(teacher, x: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
    """K×N×C logits of the frozen teacher(s) on x."""
    return torch.cat([teacher_logits(teacher, x[i : i + chunk]) for i in range(0, len(x), chunk)], dim=1)


def synthetic_pool(teacher, ensemble: bool, batch: int, device) -> tuple[Pool, dict]:
    """data/synthetic as a pool (+ its meta.json); its stored logits are the teacher's (one teacher),
    an ensemble labels the images again member by member."""
    meta = load_json(paths.SYNTHETIC / "meta.json")
    syn = load_torch(paths.SYNTHETIC / "samples.pt")
    if sha256_tensors(syn["x"], syn["logits"]) != meta["sha256"]:  # e.g. a synthesize run killed between its writes
        raise DataError(f"'{paths.SYNTHETIC / 'samples.pt'}' does not match the sha256 in "
                        f"'{paths.SYNTHETIC / 'meta.json'}': re-run the synthesize stage")
    x = syn["x"].to(device).float() / 255.0
    t = label(teacher, x) if ensemble else syn["logits"].to(device).unsqueeze(0)
    return Pool("synthetic", x, t, None, batch, torch.ones(len(x), device=device)), meta


def real_pool(teacher, batch: int, device) -> Pool:
    """The real train split: images labelled by the teacher(s) for KD, with their real labels for CE."""
    x, y = data.load_split("train", device)
    return Pool("real", x, label(teacher, x), y, batch, torch.ones(len(x), device=device))


def batch_sizes(route: str, batch: int, real_fraction: float) -> tuple[int, int]:
    """(synthetic, real) samples per batch."""
    if route == "mixed":
        real = min(max(round(real_fraction * batch), 1), batch - 1)
        return batch - real, real
    return (batch, 0) if route == "synthetic" else (0, batch)


class Batches:
    """Batches over one or two pools; ``steps`` per epoch = ⌈N_first / B_first⌉."""

    def __init__(self, pools: list[Pool], priority: bool = False, alpha: float = 0.6, iw_norm: str = "max"):
        self.pools, self.priority, self.alpha, self.iw_norm = pools, priority, alpha, iw_norm
        self.steps = math.ceil(len(pools[0]) / pools[0].batch)
        self.perms: list[torch.Tensor] = []

    def new_epoch(self, g: torch.Generator) -> None:
        """The first pool: one permutation (its last batch may be short); the others: steps·B indices
        from as many fresh permutations as that needs."""
        self.perms = []
        for j, p in enumerate(self.pools):
            need = len(p) if j == 0 else self.steps * p.batch
            perms = [torch.randperm(len(p), generator=g) for _ in range(math.ceil(need / len(p)))]
            self.perms.append((perms[0] if len(perms) == 1 else torch.cat(perms)).to(p.x.device))

    def step_sizes(self) -> list[int]:
        """Samples in each step's batch: each pool's ``batch``, but the first pool's last one may be short."""
        b0, n0 = self.pools[0].batch, len(self.pools[0])
        rest = sum(p.batch for p in self.pools[1:])
        return [(b0 if self.priority else min(b0, n0 - i * b0)) + rest for i in range(self.steps)]

    def get(self, i: int, beta: float, g: torch.Generator) -> Batch:
        idx, iw = [], []
        for p, perm in zip(self.pools, self.perms):
            if self.priority:
                j, w = prioritized_sample(p.priority, p.batch, self.alpha, beta, g, self.iw_norm)
            else:
                j, w = perm[i * p.batch : (i + 1) * p.batch], 1.0
            idx.append(j)
            iw.append(w)
        parts = list(zip(self.pools, idx))
        x = _cat([p.x[j] for p, j in parts])
        t = _cat([p.t[:, j] for p, j in parts], dim=1)
        y = None
        if any(p.y is not None for p in self.pools):
            y = _cat([p.y[j] if p.y is not None else torch.full_like(j, -1) for p, j in parts])
        w = _cat([torch.as_tensor(w, device=x.device).expand(len(j)) for w, j in zip(iw, idx)]) if self.priority else 1.0
        return Batch(x, t, y, w, idx)

    def update_priority(self, batch: Batch, delta: torch.Tensor) -> None:
        """priority ← per-sample KD loss (+10⁻³), pool by pool."""
        for p, j, part in zip(self.pools, batch.idx, delta.split([len(j) for j in batch.idx])):
            p.priority[j] = part + 1e-3


def _cat(ts: list[torch.Tensor], dim: int = 0) -> torch.Tensor:
    return ts[0] if len(ts) == 1 else torch.cat(ts, dim)
