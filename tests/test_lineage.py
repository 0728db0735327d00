"""`kdpipe lineage` as an auditor uses it, on the tiny project after one real `kdpipe run` (dvc repro):
the report fits in 25 lines with the verdict first; `--verify` re-hashes the registered model (downloaded from
the registry) and every DVC output the chain names, and fails naming the artifact after one byte of
data/synthetic/samples.pt or of the registered model.onnx changes; `--html` writes the graph and logs it."""
from __future__ import annotations

import hashlib
import json
from contextlib import contextmanager
from pathlib import Path

import pytest

from conftest import BIN, run

pytestmark = pytest.mark.slow
KDPIPE = BIN + "/kdpipe"


def sha256(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


@contextmanager
def one_byte_changed(path: Path):
    """Flip one byte in the middle of ``path``; restore it afterwards (the project is shared by other tests)."""
    data = path.read_bytes()
    i = len(data) // 2
    path.write_bytes(data[:i] + bytes([data[i] ^ 0xFF]) + data[i + 1:])
    try:
        yield
    finally:
        path.write_bytes(data)


def version(proj) -> str:
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=f"sqlite:///{proj / 'mlflow.db'}").get_model_version_by_alias(
        "kdpipe-student", "candidate").version


def lineage(proj, *args, check=True):
    return run([KDPIPE, "lineage", "kdpipe-student@candidate", *args], proj, check=check)


def test_report_fits_25_lines_verdict_first(dvc_project):
    proj, _ = dvc_project
    out = lineage(proj).stdout.strip().splitlines()
    assert len(out) <= 25, "\n".join(out)
    assert out[0].startswith("lineage of kdpipe-student@candidate: data-free: after train-teacher, synthesize and "
                             "distill read synthetic data only")
    text = "\n".join(out)
    onnx_sha = sha256(proj / "data/export/student.onnx")
    commit = run(["git", "rev-parse", "HEAD"], proj).stdout.strip()
    v = version(proj)
    assert f"  model     kdpipe-student/{v} (@candidate), registered " in text
    assert f"  file      model.onnx sha256 {onnx_sha} (what the registry serves)" in text
    assert f"  commit    {commit} (clean)" in text
    assert "  data      digits, prepared splits data/prepared" in text and "(read by train-teacher only)" in text
    assert "  teacher   digits_cnn, trained by train-teacher run" in text
    m = json.loads((proj / "data/reports/metrics.json").read_text())
    assert f"teacher {m['teacher']['accuracy']:.4f}  student {m['student']['accuracy']:.4f}" in text
    chain = [line.split()[0] for line in out if line.startswith("    ")]
    assert chain == ["export", "distill", "synthesize", "train-teacher"]
    assert max(len(line) for line in out) <= 130
    # the latest version is found by name too, with its alias (search results carry none)
    assert f"kdpipe-student/{v} (@candidate)" in run([KDPIPE, "lineage", "kdpipe-student"], proj).stdout


def test_json_and_verbose(dvc_project):
    proj, _ = dvc_project
    r = lineage(proj, "--json")
    res = json.loads(r.stdout[r.stdout.index("{"):])
    assert res["ok"] and res["data"] == "digits" and res["route"] == "data-free"
    assert all(s["git_dirty"] is False for s in res["chain"])  # a boolean, not the string "False"
    assert res["model"]["aliases"] == ["candidate"]
    export = res["chain"][0]
    assert export["params"]["export.opset"] and export["params"]["export.int8"] == "True"  # export logs its params
    verbose = lineage(proj, "--verbose").stdout
    assert "dvc.outs.data/synthetic = " in verbose and "params synthesize." in verbose
    assert max(len(line) for line in verbose.splitlines()) <= 130


def test_verify_passes_then_fails_naming_the_changed_artifact(dvc_project):
    from mlflow import MlflowClient

    proj, _ = dvc_project
    ok = lineage(proj, "--verify")
    checks = [line for line in ok.stdout.splitlines() if line.startswith("  verify")]
    assert ok.returncode == 0 and checks and all(" ok " in c for c in checks), ok.stdout
    assert any(f"registered model: models:/kdpipe-student/{version(proj)} model.onnx sha256 matches" in c for c in checks)
    assert any("synthetic set: data/synthetic dvc md5 matches" in c for c in checks)

    with one_byte_changed(proj / "data/synthetic/samples.pt"):
        bad = lineage(proj, "--verify", check=False)
    assert bad.returncode == 1
    (line,) = [x for x in bad.stdout.splitlines() if "MISMATCH" in x]
    assert "synthetic set: data/synthetic dvc md5" in line and "changed: samples.pt" in line

    client = MlflowClient(tracking_uri=f"sqlite:///{proj / 'mlflow.db'}")
    mv = client.get_model_version_by_alias("kdpipe-student", "candidate")
    model_id = mv.source.removeprefix("models:/")  # the logged model the version serves
    (served,) = (proj / "mlartifacts").glob(f"**/models/{model_id}/artifacts/model.onnx")
    assert sha256(served) == sha256(proj / "data/export/student.onnx") == mv.tags["onnx.sha256"]  # one file, same bytes
    with one_byte_changed(served):
        bad = lineage(proj, "--verify", check=False)
    assert bad.returncode == 1
    (line,) = [x for x in bad.stdout.splitlines() if "MISMATCH" in x]
    assert f"registered model: models:/kdpipe-student/{mv.version} model.onnx sha256" in line
    assert lineage(proj, "--verify").returncode == 0  # restored


def test_html_graph_written_and_logged(dvc_project, tmp_path):
    from mlflow import MlflowClient

    proj, _ = dvc_project
    page = tmp_path / "lineage.html"
    lineage(proj, "--html", str(page))
    text = page.read_text()
    assert "<svg" in text and "synthetic set: data/synthetic" in text and "written by distill run" in text
    client = MlflowClient(tracking_uri=f"sqlite:///{proj / 'mlflow.db'}")
    mv = client.get_model_version_by_alias("kdpipe-student", "candidate")
    assert "lineage/lineage.html" in {a.path for a in client.list_artifacts(mv.run_id, "lineage")}


def test_registered_onnx_has_a_signature_and_the_pytorch_flavour_sits_beside_it(dvc_project, monkeypatch):
    import mlflow
    import torch

    from kdpipe import paths
    from kdpipe.checkpoints import load_model

    proj, _ = dvc_project
    monkeypatch.chdir(proj)
    mlflow.set_tracking_uri(f"sqlite:///{proj / 'mlflow.db'}")
    client = mlflow.MlflowClient()
    mv = client.get_model_version_by_alias("kdpipe-student", "candidate")
    sig = mlflow.models.get_model_info(f"models:/kdpipe-student/{mv.version}").signature
    (inp,), (out,) = sig.inputs.inputs, sig.outputs.inputs
    assert inp.shape == (-1, 1, 8, 8) and out.shape == (-1, 10)
    exp = client.get_run(mv.run_id).info.experiment_id
    (torch_model,) = [m for m in mlflow.search_logged_models(experiment_ids=[exp], output_format="list")
                      if m.source_run_id == mv.run_id and m.name == "student_torch"]
    loaded = mlflow.pytorch.load_model(f"models:/{torch_model.model_id}")  # torch.export's .pt2: no pickle
    student, _ = load_model(paths.STUDENT, "cpu")
    x = torch.rand(5, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(loaded(x), student(x), atol=1e-5)
