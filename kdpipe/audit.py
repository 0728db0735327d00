"""``kdpipe audit-memorization``: does the synthetic set reproduce real training images? Run by the
data owner: it reads the real train and test splits (the data-free stages never do).

For each synthetic sample s, the nearest real training sample r by
    pixels:   RMSE(s, r) = ‖s − r‖₂ / √D            (images in [0, 1], D = C·H·W)
    features: 1 − cos(f(s), f(r))                   (f: the teacher's penultimate features)
Percentiles of both go to data/reports/memorization.json, beside the same statistics for the real
test split against the train split (how close two *different* real images get), so the numbers
have a yardstick. Synthetic samples closer than ``audit.pixel_threshold`` to a real image are
flagged as near-duplicates; data/reports/memorization.png shows the ``audit.pairs`` closest pairs.
Not a DVC stage (data/reports/figures, a DVC output, is left alone).
"""
from __future__ import annotations

import torch

from kdpipe import data, paths
from kdpipe.config import Config
from kdpipe.errors import DataError
from kdpipe.models import penultimate
from kdpipe.teachers import load_teacher
from kdpipe.utils import load_torch, pick_device, save_figure, save_json

QUANTILES = (0, 1, 5, 50, 95)


def nearest_pixels(a: torch.Tensor, b: torch.Tensor, chunk: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """For each row of ``a`` (N×D), the RMSE to its nearest row of ``b`` (M×D) and that row's index.
    The search uses cdist's fast matmul form; the distance reported is recomputed exactly (0 for a copy)."""
    i = torch.cat([torch.cdist(a[k : k + chunk], b).argmin(1) for k in range(0, len(a), chunk)])
    return (a - b[i]).pow(2).mean(1).sqrt(), i


def nearest_features(a: torch.Tensor, b: torch.Tensor, chunk: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """For each row of ``a``, the cosine distance 1 − cos to its nearest row of ``b``, and its index."""
    a, b = torch.nn.functional.normalize(a, dim=1), torch.nn.functional.normalize(b, dim=1)
    s, i = zip(*((a[k : k + chunk] @ b.T).max(1) for k in range(0, len(a), chunk)))
    return 1 - torch.cat(s), torch.cat(i)


@torch.no_grad()
def features(model: torch.nn.Module, x: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
    """The input of the model's last Linear layer (kdpipe.models.penultimate), flattened."""
    out = []
    h = penultimate(model).register_forward_hook(lambda m, i, o: out.append(i[0].flatten(1)))
    try:
        for k in range(0, len(x), batch_size):
            model(x[k : k + batch_size])
    finally:
        h.remove()
    return torch.cat(out)


def percentiles(t: torch.Tensor) -> dict:
    return {f"p{q}": round(float(torch.quantile(t.double().cpu(), q / 100)), 6) for q in QUANTILES}


def plot_pairs(xs: torch.Tensor, xr: torch.Tensor, rmse: torch.Tensor, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    k = len(xs)
    fig, axes = plt.subplots(2, k, figsize=(k * 0.9, 2.2), squeeze=False)
    for j in range(k):
        for row, img in ((0, xs[j]), (1, xr[j])):
            ax = axes[row][j]
            ax.axis("off")
            a = img.permute(1, 2, 0).squeeze(-1).cpu().numpy()
            ax.imshow(a, cmap="gray" if a.ndim == 2 else None, vmin=0, vmax=1)
        axes[0][j].set_title(f"{float(rmse[j]):.3f}", fontsize=6)
    fig.suptitle("closest pairs: synthetic (top), nearest real train image (bottom), pixel RMSE", fontsize=7)
    save_figure(fig, path)
    plt.close(fig)


def audit_memorization(cfg: Config) -> dict:
    from kdpipe.tracking import check_tracking, stage_run

    check_tracking(cfg)
    device = pick_device(cfg.device)
    f = paths.SYNTHETIC / "samples.pt"
    if not f.exists():
        raise DataError(f"synthetic samples '{f}' are missing: run the synthesize stage first")
    xs = load_torch(f)["x"].to(device).float() / 255.0
    xr, yr = data.load_split("train", device)
    xt, _ = data.load_split("test", device)
    if xs.shape[1:] != xr.shape[1:]:
        raise DataError(f"synthetic samples '{f}' are {tuple(xs.shape[1:])}, the real data "
                             f"'{paths.PREPARED}' is {tuple(xr.shape[1:])}: re-run synthesize on this data's teacher")
    teacher, spec = load_teacher(cfg, device)
    rmse, near = nearest_pixels(xs.flatten(1), xr.flatten(1))
    rmse_test, _ = nearest_pixels(xt.flatten(1), xr.flatten(1))
    fr = features(teacher, xr)
    fdist, fnear = nearest_features(features(teacher, xs), fr)
    fdist_test, _ = nearest_features(features(teacher, xt), fr)
    thr = cfg.audit.pixel_threshold
    order = rmse.argsort()
    flagged = [i for i in order.tolist() if rmse[i] < thr]
    report = {
        "n_synthetic": len(xs), "n_train": len(xr), "n_test": len(xt),
        "pixel_threshold": thr, "n_flagged": len(flagged),
        "pixel_rmse": percentiles(rmse), "pixel_rmse_test_vs_train": percentiles(rmse_test),
        "feature_cos_distance": percentiles(fdist), "feature_cos_distance_test_vs_train": percentiles(fdist_test),
        "same_nearest_by_pixels_and_features": round(float((near == fnear).float().mean()), 6),
        "flagged": [{"synthetic": i, "train": int(near[i]), "class": spec["classes"][int(yr[near[i]])],
                     "pixel_rmse": round(float(rmse[i]), 6), "feature_cos_distance": round(float(fdist[i]), 6)}
                    for i in flagged[:100]],
    }
    top = order[: cfg.audit.pairs]
    save_json(report, paths.REPORTS / "memorization.json")
    plot_pairs(xs[top], xr[near[top]], rmse[top], paths.REPORTS / "memorization.png")
    with stage_run(cfg, "audit-memorization") as tracker:
        tracker.log_metrics({"n_flagged": len(flagged), "pixel_rmse_min": report["pixel_rmse"]["p0"],
                             "pixel_rmse_p50": report["pixel_rmse"]["p50"],
                             "pixel_rmse_test_vs_train_p50": report["pixel_rmse_test_vs_train"]["p50"],
                             "feature_cos_distance_p50": report["feature_cos_distance"]["p50"]})
        tracker.log_artifact(paths.REPORTS / "memorization.json")
        tracker.log_artifact(paths.REPORTS / "memorization.png")
    print(f"[kdpipe] audit-memorization: {len(flagged)} of {len(xs)} synthetic samples within pixel RMSE {thr} of a "
          f"real train image (min {report['pixel_rmse']['p0']:.4f}, median {report['pixel_rmse']['p50']:.4f}; "
          f"real test vs train: min {report['pixel_rmse_test_vs_train']['p0']:.4f}, median "
          f"{report['pixel_rmse_test_vs_train']['p50']:.4f}) -> {paths.REPORTS / 'memorization.json'}", flush=True)
    return report
