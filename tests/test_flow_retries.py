"""The one retry rule (kdpipe/pipeline.py), for real: a stage that fails with a config error runs once
and the run fails with its message; a transient fault (the stage's process killed by SIGKILL) is
retried. The same in the Prefect flow (a real flow run on an ephemeral Prefect server) and in
`kdpipe run`, both on the DVC route, where the failure's kind crosses `dvc repro` (KDPIPE_FAILURE_FILE).

The project: the tiny digits project with teacher.checkpoint pointing at a file that is no checkpoint,
so prepare runs (and is killed once, early, by the test) and train-teacher fails with a ConfigError."""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import yaml

from conftest import BIN, TINY, make_project, project_env, run
from kdpipe.config import Config, ConfigError
from kdpipe.errors import DataError, ExportError
from kdpipe.pipeline import StageFailed, transient

BAD_CKPT = "is not a loadable"


def test_retry_rule():
    """Transient: an OSError, a stage under dvc repro that died without saying why (killed, crashed)."""
    assert transient(OSError("connection refused: http://mlflow:5000"))
    assert transient(StageFailed("'dvc repro --single-item distill' failed with exit code 255"))
    for err in (ConfigError("unknown key 'distill.x'"), DataError("data.root missing"),
                FloatingPointError("nan"), ExportError("onnx parity"),
                AttributeError("'DistillCfg' object has no attribute 'flip'"), TypeError("f() got 2 arguments"),
                ImportError("No module named 'onnx2torch'")):
        assert not transient(err)


@pytest.fixture
def proj(tmp_path):
    p = make_project(tmp_path / "p")
    (p / "ckpt.pt").write_text("teacher weights, honest\n")
    params = yaml.safe_load((p / "params.yaml").read_text())
    params["teacher"]["checkpoint"] = str(p / "ckpt.pt")
    (p / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return p


def _kill_stage_once(proc: subprocess.Popen, stage: str, timeout: float = 120) -> bool:
    """SIGKILL the first `kdpipe <stage>` process (DVC's stage command) under ``proc``, once."""
    end = time.monotonic() + timeout
    while time.monotonic() < end and proc.poll() is None:
        try:
            kids = psutil.Process(proc.pid).children(recursive=True)
        except psutil.Error:
            break
        for c in kids:
            try:
                cmd = c.cmdline()
            except psutil.Error:
                continue
            if len(cmd) >= 2 and cmd[-1] == stage and any(Path(x).name == "kdpipe" for x in cmd[:-1]):
                c.kill()
                return True
        time.sleep(0.01)
    return False


def _run_killing(cmd: list[str], proj: Path, stage: str, timeout: float = 300) -> tuple[int, str, str]:
    out, err = proj / "out.log", proj / "err.log"
    with out.open("w") as o, err.open("w") as e:
        env = {**project_env(proj), "KDPIPE_RETRY_BACKOFF_S": "0.5"}  # the rule, not the wait
        proc = subprocess.Popen(cmd, cwd=proj, env=env, stdout=o, stderr=e)
        try:
            assert _kill_stage_once(proc, stage), "the stage process never appeared"
            proc.wait(timeout=timeout)
        finally:
            proc.kill() if proc.poll() is None else None
    return proc.returncode, out.read_text(), err.read_text()


TASK_RUNS = """
import asyncio, json
from prefect.client.orchestration import get_client
async def main():
    async with get_client() as c:
        (fr,) = await c.read_flow_runs()
        trs = await c.read_task_runs()
        print(json.dumps({"flow": fr.state.type.value, "message": fr.state.message or "",
                          "tasks": {t.name: [t.run_count, t.state.type.value] for t in trs}}))
asyncio.run(main())
"""


def test_flow_retries_a_killed_stage_not_a_config_error(proj):
    """A real flow run on the DVC route: prepare's process is SIGKILLed once -> its task runs twice and
    completes; train-teacher fails with a config error -> its task runs once, the flow fails with the message."""
    t0 = time.monotonic()
    rc, out, err = _run_killing([sys.executable, "-m", "flows.pipeline"], proj, "prepare")
    assert rc != 0
    assert BAD_CKPT in out + err, (out + err)[-3000:]
    res = json.loads(run([sys.executable, "-c", TASK_RUNS], proj).stdout.strip().splitlines()[-1])
    assert res["flow"] == "FAILED" and BAD_CKPT in res["message"], res  # the stage's own message
    assert res["tasks"] == {"prepare": [2, "COMPLETED"], "train-teacher": [1, "FAILED"]}, res
    assert (proj / "data/prepared/meta.json").exists()  # the retry did prepare's work
    assert time.monotonic() - t0 < 120


def test_cli_run_follows_the_same_rule(proj):
    """`kdpipe run` (DVC route): the killed prepare is retried, train-teacher's config error is not: exit 2
    with the stage's message."""
    rc, out, err = _run_killing([BIN + "/kdpipe", "run"], proj, "prepare")
    assert rc == 2, (out + err)[-3000:]
    assert "[kdpipe] prepare: attempt 1 failed (StageFailed" in err and "retrying in" in err, err[-3000:]
    assert out.count("Running stage 'prepare'") == 2 and out.count("Running stage 'train-teacher'") == 1, out[-3000:]
    assert err.strip().splitlines()[-1].startswith("kdpipe: error: ") and BAD_CKPT in err.strip().splitlines()[-1]
    assert "train-teacher: attempt" not in err


def test_cli_in_process_nan_stop_not_retried(tmp_path, monkeypatch, capsys):
    """In-process route: a NaN stop (train-teacher with lr 1e6) stops the run once: exit 1, "stopped:"."""
    from kdpipe.cli import main as cli

    p = Config().model_dump(mode="json")
    for section, values in TINY.items():
        p[section].update(values)
    p["teacher"]["lr"] = 1e6
    p["tracking"]["enabled"] = False
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(p, sort_keys=False))
    monkeypatch.chdir(tmp_path)
    rc = cli(["run", "--no-dvc", "--config", "params.yaml"])
    err = capsys.readouterr().err
    assert rc == 1 and err.strip().splitlines()[-1].startswith("kdpipe: stopped: train-teacher"), err
    assert "attempt" not in err


def test_dvc_route_with_overrides_is_refused_before_any_work(proj, monkeypatch):
    """The one preflight (kdpipe run and the flow): the DVC route runs params.yaml as it is, so a
    request for it with overrides is a ConfigError naming `dvc exp run -S`; without the request,
    overrides take the in-process route."""
    from kdpipe.pipeline import preflight

    monkeypatch.chdir(proj)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{proj / 'mlflow.db'}")
    with pytest.raises(ConfigError, match=r"dvc exp run -S key=value"):
        preflight("params.yaml", ["distill.epochs=1"], use_dvc=True)
    assert preflight("params.yaml", ["distill.epochs=1"])[1] is False
    assert preflight("params.yaml")[1] is True  # params.yaml as it is, in a DVC project
    assert not (proj / "data").exists()
