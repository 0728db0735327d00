"""``kdpipe score STUDENT.onnx --data FOLDER [--teacher TEACHER.onnx]``: the data owner's check.

Run on the data owner's side, where the real data is: scores the exported student (and the teacher, when
given) on a labelled ImageFolder (``FOLDER/<class>/<image>``, class folders named as the model's classes)
with onnxruntime alone. Each model is fed its own input convention: the student's from its ONNX metadata
(input_size, input_layout, input_value_range, input_mean, input_std, as export writes them), the teacher's
from the card (params.yaml ``teacher``, or --set teacher.range=... etc.; layout read from the ONNX input).
The result is one MLflow run (``kdpipe.stage`` = score) with the folder's digest as its input, linked to the
registered model version whose ``onnx.sha256`` is the student file's, so ``kdpipe lineage`` shows it.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import torch

from kdpipe.config import Config, ConfigError
from kdpipe.errors import DataError
from kdpipe.utils import sha256_file


def folder_digest(root: Path, files: list[Path]) -> str:
    """sha256 over (relative path, file sha256) of every image: the owner's data version, never its content."""
    h = hashlib.sha256()
    for f in files:
        h.update(f.relative_to(root).as_posix().encode() + b"\0" + sha256_file(f).encode())
    return h.hexdigest()


def read_folder(root: Path, classes: list[str], channels: int, size: int) -> tuple[torch.Tensor, torch.Tensor, list[Path]]:
    from kdpipe.data import IMG_EXT, _read_images

    if not root.is_dir():
        raise DataError(f"--data '{root}' is not a folder (<folder>/<class>/<image>)")
    dirs = sorted(d for d in root.iterdir() if d.is_dir())
    unknown = [d.name for d in dirs if d.name not in classes]
    if unknown or not dirs:
        raise DataError(f"--data '{root}': class folders {unknown or '(none)'} are not among the model's classes "
                        f"{classes[:20]}")
    files, labels = [], []
    for d in dirs:
        fs = sorted(f for f in d.rglob("*") if f.suffix.lower() in IMG_EXT)
        files += fs
        labels += [classes.index(d.name)] * len(fs)
    if not files:
        raise DataError(f"--data '{root}' holds no images")
    x = torch.from_numpy(_read_images(files, channels, size)).float() / 255.0
    return x, torch.tensor(labels), files


def _meta(sess) -> dict:
    return dict(sess.get_modelmeta().custom_metadata_map)


def student_convention(meta: dict) -> dict:
    return {"layout": meta.get("input_layout", "NCHW"), "range": json.loads(meta.get("input_value_range", "[0, 1]")),
            "mean": json.loads(meta.get("input_mean", "null")), "std": json.loads(meta.get("input_std", "null"))}


def teacher_convention(cfg: Config, sess) -> dict:
    t = cfg.teacher
    if t.range is None:
        raise ConfigError("--teacher: the teacher card's teacher.range is not set (params.yaml or --set teacher.range=[0, 255])")
    dims = [d if isinstance(d, int) else None for d in sess.get_inputs()[0].shape]
    from kdpipe.teacher_card import _infer_layout

    return {"layout": _infer_layout(dims, t.layout, "--teacher"), "range": list(t.range), "mean": t.mean, "std": t.std}


def run_model(sess, x01: torch.Tensor, conv: dict, batch: int = 256) -> np.ndarray:
    from kdpipe.teacher_card import to_convention

    name = sess.get_inputs()[0].name
    return np.concatenate([sess.run(None, {name: to_convention(xb, conv).numpy().astype(np.float32)})[0]
                           for xb in x01.split(batch)])


def _link(client, cfg: Config, sha: str):
    """The registered model version whose onnx.sha256 tag is ``sha`` (None when not registered here)."""
    name = cfg.tracking.registered_model
    if not name:
        return None
    try:
        versions = client.search_model_versions(f"name = '{name}'")
    except Exception:
        return None
    return next((v for v in versions if v.tags.get("onnx.sha256") == sha), None)


