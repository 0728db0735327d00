"""Stage distill: train the student on data/synthetic/ only (never the real data).

loss = Σ_i w_i·φ_i·[α·T²·KL(softmax(t_i/T) ‖ softmax(s_i/T)) + (1−α)·CE(s_i, argmax t_i)] / B
with w_i the prioritized-replay importance weights and φ_i SSD-KD's modulating function (both 1
when switched off). With ``augment`` the synthetic images are randomly shifted and the frozen
teacher re-labels them; otherwise the stored teacher logits are used as they are.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from kdpipe import paths
from kdpipe.config import Config
from kdpipe.data import DataError
from kdpipe.losses import distill_loss, kd_per_sample
from kdpipe.models import build_model
from kdpipe.stages.synthesize import load_teacher
from kdpipe.synth.phi import phi_weights
from kdpipe.synth.replay import anneal_beta, prioritized_sample
from kdpipe.resume import Resume
from kdpipe.train import check_finite, check_weights, random_shift, sgd
from kdpipe.utils import sha256_file, sha256_tensors
from kdpipe.utils import atomic_path, load_json, load_torch, pick_device, save_json, save_torch, seed_everything


def run(cfg: Config, tracker) -> dict:
    d, s = cfg.distill, cfg.synthesize
    g = seed_everything(cfg.seed)
    device = pick_device(cfg.device)
    meta = load_json(paths.SYNTHETIC / "meta.json")
    syn = load_torch(paths.SYNTHETIC / "samples.pt")
    if sha256_tensors(syn["x"], syn["logits"]) != meta["sha256"]:  # e.g. a synthesize run killed between its writes
        raise DataError(f"'{paths.SYNTHETIC / 'samples.pt'}' does not match the sha256 in "
                        f"'{paths.SYNTHETIC / 'meta.json'}': re-run the synthesize stage")
    x = syn["x"].to(device).float() / 255.0
    t_stored = syn["logits"].to(device)
    n = len(x)
    teacher = load_teacher(device)[0] if d.augment else None
    spec = {**meta["spec"], "arch": cfg.student.arch}
    student = build_model(spec).to(device)
    tracker.log_params({"distill": d.model_dump(mode="json"), "student.arch": cfg.student.arch,
                        "synthetic.sha256": meta["sha256"], "synthetic.n": n})
    tracker.set_tags({"synthetic.sha256": meta["sha256"], "teacher.sha256": sha256_file(paths.TEACHER / "model.pt")})
    tracker.log_data_input("synthetic", paths.SYNTHETIC, "synthetic")  # the only data this stage reads
    opt = sgd(student, d.lr, d.momentum, d.weight_decay)
    steps_per_epoch = (n + d.batch_size - 1) // d.batch_size
    total = d.epochs * steps_per_epoch
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=d.lr, total_steps=total, pct_start=0.15)
    priority = torch.ones(n, device=device)
    class_freq = torch.softmax(t_stored, 1).mean(0)
    history, step = [], 0
    resume = Resume(cfg, "distill", [paths.SYNTHETIC, paths.TEACHER, __file__])
    state = resume.load(tracker, g)
    if state:
        student.load_state_dict(state["student"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        priority.copy_(state["priority"])
        history, step = state["history"], state["step"]
    bar = tqdm(range(state["done"] if state else 0, d.epochs), desc="distill", leave=False, disable=None)
    for epoch in bar:
        student.train()
        perm = torch.randperm(n, generator=g).to(device)
        run_loss = torch.zeros((), device=device)
        for i in range(steps_per_epoch):
            if d.priority:
                idx, iw = prioritized_sample(priority, d.batch_size, s.alpha, anneal_beta(s.beta0, step, total), g)
            else:
                idx, iw = perm[i * d.batch_size : (i + 1) * d.batch_size], 1.0
            xb = x[idx]
            if teacher is not None:
                xb = random_shift(xb, generator=g)
                with torch.no_grad():
                    tb = teacher(xb)
            else:
                tb = t_stored[idx]
            sl = student(xb)
            w = iw * (phi_weights(tb, s.phi_gamma, s.phi_clip, class_freq) if d.phi else 1.0)
            loss = distill_loss(sl, tb, d.temperature, d.alpha, w)
            if not torch.isfinite(loss):  # name the terms: KD (weight α) and CE on the teacher's argmax (1 − α)
                check_finite(f"distill (epoch {epoch})", step, total=loss, kd=kd_per_sample(sl, tb, d.temperature).mean(),
                             ce=F.cross_entropy(sl, tb.argmax(1)))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            if d.priority:
                priority[idx] = kd_per_sample(sl.detach(), tb, d.temperature) + 1e-3
            run_loss += loss.detach()
            step += 1
        with torch.no_grad():
            student.eval()
            agree = (student(x).argmax(1) == t_stored.argmax(1)).float().mean().item()
        m = {"loss": (run_loss / steps_per_epoch).item(), "synthetic_agreement": agree, "lr": sched.get_last_lr()[0]}
        history.append({"epoch": epoch, **m})
        tracker.log_metrics(m, step=epoch)
        bar.set_postfix(loss=f"{m['loss']:.3f}", agree=f"{agree:.3f}")
        resume.save(epoch + 1, d.epochs, {"student": student.state_dict(), "optimizer": opt.state_dict(),
                                          "scheduler": sched.state_dict(), "priority": priority, "history": history,
                                          "step": step}, g)
    check_weights("distill", student)
    save_torch(student.state_dict(), paths.STUDENT / "model.pt")
    save_json(spec, paths.STUDENT / "spec.json")
    tracker.set_tags({"student.sha256": sha256_file(paths.STUDENT / "model.pt")})
    with atomic_path(paths.STUDENT / "history.csv") as tmp:
        tmp.write_text("epoch,loss,synthetic_agreement\n" + "".join(
            f"{h['epoch']},{h['loss']:.6f},{h['synthetic_agreement']:.6f}\n" for h in history))
    resume.finish()
    return {"loss": round(history[-1]["loss"], 4), "synthetic_agreement": round(history[-1]["synthetic_agreement"], 4)}
