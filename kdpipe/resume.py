"""Resume checkpoints for the long stages (train-teacher, baseline, synthesize, distill).

One file per stage, ``<resume.dir>/<stage>.pt`` (scratch: not a DVC output, git-ignored), written
atomically every ``resume.every`` epochs/rounds and deleted when the stage has written its outputs.
It holds what the rest of the run depends on: the stage's state_dicts (models, optimizers,
schedulers, replay buffer, ...) and every RNG state (torch CPU/CUDA, the stage's torch.Generator,
numpy, random), so a run killed with -9 and started again ends bit-identical to an uninterrupted one
on CPU with a fixed seed. Reading and writing it draws no random numbers.

The file is keyed by the params hash (every section but ``resume``, ``tracking`` and ``audit``,
which do not change results), the DVC md5 of the stage's inputs and the sha256 of the code it runs
(:func:`code_files`: the kdpipe/ deps that dvc.yaml, i.e. ``kdpipe dag``, lists for the stage, so a
change in e.g. kdpipe/routes.py or kdpipe/losses.py invalidates distill's checkpoint as it re-runs
the stage under DVC); a checkpoint written with other params, inputs or code is ignored, and the
stage says so (naming the changed code files). Loaded with weights_only=True.
It also names the MLflow run that wrote it: the resumed run is tagged ``kdpipe.resumed_run`` with
that id, and the killed run, left RUNNING by a SIGKILL, is marked KILLED.

Under torchrun (kdpipe/dist.py) every rank holds the same state after each epoch, and nodes need not
share a disk: each node's local rank 0 writes its own copy (the same path on every node; rank 0's
run id in each), and ``load`` is collective: the ranks exchange (key, epochs done) of their own
files, refuse to start if their keys differ (other params, data or code on some node), and the
rank holding the most advanced valid copy (lowest rank on a tie) sends its bytes to every rank
(loaded weights_only=True there too). So all ranks resume from the same epoch, or all start from
scratch, whichever node got which rank this time (c10d assigns them). A rank that writes no outputs
removes its node's copy when its training is done; rank 0 after writing the outputs.
"""
from __future__ import annotations

import hashlib
import io
import json
import random
from pathlib import Path

import numpy as np
import torch

from kdpipe import dist
from kdpipe.config import Config, ConfigError
from kdpipe.utils import dvc_md5, load_torch, save_torch


def rng_state(generator: torch.Generator | None = None) -> dict:
    """Every RNG state, as tensors / ints / tuples (loadable with weights_only=True)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "generator": generator.get_state() if generator is not None else None,
            "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss),
            "random": random.getstate()}


def set_rng_state(state: dict, generator: torch.Generator | None = None) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if generator is not None and state["generator"] is not None:
        generator.set_state(state["generator"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    random.setstate(state["random"])


PACKAGE = Path(__file__).resolve().parent  # the kdpipe package that runs


def code_files(stage: str) -> list[Path]:
    """The code ``stage`` runs, for its fingerprint: the code deps (``kdpipe/...``) of the stage in the
    project's dvc.yaml (the working directory: the same list ``kdpipe dag`` prints and DVC re-runs the
    stage for). Without them (a teacher-only project, whose dvc.yaml names no code; no dvc.yaml; a stage it
    does not list; a listed file that is not there) every .py file of the running package: any code change
    invalidates the checkpoint."""
    import yaml

    try:
        deps = yaml.safe_load(Path("dvc.yaml").read_text())["stages"][stage].get("deps") or []
    except (OSError, KeyError, TypeError, AttributeError, yaml.YAMLError):
        deps = []
    code = [Path.cwd() / d for d in map(str, deps) if d.startswith(f"{PACKAGE.name}/")]
    return code if code and all(f.exists() for f in code) else [PACKAGE]


def code_digests(files) -> dict[str, str]:
    """{name: sha256} of each code file; a folder counts as its .py files (never __pycache__), a missing
    file as "missing". Names are relative to the package's parent where they can be."""
    out = {}
    for f in map(Path, files):
        for g in (sorted(f.rglob("*.py")) if f.is_dir() else [f]):
            try:
                name = g.resolve().relative_to(PACKAGE.parent).as_posix()
            except ValueError:
                name = str(g)
            out[name] = hashlib.sha256(g.read_bytes()).hexdigest() if g.is_file() else "missing"
    return out


