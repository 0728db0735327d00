"""The kdpipe DAG as a Prefect 3 flow: one task per stage, the same stage code as ``dvc repro``.

How a Prefect run and ``dvc repro`` share outputs: with ``use_dvc`` (the default inside a DVC project
when the config is params.yaml as it is), each task runs ``dvc repro --single-item <stage>``, so a
scheduled run versions its data exactly as a manual ``dvc repro`` does and skips stages whose deps
and params did not change. Otherwise (another config, overrides, no DVC project) each task calls the
stage in-process; ``use_dvc=True`` with another config or overrides is refused before any work (as
``kdpipe run --dvc --set`` is: use ``dvc exp run -S`` for a versioned variant). Either way one MLflow
parent run spans the flow run (with the accuracies, like ``kdpipe run``'s), one child run per stage,
each tagged with the Prefect flow-run id; the flow's result is also a Prefect markdown artifact.
The flow is kdpipe/pipeline.py's ``run_pipeline`` (the orchestrator ``kdpipe run`` calls: the same
preflight, DAG and parent run); Prefect only wraps the per-stage call as a task, whose retries follow
the same rule (``kdpipe.pipeline.transient``: transient faults only, never a config/data error or a
NaN stop; a stage under ``dvc repro`` reports its kind of failure through KDPIPE_FAILURE_FILE).
Each ``dvc repro`` line (DVC's and the stage's own output) goes to the Prefect run log as it comes.
``push=True``: after the stages, ``dvc push`` to the project's default DVC remote (docs/scaling.md).

    python -m flows.pipeline [--config FILE] [--set key=value ...] [--no-dvc] [--push]
    kdpipe serve --cron "0 3 * * *" [--config FILE] [--set ...]     (a scheduled deployment: flow.serve)
    prefect deploy --all                                              (prefect.yaml: a work-pool deployment)
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from contextlib import contextmanager

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
# the ephemeral server migrates its database on first start: slow on a busy 2-core machine
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")

from prefect import flow, get_run_logger, task  # noqa: E402
from prefect.artifacts import create_markdown_artifact  # noqa: E402
from prefect.runtime import flow_run  # noqa: E402

from kdpipe import paths  # noqa: E402
from kdpipe.config import Config  # noqa: E402
from kdpipe.pipeline import (RETRIES, RETRY_JITTER, dvc_push, retry_delays, routes, run_one,  # noqa: E402
                             run_pipeline, summary, transient)
from kdpipe.tracking import PREFECT_ENV, tracking_uri  # noqa: E402


def _transient(task, task_run, state) -> bool:
    """Prefect's retry_condition_fn: kdpipe.pipeline.transient on the task's exception."""
    try:
        state.result()
    except BaseException as e:  # noqa: BLE001 (the failure itself, judged by the one retry rule)
        return transient(e)
    return False


# kdpipe.pipeline's retry rule and delays (~5 s, then ~10 s): the same as `kdpipe run`
@task(task_run_name="{stage}", retries=RETRIES, retry_delay_seconds=retry_delays(),
      retry_jitter_factor=RETRY_JITTER, retry_condition_fn=_transient)
def stage_task(stage: str, cfg: Config, use_dvc: bool) -> None:
    run_one(stage, cfg, use_dvc, log=get_run_logger().info if use_dvc else None)  # dvc's lines into the run's logs


@task(name="dvc-push", retries=RETRIES, retry_delay_seconds=retry_delays(),
      retry_jitter_factor=RETRY_JITTER, retry_condition_fn=_transient)
def push_task() -> str:
    """``dvc push`` to the default remote (a remote briefly unreachable: retried like a stage)."""
    return dvc_push(log=get_run_logger().info)


# A hung run (a stuck collective, a dead NFS mount, a remote that never answers) would hold the
# deployment's only concurrency slot (prefect.yaml: concurrency_limit 1) and queue every later nightly
# run behind it. 6 h is generous on purpose: the test project takes minutes, a real run of the nightly
# schedule must still fit, and a hung 03:00 run is ended long before the next one is due.
# KDPIPE_FLOW_TIMEOUT_S (seconds; read when the flow is imported, e.g. from a work pool's
# job_variables.env) sets another bound, e.g. for long real-data runs.
FLOW_TIMEOUT_S = float(os.environ.get("KDPIPE_FLOW_TIMEOUT_S", 6 * 3600))


@contextmanager
def _env(key: str, value: str):
    old = os.environ.get(key)
    os.environ[key] = value
    try:
        yield
    finally:
        os.environ.pop(key, None) if old is None else os.environ.__setitem__(key, old)


def _report(parent, uri: str) -> str:
    """The flow's result as markdown: accuracy table, ONNX parity, where the MLflow run is."""
    m = json.loads((paths.REPORTS / "metrics.json").read_text())
    e = json.loads((paths.EXPORT / "metrics.json").read_text())
    if m.get("data") == "none":  # a teacher-only project: the summary's fidelity lines
        md = "# kdpipe run\n\n```\n" + summary() + "\n```\n"
    else:
        rows = "".join(f"| {model} | {route} | {acc:.4f} |\n" for model, route, acc in routes(m, e))  # routes side by side
        md = (f"# kdpipe run\n\nAccuracy on the real test split (n={m['n_test']}):\n\n| model | route | accuracy |\n|---|---|---|\n{rows}"
              f"\nTeacher-student agreement {m['agreement']:.4f}. ONNX vs PyTorch: max abs diff {e['max_abs_diff']:.1e}, "
              f"top-1 agreement {e['top1_agreement']:.4f}.\n")
    if parent is not None:
        run_id, exp = parent.info.run_id, parent.info.experiment_id
        link = f"{uri.rstrip('/')}/#/experiments/{exp}/runs/{run_id}" if uri.startswith("http") else f"`{uri}`"
        md += f"\nMLflow parent run `{run_id}` (experiment {exp}): {link}\n"
    return md


