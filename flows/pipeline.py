"""The kdpipe DAG as a Prefect 3 flow: one task per stage, the same stage code as ``dvc repro``.

How a Prefect run and ``dvc repro`` share outputs: with ``use_dvc`` (the default inside a DVC project
when the config is params.yaml as it is), each task runs ``dvc repro --single-item <stage>``, so a
scheduled run versions its data exactly as a manual ``dvc repro`` does and skips stages whose deps
and params did not change. Otherwise (another config, overrides, no DVC project) each task calls the
stage in-process. Either way one MLflow parent run spans the flow run, one child run per stage.

    python -m flows.pipeline [--config FILE] [--set key=value ...] [--no-dvc]
"""
from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
# the ephemeral server migrates its database on first start: slow on a busy 2-core machine
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")

from prefect import flow, task  # noqa: E402
from prefect.runtime import flow_run  # noqa: E402

from kdpipe.config import load_config  # noqa: E402
from kdpipe.pipeline import dvc_available, dvc_repro, summary  # noqa: E402
from kdpipe.stages import STAGES, run_stage  # noqa: E402
from kdpipe.tracking import pipeline_run  # noqa: E402


@task(task_run_name="{stage}", retries=1, retry_delay_seconds=5)
def stage_task(stage: str, config: str, overrides: list[str], use_dvc: bool) -> None:
    if use_dvc:
        dvc_repro(stage, single=True)
    else:
        run_stage(stage, load_config(config, overrides))


@flow(name="kdpipe-pipeline", log_prints=True)
def pipeline(config: str = "params.yaml", overrides: list[str] | None = None, use_dvc: bool | None = None) -> str:
    overrides = list(overrides or [])
    cfg = load_config(config, overrides)  # fails before any work on a bad parameter
    plain = config == "params.yaml" and not overrides
    if use_dvc is None:
        use_dvc = plain and dvc_available()
    tags = {"kdpipe.runner": "prefect+dvc" if use_dvc else "prefect", "prefect.flow_run_id": flow_run.get_id() or ""}
    with pipeline_run(cfg, name="prefect", tags=tags):
        for stage in STAGES:
            stage_task(stage, config, overrides, use_dvc)
        text = summary()
    print(text)
    return text


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m flows.pipeline", description=__doc__.splitlines()[0])
    p.add_argument("--config", default="params.yaml")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--no-dvc", dest="use_dvc", action="store_false", default=None)
    a = p.parse_args(argv)
    pipeline(a.config, a.overrides, a.use_dvc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
