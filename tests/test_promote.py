"""kdpipe promote: the gate in params (promote:) decides whether alias champion moves to a registered version.

Against a real MLflow sqlite store in tmp_path: real ONNX versions registered the way export registers them
(mlflow.onnx.log_model, alias candidate, the evaluate metrics as version tags), judged by the real CLI."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from kdpipe.cli import main

MODEL = "kdpipe-student"
REAL_OK = {"teacher_accuracy": 0.9917, "student_accuracy": 0.9778, "onnx_accuracy": 0.9778, "top1_agreement": 1.0,
           "max_abs_diff": 3.8e-06}
NO_DATA = {"fidelity_agreement": 0.70, "fidelity_kl": 0.4, "onnx_teacher_agreement": 0.70, "top1_agreement": 1.0,
           "max_abs_diff": 2.9e-06}


@pytest.fixture
def store(tmp_path, monkeypatch):
    """A fresh sqlite tracking store; the working folder (no params.yaml: the schema's defaults) is tmp_path."""
    import mlflow
    from mlflow.tracking import fluent
    from mlflow.tracking._tracking_service import utils

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.chdir(tmp_path)
    # MLflow's process-wide state, restored after the test: set_tracking_uri / set_experiment also set these
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_ID", raising=False)
    monkeypatch.setattr(fluent, "_active_experiment_id", None)  # an earlier store's experiment id
    monkeypatch.setenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    old = utils._tracking_uri
    mlflow.set_tracking_uri(uri)
    yield uri
    mlflow.set_tracking_uri(old)


def _onnx_model():
    from onnx import TensorProto, helper

    w = helper.make_tensor("w", TensorProto.FLOAT, [4, 3], [0.1 * i for i in range(12)])
    graph = helper.make_graph([helper.make_node("MatMul", ["input", "w"], ["logits"])], "student",
                              [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 4])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 3])], [w])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def register(metrics: dict) -> str:
    """A new version of MODEL as export makes one: logged ONNX model, metric tags, alias candidate."""
    import mlflow
    import mlflow.onnx
    import onnx
    import onnxruntime

    reqs = [f"onnx=={onnx.__version__}", f"onnxruntime=={onnxruntime.__version__}"]
    mlflow.set_experiment("kdpipe")
    with mlflow.start_run(run_name="export", tags={"kdpipe.stage": "export"}) as run:
        info = mlflow.onnx.log_model(_onnx_model(), name="student", registered_model_name=MODEL, pip_requirements=reqs)
    client, version = mlflow.MlflowClient(), str(info.registered_model_version)
    for k, v in {**metrics, "onnx.sha256": "0" * 64, "run_id": run.info.run_id}.items():
        client.set_model_version_tag(MODEL, version, k, str(v))
    client.set_registered_model_alias(MODEL, "candidate", version)
    return version


def _aliases() -> dict:
    import mlflow

    return {k: str(v) for k, v in mlflow.MlflowClient().get_registered_model(MODEL).aliases.items()}


def _tags(version: str) -> dict:
    import mlflow

    return dict(mlflow.MlflowClient().get_model_version(MODEL, version).tags)


def _promote_runs() -> list:
    import mlflow

    exp = mlflow.get_experiment_by_name("kdpipe").experiment_id
    return mlflow.MlflowClient().search_runs([exp], "tags.`kdpipe.stage` = 'promote'", order_by=["start_time ASC"])


def test_moves_champion_for_a_version_above_the_gate(store, capsys):
    v1 = register(REAL_OK)
    assert main(["promote"]) == 0  # default: the version holding alias candidate
    assert _aliases() == {"candidate": v1, "champion": v1}
    out = capsys.readouterr().out
    assert f"promoted: {MODEL}@champion -> version {v1}" in out
    assert "student_accuracy 0.9778 >= promote.min_student_accuracy 0.95" in out
    assert "n/a   promote.min_fidelity_agreement" in out
    t = _tags(v1)
    assert t["promotion.decision"] == "promoted" and t["promotion.alias"] == "champion"
    assert t["promotion.route"] == "real" and "3 check(s) passed" in t["promotion.reason"]
    assert json.loads(t["promotion.gate"]) == {"min_student_accuracy": 0.95, "min_fidelity_agreement": 0.6,
                                               "min_student_over_teacher": 0.95, "max_onnx_abs_diff": 0.0001}
    assert t["promotion.checked_at"].endswith("+00:00")
    (run,) = _promote_runs()  # the audit record: one run per decision
    assert run.info.run_id == t["promotion.run_id"] and run.info.status == "FINISHED"
    assert run.data.tags["promotion.decision"] == "promoted" and run.data.tags["promotion.version"] == v1
    assert run.data.params["promote.min_student_accuracy"] == "0.95"
    assert run.data.metrics["student_accuracy"] == pytest.approx(0.9778)

    v2 = register({**REAL_OK, "student_accuracy": 0.9861})  # a better candidate moves champion on
    assert main(["promote", f"{MODEL}/{v2}"]) == 0
    assert _aliases() == {"candidate": v2, "champion": v2}
    assert f"(was {v1})" in capsys.readouterr().out


