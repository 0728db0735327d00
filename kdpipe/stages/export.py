"""Stage export: the student as ONNX (data/export/student.onnx).

Input ``input``: float32 N×C×H×W in [0, 1] (normalisation is inside the graph), dynamic batch;
output ``logits``. metadata_props: classes (JSON list, model order), input_size (JSON [C, H, W]),
input_range, arch. Checked with onnx.checker and against PyTorch through onnxruntime on the test
split; the parity figures go to data/export/metrics.json (DVC metrics).

With ``export.int8`` (default true) also ``student.int8.onnx``: static QDQ INT8 calibrated on
``export.calibration_samples`` synthetic samples only (kdpipe/quantize.py), scored on the test split
(accuracy, top-1 agreement with FP32), with its size and the single-thread CPU latency (median ms,
batch 1 and 64) of both models in metrics.json. dvc.yaml declares it as an out, so under DVC keep
int8 true; with int8 false (kdpipe run --no-dvc) the stage writes no INT8 file and removes a stale one."""
from __future__ import annotations

import json

import numpy as np
import onnx
import torch

from kdpipe import data, paths
from kdpipe.checkpoints import load_model
from kdpipe.config import Config
from kdpipe.errors import DataError, ExportError
from kdpipe.quantize import calibration_subset, latency_ms, quantize_int8, session
from kdpipe.registry import register_student
from kdpipe.train import predict
from kdpipe.utils import atomic_path, load_json, load_torch, save_json, sha256_file


def as_exported(model: torch.nn.Module, spec: dict) -> torch.nn.Module:
    """The student as it is exported: with a teacher card, behind the teacher's input convention (InputAdapter)."""
    from kdpipe.teacher_card import InputAdapter

    return InputAdapter(model, spec["input"]) if spec.get("input") else model


def export_onnx(model: torch.nn.Module, spec: dict, path, opset: int) -> None:
    """``model`` (the student, [0, 1] N×C×H×W) as ONNX at ``path`` (export.run's temp path); with a teacher card
    (spec["input"]) it takes the teacher's own input convention instead (InputAdapter: a drop-in replacement)."""
    from kdpipe.teacher_card import to_convention

    c, s, conv = spec["in_channels"], spec["image_size"], spec.get("input")
    net = as_exported(model, spec)
    dummy = to_convention(torch.rand(2, c, s, s), conv)
    conv = conv or {"layout": "NCHW", "range": [0, 1], "mean": None, "std": None}
    torch.onnx.export(net.cpu().eval(), (dummy,), str(path), input_names=["input"], output_names=["logits"],
                      opset_version=opset, dynamo=True, external_data=False,
                      dynamic_shapes={"x": {0: torch.export.Dim("batch")}})
    m = onnx.load(str(path))
    props = {"classes": json.dumps(spec["classes"]), "input_size": json.dumps([c, s, s]),
             "input_layout": conv["layout"], "input_value_range": json.dumps(list(conv["range"])),
             "input_mean": json.dumps(conv["mean"]), "input_std": json.dumps(conv["std"]),
             "input_range": f"{list(conv['range'])} float32, {conv['layout']}"
                            + ("" if conv["mean"] is None else ", then (x - input_mean) / input_std")
                            + "; resize (bilinear) to H x W", "arch": spec["arch"]}
    for k, v in props.items():
        m.metadata_props.add(key=k, value=v)
    onnx.checker.check_model(m)
    onnx.save(m, str(path))


def export_int8(cfg: Config, fp32_path, x: np.ndarray, y: np.ndarray, fp32_logits: np.ndarray, conv=None) -> dict:
    """student.int8.onnx, calibrated on synthetic samples only; its figures next to FP32's."""
    path, samples = paths.EXPORT / "student.int8.onnx", paths.SYNTHETIC / "samples.pt"
    if not samples.exists():
        raise DataError(f"export.int8: calibration samples '{samples}' are missing: run the synthesize stage")
    calib = calibration_subset(load_torch(samples)["x"], cfg.export.calibration_samples, cfg.seed)
    quantize_int8(fp32_path, path, calib, cfg.export.int8_activations, conv)
    fp32, int8 = session(fp32_path), session(path)
    got = int8.run(["logits"], {"input": x})[0]
    m = {"int8_accuracy": float((got.argmax(1) == y).mean()),
         "int8_top1_agreement": float((got.argmax(1) == fp32_logits.argmax(1)).mean()),
         "int8_max_abs_diff": float(np.abs(got - fp32_logits).max()),
         "int8_calibration_samples": len(calib), "int8_size_bytes": path.stat().st_size, "int8_sha256": sha256_file(path)}
    for b in (1, 64):
        xb = np.ascontiguousarray(x[np.arange(b) % len(x)])
        m[f"latency_ms_b{b}_fp32"], m[f"latency_ms_b{b}_int8"] = latency_ms(fp32, xb), latency_ms(int8, xb)
    return m


