"""Stage distill: train the student from the teacher(s) -> data/student/.

Per batch (kdpipe.losses.distill_loss):
    L = Σ_i w_i·φ_i·[α·T²·KL(p_i ‖ softmax(s_i/T)) + γ·CE(s_i, y_i)] / B  +  β·L_hint
  p_i: the teacher's softmax(t_i/T), or the ensemble's weighted mean of tempered probabilities
       (``teachers``, kdpipe/teachers.py); y_i: the real label where the sample has one, else the
       teacher's argmax; T, α: ``distill.temperature_schedule`` / ``alpha_schedule`` per step
       (kdpipe/schedules.py); γ = ``ce_weight`` (unset: 1 − α); β = ``feature_weight``, L_hint the
       hint loss of ``distill.hints`` through learned adapters (kdpipe/feature_kd.py);
  w_i: prioritized-replay importance weights, φ_i SSD-KD's modulating function (1 when off).
Data (``distill.data``, kdpipe/routes.py): the synthetic set (default: data-free, never the real
data), the real train split, or mixed batches. With ``augment`` the images are randomly shifted, with
``flip`` half of them mirrored left-right (natural images, not digits), and the frozen teacher(s) label
them again; so they do, on each batch, when hints are used. With
``mixup`` = a the KD phase's global batch is mixed first, x_i ← λ_i·x_i + (1 − λ_i)·x_π(i), λ_i ~ Beta(a, a),
π a random permutation, and the teacher labels the mixed images (function matching, Beyer et al. 2022:
the student matches the teacher between the samples too; hard labels become the teacher's argmax).
Then ``finetune_epochs`` on hard labels alone (CE; real labels when the route uses real data,
else the teacher's argmax on the synthetic set), SGD at ``finetune_lr`` with cosine decay.
The student starts from synthesize's proxy student (``init: synthesis``, on the routes that read the
synthetic set) or from scratch; with ``init: scratch`` the other defaults give the student of the plain
Hinton-KD stage (bit for bit on one CPU; tests/test_routes.py pins golden values). With ``ema`` = d
the student written is the exponential moving average θ_ema ← d·θ_ema + (1 − d)·θ over every step
(torch.optim.swa_utils.AveragedModel, BN buffers averaged too).

Under ``torchrun`` the stage is data-parallel (kdpipe/dist.py): every rank draws the same global
batch (same generator), augments it with the same translations, takes its shard and scales the
shard's loss so that DDP's gradient average is the global batch's mean; φ and the replay priorities
are computed over the whole global batch (shards gathered), so N processes train like 1. Speed
knobs (kdpipe/accel.py): bf16 autocast of the forwards on CUDA (loss math in fp32), channels_last,
fused SGD. No host sync per step: the per-step loss terms stay on the device and are checked for
NaN/inf once per epoch (with ``priority``, whose sampler reads the priorities on the host anyway,
after every step).
"""
from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from tqdm.auto import tqdm

from kdpipe import accel, dist, paths
from kdpipe.config import Config, PhiCfg
from kdpipe.errors import DataError
from kdpipe.feature_kd import FeatureKD
from kdpipe.losses import distill_loss, kd_per_sample
from kdpipe.models import build_model
from kdpipe.resume import Resume
from kdpipe.routes import Batch, Batches, batch_sizes, real_pool, synthetic_pool
from kdpipe.schedules import value
from kdpipe.synth.phi import phi_weights
from kdpipe.synth.replay import anneal_beta
from kdpipe.teachers import Ensemble, first_member, guide_logits, hard_labels, load_teachers, target_logits, teacher_logits
from kdpipe.teachers import teacher_digest, teacher_files
from kdpipe.train import check_finite_steps, check_weights, predict, random_translations, shift_by
from kdpipe.utils import atomic_path, load_torch, pick_device, save_json, save_torch, seed_everything, sha256_file

ROUTE = {"synthetic": "data-free", "real": "kd-real", "mixed": "kd-mixed"}  # the kdpipe.route tag
TERMS = ("total", "kd", "ce", "feature")  # the loss terms kept per step and named when one is NaN/inf


