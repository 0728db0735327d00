"""Shared fixtures: a tiny real project (git + dvc) that the end-to-end tests run for real."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

# torch picks its CPU kernels by instruction set, so the same code gives other bits on other CPUs. These two
# caps made an AVX-512/VNNI EPYC give the AVX2 EPYC's bits (ATEN_CPU_CAPABILITY caps ATen's kernels,
# ONEDNN_MAX_CPU_ISA oneDNN's convolutions), but not an Intel Xeon with AMX (MKL takes other paths on Intel):
# golden values across machines are therefore compared with a tolerance (test_routes.py says how much), and
# bit-identity is only asserted within one machine (resume, DVC cache, same-seed reruns). The caps stay so that
# figures measured on AVX2 keep holding where they can. Both are read when torch first runs a kernel, so they
# are set here, before any test imports torch; the dvc/Prefect subprocesses of the end-to-end tests inherit
# them. Set either yourself to override.
os.environ.setdefault("ATEN_CPU_CAPABILITY", "avx2")
os.environ.setdefault("ONEDNN_MAX_CPU_ISA", "AVX2")

ROOT = Path(__file__).resolve().parents[1]
BIN = str(Path(sys.executable).parent)

# Small enough for a 2-core CI machine; every stage still does its real job.
TINY = {
    "teacher": {"epochs": 3},
    "baseline": {"epochs": 2},
    "synthesize": {"rounds": 3, "batch_size": 64, "capacity": 192, "g_steps": 2, "kd_steps": 2, "warmup_rounds": 1},
    "distill": {"epochs": 2, "batch_size": 64},
}


def tiny_params() -> dict:
    p = yaml.safe_load((ROOT / "params.yaml").read_text())
    for section, values in TINY.items():
        p[section].update(values)
    return p


def project_env(tmp: Path) -> dict:
    env = os.environ.copy()
    env["PATH"] = BIN + os.pathsep + env.get("PATH", "")
    env["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp / 'mlflow.db'}"
    env["PREFECT_HOME"] = str(tmp / ".prefect")
    env["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
    env["PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"] = "180"
    env["GIT_AUTHOR_NAME"] = env["GIT_COMMITTER_NAME"] = "kdpipe test"
    env["GIT_AUTHOR_EMAIL"] = env["GIT_COMMITTER_EMAIL"] = "test@kdpipe.local"
    env.pop("KDPIPE_PARENT_RUN_ID", None)
    return env


def make_project(dest: Path) -> Path:
    """A real git + dvc repo holding the pipeline (dvc.yaml, tiny params.yaml, the kdpipe sources)."""
    dest.mkdir(parents=True, exist_ok=True)
    for pkg in ("kdpipe", "flows"):
        shutil.copytree(ROOT / pkg, dest / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    for f in ("dvc.yaml", "prefect.yaml"):
        shutil.copy(ROOT / f, dest / f)
    (dest / "params.yaml").write_text(yaml.safe_dump(tiny_params(), sort_keys=False))
    (dest / ".gitignore").write_text("mlflow.db\nmlartifacts/\n.prefect/\n__pycache__/\n")
    env = project_env(dest)
    for cmd in (["git", "init", "-q"], ["dvc", "init", "-q"], ["dvc", "config", "core.analytics", "false"],
                ["git", "add", "-A"], ["git", "commit", "-qm", "init"]):
        subprocess.run(cmd, cwd=dest, env=env, check=True, capture_output=True)
    return dest


def run(cmd, cwd, env=None, timeout=600, check=True):
    r = subprocess.run(cmd, cwd=cwd, env=env or project_env(Path(cwd)), capture_output=True, text=True, timeout=timeout)
    if check and r.returncode != 0:
        raise AssertionError(f"{cmd} failed ({r.returncode}):\n{r.stdout[-4000:]}\n{r.stderr[-4000:]}")
    return r


@pytest.fixture(scope="session")
def dvc_project(tmp_path_factory):
    """The tiny project after one real `kdpipe run` (dvc repro under one MLflow parent run)."""
    proj = make_project(tmp_path_factory.mktemp("proj"))
    r = run([BIN + "/kdpipe", "run"], proj)
    return proj, r


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module whose golden values were measured with one thread (results do
    not depend on the machine's core count); use with pytestmark = pytest.mark.usefixtures("one_thread")."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