@flow(name="kdpipe-pipeline", log_prints=True, timeout_seconds=FLOW_TIMEOUT_S)
def pipeline(config: str = "params.yaml", overrides: list[str] | None = None, use_dvc: bool | None = None,
             push: bool = False) -> str:
    fr = flow_run.get_id() or ""
    with _env(PREFECT_ENV, fr):  # tags every stage run (in this process and under dvc repro)
        res = run_pipeline(config, overrides, use_dvc, push, name="prefect", runner=("prefect+dvc", "prefect"),
                           tags={"prefect.flow_run_id": fr}, stage_call=stage_task, push_call=push_task)
    create_markdown_artifact(markdown=_report(res["parent"], tracking_uri(res["cfg"])), key="kdpipe-summary",
                             description="kdpipe: accuracy, ONNX parity, MLflow run")
    if res["pushed"]:
        print(f"outputs pushed to DVC remote '{res['pushed']}'")
    print(res["summary"])
    return res["summary"]


def serve(name: str = "kdpipe-scheduled", cron: str = "0 3 * * *", timezone: str = "UTC",
          config: str = "params.yaml", overrides: list[str] | None = None) -> None:
    """Serve the flow as a deployment with a cron schedule; blocks, running scheduled and triggered
    runs in subprocesses of this process (in its working directory: the project)."""
    from prefect.deployments.runner import EntrypointType
    from prefect.schedules import Cron

    pipeline.serve(name=name, schedules=[Cron(cron, timezone=timezone)], tags=["kdpipe"],
                   parameters={"config": config, "overrides": list(overrides or [])},
                   description="kdpipe: synthesize -> distill -> evaluate -> export, on schedule",
                   entrypoint_type=EntrypointType.MODULE_PATH)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m flows.pipeline", description=__doc__.splitlines()[0])
    p.add_argument("--config", default="params.yaml", help="YAML config (default: params.yaml); another config runs "
                   "the tasks in this process, writing the same data/ folders (not versioned by DVC)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one parameter, e.g. --set distill.temperature=8 (repeatable; 'kdpipe params' lists "
                        "the keys); like --config, switches the tasks to in-process runs")
    p.add_argument("--no-dvc", dest="use_dvc", action="store_false", default=None,
                   help="run the stages in this process (default: each task is 'dvc repro --single-item <stage>' "
                        "when params.yaml is used unmodified in a DVC project)")
    p.add_argument("--push", action="store_true", help="after the stages, 'dvc push' to the default DVC remote")
    a = p.parse_args(argv)
    pipeline(a.config, a.overrides, a.use_dvc, a.push)
    return 0


if __name__ == "__main__":
    sys.exit(main())
