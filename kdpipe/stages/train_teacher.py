"""Stage train-teacher: train the teacher on the real train split -> data/teacher/{model.pt,spec.json}.
With ``teacher.checkpoint`` (bring your own teacher: a state_dict for ``teacher.arch``, loaded with
weights_only=True) nothing is trained: the checkpoint is checked against the architecture, scored
on the validation split, and written to data/teacher/ as it is."""
from kdpipe import dist, paths
from kdpipe.checkpoints import load_checkpoint
from kdpipe.config import Config, ConfigError
from kdpipe.resume import Resume
from kdpipe.train import accuracy, fit_supervised, predict, supervised_setup
from kdpipe.utils import save_json, save_torch, sha256_file


def run(cfg: Config, tracker) -> dict:
    g, acc, spec, model, (x, y), (xv, yv) = supervised_setup(cfg, cfg.teacher.arch)
    tracker.log_params({"teacher": cfg.teacher.model_dump(mode="json"), "seed": cfg.seed,
                        "n_params": sum(p.numel() for p in model.parameters())})
    if cfg.teacher.checkpoint:  # bring your own teacher: nothing is trained
        route, digest = load_checkpoint(model, cfg.teacher.checkpoint, cfg.teacher.torchscript_runs_code)
        if route == "torchscript":
            tracker.set_tags({"teacher.loaded_with": "torch.jit.load (runs code: teacher.torchscript_runs_code)"})
        bad = [k for k, t in model.state_dict().items() if t.is_floating_point() and not t.isfinite().all()]
        if bad:
            raise ConfigError(f"teacher.checkpoint '{cfg.teacher.checkpoint}' holds NaN/inf weights in {bad[:8]}")
        tracker.log_params({"teacher.checkpoint_route": route, "teacher.checkpoint_sha256": digest})
        tracker.set_tags({"kdpipe.skipped": "byo-teacher", "teacher.checkpoint_route": route,
                          "teacher.checkpoint_sha256": digest})
        res = {"val_acc": accuracy(predict(model, xv), yv), "checkpoint_sha256": digest, "route": route}
    else:
        resume = Resume(cfg, "train-teacher", [paths.PREPARED])  # + the code it runs (kdpipe/resume.py)
        res = fit_supervised(model, x, y, xv, yv, cfg.teacher, tracker, "train-teacher", generator=g, resume=resume,
                             acc=acc)
    res["train_acc"] = accuracy(predict(model, x), y)
    summary = {"val_acc": round(res["val_acc"], 4), "train_acc": round(res["train_acc"], 4),
               **({"skipped": "byo-teacher", "byo": f"{res['route']}:{res['checkpoint_sha256'][:12]}"}
                  if cfg.teacher.checkpoint else {})}
    if not dist.is_main():  # under torchrun rank 0 alone writes outputs
        return summary
    save_torch(model.state_dict(), paths.TEACHER / "model.pt")
    save_json(spec, paths.TEACHER / "spec.json")
    tracker.log_metrics({"final_val_acc": res["val_acc"], "final_train_acc": res["train_acc"]})
    tracker.log_data_input("real-train", paths.PREPARED, "real")  # the real data digest (= its DVC md5)
    tracker.set_tags({"teacher.sha256": sha256_file(paths.TEACHER / "model.pt")})
    if not cfg.teacher.checkpoint:
        resume.finish()
    return summary
