"""Stage baseline: the student's architecture trained from scratch on the real train split, so that
evaluate can show data-free KD beside it. Writes data/baseline/ (``enabled: false`` when switched off
or when the data is private). Resumes like train-teacher (kdpipe/resume.py): killed mid-run, the next run
continues from its last resume checkpoint and ends bit-identical on CPU."""
from kdpipe import dist, paths
from kdpipe.config import Config
from kdpipe.resume import Resume
from kdpipe.train import fit_supervised, supervised_setup
from kdpipe.utils import save_json, save_torch


def run(cfg: Config, tracker) -> dict:
    if not cfg.baseline.enabled or cfg.data.private:
        (paths.BASELINE / "model.pt").unlink(missing_ok=True)
        why = "data.private" if cfg.data.private else "baseline.enabled: false"
        save_json({"enabled": False, "reason": why}, paths.BASELINE / "spec.json")
        tracker.set_tags({"kdpipe.baseline_skipped": why})
        return {"enabled": False, "reason": why}
    g, acc, spec, model, (x, y), (xv, yv) = supervised_setup(cfg, cfg.student.arch)
    tracker.log_params({"baseline": cfg.baseline.model_dump(mode="json"), "student.arch": cfg.student.arch})
    tracker.log_data_input("real-train", paths.PREPARED, "real")
    resume = Resume(cfg, "baseline", [paths.PREPARED])  # + the code it runs (kdpipe/resume.py)
    res = fit_supervised(model, x, y, xv, yv, cfg.baseline, tracker, "baseline", generator=g, resume=resume,
                         acc=acc)
    if not dist.is_main():  # under torchrun rank 0 alone writes outputs
        return {"val_acc": round(res["val_acc"], 4)}
    save_torch(model.state_dict(), paths.BASELINE / "model.pt")
    save_json({**spec, "enabled": True}, paths.BASELINE / "spec.json")
    resume.finish()
    return {"val_acc": round(res["val_acc"], 4)}
