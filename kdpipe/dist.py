"""Multi-process data parallel (DDP) under ``torchrun --nproc_per_node N -m kdpipe <stage>``.

One process per GPU (or N CPU processes with gloo). Every rank draws the same random numbers
(same seed, same generator), so every rank knows every global batch; each rank takes its shard of
it (``shard``), and DDP averages the gradients. With the loss of a shard scaled by
W·n_shard/n_global (``scale``), that average is the gradient of the global batch's mean loss, so
N processes train like 1 process on the same global batch (``batch_size`` is the global batch).
BatchNorm statistics are taken over the global batch too (``sync_bn``): torch's SyncBatchNorm on
CUDA, :class:`GlobalBatchNorm` (two differentiable all-reduces) on CPU, where torch has none.
Only rank 0 logs to MLflow and writes outputs (``is_main``).

Stages that run data-parallel: ``DDP_STAGES``; any other stage under torchrun runs on rank 0 alone
(the other ranks exit at once): synthesis is one generator on rank 0, so the synthetic set is the
same whatever the number of processes. What a stage computes over the whole global batch (distill:
φ weights, replay priorities) it assembles from the shards with ``gather_shards``; parameters trained
outside the DDP module (distill's hint adapters) get their gradients averaged by ``average_grads``.
"""
from __future__ import annotations

import os
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

DDP_STAGES = {"train-teacher", "baseline", "distill"}


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else int(os.environ.get("RANK", "0"))


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main() -> bool:
    """Rank 0 (or no torchrun at all): the one process that logs and writes outputs."""
    return rank() == 0


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


TIMEOUT_ENV = "KDPIPE_DIST_TIMEOUT"  # seconds a collective waits for the other ranks
DEFAULT_TIMEOUT_S = 1800


def timeout() -> timedelta:
    """How long a collective waits for a missing rank before this one fails: $KDPIPE_DIST_TIMEOUT seconds,
    30 min by default. It bounds the wait for a peer that hangs or whose node drops off the network
    (a killed peer closes its sockets: gloo fails at once), and it must cover rank 0 writing the outputs
    and its MLflow run while the others wait at the final barrier."""
    raw = os.environ.get(TIMEOUT_ENV, "").strip()
    try:
        seconds = float(raw) if raw else DEFAULT_TIMEOUT_S
    except ValueError:
        raise ValueError(f"{TIMEOUT_ENV}={raw!r}: expected a number of seconds") from None
    if seconds <= 0:
        raise ValueError(f"{TIMEOUT_ENV}={raw!r}: expected a positive number of seconds")
    return timedelta(seconds=seconds)


def init(device: torch.device) -> None:
    """Join torchrun's process group (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT from the env):
    nccl with one GPU per local rank on CUDA, gloo on CPU, collectives timing out after ``timeout()``.
    No-op without torchrun."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return
    if device.type == "cuda":
        torch.cuda.set_device(local_rank())
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timeout())


def close() -> None:
    """Barrier, then leave the process group (every rank calls it once its stage is done)."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def device_for(device: torch.device) -> torch.device:
    """This rank's device: cuda:<LOCAL_RANK> on CUDA under torchrun, else ``device``."""
    return torch.device("cuda", local_rank()) if device.type == "cuda" and world_size() > 1 else device