def test_refuses_a_version_below_the_gate(store, capsys):
    v1 = register(REAL_OK)
    assert main(["promote", MODEL]) == 0  # a bare name: MODEL@candidate
    v2 = register({**REAL_OK, "student_accuracy": 0.90, "max_abs_diff": 3e-4})
    capsys.readouterr()
    # the console script, in its own process: non-zero exit, each failed metric with its value and threshold
    env = {**os.environ, "PATH": str(Path(sys.executable).parent) + os.pathsep + os.environ["PATH"]}
    r = subprocess.run(["kdpipe", "promote", f"{MODEL}@candidate"], capture_output=True, text=True, env=env,
                       timeout=120)
    assert r.returncode == 1, r.stdout + r.stderr
    assert f"promote refused {MODEL}/{v2}" in r.stderr
    assert "student_accuracy 0.9 < promote.min_student_accuracy 0.95" in r.stderr
    assert "student_over_teacher 0.907533 < promote.min_student_over_teacher 0.95" in r.stderr
    assert "max_abs_diff 0.0003 > promote.max_onnx_abs_diff 0.0001" in r.stderr
    assert f"{MODEL}@champion stays on version {v1}" in r.stderr
    assert "FAIL  student_accuracy" in r.stdout
    assert _aliases() == {"candidate": v2, "champion": v1}  # not moved
    t = _tags(v2)
    assert t["promotion.decision"] == "refused" and "student_accuracy 0.9 <" in t["promotion.reason"]
    runs = _promote_runs()
    assert [x.data.tags["promotion.decision"] for x in runs] == ["promoted", "refused"]
    assert runs[-1].data.tags["promotion.previous"] == v1 and runs[-1].info.run_id == t["promotion.run_id"]

    # a stricter gate from --set, and a metric the version does not carry fails rather than passes
    v3 = register({k: v for k, v in REAL_OK.items() if k != "max_abs_diff"})
    assert main(["promote", f"{MODEL}/{v3}", "--set", "promote.min_student_accuracy=0.99"]) == 1
    err = capsys.readouterr().err
    assert "student_accuracy 0.9778 < promote.min_student_accuracy 0.99" in err
    assert "max_abs_diff not recorded on the version (promote.max_onnx_abs_diff 0.0001)" in err
    assert _aliases()["champion"] == v1


def test_no_real_data_version_is_judged_by_fidelity(store, capsys):
    low = register({**NO_DATA, "fidelity_agreement": 0.5})
    assert main(["promote"]) == 1
    cap = capsys.readouterr()
    assert "no real data" in cap.out and "n/a   promote.min_student_accuracy" in cap.out
    assert "fidelity_agreement 0.5 < promote.min_fidelity_agreement 0.6" in cap.err
    assert "student_accuracy" not in cap.err  # the real-data thresholds do not apply
    assert "champion" not in _aliases() and _tags(low)["promotion.route"] == "none"

    good = register(NO_DATA)
    assert main(["promote"]) == 0
    assert "fidelity_agreement 0.7 >= promote.min_fidelity_agreement 0.6" in capsys.readouterr().out
    assert _aliases()["champion"] == good and _tags(good)["promotion.decision"] == "promoted"
    # a gate whose only threshold is a real-data one checks nothing here: refused
    assert main(["promote", f"{MODEL}/{good}", "--set", "promote.min_fidelity_agreement=null",
                 "--set", "promote.max_onnx_abs_diff=null"]) == 1
    assert "no threshold of the no real data route is set" in capsys.readouterr().err


def test_config_errors_and_unknown_versions_exit_2(store, capsys):
    register(REAL_OK)
    null = [x for k in ("min_student_accuracy", "min_fidelity_agreement", "min_student_over_teacher",
                        "max_onnx_abs_diff") for x in ("--set", f"promote.{k}=null")]
    for args, message in [
        (["nosuch-model"], "nosuch-model@candidate"),
        ([f"{MODEL}/99"], f"'{MODEL}/99'"),
        ([f"{MODEL}@nosuchalias"], "nosuchalias"),
        ([MODEL, *null], "every threshold"),  # a gate that checks nothing is a config error, not a pass
        ([MODEL, "--set", "promote.alias=candidate"], "promote.alias 'candidate' is tracking.alias"),
        ([MODEL, "--set", "promote.min_student_accuracy=1.5"], "promote.min_student_accuracy"),
        ([MODEL, "--config", "missing.yaml"], "missing.yaml"),
    ]:
        assert main(["promote", *args]) == 2, args
        assert message in capsys.readouterr().err, args
    assert "champion" not in _aliases() and "promotion.decision" not in _tags("1")
