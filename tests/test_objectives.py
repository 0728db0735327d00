"""Golden values for the distillation objectives (schedules, hint / attention losses, multi-teacher
targets) and the data-free INT8 export, run for real on a small trained digits model."""
import json
import math

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kdpipe.config import AlphaScheduleCfg, Config, ConfigError, ScheduleCfg, load_config
from kdpipe.feature_kd import FeatureKD, at_loss, attention_map, combined_loss, hint_mse, make_adapter, match_spatial
from kdpipe.losses import distill_loss, kd_loss, kd_loss_probs, multi_teacher_targets
from kdpipe.schedules import value

# ---------------------------------------------------------------- schedules (T 20 -> 4 over 100 steps)


def test_schedules_golden():
    lin = ScheduleCfg(kind="linear", start=20, end=4)
    assert [value(lin, s, 100) for s in (0, 25, 100, 150)] == pytest.approx([20.0, 16.0, 4.0, 4.0])
    cos = ScheduleCfg(kind="cosine", start=20, end=4)
    # 4 + 16·(1 + cos(π/4))/2 = 4 + 8·1.70710678 = 17.65685
    assert [value(cos, s, 100) for s in (0, 25, 50, 100)] == pytest.approx([20.0, 17.656854, 12.0, 4.0])
    step = ScheduleCfg(kind="step", start=20, end=4, milestones=[0.5, 0.75])
    assert [value(step, s, 100) for s in (0, 49, 50, 74, 75, 99)] == pytest.approx([20, 20, 12, 12, 4, 4])
    # constant with start None = the base value: the default changes nothing
    assert value(ScheduleCfg(), 37, 100, base=4.0) == 4.0
    assert value(AlphaScheduleCfg(kind="linear", start=0.0, end=1.0), 30, 120) == pytest.approx(0.25)
    assert value(ScheduleCfg(kind="linear", end=1.0), 50, 100, base=4.0) == pytest.approx(2.5)  # start = base
    d = Config().distill
    assert value(d.temperature_schedule, 10, 100, d.temperature) == d.temperature
    assert value(d.alpha_schedule, 10, 100, d.alpha) == d.alpha


def test_schedule_config_errors_name_the_key():
    with pytest.raises(ConfigError, match=r"distill\.temperature_schedule.*milestones"):
        load_config(None, ["distill.temperature_schedule.kind=step"])
    with pytest.raises(ConfigError, match=r"distill\.alpha_schedule\.end"):
        load_config(None, ["distill.alpha_schedule.end=2"])
    with pytest.raises(ConfigError, match="start"):
        value(ScheduleCfg(kind="linear"), 0, 10)
    cfg = load_config(None, ["distill.hints=[[net.2, net.2]]", "distill.feature_loss=at"])
    assert cfg.distill.hints == [("net.2", "net.2")]


# ---------------------------------------------------------------- feature (hint) KD


def test_hint_mse_adapter_shapes_and_golden():
    # student 16×8×8 -> 1×1 conv -> 64×8×8 -> pooled to the teacher's 4×4
    h = torch.arange(8).view(1, 1, 8, 1).float()
    fs = (torch.arange(16).view(1, 16, 1, 1) + h % 2).expand(2, 16, 8, 8).float()  # c + (h mod 2)
    ft = torch.ones(2, 64, 4, 4)
    adapter = make_adapter(fs, ft)
    assert isinstance(adapter, nn.Conv2d) and adapter.weight.shape == (64, 16, 1, 1)
    with torch.no_grad():  # output channel o copies student channel o mod 16
        adapter.weight.zero_()
        adapter.bias.zero_()
        adapter.weight[torch.arange(64), torch.arange(64) % 16] = 1.0
    a, b = match_spatial(adapter(fs), ft)
    assert a.shape == b.shape == (2, 64, 4, 4)
    # each 2×2 block averages c + {0, 1} to c + 0.5; minus 1 -> c − 0.5: Σ_c (c − 0.5)² / 16 = 1124 / 16
    assert hint_mse(fs, ft, adapter).item() == pytest.approx(70.25)
    assert isinstance(make_adapter(torch.zeros(2, 32), torch.zeros(2, 128)), nn.Linear)
    with pytest.raises(ConfigError, match="both"):
        make_adapter(torch.zeros(2, 32), ft)


def test_attention_transfer_golden():
    fs = torch.tensor([[[[1.0, 0.0], [0.0, 0.0]], [[1.0, 1.0], [0.0, 0.0]]]])  # mean_c F² = [1, .5, 0, 0]
    assert attention_map(fs)[0].tolist() == pytest.approx([2 / math.sqrt(5), 1 / math.sqrt(5), 0, 0])
    ft = torch.ones(1, 3, 4, 4)  # pooled to 2×2 -> uniform map [.5, .5, .5, .5]
    # ‖a − b‖² = 2 − 2 a·b, a·b = 0.5·3/√5
    assert at_loss(fs, ft).item() == pytest.approx(2 - 3 / math.sqrt(5), rel=1e-6)


