"""Stage synthesize (data-free): a generator trained against the frozen teacher fills a small
synthetic set. Reads data/teacher/ only — never the real data — and writes data/synthetic/.

With ``teachers`` (an ensemble) the guide is the ensemble's log mean probability (kdpipe/teachers.py):
CE, adversarial term and the stored logits read the weighted average of the teachers' probabilities,
and the BN prior sums over every member's BatchNorm layers.

Each round (Fast-Datafree's rhythm, with SSD-KD's balancing and replay):
  1. g_steps generator steps on fresh latent codes, warm-started from the last round:
       L_G = Σ_i [φ_i·(w_adv·ℓ_adv + w_act·ℓ_act) + φ_i^{phi_ce}·w_ce·ℓ_ce]/N + w_bn·L_BN + w_ie·L_ie
           + Σ_i (w_tv·ℓ_tv + w_l2·ℓ_l2)/N   (the image prior: what stands in for L_BN when the teacher has no BN)
     (optionally a Reptile meta update: θ ← θ + η(θ_fast − θ));
  2. the round's samples enter the buffer (partial update; balanced eviction), and, with ``keep: reservoir``,
     a uniform reservoir over all rounds (what is then written instead of the final buffer);
  3. kd_steps of a proxy student drawn from the buffer by prioritized replay, refreshing priorities;
     the proxy student is what the adversarial term plays against, and what distill starts from
     (data/synthetic/student.pt, ``distill.init``: Fast-DFKD's student, trained on every round's samples).
No host sync per step: the loss terms of a round's steps stay on the device and are checked once per round
(with ``priority`` the sampler reads the refreshed priorities on the host at each KD step anyway).
Speed knobs (kdpipe/accel.py): bf16 autocast of the generator, teacher and proxy-student forwards on
CUDA (losses and the BN prior in fp32; the images and logits that enter the buffer are computed in
fp32), channels_last, fused Adam/SGD. One process: under torchrun rank 0 alone runs it.
"""
from __future__ import annotations

import copy
import csv
import json
import math
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from kdpipe import accel, paths
from kdpipe.config import Config
from kdpipe.losses import distill_loss, kd_per_sample
from kdpipe.models import build_model, penultimate
from kdpipe.synth.bn_hooks import BNPrior
from kdpipe.synth.generator import Generator
from kdpipe.synth.losses import act_term, adv_term, ce_term, ie_term, l2_term, tv_term
from kdpipe.synth.phi import phi_weights
from kdpipe.synth.replay import ReplayBuffer, Reservoir, anneal_beta
from kdpipe.teachers import load_teachers, teacher_digest, teacher_files
from kdpipe.resume import Resume
from kdpipe.train import check_finite_steps, check_weights, random_translations, shift_by
from kdpipe.utils import atomic_path, dvc_md5, sha256_file
from kdpipe.utils import pick_device, save_json, save_torch, seed_everything, sha256_tensors


def class_entropy(hist: torch.Tensor) -> float:
    """Entropy (nats) of a class histogram; log(C) when perfectly balanced."""
    p = hist.float() / hist.sum().clamp_min(1)
    return float(-(p[p > 0] * p[p > 0].log()).sum())