def shard(n: int) -> slice:
    """This rank's contiguous share of a global batch of ``n``: rows [r·n/W, (r+1)·n/W)."""
    w, r = world_size(), rank()
    return slice(r * n // w, (r + 1) * n // w)


def scale(n_local: int, n_global: int) -> float:
    """Factor on a shard's mean loss so that DDP's gradient average is the global batch's mean:
    (1/W) Σ_r W·(n_r/n)·mean_r = (1/n) Σ_i loss_i. Exactly 1 with one process."""
    return world_size() * n_local / n_global


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Σ over ranks, in place (no-op with one process)."""
    if active():
        dist.all_reduce(t)
    return t


def all_reduce_mean(t: torch.Tensor) -> torch.Tensor:
    """Mean over ranks, in place (no-op with one process)."""
    if active():
        dist.all_reduce(t)
        t /= dist.get_world_size()
    return t


def gather_shards(part: torch.Tensor, sh: slice, n: int, dim: int = 0) -> torch.Tensor:
    """The global batch of ``n`` along ``dim`` from every rank's shard (``part`` = this rank's rows
    ``sh``), on every rank: zeros with this shard written in, summed over ranks (x + 0 = x: exact).
    With one process ``part`` itself."""
    if not active():
        return part
    full = part.new_zeros(*part.shape[:dim], n, *part.shape[dim + 1:])
    full.narrow(dim, sh.start, sh.stop - sh.start).copy_(part)
    return all_reduce_sum(full)


def average_grads(params) -> None:
    """What DDP does for its own module, for parameters outside it: grad ← mean over ranks."""
    grads = [p.grad for p in params if p.grad is not None]
    if active() and grads:
        flat = all_reduce_mean(torch.cat([g.reshape(-1) for g in grads]))  # one collective for all of them
        for g, f in zip(grads, flat.split([g.numel() for g in grads])):
            g.copy_(f.view_as(g))


class _AllReduceSum(torch.autograd.Function):
    """y = Σ_r x_r on every rank; the gradient of Σ_r L_r w.r.t. x_r is Σ_r' ∂L_r'/∂y: also an all-reduce."""

    @staticmethod
    def forward(ctx, x):
        x = x.clone()
        dist.all_reduce(x)
        return x

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


class GlobalBatchNorm(_BatchNorm):
    """BatchNorm whose training statistics are those of the global batch over all ranks, for CPU
    (gloo), where torch's SyncBatchNorm refuses to run. Per channel, over N = Σ_r n_r values:
    mean = Σx / N, var = Σ(x − mean)² / N (two passes, as F.batch_norm); the running variance is
    updated with the unbiased var·N/(N−1). The all-reduces are differentiable (their backward sums
    the gradients over ranks), so the gradients are those of 1 process on the global batch."""

    def _check_input_dim(self, input):
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and active()):
            return super().forward(x)
        all_reduce = _AllReduceSum.apply
        dims = [0, *range(2, x.dim())]
        shape = [1, -1] + [1] * (x.dim() - 2)
        count = torch.full((1,), float(x.numel() // x.shape[1]), dtype=x.dtype, device=x.device)
        tot = all_reduce(torch.cat([x.sum(dims), count]))
        n = tot[-1]
        mean = tot[:-1] / n
        var = all_reduce(((x - mean.view(shape)) ** 2).sum(dims)) / n
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                self.running_mean.lerp_(mean.detach(), m)
                self.running_var.lerp_(var.detach() * n / (n - 1), m)
        y = (x - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
        return y * self.weight.view(shape) + self.bias.view(shape) if self.affine else y


def _swap_bn(module: nn.Module, make) -> nn.Module:
    """Replace every BatchNorm in ``module`` by ``make(bn)``, sharing its parameters and buffers."""
    for name, child in module.named_children():
        module.add_module(name, _swap_bn(child, make))
    if isinstance(module, _BatchNorm):
        new = make(module)
        if new is not module:
            new.weight, new.bias = module.weight, module.bias
            new.running_mean, new.running_var = module.running_mean, module.running_var
            new.num_batches_tracked = module.num_batches_tracked
            new.train(module.training)
            new._kdpipe_bn_class = getattr(module, "_kdpipe_bn_class", type(module))
        return new
    return module


def _bn_args(bn: _BatchNorm) -> dict:
    return {"num_features": bn.num_features, "eps": bn.eps, "momentum": bn.momentum, "affine": bn.affine,
            "track_running_stats": bn.track_running_stats}


def convert_sync_bn(model: nn.Module, device: torch.device) -> nn.Module:
    """BatchNorm -> global-batch BatchNorm: torch's SyncBatchNorm on CUDA, GlobalBatchNorm elsewhere."""
    cls = nn.SyncBatchNorm if device.type == "cuda" else GlobalBatchNorm
    return _swap_bn(model, lambda bn: bn if isinstance(bn, cls) else cls(**_bn_args(bn)).to(device))


def revert_sync_bn(model: nn.Module) -> nn.Module:
    """Undo ``convert_sync_bn`` (the original BatchNorm classes, same parameters and buffers)."""
    return _swap_bn(model, lambda bn: bn._kdpipe_bn_class(**_bn_args(bn)).to(bn.weight.device)
                    if hasattr(bn, "_kdpipe_bn_class") and type(bn) is not bn._kdpipe_bn_class else bn)


def wrap(model: nn.Module, device: torch.device, sync_bn: bool = True) -> nn.Module:
    """The module to train with: ``model`` itself with one process; else DDP around it (BatchNorm
    converted in place to global-batch statistics first when ``sync_bn``). DDP broadcasts rank 0's
    parameters and buffers, so every rank starts from the same weights."""
    if not active():
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP

    if sync_bn:
        convert_sync_bn(model, device)
    return DDP(model, device_ids=[device.index] if device.type == "cuda" else None)


def unwrap(model: nn.Module) -> nn.Module:
    """After training: the plain model (BatchNorm classes restored), for eval, hooks and export."""
    return revert_sync_bn(model) if active() else model
