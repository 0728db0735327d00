"""Throughput (images/s) of each stage's step next to its floor, for the same models in the same run.

    python bench/speed.py [--preset configs/cifar10.yaml] [--seconds 5] [--max-images 8192] [--set key=value ...]
                          [--amp auto|bf16|off] [--channels-last auto|true|false] [--compile]

Stage: the real stage code (kdpipe.stages, tracking off) in a scratch folder, run twice: 1 epoch
(or round), then 1+k with k sized from the floor to take about --seconds more; images/s = the k
units' images / the extra wall time, so start-up, loading and saving cancel out.
Floor: the bare model work that the stage's step cannot beat, on successive batches already on the
device, timed for --seconds:
  train-teacher, baseline: a plain supervised step (forward, CE, backward, SGD) of that model;
  synthesize: generator -> frozen teacher with BN hooks (CE + w_bn·L_BN), backward, Adam step
              (stage: images through its generator steps, g_steps·batch_size per round, with the
              round's proxy-student KD steps and buffer update in its time);
  distill:    teacher forward + student KD step (the stage reads stored teacher logits unless
              distill.augment, so it may beat this floor).
Speed knobs (the ``speed:`` section, kdpipe/accel.py; --amp, --channels-last, --compile set them):
the floors use them as the supervised stages do (bf16 autocast, channels_last, fused SGD, compile);
with the defaults that is bf16 + channels_last on CUDA and plain fp32 on CPU. Compare a knob by
running twice on the same machine, e.g. with and without --compile.
An ImageFolder preset is cut to --max-images training images (symlinks) so epochs stay short.
Writes bench/results/speed-<preset>-<device>.json and prints a markdown table.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench._info import run_info, write_result  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from kdpipe import accel, data  # noqa: E402
from kdpipe.config import load_config  # noqa: E402
from kdpipe.losses import kd_loss  # noqa: E402
from kdpipe.models import build_model, make_spec  # noqa: E402
from kdpipe.stages import run_stage  # noqa: E402
from kdpipe.synth.bn_hooks import BNPrior  # noqa: E402
from kdpipe.synth.generator import Generator  # noqa: E402
from kdpipe.synth.losses import ce_term  # noqa: E402
from kdpipe.utils import load_json, pick_device  # noqa: E402


def subset_folder(root: Path, dest: Path, n: int) -> Path:
    """An ImageFolder of about ``n`` training images (the first n/C per class), as symlinks."""
    classes = sorted(d for d in (root / "train").iterdir() if d.is_dir())
    for c in classes:
        (dest / "train" / c.name).mkdir(parents=True, exist_ok=True)
        for f in sorted(c.iterdir())[: max(1, n // len(classes))]:
            link = dest / "train" / c.name / f.name
            if not link.exists():
                link.symlink_to(f.resolve())
    return dest


def timed(step, batch: int, seconds: float, device) -> float:
    """images/s of ``step`` (one batch), after two warm-up calls."""
    step(), step()
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    n, t0 = 0, time.perf_counter()
    while n < 3 or time.perf_counter() - t0 < seconds:
        step()
        n += 1
    sync()
    return n * batch / (time.perf_counter() - t0)


def stage_rate(stage: str, cfg_for, key: str, images_per_unit: int, seconds: float, floor: float) -> tuple[float | None, dict]:
    """Run ``stage`` with ``key``=1, then with 1+k units, k sized from the floor to take about
    ``seconds`` more; rate = k units of images / the extra wall time (fixed costs cancel)."""
    k = max(1, round(seconds * floor / images_per_unit))
    walls = []
    for units in (1, 1 + k):
        t0 = time.perf_counter()
        run_stage(stage, cfg_for([f"{key}={units}"]))
        walls.append(time.perf_counter() - t0)
    extra = walls[1] - walls[0]
    rate = k * images_per_unit / extra if extra > 0 else None  # None: too noisy, raise --seconds
    return rate, {"units": [1, 1 + k], "wall_s": [round(w, 2) for w in walls]}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default=None, help="a config YAML (default: params.yaml, the digits default)")
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--seconds", type=float, default=5.0, help="time per measurement (default 5)")
    ap.add_argument("--max-images", type=int, default=8192, help="ImageFolder training images used (default 8192)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's own)")
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--amp", choices=["auto", "bf16", "off"], default=None, help="speed.amp (default: the config's)")
    ap.add_argument("--channels-last", choices=["auto", "true", "false"], default=None, help="speed.channels_last")
    ap.add_argument("--compile", action="store_true", help="speed.compile=true (torch.compile the training forward)")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    load0 = os.getloadavg()[0]
    a.overrides += ([f"speed.amp={a.amp}"] if a.amp else []) + (["speed.compile=true"] if a.compile else []) \
        + ([f"speed.channels_last={a.channels_last}"] if a.channels_last else [])
    config = str(Path(a.preset or ROOT / "params.yaml").resolve())
    cfg = load_config(config, a.overrides)
    work = Path(a.workdir or tempfile.mkdtemp(prefix="kdpipe-speed-")).resolve()
    base = a.overrides + ["tracking.enabled=false", "synthesize.warmup_rounds=0"]  # every round a full round
    if cfg.data.name == "imagefolder" and cfg.data.root:
        base.append(f"data.root={subset_folder(Path(cfg.data.root).resolve(), work / 'images', a.max_images)}")
    elif cfg.data.root:
        base.append(f"data.root={Path(cfg.data.root).resolve()}")
    work.mkdir(parents=True, exist_ok=True)
    os.chdir(work)
    cfg_for = lambda extra: load_config(config, base + extra)  # noqa: E731
    cfg = cfg_for([])
    device = pick_device(cfg.device)
    run_stage("prepare", cfg)
    meta = data.load_meta()
    n_train = meta["splits"]["train"]["n"]
    x_all, y_all = data.load_split("train", device)
    tspec, sspec = make_spec(cfg.teacher.arch, meta), make_spec(cfg.student.arch, meta)
    acc = accel.Accel(cfg.speed, device)
    acc.setup()  # cuDNN autotuning
    fmt = acc.memory_format()
    amp = acc.autocast
    compiled = torch.compile if cfg.speed.compile else (lambda m: m)

    def model(spec):
        return build_model(spec).to(device, memory_format=fmt)

    def batches(n):  # successive batches of the real training images, on the device
        i = 0
        while True:
            idx = (torch.arange(n, device=device) + i * n) % len(x_all)
            yield x_all[idx].contiguous(memory_format=fmt), y_all[idx]
            i += 1

    def supervised_floor(spec, b):
        m, it = model(spec).train(), batches(b)
        opt = acc.sgd(m.parameters(), 0.01, 0.9, 0.0)  # fused on CUDA
        fwd = compiled(m)

        def step():
            x, y = next(it)
            with amp():
                logits = fwd(x)
            loss = F.cross_entropy(logits.float(), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        return timed(step, b, a.seconds, device)

    def kd_floor(b):
        t, s, it = model(tspec).eval().requires_grad_(False), model(sspec).train(), batches(b)
        opt = acc.sgd(s.parameters(), 0.01, 0.9, 0.0)
        tf, sf = compiled(t), compiled(s)

        def step():
            x, _ = next(it)
            with torch.no_grad(), amp():
                tl = tf(x)
            with amp():
                loss = kd_loss(sf(x).float(), tl.float(), cfg.distill.temperature)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        return timed(step, b, a.seconds, device)

    def synth_floor(b):
        s = cfg.synthesize
        t = model(tspec).eval().requires_grad_(False)
        gen = Generator(s.nz, meta["image_size"], meta["channels"], s.ngf).to(device, memory_format=fmt)
        opt, bn = torch.optim.Adam(gen.parameters(), lr=s.lr_g, betas=(0.5, 0.999)), BNPrior(t, s.bn_momentum)

        def step():  # fresh latent codes and targets every step
            z, targets = torch.randn(b, s.nz, device=device), torch.randint(len(meta["classes"]), (b,), device=device)
            with amp():
                tl = t(gen(z))
                loss = ce_term(tl.float(), targets).mean() + s.w_bn * bn.loss().float()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        r = timed(step, b, a.seconds, device)
        bn.remove()
        return r

    s = cfg.synthesize
    rows = []
    for stage, key, per_unit, floor_name, floor in [
        ("train-teacher", "teacher.epochs", n_train, f"supervised step, {cfg.teacher.arch}",
         lambda: supervised_floor(tspec, cfg.teacher.batch_size)),
        ("baseline", "baseline.epochs", n_train, f"supervised step, {cfg.student.arch}",
         lambda: supervised_floor(sspec, cfg.baseline.batch_size)),
        ("synthesize", "synthesize.rounds", s.g_steps * s.batch_size, "generator → teacher + BN hooks",
         lambda: synth_floor(s.batch_size)),
        ("distill", "distill.epochs", None, f"{cfg.teacher.arch} fwd + {cfg.student.arch} KD step",
         lambda: kd_floor(cfg.distill.batch_size)),
    ]:
        if stage == "baseline" and not cfg.baseline.enabled:
            continue
        if stage == "train-teacher" and cfg.teacher.checkpoint:  # bring-your-own teacher: nothing to time
            run_stage(stage, cfg)
            continue
        if per_unit is None:  # distill: one epoch = the synthetic set synthesize left behind
            per_unit = load_json("data/synthetic/meta.json")["n"]
        f = floor()
        rate, info = stage_rate(stage, cfg_for, key, per_unit, a.seconds, f)
        rows.append({"stage": stage, "images_per_s": rate and round(rate, 1), "floor": floor_name,
                     "floor_images_per_s": round(f, 1), "stage_over_floor": rate and round(rate / f, 3), **info})
        print(rows[-1], flush=True)

    name = Path(a.preset).stem if a.preset else cfg.data.name
    precision = " + ".join(k for k, on in (("bf16 autocast", accel.Accel(cfg.speed, device).amp_dtype() is not None),
                                           ("channels_last", fmt is torch.channels_last),
                                           ("torch.compile", cfg.speed.compile)) if on) or "fp32"
    info = run_info()
    dev, commit = info["device"], info["commit"]
    out = {"preset": name, "config": Path(config).name, "overrides": a.overrides, **info,
           "precision": precision, "speed": cfg.speed.model_dump(mode="json"), "seconds": a.seconds, "n_train": n_train,
           "load_avg_1min": [round(load0, 2), round(os.getloadavg()[0], 2)],  # start, end: others' load on the box
           "teacher": cfg.teacher.arch, "student": cfg.student.arch, "image_size": meta["image_size"], "rows": rows}
    knobs = "".join(f"-{k}" for k, on in (("bf16", accel.Accel(cfg.speed, device).amp_dtype() is not None),
                                            ("cl", fmt is torch.channels_last), ("compile", cfg.speed.compile)) if on)
    write_result(out, f"speed-{name}-{device.type}{knobs}.json")
    print(f"\n{name} ({cfg.teacher.arch} → {cfg.student.arch}, {meta['image_size']} px): {dev}, {out['precision']}, "
          f"torch {out['torch']}, commit {commit}, {out['date']}, load average {load0:.1f} → {os.getloadavg()[0]:.1f}\n")
    print("| stage | stage images/s | floor | floor images/s | stage / floor |")
    print("|---|---:|---|---:|---:|")
    for r in rows:
        rate, ratio = (f"{r['images_per_s']:,.0f}", f"{r['stage_over_floor']:.2f}") if r["images_per_s"] else ("n/a", "n/a")
        print(f"| {r['stage']} | {rate} | {r['floor']} | {r['floor_images_per_s']:,.0f} | {ratio} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
