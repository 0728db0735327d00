"""Multi-process data parallel (kdpipe/dist.py) and the speed knobs (kdpipe/accel.py), on CPU.

DDP with gloo and 2 processes trains like 1 process on the same global batches: each rank takes
its shard of every global batch, the shard's loss is scaled so that DDP's gradient average is the
global batch's mean, and BatchNorm takes its statistics over the global batch (GlobalBatchNorm).
Only the order of float sums differs, so the two agree to float32 rounding (tolerance below)."""
from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from conftest import BIN, make_project, project_env, run
from kdpipe import accel, dist
from kdpipe.config import SpeedCfg, TrainCfg
from kdpipe.models import build_model
from kdpipe.train import fit_supervised

# max |Δ| of per-epoch train losses and of every weight, 1 vs 2 processes (float32 sums reordered);
# measured: losses 0.0, weights 2.4e-7 (without sync_bn the losses differ by 5e-3..1.5e-2)
TOL = 1e-5
CFG = TrainCfg(epochs=2, batch_size=64, lr=0.05)
N = 299  # 5 global batches per epoch; the last (43) splits 21/22 between the ranks: the loss scale matters


class Recorder:
    """The tracker's interface, keeping the logged metrics."""

    def __init__(self):
        self.metrics = []

    def log_metrics(self, m, step=None):
        self.metrics.append(m)

    def set_tags(self, tags):
        pass


def digits_data():
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images[:N, None] / 16.0, dtype=torch.float32)
    return x, torch.tensor(d.target[:N]), x[:100], torch.tensor(d.target[:100])


def train(out: Path) -> None:
    """fit_supervised on the digits subset, seeded; rank 0 writes weights and losses to ``out``."""
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    spec = {"arch": "digits_cnn", "in_channels": 1, "num_classes": 10, "image_size": 8, "mean": [0.3], "std": [0.4]}
    model = build_model(spec)
    rec = Recorder()
    fit_supervised(model, *digits_data(), CFG, rec, "ddp-test", generator=g)
    if dist.is_main():
        torch.save({"state": model.state_dict(), "loss": [m["train_loss"] for m in rec.metrics],
                    "bn": type(model.net[1]).__name__}, out)


def _worker(rank: int, world: int, port: int, out: Path) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init(torch.device("cpu"))
    train(out)
    dist.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_gloo_processes_train_like_one(tmp_path):
    n = torch.get_num_threads()
    try:
        train(tmp_path / "one.pt")  # 1 process: this one, single-threaded like the workers
    finally:
        torch.set_num_threads(n)
    mp.spawn(_worker, args=(2, free_port(), tmp_path / "two.pt"), nprocs=2)
    one, two = torch.load(tmp_path / "one.pt"), torch.load(tmp_path / "two.pt")
    assert one["bn"] == two["bn"] == "BatchNorm2d"  # GlobalBatchNorm swapped back after training
    assert len(one["loss"]) == CFG.epochs and 0.1 < one["loss"][-1] < one["loss"][0] < 2.5  # it learns
    assert max(abs(a - b) for a, b in zip(one["loss"], two["loss"])) < TOL, (one["loss"], two["loss"])
    assert one["state"].keys() == two["state"].keys()
    diff = {k: (one["state"][k].double() - two["state"][k].double()).abs().max().item() for k in one["state"]}
    assert max(diff.values()) < TOL, diff


def test_shards_cover_each_global_batch(monkeypatch):
    for n in (64, 43, 1):
        parts = []
        for r in range(3):
            monkeypatch.setenv("RANK", str(r))
            monkeypatch.setenv("WORLD_SIZE", "3")
            s = dist.shard(n)
            parts += list(range(n))[s]
            assert dist.scale(s.stop - s.start, n) == pytest.approx(3 * (s.stop - s.start) / n)
        assert parts == list(range(n))  # disjoint, in order, all of it


