"""Multi-process data parallel (kdpipe/dist.py) and the speed knobs (kdpipe/accel.py), on CPU.

DDP with gloo and 2 processes trains like 1 process on the same global batches: each rank takes
its shard of every global batch, the shard's loss is scaled so that DDP's gradient average is the
global batch's mean, and BatchNorm takes its statistics over the global batch (GlobalBatchNorm).
Only the order of float sums differs, so the two agree to float32 rounding (tolerance below).
The same holds for the distill stage, with its batch-wide parts (φ, replay priorities, hint adapters)
computed over the global batch."""
from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
import yaml

from conftest import BIN, make_project, project_env, run
from kdpipe import accel, dist
from kdpipe.config import Config, SpeedCfg, TrainCfg, load_config
from kdpipe.models import build_model
from kdpipe.train import fit_supervised
from kdpipe.utils import load_torch, save_json, save_torch, sha256_tensors

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


# distill, 1 vs 2 processes: max |Δ| of per-epoch losses and of every weight (student and history);
# measured: losses 9.2e-7, weights 2.4e-7
DISTILL_TOL = 1e-5
DISTILL_VARIANTS = {  # every batch-wide part: replay priorities, φ on live teacher logits, augment, hint adapters
    "replay-phi-augment-hints-finetune": ["distill.priority=true", "distill.phi=true", "distill.augment=true",
                                          "distill.feature_weight=0.5", "distill.hints=[[net.9, net.6]]",
                                          "distill.alpha=0.7", "distill.finetune_epochs=1"],
    "phi-stored-logits": ["distill.phi=true"],
}


def distill_project(root: Path) -> None:
    """A project with data/teacher (digits_cnn trained on the digits subset) and data/synthetic (a
    stand-in synthetic set: those 299 images as uint8 with the teacher's logits, and a proxy student); distill for 2 epochs
    of 3 global batches (128, 128, 43: the last splits 21/22 between the ranks)."""
    spec = {"arch": "digits_cnn", "in_channels": 1, "num_classes": 10, "image_size": 8, "mean": [0.3], "std": [0.4],
            "classes": [str(c) for c in range(10)]}
    torch.manual_seed(0)
    teacher = build_model(spec)
    fit_supervised(teacher, *digits_data(), TrainCfg(epochs=1, batch_size=64, lr=0.05), Recorder(), "teacher",
                   generator=torch.Generator().manual_seed(0))
    x = (digits_data()[0] * 255).round().to(torch.uint8)
    with torch.no_grad():
        logits = teacher.eval()(x.float() / 255)
    save_torch(teacher.state_dict(), root / "data/teacher/model.pt")
    save_json(spec, root / "data/teacher/spec.json")
    save_torch({"x": x, "logits": logits}, root / "data/synthetic/samples.pt")
    torch.manual_seed(1)  # a stand-in proxy student (untrained): distill starts from it (distill.init: synthesis)
    save_torch(build_model({**spec, "arch": "digits_cnn_small"}).state_dict(), root / "data/synthetic/student.pt")
    save_json({"n": len(x), "sha256": sha256_tensors(x, logits), "student_arch": "digits_cnn_small"},
              root / "data/synthetic/meta.json")
    tree = Config().model_dump(mode="json")
    tree.update(device="cpu", tracking={**tree["tracking"], "enabled": False}, resume={**tree["resume"], "enabled": False},
                student={"arch": "digits_cnn_small"}, distill={**tree["distill"], "epochs": 2, "batch_size": 128})
    (root / "params.yaml").write_text(yaml.safe_dump(tree, sort_keys=False))


class MetricsTracker:
    """kdpipe's tracker interface (no MLflow), keeping the logged metrics."""

    def __init__(self):
        from kdpipe.tracking import Tracker

        self.null, self.metrics = Tracker(), []
        self.run_id = None

    def log_metrics(self, m, step=None):
        self.metrics.append(m)

    def __getattr__(self, name):  # log_params, set_tags, log_data_input: nothing to keep
        return getattr(self.null, name)


def distill_all(root: Path, out: Path) -> None:
    """Each variant of the distill stage in ``root``; rank 0 keeps the student and the losses in ``out``."""
    import contextlib

    from kdpipe.stages import distill

    torch.set_num_threads(1)
    res = {}
    with contextlib.chdir(root):
        for name, overrides in DISTILL_VARIANTS.items():
            rec = MetricsTracker()
            distill.run(load_config("params.yaml", overrides), rec)
            if dist.is_main():
                res[name] = {"state": load_torch(root / "data/student/model.pt"), "loss": [m["loss"] for m in rec.metrics
                                                                                      if "loss" in m]}
    if dist.is_main():
        torch.save(res, out)


def _distill_worker(rank: int, world: int, port: int, root: Path, out: Path) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init(torch.device("cpu"))
    distill_all(root, out)
    dist.close()


