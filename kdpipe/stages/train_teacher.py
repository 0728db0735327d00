"""Stage train-teacher: train the teacher on the real train split -> data/teacher/{model.pt,spec.json}."""
from kdpipe import data, paths
from kdpipe.config import Config
from kdpipe.models import build_model, make_spec
from kdpipe.train import accuracy, fit_supervised, predict
from kdpipe.utils import pick_device, save_json, save_torch, seed_everything


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
    res = fit_supervised(model, x, y, xv, yv, cfg.teacher, tracker, "train-teacher", generator=g)
    res["train_acc"] = accuracy(predict(model, x), y)
    save_torch(model.state_dict(), paths.TEACHER / "model.pt")
    save_json(spec, paths.TEACHER / "spec.json")
    tracker.log_metrics({"final_val_acc": res["val_acc"], "final_train_acc": res["train_acc"]})
    return {"val_acc": round(res["val_acc"], 4), "train_acc": round(res["train_acc"], 4)}