def resume_key(cfg: Config, stage: str, inputs, code: dict | None = None) -> str:
    """sha256 of the stage name, the result-relevant params, the DVC md5 of each input (file or folder)
    and the code digests (:func:`code_digests`; by default those of the stage's :func:`code_files`)."""
    params = cfg.model_dump(mode="json", exclude={"resume", "tracking", "audit"})
    code = code_digests(code_files(stage)) if code is None else code
    blob = json.dumps({"stage": stage, "params": params, "inputs": [dvc_md5(p) for p in inputs], "code": code},
                      sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def close_killed_run(run_id: str) -> None:
    """A run that wrote a resume checkpoint and is still RUNNING was killed (SIGKILL leaves no end
    time): mark it KILLED. Unknown ids (another tracking store) are left alone."""
    from mlflow import MlflowClient

    client = MlflowClient()
    try:
        if client.get_run(run_id).info.status == "RUNNING":
            client.set_terminated(run_id, "KILLED")
    except Exception:  # mlflow.exceptions.MlflowException: not in this store
        pass


class Resume:
    """The resume checkpoint of one stage run: ``load`` at the start, ``save`` after each epoch or
    round, ``finish`` once the outputs are written. ``unit`` names what is counted (epoch, round).
    ``inputs``: the stage's data (files or folders); ``code``: the code files it runs (default
    :func:`code_files` of the stage)."""

    def __init__(self, cfg: Config, stage: str, inputs, unit: str = "epoch", code=None):
        self.enabled, self.every, self.stage, self.unit = cfg.resume.enabled, cfg.resume.every, stage, unit
        self.path = Path(cfg.resume.dir) / f"{stage}.pt"
        self.code = code_digests(code_files(stage) if code is None else code) if self.enabled else {}
        self.key = resume_key(cfg, stage, inputs, self.code) if self.enabled else None
        self.run_id = None  # the MLflow run writing the checkpoints (set by load)

    def load(self, tracker, generator: torch.Generator | None = None) -> dict | None:
        """The saved state (RNG states already restored), or None: start from scratch. Collective
        under torchrun: every rank calls it, and all resume from the same state or none does."""
        self.run_id = tracker.run_id
        if not self.enabled:
            return None
        state, blob = self._read(tracker)
        where = self.path
        if dist.active():
            state, where = self._agree(state, blob, tracker)
        if state is None:
            return None
        set_rng_state(state["rng"], generator)
        print(f"[kdpipe] {self.stage}: resumed from {where} after {self.unit} {state['done']}", flush=True)
        tracker.set_tags({"kdpipe.resumed": "true", "kdpipe.resumed_from": f"{self.unit} {state['done']}"})
        if state.get("run_id") and tracker.mlflow:
            close_killed_run(state["run_id"])
            tracker.set_tags({"kdpipe.resumed_run": state["run_id"]})
        return state

    def _read(self, tracker) -> tuple[dict | None, bytes | None]:
        """This process's own checkpoint (state, file bytes) if there is a valid one; says why it ignores one."""
        if not self.path.exists():
            return None, None
        try:
            blob = self.path.read_bytes()
            state = load_torch(io.BytesIO(blob))
            stale = state.get("key") != self.key
        except Exception as e:  # a checkpoint that cannot be read is never trusted
            state, stale = None, f"unreadable ({type(e).__name__})"
        if state is None or stale:
            old = state.get("code") if isinstance(state, dict) else None
            changed = sorted(n for n in {*self.code, *old} if self.code.get(n) != old.get(n)) if isinstance(old, dict) else []
            why = (stale if isinstance(stale, str) else f"written with other code ({', '.join(changed)} changed)"
                   if changed else "written with other params or inputs")
            print(f"[kdpipe] {self.stage}: ignoring resume checkpoint {self.path}: {why}; starting from scratch", flush=True)
            tracker.set_tags({"kdpipe.resume_ignored": why})
            return None, None
        return state, blob

    def _agree(self, state: dict | None, blob: bytes | None, tracker):
        """Under torchrun: the most advanced valid checkpoint of any rank (its node's copy), sent to
        every rank, or None on every rank. Also takes rank 0's MLflow run id for the next saves."""
        from torch import distributed as tdist

        mine = (self.key, state["done"] if state else -1, len(blob) if blob else 0, tracker.run_id)
        ranks: list = [None] * tdist.get_world_size()
        tdist.all_gather_object(ranks, mine)
        if len({k for k, *_ in ranks}) > 1:
            raise ConfigError(f"{self.stage}: the ranks disagree on params, inputs or code (resume keys "
                              f"{sorted({k[:12] for k, *_ in ranks})}): every node needs the same commit, "
                              "params.yaml and data/ inputs")
        self.run_id = ranks[0][3]  # rank 0 logs: every node's copy names its run
        best = max(done for _, done, *_ in ranks)
        if best < 0:
            return None, self.path
        src = min(r for r, (_, done, *_) in enumerate(ranks) if done == best)
        if dist.rank() == src:
            _broadcast_bytes(blob, ranks[src][2], src)
            return state, self.path
        got = load_torch(io.BytesIO(_broadcast_bytes(None, ranks[src][2], src)))
        return got, f"{self.path} of rank {src} (sent to rank {dist.rank()})"

    @property
    def writer(self) -> bool:
        """Whether this process writes the checkpoint: local rank 0 of each node (the process itself without torchrun)."""
        return dist.local_rank() == 0

    def save(self, done: int, total: int, state: dict, generator: torch.Generator | None = None) -> None:
        """After ``done`` of ``total`` epochs/rounds: every ``resume.every``, never after the last.
        Every rank may call it; each node's local rank 0 writes (nodes need not share a disk)."""
        if self.enabled and self.writer and done < total and done % self.every == 0:
            save_torch({"key": self.key, "stage": self.stage, "done": done, "run_id": self.run_id,
                        "code": self.code, "rng": rng_state(generator), **state}, self.path)

    def finish(self) -> None:
        """Remove this node's copy (rank 0: once the outputs are written; other nodes: once trained)."""
        if self.writer:
            self.path.unlink(missing_ok=True)


def _broadcast_bytes(blob: bytes | None, size: int, src: int) -> bytes:
    """``blob`` of rank ``src`` (``size`` bytes) on every rank, as a uint8 tensor (a CUDA one on nccl)."""
    from torch import distributed as tdist

    device = torch.device("cuda", torch.cuda.current_device()) if tdist.get_backend() == "nccl" else torch.device("cpu")
    buf = (torch.frombuffer(bytearray(blob), dtype=torch.uint8).to(device) if blob is not None
           else torch.empty(size, dtype=torch.uint8, device=device))
    tdist.broadcast(buf, src)
    return blob if blob is not None else buf.cpu().numpy().tobytes()
