"""Run Fast-Datafree's own scripts (github zju-vipa/Fast-Datafree) on a CPU, with the harness's patches applied at
run time; Fast's files stay as exported from its git snapshot (docs/peer.md lists every patch, P1-P7).

Run by bench/peer.py with the peer's interpreter (/work/peer/venv: the kdpipe venv plus kornia, termcolor, seaborn,
einops), in a work folder that holds checkpoints/pretrained/cifar10_<teacher>.pth:

    python bench/peer_fast.py --fast /work/peer/Fast-Datafree --split /work/peer/data/split \
        [--budget-s 900 --out fast.json] [--subset N] -- train_scratch.py|datafree_kd.py <Fast's own arguments>

Patches (monkeypatches in this process only; nothing of Fast's algorithm changes):
  P1 ``.cuda()`` of tensors and modules is the identity when CUDA is absent (fast_meta.py's fomaml_grad/reptile_grad,
     generator.py's clone(), evaluators.py, train loops).
  P2 main_worker gets gpu=None on a machine without CUDA (its --gpu is an int, so the CLI cannot say "none").
  P3 every DataLoader runs with num_workers=0, pin_memory=False (fast_meta.py hard-codes 4 workers).
  P4 registry.get_dataset('cifar10') reads the harness's ImageFolder split (<split>/train, <split>/val) with Fast's
     own CIFAR-10 transforms, instead of torchvision's CIFAR10 binaries; --subset N keeps a seeded N-image subset of
     train (smoke teachers only).
  P5 (datafree_kd.py, --budget-s) a wall clock for the data-free phase: it starts at the first synthesize() call,
     pauses while Fast's per-epoch evaluator scores the real val split, and stops the run (before the next
     synthesize() or KD step) once the budget is spent.
  P6 (datafree_kd.py, --out) at the stop, the student as it is then is saved (student_last.pt, a Fast-keyed
     state_dict) with the counts (rounds, KD steps, synthetic images) in the --out JSON; Fast's own best-on-val
     checkpoint is left where Fast writes it.
  P7 torch.load of Fast's pretrained teacher with weights_only=False (torch >= 2.6 defaults to True; Fast's
     checkpoints hold a plain dict, so this only restores the old default).
  P8 import shims for module paths newer libraries moved: torchvision.models.utils.load_state_dict_from_url
     (now torch.hub's) and, where missing, kornia.geometry.transform.affwarp.scale.
"""
from __future__ import annotations

import argparse
import json
import os
import runpy
import sys
import time
from pathlib import Path


