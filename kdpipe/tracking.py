"""MLflow tracking: one parent run per pipeline execution, one child run per stage.

The parent's id travels to stage processes (``dvc repro`` runs each stage as its own process) in
``KDPIPE_PARENT_RUN_ID``. Default tracking URI: ``sqlite:///mlflow.db`` in the working directory,
overridden by ``tracking.uri`` or ``$MLFLOW_TRACKING_URI``."""
from __future__ import annotations

import os
import subprocess
from contextlib import contextmanager
from pathlib import Path

from kdpipe.config import Config

PARENT_ENV = "KDPIPE_PARENT_RUN_ID"


def tracking_uri(cfg: Config) -> str:
    return cfg.tracking.uri or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path.cwd() / 'mlflow.db'}"


def git_state() -> dict:
    def git(*args):
        r = subprocess.run(["git", *args], capture_output=True, text=True)
        return r.stdout.strip() if r.returncode == 0 else ""

    commit = git("rev-parse", "HEAD")
    return {"git.commit": commit or "none", "git.dirty": str(bool(git("status", "--porcelain", "--untracked-files=no")))}


def _setup(cfg: Config):
    import mlflow

    uri = tracking_uri(cfg)
    mlflow.set_tracking_uri(uri)
    if mlflow.get_experiment_by_name(cfg.tracking.experiment) is None:
        loc = (Path.cwd() / "mlartifacts").as_uri() if uri.startswith("sqlite:") else None
        mlflow.create_experiment(cfg.tracking.experiment, artifact_location=loc)
    mlflow.set_experiment(cfg.tracking.experiment)
    return mlflow


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        out.update(_flat(v, key + ".") if isinstance(v, dict) else {key: v})
    return out


class Tracker:
    """The active stage's MLflow run (or nothing, with tracking.enabled: false)."""

    def __init__(self, mlflow=None, run=None):
        self.mlflow, self.run = mlflow, run

    @property
    def run_id(self) -> str | None:
        return self.run.info.run_id if self.run else None

    def log_params(self, params: dict) -> None:
        if self.mlflow:
            self.mlflow.log_params(_flat(params))

    def log_metrics(self, metrics: dict, step: int | None = None) -> None:
        if self.mlflow:
            self.mlflow.log_metrics({k: float(v) for k, v in metrics.items()}, step=step)

    def log_artifact(self, path, artifact_path: str | None = None) -> None:
        if self.mlflow:
            self.mlflow.log_artifact(str(path), artifact_path)

    def set_tags(self, tags: dict) -> None:
        if self.mlflow:
            self.mlflow.set_tags({k: str(v) for k, v in tags.items()})


@contextmanager
def stage_run(cfg: Config, stage: str):
    if not cfg.tracking.enabled:
        yield Tracker()
        return
    mlflow = _setup(cfg)
    parent = os.environ.get(PARENT_ENV) or None
    tags = {"kdpipe.stage": stage, "kdpipe.params_sha256": cfg.digest(), **git_state()}
    nested = mlflow.active_run() is not None  # in-process pipeline: the parent is this process's run
    with mlflow.start_run(run_name=stage, parent_run_id=parent, nested=nested, tags=tags) as run:
        yield Tracker(mlflow, run)


@contextmanager
def pipeline_run(cfg: Config, name: str = "pipeline", tags: dict | None = None):
    """The parent run; sets KDPIPE_PARENT_RUN_ID for stage runs in this process and its children."""
    if not cfg.tracking.enabled:
        yield None
        return
    mlflow = _setup(cfg)
    all_tags = {"kdpipe.stage": "pipeline", "kdpipe.params_sha256": cfg.digest(), **git_state(), **(tags or {})}
    with mlflow.start_run(run_name=name, tags=all_tags) as run:
        mlflow.log_params(_flat(cfg.model_dump(mode="json")))
        old = os.environ.get(PARENT_ENV)
        os.environ[PARENT_ENV] = run.info.run_id
        try:
            yield run
        finally:
            if old is None:
                os.environ.pop(PARENT_ENV, None)
            else:
                os.environ[PARENT_ENV] = old
