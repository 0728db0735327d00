"""The teacher card (kdpipe/teacher_card.py): teachers handed over as ONNX (Keras via tf2onnx, PyTorch with BN
kept), torchvision/timm state_dicts, TorchScript refused; the card's errors; the student's input adapter."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from torch import nn

from kdpipe.config import ConfigError, load_config
from kdpipe.synth.bn_hooks import BNPrior
from kdpipe.teacher_card import InputAdapter, has_batchnorm, load_card, to_convention

FIXTURES = Path(__file__).parent / "fixtures"
KERAS = FIXTURES / "keras_digits.onnx"
NO_NORM = ["teacher.mean=null", "teacher.std=null"]


class CustomNet(nn.Module):
    """Not in any zoo: two conv-BN blocks and a linear head."""

    def __init__(self, classes: int = 10):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
                                      nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, classes))

    def forward(self, x):
        return self.head(self.features(x))


def export_bn_kept(model: nn.Module, path: Path, shape=(1, 8, 8), classes=None) -> Path:
    """torch.onnx.export with the BatchNormalization nodes kept (TrainingMode.PRESERVE, no constant folding)."""
    model.eval()
    torch.onnx.export(model, (torch.rand(2, *shape),), str(path), dynamo=False, opset_version=17,
                      training=torch.onnx.TrainingMode.PRESERVE, do_constant_folding=False,
                      input_names=["input"], output_names=["logits"], dynamic_axes={"input": {0: "n"}})
    if classes:
        import onnx

        m = onnx.load(str(path))
        m.metadata_props.add(key="classes", value=json.dumps(classes))
        onnx.save(m, str(path))
    return path


def trained_custom(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    m = CustomNet()
    with torch.no_grad():  # non-trivial BN running statistics
        m.train()
        for _ in range(3):
            m(torch.rand(32, 1, 8, 8))
    return m.eval()


def card(*sets: str):
    return load_config(None, ["data.name=none", *sets]).teacher


def test_keras_onnx_nhwc_bn_folded():
    """The tf2onnx Keras teacher (NHWC, [0, 255], BN folded): layout, channels, size and classes read from the
    file; no BatchNorm, so the BN prior is a zero on the teacher's device; the module matches onnxruntime and
    passes gradients to its input."""
    teacher, c = load_card(card(f"teacher.source={KERAS}", "teacher.range=[0, 255]", *NO_NORM))
    assert (c.layout, c.channels, c.input_size, c.classes) == ("NHWC", 1, 8, [str(i) for i in range(10)])
    assert c.loader == "onnx2torch" and not has_batchnorm(teacher)
    prior = BNPrior(teacher)
    assert prior.hooks == [] and prior.loss().item() == 0.0 and prior.loss().device == next(teacher.buffers()).device
    x = torch.rand(16, 1, 8, 8, requires_grad=True)
    got = teacher(x)
    sess = ort.InferenceSession(str(KERAS), providers=["CPUExecutionProvider"])
    ref = sess.run(None, {sess.get_inputs()[0].name: (x.detach() * 255).permute(0, 2, 3, 1).numpy()})[0]
    assert np.abs(got.detach().numpy() - ref).max() < 1e-4
    got.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_pytorch_onnx_bn_kept(tmp_path):
    """A custom nn.Module exported with its BatchNormalization nodes: onnx2torch gives nn.BatchNorm2d with the
    running statistics, so the BN prior hooks them; classes named on the card; matches onnxruntime."""
    m = trained_custom()
    path = export_bn_kept(m, tmp_path / "custom.onnx")
    teacher, c = load_card(card(f"teacher.source={path}", "teacher.range=[0, 1]", *NO_NORM, "teacher.classes=10"))
    assert c.layout == "NCHW" and has_batchnorm(teacher)
    prior = BNPrior(teacher)
    assert len(prior.hooks) == 2
    bns = [h.module for h in prior.hooks]
    assert torch.allclose(bns[0].running_var, m.features[1].running_var)
    x = torch.rand(8, 1, 8, 8)
    with torch.no_grad():
        assert torch.allclose(teacher(x), m(x), atol=1e-5)
        teacher(x)
    assert prior.loss().item() > 0


def test_state_dicts_torchvision_and_timm(tmp_path):
    tv = tmp_path / "resnet18.pt"
    import torchvision

    torch.manual_seed(0)
    ref = torchvision.models.resnet18(num_classes=5).eval()
    torch.save(ref.state_dict(), tv)
    sets = [f"teacher.checkpoint={tv}", "teacher.source=torchvision:resnet18", "teacher.range=[0, 1]",
            "teacher.mean=[0.485, 0.456, 0.406]", "teacher.std=[0.229, 0.224, 0.225]", "teacher.classes=5"]
    with pytest.raises(ConfigError, match=r"teacher.input_size cannot be read"):
        load_card(card(*sets))
    teacher, c = load_card(card(*sets, "teacher.input_size=32"))
    assert c.channels == 3 and c.loader == "state_dict"  # channels read from the first convolution
    x = torch.rand(4, 3, 32, 32)
    with torch.no_grad():  # the card's normalisation is applied before the network
        want = ref((x - torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)) / torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1))
        assert torch.allclose(teacher(x), want, atol=1e-5)
    with pytest.raises(ConfigError, match=r"does not fit teacher.source 'torchvision:resnet18' with 10 classes"):
        load_card(card(*sets[:-1], "teacher.classes=10", "teacher.input_size=32"))

    import timm

    tm = timm.create_model("resnet10t", num_classes=3, in_chans=1)
    torch.save({"state_dict": tm.state_dict()}, tmp_path / "timm.pt")  # a training script's wrapper
    teacher, c = load_card(card(f"teacher.checkpoint={tmp_path / 'timm.pt'}", "teacher.source=timm:resnet10t",
                                "teacher.range=[0, 1]", *NO_NORM, "teacher.classes=[a, b, c]", "teacher.input_size=16"))
    assert c.channels == 1 and c.classes == ["a", "b", "c"] and has_batchnorm(teacher)


def test_card_errors_name_the_key(tmp_path):
    path = export_bn_kept(trained_custom(), tmp_path / "custom.onnx")
    with pytest.raises(ConfigError, match=r"incomplete: teacher.range.*not set"):
        load_card(card(f"teacher.source={path}", *NO_NORM, "teacher.classes=10"))
    with pytest.raises(ConfigError, match=r"incomplete: teacher.mean, teacher.std not set"):
        load_card(card(f"teacher.source={path}", "teacher.range=[0, 1]", "teacher.classes=10"))
    with pytest.raises(ConfigError, match=r"incomplete: teacher.classes cannot be read"):
        load_card(card(f"teacher.source={path}", "teacher.range=[0, 1]", *NO_NORM))
    with pytest.raises(ConfigError, match=r"teacher.classes has 3 names, but the teacher .* outputs \(10,\)"):
        load_card(card(f"teacher.source={path}", "teacher.range=[0, 1]", *NO_NORM, "teacher.classes=3"))
    with pytest.raises(ConfigError, match=r"teacher.channels is 3, but .* takes 1"):
        load_card(card(f"teacher.source={path}", "teacher.range=[0, 1]", *NO_NORM, "teacher.classes=10",
                       "teacher.channels=3"))
    with pytest.raises(ConfigError, match=r"key 'teacher.layout'"):
        card(f"teacher.source={path}", "teacher.layout=CHW")
    with pytest.raises(ConfigError, match=r"data.name 'none'.*set teacher.source"):
        load_config(None, ["data.name=none"])
    with pytest.raises(ConfigError, match=r"high > low"):
        card(f"teacher.source={path}", "teacher.range=[1, 0]")


def test_torchscript_refused_unless_opted_in(tmp_path):
    ts = tmp_path / "teacher.ts"
    torch.jit.save(torch.jit.script(trained_custom()), str(ts))
    sets = [f"teacher.source={ts}", "teacher.range=[0, 1]", *NO_NORM, "teacher.classes=10", "teacher.input_size=8",
            "teacher.channels=1"]
    with pytest.raises(ConfigError, match=r"TorchScript archive: opening it \(torch.jit.load\) runs code.*ONNX.*"
                                          r"state_dict.*teacher.torchscript_runs_code=true"):
        load_card(card(*sets))
    teacher, c = load_card(card(*sets, "teacher.torchscript_runs_code=true"))
    assert c.loader == "torch.jit.load (runs code)" and teacher(torch.rand(2, 1, 8, 8)).shape == (2, 10)


def test_input_adapter_inverts_the_card():
    """The exported student takes the teacher's own input: InputAdapter(to_convention(x)) feeds the student x."""
    conv = {"layout": "NHWC", "range": [0, 255], "mean": [120.0, 110.0, 100.0], "std": [60.0, 50.0, 40.0]}
    x = torch.rand(4, 3, 6, 6)
    xt = to_convention(x, conv)
    assert xt.shape == (4, 6, 6, 3)
    assert torch.allclose(xt[..., 1], (x[:, 1] * 255 - 110) / 50)
    assert torch.allclose(InputAdapter(nn.Identity(), conv)(xt), x, atol=1e-5)


