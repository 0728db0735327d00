"""The synthetic buffer (SSD-KD's partially-updated replay buffer) and prioritized replay δ.

Buffer: fixed capacity, kept on the device as uint8 images (exactly what is saved) with the
teacher's logits. ``add`` is a partial update: new entries enter with the current maximum priority;
when full, the oldest entry of the most over-represented (teacher-predicted) class leaves first
(``eviction="balanced"``), or simply the oldest entry (``"fifo"``, a plain memory bank).

Prioritized replay (Schaul et al. 2016), the RL sampler SSD-KD names:
    p_i  = KL(teacher(x_i) ‖ student(x_i)) + ε
    P(i) = p_i^α / Σ_k p_k^α
    w_i  = (N · P(i))^(−β) / max_j w_j      (β annealed β₀ → 1; max over the drawn batch)
With ``norm="mean"`` the weights are divided by their batch mean instead (mean 1): the same relative
correction, but the loss keeps the uniform sampler's scale, where /max shrinks every step by the mean
of w/max (0.4-0.7 measured on digits) and so lowers the effective learning rate.

Reservoir (``synthesize.keep: reservoir``): what the stage writes can instead be a uniform sample of every
round's samples (Vitter's Algorithm R): the k-th sample generated (0-based) takes slot k while k < capacity,
else slot j ~ U{0..k} if j < capacity, so each of the n samples seen is kept with probability capacity/n.
The buffer above still feeds the proxy student; the reservoir only decides what is kept.
"""
from __future__ import annotations

import torch


def priority_probs(priorities: torch.Tensor, alpha: float) -> torch.Tensor:
    p = priorities.double().clamp_min(0) ** alpha
    return p / p.sum()


def importance_weights(probs: torch.Tensor, idx: torch.Tensor, beta: float, norm: str = "max") -> torch.Tensor:
    w = (probs.numel() * probs[idx]) ** (-beta)
    return (w / (w.max() if norm == "max" else w.mean())).float()


def prioritized_sample(priorities: torch.Tensor, n: int, alpha: float, beta: float,
                       generator: torch.Generator | None = None, norm: str = "max") -> tuple[torch.Tensor, torch.Tensor]:
    """Draw ``n`` indices (with replacement) with P(i) ∝ p_i^α; return (indices, importance weights)."""
    probs = priority_probs(priorities, alpha)
    idx = torch.multinomial(probs.cpu().float(), n, replacement=True, generator=generator).to(priorities.device)
    return idx, importance_weights(probs, idx, beta, norm)


def anneal_beta(beta0: float, step: int, total: int) -> float:
    return beta0 + (1.0 - beta0) * min(1.0, step / max(1, total))


