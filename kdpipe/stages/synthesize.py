"""Stage synthesize (data-free): a generator trained against the frozen teacher fills a small
synthetic set. Reads data/teacher/ only — never the real data — and writes data/synthetic/.

With ``teachers`` (an ensemble) the guide is the ensemble's log mean probability (kdpipe/teachers.py):
CE, adversarial term and the stored logits read the weighted average of the teachers' probabilities,
and the BN prior sums over every member's BatchNorm layers.

The algorithm, one round at a time (generator steps, buffer and reservoir update, proxy-student replay),
is kdpipe/synth/synthesizer.py; this file loads the teacher, resumes, tracks and writes the outputs.
The proxy student is what distill starts from (data/synthetic/student.pt, ``distill.init``).
Speed knobs (kdpipe/accel.py): bf16 autocast of the generator, teacher and proxy-student forwards on
CUDA (losses and the BN prior in fp32; the images and logits that enter the buffer are computed in
fp32), channels_last, fused Adam/SGD. One process: under torchrun rank 0 alone runs it.
"""
from __future__ import annotations

import csv
import json
import math
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from kdpipe import accel, paths
from kdpipe.config import STANDARD_STATS, Config
from kdpipe.models import build_model
from kdpipe.resume import Resume
from kdpipe.synth.bn_hooks import standard_stats
from kdpipe.synth.synthesizer import Synthesizer, class_entropy
from kdpipe.teachers import load_teachers, teacher_digest, teacher_files
from kdpipe.train import check_weights
from kdpipe.utils import atomic_path, dvc_md5, sha256_file
from kdpipe.utils import pick_device, save_json, save_torch, seed_everything, sha256_tensors


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
    s = cfg.synthesize
    g = seed_everything(cfg.seed)
    acc = accel.Accel(cfg.speed, pick_device(cfg.device))
    acc.setup()
    teacher, tspec, teacher_digests = load_teachers(cfg, acc.device)  # one teacher, or the ensemble as the guide
    student = build_model({**tspec, "arch": cfg.student.arch}).to(acc.device)
    stats = None  # the BN prior's targets for a teacher without BN: none, N(0, 1), or the data owner's
    if s.stats == STANDARD_STATS:
        stats = standard_stats(teacher)
    elif s.stats:
        stats = owner_stats(s.stats, teacher_digest(cfg))
    synth = Synthesizer(s, acc, teacher, student, tspec, g, stats, seed=cfg.seed, replay=cfg.replay, phi=cfg.phi)
    _track_setup(cfg, tracker, tspec, teacher_digests, synth)

    # the rounds, resumable: the synthesizer's state is saved every resume.every rounds
    members = [t.checkpoint for t in cfg.teachers if t.checkpoint]
    resume = Resume(cfg, "synthesize", [*teacher_files(cfg), *members, *([s.stats_file] if s.stats_file else [])],
                    unit="round")  # + the code it runs (kdpipe/resume.py: dvc.yaml's deps, kdpipe/synth included)
    state = resume.load(tracker, g)
    if state:
        synth.load_state_dict(state)
    t0 = time.perf_counter()
    bar = tqdm(range(state["done"] if state else 0, s.rounds), desc="synthesize", leave=False, disable=None)
    for r in bar:
        m = synth.round(r)
        tracker.log_metrics(m, step=r)
        bar.set_postfix(H=f"{m['class_entropy']:.3f}", n=m["buffer"])
        resume.save(r + 1, s.rounds, synth.state_dict(), g)
    synth.close()
    for net in (synth.gen, student):
        acc.plain(net)  # contiguous weights in generator.pt / student.pt
        check_weights("synthesize", net)
    wall, t_gen = time.perf_counter() - t0, synth.t_gen

    meta = _write_outputs(cfg, tspec, synth)
    tracker.log_metrics({"n_samples": meta["n"], "final_class_entropy": meta["class_entropy"],
                         "teacher_confidence": meta["teacher_confidence"], "wall_s": wall, "generator_s": t_gen})
    # timings: MLflow and an untracked file, never the DVC output (a same-input re-run keeps its md5)
    save_json({"wall_s": round(wall, 2), "generator_s": round(t_gen, 2)}, paths.TIMINGS / "synthesize.json")
    tracker.set_tags({"synthetic.sha256": meta["sha256"], "synthetic.dvc_md5": dvc_md5(paths.SYNTHETIC),
                      "teacher.sha256": teacher_digest(cfg)})
    tracker.log_artifact(paths.SYNTHETIC / "grid.png")
    tracker.log_artifact(paths.SYNTHETIC / "histogram.csv")
    resume.finish()
    return {"n": meta["n"], "entropy": round(meta["class_entropy"], 4),
            "hist": f"{min(meta['histogram'])}-{max(meta['histogram'])}", "wall_s": round(wall, 1)}


