"""Fault suite (issue 7), for real on a tiny digits project: bad inputs -> one message and exit 2
with every output file unchanged; NaN/inf -> a clean stop (exit 1) naming stage, step and term;
kill -9 mid-stage -> the re-run resumes and ends bit-identical; the data-free stages with the real
data moved away -> the identical synthetic set; an unreachable tracking server; the memorization audit.

Torch runs single-threaded here (and OMP_NUM_THREADS=1 in subprocesses): faster for these tiny
models on a shared 2-core machine, and the same thread count in-process and in subprocesses keeps
the CPU results bit-identical between them."""
from __future__ import annotations

import contextlib
import hashlib
import os
import pickle
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from conftest import BIN, TINY, project_env
from kdpipe.cli import main as cli
from kdpipe.config import Config, ConfigError, load_config
from kdpipe.utils import load_json, load_torch, save_torch

# long enough (40 rounds / 40 epochs of 12 steps) for a kill after the first checkpoint to land mid-stage
OVERRIDES = {**TINY, "synthesize": {**TINY["synthesize"], "rounds": 40}, "distill": {"epochs": 40, "batch_size": 16},
             "resume": {"every": 1}, "tracking": {"enabled": False}}


pytestmark = pytest.mark.usefixtures("one_thread")  # golden values are one-thread figures (conftest.py)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """prepare, train-teacher, synthesize, distill: the uninterrupted reference outputs."""
    from kdpipe.stages import run_stage

    root = tmp_path_factory.mktemp("faults")
    tree = Config().model_dump(mode="json")
    for section, values in OVERRIDES.items():
        tree[section].update(values)
    (root / "params.yaml").write_text(yaml.safe_dump(tree, sort_keys=False))
    with contextlib.chdir(root):
        cfg = load_config("params.yaml")
        for stage in ("prepare", "train-teacher", "synthesize", "distill"):
            run_stage(stage, cfg)
    assert not (root / "data/.resume").exists() or not any((root / "data/.resume").iterdir())
    return root


@pytest.fixture
def proj(base, tmp_path, monkeypatch):
    """A copy of the reference project, as the working directory."""
    p = tmp_path / "p"
    shutil.copytree(base, p)
    monkeypatch.chdir(p)
    return p


def snapshot(root: Path) -> dict:
    return {str(f.relative_to(root)): hashlib.sha256(f.read_bytes()).hexdigest()
            for f in sorted((root / "data").rglob("*")) if f.is_file() and ".resume" not in f.parts}


