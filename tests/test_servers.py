"""Against real servers on loopback: a `prefect server start` and an `mlflow server` (sqlite backend,
temp dir). `kdpipe serve` publishes the flow as a cron-scheduled deployment; a run of it is triggered
with `run_deployment` and goes through `dvc repro` stage by stage, tracked on the MLflow server; then
the registry, the lineage tags and inputs, and `kdpipe lineage` are checked through MlflowClient.
Then the scale-out routes (docs/scaling.md): prefect.yaml deployed to a process work pool and run by a
real `prefect worker`, and a DVC remote shared by a second clone whose `kdpipe lineage` matches."""
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

from conftest import BIN, ROOT, make_project, project_env, run

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
    fr = served["result"]["flow_run_id"]  # the served run's parent (later tests open other parent runs)
    parent, = client.search_runs([exp.experiment_id],
                                 f"tags.`kdpipe.stage` = 'pipeline' and tags.`prefect.flow_run_id` = '{fr}'")
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
    assert text.startswith("lineage of kdpipe-student: data-free: after train-teacher")

    # an auditor's failing case: a real-data input planted on the distill run
    client = _client(served)
    real = Dataset(name="real-train", digest=lock["prepare"]["outs"][0]["md5"], source_type="local",
                   source=json.dumps({"uri": str(proj / "data/prepared")}))
    client.log_inputs(distill["run_id"], [DatasetInput(real, [InputTag("kdpipe.data_kind", "real")])])
    bad = run([BIN + "/kdpipe", "lineage", "kdpipe-student@candidate"], proj, env=env, check=False)
    assert bad.returncode == 1
    assert f"run {distill['run_id']}" in bad.stdout and "real-train" in bad.stdout


READ_DEPLOYMENTS = """
import asyncio, json
from prefect.client.orchestration import get_client

async def main():
    out = {}
    async with get_client() as c:
        for name in ("kdpipe-nightly", "kdpipe-remote"):
            d = await c.read_deployment_by_name(f"kdpipe-pipeline/{name}")
            gcl = d.global_concurrency_limit
            out[name] = {"pool": d.work_pool_name, "crons": [s.schedule.cron for s in d.schedules],
                         "pull": d.pull_steps, "parameters": d.parameters, "limit": gcl.limit if gcl else None}
    print(json.dumps(out))
asyncio.run(main())
"""


@pytest.fixture(scope="module")
def deployed(served):
    """`prefect deploy --all` with the project's prefect.yaml against the same real server (once)."""
    proj, env = served["proj"], served["env"]
    run([BIN + "/prefect", "work-pool", "create", "kdpipe-pool", "--type", "process"], proj, env=env)
    run([BIN + "/prefect", "--no-prompt", "deploy", "--all"], proj,
        env={**env, "PWD": str(proj), "KDPIPE_REPO": str(proj)}, timeout=300)
    return json.loads(run([sys.executable, "-c", READ_DEPLOYMENTS], proj, env=env).stdout.strip().splitlines()[-1])


def test_prefect_yaml_deploys_to_a_work_pool(served, deployed):
    proj = served["proj"]
    d, remote = deployed["kdpipe-nightly"], deployed["kdpipe-remote"]
    assert d["pool"] == "kdpipe-pool" and d["crons"] == [CRON] and d["limit"] == 1
    assert d["parameters"] == {"config": "params.yaml", "overrides": [], "push": False}
    assert d["pull"][0]["prefect.deployments.steps.set_working_directory"]["directory"] == str(proj)
    # the remote-worker variant: git clone of $KDPIPE_REPO (resolved at deploy time), dvc pull, push: true
    assert remote["pool"] == "kdpipe-pool" and remote["crons"] == [] and remote["limit"] == 1
    assert remote["parameters"]["push"] is True
    clone, pull = remote["pull"]
    assert clone["prefect.deployments.steps.git_clone"]["repository"] == str(proj)
    assert pull["prefect.deployments.steps.run_shell_script"]["script"] == "dvc pull --allow-missing"


def test_docker_deployment_file_is_valid():
    """prefect-docker.yaml (kept out of `prefect deploy --all`: it needs prefect-docker and a docker daemon)
    parses as a prefect.yaml: the image is built and pushed by prefect-docker and used by the deployment."""
    from prefect.cli.deploy._models import PrefectYamlModel

    m = PrefectYamlModel.model_validate(yaml.safe_load((ROOT / "prefect-docker.yaml").read_text()))
    build = {k: v for step in m.build for k, v in step.items()}
    push = {k: v for step in m.push for k, v in step.items()}
    assert build["prefect_docker.deployments.steps.build_docker_image"]["id"] == "build-image"
    assert push["prefect_docker.deployments.steps.push_docker_image"]["image_name"] == "{{ build-image.image_name }}"
    d, = m.deployments
    assert d.work_pool.job_variables["image"] == "{{ build-image.image }}" and d.concurrency_limit == 1
    assert d.entrypoint == "flows/pipeline.py:pipeline"