def test_dag_without_real_data(tmp_path, monkeypatch):
    """`kdpipe dag` of a teacher-only config: no prepare, train-teacher or baseline; the teacher file is the dep
    of every stage that reads the teacher, the card (params: teacher) too; the default config renders as committed."""
    import yaml

    from kdpipe import dag

    root = Path(__file__).resolve().parents[1]
    text = (root / "dvc.yaml").read_text()
    assert dag.render(load_config(root / "params.yaml"), text) == text
    monkeypatch.chdir(tmp_path)
    cfg = load_config(None, ["data.name=none", f"teacher.source={KERAS}", "teacher.range=[0, 255]", *NO_NORM])
    doc = yaml.safe_load(dag.render(cfg, text))
    assert list(doc["stages"]) == ["synthesize", "distill", "evaluate", "export"]
    for stage in doc["stages"].values():
        data = [d for d in stage["deps"] if not d.startswith("kdpipe/")]
        assert str(KERAS) in data and "data/prepared" not in data and "data/teacher" not in data
        assert "teacher" in stage["params"]
    assert yaml.safe_load(dag.project_yaml(cfg))["stages"].keys() == doc["stages"].keys()
    dag.check(cfg, _write(tmp_path / "dvc.yaml", dag.project_yaml(cfg)))  # kdpipe init's dvc.yaml is up to date


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_owner_activation_stats_stand_in_for_bn(tmp_path):
    """The data owner's aggregate for a teacher without BN: exact per-channel mean/variance of every convolution's
    output over their images; the prior on them is zero on a batch with those statistics and grows off them;
    a stats file of another teacher is refused."""
    from kdpipe.score import owner_stats
    from kdpipe.stages.synthesize import owner_stats as read_stats
    from kdpipe.synth.bn_hooks import activation_stats
    from test_teacher_only import owner_folder

    teacher, c = load_card(card(f"teacher.source={KERAS}", "teacher.range=[0, 255]", *NO_NORM))
    x = torch.rand(50, 1, 8, 8)
    stats = activation_stats(teacher, x.split(16))
    convs = {n: m for n, m in teacher.named_modules() if isinstance(m, nn.Conv2d)}
    assert set(stats) == set(convs) and len(stats) == 3
    seen = {}
    h = [m.register_forward_hook(lambda m, i, o, n=n: seen.__setitem__(n, o)) for n, m in convs.items()]
    with torch.no_grad():
        teacher(x)
    for hh in h:
        hh.remove()
    for n, o in seen.items():
        assert torch.allclose(stats[n]["mean"], o.mean(dim=(0, 2, 3)), atol=1e-5)
        assert torch.allclose(stats[n]["var"], o.transpose(0, 1).flatten(1).var(1, unbiased=False), atol=1e-4)
    prior = BNPrior(teacher, 0.0, stats)
    with torch.no_grad():
        teacher(x)
    assert prior.loss().item() < 1e-3
    with torch.no_grad():
        teacher(x * 0.2)
    assert prior.loss().item() > 0.1
    prior.remove()

    folder = owner_folder(tmp_path / "owner")
    cfg = load_config(None, ["data.name=none", f"teacher.source={KERAS}", "teacher.range=[0, 255]", *NO_NORM])
    r = owner_stats(cfg, str(folder), str(tmp_path / "stats.pt"))
    assert r["n_images"] == 360 and r["layers"] == 3
    assert set(read_stats(str(tmp_path / "stats.pt"), c.sha256)) == set(convs)
    with pytest.raises(ConfigError, match="was not made for this teacher"):
        read_stats(str(tmp_path / "stats.pt"), "0" * 64)