def test_host_batches_equal_device_indexing():
    """The DataLoader route (split kept on the host: workers, pinned memory on CUDA) gives the
    same batches as indexing a resident split."""
    x, y = torch.randn(100, 1, 4, 4), torch.arange(100)
    perm = torch.randperm(100, generator=torch.Generator().manual_seed(0))
    idx = [perm[s] for s in accel.global_batches(100, 32)]
    resident = list(accel.epoch_batches(x, y, perm, 32, torch.device("cpu")))
    loaded = list(accel.loader_batches(x, y, idx, torch.device("cpu"), workers=2))
    assert [len(b[1]) for b in loaded] == [32, 32, 32, 4]
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(resident, loaded))


def fit(speed: SpeedCfg) -> tuple[torch.nn.Module, list[float]]:
    torch.manual_seed(0)
    spec = {"arch": "digits_cnn", "in_channels": 1, "num_classes": 10, "image_size": 8, "mean": [0.3], "std": [0.4]}
    model, rec = build_model(spec), Recorder()
    fit_supervised(model, *digits_data(), CFG, rec, "knobs", generator=torch.Generator().manual_seed(0), speed=speed)
    return model, [m["train_loss"] for m in rec.metrics]


def test_knobs_default_off_on_cpu_and_forced_bf16_channels_last_trains():
    """Defaults are fp32 contiguous on CPU; forcing bf16 autocast + channels_last runs the same
    training with bf16 rounding: other numbers, the same loss curve to a few hundredths."""
    cpu = torch.device("cpu")
    d = SpeedCfg()
    assert accel.amp_dtype(d, cpu) is None and accel.memory_format(d, cpu) is torch.contiguous_format
    assert not accel.sgd([torch.zeros(1, requires_grad=True)], 0.1, 0.9, 0, d, cpu).defaults.get("fused")
    _, fp32 = fit(d)
    model, bf16 = fit(SpeedCfg(amp="bf16", channels_last=True))
    assert model.net[0].weight.is_contiguous(memory_format=torch.channels_last)
    assert bf16 != fp32 and max(abs(a - b) for a, b in zip(fp32, bf16)) < 0.05, (fp32, bf16)


@pytest.mark.slow
def test_torchrun_two_processes_train_teacher_one_teacher_one_child_run(tmp_path):
    """`torchrun --nproc_per_node 2 -m kdpipe train-teacher` (gloo) on the tiny digits project:
    one teacher written, one MLflow child run (rank 0 alone logs), its metrics logged once per epoch."""
    from mlflow import MlflowClient

    proj = make_project(tmp_path / "proj")
    env = {**project_env(proj), "OMP_NUM_THREADS": "1"}
    run([BIN + "/kdpipe", "prepare", "--set", "tracking.enabled=false"], proj, env)
    client = MlflowClient(tracking_uri=env["MLFLOW_TRACKING_URI"])
    exp = client.create_experiment("kdpipe", artifact_location=(proj / "mlartifacts").as_uri())
    parent = client.create_run(exp, run_name="pipeline").info.run_id
    r = run([BIN + "/torchrun", "--nproc_per_node", "2", "--master_port", str(free_port()), "-m", "kdpipe",
             "train-teacher"], proj, {**env, "KDPIPE_PARENT_RUN_ID": parent}, timeout=300)
    assert r.stdout.count("[kdpipe] train-teacher") == 2, r.stdout  # both ranks trained ...
    assert sorted(p.name for p in (proj / "data/teacher").iterdir()) == ["model.pt", "spec.json"]  # ... one wrote
    runs = client.search_runs([exp], f"tags.`mlflow.parentRunId` = '{parent}'")
    assert [(x.data.tags["kdpipe.stage"], x.info.status) for x in runs] == [("train-teacher", "FINISHED")]
    epochs = yaml_epochs(proj)
    assert len(client.get_metric_history(runs[0].info.run_id, "train_loss")) == epochs
    assert not (proj / "data/.resume/train-teacher.pt").exists()


def yaml_epochs(proj: Path) -> int:
    import yaml

    return yaml.safe_load((proj / "params.yaml").read_text())["teacher"]["epochs"]
