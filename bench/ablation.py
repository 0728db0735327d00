"""Ablation of the data-free parts on one dataset: each row adds one part (SSD-KD's table shape).

    python bench/ablation.py [--config configs/mnist.yaml] [--set key=value ...] [--rows 0,1,4] [--seeds 3] [--first-seed 0]
                             [--tag small] [--split val]

Runs prepare + train-teacher once in a scratch folder (seed 0: one teacher for every row), then
synthesize -> distill -> evaluate per row and per seed (seed = 0..seeds-1, tracking off), and writes
bench/results/ablation-<data>[-<tag>].json plus a markdown table (mean ± std over the seeds) on stdout.
``--split val`` scores each student on the validation split (choose settings there) instead of evaluate's test
split (report the test split once, for the choice made).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench._info import run_info, write_result  # noqa: E402

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
    "φ with γ = 0.5 (gentler focal term)": ["synthesize.phi=true", "distill.phi=true", "phi.gamma=0.5"],
    "φ diversity only (γ = 0)": ["synthesize.phi=true", "distill.phi=true", "phi.gamma=0"],
    "priority sampling in distill only": ["distill.priority=true"],
    "all (+ balanced targets, entropy term)": ["synthesize.phi=true", "distill.phi=true", "synthesize.w_ie=1",
                                               "synthesize.priority=true", "distill.priority=true",
                                               "synthesize.balanced_targets=true"],
}


def table(rows: list[dict]) -> str:
    """Markdown: one line per row, mean ± sample std over its seeds (std omitted for one seed)."""
    import statistics as st

    def ms(v, fmt):
        return f"{st.mean(v):{fmt}}" + (f" ± {st.stdev(v):{fmt}}" if len(v) > 1 else "")

    out = ["| row | seeds | student acc | class entropy (max) | histogram min–max | kept / synthesized | synthesize s | distill s |",
           "|---|---|---|---|---|---|---|---|"]
    for name in dict.fromkeys(r["row"] for r in rows):
        g = [r for r in rows if r["row"] == name]
        out.append(f"| {name} | {len(g)} | {ms([r['student_acc'] for r in g], '.4f')} | "
                   f"{ms([r['class_entropy'] for r in g], '.3f')} ({g[0]['max_entropy']:.3f}) | "
                   f"{min(r['hist_min'] for r in g)}–{max(r['hist_max'] for r in g)} | {g[0]['kept']} / {g[0]['synthesized']} | "
                   f"{st.mean(r['synthesize_s'] for r in g):.1f} | {st.mean(r['distill_s'] for r in g):.1f} |")
    return "\n".join(out)


def accuracy(folder: str, split: str) -> float:
    """Top-1 of the model in ``folder`` (model.pt + spec.json) on a prepared split."""
    import torch

    from kdpipe.checkpoints import load_model
    from kdpipe.data import load_split

    x, y = load_split(split, "cpu")
    model, _ = load_model(Path(folder), "cpu")
    with torch.no_grad():
        return (model.eval()(x).argmax(1) == y).float().mean().item()


def main() -> int:
    from kdpipe.config import load_config
    from kdpipe.stages import run_stage
    from kdpipe.utils import load_json

    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default=str(ROOT / "params.yaml"))
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--rows", default=None, help="comma-separated row numbers (0-based) of ROWS; default all")
    ap.add_argument("--seeds", type=int, default=1, help="seeds per row (synthesize + distill); the teacher is seed 0's")
    ap.add_argument("--first-seed", type=int, default=0, help="seeds run are first_seed .. first_seed + seeds - 1")
    ap.add_argument("--tag", default=None, help="suffix of the results file")
    ap.add_argument("--split", choices=["test", "val"], default="test",
                    help="the split the student is scored on (val: to choose; test: to report, once)")
    a = ap.parse_args()
    names = list(ROWS)
    picked = [names[int(i)] for i in a.rows.split(",")] if a.rows else names
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
    for name in picked:
        extra = ROWS[name]
        for seed in range(a.first_seed, a.first_seed + a.seeds):
            cfg = load_config(config, base + extra + [f"seed={seed}"])
            t0 = time.perf_counter()
            run_stage("synthesize", cfg)
            t1 = time.perf_counter()
            run_stage("distill", cfg)
            t2 = time.perf_counter()
            cfg_eval = load_config(config, base + ["baseline.enabled=false"])
            run_stage("baseline", cfg_eval)
            run_stage("evaluate", cfg_eval)
            m, syn = load_json("data/reports/metrics.json"), load_json("data/synthetic/meta.json")
            teacher_acc, student_acc = m["teacher"]["accuracy"], m["student"]["accuracy"]
            if a.split == "val":
                teacher_acc, student_acc = accuracy("data/teacher", "val"), accuracy("data/student", "val")
            rows.append({"row": name, "seed": seed, "overrides": extra, "split": a.split, "student_acc": student_acc,
                         "class_entropy": syn["class_entropy"], "max_entropy": syn["max_entropy"],
                         "hist_min": min(syn["histogram"]), "hist_max": max(syn["histogram"]),
                         "kept": syn["n"], "synthesized": syn["generated"],
                         "synthesize_s": round(t1 - t0, 1), "distill_s": round(t2 - t1, 1)})
            print(json.dumps(rows[-1]), flush=True)
    out = {"data": cfg.data.name, "split": a.split, "config": Path(a.config).name, "overrides": a.overrides, "teacher_acc": teacher_acc,
           **run_info(), "seeds": a.seeds, "rows": rows}
    write_result(out, f"ablation-{cfg.data.name}{'-' + a.tag if a.tag else ''}.json")
    print(f"\n{cfg.data.name}: teacher {teacher_acc:.4f}; device {out['device']}; torch {out['torch']}; commit {out['commit']}; {out['date']}\n")
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
