"""Stage evaluate: teacher, data-free student and (when it exists) the from-scratch baseline on the
real test split -> data/reports/metrics.json (DVC metrics), confusion matrices (PNG + CSV for DVC
plots) and per-class accuracy (per_class.csv: class,model,accuracy; without real data class,agreement,
teacher_count; drawn as bars by kdpipe/dag.py's template). ``routes`` in metrics.json puts the routes
that exist side by side: scratch (the baseline) and the student under its distill route (data-free,
kd-real, kd-mixed: from data/student/spec.json); export adds data-free + INT8 in its own metrics.json
(kdpipe.pipeline.routes)."""
from __future__ import annotations

import torch

from kdpipe import data, paths
from kdpipe.checkpoints import load_model, read_spec
from kdpipe.config import Config
from kdpipe.train import predict
from kdpipe.utils import atomic_path, pick_device, save_figure, save_json, sha256_file


def confusion(pred: torch.Tensor, y: torch.Tensor, C: int) -> torch.Tensor:
    return torch.bincount(y * C + pred, minlength=C * C).view(C, C)


def csv_text(header: list[str], rows) -> str:
    """CSV for DVC plots: quoted where a class name holds a comma (ImageNet's "tench, Tinca tinca")."""
    import csv
    import io

    out = io.StringIO()
    w = csv.writer(out, lineterminator="\n")
    w.writerow(header)
    w.writerows(rows)
    return out.getvalue()


def plot_confusion(cm: torch.Tensor, classes: list[str], title: str, path, ylabel: str = "true class") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(0.5 * len(classes) + 2, 0.5 * len(classes) + 1.5))
    ax.imshow(cm.numpy(), cmap="Blues")
    ax.set_xticks(range(len(classes)), classes, rotation=90, fontsize=7)
    ax.set_yticks(range(len(classes)), classes, fontsize=7)
    ax.set_xlabel("predicted class")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    for i in range(len(classes)):
        for j in range(len(classes)):
            if cm[i, j]:
                ax.text(j, i, int(cm[i, j]), ha="center", va="center", fontsize=6,
                        color="white" if cm[i, j] > cm.max() / 2 else "black")
    save_figure(fig, path)
    plt.close(fig)


def run_fidelity(cfg: Config, tracker) -> dict:
    """No real data (data.name: none): the student against its teacher on a held-out synthetic set."""
    from kdpipe.fidelity import fidelity, heldout_images, torch_latency_ms
    from kdpipe.teachers import load_teacher, teacher_digest

    spec = read_spec(paths.STUDENT)
    teacher, tspec = load_teacher(cfg, "cpu")
    student, _ = load_model(paths.STUDENT, "cpu", spec)
    classes = tspec["classes"]
    x = heldout_images(cfg, tspec).float() / 255.0
    t, s = predict(teacher, x), predict(student, x)
    f = fidelity(t, s, classes, cfg.evaluate.ece_bins)
    n_params = sum(p.numel() for p in student.parameters())
    metrics = {
        "data": "none", "n_heldout": len(x), "heldout": "final generator, codes of seed + 1000003 (kdpipe/fidelity.py)",
        "teacher": {"source": cfg.teacher.source, "sha256": teacher_digest(cfg)},
        "student": {**f, "route": spec.get("route", "data-free"), "n_params": n_params,
                    "size_bytes": (paths.STUDENT / "model.pt").stat().st_size,
                    "latency_ms_b1": torch_latency_ms(student, x[:1]), "latency_ms_b64": torch_latency_ms(student, x[:64])},
        "agreement": f["agreement"],
    }
    tracker.log_params({"evaluate": cfg.evaluate.model_dump(mode="json")})
    tracker.log_metrics({"agreement": f["agreement"], "kl": f["kl"], "ece": f["ece"], "n_params": n_params,
                         "latency_ms_b1": metrics["student"]["latency_ms_b1"]})
    tracker.set_tags({"kdpipe.real_data": "none", "kdpipe.route": metrics["student"]["route"],
                      "student.sha256": sha256_file(paths.STUDENT / "model.pt"), "teacher.sha256": teacher_digest(cfg)})
    with atomic_path(paths.REPORTS / "predictions.csv") as tmp:  # "actual" = the teacher's class: no real labels
        tmp.write_text(csv_text(["actual", "predicted"], (
            (classes[a], classes[b]) for a, b in zip(t.argmax(1).tolist(), s.argmax(1).tolist()))))
    with atomic_path(paths.REPORTS / "per_class.csv") as tmp:  # agreement: empty for a class the teacher never predicted
        tmp.write_text(csv_text(["class", "agreement", "teacher_count"], (
            (c, "" if f["per_class_agreement"][c] is None else f["per_class_agreement"][c], n)
            for c, n in zip(classes, f["teacher_class_counts"]))))
    cm = confusion(s.argmax(1), t.argmax(1), len(classes))
    fig = paths.REPORTS / "figures" / "confusion_student_vs_teacher.png"
    plot_confusion(cm, classes, f"student vs teacher class\n(held-out synthetic, n={len(x)}): agreement "
                   f"{f['agreement']:.4f}", fig, ylabel="teacher class")
    tracker.log_artifact(fig)
    save_json(metrics, paths.REPORTS / "metrics.json")
    tracker.log_artifact(paths.REPORTS / "metrics.json")
    return {"agreement": round(f["agreement"], 4), "kl": round(f["kl"], 4), "ece": round(f["ece"], 4),
            "n_heldout": len(x)}


