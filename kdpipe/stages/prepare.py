"""Stage prepare: load the real data source and write seeded, stratified splits to data/prepared/."""
from kdpipe import data
from kdpipe.config import Config


def run(cfg: Config, tracker) -> dict:
    meta = data.prepare(cfg)
    tracker.log_params({"data": cfg.data.model_dump(mode="json"), "seed": cfg.seed})
    s = meta["splits"]
    tracker.log_metrics({f"n_{k}": v["n"] for k, v in s.items()})
    tracker.set_tags({f"data.{k}.sha256": v["sha256"] for k, v in s.items()})
    return {"classes": len(meta["classes"]), **{f"n_{k}": v["n"] for k, v in s.items()},
            "shape": f"{meta['channels']}x{meta['image_size']}x{meta['image_size']}"}
