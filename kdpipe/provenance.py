"""Provenance: the git state of the code (``git_state``), whether this process runs under a bare
``dvc repro`` / ``dvc exp run`` (``dvc_invocation``), and the dvc.lock hashes copied onto finished stage
runs as MLflow tags (``tag_dvc_lock``). kdpipe.tracking imports this module, never the reverse (the
bare-dvc parent run, which opens an MLflow run, lives in tracking)."""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

import yaml


def git_state() -> dict:
    def git(*args):
        r = subprocess.run(["git", *args], capture_output=True, text=True)
        return r.stdout.strip() if r.returncode == 0 else ""

    commit = git("rev-parse", "HEAD")
    if not commit:  # no repository (a container image built without .git): the commit it was built from, if given
        dirty = os.environ.get("KDPIPE_GIT_DIRTY", "").lower() in ("true", "1")
        return {"git.commit": os.environ.get("KDPIPE_GIT_COMMIT") or "none", "git.dirty": str(dirty)}
    return {"git.commit": commit, "git.dirty": str(bool(git("status", "--porcelain", "--untracked-files=no")))}


def dvc_invocation() -> str | None:
    """Under a bare ``dvc repro`` / ``dvc exp run``: "<pid>-<start time>" of that dvc process."""
    import psutil

    try:
        p = psutil.Process().parent()
        while p is not None:
            cmd = p.cmdline()
            if any(Path(c).name == "dvc" for c in cmd[:2]) and ("repro" in cmd or "exp" in cmd):
                return f"{p.pid}-{p.create_time():.0f}"
            p = p.parent()
    except psutil.Error:
        pass
    return None


def tag_dvc_lock(parent_run_id: str, lock: str | Path = "dvc.lock") -> None:
    """Tag each finished stage run under ``parent_run_id`` with its stage's dvc.lock hashes, as
    ``dvc.deps.<path>`` / ``dvc.outs.<path>`` = md5. DVC writes a stage's lock entry when the stage
    command has finished, so this runs after stages (next stage's start, end of the pipeline)."""
    import mlflow

    if not Path(lock).exists():
        return
    stages = (yaml.safe_load(Path(lock).read_text()) or {}).get("stages", {})
    client = mlflow.MlflowClient()
    parent = client.get_run(parent_run_id)
    for r in client.search_runs([parent.info.experiment_id], f"tags.`mlflow.parentRunId` = '{parent_run_id}'"):
        entry = stages.get(r.data.tags.get("kdpipe.stage"))
        if not entry or r.info.status != "FINISHED" or "dvc.tagged" in r.data.tags:
            continue
        tags = {f"dvc.{kind}.{d['path']}": d.get("md5", "") for kind in ("deps", "outs") for d in entry.get(kind, [])}
        for k, v in {**tags, "dvc.tagged": "true"}.items():
            client.set_tag(r.info.run_id, k, v)
