"""Stage train-teacher: train the teacher on the real train split -> data/teacher/{model.pt,spec.json}.
With ``teacher.checkpoint`` (bring your own teacher: a state_dict for ``teacher.arch``, loaded with
weights_only=True) nothing is trained: the checkpoint is checked against the architecture, scored
on the validation split, and written to data/teacher/ as it is."""
from pathlib import Path

from kdpipe import data, paths
from kdpipe.config import Config, ConfigError
from kdpipe.models import build_model, make_spec
from kdpipe.train import accuracy, fit_supervised, predict
from kdpipe.utils import load_torch, pick_device, save_json, save_torch, seed_everything, sha256_file


def load_checkpoint(model, path: str) -> str:
    """Load a state_dict into ``model`` (strict); one clear error naming missing/unexpected keys."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"teacher.checkpoint '{p}' does not exist")
    try:
        state = load_torch(p)
    except Exception as e:
        raise ConfigError(f"teacher.checkpoint '{p}' is not a loadable weights-only checkpoint: {e}") from None
    if not isinstance(state, dict):
        raise ConfigError(f"teacher.checkpoint '{p}' holds a {type(state).__name__}, not a state_dict")
    missing, unexpected = model.state_dict().keys() - state.keys(), state.keys() - model.state_dict().keys()
    if missing or unexpected:
        raise ConfigError(f"teacher.checkpoint '{p}' does not fit teacher.arch: missing keys {sorted(missing)[:8]}, "
                          f"unexpected keys {sorted(unexpected)[:8]}")
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise ConfigError(f"teacher.checkpoint '{p}' does not fit teacher.arch: {e}") from None
    return sha256_file(p)


def run(cfg: Config, tracker) -> dict:
    g = seed_everything(cfg.seed)
    device = pick_device(cfg.device)
    meta = data.load_meta()
    spec = make_spec(cfg.teacher.arch, meta)
    model = build_model(spec).to(device)
    x, y = data.load_split("train", device)
    xv, yv = data.load_split("val", device)
    tracker.log_params({"teacher": cfg.teacher.model_dump(mode="json"), "seed": cfg.seed,
                        "n_params": sum(p.numel() for p in model.parameters())})
    if cfg.teacher.checkpoint:
        digest = load_checkpoint(model, cfg.teacher.checkpoint)
        tracker.set_tags({"teacher.checkpoint_sha256": digest})
        res = {"val_acc": accuracy(predict(model, xv), yv), "checkpoint_sha256": digest}
    else:
        res = fit_supervised(model, x, y, xv, yv, cfg.teacher, tracker, "train-teacher", generator=g)
    res["train_acc"] = accuracy(predict(model, x), y)
    save_torch(model.state_dict(), paths.TEACHER / "model.pt")
    save_json(spec, paths.TEACHER / "spec.json")
    tracker.log_metrics({"final_val_acc": res["val_acc"], "final_train_acc": res["train_acc"]})
    return {"val_acc": round(res["val_acc"], 4), "train_acc": round(res["train_acc"], 4),
            **({"byo": res["checkpoint_sha256"][:12]} if cfg.teacher.checkpoint else {})}