def _track_setup(cfg: Config, tracker, tspec: dict, teacher_digests: list, synth: Synthesizer) -> None:
    """The run's parameters and tags: what guides the synthesis (BN prior, teacher card, ensemble)."""
    s, bn = cfg.synthesize, synth.bn
    if s.stats_file:
        tracker.set_tags({"synthesize.stats.sha256": sha256_file(s.stats_file)})
    elif not bn.hooks:  # said once: the BN-statistics prior, the term that matters most with BN, is not there
        print(f"[kdpipe] synthesize: the teacher has no BatchNorm layers (folded by its exporter?): no BN-statistics "
              f"prior (synthesize.w_bn has no effect); synthesis relies on CE, adversarial, DAFL (w_act {s.w_act}, "
              f"w_ie {s.w_ie}) and the image prior (w_tv {s.w_tv}, w_l2 {s.w_l2})", flush=True)
    tracker.set_tags({"kdpipe.bn_prior": f"N(0, 1) on the outputs of {len(bn.hooks)} convolutions (synthesize.stats: "
                      "standard)" if s.stats == STANDARD_STATS else
                      f"the data owner's statistics of {len(bn.hooks)} convolutions" if s.stats else
                      f"{len(bn.hooks)} BatchNorm layers" if bn.hooks else "absent (no BatchNorm)"})
    if cfg.teacher.source:  # a teacher from its card: what it is, with the hash of its file
        tracker.set_tags({"teacher.source": cfg.teacher.source, "teacher.card": json.dumps(tspec["card"])})
    tracker.log_params({"synthesize": s.model_dump(mode="json"), "replay": cfg.replay.model_dump(mode="json"),
                        "phi": cfg.phi.model_dump(mode="json"), "student.arch": cfg.student.arch,
                        "teacher.arch": tspec["arch"]})
    if cfg.teachers:
        tracker.log_params({"teachers": [t.model_dump(mode="json") for t in cfg.teachers]})
        tracker.set_tags({"teachers.sha256": ",".join(teacher_digests)})


def _write_outputs(cfg: Config, tspec: dict, synth: Synthesizer) -> dict:
    """data/synthetic/, one DVC-versioned folder: samples.pt, grid.png, histogram.csv, meta.json, generator.pt,
    student.pt (the proxy: distill's start); returns meta."""
    s, C = cfg.synthesize, tspec["num_classes"]
    st = synth.output()
    preds = st["logits"].argmax(1)
    hist = torch.bincount(preds, minlength=C)
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
        "sha256": sha256_tensors(st["x"], st["logits"]),
        "generated": int(s.rounds * s.batch_size),
        "student_arch": cfg.student.arch,
    }
    save_json(meta, paths.SYNTHETIC / "meta.json")
    save_torch(synth.gen.state_dict(), paths.SYNTHETIC / "generator.pt")
    save_torch(synth.student.state_dict(), paths.SYNTHETIC / "student.pt")
    return meta
