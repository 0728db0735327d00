"""Stage export: the student as ONNX (data/export/student.onnx).

Input ``input``: float32 N×C×H×W in [0, 1] (normalisation is inside the graph), dynamic batch;
output ``logits``. metadata_props: classes (JSON list, model order), input_size (JSON [C, H, W]),
input_range, arch. Checked with onnx.checker and against PyTorch through onnxruntime on the test
split; the parity figures go to data/export/metrics.json (DVC metrics)."""
from __future__ import annotations

import json

import numpy as np
import onnx
import torch

from kdpipe import data, paths
from kdpipe.config import Config
from kdpipe.stages.evaluate import load_model
from kdpipe.train import predict
from kdpipe.utils import atomic_path, save_json, sha256_file


def export_onnx(model: torch.nn.Module, spec: dict, path, opset: int) -> None:
    c, s = spec["in_channels"], spec["image_size"]
    dummy = torch.rand(2, c, s, s)
    with atomic_path(path) as tmp:
        torch.onnx.export(model.cpu().eval(), (dummy,), str(tmp), input_names=["input"], output_names=["logits"],
                          opset_version=opset, dynamo=True, external_data=False,
                          dynamic_shapes={"x": {0: torch.export.Dim("batch")}})
        m = onnx.load(str(tmp))
        props = {"classes": json.dumps(spec["classes"]), "input_size": json.dumps([c, s, s]),
                 "input_range": "[0, 1] float32, N x C x H x W; resize (bilinear) to H x W", "arch": spec["arch"]}
        for k, v in props.items():
            m.metadata_props.add(key=k, value=v)
        onnx.checker.check_model(m)
        onnx.save(m, str(tmp))


def run(cfg: Config, tracker) -> dict:
    import onnxruntime as ort

    model, spec = load_model(paths.STUDENT, "cpu")
    out = paths.EXPORT / "student.onnx"
    export_onnx(model, spec, out, cfg.export.opset)
    x, y = data.load_split("test", "cpu")
    ref = predict(model, x).numpy()
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    got = sess.run(["logits"], {"input": x.numpy()})[0]
    diff = float(np.abs(got - ref).max())
    metrics = {
        "max_abs_diff": diff,
        "top1_agreement": float((got.argmax(1) == ref.argmax(1)).mean()),
        "onnx_accuracy": float((got.argmax(1) == y.numpy()).mean()),
        "n_test": int(len(y)),
        "sha256": sha256_file(out),
        "size_bytes": out.stat().st_size,
    }
    if diff > cfg.export.atol:
        raise RuntimeError(f"export: onnxruntime differs from PyTorch by {diff:.2e} > export.atol {cfg.export.atol}")
    save_json(metrics, paths.EXPORT / "metrics.json")
    tracker.log_metrics({k: v for k, v in metrics.items() if k != "sha256"})
    tracker.set_tags({"onnx.sha256": metrics["sha256"]})
    tracker.log_artifact(out)
    return {"max_abs_diff": f"{diff:.1e}", "top1_agreement": metrics["top1_agreement"],
            "onnx_accuracy": round(metrics["onnx_accuracy"], 4)}
