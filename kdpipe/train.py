"""Supervised training and prediction shared by train-teacher and baseline."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from kdpipe import accel, dist
from kdpipe.config import SpeedCfg, TrainCfg


def random_translations(n: int, max_frac: float = 0.125, generator=None) -> torch.Tensor:
    """n×2 translations (affine_grid units, whole pixels drawn later) uniform in ±2·max_frac, on the CPU
    generator. One draw of n rows equals n/b successive draws of b rows (same stream), so an epoch's
    translations can be drawn at once."""
    return (torch.rand(n, 2, generator=generator) * 2 - 1) * (2 * max_frac)


def shift_by(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Translate each image of ``x`` by its row of ``t`` (rounded to whole pixels, zero fill)."""
    n, h = x.shape[0], x.shape[-1]
    t = torch.round(t.to(x.device) * h / 2) * 2 / h  # whole pixels
    theta = torch.zeros(n, 2, 3, device=x.device)
    theta[:, 0, 0] = theta[:, 1, 1] = 1
    theta[:, :, 2] = t
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="nearest", padding_mode="zeros", align_corners=False)


@torch.no_grad()
def predict(model: nn.Module, x: torch.Tensor, batch_size: int = 1024) -> torch.Tensor:
    """Logits of ``x`` in batches (fp32), on the model's device (``x`` may stay on the host)."""
    model.eval()
    dev = next(model.parameters()).device
    return torch.cat([model(x[i : i + batch_size].to(dev, non_blocking=True)) for i in range(0, len(x), batch_size)])


def accuracy(logits: torch.Tensor, y: torch.Tensor) -> float:
    return (logits.argmax(1) == y.to(logits.device)).float().mean().item()


def check_finite(stage: str, step: int, **terms) -> None:
    """Stop the stage (FloatingPointError) naming the step and each non-finite loss term."""
    terms = {k: torch.as_tensor(v).detach() for k, v in terms.items()}
    bad = {k: float(v) for k, v in terms.items() if not torch.isfinite(v).all()}
    if bad:
        raise FloatingPointError(f"{stage}: non-finite loss at step {step}: "
                                 + ", ".join(f"{k}={v}" for k, v in bad.items()) + "; no output written")


def check_finite_steps(stage: str, first_step: int, **terms: torch.Tensor) -> None:
    """``check_finite`` for many steps at once (one host sync): each term is a 1-D tensor of
    per-step values; stop at the first step where any is non-finite, naming it like check_finite."""
    ok = torch.stack([torch.isfinite(v) for v in terms.values()]).all(0)
    if not bool(ok.all()):
        j = int((~ok).nonzero()[0])
        check_finite(stage, first_step + j, **{k: v[j] for k, v in terms.items()})


def check_weights(stage: str, model: nn.Module) -> None:
    """Stop the stage if a parameter or buffer holds NaN/inf (before its outputs are written)."""
    for name, t in model.state_dict().items():
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise FloatingPointError(f"{stage}: non-finite weights in '{name}'; no output written")


def fit_supervised(model: nn.Module, x, y, xv, yv, cfg: TrainCfg, tracker, desc: str, generator=None,
                   resume=None, acc: accel.Accel | None = None) -> dict:
    """SGD + one-cycle schedule over ``cfg.epochs`` with random-shift augmentation; logs per epoch.
    ``resume`` (kdpipe.resume.Resume): continue from its checkpoint, save one every resume.every epochs.
    ``acc``: the speed knobs on the model's device (kdpipe.accel.Accel; default: ``SpeedCfg()``). Under
    torchrun each rank trains on its shard of every global batch of ``cfg.batch_size`` (kdpipe/dist.py);
    each node's local rank 0 saves resume checkpoints.
    No host sync inside an epoch: step losses stay on the device and are checked for NaN/inf once per
    epoch (the message names the first bad step, as a per-step check would)."""
    acc = acc or accel.Accel(SpeedCfg(), next(model.parameters()).device)
    device = acc.device
    net = acc.train_module(model)
    opt = acc.sgd(model.parameters(), cfg.lr, cfg.momentum, cfg.weight_decay, cfg.nesterov)
    batches = accel.global_batches(len(x), cfg.batch_size)
    steps_per_epoch = len(batches)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=cfg.epochs * steps_per_epoch,
                                                pct_start=cfg.pct_start)
    state = resume.load(tracker, generator) if resume else None
    if state:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
    sizes = torch.tensor([float(b.stop - b.start) for b in batches], device=device)
    bar = tqdm(range(state["done"] if state else 0, cfg.epochs), desc=desc, leave=False, disable=None)
    for epoch in bar:
        net.train()
        perm = torch.randperm(len(x), generator=generator)
        shifts = random_translations(len(x), cfg.shift, generator=generator).to(device)  # = one draw per step, in order
        sums = torch.zeros(steps_per_epoch, device=device)  # Σ loss over each step's samples (this rank's)
        data = accel.epoch_batches(x, y, perm, cfg.batch_size, device, acc.speed.workers)
        for j, (b, (xb, yb)) in enumerate(zip(batches, data)):
            xb = shift_by(xb, shifts[b][dist.shard(b.stop - b.start)])
            with acc.autocast():
                logits = net(acc.inputs(xb))
            loss = F.cross_entropy(logits.float(), yb, label_smoothing=cfg.label_smoothing)
            opt.zero_grad(set_to_none=True)
            (loss * dist.scale(len(yb), b.stop - b.start) if dist.active() else loss).backward()
            opt.step()
            sched.step()
            sums[j] = loss.detach() * len(yb)
        dist.all_reduce_sum(sums)  # the global batches' sums
        check_finite_steps(desc, epoch * steps_per_epoch, cross_entropy=sums / sizes)
        val_acc = accuracy(predict(model, xv), yv)
        m = {"train_loss": (sums.sum() / len(x)).item(), "val_acc": val_acc, "lr": sched.get_last_lr()[0]}
        tracker.log_metrics(m, step=epoch)
        bar.set_postfix(loss=f"{m['train_loss']:.3f}", val=f"{val_acc:.3f}")
        if resume and resume.writer:  # each node's local rank 0 (nodes need not share a disk: kdpipe/resume.py)
            resume.save(epoch + 1, cfg.epochs, {"model": model.state_dict(), "optimizer": opt.state_dict(),
                                                "scheduler": sched.state_dict()}, generator)
    dist.unwrap(model)
    if resume and not dist.is_main():  # rank 0 removes its checkpoint once the stage wrote its outputs
        resume.finish()  # ... a node that writes none, its copy now
    check_weights(desc, model)
    return {"val_acc": val_acc, "train_loss": m["train_loss"], "epochs": cfg.epochs}


def supervised_setup(cfg, arch: str):
    """The start of a supervised stage (train-teacher, baseline): the seeded generator, the stage's speed knobs
    (kdpipe.accel.Accel on the device: cuda:<LOCAL_RANK> under torchrun), the model spec, a fresh ``arch`` on the
    device, and the (x, y) train and val splits, on the GPU when they fit there, else on the host."""
    from kdpipe import accel, data, dist
    from kdpipe.models import build_model, make_spec
    from kdpipe.utils import pick_device, seed_everything

    g = seed_everything(cfg.seed)
    acc = accel.Accel(cfg.speed, dist.device_for(pick_device(cfg.device)))
    meta = data.load_meta()
    spec = make_spec(arch, meta)
    model = build_model(spec).to(acc.device)
    where = acc.split_device(meta)
    return g, acc, spec, model, data.load_split("train", where), data.load_split("val", where)
