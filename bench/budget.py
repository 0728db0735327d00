"""Synthesis budget × distill epochs, over seeds: how short can the default pipeline be?

    python bench/budget.py [--rounds 30,40,60] [--epochs 5,10,20] [--g-steps 2,3,5] [--kd-steps 20,100] [--seeds 3]
                           [--set key=value ...] [--tag t]

In a scratch folder (tracking and resume off): prepare, train-teacher and baseline once (seed 0), then per
seed, per ``synthesize.g_steps`` (Fast-DFKD's Fast-2/5/10 knob; default: the config's), per
``synthesize.kd_steps`` (the proxy student's KD steps per round; default: the config's) and per
``synthesize.rounds`` one synthesize, and per ``distill.epochs`` one distill -> evaluate
(the student starts from the proxy student of that synthesis, ``distill.init: synthesis``, unless --set
says otherwise). Writes bench/results/budget-<data>[-<tag>].json and prints mean accuracy per cell.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench._info import run_info, write_result  # noqa: E402


def main() -> int:
    from kdpipe.config import load_config
    from kdpipe.stages import run_stage
    from kdpipe.utils import load_json

    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default=str(ROOT / "params.yaml"))
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--rounds", default="30,40,60")
    ap.add_argument("--epochs", default="5,10,20")
    ap.add_argument("--g-steps", default=None, help="synthesize.g_steps values (default: the config's)")
    ap.add_argument("--kd-steps", default=None, help="synthesize.kd_steps values (default: the config's)")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--tag", default=None)
    a = ap.parse_args()
    config = str(Path(a.config).resolve())
    os.chdir(tempfile.mkdtemp(prefix="kdpipe-budget-"))
    base = a.overrides + ["tracking.enabled=false", "resume.enabled=false"]
    cfg = load_config(config, base)
    for stage in ("prepare", "train-teacher", "baseline"):
        run_stage(stage, cfg)
    rows = []
    g_steps = list(map(int, a.g_steps.split(","))) if a.g_steps else [cfg.synthesize.g_steps]
    kd_steps = list(map(int, a.kd_steps.split(","))) if a.kd_steps else [cfg.synthesize.kd_steps]
    cells = [(gs, ks, rounds) for gs in g_steps for ks in kd_steps for rounds in map(int, a.rounds.split(","))]
    for seed in range(a.seeds):
        for gs, ks, rounds in cells:
            syn = [f"seed={seed}", f"synthesize.g_steps={gs}", f"synthesize.kd_steps={ks}", f"synthesize.rounds={rounds}"]
            t = time.perf_counter()
            run_stage("synthesize", load_config(config, base + syn))
            ts = time.perf_counter() - t
            for epochs in map(int, a.epochs.split(",")):
                t = time.perf_counter()
                run_stage("distill", load_config(config, base + syn + [f"distill.epochs={epochs}"]))
                td = time.perf_counter() - t
                run_stage("evaluate", load_config(config, base))
                m = load_json("data/reports/metrics.json")
                rows.append({"seed": seed, "g_steps": gs, "kd_steps": ks, "rounds": rounds, "epochs": epochs, "acc": m["student"]["accuracy"],
                             "teacher": m["teacher"]["accuracy"], "synthesize_s": round(ts, 1), "distill_s": round(td, 1)})
                print(json.dumps(rows[-1]), flush=True)
    out = {"data": cfg.data.name, "overrides": a.overrides, **run_info(), "rows": rows}
    write_result(out, f"budget-{cfg.data.name}{'-' + a.tag if a.tag else ''}.json")
    print("\n| g_steps | kd_steps | synthesize rounds | distill epochs | student acc (mean ± std over seeds) | per seed |"
          " synthesize s | distill s |\n|---|---|---|---|---|---|---|---|")
    key = lambda r: (r["g_steps"], r["kd_steps"], r["rounds"], r["epochs"])  # noqa: E731
    for cell in dict.fromkeys(map(key, rows)):
        g = [r for r in rows if key(r) == cell]
        acc = [r["acc"] for r in g]
        sd = f" ± {statistics.stdev(acc):.4f}" if len(acc) > 1 else ""
        print(f"| {' | '.join(map(str, cell))} | {statistics.mean(acc):.4f}{sd} | {' / '.join(f'{x:.4f}' for x in acc)} | "
              f"{statistics.mean(r['synthesize_s'] for r in g):.1f} | {statistics.mean(r['distill_s'] for r in g):.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