def log_route(cfg: Config, tracker, pools, meta, digests) -> None:
    """Params, the route's tags and its data inputs (the real train split only on real|mixed)."""
    d = cfg.distill
    tracker.log_params({"distill": d.model_dump(mode="json"), "student.arch": cfg.student.arch,
                        **({"synthetic.sha256": meta["sha256"], "synthetic.n": meta["n"]} if meta else {}),
                        **({"teachers": [t.model_dump(mode="json") for t in cfg.teachers]} if cfg.teachers else {}),
                        **{f"{p.kind}.n_per_batch": p.batch for p in pools if d.data == "mixed"}})
    tracker.set_tags({**({"synthetic.sha256": meta["sha256"]} if meta else {}), "kdpipe.route": ROUTE[d.data],
                      "teacher.sha256": teacher_digest(cfg),
                      **({"teachers.sha256": ",".join(digests)} if cfg.teachers else {})})
    for p in pools:
        tracker.log_data_input(*(("synthetic", paths.SYNTHETIC) if p.kind == "synthetic" else ("real-train", paths.PREPARED)),
                               p.kind)


def write_outputs(student, spec, history, agree_key, tracker) -> None:
    check_weights("distill", student)
    save_torch(student.state_dict(), paths.STUDENT / "model.pt")
    save_json(spec, paths.STUDENT / "spec.json")
    tracker.set_tags({"student.sha256": sha256_file(paths.STUDENT / "model.pt")})
    with atomic_path(paths.STUDENT / "history.csv") as tmp:
        tmp.write_text(f"epoch,phase,loss,{agree_key},temperature,alpha\n" + "".join(
            f"{h['epoch']},{h['phase']},{h['loss']:.6f},{h[agree_key]:.6f},{h['temperature']:.6f},{h['alpha']:.6f}\n"
            for h in history))


def epoch_shifts(data: Batches, g: torch.Generator, device, max_frac: float) -> list[torch.Tensor]:
    """The random translations of an epoch's global batches, drawn at once (the same numbers as one
    draw per step, in order) and copied to the device once, not per step."""
    sizes = data.step_sizes()
    return list(random_translations(sum(sizes), max_frac, generator=g).to(device).split(sizes))


def mix(x: torch.Tensor, a: float, g: torch.Generator) -> torch.Tensor:
    """Mixup of a batch with itself: λ_i·x_i + (1 − λ_i)·x_π(i), λ_i ~ Beta(a, a), π and λ drawn from ``g``
    (so every rank mixes the global batch alike)."""
    perm = torch.randperm(len(x), generator=g)
    with torch.random.fork_rng(devices=[]):  # Beta draws from the global stream: seed it from g
        torch.manual_seed(int(torch.randint(2**62, (1,), generator=g)))
        lam = torch.distributions.Beta(a, a).sample((len(x),))
    lam = lam.to(x.device, x.dtype).view(-1, *([1] * (x.dim() - 1)))
    return lam * x + (1 - lam) * x[perm.to(x.device)]


def flips(n: int, g: torch.Generator) -> torch.Tensor:
    """Which rows of a global batch of n are mirrored left-right: each with probability ½, drawn from ``g``
    (so every rank flips the global batch alike)."""
    return torch.rand(n, generator=g) < 0.5


