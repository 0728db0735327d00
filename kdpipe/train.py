"""Supervised training and prediction shared by train-teacher and baseline."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from kdpipe.config import TrainCfg


def random_shift(x: torch.Tensor, max_frac: float = 0.125, generator=None) -> torch.Tensor:
    """Per-sample random translation by up to ``max_frac`` of the side (zero fill): the
    pad-and-crop augmentation, batched on the device."""
    n = x.shape[0]
    t = (torch.rand(n, 2, generator=generator) * 2 - 1).to(x.device) * (2 * max_frac)
    h = x.shape[-1]
    t = torch.round(t * h / 2) * 2 / h  # whole pixels
    theta = torch.zeros(n, 2, 3, device=x.device)
    theta[:, 0, 0] = theta[:, 1, 1] = 1
    theta[:, :, 2] = t
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="nearest", padding_mode="zeros", align_corners=False)


@torch.no_grad()
def predict(model: nn.Module, x: torch.Tensor, batch_size: int = 1024) -> torch.Tensor:
    model.eval()
    return torch.cat([model(x[i : i + batch_size]) for i in range(0, len(x), batch_size)])


def accuracy(logits: torch.Tensor, y: torch.Tensor) -> float:
    return (logits.argmax(1) == y).float().mean().item()


def sgd(model: nn.Module, lr: float, momentum: float, weight_decay: float) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=momentum > 0)


def check_finite(stage: str, step: int, **terms) -> None:
    """Stop the stage (FloatingPointError) naming the step and each non-finite loss term."""
    terms = {k: torch.as_tensor(v).detach() for k, v in terms.items()}
    bad = {k: float(v) for k, v in terms.items() if not torch.isfinite(v).all()}
    if bad:
        raise FloatingPointError(f"{stage}: non-finite loss at step {step}: "
                                 + ", ".join(f"{k}={v}" for k, v in bad.items()) + "; no output written")


def check_weights(stage: str, model: nn.Module) -> None:
    """Stop the stage if a parameter or buffer holds NaN/inf (before its outputs are written)."""
    for name, t in model.state_dict().items():
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise FloatingPointError(f"{stage}: non-finite weights in '{name}'; no output written")


def fit_supervised(model: nn.Module, x, y, xv, yv, cfg: TrainCfg, tracker, desc: str, generator=None,
                   resume=None) -> dict:
    """SGD + one-cycle schedule over ``cfg.epochs`` with random-shift augmentation; logs per epoch.
    ``resume`` (kdpipe.resume.Resume): continue from its checkpoint, save one every resume.every epochs."""
    opt = sgd(model, cfg.lr, cfg.momentum, cfg.weight_decay)
    steps_per_epoch = (len(x) + cfg.batch_size - 1) // cfg.batch_size
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=cfg.epochs * steps_per_epoch, pct_start=0.15)
    state = resume.load(tracker, generator) if resume else None
    if state:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
    bar = tqdm(range(state["done"] if state else 0, cfg.epochs), desc=desc, leave=False, disable=None)
    for epoch in bar:
        model.train()
        perm = torch.randperm(len(x), generator=generator).to(x.device)
        total = torch.zeros((), device=x.device)
        for i in range(0, len(x), cfg.batch_size):
            idx = perm[i : i + cfg.batch_size]
            logits = model(random_shift(x[idx], generator=generator))
            loss = F.cross_entropy(logits, y[idx], label_smoothing=cfg.label_smoothing)
            check_finite(desc, epoch * steps_per_epoch + i // cfg.batch_size, cross_entropy=loss)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += loss.detach() * len(idx)
        val_acc = accuracy(predict(model, xv), yv)
        m = {"train_loss": (total / len(x)).item(), "val_acc": val_acc, "lr": sched.get_last_lr()[0]}
        tracker.log_metrics(m, step=epoch)
        bar.set_postfix(loss=f"{m['train_loss']:.3f}", val=f"{val_acc:.3f}")
        if resume:
            resume.save(epoch + 1, cfg.epochs, {"model": model.state_dict(), "optimizer": opt.state_dict(),
                                                "scheduler": sched.state_dict()}, generator)
    check_weights(desc, model)
    return {"val_acc": val_acc, "train_loss": m["train_loss"], "epochs": cfg.epochs}
