"""The model zoo, the presets, and bring-your-own teacher as a TorchScript file."""
from pathlib import Path

import pytest
import torch

from kdpipe.config import ConfigError, load_config
from kdpipe.models import ZOO, build_model

ROOT = Path(__file__).resolve().parents[1]
PRESETS = sorted((ROOT / "configs").glob("*.yaml"))


def spec(arch: str, channels: int = 3, size: int = 32) -> dict:
    return {"arch": arch, "num_classes": 10, "classes": [str(i) for i in range(10)], "in_channels": channels,
            "image_size": size, "mean": [0.5] * channels, "std": [0.25] * channels}


def forward_backward(model, channels: int, size: int) -> None:
    model.train()
    x = torch.rand(2, channels, size, size, generator=torch.Generator().manual_seed(0))
    logits = model(x)
    assert logits.shape == (2, 10) and torch.isfinite(logits).all()
    logits.logsumexp(1).sum().backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert sum(g.abs().sum().item() for g in grads) > 0


@pytest.mark.parametrize("arch", sorted(ZOO))
def test_zoo_model_trains(arch):
    size = 8 if arch.startswith("digits") else 32
    forward_backward(build_model(spec(arch, 3, size)), 3, size)


@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: p.stem)
def test_preset_loads_and_its_models_train(preset):
    cfg = load_config(preset)
    assert cfg.teacher.arch != cfg.student.arch and cfg.teacher.checkpoint is None
    size, channels = cfg.data.image_size, cfg.data.channels or 1  # mnist: grey (lenet5 at 32 px)
    sizes = []
    for arch in (cfg.teacher.arch, cfg.student.arch):
        m = build_model(spec(arch, channels, size))
        forward_backward(m, channels, size)
        sizes.append(sum(p.numel() for p in m.parameters()))
    assert sizes[0] > sizes[1]  # the student is the small one


def test_grey_input_into_torchvision_net():
    forward_backward(build_model(spec("mobilenet_v3_small", 1, 64)), 1, 64)


@pytest.mark.parametrize("arch, published", [
    ("wrn40_2", 2.24e6), ("wrn16_2", 0.70e6),  # Zagoruyko & Komodakis 2016; CRD / Fast-Datafree tables
    ("resnet18_cifar", 11.17e6), ("resnet34_cifar", 21.28e6),  # CIFAR ResNets, 10 classes
    ("resnet20", 0.27e6),  # He et al. 2016, Table 6
])
def test_parameter_counts_match_published(arch, published):
    n = sum(p.numel() for p in build_model(spec(arch)).parameters())
    assert abs(n - published) / published < 0.02, n


def test_unknown_and_unfit_architectures_are_config_errors():
    with pytest.raises(ConfigError, match="unknown architecture 'resnet19_cifar'"):
        build_model(spec("resnet19_cifar"))
    with pytest.raises(ConfigError, match="'maxvit_t' cannot take 64 px"):
        build_model(spec("maxvit_t", 3, 64))


# --- bring your own teacher: a TorchScript archive ------------------------------------------------

@pytest.fixture
def prepared(in_tmp):
    from kdpipe import data

    meta = data.prepare(load_config(None))
    return in_tmp, {**spec("digits_cnn", meta["channels"], meta["image_size"]), "mean": meta["mean"], "std": meta["std"]}


def _teacher(tspec: dict, seed: int = 1):
    """A teacher with non-trivial weights and BN statistics (a few train-mode batches)."""
    torch.manual_seed(seed)
    m = build_model(tspec)
    with torch.no_grad():
        for _ in range(3):
            m(torch.rand(32, tspec["in_channels"], tspec["image_size"], tspec["image_size"]))
    return m.eval()


@pytest.mark.parametrize("how", ["script", "trace", "bare"])
def test_byo_torchscript_teacher(prepared, how, capsys, monkeypatch):
    import mlflow

    from kdpipe import data
    from kdpipe.stages import run_stage
    from kdpipe.utils import load_json, load_torch, sha256_file

    tmp, tspec = prepared
    mine = _teacher(tspec)
    xs, _ = data.load_split("test")
    if how == "bare":  # the network alone (no kdpipe wrapper): kdpipe normalises with the data's mean/std
        scripted = torch.jit.script(mine.net)
        expected = scripted((xs - mine.mean) / mine.std)
    else:
        scripted = torch.jit.script(mine) if how == "script" else torch.jit.trace(mine, xs[:4])
        expected = scripted(xs)
    path = tmp / "teacher.ts"
    torch.jit.save(scripted, str(path))
    tracked = how == "script"  # MLflow (a fresh sqlite store) once
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp / 'mlflow.db'}")
    out = run_stage("train-teacher", load_config(None, [f"teacher.checkpoint={path}", "teacher.epochs=50",
                                                        "teacher.torchscript_runs_code=true",
                                                        f"tracking.enabled={str(tracked).lower()}"]))

    assert out["skipped"] == "byo-teacher" and out["byo"] == f"torchscript:{sha256_file(path)[:12]}"
    assert "skipped=byo-teacher" in capsys.readouterr().out
    teacher = build_model(load_json("data/teacher/spec.json"))
    teacher.load_state_dict(load_torch("data/teacher/model.pt"))
    with torch.no_grad():
        assert torch.equal(teacher.eval()(xs), expected)
    if not tracked:
        return
    run = mlflow.search_runs(experiment_names=["kdpipe"], output_format="list")[0]
    assert run.data.tags["kdpipe.skipped"] == "byo-teacher"
    assert run.data.tags["teacher.checkpoint_route"] == run.data.params["teacher.checkpoint_route"] == "torchscript"
    assert run.data.tags["teacher.checkpoint_sha256"] == sha256_file(path)
    assert "train_loss" not in run.data.metrics  # nothing was trained


def test_byo_torchscript_of_another_arch_names_the_keys(prepared):
    from kdpipe.stages import train_teacher
    from kdpipe.tracking import Tracker

    tmp, tspec = prepared
    other = _teacher({**tspec, "arch": "digits_cnn_small"})
    torch.jit.save(torch.jit.script(other), str(tmp / "small.ts"))
    cfg = load_config(None, [f"teacher.checkpoint={tmp / 'small.ts'}", "tracking.enabled=false"])
    with pytest.raises(ConfigError, match=r"is a TorchScript archive: opening it \(torch.jit.load\) runs code.*"
                                          r"teacher.torchscript_runs_code=true"):
        train_teacher.run(cfg, Tracker())  # refused by default: nothing is opened with torch.jit.load
    cfg = load_config(None, [f"teacher.checkpoint={tmp / 'small.ts'}", "tracking.enabled=false",
                             "teacher.torchscript_runs_code=true"])
    with pytest.raises(ConfigError, match=r"\(torchscript\) does not fit teacher.arch: missing keys \['net.10.*"
                                          r"unexpected keys \['net.5.bias"):
        train_teacher.run(cfg, Tracker())
    assert not (tmp / "data/teacher").exists()