def flip_rows(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    """x_i ← x_i[..., ::-1] (the width reversed) where f_i."""
    return torch.where(f.to(x.device).view(-1, *([1] * (x.dim() - 1))), x.flip(-1), x)


def check_steps(rows: torch.Tensor, first_step: int, epoch: int) -> None:
    """Stop on a NaN/inf loss term: ``rows`` holds each step's TERMS (this rank's share of the global
    batch's mean; summed over ranks here, so a bad shard stops every rank). One host sync."""
    dist.all_reduce_mean(rows)
    check_finite_steps(f"distill (epoch {epoch})", first_step, **dict(zip(TERMS, rows.unbind(1))))


def proxy_start(student: nn.Module, arch: str, meta: dict) -> None:
    """``distill.init: synthesis``: start from the proxy student the synthesize stage trained alongside its
    generator on the evolving buffer (Fast-DFKD's student; data/synthetic/student.pt, synthetic data only)."""
    path = paths.SYNTHETIC / "student.pt"
    if not path.exists() or meta.get("student_arch") != arch:
        raise DataError(f"distill.init=synthesis: '{path}' is missing or was trained for student.arch "
                        f"'{meta.get('student_arch')}', not '{arch}': re-run the synthesize stage "
                        "(or set distill.init=scratch)")
    student.load_state_dict(load_torch(path))


@dataclasses.dataclass(frozen=True, eq=False)
class Targets:
    """What one batch's loss compares the student with, on this rank's rows: the teacher's K×B×C logits
    ``t``, the soft-target logits ``z`` (softmax(z/T) = p), the hard labels ``labels`` of the CE term (None:
    argmax z, with one teacher and no real labels) and the per-sample weights ``w`` (importance weights × φ;
    1.0 when both are off, and in the fine-tune phase)."""

    t: torch.Tensor
    z: torch.Tensor
    labels: torch.Tensor | None
    w: torch.Tensor | float

    @property
    def hard(self) -> torch.Tensor:
        """The hard labels in every case: ``labels``, else argmax z (the teacher's argmax, = hard_labels(y, t))."""
        return self.z.argmax(1) if self.labels is None else self.labels


@dataclasses.dataclass(frozen=True, eq=False)
class Guide:
    """The frozen teacher(s) of a distill run and how they label a batch (``targets``)."""

    teacher: nn.Module
    weights: torch.Tensor | None  # w_k of an ensemble; None: one teacher
    acc: accel.Accel
    live: bool  # the teacher runs on each batch (augment, mixup, hints); else the pools' stored logits
    phi: PhiCfg | None  # SSD-KD's φ (distill.phi), normalised over the global batch; None: off
    class_freq: torch.Tensor  # φ's p̄: the teacher's mean probabilities (T = 1) over the first pool

    def targets(self, b: Batch, sh: slice, xb: torch.Tensor, y: torch.Tensor | None, T: float,
                weigh: bool = True) -> Targets:
        """The targets of rows ``sh`` (this rank's) of the global batch ``b``, whose images (mixed, shifted)
        are ``xb`` and real labels ``y`` (None: none); at temperature ``T``; the weights ``w`` when ``weigh``."""
        t = b.t[:, sh]
        if self.live:
            with self.acc.autocast(), torch.no_grad():
                t = teacher_logits(self.teacher, self.acc.inputs(xb)).float()  # K×B×C (+ hint outputs)
        z = target_logits(t, T, self.weights)  # softmax(z/T) = the soft target p
        labels = hard_labels(y, t, self.weights) if y is not None or len(t) > 1 else None  # None: argmax of z
        w = 1.0
        if weigh:
            w = b.iw[sh] if torch.is_tensor(b.iw) else b.iw
            if self.phi is not None:  # φ normalises over the global batch: the teacher's logits of all shards
                t_all = dist.gather_shards(t, sh, len(b.x), dim=1) if self.live else b.t
                w = w * phi_weights(guide_logits(t_all, self.weights), self.phi.gamma, self.phi.clip,
                                    self.class_freq)[sh]
        return Targets(t, z, labels, w)


def run(cfg: Config, tracker) -> dict:
    d, rp = cfg.distill, cfg.replay
    g = seed_everything(cfg.seed)
    device = dist.device_for(pick_device(cfg.device))  # cuda:<LOCAL_RANK> under torchrun
    with torch.random.fork_rng(devices=[]):  # building the teacher(s) draws no numbers from the student's stream
        teacher, tspec, digests = load_teachers(cfg, device)
    tw = teacher.weights if isinstance(teacher, Ensemble) else None  # w_k of the ensemble
    n_syn, n_real = batch_sizes(d.data, d.batch_size, d.real_fraction)
    pools, meta = [], None
    if n_syn:
        pool, meta = synthetic_pool(teacher, bool(cfg.teachers), n_syn, device)
        pools.append(pool)
    if n_real:
        pools.append(real_pool(teacher, n_real, device))
    spec = {**{k: v for k, v in tspec.items() if k != "arch"}, "arch": cfg.student.arch, "route": ROUTE[d.data]}
    student = build_model(spec).to(device)
    if d.init == "synthesis" and n_syn:
        proxy_start(student, cfg.student.arch, meta)
    speed = cfg.speed
    if speed.compile and d.feature_weight > 0:  # a compiled graph would not run the hint hooks on later calls
        print("[kdpipe] distill: speed.compile is ignored with hints (distill.feature_weight > 0)", flush=True)
        speed = speed.model_copy(update={"compile": False})
    acc = accel.Accel(speed, device)
    net = acc.train_module(student)  # channels_last; DDP under torchrun; compiled if asked
    acc.frozen_module(teacher)
    ema = AveragedModel(student, multi_avg_fn=get_ema_multi_avg_fn(d.ema), use_buffers=True) if d.ema else None
    log_route(cfg, tracker, pools, meta, digests)
    # hooks after the wrap: on the modules that run (BatchNorm swapped for its global-batch version)
    hints = FeatureKD(first_member(teacher), student, d.hints, d.feature_loss,
                      example=pools[0].x[: d.batch_size]) if d.feature_weight > 0 else None
    live = d.augment or d.flip or d.mixup > 0 or hints is not None  # the teacher runs on each batch
    guide = Guide(teacher, tw, acc, live, cfg.phi if d.phi else None,
                  class_freq=torch.softmax(guide_logits(pools[0].t, tw), 1).mean(0))
    adapters0 = [p.detach().clone() for p in hints.parameters()] if hints else []
    params = (nn.ModuleList([student, hints]) if hints else student).parameters()
    opt = acc.sgd(params, d.lr, d.momentum, d.weight_decay, d.nesterov)
    batches = Batches(pools, d.priority, rp.alpha, rp.iw_norm)
    total = d.epochs * batches.steps
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=d.lr, total_steps=total, pct_start=d.pct_start)
    # fine-tune phase: hard labels on the real pool when there is one, else on the synthetic set
    ft_batches = Batches([dataclasses.replace(pools[-1], batch=d.batch_size)])
    ft_opt = acc.sgd(student.parameters(), d.finetune_lr, d.momentum, d.weight_decay, d.nesterov)
    ft_sched = torch.optim.lr_scheduler.CosineAnnealingLR(ft_opt, max(d.finetune_epochs * ft_batches.steps, 1))
    agree_key, agree_labels = f"{pools[0].kind}_agreement", hard_labels(None, pools[0].t, tw)
    history, step = [], 0
    # what a resume checkpoint carries (with the pools' priorities, the history and the step)
    stateful = {"student": student, "optimizer": opt, "scheduler": sched, "ft_optimizer": ft_opt,
                "ft_scheduler": ft_sched}
    if hints:
        stateful["hints"] = hints
    if ema:
        stateful["ema"] = ema
    inputs = [paths.SYNTHETIC] * bool(n_syn) + [paths.PREPARED] * bool(n_real) + teacher_files(cfg)
    resume = Resume(cfg, "distill", [*inputs, *[t.checkpoint for t in cfg.teachers if t.checkpoint]])  # + its code
    state = resume.load(tracker, g)
    if state:
        for k, obj in stateful.items():
            obj.load_state_dict(state[k])
        for p, pr in zip(pools, state["priority"]):
            p.priority.copy_(pr)
        history, step = state["history"], state["step"]
    epochs = d.epochs + d.finetune_epochs
    bar = tqdm(range(state["done"] if state else 0, epochs), desc="distill", leave=False, disable=None)
    for epoch in bar:
        finetune = epoch >= d.epochs
        data, o, sc = (ft_batches, ft_opt, ft_sched) if finetune else (batches, opt, sched)
        per_step_check = d.priority and not finetune  # the sampler syncs each step anyway
        net.train()
        data.new_epoch(g)
        shifts = epoch_shifts(data, g, device, d.augment_shift) if d.augment and not data.priority else None
        run_loss, feat_loss = torch.zeros((), device=device), torch.zeros((), device=device)
        rows, first = torch.zeros(data.steps, len(TERMS), device=device), step  # per step: TERMS (this rank's share)
        for i in range(data.steps):
            b = data.get(i, anneal_beta(rp.beta0, step, total), g)  # the global batch, the same on every rank
            n, sh = len(b.x), dist.shard(len(b.x))  # ... and this rank's rows of it
            xb, y = b.x[sh], b.y[sh] if b.y is not None else None
            if d.mixup and not finetune:  # mixed pairs of the global batch; the teacher labels them below
                xb, y = mix(b.x, d.mixup, g)[sh], None
            if d.augment:  # the global batch's translations, this rank's rows
                xb = shift_by(xb, (shifts[i] if shifts else random_translations(n, d.augment_shift, generator=g))[sh])
            if d.flip:  # the global batch's mirror draws, this rank's rows
                xb = flip_rows(xb, flips(n, g)[sh])
            T = value(d.temperature_schedule, step, total, d.temperature)
            alpha = value(d.alpha_schedule, step, total, d.alpha)
            tg = guide.targets(b, sh, xb, y, T, weigh=not finetune)
            with acc.autocast():
                sl = net(acc.inputs(xb)).float()
                feat = hints().float() if hints and not finetune else None
            kd = kd_per_sample(sl.detach(), tg.z, T)  # the KD term per sample (and the replay priority)
            if finetune:  # hard labels only
                loss = F.cross_entropy(sl, tg.hard)
            else:
                loss = distill_loss(sl, tg.z, T, alpha, tg.w, gamma=d.ce_weight, labels=tg.labels, feature=feat,
                                    beta=d.feature_weight)
            k = dist.scale(len(xb), n)  # = 1 with one process
            o.zero_grad(set_to_none=True)
            (loss * k if dist.active() else loss).backward()
            if hints and not finetune:
                dist.average_grads(hints.parameters())  # the adapters live outside the DDP module
            o.step()
            sc.step()
            if ema:
                ema.update_parameters(student)
            if d.priority and not finetune:
                batches.update_priority(b, dist.gather_shards(kd, sh, n))
            with torch.no_grad():  # KD (weight α), CE (γ), hints (β): named if NaN/inf
                ce = F.cross_entropy(sl, tg.hard)
                rows[i] = torch.stack([loss, kd.mean(), ce, feat if feat is not None else torch.zeros_like(ce)]) * k
            if per_step_check:
                check_steps(rows[i : i + 1], step, epoch)
            run_loss += loss.detach() * k
            if feat is not None:
                feat_loss += feat.detach() * k
            step += 1
        if not per_step_check:
            check_steps(rows, first, epoch)
        dist.all_reduce_mean(run_loss)  # Σ_steps of the global batches' mean loss
        dist.all_reduce_mean(feat_loss)
        with torch.no_grad():
            judged = ema.module if ema else student  # the student that will be written
            agree = (predict(judged, pools[0].x).argmax(1) == agree_labels).float().mean().item()  # in chunks
        m = {"loss": (run_loss / data.steps).item(), agree_key: agree, "lr": sc.get_last_lr()[0],
             "temperature": T, "alpha": alpha}
        if hints:
            m["feature_loss"] = (feat_loss / data.steps).item()
        history.append({"epoch": epoch, "phase": "finetune" if finetune else "kd", **m})
        tracker.log_metrics(m, step=epoch)
        bar.set_postfix(loss=f"{m['loss']:.3f}", agree=f"{agree:.3f}")
        if resume.writer:  # each node's local rank 0 (nodes need not share a disk: kdpipe/resume.py)
            resume.save(epoch + 1, epochs, {**{k: obj.state_dict() for k, obj in stateful.items()},
                                            "priority": [p.priority for p in pools], "history": history,
                                            "step": step}, g)
    if ema:
        student.load_state_dict(ema.module.state_dict())
    acc.plain(dist.unwrap(student))  # plain BatchNorm, contiguous weights
    if hints:  # how far the adapters moved: ‖θ − θ₀‖ over all adapter parameters
        hints.remove()
        tracker.log_metrics({"adapter_delta": float(sum((p.detach() - p0).pow(2).sum() for p, p0 in
                                                        zip(hints.parameters(), adapters0)) ** 0.5)})
    summary = {"loss": round(history[-1]["loss"], 4), agree_key: round(history[-1][agree_key], 4)}
    if d.data != "synthetic":
        summary["route"] = ROUTE[d.data]
    if d.finetune_epochs:
        summary["finetune_epochs"] = d.finetune_epochs
    if not dist.is_main():  # under torchrun rank 0 alone writes outputs
        resume.finish()  # this node's copy of the checkpoint (rank 0's goes once the outputs are written)
        return summary
    write_outputs(student, spec, history, agree_key, tracker)
    resume.finish()
    return summary