FLOW_RUN = """
import asyncio, json, sys
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

async def main(fr):
    async with get_client() as c:
        run = await c.read_flow_run(fr)
        logs, offset = [], 0
        while True:
            page = await c.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[fr])), limit=200, offset=offset)
            logs += [{"message": l.message, "task_run_id": str(l.task_run_id) if l.task_run_id else None} for l in page]
            if len(page) < 200:
                break
            offset += 200
        print(json.dumps({"state": run.state.type.value, "deployment_id": str(run.deployment_id),
                          "parameters": run.parameters, "logs": logs}))
asyncio.run(main(sys.argv[1]))
"""


def test_process_worker_runs_the_nightly_deployment(served, deployed, tmp_path):
    """`prefect deployment run --param push=true` + a real `prefect worker start --type process --run-once`:
    the flow run completes, each stage's `dvc repro` output is in its logs (the project already ran once,
    so DVC says each stage did not change), logged from the stage's task run, and the outputs are pushed
    to the default DVC remote (here a local one of this test, in .dvc/config.local, removed after)."""
    proj, env = served["proj"], served["env"]
    remote = tmp_path / "worker-remote"
    run(["dvc", "remote", "add", "--local", "-d", "wremote", str(remote)], proj, env=env)
    log = tmp_path / "worker.log"
    try:
        out = run([BIN + "/prefect", "deployment", "run", "kdpipe-pipeline/kdpipe-nightly", "--param", "push=true"],
                  proj, env=env).stdout
        fr = out.split("UUID:")[1].split()[0]
        worker = _start([BIN + "/prefect", "worker", "start", "--pool", "kdpipe-pool", "--type", "process",
                         "--run-once"], proj, env, log)
        try:
            worker.wait(timeout=420)
        finally:
            _stop(worker)
    finally:
        run(["dvc", "remote", "remove", "--local", "wremote"], proj, env=env)
    res = {}
    for _ in range(20):  # the run's last log lines may reach the server just after the worker exits
        res = json.loads(run([sys.executable, "-c", FLOW_RUN, fr], proj, env=env).stdout.strip().splitlines()[-1])
        if any("Data and pipelines are up to date" in m["message"] for m in res["logs"]):
            break
        time.sleep(1)
    assert res["state"] == "COMPLETED", log.read_text()[-5000:]
    assert res["parameters"] == {"config": "params.yaml", "overrides": [], "push": True}
    staged = {m["message"]: m["task_run_id"] for m in res["logs"]}
    for stage in STAGES:  # DVC's own line for each stage, from `dvc repro --single-item <stage>`
        line = f"Stage '{stage}' didn't change, skipping"
        assert staged.get(line), (line, [m["message"] for m in res["logs"]][-60:])  # from the task's logger
    assert "outputs pushed to DVC remote 'wremote'" in staged and any(remote.rglob("*"))


def test_dvc_remote_second_clone_pulls_and_lineage_matches(served, tmp_path):
    """Clone A (the served project) pushes to a local-path DVC remote with `kdpipe run --push`; clone B
    (`git clone` of A) `dvc pull`s, `dvc repro` runs no stage, and B's `kdpipe lineage` (same MLflow
    server) gives A's chain and model."""
    a, env = served["proj"], served["env"]
    no_remote = run([BIN + "/kdpipe", "run", "--push"], a, env=env, check=False)
    assert no_remote.returncode == 2 and "no default remote" in no_remote.stderr, no_remote.stderr
    remote = tmp_path / "dvc-remote"
    run(["dvc", "remote", "add", "-d", "shared", str(remote)], a, env=env)
    r = run([BIN + "/kdpipe", "run", "--push"], a, env=env, timeout=600)
    assert "Running stage" not in r.stdout and "outputs pushed to DVC remote 'shared'" in r.stdout, r.stdout[-3000:]
    assert remote.is_dir() and any(remote.rglob("*"))
    ignores = [str(f.relative_to(a)) for f in a.rglob(".gitignore") if ".dvc" not in f.parts]
    run(["git", "add", "dvc.lock", ".dvc/config", *ignores], a, env=env)
    run(["git", "commit", "-qm", "pipeline outputs (dvc.lock) and the DVC remote"], a, env=env)

    b = tmp_path / "clone-b"
    run(["git", "clone", "-q", str(a), str(b)], tmp_path, env=env)
    assert not (b / "data/student/model.pt").exists()
    run(["dvc", "pull"], b, env=env)
    for f in ("data/synthetic/samples.pt", "data/student/model.pt", "data/export/student.onnx"):
        assert (b / f).read_bytes() == (a / f).read_bytes(), f
    assert "up to date" in run(["dvc", "status"], b, env=env).stdout
    repro = run(["dvc", "repro"], b, env=env).stdout
    assert "Running stage" not in repro and "Data and pipelines are up to date" in repro, repro

    def lineage(cwd):
        r = run([BIN + "/kdpipe", "lineage", "kdpipe-student@candidate", "--json"], cwd, env=env, check=False)
        res = json.loads(r.stdout[r.stdout.index("{"):])
        return r.returncode, [(s["stage"], s["run_id"]) for s in res["chain"]], (res["model"]["name"], res["model"]["version"])

    rc_a, chain_a, model_a = lineage(a)
    assert chain_a and model_a[0] == "kdpipe-student"
    assert lineage(b) == (rc_a, chain_a, model_a)