def score(cfg: Config, student: str, folder: str, teacher: str | None = None, out: str | None = None) -> dict:
    from kdpipe.quantize import session

    sp = Path(student)
    if not sp.is_file():
        raise ConfigError(f"student '{sp}' does not exist")
    s_sess = session(sp)
    meta = _meta(s_sess)
    if "classes" not in meta or "input_size" not in meta:
        raise ConfigError(f"'{sp}' has no kdpipe metadata (classes, input_size): not a student exported by kdpipe")
    classes, (c, h, _) = json.loads(meta["classes"]), json.loads(meta["input_size"])
    root = Path(folder)
    x, y, files = read_folder(root, classes, c, h)
    s_logits = run_model(s_sess, x, student_convention(meta))
    res = {"student": str(sp), "student_sha256": sha256_file(sp), "data": str(root), "n": len(y),
           "data_digest": folder_digest(root, files),
           "student_accuracy": float((s_logits.argmax(1) == y.numpy()).mean())}
    if teacher:
        tp = Path(teacher)
        if tp.suffix.lower() != ".onnx" or not tp.is_file():
            raise ConfigError(f"--teacher '{tp}': an ONNX file (scored with onnxruntime alone)")
        t_sess = session(tp)
        t_logits = run_model(t_sess, x, teacher_convention(cfg, t_sess))
        res.update({"teacher": str(tp), "teacher_sha256": sha256_file(tp),
                    "teacher_accuracy": float((t_logits.argmax(1) == y.numpy()).mean()),
                    "agreement": float((t_logits.argmax(1) == s_logits.argmax(1)).mean())})
        res["student_over_teacher"] = res["student_accuracy"] / max(res["teacher_accuracy"], 1e-9)
    res["per_class_accuracy"] = {cl: float((s_logits.argmax(1)[y.numpy() == i] == i).mean())
                                 for i, cl in enumerate(classes) if (y == i).any()}
    res.update(_log(cfg, res))
    if out:
        from kdpipe.utils import save_json

        save_json(res, out)
    return res


def _log(cfg: Config, res: dict) -> dict:
    """One MLflow run for the score, linked to the registered version of the same ONNX file."""
    if not cfg.tracking.enabled:
        return {}
    import mlflow

    from kdpipe.provenance import git_state
    from kdpipe.tracking import setup_mlflow

    setup_mlflow(cfg)
    client = mlflow.MlflowClient()
    mv = _link(client, cfg, res["student_sha256"])
    link = f"{mv.name}/{mv.version}" if mv else None
    tags = {"kdpipe.stage": "score", "onnx.sha256": res["student_sha256"], "kdpipe.privacy": "owner-side",
            **({"kdpipe.scored_model": link} if link else {}), **git_state()}
    with mlflow.start_run(run_name="score", tags=tags) as run:
        mlflow.log_params({"student": res["student"], "data": res["data"], "n": res["n"],
                           **({"teacher": res["teacher"], "teacher_sha256": res["teacher_sha256"]} if "teacher" in res else {})})
        mlflow.log_metrics({k: v for k, v in res.items() if isinstance(v, float)})
        from mlflow.data.meta_dataset import MetaDataset
        from mlflow.data.sources import LocalArtifactDatasetSource

        ds = MetaDataset(LocalArtifactDatasetSource(str(Path(res["data"]).resolve())), name="owner-data",
                         digest=res["data_digest"][:36])
        mlflow.log_input(ds, context="owner-evaluation", tags={"kdpipe.data_kind": "real"})
    if mv:
        for k in ("student_accuracy", "teacher_accuracy", "agreement"):
            if k in res:
                client.set_model_version_tag(mv.name, mv.version, f"owner_score.{k}", f"{res[k]:.4f}")
        client.set_model_version_tag(mv.name, mv.version, "owner_score.run_id", run.info.run_id)
    return {"run_id": run.info.run_id, "linked_model": link}


def format_text(res: dict) -> str:
    lines = [f"kdpipe score: {res['n']} labelled images of '{res['data']}' (onnxruntime)",
             f"  student  {res['student_accuracy']:.4f}  {res['student']} (sha256 {res['student_sha256'][:12]})"]
    if "teacher" in res:
        lines += [f"  teacher  {res['teacher_accuracy']:.4f}  {res['teacher']} (sha256 {res['teacher_sha256'][:12]})",
                  f"  agreement {res['agreement']:.4f}, student/teacher {res['student_over_teacher']:.4f}"]
    if res.get("run_id"):
        lines.append(f"  MLflow run {res['run_id']}" + (f", linked to {res['linked_model']}" if res.get("linked_model")
                                                         else " (no registered version holds this ONNX file)"))
    return "\n".join(lines)


def owner_stats(cfg: Config, folder: str, out: str, batch: int = 256) -> dict:
    """``kdpipe activation-stats``: the data owner's aggregate for a teacher without BatchNorm. Per-channel mean and
    variance of every convolution's output of the card's teacher over the labelled or unlabelled images of
    ``folder`` (ImageFolder), written to ``out`` (tensors only: loaded with weights_only=True) with the teacher's
    sha256; synthesis matches them as the BN prior (``synthesize.stats``). Two numbers per channel: no image,
    no label, no per-sample value leaves the owner."""
    from kdpipe.synth.bn_hooks import activation_stats
    from kdpipe.teacher_card import load_card
    from kdpipe.utils import save_torch

    teacher, card = load_card(cfg.teacher)
    x, _, files = read_folder(Path(folder), card.classes, card.channels, card.input_size)
    layers = activation_stats(teacher, x.split(batch))
    save_torch({"teacher_sha256": card.sha256, "n_images": len(files), "layers": layers}, out)
    return {"out": out, "n_images": len(files), "layers": len(layers), "teacher_sha256": card.sha256}
