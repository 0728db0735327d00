"""Stage evaluate: teacher, data-free student and (when it exists) the from-scratch baseline on the
real test split -> data/reports/metrics.json (DVC metrics), confusion matrices (PNG + CSV for DVC
plots) and per-class accuracy. ``routes`` in metrics.json puts the routes that exist side by side:
scratch (the baseline) and the student under its distill route (data-free, kd-real, kd-mixed: from
data/student/spec.json); export adds data-free + INT8 in its own metrics.json (kdpipe.pipeline.routes)."""
from __future__ import annotations

import torch

from kdpipe import data, paths
from kdpipe.config import Config
from kdpipe.errors import DataError
from kdpipe.models import build_model
from kdpipe.train import predict
from kdpipe.utils import sha256_file
from kdpipe.utils import atomic_path, load_json, load_torch, pick_device, save_figure, save_json


STAGE_OF = {paths.TEACHER: "train-teacher", paths.BASELINE: "baseline", paths.STUDENT: "distill"}  # who writes it


def read_spec(folder) -> dict:
    if not (folder / "spec.json").exists():
        raise DataError(f"'{folder / 'spec.json'}' is missing: run the {STAGE_OF.get(folder, 'stage that writes it')} "
                        "stage first")
    return load_json(folder / "spec.json")


def load_model(folder, device, spec: dict | None = None):
    spec = spec or read_spec(folder)
    if not spec.get("enabled", True):
        return None, spec
    model = build_model(spec)
    model.load_state_dict(load_torch(folder / "model.pt"))
    return model.to(device).eval(), spec


def confusion(pred: torch.Tensor, y: torch.Tensor, C: int) -> torch.Tensor:
    return torch.bincount(y * C + pred, minlength=C * C).view(C, C)


def plot_confusion(cm: torch.Tensor, classes: list[str], title: str, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(0.5 * len(classes) + 2, 0.5 * len(classes) + 1.5))
    ax.imshow(cm.numpy(), cmap="Blues")
    ax.set_xticks(range(len(classes)), classes, rotation=90, fontsize=7)
    ax.set_yticks(range(len(classes)), classes, fontsize=7)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    for i in range(len(classes)):
        for j in range(len(classes)):
            if cm[i, j]:
                ax.text(j, i, int(cm[i, j]), ha="center", va="center", fontsize=6,
                        color="white" if cm[i, j] > cm.max() / 2 else "black")
    save_figure(fig, path)
    plt.close(fig)


def run(cfg: Config, tracker) -> dict:
    device = pick_device(cfg.device)
    x, y = data.load_split("test", device)
    classes = data.load_meta()["classes"]
    C = len(classes)
    models = {"teacher": paths.TEACHER, "student": paths.STUDENT, "baseline": paths.BASELINE}
    preds, metrics = {}, {"n_test": len(y)}
    specs = {name: read_spec(folder) for name, folder in models.items()}  # every input first: fail before any work
    for name, folder in models.items():
        model, _ = load_model(folder, device, specs[name])
        if model is None:
            continue
        p = predict(model, x).argmax(1)
        preds[name] = p
        cm = confusion(p.cpu(), y.cpu(), C)
        per_class = (cm.diag().float() / cm.sum(1).clamp_min(1)).tolist()
        metrics[name] = {"accuracy": (p == y).float().mean().item(),
                         "per_class": {c: round(a, 4) for c, a in zip(classes, per_class)}}
        plot_confusion(cm, classes, f"{name}: acc {metrics[name]['accuracy']:.4f}", paths.REPORTS / "figures" / f"confusion_{name}.png")
        tracker.log_artifact(paths.REPORTS / "figures" / f"confusion_{name}.png")
        tracker.log_metrics({f"{name}_accuracy": metrics[name]["accuracy"]})
    route = specs["student"].get("route", "data-free")
    metrics["student"]["route"] = route
    metrics["routes"] = {**({"scratch": metrics["baseline"]["accuracy"]} if "baseline" in metrics else {}),
                         route: metrics["student"]["accuracy"]}
    tracker.set_tags({"kdpipe.route": route})
    metrics["agreement"] = (preds["student"] == preds["teacher"]).float().mean().item()
    metrics["student_over_teacher"] = metrics["student"]["accuracy"] / max(metrics["teacher"]["accuracy"], 1e-9)
    tracker.log_metrics({"agreement": metrics["agreement"], "student_over_teacher": metrics["student_over_teacher"]})
    with atomic_path(paths.REPORTS / "predictions.csv") as tmp:
        tmp.write_text("actual,predicted\n" + "".join(
            f"{classes[a]},{classes[b]}\n" for a, b in zip(y.tolist(), preds["student"].tolist())))
    with atomic_path(paths.REPORTS / "per_class.csv") as tmp:
        cols = [m for m in ("teacher", "student", "baseline") if m in metrics]
        tmp.write_text("class," + ",".join(cols) + "\n" + "".join(
            f"{c}," + ",".join(str(metrics[m]["per_class"][c]) for m in cols) + "\n" for c in classes))
    save_json(metrics, paths.REPORTS / "metrics.json")
    tracker.log_artifact(paths.REPORTS / "metrics.json")
    tracker.log_data_input("real-test", paths.PREPARED, "real", context="evaluation")
    tracker.set_tags({"student.sha256": sha256_file(paths.STUDENT / "model.pt")})
    out = {k: round(metrics[k]["accuracy"], 4) for k in ("teacher", "student", "baseline") if k in metrics}
    return {**out, "agreement": round(metrics["agreement"], 4)}