class ReplayBuffer:
    def __init__(self, capacity: int, shape: tuple[int, ...], num_classes: int, device="cpu",
                 eviction: str = "balanced", eps: float = 1e-3):
        if eviction not in ("balanced", "fifo"):
            raise ValueError(f"eviction must be 'balanced' or 'fifo', not {eviction!r}")
        self.capacity, self.num_classes, self.eviction, self.eps = capacity, num_classes, eviction, eps
        self.x = torch.zeros(capacity, *shape, dtype=torch.uint8, device=device)
        self.logits = torch.zeros(capacity, num_classes, device=device)
        self.priority = torch.zeros(capacity, device=device)
        self.age = torch.zeros(capacity, dtype=torch.long, device=device)  # insertion counter
        self.size, self.clock = 0, 0

    @staticmethod
    def quantize(x: torch.Tensor) -> torch.Tensor:
        return (x.clamp(0, 1) * 255).round().to(torch.uint8)

    def images(self, idx=None) -> torch.Tensor:
        x = self.x[: self.size] if idx is None else self.x[idx]
        return x.float() / 255.0

    def preds(self) -> torch.Tensor:
        return self.logits[: self.size].argmax(1)

    def histogram(self) -> torch.Tensor:
        return torch.bincount(self.preds(), minlength=self.num_classes)

    def class_freq(self) -> torch.Tensor | None:
        """p̄ over the buffer (mean teacher probabilities), for φ's diversity term."""
        if self.size == 0:
            return None
        return torch.softmax(self.logits[: self.size], 1).mean(0)

    def _evict(self, k: int) -> torch.Tensor:
        """Slots of k entries to replace: repeatedly the oldest of the most over-represented class."""
        preds, age = self.preds().cpu(), self.age[: self.size].cpu()
        if self.eviction == "fifo":
            return age.argsort()[:k].to(self.x.device)
        counts = torch.bincount(preds, minlength=self.num_classes)
        order = {c: (preds == c).nonzero().flatten()[age[preds == c].argsort()].tolist()
                 for c in range(self.num_classes)}
        slots = []
        for _ in range(k):
            c = int(counts.argmax())
            slots.append(order[c].pop(0))
            counts[c] -= 1
        return torch.tensor(slots, device=self.x.device)

    def add(self, x: torch.Tensor, logits: torch.Tensor) -> None:
        n = x.shape[0]
        if n > self.capacity:
            x, logits, n = x[: self.capacity], logits[: self.capacity], self.capacity
        free = min(n, self.capacity - self.size)
        slots = torch.arange(self.size, self.size + free, device=self.x.device)
        if free < n:
            slots = torch.cat([slots, self._evict(n - free)])
        p_new = self.priority[: self.size].max() if self.size else torch.tensor(1.0, device=self.x.device)
        self.size += free
        self.x[slots] = self.quantize(x)
        self.logits[slots] = logits.float()
        self.priority[slots] = p_new
        self.age[slots] = torch.arange(self.clock, self.clock + n, device=self.x.device)
        self.clock += n

    def sample(self, n: int, alpha: float, beta: float, generator=None, norm: str = "max"):
        return prioritized_sample(self.priority[: self.size], n, alpha, beta, generator, norm)

    def update_priority(self, idx: torch.Tensor, kl: torch.Tensor) -> None:
        """p_i = KL_i + ε (``eps``, replay.eps)."""
        # a non-finite KL (a diverged step, stopped by the stage's loss check) must not break the sampler first
        self.priority[idx] = torch.nan_to_num(kl.detach().float(), nan=0.0, posinf=0.0) + self.eps

    def state(self) -> dict:
        s = self.size
        return {"x": self.x[:s].cpu(), "logits": self.logits[:s].cpu(), "priority": self.priority[:s].cpu(),
                "age": self.age[:s].cpu()}

    def state_dict(self) -> dict:
        """The whole buffer (all slots, size, clock) for a resume checkpoint; ``state`` is the output."""
        return {"x": self.x, "logits": self.logits, "priority": self.priority, "age": self.age,
                "size": self.size, "clock": self.clock}

    def load_state_dict(self, st: dict) -> None:
        for k in ("x", "logits", "priority", "age"):
            getattr(self, k).copy_(st[k])
        self.size, self.clock = int(st["size"]), int(st["clock"])


class Reservoir:
    """A uniform sample of size ≤ ``capacity`` of every sample ever added (Algorithm R), uint8 images with
    their teacher logits; its own seeded generator, so keeping it draws nothing from the stage's stream."""

    def __init__(self, capacity: int, shape: tuple[int, ...], num_classes: int, seed: int = 0):
        self.capacity = capacity
        self.x = torch.zeros(capacity, *shape, dtype=torch.uint8)
        self.logits = torch.zeros(capacity, num_classes)
        self.age = torch.zeros(capacity, dtype=torch.long)  # index of the sample in the stream
        self.seen = 0
        self.g = torch.Generator().manual_seed(seed)

    @property
    def size(self) -> int:
        return min(self.seen, self.capacity)

    def add(self, x: torch.Tensor, logits: torch.Tensor) -> None:
        k = torch.arange(self.seen, self.seen + len(x))
        j = torch.where(k < self.capacity, k, (torch.rand(len(x), generator=self.g, dtype=torch.float64) * (k + 1)).long())
        keep = (j < self.capacity).nonzero().flatten()
        slots = {int(j[i]): int(i) for i in keep}  # a slot drawn twice in one batch keeps the later sample
        if slots:
            dst, src = torch.tensor(list(slots)), torch.tensor(list(slots.values()))
            self.x[dst] = ReplayBuffer.quantize(x[src].detach().cpu())
            self.logits[dst] = logits[src].detach().float().cpu()
            self.age[dst] = k[src]
        self.seen += len(x)

    def state(self) -> dict:
        s = self.size
        return {"x": self.x[:s].clone(), "logits": self.logits[:s].clone(), "priority": torch.ones(s), "age": self.age[:s].clone()}

    def state_dict(self) -> dict:
        return {"x": self.x, "logits": self.logits, "age": self.age, "seen": self.seen, "rng": self.g.get_state()}

    def load_state_dict(self, st: dict) -> None:
        for k in ("x", "logits", "age"):
            getattr(self, k).copy_(st[k])
        self.seen = int(st["seen"])
        self.g.set_state(st["rng"])
