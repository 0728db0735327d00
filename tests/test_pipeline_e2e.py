"""End to end, for real: `kdpipe run` (dvc repro under an MLflow parent run) in a temp git+dvc repo,
MLflow runs queried back, onnxruntime parity, Prefect flow runs on Prefect's ephemeral server."""
from __future__ import annotations

import json
import re
import sys

import numpy as np
import pytest
import yaml

from conftest import BIN, project_env, run, tiny_params

pytestmark = pytest.mark.slow

STAGES = ["prepare", "train-teacher", "baseline", "synthesize", "distill", "evaluate", "export"]


def ran_stages(output: str) -> set[str]:
    return set(re.findall(r"Running stage '([\w-]+)'", output))


def test_dvc_repro_runs_all_stages_then_nothing(dvc_project):
    proj, first = dvc_project
    assert ran_stages(first.stdout) == set(STAGES)
    assert "kdpipe summary" in first.stdout
    m = json.loads((proj / "data/reports/metrics.json").read_text())
    assert {"teacher", "student", "baseline", "agreement"} <= set(m)
    assert m["teacher"]["accuracy"] > 0.5  # 3 epochs on digits: well above chance (0.1)
    for f in ("data/synthetic/samples.pt", "data/synthetic/grid.png", "data/student/model.pt",
              "data/export/student.onnx", "data/reports/figures/confusion_student.png", "dvc.lock"):
        assert (proj / f).exists(), f
    second = run(["dvc", "repro"], proj)
    assert ran_stages(second.stdout) == set()
    assert "up to date" in run(["dvc", "status"], proj).stdout


def test_synthesize_and_distill_do_not_depend_on_real_data(dvc_project):
    proj, _ = dvc_project
    stages = yaml.safe_load((proj / "dvc.yaml").read_text())["stages"]
    for s in ("synthesize", "distill"):
        assert not any(d.startswith("data/prepared") for d in stages[s]["deps"])


def test_mlflow_parent_and_child_runs(dvc_project):
    from mlflow.tracking import MlflowClient

    proj, _ = dvc_project
    client = MlflowClient(tracking_uri=f"sqlite:///{proj / 'mlflow.db'}")
    exp = client.get_experiment_by_name("kdpipe")
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if r.data.tags.get("kdpipe.runner") == "dvc"]
    assert len(parents) == 1
    parent = parents[0]
    assert parent.info.status == "FINISHED" and parent.data.tags["kdpipe.runner"] == "dvc"
    children = {r.data.tags["kdpipe.stage"]: r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id}
    assert set(children) == set(STAGES)
    assert all(c.data.tags["kdpipe.params_sha256"] == parent.data.tags["kdpipe.params_sha256"] for c in children.values())
    # metrics per epoch
    teacher = children["train-teacher"]
    hist = client.get_metric_history(teacher.info.run_id, "val_acc")
    assert [h.step for h in hist] == [0, 1, 2]
    assert teacher.data.params["teacher.epochs"] == "3"
    # artifacts: confusion PNG, synthetic-sample grid, ONNX
    arts = lambda stage: {a.path for a in client.list_artifacts(children[stage].info.run_id)}  # noqa: E731
    assert "grid.png" in arts("synthesize")
    assert "confusion_student.png" in arts("evaluate")
    # the ONNX student is a logged model, registered, with the alias on the export run's version
    assert client.get_model_version_by_alias("kdpipe-student", "candidate").run_id == children["export"].info.run_id
    # lineage: the stage runs carry their dvc.lock hashes; distill's only data input is the synthetic set
    lock = yaml.safe_load((proj / "dvc.lock").read_text())["stages"]
    assert children["distill"].data.tags["dvc.outs.data/student"] == lock["distill"]["outs"][0]["md5"]
    (inp,) = children["distill"].inputs.dataset_inputs
    assert (inp.dataset.name, inp.dataset.digest) == ("synthetic", lock["synthesize"]["outs"][0]["md5"])
    assert children["distill"].data.tags["synthetic.sha256"] == json.loads(
        (proj / "data/synthetic/meta.json").read_text())["sha256"]
    m = json.loads((proj / "data/reports/metrics.json").read_text())
    assert children["evaluate"].data.metrics["student_accuracy"] == pytest.approx(m["student"]["accuracy"])


def test_onnx_matches_pytorch_in_onnxruntime(dvc_project, monkeypatch):
    import onnx
    import onnxruntime as ort
    import torch

    from kdpipe import data, paths
    from kdpipe.stages.evaluate import load_model

    proj, _ = dvc_project
    monkeypatch.chdir(proj)
    model = onnx.load(str(paths.EXPORT / "student.onnx"))
    onnx.checker.check_model(model)
    props = {p.key: p.value for p in model.metadata_props}
    assert json.loads(props["classes"]) == [str(i) for i in range(10)]
    assert json.loads(props["input_size"]) == [1, 8, 8]
    student, _ = load_model(paths.STUDENT, "cpu")
    x, _ = data.load_split("test")
    sess = ort.InferenceSession(str(paths.EXPORT / "student.onnx"), providers=["CPUExecutionProvider"])
    for n in (1, 7, len(x)):  # dynamic batch
        got = sess.run(["logits"], {"input": x[:n].numpy()})[0]
        with torch.no_grad():
            ref = student(x[:n]).numpy()
        assert got.shape == (n, 10)
        assert np.abs(got - ref).max() < 1e-4
        assert (got.argmax(1) == ref.argmax(1)).all()
    parity = json.loads((paths.EXPORT / "metrics.json").read_text())
    assert parity["top1_agreement"] == 1.0 and parity["max_abs_diff"] < 1e-4


