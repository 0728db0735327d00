"""Against real servers on loopback: a `prefect server start` and an `mlflow server` (sqlite backend,
temp dir). `kdpipe serve` publishes the flow as a cron-scheduled deployment; a run of it is triggered
with `run_deployment` and goes through `dvc repro` stage by stage, tracked on the MLflow server; then
the registry, the lineage tags and inputs, and `kdpipe lineage` are checked through MlflowClient."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from conftest import BIN, make_project, project_env, run

pytestmark = pytest.mark.slow

STAGES = ["prepare", "train-teacher", "baseline", "synthesize", "distill", "evaluate", "export"]
CRON = "0 3 * * *"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_http(url: str, proc: subprocess.Popen, log: Path, timeout: float = 180) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise AssertionError(f"{proc.args} exited {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise AssertionError(f"{url} not up after {timeout} s:\n{log.read_text()[-3000:]}")


def _start(cmd, cwd, env, log: Path) -> subprocess.Popen:
    return subprocess.Popen(cmd, cwd=cwd, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


TRIGGER = """
import asyncio, json, sys, time
from prefect.client.orchestration import get_client
from prefect.deployments import run_deployment

NAME = "kdpipe-pipeline/kdpipe-scheduled"

async def wait_deployment():
    async with get_client() as c:
        for _ in range(240):
            try:
                return await c.read_deployment_by_name(NAME)
            except Exception:
                await asyncio.sleep(0.5)
    raise SystemExit("deployment never appeared")

async def artifact(flow_run_id):
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId
    async with get_client() as c:
        arts = await c.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])))
        return [(a.key, a.type, a.data) for a in arts]

async def scheduled(deployment_id):
    # the server's scheduler turns the cron schedule into SCHEDULED flow runs
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId
    async with get_client() as c:
        for _ in range(120):
            runs = await c.read_flow_runs(deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment_id])))
            runs = [r for r in runs if r.state.type.value == "SCHEDULED"]
            if runs:
                return [r.expected_start_time.isoformat() for r in runs]
            await asyncio.sleep(0.5)
    return []