def sample_grid(x: torch.Tensor, labels: torch.Tensor, classes: list[str], path, per_class: int = 8,
                max_classes: int = 32) -> None:
    """A PNG with one row per class (the first ``max_classes``): its name, then up to ``per_class`` samples
    the teacher assigns to it, from uint8 images ``x`` (N×C×H×W); small images enlarged to ~32 px (nearest).
    PIL alone: matplotlib would add seconds to the stage for 80 image axes."""
    from PIL import Image, ImageDraw

    classes = classes[:max_classes]
    h, w = x.shape[-2:]
    k, pad, label_w = max(1, 32 // max(h, w)), 2, 8 * max(len(str(c)) for c in classes) + 4
    cell_h, cell_w = h * k + pad, w * k + pad
    canvas = Image.new("RGB", (label_w + per_class * cell_w + pad, len(classes) * cell_h + pad), "white")
    draw = ImageDraw.Draw(canvas)
    for c, name in enumerate(classes):
        y0 = pad + c * cell_h
        draw.text((2, y0 + max(0, (h * k - 10) // 2)), str(name), fill="black")
        for j, i in enumerate((labels == c).nonzero().flatten()[:per_class].tolist()):
            img = Image.fromarray(x[i].permute(1, 2, 0).squeeze(-1).cpu().numpy()).convert("RGB")
            canvas.paste(img.resize((w * k, h * k), Image.NEAREST), (label_w + j * cell_w + pad, y0))
    with atomic_path(path) as tmp:
        canvas.save(tmp, format="PNG")


def owner_stats(path: str, teacher_sha256: str) -> dict:
    """The data owner's activation statistics (``synthesize.stats``, kdpipe activation-stats), checked to be of
    this teacher: {module name: {"mean", "var"}}."""
    from kdpipe.config import ConfigError
    from kdpipe.utils import load_torch

    if not Path(path).is_file():
        raise ConfigError(f"synthesize.stats '{path}' does not exist")
    st = load_torch(path)
    if not isinstance(st, dict) or st.get("teacher_sha256") != teacher_sha256:
        raise ConfigError(f"synthesize.stats '{path}' was not made for this teacher (sha256 {teacher_sha256[:12]}): "
                          "make it with 'kdpipe activation-stats' on the teacher's own file")
    return st["layers"]


def run(cfg: Config, tracker) -> dict:
    s, speed = cfg.synthesize, cfg.speed
    g = seed_everything(cfg.seed)
    device = pick_device(cfg.device)
    accel.setup(speed, device)
    teacher, tspec, teacher_digests = load_teachers(cfg, device)  # one teacher, or the ensemble as the guide
    C, ch, size = tspec["num_classes"], tspec["in_channels"], tspec["image_size"]
    student = build_model({**tspec, "arch": cfg.student.arch}).to(device)
    gen = Generator(s.nz, size, ch, s.ngf).to(device)
    for m in (teacher, student, gen):
        accel.frozen_module(m, speed, device)  # the memory format (channels_last on CUDA), in place
    opt_g = accel.adam(gen.parameters(), s.lr_g, (0.5, 0.999), speed, device)
    opt_s = accel.sgd(student.parameters(), s.kd_lr, 0.9, 5e-4, speed, device)
    stats = owner_stats(s.stats, teacher_digest(cfg)) if s.stats else None
    bn = BNPrior(teacher, s.bn_momentum, stats)
    if stats:
        tracker.set_tags({"synthesize.stats.sha256": sha256_file(s.stats)})
    elif not bn.hooks:  # said once: the BN-statistics prior, the term that matters most with BN, is not there
        print(f"[kdpipe] synthesize: the teacher has no BatchNorm layers (folded by its exporter?): no BN-statistics "
              f"prior (synthesize.w_bn has no effect); synthesis relies on CE, adversarial, DAFL (w_act {s.w_act}, "
              f"w_ie {s.w_ie}) and the image prior (w_tv {s.w_tv}, w_l2 {s.w_l2})", flush=True)
    tracker.set_tags({"kdpipe.bn_prior": f"the data owner's statistics of {len(bn.hooks)} convolutions" if stats else
                      f"{len(bn.hooks)} BatchNorm layers" if bn.hooks else "absent (no BatchNorm)"})
    if cfg.teacher.source:  # a teacher from its card: what it is, with the hash of its file
        tracker.set_tags({"teacher.source": cfg.teacher.source, "teacher.card": json.dumps(tspec["card"])})
    feats = {}
    if s.w_act > 0:
        penultimate(teacher).register_forward_hook(lambda m, i, o: feats.__setitem__("f", i[0]))
    buf = ReplayBuffer(s.capacity, (ch, size, size), C, device, s.eviction)
    kept = Reservoir(s.capacity, (ch, size, size), C, seed=cfg.seed) if s.keep == "reservoir" else None
    tracker.log_params({"synthesize": s.model_dump(mode="json"), "student.arch": cfg.student.arch,
                        "teacher.arch": tspec["arch"]})
    if cfg.teachers:
        tracker.log_params({"teachers": [t.model_dump(mode="json") for t in cfg.teachers]})
        tracker.set_tags({"teachers.sha256": ",".join(teacher_digests)})
    kd_total, kd_step = s.rounds * s.kd_steps, 0
    t0, t_gen = time.perf_counter(), 0.0
    code = [__file__, *sorted(Path(__file__).parents[1].joinpath("synth").glob("*.py"))]
    members = [t.checkpoint for t in cfg.teachers if t.checkpoint]
    resume = Resume(cfg, "synthesize", [*teacher_files(cfg), *members, *([s.stats] if s.stats else []), *code],
                    unit="round")
    state = resume.load(tracker, g)
    if state:  # everything that carries over from one round to the next
        for obj, k in ((gen, "gen"), (opt_g, "opt_g"), (student, "student"), (opt_s, "opt_s"), (buf, "buffer")):
            obj.load_state_dict(state[k])
        if kept:
            kept.load_state_dict(state["kept"])
        for h, (mp, vp) in zip(bn.hooks, state["bn_prev"]):
            h.mean_prev, h.var_prev = (None, None) if mp is None else (mp.to(device), vp.to(device))
        kd_step, t_gen = state["kd_step"], state["t_gen"]
    bar = tqdm(range(state["done"] if state else 0, s.rounds), desc="synthesize", leave=False, disable=None)
    for r in bar:
        tg = time.perf_counter()
        # 1. generator steps (targets: uniform, or inversely to the buffer's class histogram)
        if s.balanced_targets and buf.size:
            w_t = 1.0 / (buf.histogram().float().cpu() + 1.0)
            targets = torch.multinomial(w_t / w_t.sum(), s.batch_size, replacement=True, generator=g)
        else:
            targets = torch.randint(C, (s.batch_size,), generator=g)
        targets = targets.to(device)
        z = torch.randn(s.batch_size, s.nz, generator=g).to(device).requires_grad_(s.lr_z > 0)
        fast = copy.deepcopy(gen) if s.meta else gen
        opt = accel.adam(fast.parameters(), s.lr_g, (0.5, 0.999), speed, device) if s.meta else opt_g
        opt_z = accel.adam([z], s.lr_z, (0.5, 0.999), speed, device) if s.lr_z > 0 else None
        student.eval().requires_grad_(False)  # the adversarial term needs grads through it, not of its weights
        use_adv = s.w_adv > 0 and r >= s.warmup_rounds
        terms = []  # per step: the loss terms, kept on the device and checked once per round (no host sync per step)
        for j in range(s.g_steps):
            with accel.autocast(speed, device):
                x = accel.inputs(fast(z), speed, device)
                if s.jitter:  # DeepInversion's random jitter: the image must hold under small shifts
                    x = shift_by(x, random_translations(len(x), s.jitter, generator=g))
                t_logits = teacher(x).float()
                s_logits = student(x).float() if use_adv else None
            w = phi_weights(t_logits, s.phi_gamma, s.phi_clip, buf.class_freq()) if s.phi else torch.ones(len(x), device=device)
            ce = s.w_ce * ce_term(t_logits, targets)
            per = torch.zeros_like(ce)
            if use_adv:
                per = per + s.w_adv * adv_term(s_logits, t_logits)
            if s.w_act > 0:
                per = per + s.w_act * act_term(feats["f"].float())
            l_ce, l_per = ((w if s.phi_ce else 1.0) * ce).mean(), (w * per).mean()
            l_bn, l_ie = s.w_bn * bn.loss(), s.w_ie * ie_term(t_logits)
            l_img = (s.w_tv * tv_term(x.float()) + s.w_l2 * l2_term(x.float())).mean() if s.w_tv or s.w_l2 \
                else torch.zeros_like(l_ie)  # the image prior (DeepInversion)
            loss_g = l_per + l_ce + l_bn + l_ie + l_img
            terms.append(torch.stack([loss_g, l_ce, l_per, l_bn, l_ie, l_img]).detach())
            opt.zero_grad(set_to_none=True)
            if opt_z:
                opt_z.zero_grad(set_to_none=True)
            loss_g.backward()
            opt.step()
            if opt_z:
                opt_z.step()
        check_finite_steps(f"synthesize (generator, round {r})", r * s.g_steps,
                           **dict(zip(("total", "ce", "adv_act", "bn", "ie", "image"), torch.stack(terms).unbind(1))))
        if s.meta:  # Reptile: θ ← θ + η (θ_fast − θ)
            with torch.no_grad():
                for p, q in zip(gen.parameters(), fast.parameters()):
                    p.add_(q - p, alpha=s.meta_lr)
                for b, bq in zip(gen.buffers(), fast.buffers()):
                    b.copy_(bq)
        # 2. partial buffer update, with teacher logits of exactly the stored (quantized) images
        with torch.no_grad():
            xq = ReplayBuffer.quantize(fast(z)).float() / 255.0
            t_xq = teacher(xq)
            buf.add(xq, t_xq)
            if kept:
                kept.add(xq, t_xq)
        t_gen += time.perf_counter() - tg
        # 3. proxy-student KD from the buffer by prioritized replay
        student.train().requires_grad_(True)
        n = min(s.batch_size, 4 * buf.size)
        ones = torch.ones(n, device=device)
        # uniform draws: the round's indices at once; prioritized ones read the priorities the last step refreshed
        uniform = None if s.priority else torch.randint(buf.size, (s.kd_steps, n), generator=g).to(device)
        kd_losses, kd_first = [], kd_step
        for k in range(s.kd_steps):
            beta = anneal_beta(s.beta0, kd_step, kd_total)
            idx, iw = buf.sample(n, s.alpha, beta, g, norm=s.iw_norm) if uniform is None else (uniform[k], ones)
            xb, tb = buf.images(idx), buf.logits[idx]
            with accel.autocast(speed, device):
                sl = student(accel.inputs(xb, speed, device)).float()
            phi = phi_weights(tb, s.phi_gamma, s.phi_clip, buf.class_freq()) if s.phi else 1.0
            loss = distill_loss(sl, tb, s.temperature, 1.0, iw * phi)
            kd_losses.append(loss.detach())
            opt_s.zero_grad(set_to_none=True)
            loss.backward()
            opt_s.step()
            buf.update_priority(idx, kd_per_sample(sl.detach(), tb, s.temperature))
            kd_step += 1
        if kd_losses:
            check_finite_steps(f"synthesize (proxy student, round {r})", kd_first, kd=torch.stack(kd_losses))
        hist = buf.histogram()
        m = {"loss_g": loss_g.item(), "bn": bn.loss().item(),
             "buffer": buf.size, "class_entropy": class_entropy(hist), "hist_min": int(hist.min()),
             "hist_max": int(hist.max())}
        tracker.log_metrics(m, step=r)
        bar.set_postfix(H=f"{m['class_entropy']:.3f}", n=buf.size)
        resume.save(r + 1, s.rounds, {"gen": gen.state_dict(), "opt_g": opt_g.state_dict(), "student": student.state_dict(),
                                      "opt_s": opt_s.state_dict(), "buffer": buf.state_dict(), "kd_step": kd_step,
                                      "t_gen": t_gen, "bn_prev": [(h.mean_prev, h.var_prev) for h in bn.hooks],
                                      **({"kept": kept.state_dict()} if kept else {})}, g)
    bn.remove()
    for net in (gen, student):
        accel.plain(net, speed, device)  # contiguous weights in generator.pt / student.pt
        check_weights("synthesize", net)
    wall = time.perf_counter() - t0

    # outputs: one DVC-versioned folder
    st = kept.state() if kept else buf.state()
    preds = st["logits"].argmax(1)
    hist = torch.bincount(preds, minlength=C)
    digest = sha256_tensors(st["x"], st["logits"])
    save_torch(st, paths.SYNTHETIC / "samples.pt")
    sample_grid(st["x"], preds, tspec["classes"], paths.SYNTHETIC / "grid.png")
    with atomic_path(paths.SYNTHETIC / "histogram.csv") as tmp, open(tmp, "w", newline="") as f:  # quoted: "a, b"
        csv.writer(f, lineterminator="\n").writerows([("class", "count"), *zip(tspec["classes"], hist.tolist())])
    meta = {
        "spec": {k: v for k, v in tspec.items() if k != "arch"},
        "teacher_arch": tspec["arch"],
        "n": len(st["x"]),
        "kept": s.keep,
        "histogram": hist.tolist(),
        "class_entropy": class_entropy(hist),
        "max_entropy": math.log(C),
        "teacher_confidence": float(torch.softmax(st["logits"], 1).max(1).values.mean()),
        "sha256": digest,
        "generated": int(s.rounds * s.batch_size),
        "student_arch": cfg.student.arch,
    }
    save_json(meta, paths.SYNTHETIC / "meta.json")
    save_torch(gen.state_dict(), paths.SYNTHETIC / "generator.pt")
    save_torch(student.state_dict(), paths.SYNTHETIC / "student.pt")  # the proxy: distill's start (distill.init)
    tracker.log_metrics({"n_samples": meta["n"], "final_class_entropy": meta["class_entropy"],
                         "teacher_confidence": meta["teacher_confidence"], "wall_s": wall, "generator_s": t_gen})
    # timings: MLflow and an untracked file, never the DVC output (a same-input re-run keeps its md5)
    save_json({"wall_s": round(wall, 2), "generator_s": round(t_gen, 2)}, paths.TIMINGS / "synthesize.json")
    tracker.set_tags({"synthetic.sha256": digest, "synthetic.dvc_md5": dvc_md5(paths.SYNTHETIC),
                      "teacher.sha256": teacher_digest(cfg)})
    tracker.log_artifact(paths.SYNTHETIC / "grid.png")
    tracker.log_artifact(paths.SYNTHETIC / "histogram.csv")
    resume.finish()
    return {"n": meta["n"], "entropy": round(meta["class_entropy"], 4), "hist": f"{int(hist.min())}-{int(hist.max())}",
            "wall_s": round(wall, 1)}