def test_two_gloo_processes_distill_like_one(tmp_path):
    n = torch.get_num_threads()
    try:
        torch.set_num_threads(1)  # 1 process: this one, single-threaded like the workers
        distill_project(tmp_path)
        distill_all(tmp_path, tmp_path / "one.pt")
    finally:
        torch.set_num_threads(n)
    mp.spawn(_distill_worker, args=(2, free_port(), tmp_path, tmp_path / "two.pt"), nprocs=2)
    one, two = torch.load(tmp_path / "one.pt"), torch.load(tmp_path / "two.pt")
    for name in DISTILL_VARIANTS:
        a, b = one[name], two[name]
        assert len(a["loss"]) == len(b["loss"]) > 1 and a["loss"][1] < a["loss"][0], (name, a["loss"])  # it learns
        assert max(abs(u - v) for u, v in zip(a["loss"], b["loss"])) < DISTILL_TOL, (name, a["loss"], b["loss"])
        assert a["state"].keys() == b["state"].keys()
        diff = {k: (a["state"][k].double() - b["state"][k].double()).abs().max().item() for k in a["state"]}
        assert max(diff.values()) < DISTILL_TOL, (name, diff)


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
    fit_supervised(model, *digits_data(), CFG, rec, "knobs", generator=torch.Generator().manual_seed(0),
                   acc=accel.Accel(speed, torch.device("cpu")))
    return model, [m["train_loss"] for m in rec.metrics]


def test_knobs_default_off_on_cpu_and_forced_bf16_channels_last_trains():
    """Defaults are fp32 contiguous on CPU; forcing bf16 autocast + channels_last runs the same
    training with bf16 rounding: other numbers, the same loss curve to a few hundredths."""
    d = SpeedCfg()
    acc = accel.Accel(d, torch.device("cpu"))
    assert acc.amp_dtype() is None and acc.memory_format() is torch.contiguous_format
    assert not acc.sgd([torch.zeros(1, requires_grad=True)], 0.1, 0.9, 0).defaults.get("fused")
    _, fp32 = fit(d)
    model, bf16 = fit(SpeedCfg(amp="bf16", channels_last=True))
    assert model.net[0].weight.is_contiguous(memory_format=torch.channels_last)
    assert bf16 != fp32 and max(abs(a - b) for a, b in zip(fp32, bf16)) < 0.05, (fp32, bf16)


@pytest.mark.slow
def test_torchrun_two_processes_train_teacher_and_distill_one_output_one_child_run_each(tmp_path):
    """`torchrun --nproc_per_node 2 -m kdpipe train-teacher`, then (after a plain synthesize) `... distill`
    (gloo) on the tiny digits project: each writes one output folder and one MLflow child run (rank 0
    alone logs), its metrics logged once per epoch, and no resume checkpoint is left behind."""
    from mlflow import MlflowClient

    proj = make_project(tmp_path / "proj")
    env = {**project_env(proj), "OMP_NUM_THREADS": "1"}
    run([BIN + "/kdpipe", "prepare", "--set", "tracking.enabled=false"], proj, env)
    client = MlflowClient(tracking_uri=env["MLFLOW_TRACKING_URI"])
    exp = client.create_experiment("kdpipe", artifact_location=(proj / "mlartifacts").as_uri())
    parent = client.create_run(exp, run_name="pipeline").info.run_id
    outputs = {"train-teacher": ("teacher", ["model.pt", "spec.json"]),
               "distill": ("student", ["history.csv", "model.pt", "spec.json"])}
    for stage, (folder, files) in outputs.items():
        if stage == "distill":
            run([BIN + "/kdpipe", "synthesize", "--set", "tracking.enabled=false"], proj, env)
        r = run([BIN + "/torchrun", "--nproc_per_node", "2", "--master_port", str(free_port()), "-m", "kdpipe",
                 stage], proj, {**env, "KDPIPE_PARENT_RUN_ID": parent}, timeout=300)
        assert r.stdout.count(f"[kdpipe] {stage}") == 2, r.stdout  # both ranks trained ...
        assert sorted(p.name for p in (proj / "data" / folder).iterdir()) == files  # ... one wrote
        runs = client.search_runs([exp], f"tags.`mlflow.parentRunId` = '{parent}' and tags.`kdpipe.stage` = '{stage}'")
        assert [x.info.status for x in runs] == ["FINISHED"]
        section = "teacher" if stage == "train-teacher" else "distill"
        metric = "train_loss" if stage == "train-teacher" else "loss"
        assert len(client.get_metric_history(runs[0].info.run_id, metric)) == yaml_epochs(proj, section)
        assert not (proj / f"data/.resume/{stage}.pt").exists()
    rows = (proj / "data/student/history.csv").read_text().splitlines()
    assert len(rows) == 1 + yaml_epochs(proj, "distill")  # written once, by rank 0


def yaml_epochs(proj: Path, section: str = "teacher") -> int:
    return yaml.safe_load((proj / "params.yaml").read_text())[section]["epochs"]


def test_resident_split_named_with_an_index_never_goes_through_workers(monkeypatch):
    """A split already on the stage's device is indexed in place even when the two names differ (``cuda:0``
    from ``.to("cuda")`` against the stage's ``cuda``; here ``cpu`` against ``cpu:0``): DataLoader workers are
    only for a split on the host feeding a GPU (a forked worker cannot use CUDA: the first GPU run failed so)."""
    def no_loader(*a, **k):
        raise AssertionError("a resident split went through DataLoader workers")
    monkeypatch.setattr(accel, "loader_batches", no_loader)
    x, y = torch.randn(10, 1, 2, 2), torch.arange(10)
    perm = torch.randperm(10, generator=torch.Generator().manual_seed(0))
    got = list(accel.epoch_batches(x, y, perm, 4, torch.device("cpu", 0), workers=2))
    assert [b[1].tolist() for b in got] == [perm[:4].tolist(), perm[4:8].tolist(), perm[8:].tolist()]
    assert all(torch.equal(xb, x[yb]) for xb, yb in got)
