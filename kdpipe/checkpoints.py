"""Loading model files: a teacher checkpoint (``teacher.checkpoint``, a ``teachers`` member file) into a
model, and a stage folder's model.pt + spec.json (data/teacher, data/baseline, data/student).

Below the stages and kdpipe/teachers.py (it imports neither), so that they all import it downwards:
train-teacher and teachers.py load checkpoints with :func:`load_checkpoint`; evaluate and export read
a stage's output with :func:`read_spec` / :func:`load_model`."""
from __future__ import annotations

from pathlib import Path

from kdpipe import paths
from kdpipe.config import ConfigError
from kdpipe.errors import DataError
from kdpipe.models import build_model
from kdpipe.teacher_card import is_torchscript, load_strict, refuse_torchscript
from kdpipe.utils import load_json, load_torch, sha256_file

STAGE_OF = {paths.TEACHER: "train-teacher", paths.BASELINE: "baseline", paths.STUDENT: "distill"}  # who writes it


def load_checkpoint(model, path: str, runs_code: bool = False) -> tuple[str, str]:
    """Load a teacher checkpoint into ``model`` (strict) -> (route, sha256 of the file). Routes:
    "state_dict" (torch.load, weights_only=True) or "torchscript" (a torch.jit.save archive: refused unless
    ``runs_code`` (teacher.torchscript_runs_code), since torch.jit.load runs code from the file; loaded
    on CPU; only its state_dict is taken, so the network is teacher.arch's own and BN hooks and
    export work unchanged). Keys without the Classifier's ``net.`` prefix (a bare network's weights)
    load into ``model.net``, with the data's mean/std as input normalisation. One clear error
    naming missing/unexpected keys."""
    import torch

    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"teacher.checkpoint '{p}' does not exist")
    route = "torchscript" if is_torchscript(p) else "state_dict"
    if route == "torchscript" and not runs_code:
        refuse_torchscript(p, "teacher.checkpoint")
    try:
        state = torch.jit.load(str(p), map_location="cpu").state_dict() if route == "torchscript" else load_torch(p)
    except Exception as e:  # truncated, not a checkpoint, or a pickle carrying code: one line naming the file
        kind = "TorchScript archive" if route == "torchscript" else "weights-only checkpoint"
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()] or [type(e).__name__]
        why = next((ln for ln in lines if ln.startswith("Unsupported")), lines[0]).split(". ")[0]
        with open(p, "rb") as f:
            head = f.read(2)
        what = ("refused: only tensors and containers are loaded, never code" if why.startswith("Unsupported")
                else "truncated?" if head == b"PK" else "not a file written by torch.save" if head[:1] != b"\x80" else "")
        raise ConfigError(f"teacher.checkpoint '{p}' is not a loadable {kind}: {why}"
                          + (f" ({what})" if what else "")) from None
    if not isinstance(state, dict):
        raise ConfigError(f"teacher.checkpoint '{p}' holds a {type(state).__name__}, not a state_dict")
    target = model.net if hasattr(model, "net") and not any(k.startswith("net.") for k in state) else model
    load_strict(target, state, f"teacher.checkpoint '{p}' ({route}) does not fit teacher.arch")
    return route, sha256_file(p)


def read_spec(folder) -> dict:
    """A stage folder's spec.json; a DataError naming the stage to run when it is missing."""
    if not (folder / "spec.json").exists():
        raise DataError(f"'{folder / 'spec.json'}' is missing: run the {STAGE_OF.get(folder, 'stage that writes it')} "
                        "stage first")
    return load_json(folder / "spec.json")


def load_model(folder, device, spec: dict | None = None):
    """(model in eval mode on ``device``, spec) of a stage folder; (None, spec) for a disabled one (baseline off)."""
    spec = spec or read_spec(folder)
    if not spec.get("enabled", True):
        return None, spec
    model = build_model(spec)
    model.load_state_dict(load_torch(folder / "model.pt"))
    return model.to(device).eval(), spec
