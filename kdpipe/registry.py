"""The MLflow model registry: registering the exported student (``register_student``) and hashing the
model.onnx a registered version serves (``served_sha256``)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from kdpipe.config import Config

if TYPE_CHECKING:
    from kdpipe.tracking import Tracker


def served_sha256(name: str, version: str, uri: str | None = None) -> str | None:
    """sha256 of the model.onnx the registry (at ``uri``, default the current one) serves for ``name/version``
    (downloaded, then hashed); None when the version serves no model.onnx."""
    import tempfile

    import mlflow

    from kdpipe.utils import sha256_file

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    with tempfile.TemporaryDirectory() as tmp:
        f = Path(mlflow.artifacts.download_artifacts(f"models:/{name}/{version}", dst_path=tmp, tracking_uri=uri)) / "model.onnx"
        return sha256_file(f) if f.exists() else None


def register_student(tracker: Tracker, cfg: Config, onnx_path, pytorch_dir, metrics: dict,
                     signature=None, pytorch_model=None, example=None) -> str | None:
    """Log the student (ONNX model + the PyTorch state_dict and spec) in the export run, register it
    as ``tracking.registered_model`` and point ``tracking.alias`` at the new version, whose tags
    carry the evaluation metrics. Returns the version."""
    if not tracker.mlflow or not cfg.tracking.registered_model:
        return None
    import mlflow
    import mlflow.onnx
    import mlflow.pytorch
    import onnx
    import onnxruntime

    name = cfg.tracking.registered_model
    # the requirements are known: pinning them skips MLflow's inference (it imports the model in a subprocess, ~6 s)
    reqs = [f"onnx=={onnx.__version__}", f"onnxruntime=={onnxruntime.__version__}"]
    # one file (no external weights), so the registry serves the bytes of data/export/student.onnx
    info = mlflow.onnx.log_model(onnx.load(str(onnx_path)), name="student", registered_model_name=name,
                                 pip_requirements=reqs, save_as_external_data=False, signature=signature)
    mlflow.log_artifacts(str(pytorch_dir), "student_pytorch")  # the state_dict + spec: torch.load(weights_only=True)
    if pytorch_model is not None:  # the PyTorch flavour beside the ONNX one: torch.export's .pt2 (a traced graph, no
        import torch                # pickle), loaded by mlflow.pytorch.load_model

        mlflow.pytorch.log_model(pytorch_model.eval(), name="student_torch", input_example=example, signature=signature,
                                 pip_requirements=[f"torch=={torch.__version__.split('+')[0]}"])
    mlflow.log_metrics({k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))}, model_id=info.model_id)
    client = mlflow.MlflowClient()
    version = str(info.registered_model_version)
    served = served_sha256(name, version)  # the hash an auditor gets from the registry (kdpipe lineage --verify)
    if served != metrics.get("onnx.sha256"):
        print(f"[kdpipe] note: the registry's model.onnx (sha256 {served[:12]}) differs in bytes from {onnx_path}; "
              "the version records the registry's hash", flush=True)
    metrics = {**metrics, "onnx.sha256": served, "export.onnx.sha256": metrics.get("onnx.sha256")}
    for k, v in {**metrics, "run_id": tracker.run_id}.items():
        client.set_model_version_tag(name, version, k, str(v))
    if cfg.tracking.alias:
        client.set_registered_model_alias(name, cfg.tracking.alias, version)
    tracker.set_tags({"registered_model": f"{name}/{version}"})
    return version