def _prefect_state(proj, flow_run_id: str) -> str:
    code = ("import asyncio, uuid\nfrom prefect.client.orchestration import get_client\n"
            "async def main():\n    async with get_client() as c:\n"
            f"        r = await c.read_flow_run(uuid.UUID('{flow_run_id}'))\n"
            "        print(r.state.type.value)\nasyncio.run(main())\n")
    return run([sys.executable, "-c", code], proj).stdout.strip().splitlines()[-1]


def _check_prefect_run(proj, runner: str):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{proj / 'mlflow.db'}")
    exp = client.get_experiment_by_name("kdpipe")
    parents = client.search_runs([exp.experiment_id], f"tags.`kdpipe.runner` = '{runner}'")
    assert len(parents) == 1
    parent = parents[0]
    flow_run_id = parent.data.tags["prefect.flow_run_id"]
    assert flow_run_id
    assert _prefect_state(proj, flow_run_id) == "COMPLETED"
    return client, parent


def test_prefect_flow_in_process(tmp_path):
    """A real Prefect flow run (ephemeral server), each task calling the stage in-process."""
    proj = tmp_path / "flowproj"
    proj.mkdir()
    (proj / "params.yaml").write_text(yaml.safe_dump(tiny_params(), sort_keys=False))
    r = run([sys.executable, "-m", "flows.pipeline", "--no-dvc"], proj, timeout=900)
    assert "kdpipe summary" in r.stdout + r.stderr
    client, parent = _check_prefect_run(proj, "prefect")
    children = client.search_runs([parent.info.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    assert {c.data.tags["kdpipe.stage"] for c in children} == set(STAGES)
    m = json.loads((proj / "data/reports/metrics.json").read_text())  # the parent's accuracies, as kdpipe run logs them
    assert {k: parent.data.metrics[f"{k}_accuracy"] for k in ("teacher", "student", "baseline")} == \
        {k: pytest.approx(m[k]["accuracy"]) for k in ("teacher", "student", "baseline")}
    assert (proj / "data/export/student.onnx").exists()


def test_data_free_stages_without_the_real_data(dvc_project, tmp_path):
    """synthesize and distill in a folder that holds the teacher and nothing of the real data give
    the same synthetic set (same sha256: deterministic on CPU with a seed) and the same student."""
    import hashlib
    import shutil

    proj, _ = dvc_project
    iso = tmp_path / "isolated"
    (iso / "data").mkdir(parents=True)
    shutil.copytree(proj / "data/teacher", iso / "data/teacher")
    shutil.copy(proj / "params.yaml", iso / "params.yaml")
    env = project_env(iso)
    env["MLFLOW_TRACKING_URI"] = f"sqlite:///{iso / 'mlflow.db'}"
    for stage in ("synthesize", "distill"):
        run([BIN + "/kdpipe", stage], iso, env=env)
    assert not (iso / "data/prepared").exists()
    meta = lambda p: json.loads((p / "data/synthetic/meta.json").read_text())  # noqa: E731
    assert meta(iso)["sha256"] == meta(proj)["sha256"]
    digest = lambda p: hashlib.sha256((p / "data/student/model.pt").read_bytes()).hexdigest()  # noqa: E731
    import torch

    a = torch.load(proj / "data/student/model.pt", weights_only=True)
    b = torch.load(iso / "data/student/model.pt", weights_only=True)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), (digest(proj), digest(iso))


def project_copy(proj, dest):
    """A copy of the session's shared ``dvc_project`` for a test that changes it (params, outputs, commits,
    runs): the fixture stays as the other tests, in whatever order, read it. Git, DVC and MLflow state come
    along; the MLflow experiment's artifact location is pointed at the copy, so new runs write there."""
    import contextlib
    import shutil
    import sqlite3

    shutil.copytree(proj, dest, symlinks=True)
    with contextlib.closing(sqlite3.connect(dest / "mlflow.db")) as db, db:
        db.execute("UPDATE experiments SET artifact_location = replace(artifact_location, ?, ?)",
                   (str(proj.resolve()), str(dest.resolve())))
    return dest


def test_changing_a_distill_param_reruns_only_downstream(dvc_project, tmp_path):
    proj = project_copy(dvc_project[0], tmp_path / "proj")
    p = yaml.safe_load((proj / "params.yaml").read_text())
    p["distill"]["epochs"] = 3
    (proj / "params.yaml").write_text(yaml.safe_dump(p, sort_keys=False))
    r = run(["dvc", "repro"], proj)
    assert ran_stages(r.stdout) == {"distill", "evaluate", "export"}
    # a bare `dvc repro` still gets one MLflow parent run, shared by the stages it ran
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{proj / 'mlflow.db'}")
    exp = client.get_experiment_by_name("kdpipe").experiment_id
    (bare,) = client.search_runs([exp], "tags.`kdpipe.runner` = 'dvc (bare)'")
    kids = client.search_runs([exp], f"tags.`mlflow.parentRunId` = '{bare.info.run_id}'")
    assert sorted(k.data.tags["kdpipe.stage"] for k in kids) == ["distill", "evaluate", "export"]
    assert bare.info.status == "FINISHED"
    run(["git", "add", "-A"], proj)
    run(["git", "commit", "-qm", "distill epochs 3"], proj)
    e = run(["dvc", "exp", "run", "-S", "distill.temperature=8"], proj)
    assert ran_stages(e.stdout) == {"distill", "evaluate", "export"}
    shown = run(["dvc", "exp", "show", "--json"], proj).stdout
    assert "temperature" in shown
