"""MLflow tracking: one parent run per pipeline execution, one child run per stage.

The parent's id travels to stage processes (``dvc repro`` runs each stage as its own process) in
``KDPIPE_PARENT_RUN_ID``; a bare ``dvc repro`` (no kdpipe parent) gets one parent per dvc process,
found again by each stage through the ``kdpipe.invocation`` tag. Default tracking URI:
``sqlite:///mlflow.db`` in the working directory, overridden by ``tracking.uri`` or
``$MLFLOW_TRACKING_URI``.

Lineage (read back by ``kdpipe lineage``): every stage run is tagged with the git commit, the params
hash and, once DVC has written them, its dvc.lock hashes (``dvc.deps.<path>``, ``dvc.outs.<path>``);
data enters runs only through ``mlflow.log_input`` with a ``kdpipe.data_kind`` tag (real or
synthetic); model files are linked by sha256 tags (``teacher.sha256``, ``student.sha256``).

Git state, dvc detection and the dvc.lock tags: kdpipe.provenance; the model registry: kdpipe.registry."""
from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path

from kdpipe.config import Config
from kdpipe.provenance import dvc_invocation, git_state, tag_dvc_lock

PARENT_ENV = "KDPIPE_PARENT_RUN_ID"
PREFECT_ENV = "KDPIPE_PREFECT_FLOW_RUN_ID"  # set by the Prefect flow; tags every stage run


def tracking_uri(cfg: Config) -> str:
    return cfg.tracking.uri or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path.cwd() / 'mlflow.db'}"


def setup_mlflow(cfg: Config):
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

    def log_data_input(self, name: str, path, kind: str, context: str = "training") -> None:
        """A dataset input whose digest is the folder's DVC md5 (its data version in dvc.lock).
        ``kind``: "real" or "synthetic" (the data-free stages may only log synthetic inputs)."""
        if not self.mlflow:
            return
        from mlflow.data.meta_dataset import MetaDataset
        from mlflow.data.sources import LocalArtifactDatasetSource

        from kdpipe.utils import dvc_md5

        ds = MetaDataset(LocalArtifactDatasetSource(str(Path(path).resolve())), name=name, digest=dvc_md5(path))
        self.mlflow.log_input(ds, context=context, tags={"kdpipe.data_kind": kind})


def _bare_dvc_parent(mlflow, cfg: Config) -> str | None:
    """The parent run of this bare ``dvc repro`` (created by its first stage), or None."""
    key = dvc_invocation()
    if key is None:
        return None
    client = mlflow.MlflowClient()
    exp = mlflow.get_experiment_by_name(cfg.tracking.experiment).experiment_id
    found = client.search_runs([exp], f"tags.`kdpipe.invocation` = '{key}'", max_results=1)
    if found:
        return found[0].info.run_id
    tags = {"kdpipe.stage": "pipeline", "kdpipe.runner": "dvc (bare)", "kdpipe.invocation": key,
            "kdpipe.params_sha256": cfg.digest(), **git_state()}
    return client.create_run(exp, run_name="dvc-repro", tags=tags).info.run_id


@contextmanager
def stage_run(cfg: Config, stage: str):
    from kdpipe import dist

    if not cfg.tracking.enabled or not dist.is_main():  # under torchrun rank 0 alone logs
        yield Tracker()
        return
    mlflow = setup_mlflow(cfg)
    nested = mlflow.active_run() is not None  # in-process pipeline: the parent is this process's run
    parent = os.environ.get(PARENT_ENV) or None
    bare = _bare_dvc_parent(mlflow, cfg) if parent is None and not nested else None
    parent = parent or bare
    if parent:
        tag_dvc_lock(parent)  # the stages before this one, whose dvc.lock entries now exist
    tags = {"kdpipe.stage": stage, "kdpipe.params_sha256": cfg.digest(), "kdpipe.data": cfg.data.name, **git_state(),
            **({"prefect.flow_run_id": os.environ[PREFECT_ENV]} if os.environ.get(PREFECT_ENV) else {})}
    from kdpipe.utils import pick_device  # torch: stage processes only (kdpipe run drives dvc without it)

    gpu = pick_device(cfg.device).type == "cuda"  # system metrics (GPU utilisation, memory) on GPU stages
    status = "FAILED"
    try:
        with mlflow.start_run(run_name=stage, parent_run_id=parent, nested=nested, tags=tags,
                              log_system_metrics=gpu) as run:
            yield Tracker(mlflow, run)
        status = "FINISHED"
    finally:
        if bare:  # the bare-dvc parent ends with its latest stage
            mlflow.MlflowClient().set_terminated(bare, status)


@contextmanager
def pipeline_run(cfg: Config, name: str = "pipeline", tags: dict | None = None):
    """The parent run; sets KDPIPE_PARENT_RUN_ID for stage runs in this process and its children."""
    if not cfg.tracking.enabled:
        yield None
        return
    mlflow = setup_mlflow(cfg)
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


_REACHABLE: set[str] = set()  # URIs already checked in this process


def check_tracking(cfg: Config, timeout: float = 5.0) -> None:
    """Fail fast, before any work, when the tracking store cannot be reached: ConfigError (exit 2)
    naming the URI. http(s): one GET of <uri>/health (the MLflow server's liveness route), no
    retries, ``timeout`` seconds; 200 (or 401/403: there, but asks for credentials) passes. sqlite: the
    database's folder must exist (no connection: cheap). Other stores are left to MLflow."""
    if not cfg.tracking.enabled:
        return
    import urllib.error
    import urllib.request

    from kdpipe.config import ConfigError

    uri = tracking_uri(cfg)
    if uri in _REACHABLE:
        return
    hint = "start it, point tracking.uri / MLFLOW_TRACKING_URI elsewhere, or run with --set tracking.enabled=false"
    if uri.startswith(("http://", "https://")):
        try:
            urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout).close()
        except urllib.error.HTTPError as e:
            if e.code not in (401, 403):
                raise ConfigError(f"tracking server '{uri}' does not answer as an MLflow server "
                                  f"(HTTP {e.code} from {uri.rstrip('/')}/health); {hint}") from None
        except (urllib.error.URLError, OSError) as e:
            raise ConfigError(f"tracking server '{uri}' is unreachable ({getattr(e, 'reason', e)}); {hint}") from None
    elif uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///"):]).parent.is_dir():
        raise ConfigError(f"tracking uri '{uri}': folder '{Path(uri[len('sqlite:///'):]).parent}' does not exist; {hint}")
    _REACHABLE.add(uri)
