"""Stage baseline: the student's architecture trained from scratch on the real train split, so that
evaluate can show data-free KD beside it. Writes data/baseline/ (``enabled: false`` when switched off
or when the data is private)."""
from kdpipe import accel, data, dist, paths
from kdpipe.config import Config
from kdpipe.models import build_model, make_spec
from kdpipe.train import fit_supervised
from kdpipe.utils import pick_device, save_json, save_torch, seed_everything


def run(cfg: Config, tracker) -> dict:
    if not cfg.baseline.enabled or cfg.data.private:
        (paths.BASELINE / "model.pt").unlink(missing_ok=True)
        why = "data.private" if cfg.data.private else "baseline.enabled: false"
        save_json({"enabled": False, "reason": why}, paths.BASELINE / "spec.json")
        tracker.set_tags({"kdpipe.baseline_skipped": why})
        return {"enabled": False, "reason": why}
    g = seed_everything(cfg.seed)
    device = dist.device_for(pick_device(cfg.device))  # cuda:<LOCAL_RANK> under torchrun
    meta = data.load_meta()
    spec = make_spec(cfg.student.arch, meta)
    model = build_model(spec).to(device)
    where = accel.split_device(cfg.speed, device, meta)  # the GPU if the split fits there, else the host
    x, y = data.load_split("train", where)
    xv, yv = data.load_split("val", where)
    tracker.log_params({"baseline": cfg.baseline.model_dump(mode="json"), "student.arch": cfg.student.arch})
    tracker.log_data_input("real-train", paths.PREPARED, "real")
    res = fit_supervised(model, x, y, xv, yv, cfg.baseline, tracker, "baseline", generator=g, speed=cfg.speed)
    if not dist.is_main():  # under torchrun rank 0 alone writes outputs
        return {"val_acc": round(res["val_acc"], 4)}
    save_torch(model.state_dict(), paths.BASELINE / "model.pt")
    save_json({**spec, "enabled": True}, paths.BASELINE / "spec.json")
    return {"val_acc": round(res["val_acc"], 4)}
