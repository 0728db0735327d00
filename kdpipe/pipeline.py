"""The one orchestrator of the DAG: ``kdpipe run`` (kdpipe/cli.py) and the Prefect flow
(flows/pipeline.py) both call ``run_pipeline``; Prefect only wraps the per-stage call as a task.

One MLflow parent run spans the stages. Each stage runs through ``dvc repro --single-item <stage>``
(versioned: the default inside a DVC project with params.yaml as it is) or in this process (any config).

Preflight (``preflight``), before any work, the same for both callers: the config loads; ``use_dvc``
with another config or overrides is refused (a ConfigError saying to use ``dvc exp run -S key=value``
or ``--no-dvc``: ``dvc repro`` would run params.yaml while the parent run logged the overridden config);
``push`` needs the DVC route and a default remote; under DVC, ``dag.check`` (dvc.yaml's data deps are
those the config needs); ``check_tracking`` (the tracking store answers).

Retry rule (``transient``), the same for both callers: a stage is retried (``RETRIES`` times, after
~5 s then ~10 s, ±50 % jitter; KDPIPE_RETRY_BACKOFF_S sets the 5) only on a transient fault. Not
retried, since a re-run fails the same way: a config or data error (ConfigError, DataError: the CLI's
exit 2), a NaN/inf stop (FloatingPointError: exit 1, "stopped:"), an export that failed its onnxruntime
check (ExportError), a fault in the code itself (AttributeError, TypeError, NameError, ImportError,
AssertionError, NotImplementedError: ``stages.CODE_ERRORS``). Anything else is taken as transient: an
OSError (a disk, a tracking server or a DVC remote briefly away), a stage process killed by a signal (the
OOM killer, a preempted node), DVC's own failures (its repo lock held by another process). (A stage's own ``check_tracking`` raises a
ConfigError, so a tracking server that goes away between preflight and a stage's start is not retried.)

How a stage's kind of failure crosses ``dvc repro``: DVC does not pass the stage's exit code on (it
exits 255 for any failed stage and only prints "failed to run: <cmd>, exited with N"), and exit 1
means a NaN stop as well as a crash. So ``dvc_repro`` points the env var ``KDPIPE_FAILURE_FILE`` of the
``dvc repro`` it starts (DVC passes its env to the stage command) at a fresh temp file;
``kdpipe.stages.run_stage``, on a failure of one of the kinds above, writes
``{"stage", "kind", "message"}`` there. When ``dvc repro`` fails, ``dvc_repro`` re-raises that file's
failure as the exception the stage raised (so the CLI prints "kdpipe: error: ..." and exits 2, or
"kdpipe: stopped: ..." and exits 1, as in-process, and the Prefect task is not retried); no file
(killed, crashed, DVC's own error) raises StageFailed: transient.
"""
from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable

from kdpipe import paths
from kdpipe.config import Config, ConfigError, load_config
from kdpipe.provenance import tag_dvc_lock
from kdpipe.stages import FAILURE_FILE_ENV, failure_kind, read_failure, run_stage, stages_for
from kdpipe.tracking import check_tracking, pipeline_run

RETRIES = 2  # a stage is tried at most 1 + RETRIES times, on transient faults only
# the retry delays: 5 s, then 10 s (KDPIPE_RETRY_BACKOFF_S: another base, read at import)
RETRY_BACKOFF_S = float(os.environ.get("KDPIPE_RETRY_BACKOFF_S", 5))
RETRY_JITTER = 0.5  # each delay ±50 % (Prefect's retry_jitter_factor)


def retry_delays() -> list[float]:
    """The delay before each retry (the Prefect task's retry_delay_seconds; the CLI sleeps the same)."""
    return [RETRY_BACKOFF_S * 2 ** i for i in range(RETRIES)]


def transient(exc: BaseException) -> bool:
    """The retry rule: True unless re-running cannot fix it (config/data error, NaN stop, failed export)."""
    return isinstance(exc, Exception) and failure_kind(exc) is None


def with_retries(call: Callable[[], object], what: str):
    """``call()``, retried on transient faults like the Prefect task is (``RETRIES``, ``retry_delays``)."""
    delays = retry_delays()
    for attempt in range(RETRIES + 1):
        try:
            return call()
        except Exception as e:
            if attempt == RETRIES or not transient(e):
                raise
            delay = delays[attempt] * (1 + random.uniform(-RETRY_JITTER, RETRY_JITTER))
            print(f"[kdpipe] {what}: attempt {attempt + 1} failed ({type(e).__name__}: {e}); a transient fault: "
                  f"retrying in {delay:.0f} s", file=sys.stderr, flush=True)
            time.sleep(delay)


class StageFailed(RuntimeError):
    """``dvc repro`` (or ``dvc push``) failed without a stage's ConfigError / DataError / NaN stop /
    ExportError (KDPIPE_FAILURE_FILE): a stage killed or crashed, or DVC's own error (printed above).
    Transient under the retry rule."""


def dvc_available() -> bool:
    return Path("dvc.yaml").exists() and Path(".dvc").is_dir()


def _dvc() -> str:
    return shutil.which("dvc") or str(Path(sys.executable).parent / "dvc")