def run(cfg: Config, tracker) -> dict:
    if cfg.data.name == "none":
        return run_fidelity(cfg, tracker)
    device = pick_device(cfg.device)
    x, y = data.load_split("test", device)
    classes = data.load_meta()["classes"]
    C = len(classes)
    models = {"teacher": paths.TEACHER, "student": paths.STUDENT, "baseline": paths.BASELINE}
    preds, metrics = {}, {"n_test": len(y)}
    card = cfg.teacher.source is not None  # a teacher from its card: no data/teacher folder
    specs = {name: read_spec(folder) for name, folder in models.items()  # every input first: fail before any work
             if not (card and name == "teacher")}
    for name, folder in models.items():
        if card and name == "teacher":
            from kdpipe.teachers import load_teacher

            model = load_teacher(cfg, device)[0]
        else:
            model, _ = load_model(folder, device, specs[name])
        if model is None:
            continue
        p = predict(model, x).argmax(1)
        preds[name] = p
        cm = confusion(p.cpu(), y.cpu(), C)
        per_class = (cm.diag().float() / cm.sum(1).clamp_min(1)).tolist()
        metrics[name] = {"accuracy": (p == y).float().mean().item(),
                         "per_class": {c: round(a, 4) for c, a in zip(classes, per_class)}}
        plot_confusion(cm, classes, f"{name} predictions vs true class\n(real test split, n={len(y)}): accuracy "
                       f"{metrics[name]['accuracy']:.4f}", paths.REPORTS / "figures" / f"confusion_{name}.png")
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
        tmp.write_text(csv_text(["actual", "predicted"], (
            (classes[a], classes[b]) for a, b in zip(y.tolist(), preds["student"].tolist()))))
    with atomic_path(paths.REPORTS / "per_class.csv") as tmp:  # long form: one row per class and model (DVC's grouped bars)
        models = [m for m in ("teacher", "student", "baseline") if m in metrics]
        tmp.write_text(csv_text(["class", "model", "accuracy"], (
            (c, m, metrics[m]["per_class"][c]) for c in classes for m in models)))
    save_json(metrics, paths.REPORTS / "metrics.json")
    tracker.log_artifact(paths.REPORTS / "metrics.json")
    tracker.log_params({"evaluate": cfg.evaluate.model_dump(mode="json")})
    tracker.log_data_input("real-test", paths.PREPARED, "real", context="evaluation")
    tracker.set_tags({"student.sha256": sha256_file(paths.STUDENT / "model.pt")})
    out = {k: round(metrics[k]["accuracy"], 4) for k in ("teacher", "student", "baseline") if k in metrics}
    return {**out, "agreement": round(metrics["agreement"], 4)}