class BudgetSpent(Exception):
    pass


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--fast", required=True)
    ap.add_argument("--split", required=True)
    ap.add_argument("--budget-s", type=float, default=None)
    ap.add_argument("--out", default=None)
    ap.add_argument("--subset", type=int, default=None)
    ap.add_argument("script")
    ap.add_argument("args", nargs=argparse.REMAINDER)
    a = ap.parse_args()
    fast = Path(a.fast).resolve()
    sys.path.insert(0, str(fast))

    import torch
    import torch.utils.data
    from torch import nn

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    # P1
    if not torch.cuda.is_available():
        torch.Tensor.cuda = lambda self, *args, **kw: self
        nn.Module.cuda = lambda self, *args, **kw: self
    # P3
    base_loader = torch.utils.data.DataLoader

    class CPULoader(base_loader):
        def __init__(self, *args, **kw):
            kw["num_workers"], kw["pin_memory"] = 0, False
            super().__init__(*args, **kw)

    torch.utils.data.DataLoader = CPULoader
    # P7
    base_load = torch.load
    torch.load = lambda *args, **kw: base_load(*args, **{"weights_only": False, **kw})

    # P8: module paths that newer torchvision/kornia moved (import shims; the functions are the same)
    import types

    import torch.hub
    import torchvision.models

    tvu = types.ModuleType("torchvision.models.utils")
    tvu.load_state_dict_from_url = torch.hub.load_state_dict_from_url
    sys.modules.setdefault("torchvision.models.utils", tvu)
    try:
        import kornia.geometry.transform.affwarp  # noqa: F401
    except ImportError:
        import kornia.geometry.transform as kgt

        aff = types.ModuleType("kornia.geometry.transform.affwarp")
        aff.scale = kgt.scale
        sys.modules["kornia.geometry.transform.affwarp"] = aff

    import registry
    from torchvision import datasets, transforms as T

    # P4
    base_get_dataset = registry.get_dataset

    def get_dataset(name, data_root="data", *args, **kw):
        if name.lower() != "cifar10":
            return base_get_dataset(name, data_root, *args, **kw)
        norm = T.Normalize(**registry.NORMALIZE_DICT["cifar10"])
        train_t = T.Compose([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), T.ToTensor(), norm])
        val_t = T.Compose([T.ToTensor(), norm])
        train = datasets.ImageFolder(os.path.join(a.split, "train"), transform=train_t)
        val = datasets.ImageFolder(os.path.join(a.split, "val"), transform=val_t)
        if a.subset:
            g = torch.Generator().manual_seed(0)
            idx = torch.randperm(len(train), generator=g)[: a.subset].tolist()
            sub = torch.utils.data.Subset(train, idx)
            sub.transform = train_t
            train = sub
        return 10, train, val

    registry.get_dataset = get_dataset

    script = a.script
    sys.argv = [script, *[x for x in a.args if x != "--"]]
    mod_name = Path(script).stem
    import importlib

    mod = importlib.import_module(mod_name)  # the scripts guard main() with __name__ == '__main__'
    # P2
    base_worker = mod.main_worker
    mod.main_worker = lambda gpu, n, args: base_worker(None if not torch.cuda.is_available() else gpu, n, args)

    if mod_name != "datafree_kd" or a.budget_s is None:
        mod.main()
        return

    # P5 / P6
    import datafree

    st = {"t0": None, "paused": 0.0, "rounds": 0, "kd_steps": 0, "student": None, "synth": None, "evals": []}

    def elapsed() -> float:
        return 0.0 if st["t0"] is None else time.perf_counter() - st["t0"] - st["paused"]

    def check() -> None:
        if st["t0"] is not None and elapsed() >= a.budget_s:
            raise BudgetSpent()

    for cls in (datafree.synthesis.FastMetaSynthesizer, datafree.synthesis.FastSynthesizer):
        def wrap(cls=cls):
            base_synth, base_sample = cls.synthesize, cls.sample

            def synthesize(self, *args, **kw):
                if st["t0"] is None:
                    st["t0"] = time.perf_counter()
                check()
                st["student"], st["synth"] = self.student, self
                out = base_synth(self, *args, **kw)
                st["rounds"] += 1
                return out

            def sample(self):
                check()
                st["kd_steps"] += 1
                return base_sample(self)

            cls.synthesize, cls.sample = synthesize, sample
        wrap()

    base_eval = datafree.evaluators.classification_evaluator

    def classification_evaluator(loader):
        ev = base_eval(loader)
        base_call = ev.__class__.__call__

        class Paused(ev.__class__):
            def __call__(self, *args, **kw):
                t = time.perf_counter()
                r = base_call(self, *args, **kw)
                st["paused"] += time.perf_counter() - t
                st["evals"].append(round(float(r["Acc"][0]), 2))
                return r

        ev.__class__ = Paused
        return ev

    datafree.evaluators.classification_evaluator = classification_evaluator
    t_start = time.perf_counter()
    stopped = False
    try:
        mod.main()
    except BudgetSpent:
        stopped = True
    student = st["student"]
    student = getattr(student, "module", student)
    out_dir = Path(a.out).resolve().parent
    torch.save(student.state_dict(), out_dir / "student_last.pt")
    pool = Path(st["synth"].data_pool.root)
    res = {"stopped_by_budget": stopped, "budget_s": a.budget_s, "datafree_s": round(elapsed(), 1),
           "eval_paused_s": round(st["paused"], 1), "process_s": round(time.perf_counter() - t_start, 1),
           "rounds": st["rounds"], "kd_steps": max(0, st["kd_steps"] - stopped),
           "synthetic_images": st["rounds"] * st["synth"].synthesis_batch_size,
           "synthetic_files": sum(1 for _ in pool.glob("*.png")),
           "val_acc_per_epoch_fast_eval": st["evals"], "student": str(out_dir / "student_last.pt")}
    Path(a.out).write_text(json.dumps(res, indent=2))
    print(json.dumps(res))


if __name__ == "__main__":
    main()