def _run(cmd: list[str], log: Callable[[str], None] | None, env: dict | None = None) -> int:
    """Run ``cmd``; without ``log`` its output goes straight to this terminal (progress bars and all).
    With ``log`` (the Prefect run logger's ``info``), its stdout and stderr are read line by line as
    they come, still written to this process's stdout / stderr, and each line is passed to ``log``.
    ``env``: added to this process's environment."""
    env = {**os.environ, **(env or {})}
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
    ``log``: also pass each output line to it (flows/pipeline.py: the Prefect run logger).
    A failed stage's ConfigError / DataError / FloatingPointError / ExportError is raised again here
    (KDPIPE_FAILURE_FILE, the module docstring); any other failure raises StageFailed."""
    cmd = [_dvc(), "repro"] + (["--single-item"] if single else []) + ([stage] if stage else [])
    with tempfile.TemporaryDirectory(prefix="kdpipe-failure-") as tmp:
        marker = Path(tmp) / "failure.json"
        rc = _run(cmd, log, env={FAILURE_FILE_ENV: str(marker)})
        failure = read_failure(marker) if rc != 0 else None
    if failure is not None:
        raise failure
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


def preflight(config: str = "params.yaml", overrides: list[str] | None = None, use_dvc: bool | None = None,
              push: bool = False) -> tuple[Config, bool]:
    """Everything that can fail before any work, for ``kdpipe run`` and the flow alike: the config,
    the route (``use_dvc`` None: DVC when params.yaml is used as it is in a DVC project), ``push``'s
    remote, dvc.yaml's data deps (DVC route), the tracking store. Returns (config, use_dvc)."""
    overrides = list(overrides or [])
    cfg = load_config(config, overrides)  # a bad parameter fails here
    plain = config == "params.yaml" and not overrides
    if use_dvc is None:
        use_dvc = plain and dvc_available()
    if use_dvc and not plain:  # dvc repro runs params.yaml: it would not run the config the parent run logs
        raise ConfigError("the DVC route runs params.yaml as it is; for another config or overrides use "
                          "'dvc exp run -S key=value' (versioned) or run without DVC ('kdpipe run --no-dvc --set ...', "
                          "'python -m flows.pipeline --no-dvc', flow parameter use_dvc=false)")
    if push:  # a run that cannot share its outputs should say so now, not hours later
        if not use_dvc:
            raise ConfigError("--push pushes what 'dvc repro' versioned: it needs the DVC route (params.yaml as it "
                              "is, in a DVC project), not --no-dvc / --config / --set")
        require_remote()
    if use_dvc:
        from kdpipe import dag

        dag.check(cfg)  # dvc.yaml's data deps must be those params.yaml needs (distill.data, teachers)
    check_tracking(cfg)  # before the parent run opens (MLflow would retry for minutes)
    return cfg, use_dvc


def run_one(stage: str, cfg: Config, use_dvc: bool, log: Callable[[str], None] | None = None) -> None:
    """One try of one stage: ``dvc repro --single-item <stage>`` or in this process (what Prefect's task wraps)."""
    if use_dvc:
        dvc_repro(stage, single=True, log=log)
    else:
        run_stage(stage, cfg)


def run_pipeline(config: str = "params.yaml", overrides: list[str] | None = None, use_dvc: bool | None = None,
                 push: bool = False, *, name: str = "pipeline", runner: tuple[str, str] = ("dvc", "in-process"),
                 tags: dict | None = None, stage_call: Callable[[str, Config, bool], None] | None = None,
                 push_call: Callable[[], str] | None = None) -> dict:
    """Preflight, then each stage of the config's DAG under one MLflow parent run (tagged
    ``kdpipe.runner`` = runner[0] on the DVC route, runner[1] in-process, plus ``tags``), the
    accuracies logged on it, then ``push`` (``dvc push`` to the default remote).
    ``stage_call(stage, cfg, use_dvc)``: one stage with its retries (default: ``run_one`` under
    ``with_retries``; the flow: its Prefect task). ``push_call()``: the push, returning the remote's name.
    Returns parent_run_id, parent (the MLflow run or None), cfg, use_dvc, summary (text), pushed (remote or None)."""
    cfg, use_dvc = preflight(config, overrides, use_dvc, push)
    if stage_call is None:
        def stage_call(stage, cfg, use_dvc):
            with_retries(lambda: run_one(stage, cfg, use_dvc), stage)
    all_tags = {"kdpipe.runner": runner[0] if use_dvc else runner[1], **(tags or {})}
    with pipeline_run(cfg, name=name, tags=all_tags) as parent:
        for stage in stages_for(cfg):
            stage_call(stage, cfg, use_dvc)
        if parent is not None and use_dvc:
            tag_dvc_lock(parent.info.run_id)  # the last stage's lock entry, written after it ended
        text = summary()
        if parent is not None:
            import mlflow

            m = json.loads((paths.REPORTS / "metrics.json").read_text())
            mlflow.log_metrics({f"{k}_accuracy": m[k]["accuracy"] for k in ("teacher", "student", "baseline")
                                if "accuracy" in m.get(k, {})})
            if m.get("data") == "none":
                mlflow.log_metrics({"fidelity_agreement": m["agreement"], "fidelity_kl": m["student"]["kl"]})
                mlflow.set_tag("kdpipe.real_data", "none")
    pushed = None
    if push:
        pushed = push_call() if push_call is not None else with_retries(dvc_push, "dvc push")
    return {"parent_run_id": parent.info.run_id if parent else None, "parent": parent, "cfg": cfg,
            "use_dvc": use_dvc, "summary": text, "pushed": pushed}
