"""Prioritized replay against uniform batches when the KD budget is short (few distill epochs).

    python bench/replay.py [--config params.yaml] [--set key=value ...] [--seeds 5] [--epochs 1,2,4,8]
                           [--inits scratch,synthesis] [--tag small]

Runs prepare + train-teacher once in a scratch folder (seed 0), then per seed one synthesis and, on that
same synthetic set, distill -> evaluate for each (init, epochs, sampler): ``uniform`` (distill.priority
off), ``per-max`` (prioritized replay, importance weights / their batch max, Schaul et al.) and
``per-mean`` (the same draws, weights / their batch mean). Writes bench/results/replay-<data>[-<tag>].json
and a markdown table (mean ± std over the seeds, and the paired difference to uniform) on stdout.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics as st
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench._info import run_info, write_result  # noqa: E402

SAMPLERS = {"uniform": ["distill.priority=false"],
            "per-max": ["distill.priority=true", "replay.iw_norm=max"],
            "per-mean": ["distill.priority=true", "replay.iw_norm=mean"]}


def table(rows: list[dict]) -> str:
    out = ["| distill init | epochs | sampler | seeds | student acc | paired Δ to uniform (points) | seeds above uniform |",
           "|---|---|---|---|---|---|---|"]
    keys = dict.fromkeys((r["init"], r["epochs"], r["sampler"]) for r in rows)
    for init, ep, sampler in keys:
        acc = {r["seed"]: r["student_acc"] for r in rows if (r["init"], r["epochs"], r["sampler"]) == (init, ep, sampler)}
        uni = {r["seed"]: r["student_acc"] for r in rows if (r["init"], r["epochs"], r["sampler"]) == (init, ep, "uniform")}
        v = list(acc.values())
        ms = f"{st.mean(v):.4f}" + (f" ± {st.stdev(v):.4f}" if len(v) > 1 else "")
        d = [100 * (acc[s] - uni[s]) for s in acc if s in uni]
        delta = "—" if sampler == "uniform" else f"{st.mean(d):+.2f}" + (f" ± {st.stdev(d):.2f}" if len(d) > 1 else "")
        above = "—" if sampler == "uniform" else f"{sum(x > 0 for x in d)} / {len(d)}"
        out.append(f"| {init} | {ep} | {sampler} | {len(v)} | {ms} | {delta} | {above} |")
    return "\n".join(out)


def main() -> int:
    from kdpipe.config import load_config
    from kdpipe.stages import run_stage
    from kdpipe.utils import load_json

    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default=str(ROOT / "params.yaml"))
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--epochs", default="1,2,4,8", help="distill epochs to try (comma-separated)")
    ap.add_argument("--inits", default="scratch,synthesis", help="distill.init values (synthesis: only the 2nd epoch figure)")
    ap.add_argument("--tag", default=None)
    a = ap.parse_args()
    config = str(Path(a.config).resolve())
    work = Path(a.workdir or tempfile.mkdtemp(prefix="kdpipe-replay-"))
    work.mkdir(parents=True, exist_ok=True)
    os.chdir(work)
    base = a.overrides + ["tracking.enabled=false", "export.int8=false"]
    run_stage("prepare", load_config(config, base))
    if not Path("data/teacher/model.pt").exists():
        run_stage("train-teacher", load_config(config, base))
    cfg_eval = load_config(config, base + ["baseline.enabled=false"])
    run_stage("baseline", cfg_eval)
    epochs = [int(e) for e in a.epochs.split(",")]
    rows, teacher_acc = [], None
    for seed in range(a.seeds):
        run_stage("synthesize", load_config(config, base + [f"seed={seed}"]))
        for init in a.inits.split(","):
            # from the proxy student the budget barely matters (it starts at the teacher's level): one point
            for ep in (epochs if init == "scratch" else epochs[1:2] or epochs[:1]):
                for sampler, extra in SAMPLERS.items():
                    cfg = load_config(config, base + extra + [f"seed={seed}", f"distill.init={init}", f"distill.epochs={ep}"])
                    run_stage("distill", cfg)
                    run_stage("evaluate", cfg_eval)
                    m = load_json("data/reports/metrics.json")
                    teacher_acc = m["teacher"]["accuracy"]
                    rows.append({"seed": seed, "init": init, "epochs": ep, "sampler": sampler, "overrides": extra,
                                 "student_acc": m["student"]["accuracy"], "agreement": m.get("agreement")})
                    print(json.dumps(rows[-1]), flush=True)
    out = {"data": cfg_eval.data.name, "config": Path(a.config).name, "overrides": a.overrides, "teacher_acc": teacher_acc,
           **run_info(), "seeds": a.seeds, "rows": rows}
    write_result(out, f"replay-{cfg_eval.data.name}{'-' + a.tag if a.tag else ''}.json")
    print(f"\n{cfg_eval.data.name}: teacher {teacher_acc:.4f}; device {out['device']}; torch {out['torch']}; commit {out['commit']}; {out['date']}\n")
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