def same_tensors(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ------------------------------------------------------------------ bad input: exit 2, nothing overwritten
def _images(root: Path, classes=("a", "b"), n=6, size=10, mode="L"):
    rng = np.random.default_rng(0)
    for c in classes:
        (root / "train" / c).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            shape = (size, size) + (() if mode == "L" else (3,))
            Image.fromarray(rng.integers(0, 255, shape, dtype=np.uint8), mode).save(root / "train" / c / f"{i}.png")
    return root


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def _setup(case: str, p: Path) -> list[str]:
    """Creates the bad input in project ``p``; returns the kdpipe arguments that meet it."""
    folder = ["prepare", "--set", "data.name=imagefolder", "--set", f"data.root={p / 'imgs'}"]
    if case == "ill-typed param":
        return ["distill", "--set", "distill.epochs=many"]
    if case == "data root missing":
        return folder
    if case == "data root empty":
        (p / "imgs/train/a").mkdir(parents=True)
        return folder
    if case == "one class":
        _images(p / "imgs", classes=("a",))
        return folder
    if case == "mixed sizes":
        _images(p / "imgs")
        Image.fromarray(np.zeros((12, 12), np.uint8)).save(p / "imgs/train/b/odd.png")
        return folder
    if case == "mixed channels":
        _images(p / "imgs")
        Image.fromarray(np.zeros((10, 10, 3), np.uint8), "RGB").save(p / "imgs/train/b/rgb.png")
        return folder
    ckpt = ["train-teacher", "--set", f"teacher.checkpoint={p / 'ckpt.pt'}"]
    if case == "checkpoint truncated":
        blob = (p / "data/teacher/model.pt").read_bytes()
        (p / "ckpt.pt").write_bytes(blob[: len(blob) // 2])
    elif case == "not a checkpoint":
        (p / "ckpt.pt").write_text("teacher weights, honest\n")
    elif case == "pickle carrying code":
        (p / "ckpt.pt").write_bytes(pickle.dumps({"net.0.weight": _Evil()}))
    elif case == "checkpoint of another arch":
        shutil.copy(p / "data/student/model.pt", p / "ckpt.pt")
    elif case == "checkpoint with NaN weights":
        sd = load_torch(p / "data/teacher/model.pt")
        sd["net.0.weight"][0, 0, 0, 0] = float("nan")
        save_torch(sd, p / "ckpt.pt")
    elif case == "export: student input spec != data":
        assert cli(["prepare", "--set", "data.image_size=16"]) == 0  # the data changed after distill
        return ["export"]
    elif case == "prepared split cut short":  # val.pt from another prepare run than meta.json
        val = load_torch(p / "data/prepared/val.pt")
        save_torch({**val, "y": val["y"].roll(1)}, p / "data/prepared/val.pt")
        return ["train-teacher"]
    elif case == "synthetic set cut short":  # samples.pt from another run than meta.json
        syn = load_torch(p / "data/synthetic/samples.pt")
        save_torch({**syn, "x": syn["x"].flip(-1)}, p / "data/synthetic/samples.pt")
        return ["distill"]
    elif case == "evaluate: baseline stage not run":  # the reference project ran no baseline
        return ["evaluate"]
    elif case == "tracking server down":
        with socket.socket() as s:  # a port nobody listens on
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        return ["distill", "--set", "tracking.enabled=true", "--set", f"tracking.uri=http://127.0.0.1:{port}"]
    return ckpt


BAD = {
    "ill-typed param": "key 'distill.epochs'",
    "data root missing": "imgs' does not exist",
    "data root empty": "holds no images",
    "one class": "1 class(es) with images",
    "mixed sizes": "images of mixed sizes",
    "mixed channels": "images of mixed channels",
    # (torch's own reason sits between the two halves: it changes with the torch version)
    "checkpoint truncated": ("ckpt.pt' is not a loadable weights-only checkpoint: ", " (truncated?)"),
    "not a checkpoint": ("ckpt.pt' is not a loadable weights-only checkpoint: ", " (not a file written by torch.save)"),
    "pickle carrying code": ("ckpt.pt' is not a loadable weights-only checkpoint: Unsupported ",
                             " (refused: only tensors and containers are loaded, never code)"),
    "checkpoint of another arch": "does not fit teacher.arch: missing keys",
    "checkpoint with NaN weights": "holds NaN/inf weights in ['net.0.weight']",
    "export: student input spec != data": "takes 1x8x8 input",
    "prepared split cut short": "val.pt' does not match its sha256 in 'data/prepared/meta.json'",
    "synthetic set cut short": "samples.pt' does not match the sha256",
    "evaluate: baseline stage not run": "data/baseline/spec.json' is missing: run the baseline stage first",
    "tracking server down": "is unreachable",
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_exit_2_one_line_nothing_overwritten(case, proj, capsys):
    argv = _setup(case, proj)
    before = snapshot(proj)
    capsys.readouterr()
    t0 = time.perf_counter()
    rc = cli(argv)
    wall = time.perf_counter() - t0
    err = capsys.readouterr().err
    assert rc == 2, err
    parts = BAD[case] if isinstance(BAD[case], tuple) else (BAD[case],)
    assert err.startswith("kdpipe: error: ") and err.count("\n") == 1 and all(x in err for x in parts), err
    assert snapshot(proj) == before
    assert not (proj / "pwned").exists()
    assert wall < 10, f"{case}: {wall:.1f}s before failing"
    if case == "tracking server down":
        assert argv[-1].split("=", 1)[1] in err  # the URI


# ------------------------------------------------------------------ NaN / inf: a clean stop, exit 1
def _nan_teacher(p: Path):
    sd = load_torch(p / "data/teacher/model.pt")
    sd["net.0.weight"].fill_(float("nan"))
    save_torch(sd, p / "data/teacher/model.pt")


@pytest.mark.parametrize("argv, setup, message", [
    (["train-teacher", "--set", "teacher.lr=1e6"], None, "train-teacher: non-finite loss at step"),
    (["distill", "--set", "distill.lr=1e6"], None, "distill (epoch"),
    (["synthesize"], _nan_teacher, "synthesize (generator, round 0): non-finite loss at step 0: total=nan, ce=nan"),
], ids=["teacher-lr-1e6", "distill-lr-1e6", "synthesize-nan-teacher"])
def test_nan_stops_the_stage_cleanly(argv, setup, message, proj, capsys):
    if setup:
        setup(proj)
    before = snapshot(proj)
    capsys.readouterr()
    rc = cli(argv)
    err = capsys.readouterr().err
    assert rc == 1 and "Traceback" not in err
    line = err.strip().splitlines()[-1]
    assert line.startswith("kdpipe: stopped: ") and message in line and "=nan" in line, err
    assert snapshot(proj) == before  # earlier outputs kept


# ------------------------------------------------------------------ resume
def _wait_and_kill(p: subprocess.Popen, ckpt: Path, timeout: float = 120) -> None:
    t0 = time.time()
    while not ckpt.exists():
        assert p.poll() is None, f"finished before a resume checkpoint appeared:\n{p.communicate()}"
        assert time.time() - t0 < timeout
        time.sleep(0.01)
    p.send_signal(signal.SIGKILL)
    p.wait()


@pytest.mark.slow
@pytest.mark.parametrize("stage, out, file, total", [
    ("train-teacher", "teacher", "model.pt", TINY["teacher"]["epochs"]),
    ("synthesize", "synthetic", "samples.pt", OVERRIDES["synthesize"]["rounds"]),
    ("distill", "student", "model.pt", OVERRIDES["distill"]["epochs"]),
])
def test_kill_9_then_resume_ends_identical(stage, out, file, total, base, proj, tmp_path):
    """`kdpipe <stage>` killed with SIGKILL after its first resume checkpoint; the re-run says it
    resumed and ends with the same tensors as the uninterrupted reference run. synthesize and
    distill run with the real data moved away (the data-free stages never need it)."""
    shutil.rmtree(proj / "data" / out)
    if stage != "train-teacher":
        shutil.move(proj / "data/prepared", tmp_path / "moved-away")
    env = {**project_env(proj), "OMP_NUM_THREADS": "1"}
    track = ["--set", "tracking.enabled=true"] if stage == "distill" else []  # one MLflow check, not three
    ckpt = proj / f"data/.resume/{stage}.pt"
    killed = subprocess.Popen([BIN + "/kdpipe", stage, *track], cwd=proj, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_and_kill(killed, ckpt)
    assert killed.returncode == -signal.SIGKILL
    done = load_torch(ckpt)["done"]
    assert 1 <= done < total
    assert not (proj / "data" / out / file).exists()  # nothing half-written that a later stage would take
    r = subprocess.run([BIN + "/kdpipe", stage, *track], cwd=proj, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"{stage}: resumed from data/.resume/{stage}.pt after" in r.stdout
    assert not ckpt.exists()  # deleted once the outputs are written
    assert same_tensors(load_torch(proj / "data" / out / file), load_torch(base / "data" / out / file))
    if stage == "synthesize":
        sha = [load_json(q / "data/synthetic/meta.json")["sha256"] for q in (proj, base)]
        assert sha[0] == sha[1]  # the same synthetic set without the real data, killed and resumed
    if stage == "distill":
        assert (proj / "data/student/history.csv").read_text() == (base / "data/student/history.csv").read_text()
        from mlflow import MlflowClient

        client = MlflowClient(tracking_uri=env["MLFLOW_TRACKING_URI"])
        runs = client.search_runs([client.get_experiment_by_name("kdpipe").experiment_id],
                                  "tags.`kdpipe.stage` = 'distill' and attributes.status = 'FINISHED'")
        (run,) = runs
        assert run.data.tags["kdpipe.resumed"] == "true" and run.data.tags["kdpipe.resumed_from"] == f"epoch {done}"
        killed_run = client.get_run(run.data.tags["kdpipe.resumed_run"])  # the SIGKILLed run, closed by the resume
        assert killed_run.info.status == "KILLED" and killed_run.data.tags["kdpipe.stage"] == "distill"
        assert run.data.tags["kdpipe.privacy"] == "data-free" and run.data.tags["data.private"] == "False"


def test_stale_checkpoint_is_ignored_and_said(proj, base, capsys):
    """A resume checkpoint written under other params is not used (the stage says so), and the run
    ends like the reference."""
    from kdpipe import paths
    from kdpipe.resume import Resume
    from kdpipe.stages import run_stage

    other = load_config("params.yaml", ["distill.temperature=8"])
    Resume(other, "distill", [paths.SYNTHETIC]).save(3, 40, {"student": {}})
    assert (proj / "data/.resume/distill.pt").exists()
    run_stage("distill", load_config("params.yaml"))
    said = capsys.readouterr().out
    assert "ignoring resume checkpoint data/.resume/distill.pt: written with other params or inputs" in said
    assert same_tensors(load_torch(proj / "data/student/model.pt"), load_torch(base / "data/student/model.pt"))
    assert not (proj / "data/.resume/distill.pt").exists()


# ------------------------------------------------------------------ privacy guard
def test_data_free_stage_may_not_read_the_real_data(proj):
    from kdpipe import data

    with data.data_free("distill", True):
        with pytest.raises(ConfigError, match=r"stage 'distill' is data-free and may not read the real data "
                                              r"'data/prepared/train.pt' \(data.private: true\)"):
            data.load_split("train")
        with pytest.raises(ConfigError, match="data-free"):
            data.prepare(load_config("params.yaml"))
    assert data.load_split("train")[0].shape[1:] == (1, 8, 8)  # outside the guard: readable


# ------------------------------------------------------------------ memorization audit
def test_audit_memorization_flags_a_planted_copy(proj, capsys):
    """A synthetic set holding a copy of one real training image: that sample is flagged at pixel
    RMSE 0 (teacher-feature distance 0); the rest are not near-duplicates."""
    assert cli(["audit-memorization"]) == 0
    clean = load_json(proj / "data/reports/memorization.json")
    assert clean["n_synthetic"] == 192 and clean["n_train"] == 1167
    assert clean["pixel_rmse"]["p0"] > clean["pixel_threshold"] and clean["n_flagged"] == 0
    assert 0 < clean["pixel_rmse_test_vs_train"]["p50"] < clean["pixel_rmse"]["p50"]
    real = load_torch(proj / "data/prepared/train.pt")
    syn = load_torch(proj / "data/synthetic/samples.pt")
    syn["x"][5] = real["x"][7]
    save_torch(syn, proj / "data/synthetic/samples.pt")
    assert cli(["audit-memorization"]) == 0
    planted = load_json(proj / "data/reports/memorization.json")
    assert planted["n_flagged"] == 1
    (hit,) = planted["flagged"]
    assert hit["synthetic"] == 5 and torch.equal(real["x"][hit["train"]], real["x"][7])
    assert hit["pixel_rmse"] == 0 and abs(hit["feature_cos_distance"]) < 1e-5
    assert (proj / "data/reports/memorization.png").stat().st_size > 1000
    assert "1 of 192 synthetic samples within pixel RMSE 0.05" in capsys.readouterr().out