def _net(width: int, pool: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(1, width, 3, padding=1), nn.ReLU(inplace=True), nn.AdaptiveAvgPool2d(pool),
                         nn.Flatten(), nn.Linear(width * pool * pool, 10))


def test_feature_kd_hooks_adapters_and_gradients():
    torch.manual_seed(0)
    teacher, student, x = _net(64, 4), _net(16, 8), torch.rand(4, 1, 8, 8)
    with pytest.raises(ConfigError, match=r"teacher has no module 'net\.9'; available: 0, 1, 2"):
        FeatureKD(teacher, student, [["net.9", "1"]], example=x)
    fkd = FeatureKD(teacher, student, [["2", "1"], ["4", "4"]], example=x)  # 64×4×4 vs 16×8×8; logits 10 vs 10
    assert [tuple(a.weight.shape) for a in fkd.adapters] == [(64, 16, 1, 1), (10, 10)]
    with torch.no_grad():
        tl = teacher(x)
    sl = student(x)
    loss = fkd()
    expected = hint_mse(fkd.s_feats["1"], fkd.t_feats["2"], fkd.adapters[0]) + F.mse_loss(fkd.adapters[1](sl), tl)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    # the kept output is the ReLU's (>= 0), and the loss trains the student and the adapters, not the teacher
    assert fkd.s_feats["1"].min() >= 0
    loss.backward()
    assert student[0].weight.grad.abs().sum() > 0 and fkd.adapters[0].weight.grad.abs().sum() > 0
    assert teacher[0].weight.grad is None
    at = FeatureKD(teacher, student, [["1", "1"]], kind="at")
    teacher(x), student(x)
    assert at().item() == pytest.approx(at_loss(at.s_feats["1"], at.t_feats["1"]).item())
    fkd.remove(), at.remove()


def test_combined_objective():
    s, t = torch.tensor([[1.0, 2.0, 3.0], [0.5, -1.0, 2.0]]), torch.tensor([[3.0, 2.0, 1.0], [0.0, 0.0, 4.0]])
    assert combined_loss(s, t, 4.0, 0.7).item() == pytest.approx(distill_loss(s, t, 4.0, 0.7).item(), rel=1e-6)
    y, feat = torch.tensor([0, 2]), torch.tensor(0.3)
    got = combined_loss(s, t, 4.0, 0.5, gamma=0.2, labels=y, feature=feat, beta=2.0).item()
    assert got == pytest.approx(0.5 * kd_loss(s, t, 4.0).item() + 0.2 * F.cross_entropy(s, y).item() + 0.6, rel=1e-6)


# ---------------------------------------------------------------- multi-teacher


def test_multi_teacher_targets_golden():
    T = 2.0
    t1 = T * torch.log(torch.tensor([[1.0, 1.0, 2.0]]))  # softmax(t1/T) = [1/4, 1/4, 1/2]
    t2 = T * torch.log(torch.tensor([[1.0, 3.0, 4.0]]))  # softmax(t2/T) = [1/8, 3/8, 1/2]
    assert multi_teacher_targets([t1, t2], T)[0].tolist() == pytest.approx([0.1875, 0.3125, 0.5])
    assert multi_teacher_targets(torch.stack([t1, t2]), T, weights=[3, 1])[0].tolist() == pytest.approx(
        [0.21875, 0.28125, 0.5])
    # uniform student: T²·Σ p log(3p) = 4·(.1875 ln .5625 + .3125 ln .9375 + .5 ln 1.5)
    p = multi_teacher_targets([t1, t2], T)
    golden = 4 * (0.1875 * math.log(0.5625) + 0.3125 * math.log(0.9375) + 0.5 * math.log(1.5))
    assert kd_loss_probs(torch.zeros(1, 3), p, T).item() == pytest.approx(golden, rel=1e-5)
    assert golden == pytest.approx(0.298734, rel=1e-5)
    s, t = torch.randn(5, 10), torch.randn(5, 10)  # one teacher: the ordinary KD loss
    assert kd_loss_probs(s, multi_teacher_targets([t], 4.0), 4.0).item() == pytest.approx(kd_loss(s, t, 4.0).item(), rel=1e-5)


# ---------------------------------------------------------------- data-free INT8 export