def test_standard_stats_are_a_unit_gaussian_on_every_convolution():
    """synthesize.stats: standard (no owner): targets μ = 0, σ² = 1 per channel of every Conv2d's output, so the
    prior is Σ_l ‖μ_l‖₂ + ‖σ²_l − 1‖₂ of the batch; refused for a teacher that has BatchNorm layers."""
    from kdpipe.synth.bn_hooks import channel_stats, standard_stats

    teacher, _ = load_card(card(f"teacher.source={KERAS}", "teacher.range=[0, 255]", *NO_NORM))
    convs = {n: m for n, m in teacher.named_modules() if isinstance(m, nn.Conv2d)}
    stats = standard_stats(teacher)
    assert set(stats) == set(convs) and len(stats) == 3
    for n, m in convs.items():
        assert torch.equal(stats[n]["mean"], torch.zeros(m.out_channels))
        assert torch.equal(stats[n]["var"], torch.ones(m.out_channels))
    seen = {}
    h = [m.register_forward_hook(lambda m, i, o, n=n: seen.__setitem__(n, o)) for n, m in convs.items()]
    prior = BNPrior(teacher, 0.0, stats)
    with torch.no_grad():
        teacher(torch.rand(32, 1, 8, 8) * 255)
    for hh in h:
        hh.remove()
    want = sum(float(torch.norm(mu, 2) + torch.norm(var - 1, 2)) for mu, var in map(channel_stats, seen.values()))
    assert prior.loss().item() == pytest.approx(want, rel=1e-5) and want > 0
    prior.remove()
    with pytest.raises(ConfigError, match="synthesize.stats: standard is for a teacher without BatchNorm"):
        standard_stats(nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4)))
