"""Ablation of the data-free parts on one dataset: each row adds one part (SSD-KD's table shape).

    python bench/ablation.py [--config configs/mnist.yaml] [--set key=value ...] [--rows all,plain,...]

Runs prepare + train-teacher once in a scratch folder, then synthesize -> distill -> evaluate per
row (tracking off), and writes bench/results/ablation-<data>.json plus a markdown table on stdout.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

OFF = ["synthesize.w_bn=0", "synthesize.w_adv=0", "synthesize.w_ie=0", "synthesize.phi=false", "distill.phi=false",
       "synthesize.priority=false", "distill.priority=false", "synthesize.balanced_targets=false",
       "synthesize.eviction=fifo"]
ROWS = {
    "plain generator (CE)": OFF,
    "+ BN prior": OFF + ["synthesize.w_bn=10"],
    "+ adversarial": OFF + ["synthesize.w_bn=10", "synthesize.w_adv=0.5"],
    "+ balanced buffer eviction (= kdpipe default)": OFF + ["synthesize.w_bn=10", "synthesize.w_adv=0.5", "synthesize.eviction=balanced"],
    "+ φ (modulating function)": OFF + ["synthesize.w_bn=10", "synthesize.w_adv=0.5", "synthesize.eviction=balanced",
                                        "synthesize.phi=true", "distill.phi=true"],
    "+ priority sampling": OFF + ["synthesize.w_bn=10", "synthesize.w_adv=0.5", "synthesize.eviction=balanced",
                                  "synthesize.phi=true", "distill.phi=true", "synthesize.priority=true",
                                  "distill.priority=true"],
    "priority sampling without φ": ["synthesize.priority=true", "distill.priority=true"],
    "all (+ balanced targets, entropy term)": ["synthesize.phi=true", "distill.phi=true", "synthesize.w_ie=1",
                                               "synthesize.priority=true", "distill.priority=true",
                                               "synthesize.balanced_targets=true"],
}


def main() -> int:
    from kdpipe.config import load_config
    from kdpipe.stages import run_stage
    from kdpipe.utils import load_json

    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default=str(ROOT / "params.yaml"))
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--workdir", default=None)
    a = ap.parse_args()
    config = str(Path(a.config).resolve())
    work = Path(a.workdir or tempfile.mkdtemp(prefix="kdpipe-ablation-"))
    work.mkdir(parents=True, exist_ok=True)
    os.chdir(work)
    base = a.overrides + ["tracking.enabled=false"]
    cfg = load_config(config, base)
    for stage in ("prepare", "train-teacher"):
        if stage == "prepare" or not Path("data/teacher/model.pt").exists():
            run_stage(stage, cfg)
    teacher_acc = None
    rows = []
    for name, extra in ROWS.items():
        cfg = load_config(config, base + extra)
        t0 = time.perf_counter()
        run_stage("synthesize", cfg)
        t1 = time.perf_counter()
        run_stage("distill", cfg)
        t2 = time.perf_counter()
        cfg_eval = load_config(config, base + ["baseline.enabled=false"])
        run_stage("baseline", cfg_eval)
        run_stage("evaluate", cfg_eval)
        m, syn = load_json("data/reports/metrics.json"), load_json("data/synthetic/meta.json")
        teacher_acc = m["teacher"]["accuracy"]
        rows.append({"row": name, "overrides": extra, "student_acc": m["student"]["accuracy"],
                     "class_entropy": syn["class_entropy"], "max_entropy": syn["max_entropy"],
                     "hist_min": min(syn["histogram"]), "hist_max": max(syn["histogram"]),
                     "kept": syn["n"], "synthesized": syn["generated"],
                     "synthesize_s": round(t1 - t0, 1), "distill_s": round(t2 - t1, 1)})
        print(json.dumps(rows[-1]), flush=True)
    import torch

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    out = {"data": cfg.data.name, "config": Path(a.config).name, "overrides": a.overrides, "teacher_acc": teacher_acc,
           "device": torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)",
           "torch": torch.__version__, "commit": commit, "date": date.today().isoformat(), "rows": rows}
    res = ROOT / "bench" / "results" / f"ablation-{cfg.data.name}.json"
    res.parent.mkdir(parents=True, exist_ok=True)
    res.write_text(json.dumps(out, indent=2) + "\n")
    print(f"\n{cfg.data.name}: teacher {teacher_acc:.4f}; device {out['device']}; torch {out['torch']}; commit {commit}; {out['date']}\n")
    print("| row | student acc | class entropy (max) | histogram min–max | kept / synthesized | synthesize s | distill s |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['row']} | {r['student_acc']:.4f} | {r['class_entropy']:.3f} ({r['max_entropy']:.3f}) | "
              f"{r['hist_min']}–{r['hist_max']} | {r['kept']} / {r['synthesized']} | {r['synthesize_s']} | {r['distill_s']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