def test_int8_export_calibrated_on_synthetic(in_tmp):
    """digits_cnn_small trained for a few seconds on the real digits split, synthetic calibration samples
    from the real synthesize stage (with that model as teacher), then the export stage: INT8 beside FP32."""
    import onnxruntime as ort

    from kdpipe import data, paths
    from kdpipe.models import build_model, make_spec
    from kdpipe.stages import run_stage
    from kdpipe.utils import load_json, save_json, save_torch

    cfg = load_config(None, [
        "tracking.enabled=false", "device=cpu", "student.arch=digits_cnn_small", "synthesize.rounds=3",
        "synthesize.batch_size=64", "synthesize.capacity=192", "synthesize.g_steps=2", "synthesize.kd_steps=2",
        "synthesize.warmup_rounds=1", "export.calibration_samples=128"])
    data.prepare(cfg)
    torch.manual_seed(0)
    x, y = data.load_split("train")
    spec = make_spec("digits_cnn_small", data.load_meta())
    model = build_model(spec)
    opt = torch.optim.Adam(model.parameters(), 1e-2)
    for _ in range(8):
        for idx in torch.randperm(len(x)).split(64):
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    for folder in (paths.TEACHER, paths.STUDENT):
        save_torch(model.state_dict(), folder / "model.pt")
        save_json(spec, folder / "spec.json")
    run_stage("synthesize", cfg)
    run_stage("export", cfg)
    m = load_json(paths.EXPORT / "metrics.json")
    int8 = paths.EXPORT / "student.int8.onnx"
    assert m["int8_calibration_samples"] == 128 and m["onnx_accuracy"] > 0.93 and m["n_test"] == 360
    assert m["int8_top1_agreement"] >= 0.98  # over the whole test split
    assert abs(m["int8_accuracy"] - m["onnx_accuracy"]) <= 0.02
    assert m["int8_size_bytes"] == int8.stat().st_size < m["size_bytes"]
    assert all(m[f"latency_ms_b{b}_{k}"] > 0 for b in (1, 64) for k in ("fp32", "int8"))
    model = onnx.load(str(int8))
    assert {"QuantizeLinear", "DequantizeLinear"} <= {n.op_type for n in model.graph.node}
    props = {p.key: p.value for p in model.metadata_props}
    assert json.loads(props["classes"]) == spec["classes"] == [str(c) for c in range(10)]
    # the INT8 model runs in onnxruntime on its own: same top-1 as FP32 on >= 98 % of a test batch
    xt = data.load_split("test")[0][:128].numpy()
    fp32 = ort.InferenceSession(str(paths.EXPORT / "student.onnx"), providers=["CPUExecutionProvider"])
    q = ort.InferenceSession(str(int8), providers=["CPUExecutionProvider"])
    a, b = fp32.run(None, {"input": xt})[0], q.run(None, {"input": xt})[0]
    assert (a.argmax(1) == b.argmax(1)).mean() >= 0.98 and np.abs(a - b).max() > 1e-3  # quantized, not a copy
    # int8 off: no INT8 model is left beside the new FP32 one
    run_stage("export", cfg.model_copy(update={"export": cfg.export.model_copy(update={"int8": False})}))
    assert not int8.exists() and "int8_accuracy" not in load_json(paths.EXPORT / "metrics.json")


@pytest.mark.parametrize("activations,dtype", [("int8", onnx.TensorProto.INT8), ("uint8", onnx.TensorProto.UINT8)])
def test_int8_activation_type(tmp_path, activations, dtype):
    """export.int8_activations: every QuantizeLinear of the INT8 model has a zero point of that type (the weights
    stay INT8); the model says so in its metadata and runs in onnxruntime next to FP32."""
    from kdpipe.models import build_model
    from kdpipe.quantize import quantize_int8, session
    from kdpipe.stages.export import export_onnx

    torch.manual_seed(0)
    spec = {"arch": "digits_cnn_small", "in_channels": 1, "num_classes": 10, "image_size": 8,
            "classes": [str(i) for i in range(10)], "mean": [0.5], "std": [0.25]}
    fp32, int8 = tmp_path / "fp32.onnx", tmp_path / "int8.onnx"
    export_onnx(build_model(spec).eval(), spec, str(fp32), 18)
    calib = (torch.rand(64, 1, 8, 8) * 255).to(torch.uint8)
    quantize_int8(fp32, int8, calib, activations)
    m = onnx.load(str(int8))
    inits = {t.name: t for t in m.graph.initializer}
    zero_points = [inits[n.input[2]] for n in m.graph.node if n.op_type == "QuantizeLinear"]
    weight_zp = [inits[n.input[2]] for n in m.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in inits
                 and inits[n.input[0]].data_type != onnx.TensorProto.INT32]  # the INT32 biases aside
    assert zero_points and {t.data_type for t in zero_points} == {dtype}
    assert weight_zp and {t.data_type for t in weight_zp} == {onnx.TensorProto.INT8}
    assert ("S8S8" if activations == "int8" else "U8S8") in {p.key: p.value for p in m.metadata_props}["quantization"]
    x = calib[:16].float().div(255).numpy()
    a, b = (session(p).run(None, {"input": x})[0] for p in (fp32, int8))
    assert b.shape == a.shape == (16, 10) and np.abs(a - b).max() < 0.5 * np.abs(a).max()
