"""Which synthetic samples to keep, chosen on the validation split: ``synthesize.keep`` buffer vs reservoir.

    python bench/keep.py --config configs/mnist.yaml --set data.root=<mnist ImageFolder> --seed 0 --workdir W0

One synthesis per seed gives both sets: ``keep: reservoir`` changes only what the stage writes, not the generator,
the buffer or the proxy student (tests/test_routes.py: the same bits), so the stage runs once with ``keep: reservoir``
and, at its end, the buffer as the last round left it (what ``keep: buffer`` writes) is saved beside it. Then
distill runs twice from the same proxy student, once per set, and each student is scored on the **validation**
split only (choose there). Each student is kept as ``<workdir>/student-<keep>/``, so that the test split is read
once, for the choice made: ``python -c "from bench.ablation import accuracy; print(accuracy('student-reservoir',
'test'))"`` with ``PYTHONPATH`` on the repository, in the work folder.

Runs prepare + train-teacher in the work folder when it has no teacher yet (seed 0's teacher, as bench/ablation.py),
so two seeds can run side by side from copies of one folder. Writes bench/results/keep-<config>-s<seed>.json.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench._info import run_info, write_result  # noqa: E402

BUFFER_FILE = "keep-buffer-samples.pt"


def save_buffer_at_close(work: Path) -> None:
    """Make the synthesizer save its buffer's output (what ``keep: buffer`` writes) when the stage closes it."""
    from kdpipe.synth.synthesizer import Synthesizer
    from kdpipe.utils import save_torch

    close = Synthesizer.close

    def close_and_save(self):
        save_torch(self.buf.state(), work / BUFFER_FILE)
        close(self)

    Synthesizer.close = close_and_save


def main() -> int:
    import torch

    from bench.ablation import accuracy
    from kdpipe import paths
    from kdpipe.config import load_config
    from kdpipe.stages import run_stage
    from kdpipe.synth.synthesizer import class_entropy
    from kdpipe.utils import load_json, load_torch, save_json, save_torch, sha256_tensors

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default=str(ROOT / "configs" / "mnist.yaml"))
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--workdir", required=True)
    ap.add_argument("--seed", type=int, default=0, help="the synthesis and distill seed (the teacher is seed 0's)")
    ap.add_argument("--tag", default=None, help="suffix of the results file")
    ap.add_argument("--out", default=None, help="write the JSON here instead of bench/results/")
    a = ap.parse_args()
    config = str(Path(a.config).resolve())
    work = Path(a.workdir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    os.chdir(work)
    base = a.overrides + ["tracking.enabled=false", "baseline.enabled=false"]
    cfg = load_config(config, base)
    run_stage("prepare", cfg)
    if not Path("data/teacher/model.pt").exists():
        run_stage("train-teacher", cfg)
    teacher_val = accuracy("data/teacher", "val")

    cfg = load_config(config, base + ["synthesize.keep=reservoir", f"seed={a.seed}"])
    save_buffer_at_close(work)
    t0 = time.perf_counter()
    run_stage("synthesize", cfg)
    synth_s = time.perf_counter() - t0
    sets = {"reservoir": load_torch(paths.SYNTHETIC / "samples.pt"), "buffer": load_torch(work / BUFFER_FILE)}
    meta = load_json(paths.SYNTHETIC / "meta.json")
    gen = meta["generated"]
    rows = []
    for keep, st in sets.items():
        # distill reads samples.pt and checks it against meta.json's sha256; the proxy student is the same
        hist = torch.bincount(st["logits"].argmax(1), minlength=st["logits"].shape[1]).tolist()
        save_torch(st, paths.SYNTHETIC / "samples.pt")
        save_json({**meta, "n": len(st["x"]), "kept": keep, "histogram": hist, "class_entropy": class_entropy(torch.tensor(hist)),
                   "sha256": sha256_tensors(st["x"], st["logits"])}, paths.SYNTHETIC / "meta.json")
        cfg = load_config(config, base + [f"synthesize.keep={keep}", f"seed={a.seed}"])
        t1 = time.perf_counter()
        run_stage("distill", cfg)
        shutil.copytree(paths.STUDENT, work / f"student-{keep}", dirs_exist_ok=True)  # to read test once, for the choice
        rows.append({"keep": keep, "seed": a.seed, "split": "val", "student_val": accuracy("data/student", "val"),
                     "kept": len(st["x"]), "synthesized": gen, "hist_min": min(hist), "hist_max": max(hist),
                     "distill_s": round(time.perf_counter() - t1, 1)})
        print(json.dumps(rows[-1]), flush=True)
    cfgd = load_config(config, base)
    out = {"data": cfgd.data.name, "config": Path(a.config).name, "overrides": a.overrides, "seed": a.seed,
           "teacher_val": teacher_val, "synthesize_s": round(synth_s, 1), **run_info(), "rows": rows}
    name = f"keep-{Path(a.config).stem}-s{a.seed}{'-' + a.tag if a.tag else ''}.json"
    save_json(out, a.out) if a.out else write_result(out, name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
