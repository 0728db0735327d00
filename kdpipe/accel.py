"""Speed knobs in one place, driven by the ``speed:`` config section.

- bf16 autocast (``amp``): forward and loss in bfloat16 where safe; no GradScaler needed for bf16.
- channels_last: NHWC memory format for the model and its inputs (tensor cores prefer it).
- torch.compile (``compile``), cuDNN autotuning (``cudnn_benchmark``), fused SGD/Adam (``fused``, CUDA).
- data placement: a split that fits stays on the GPU (indexing and augmentation there, no copies
  per step); otherwise it stays on the host and a DataLoader with pinned memory and workers feeds it.

"auto" means on for CUDA and off on CPU, so on CPU the defaults train bit-identically to plain
fp32 code. Used by train-teacher and baseline (kdpipe/train.py), synthesize and distill. Every
helper here is free of host syncs, so the training loop can run ahead of the GPU.

A stage builds one ``Accel(cfg.speed, device)`` and passes it on; its methods are the knobs applied
(``acc.autocast()``, ``acc.inputs(x)``, ``acc.sgd(...)``, ``acc.train_module(m)``, ...).
"""
from __future__ import annotations

import contextlib
import dataclasses

import torch
from torch import nn

from kdpipe import dist
from kdpipe.config import SpeedCfg


def _on(knob, device: torch.device) -> bool:
    return device.type == "cuda" if knob == "auto" else bool(knob)


@dataclasses.dataclass(frozen=True)
class Accel:
    """The speed knobs of one stage on its device, built once (``Accel(cfg.speed, device)``) and passed on."""

    speed: SpeedCfg
    device: torch.device

    def amp_dtype(self) -> torch.dtype | None:
        """bfloat16 when autocast is on for this device, else None (fp32)."""
        amp = self.speed.amp
        return torch.bfloat16 if amp == "bf16" or (amp == "auto" and self.device.type == "cuda") else None

    def autocast(self):
        dtype = self.amp_dtype()
        return torch.autocast(self.device.type, dtype=dtype) if dtype else contextlib.nullcontext()

    def memory_format(self) -> torch.memory_format:
        return torch.channels_last if _on(self.speed.channels_last, self.device) else torch.contiguous_format

    def setup(self) -> None:
        """Process-wide switches for a CUDA device: cuDNN autotuning; TF32 for the fp32 matmuls left under autocast."""
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = self.speed.cudnn_benchmark
            if self.amp_dtype() is not None:
                torch.backends.cuda.matmul.allow_tf32 = True

    def train_module(self, model: nn.Module) -> nn.Module:
        """The callable to train with: ``model`` in the chosen memory format (in place), wrapped in DDP
        under torchrun, compiled if asked. Save and evaluate ``model`` itself (its state_dict keys stay plain)."""
        self.setup()
        if self.memory_format() is torch.channels_last:
            model.to(memory_format=torch.channels_last)
        net = dist.wrap(model, self.device, self.speed.sync_bn)
        return torch.compile(net) if self.speed.compile else net

    def frozen_module(self, model: nn.Module) -> nn.Module:
        """A model not wrapped for training (no DDP, no compile): the chosen memory format, in place. The
        teacher; in synthesize also the generator and proxy student, which one process trains as they are."""
        if self.memory_format() is torch.channels_last:
            model.to(memory_format=torch.channels_last)
        return model

    def plain(self, model: nn.Module) -> nn.Module:
        """After training: the weights back in the default (contiguous) layout, to save and export."""
        if self.memory_format() is torch.channels_last:
            model.to(memory_format=torch.contiguous_format)
        return model

    def inputs(self, x: torch.Tensor) -> torch.Tensor:
        """A batch in the model's memory format (4-D only; a no-op on the default CPU path)."""
        fmt = self.memory_format()
        return x.contiguous(memory_format=fmt) if fmt is torch.channels_last and x.dim() == 4 else x

    def _fused(self) -> dict:
        return {"fused": True} if self.speed.fused and self.device.type == "cuda" else {}

    def sgd(self, params, lr: float, momentum: float, weight_decay: float,
            nesterov: bool = True) -> torch.optim.Optimizer:
        """SGD (Nesterov when ``nesterov`` and momentum > 0); the fused kernel on CUDA when ``speed.fused``."""
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay,
                               nesterov=nesterov and momentum > 0, **self._fused())

    def adam(self, params, lr: float, betas: tuple[float, float]) -> torch.optim.Optimizer:
        """Adam; the fused kernel on CUDA when ``speed.fused``."""
        return torch.optim.Adam(params, lr=lr, betas=betas, **self._fused())

    def data_device(self, nbytes: int) -> torch.device:
        """Where a split of ``nbytes`` (float32) lives: on ``device`` if it is the CPU, if forced, or
        (auto) if it takes under a quarter of the GPU's memory (MNIST 0.2 GB, CIFAR-10 0.6 GB); else the host."""
        device, on = self.device, self.speed.data_on_device
        if device.type == "cpu" or on is True:
            return device
        if on is False:
            return torch.device("cpu")
        return device if nbytes < torch.cuda.get_device_properties(device).total_memory / 4 else torch.device("cpu")

    def split_device(self, meta: dict, split: str = "train") -> torch.device:
        """``data_device`` for a prepared split (float32 N×C×H×W, sizes from meta.json)."""
        n = meta["splits"][split]["n"] * meta["channels"] * meta["image_size"] ** 2 * 4
        return self.data_device(n)


class _Rows(torch.utils.data.Dataset):
    """Rows of in-memory tensors, fetched a whole batch at a time (``__getitems__``)."""

    def __init__(self, *tensors: torch.Tensor):
        self.tensors = tensors

    def __len__(self) -> int:
        return len(self.tensors[0])

    def __getitems__(self, idx):
        idx = torch.as_tensor(idx)
        return tuple(t[idx] for t in self.tensors)


def _as_batch(b):
    return b


def global_batches(n: int, batch_size: int) -> list[slice]:
    """The global batches of an epoch, as slices of its permutation."""
    return [slice(i, min(i + batch_size, n)) for i in range(0, n, batch_size)]


def epoch_batches(x: torch.Tensor, y: torch.Tensor, perm: torch.Tensor, batch_size: int, device: torch.device,
                  workers: int = 0):
    """Yield (x, y) of this rank's shard of each global batch ``perm[i:i+batch_size]``, on ``device``:
    through ``loader_batches`` when the data is on the host and ``device`` is not, else by plain indexing
    (data already on the GPU may be named ``cuda:0`` while ``device`` is ``cuda``: DataLoader workers must
    never see CUDA tensors, a forked worker cannot initialise CUDA)."""
    idx = [perm[s][dist.shard(s.stop - s.start)] for s in global_batches(len(perm), batch_size)]
    if x.device.type == "cpu" and device.type != "cpu":
        yield from loader_batches(x, y, idx, device, workers)
        return
    for i in idx:
        i = i.to(x.device)
        yield x[i].to(device), y[i].to(device)


def loader_batches(x: torch.Tensor, y: torch.Tensor, idx: list[torch.Tensor], device: torch.device, workers: int):
    """Batches ``x[i], y[i]`` for each index tensor of ``idx`` from host memory: a DataLoader with
    ``workers`` processes gathers each batch (pinned on CUDA) and it is copied without blocking the host."""
    loader = torch.utils.data.DataLoader(_Rows(x, y), batch_sampler=idx, collate_fn=_as_batch, num_workers=workers,
                                         pin_memory=device.type == "cuda")
    for xb, yb in loader:
        yield xb.to(device, non_blocking=True), yb.to(device, non_blocking=True)
