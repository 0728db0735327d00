"""Teacher-only route, timed: `kdpipe init` a project from a handed-over teacher file, `dvc repro` it (synthesize ->
distill -> evaluate -> export, no real data anywhere in the project), then `kdpipe score` the exported student and
the teacher on the data owner's labelled folders (ImageFolder) with onnxruntime.

    python bench/teacher_only.py --tag keras-s0 --teacher /work/bench-mnist/keras_mnist.onnx \
        --set teacher.range=[0,255] --set teacher.mean=null --set teacher.std=null \
        --preset bench/presets/mnist-teacher-only.yaml --score val=/work/bench-mnist/val [--score test=/work/bench-mnist/test]

Writes bench/results/teacher-only-<tag>.json: run info, the card, each stage's wall time (from the stage lines),
synthesize + distill seconds, the fidelity figures and each scored folder's student/teacher accuracy.
Choose settings on the val folder; score test once, for the choice made.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _info import flat_sets, run_info, write_result  # noqa: E402

BIN = Path(sys.executable).parent


def sh(cmd: list[str], cwd: Path, env: dict) -> str:
    r = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"{cmd} failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
    return r.stdout


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tag", required=True)
    ap.add_argument("--teacher", required=True, help="the handed-over teacher file")
    ap.add_argument("--set", dest="sets", action="append", default=[], help="card keys and parameters (repeatable)")
    ap.add_argument("--preset", default=None, help="a YAML of parameter overrides (flattened into --set)")
    ap.add_argument("--score", action="append", default=[], metavar="NAME=FOLDER", help="labelled folders to score")
    ap.add_argument("--workdir", default="/work/bench-runs")
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()

    sets = list(a.sets)
    if a.preset:
        sets = list(flat_sets(yaml.safe_load(Path(a.preset).read_text()))) + sets
    proj = Path(a.workdir) / a.tag
    if proj.exists():
        raise SystemExit(f"{proj} exists: pick another --tag or remove it")
    env = {**os.environ, "OMP_NUM_THREADS": str(a.threads), "MLFLOW_TRACKING_URI": f"sqlite:///{proj / 'mlflow.db'}",
           "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    env.setdefault("GIT_AUTHOR_NAME", "kdpipe bench")
    env.setdefault("GIT_AUTHOR_EMAIL", "bench@kdpipe.local")
    env["GIT_COMMITTER_NAME"], env["GIT_COMMITTER_EMAIL"] = env["GIT_AUTHOR_NAME"], env["GIT_AUTHOR_EMAIL"]
    out = {"tag": a.tag, **run_info(a.threads), "teacher": a.teacher, "sets": sets}
    print(sh([str(BIN / "kdpipe"), "init", str(proj), "--teacher", a.teacher, *[x for s in sets for x in ("--set", s)]],
             Path.cwd(), env), flush=True)
    out["params"] = yaml.safe_load((proj / "params.yaml").read_text())
    t0 = time.perf_counter()
    log = sh(["dvc", "repro"], proj, env)
    out["repro_wall_s"] = round(time.perf_counter() - t0, 1)
    (proj / "repro.log").write_text(log)
    out["stage_s"] = {m[0]: float(m[1]) for m in re.findall(r"\[kdpipe\] (\S+)\s+([\d.]+)s", log)}
    out["synthesize_plus_distill_s"] = round(out["stage_s"]["synthesize"] + out["stage_s"]["distill"], 1)
    out["fidelity"] = {k: v for k, v in json.loads((proj / "data/reports/metrics.json").read_text())["student"].items()
                       if k in ("agreement", "kl", "ece", "n_params", "latency_ms_b1")}
    out["scores"] = {}
    for item in a.score:
        name, folder = item.split("=", 1)
        res_path = proj / f"score-{name}.json"
        sh([str(BIN / "kdpipe"), "score", "data/export/student.onnx", "--data", folder, "--teacher",
            out["params"]["teacher"]["source"], "--out", str(res_path)], proj, env)
        r = json.loads(res_path.read_text())
        out["scores"][name] = {k: r[k] for k in ("n", "student_accuracy", "teacher_accuracy", "agreement",
                                                 "student_over_teacher")}
    print(json.dumps({k: out[k] for k in ("stage_s", "synthesize_plus_distill_s", "fidelity", "scores")}, indent=2))
    print(write_result(out, f"teacher-only-{a.tag}.json"))


if __name__ == "__main__":
    main()
