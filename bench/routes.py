"""The routes side by side on one dataset (issue 8's table): scratch, KD on real data, data-free KD,
data-free + INT8, with the INT8 model's size and CPU latency next to FP32.

    python bench/routes.py --config configs/mnist.yaml --set data.root=/path/to/mnist [--set ...] [--tag cpu]
        [--route-set kd-real:distill.temperature=10 ...]   (an override for one route only)

In a scratch folder (tracking off): prepare, train-teacher, baseline (the student from scratch on the
real data), synthesize, then per route distill -> evaluate -> export. The teacher, the baseline and the
synthetic set are shared by the routes. Writes bench/results/routes-<data>[-<tag>].json and prints a
markdown table.
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

ROUTES = {"kd-real": ["distill.data=real"], "data-free": ["distill.data=synthetic"]}


def main() -> int:
    from kdpipe.config import load_config
    from kdpipe.stages import run_stage
    from kdpipe.utils import load_json

    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default=str(ROOT / "params.yaml"))
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--route-set", dest="route_overrides", action="append", default=[], metavar="ROUTE:KEY=VALUE")
    ap.add_argument("--routes", default="kd-real,data-free")
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--tag", default=None)
    a = ap.parse_args()
    config = str(Path(a.config).resolve())
    work = Path(a.workdir or tempfile.mkdtemp(prefix="kdpipe-routes-"))
    work.mkdir(parents=True, exist_ok=True)
    os.chdir(work)
    base = a.overrides + ["tracking.enabled=false"]
    cfg = load_config(config, base)
    per_route = {}  # --route-set, checked (with each route's whole config) before any stage runs
    for item in a.route_overrides:
        route, _, kv = item.partition(":")
        if route not in ROUTES or not kv:
            ap.error(f"--route-set {item!r}: want ROUTE:KEY=VALUE with ROUTE one of {', '.join(ROUTES)}")
        per_route.setdefault(route, []).append(kv)
    route_cfgs = {r: load_config(config, base + ROUTES[r] + per_route.get(r, [])) for r in a.routes.split(",")}
    walls = {}

    def stage(name, c):
        t0 = time.perf_counter()
        run_stage(name, c)
        walls[name] = round(time.perf_counter() - t0, 1)

    for name in ("prepare", "train-teacher", "baseline", "synthesize"):
        stage(name, cfg)
    out = {"data": cfg.data.name, "config": Path(a.config).name, "overrides": a.overrides,
           "route_overrides": a.route_overrides, "walls_s": walls, "routes": {}}
    for route, c in route_cfgs.items():
        for name in ("distill", "evaluate", "export"):
            stage(name, c)
        m, e = load_json("data/reports/metrics.json"), load_json("data/export/metrics.json")
        out["teacher"], out["scratch"] = m["teacher"]["accuracy"], m.get("baseline", {}).get("accuracy")
        out["routes"][route] = {"accuracy": m["student"]["accuracy"], "distill_s": walls["distill"],
                                **{k: v for k, v in e.items() if not k.endswith("sha256")}}
        print(json.dumps({route: out["routes"][route]}), flush=True)
    syn = load_json("data/synthetic/meta.json")
    out["synthetic"] = {**{k: syn[k] for k in ("n", "generated", "class_entropy", "histogram")},
                        "wall_s": json.loads(Path("data/.timings/synthesize.json").read_text())["wall_s"]}
    out.update(run_info())
    write_result(out, f"routes-{cfg.data.name}{'-' + a.tag if a.tag else ''}.json")
    print(f"\n{out['data']} ({out['config']} {' '.join(a.overrides + a.route_overrides)}); {out['device']}; torch {out['torch']}; "
          f"commit {out['commit']}; {out['date']}\n")
    print("| route | student test acc | ONNX size (bytes) | latency b1 / b64 (ms, 1 thread) |\n|---|---|---|---|")
    print(f"| teacher | {out['teacher']:.4f} | | |")
    if out["scratch"] is not None:
        print(f"| scratch (student on real labels) | {out['scratch']:.4f} | | |")
    for route, r in out["routes"].items():
        print(f"| {route} | {r['accuracy']:.4f} | {r['size_bytes']:,} | {r['latency_ms_b1_fp32']:.3f} / {r['latency_ms_b64_fp32']:.2f} |")
        if "int8_accuracy" in r:
            print(f"| {route} + INT8 | {r['int8_accuracy']:.4f} (agreement {r['int8_top1_agreement']:.4f}) | "
                  f"{r['int8_size_bytes']:,} | {r['latency_ms_b1_int8']:.3f} / {r['latency_ms_b64_int8']:.2f} |")
    print(f"\nwalls (s): {walls}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