def reference(cfg: Config, spec: dict):
    """(x in [0, 1], labels, what the labels are): the real test split, or without real data (data.name: none)
    the held-out synthetic set labelled by the teacher's argmax (kdpipe/fidelity.py)."""
    if cfg.data.name == "none":
        from kdpipe.fidelity import heldout_images
        from kdpipe.teachers import load_teacher

        x = heldout_images(cfg, spec).float() / 255.0
        return x, predict(load_teacher(cfg, "cpu")[0], x).argmax(1), "teacher"
    meta = data.load_meta()  # the input spec must match the data the ONNX model will be scored and used on
    want = (meta["channels"], meta["image_size"], list(meta["classes"]))
    if (spec["in_channels"], spec["image_size"], list(spec["classes"])) != want:
        raise DataError(
            f"export: the student '{paths.STUDENT / 'spec.json'}' takes {spec['in_channels']}x{spec['image_size']}x"
            f"{spec['image_size']} input with classes {spec['classes'][:10]}, but the data '{paths.PREPARED / 'meta.json'}' "
            f"is {want[0]}x{want[1]}x{want[1]} with classes {want[2][:10]}: re-run train-teacher, synthesize and distill on it")
    x, y = data.load_split("test", "cpu")
    return x, y, "real"


def run(cfg: Config, tracker) -> dict:
    import onnxruntime as ort

    from kdpipe.teacher_card import to_convention

    model, spec = load_model(paths.STUDENT, "cpu")
    x, y, labels = reference(cfg, spec)
    acc = "accuracy" if labels == "real" else "teacher_agreement"  # against real labels, or the teacher's
    out = paths.EXPORT / "student.onnx"
    ref = predict(model, x).numpy()
    xin = to_convention(x, spec.get("input")).numpy()  # what the ONNX student takes: the teacher's convention
    with atomic_path(out) as tmp:  # verified before it is moved into place: a failed check keeps the last export
        export_onnx(model, spec, tmp, cfg.export.opset)
        got = ort.InferenceSession(str(tmp), providers=["CPUExecutionProvider"]).run(["logits"], {"input": xin})[0]
        diff = float(np.abs(got - ref).max())
        if diff > cfg.export.atol:
            raise ExportError(f"export: onnxruntime differs from PyTorch by {diff:.2e} > export.atol {cfg.export.atol} "
                              f"on {len(x)} inputs; '{out}' was not replaced")
    metrics = {
        "max_abs_diff": diff,
        "max_abs_diff_1e-6": round(diff * 1e6, 4),  # the same in units of 1e-6: `dvc metrics show` rounds diff to 0.0
        "top1_agreement": float((got.argmax(1) == ref.argmax(1)).mean()),
        f"onnx_{acc}": float((got.argmax(1) == y.numpy()).mean()),
        "n_test": int(len(y)),
        "reference": "real test split" if labels == "real" else "held-out synthetic set, teacher argmax (no real data)",
        "sha256": sha256_file(out),
        "size_bytes": out.stat().st_size,
    }
    if cfg.export.int8:
        m8 = export_int8(cfg, out, xin, y.numpy(), got, spec.get("input"))
        metrics.update({k.replace("int8_accuracy", f"int8_{acc}"): v for k, v in m8.items()})
        tracker.log_artifact(paths.EXPORT / "student.int8.onnx")
    else:
        (paths.EXPORT / "student.int8.onnx").unlink(missing_ok=True)  # no stale INT8 model beside a new FP32 one
    save_json(metrics, paths.EXPORT / "metrics.json")
    tracker.log_metrics({k: v for k, v in metrics.items() if not k.endswith("sha256") and not isinstance(v, str)})
    tracker.set_tags({"onnx.sha256": metrics["sha256"], "student.sha256": sha256_file(paths.STUDENT / "model.pt"),
                      **({"kdpipe.real_data": "none"} if labels != "real" else {})})
    reports = paths.REPORTS / "metrics.json"
    evaluated = load_json(reports) if reports.exists() else {}
    tracker.log_params({"export": cfg.export.model_dump(mode="json"), "seed": cfg.seed})
    version = None
    if tracker.mlflow:
        from mlflow.models import infer_signature  # input and logits: shapes and dtypes, batch dynamic

        version = register_student(tracker, cfg, out, paths.STUDENT, signature=infer_signature(xin[:2], got[:2]),
                                   pytorch_model=as_exported(model, spec), example=xin[:2], metrics={
            **{f"{k}_accuracy": evaluated[k]["accuracy"] for k in ("teacher", "student")
               if "accuracy" in evaluated.get(k, {})},
            **({"fidelity_agreement": evaluated["agreement"], "fidelity_kl": evaluated["student"]["kl"]}
               if evaluated.get("data") == "none" else {}),
            **{k: v for k, v in metrics.items() if k in ("onnx_accuracy", "onnx_teacher_agreement", "top1_agreement",
                                                          "max_abs_diff")},
            "onnx.sha256": metrics["sha256"]})
    return {**({"registered": f"{cfg.tracking.registered_model}/{version}"} if version else {}),
            "max_abs_diff": f"{diff:.1e}", "top1_agreement": metrics["top1_agreement"],
            f"onnx_{acc}": round(metrics[f"onnx_{acc}"], 4),
            **({f"int8_{acc}": round(metrics[f"int8_{acc}"], 4),
                "int8_top1_agreement": round(metrics["int8_top1_agreement"], 4)} if cfg.export.int8 else {})}
