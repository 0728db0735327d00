"""Fidelity without real data: how closely the student follows its teacher, on a held-out synthetic set.

Held-out set: ``evaluate.fidelity_samples`` fresh images of synthesize's final generator
(data/synthetic/generator.pt) from latent codes of their own seed (seed + HELDOUT_SEED), quantised to
uint8 like the kept set; distill trains on the kept set only, so it never saw them. With t, s the
teacher's and the student's logits:
    agreement = mean_i 1[argmax s_i = argmax t_i]
    KL        = mean_i KL(softmax t_i ‖ softmax s_i)                              (T = 1, nats)
    per-class agreement: the agreement over the samples the teacher assigns to each class
    ECE       = Σ_b |B_b|/n · |agree(B_b) − conf(B_b)|   bins B_b of the student's max probability,
                agree = agreement with the teacher in the bin: calibration against the teacher.
"""
from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from kdpipe import paths
from kdpipe.config import Config
from kdpipe.errors import DataError
from kdpipe.synth.generator import Generator
from kdpipe.synth.replay import ReplayBuffer
from kdpipe.utils import load_torch

HELDOUT_SEED = 1_000_003  # added to ``seed``: the held-out codes share no stream with synthesis or distill


@torch.no_grad()
def heldout_images(cfg: Config, spec: dict, n: int | None = None) -> torch.Tensor:
    """n uint8 N×C×H×W images of the final generator, from codes of their own seed (CPU, deterministic)."""
    s = cfg.synthesize
    path = paths.SYNTHETIC / "generator.pt"
    if not path.exists():
        raise DataError(f"'{path}' is missing: run the synthesize stage first")
    gen = Generator(s.nz, spec["image_size"], spec["in_channels"], s.ngf)
    gen.load_state_dict(load_torch(path))
    gen.train()  # as during synthesis: BatchNorm on the batch's statistics (batches of synthesize.batch_size)
    g = torch.Generator().manual_seed(cfg.seed + HELDOUT_SEED)
    z = torch.randn(n or cfg.evaluate.fidelity_samples, s.nz, generator=g)
    return torch.cat([ReplayBuffer.quantize(gen(zb)) for zb in z.split(s.batch_size)])


def ece(conf: torch.Tensor, correct: torch.Tensor, bins: int) -> float:
    edges = torch.linspace(0, 1, bins + 1)
    idx = torch.bucketize(conf, edges[1:-1])
    total = 0.0
    for b in range(bins):
        m = idx == b
        if m.any():
            total += m.float().mean().item() * abs(correct[m].float().mean().item() - conf[m].mean().item())
    return total


@torch.no_grad()
def fidelity(t_logits: torch.Tensor, s_logits: torch.Tensor, classes: list[str], bins: int) -> dict:
    t_pred, p_s = t_logits.argmax(1), F.softmax(s_logits, 1)
    agree = p_s.argmax(1) == t_pred
    kl = F.kl_div(F.log_softmax(s_logits, 1), F.log_softmax(t_logits, 1), reduction="batchmean", log_target=True)
    per_class = {c: (agree[t_pred == i].float().mean().item() if (t_pred == i).any() else None)
                 for i, c in enumerate(classes)}
    return {"agreement": agree.float().mean().item(), "kl": kl.item(), "ece": ece(p_s.max(1).values, agree, bins),
            "per_class_agreement": per_class, "teacher_class_counts": torch.bincount(t_pred, minlength=len(classes)).tolist()}


@torch.no_grad()
def torch_latency_ms(model: torch.nn.Module, x: torch.Tensor, runs: int = 30) -> float:
    """Median single-thread CPU latency of ``model`` on batch ``x`` (ms)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model(x)
        times = []
        for _ in range(runs):
            t0 = time.perf_counter()
            model(x)
            times.append((time.perf_counter() - t0) * 1e3)
    finally:
        torch.set_num_threads(threads)
    return float(sorted(times)[len(times) // 2])
