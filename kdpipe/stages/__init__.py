"""The stages, in DAG order. ``run_stage`` is the one way any caller (CLI, dvc repro, Prefect)
executes a stage: it opens the stage's MLflow child run and prints the one-line summary.

A stage that fails for a reason re-running cannot fix (a config or data error, a NaN stop, an export
that failed its check) also writes its kind of failure to the file named by ``KDPIPE_FAILURE_FILE``
when that is set: kdpipe.pipeline sets it for the ``dvc repro`` it starts, and reads it back to tell
such a failure from a transient one (kdpipe/pipeline.py's docstring: the retry rule)."""
from __future__ import annotations

import contextlib
import importlib
import json
import os
import time

from kdpipe.config import Config

STAGES = ["prepare", "train-teacher", "baseline", "synthesize", "distill", "evaluate", "export"]
# stages that must never read the real data (distill only on its default route, distill.data: synthetic)
DATA_FREE = {"synthesize", "distill"}
FAILURE_FILE_ENV = "KDPIPE_FAILURE_FILE"


def stages_for(cfg: Config) -> list[str]:
    """The DAG of this config: without real data (data.name: none) synthesize → distill → evaluate → export;
    a teacher from its card (teacher.source) has no train-teacher stage."""
    if cfg.data.name == "none":
        return ["synthesize", "distill", "evaluate", "export"]
    return [s for s in STAGES if not (s == "train-teacher" and cfg.teacher.source)]


def data_free_stage(name: str, cfg: Config) -> bool:
    """Whether this stage run is data-free: synthesize always, distill unless distill.data is real|mixed."""
    return name in DATA_FREE and not (name == "distill" and cfg.distill.data != "synthetic")


def _check_dvc_deps(name: str, cfg: Config) -> None:
    """Under dvc repro / dvc exp run: the stage's data deps in dvc.yaml must be those the config
    needs (kdpipe/dag.py), e.g. data/prepared for distill.data real|mixed (ConfigError otherwise)."""
    from pathlib import Path

    from kdpipe import dag
    from kdpipe.provenance import dvc_invocation

    if name in dag.RENDERED and Path("dvc.yaml").exists() and dvc_invocation() is not None:
        dag.check(cfg)


# a fault in the code (or in the installed packages) itself: the same inputs fail the same way
CODE_ERRORS = (AttributeError, TypeError, NameError, ImportError, AssertionError, NotImplementedError)


def _permanent_kinds() -> dict:
    """The failures re-running cannot fix, by the kind name a stage writes to KDPIPE_FAILURE_FILE."""
    from kdpipe.config import ConfigError
    from kdpipe.errors import DataError, ExportError

    return {"config": ConfigError, "data": DataError, "stopped": FloatingPointError, "export": ExportError,
            "code": CODE_ERRORS}


def failure_kind(exc: BaseException) -> str | None:
    """"config" | "data" | "stopped" (NaN/inf) | "export" | "code" for a failure re-running cannot fix, else None."""
    return next((k for k, cls in _permanent_kinds().items() if isinstance(exc, cls)), None)


def read_failure(path) -> Exception | None:
    """The failure a stage wrote to ``path`` (KDPIPE_FAILURE_FILE), as the exception it raised, or None."""
    try:
        from pathlib import Path

        rec = json.loads(Path(path).read_text())
        cls = _permanent_kinds()[rec["kind"]]
        return (cls[0] if isinstance(cls, tuple) else cls)(rec["message"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def run_stage(name: str, cfg: Config) -> dict:
    try:
        return _run_stage(name, cfg)
    except Exception as e:
        path, kind = os.environ.get(FAILURE_FILE_ENV), failure_kind(e)
        if path and kind:
            with contextlib.suppress(OSError):
                with open(path, "w") as f:
                    msg = f"{type(e).__name__}: {e}" if kind == "code" else str(e)  # the type, kept in the text
                    json.dump({"stage": name, "kind": kind, "message": msg}, f)
        raise


def _run_stage(name: str, cfg: Config) -> dict:
    from kdpipe.data import data_free
    from kdpipe.tracking import check_tracking, stage_run

    if name not in STAGES:
        raise ValueError(f"unknown stage '{name}'; stages: {', '.join(STAGES)}")
    if name not in stages_for(cfg):
        from kdpipe.config import ConfigError

        why = "data.name is 'none' (no real data)" if cfg.data.name == "none" else "the teacher comes from its card (teacher.source)"
        raise ConfigError(f"stage '{name}' is not part of this project's DAG: {why}; its stages: {', '.join(stages_for(cfg))}")
    module = importlib.import_module(f"kdpipe.stages.{name.replace('-', '_')}")
    check_tracking(cfg)  # an unreachable tracking server fails here, before any work (exit 2)
    _check_dvc_deps(name, cfg)
    free = data_free_stage(name, cfg)
    guard = data_free(name, cfg.data.private) if free else contextlib.nullcontext()
    t0 = time.perf_counter()
    with stage_run(cfg, name) as tracker, guard:
        if name in DATA_FREE:  # the guarantee, recorded: this run could not read the real data (or, distill: it did)
            tracker.set_tags({"kdpipe.privacy": "data-free" if free else "real-data", "data.private": cfg.data.private})
        summary = module.run(cfg, tracker)
        wall = time.perf_counter() - t0
        tracker.log_metrics({"stage_wall_s": wall})
    print(f"[kdpipe] {name:<13} {wall:6.1f}s  " + "  ".join(f"{k}={v}" for k, v in summary.items()), flush=True)
    return summary