d = asyncio.run(wait_deployment())
upcoming = asyncio.run(scheduled(d.id))
fr = run_deployment(NAME, timeout=900)
print(json.dumps({
    "deployment_id": str(d.id),
    "crons": [s.schedule.cron for s in d.schedules],
    "scheduled": upcoming,
    "parameters": d.parameters,
    "flow_run_id": str(fr.id),
    "state": fr.state.type.value,
    "artifacts": asyncio.run(artifact(fr.id)),
}))
"""


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """Real Prefect + MLflow servers, `kdpipe serve` in a real git+dvc project, one triggered run."""
    tmp = tmp_path_factory.mktemp("servers")
    env = project_env(tmp)
    mport, pport = _free_port(), _free_port()
    mlflow_uri, prefect_api = f"http://127.0.0.1:{mport}", f"http://127.0.0.1:{pport}/api"
    procs = []
    try:
        procs.append(_start([BIN + "/mlflow", "server", "--host", "127.0.0.1", "--port", str(mport),
                             "--backend-store-uri", f"sqlite:///{tmp / 'mlflow-server.db'}",
                             "--artifacts-destination", str(tmp / "mlflow-artifacts"), "--workers", "1"],
                            tmp, env, tmp / "mlflow.log"))
        penv = {**env, "PREFECT_HOME": str(tmp / "prefect-server-home"),
                "PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS": "2"}
        procs.append(_start([BIN + "/prefect", "server", "start", "--host", "127.0.0.1", "--port", str(pport)],
                            tmp, penv, tmp / "prefect.log"))
        _wait_http(f"{mlflow_uri}/health", procs[0], tmp / "mlflow.log")
        _wait_http(f"{prefect_api}/health", procs[1], tmp / "prefect.log")

        proj = make_project(tmp / "proj")
        env = {**project_env(proj), "PREFECT_API_URL": prefect_api, "MLFLOW_TRACKING_URI": mlflow_uri}
        procs.append(_start([BIN + "/kdpipe", "serve", "--cron", CRON], proj, env, tmp / "serve.log"))
        t0 = time.monotonic()
        r = run([sys.executable, "-c", TRIGGER], proj, env=env, timeout=1200, check=False)
        wall = time.monotonic() - t0
        assert r.returncode == 0, f"{r.stdout[-3000:]}\n{r.stderr[-3000:]}\nserve log:\n{(tmp / 'serve.log').read_text()[-5000:]}"
        result = json.loads(r.stdout.strip().splitlines()[-1])
        yield {"proj": proj, "env": env, "mlflow_uri": mlflow_uri, "result": result, "wall_s": wall,
               "serve_log": tmp / "serve.log"}
    finally:
        for p in reversed(procs):
            _stop(p)


def test_served_deployment_has_cron_schedule_and_completes(served):
    res = served["result"]
    assert res["crons"] == [CRON]
    assert res["scheduled"] and all(t[11:19] == "03:00:00" for t in res["scheduled"])  # runs at 03:00 UTC
    assert res["parameters"] == {"config": "params.yaml", "overrides": []}
    assert res["state"] == "COMPLETED", served["serve_log"].read_text()[-5000:]
    proj = served["proj"]
    for f in ("data/synthetic/samples.pt", "data/student/model.pt", "data/export/student.onnx", "dvc.lock"):
        assert (proj / f).exists(), f
    assert "up to date" in run(["dvc", "status"], proj, env=served["env"]).stdout
    (key, kind, md), = [a for a in res["artifacts"] if a[0] == "kdpipe-summary"]
    assert kind == "markdown" and "| student |" in md and served["mlflow_uri"] in md


def _client(served):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=served["mlflow_uri"])


def _runs(served):
    client = _client(served)
    exp = client.get_experiment_by_name("kdpipe")
    parent, = client.search_runs([exp.experiment_id], "tags.`kdpipe.stage` = 'pipeline'")
    children = {r.data.tags["kdpipe.stage"]: r for r in
                client.search_runs([exp.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")}
    return client, parent, children


def test_mlflow_server_parent_children_tags_and_inputs(served):
    client, parent, children = _runs(served)
    fr = served["result"]["flow_run_id"]
    assert parent.data.tags["kdpipe.runner"] == "prefect+dvc" and parent.data.tags["prefect.flow_run_id"] == fr
    assert set(children) == set(STAGES)
    lock = yaml.safe_load((served["proj"] / "dvc.lock").read_text())["stages"]
    for stage, r in children.items():
        t = r.data.tags
        assert r.info.status == "FINISHED"
        assert t["prefect.flow_run_id"] == fr and t["git.commit"] == parent.data.tags["git.commit"] != "none"
        assert t["kdpipe.params_sha256"] == parent.data.tags["kdpipe.params_sha256"]
        for out in lock[stage].get("outs", []):  # the stage's dvc.lock hashes
            assert t[f"dvc.outs.{out['path']}"] == out["md5"], (stage, out["path"])
        for dep in lock[stage].get("deps", []):
            assert t[f"dvc.deps.{dep['path']}"] == dep["md5"], (stage, dep["path"])
    inputs = {s: [(d.dataset.name, d.dataset.digest, {x.key: x.value for x in d.tags}["kdpipe.data_kind"])
                  for d in r.inputs.dataset_inputs] for s, r in children.items()}
    md5 = {o["path"]: o["md5"] for e in lock.values() for o in e.get("outs", [])}
    assert inputs["train-teacher"] == [("real-train", md5["data/prepared"], "real")]
    assert inputs["distill"] == [("synthetic", md5["data/synthetic"], "synthetic")]  # its only data input
    assert inputs["synthesize"] == []


def test_registered_version_alias_and_metrics(served):
    client, _, children = _runs(served)
    mv = client.get_model_version_by_alias("kdpipe-student", "candidate")
    assert mv.run_id == children["export"].info.run_id
    m = json.loads((served["proj"] / "data/reports/metrics.json").read_text())
    assert float(mv.tags["student_accuracy"]) == pytest.approx(m["student"]["accuracy"])
    assert float(mv.tags["top1_agreement"]) == 1.0
    arts = {a.path for a in client.list_artifacts(mv.run_id, "student_pytorch")}
    assert {"student_pytorch/model.pt", "student_pytorch/spec.json"} <= arts  # the PyTorch state_dict + spec


def test_lineage_chain_then_planted_real_input_fails(served):
    from mlflow.entities import Dataset, DatasetInput, InputTag

    proj, env = served["proj"], served["env"]
    r = run([BIN + "/kdpipe", "lineage", "kdpipe-student@candidate", "--json"], proj, env=env)
    res = json.loads(r.stdout[r.stdout.index("{"):])
    assert res["ok"] and res["model"]["aliases"] == ["candidate"]
    assert [s["stage"] for s in res["chain"]] == ["export", "distill", "synthesize", "train-teacher"]
    lock = yaml.safe_load((proj / "dvc.lock").read_text())["stages"]
    distill, synth, teacher = res["chain"][1:]
    assert distill["inputs"][0]["digest"] == synth["hashes"]["dvc.outs.data/synthetic"]
    assert teacher["inputs"][0]["digest"] == lock["prepare"]["outs"][0]["md5"]
    assert {s["prefect_flow_run_id"] for s in res["chain"]} == {served["result"]["flow_run_id"]}
    text = run([BIN + "/kdpipe", "lineage", "kdpipe-student"], proj, env=env).stdout
    assert "data-free check: OK" in text

    # an auditor's failing case: a real-data input planted on the distill run
    client = _client(served)
    real = Dataset(name="real-train", digest=lock["prepare"]["outs"][0]["md5"], source_type="local",
                   source=json.dumps({"uri": str(proj / "data/prepared")}))
    client.log_inputs(distill["run_id"], [DatasetInput(real, [InputTag("kdpipe.data_kind", "real")])])
    bad = run([BIN + "/kdpipe", "lineage", "kdpipe-student@candidate"], proj, env=env, check=False)
    assert bad.returncode == 1
    assert f"run {distill['run_id']}" in bad.stdout and "real-train" in bad.stdout


def test_prefect_yaml_deploys_to_a_work_pool(served):
    """`prefect deploy --all` with the project's prefect.yaml against the same real server."""
    proj, env = served["proj"], served["env"]
    run([BIN + "/prefect", "work-pool", "create", "kdpipe-pool", "--type", "process"], proj, env=env)
    run([BIN + "/prefect", "--no-prompt", "deploy", "--all"], proj, env={**env, "PWD": str(proj)}, timeout=300)
    code = ("import asyncio, json\nfrom prefect.client.orchestration import get_client\n"
            "async def main():\n    async with get_client() as c:\n"
            "        d = await c.read_deployment_by_name('kdpipe-pipeline/kdpipe-nightly')\n"
            "        print(json.dumps({'pool': d.work_pool_name, 'crons': [s.schedule.cron for s in d.schedules],"
            " 'pull': d.pull_steps}))\nasyncio.run(main())\n")
    d = json.loads(run([sys.executable, "-c", code], proj, env=env).stdout.strip().splitlines()[-1])
    assert d["pool"] == "kdpipe-pool" and d["crons"] == [CRON]
    assert d["pull"][0]["prefect.deployments.steps.set_working_directory"]["directory"] == str(proj)
