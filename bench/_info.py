"""What every bench result records, and how it is written (bench/*.py).

``run_info()``: the machine (the GPU's name, else the CPU and its cores and threads), torch, the commit (``-dirty``
when tracked files differ from it) and the date. ``write_result()``: bench/results/<name>, a temp file then
``os.replace`` (kdpipe.utils.save_json).
"""
from __future__ import annotations

import os
import platform
import subprocess
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True).stdout.strip()


def run_info(threads: int | None = None) -> dict:
    """``threads``: the threads the timed work ran on, where that is not torch's own (onnxruntime's: bench/int8.py)."""
    import torch

    commit = _git("rev-parse", "--short", "HEAD") + ("-dirty" if _git("status", "--porcelain", "--untracked-files=no") else "")
    n = threads or torch.get_num_threads()
    cpu = f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores, {n} thread{'s' * (n != 1)})"
    return {"device": torch.cuda.get_device_name() if torch.cuda.is_available() else cpu,
            "torch": torch.__version__, "commit": commit, "date": date.today().isoformat()}


def write_result(out: dict, name: str) -> Path:
    from kdpipe.utils import save_json

    path = ROOT / "bench" / "results" / name
    save_json(out, path)
    return path


def flat_sets(d: dict, pre: str = ""):
    """A nested parameter dict as kdpipe's --set items: {"a": {"b": 1}} -> "a.b=1" (values as JSON)."""
    import json

    for k, v in d.items():
        if isinstance(v, dict):
            yield from flat_sets(v, f"{pre}{k}.")
        else:
            yield f"{pre}{k}={json.dumps(v)}"
