"""Run the whole DAG under one MLflow parent run, either through ``dvc repro`` (versioned: the
default inside a DVC project with params.yaml as the config) or in this process (any config)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path
from typing import Callable

from kdpipe import paths
from kdpipe.config import Config, ConfigError
from kdpipe.stages import run_stage, stages_for
from kdpipe.tracking import pipeline_run, tag_dvc_lock


class StageFailed(RuntimeError):
    """A stage run by ``dvc repro`` exited non-zero (it printed why)."""


def dvc_available() -> bool:
    return Path("dvc.yaml").exists() and Path(".dvc").is_dir()


def _dvc() -> str:
    return shutil.which("dvc") or str(Path(sys.executable).parent / "dvc")


def _run(cmd: list[str], log: Callable[[str], None] | None) -> int:
    """Run ``cmd``; without ``log`` its output goes straight to this terminal (progress bars and all).
    With ``log`` (the Prefect run logger's ``info``), its stdout and stderr are read line by line as
    they come, still written to this process's stdout / stderr, and each line is passed to ``log``."""
    env = os.environ.copy()
    if log is None:
        return subprocess.run(cmd, env=env).returncode
    env["PYTHONUNBUFFERED"] = "1"  # the stages are Python: line by line, not at exit
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            errors="replace", bufsize=1)

    def pump(src, dst):
        for line in src:
            dst.write(line)
            dst.flush()
            log(line.rstrip("\r\n"))

    err = threading.Thread(target=pump, args=(proc.stderr, sys.stderr), daemon=True)
    err.start()
    pump(proc.stdout, sys.stdout)
    err.join()
    return proc.wait()


def dvc_repro(stage: str | None = None, single: bool = False, log: Callable[[str], None] | None = None) -> None:
    """``dvc repro [--single-item] [stage]`` as a subprocess; the parent run id travels in the env.
    ``log``: also pass each output line to it (flows/pipeline.py: the Prefect run logger)."""
    cmd = [_dvc(), "repro"] + (["--single-item"] if single else []) + ([stage] if stage else [])
    rc = _run(cmd, log)
    if rc != 0:
        raise StageFailed(f"'dvc {' '.join(cmd[1:])}' failed with exit code {rc}")


def default_remote() -> str | None:
    """The project's default DVC remote (``dvc remote add -d NAME URL``), or None."""
    r = subprocess.run([_dvc(), "remote", "default"], capture_output=True, text=True)
    name = r.stdout.strip()
    return name if r.returncode == 0 and name else None


def require_remote() -> str:
    """The default remote's name; a ConfigError (before any work) when none is set."""
    name = default_remote()
    if name is None:
        raise ConfigError("--push: this DVC project has no default remote; set one with 'dvc remote add -d NAME URL' "
                          "(a local path, s3://, gs://, azure://; docs/scaling.md, 'DVC remote and a second clone')")
    return name


def dvc_push(log: Callable[[str], None] | None = None) -> str:
    """``dvc push`` of every output in dvc.lock to the default remote; returns the remote's name."""
    name = require_remote()
    rc = _run([_dvc(), "push"], log)
    if rc != 0:
        raise StageFailed(f"'dvc push' to remote '{name}' failed with exit code {rc}")
    return name


ROUTE_LABEL = {"data-free": "data-free", "kd-real": "KD real", "kd-mixed": "KD mixed"}


def routes(m: dict, e: dict) -> list[tuple[str, str, float]]:
    """The routes side by side, (model, route, test accuracy): the teacher, the student under its
    distill route, the same + INT8 (export's figures), the baseline (scratch, real data); those that exist."""
    route = ROUTE_LABEL[m["student"].get("route", "data-free")]
    rows = [("teacher", "", m["teacher"]["accuracy"]), ("student", route, m["student"]["accuracy"])]
    if "int8_accuracy" in e:
        rows.append(("student", f"{route} + INT8", e["int8_accuracy"]))
    if "baseline" in m:
        rows.append(("baseline", "scratch, real data", m["baseline"]["accuracy"]))
    return rows


def summary() -> str:
    m = json.loads((paths.REPORTS / "metrics.json").read_text())
    e = json.loads((paths.EXPORT / "metrics.json").read_text())
    if m.get("data") == "none":  # a teacher-only project: fidelity to the teacher, no accuracy
        f = m["student"]
        return "\n".join([
            f"kdpipe summary: no real data; the student against its teacher on a held-out synthetic set (n={m['n_heldout']})",
            f"  teacher                      {m['teacher']['source']} (sha256 {m['teacher']['sha256'][:12]})",
            f"  {'top-1 agreement':<28} {f['agreement']:.4f}",
            f"  {'KL(teacher ‖ student)':<28} {f['kl']:.4f}",
            f"  {'ECE against the teacher':<28} {f['ece']:.4f}",
            *([f"  {'INT8 agreement':<28} {e['int8_teacher_agreement']:.4f}"] if "int8_teacher_agreement" in e else []),
            f"  student: {f['n_params']} parameters, {f['latency_ms_b1']:.2f} ms per image (1 CPU thread)",
            f"  onnx {paths.EXPORT / 'student.onnx'}: max|diff| {e['max_abs_diff']:.1e}, top-1 agreement {e['top1_agreement']:.4f}",
        ])
    return "\n".join([
        f"kdpipe summary: accuracy on the real test split (n={m['n_test']})",
        *[f"  {model + (f' ({route})' if route else ''):<28} {acc:.4f}" for model, route, acc in routes(m, e)],
        f"  {'teacher-student agree':<28} {m['agreement']:.4f}",
        f"  onnx {paths.EXPORT / 'student.onnx'}: max|diff| {e['max_abs_diff']:.1e}, top-1 agreement {e['top1_agreement']:.4f}",
    ])


def run_pipeline(cfg: Config, use_dvc: bool, name: str = "pipeline", push: bool = False) -> dict:
    """``push``: after a successful ``dvc repro``, ``dvc push`` the outputs to the default remote
    (checked before any work: a ConfigError when none is set)."""
    if push:
        if not use_dvc:
            raise ConfigError("--push pushes what 'dvc repro' versioned: it needs the DVC route (params.yaml as it "
                              "is, in a DVC project), not --no-dvc / --config / --set")
        require_remote()
    with pipeline_run(cfg, name=name, tags={"kdpipe.runner": "dvc" if use_dvc else "in-process"}) as parent:
        if use_dvc:
            dvc_repro()
            if parent is not None:
                tag_dvc_lock(parent.info.run_id)  # the last stage's lock entry, written after it ended
        else:
            for stage in stages_for(cfg):
                run_stage(stage, cfg)
        text = summary()
        if parent is not None:
            import mlflow

            m = json.loads((paths.REPORTS / "metrics.json").read_text())
            mlflow.log_metrics({f"{k}_accuracy": m[k]["accuracy"] for k in ("teacher", "student", "baseline")
                                if "accuracy" in m.get(k, {})})
            if m.get("data") == "none":
                mlflow.log_metrics({"fidelity_agreement": m["agreement"], "fidelity_kl": m["student"]["kl"]})
                mlflow.set_tag("kdpipe.real_data", "none")
    if push:
        print(f"[kdpipe] outputs pushed to DVC remote '{dvc_push()}'", flush=True)
    print(text, flush=True)
    return {"parent_run_id": parent.info.run_id if parent else None}
