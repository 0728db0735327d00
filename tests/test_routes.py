"""The distill stage's routes and objectives (issue 8), for real on a tiny digits project: real and
mixed data (tracked as real, lineage shows the route), private + real refused, T scheduled per step,
hint KD with learned adapters, two teachers (synthesis guide and soft targets), the fine-tune phase,
the default route unchanged (golden values), dvc.yaml rendered from the config, routes side by side.

Torch runs single-threaded here (as in test_faults.py): the golden values are CPU, one-thread figures."""
from __future__ import annotations

import contextlib
import math
import shutil

import pytest
import torch
import yaml

from conftest import ROOT, TINY
from kdpipe.cli import main as cli
from kdpipe.config import Config, ConfigError, load_config
from kdpipe.models import build_model
from kdpipe.utils import load_json, load_torch, save_json, save_torch, sha256_tensors

# The default route from scratch on a fixed synthetic set (fixed_synthetic_set below): the last epoch's loss and
# the L2 norm of each float tensor of data/student/model.pt. Until 99ee6c9 this was the sha256 of model.pt
# (the distill stage as it was before the routes, commit d03a9dc, bit for bit), on the teacher and synthetic set
# the base project trains: an AMD EPYC (AVX2, then AVX-512) gave one sha256, an Intel Xeon with AMX another at
# the same commit (MKL and oneDNN pick other kernels per CPU, and the teacher -> synthesis -> student chain
# amplifies a last-bit difference to 0.6 % of the loss). With the synthetic set drawn from a seeded torch
# generator (the same numbers on every CPU) and no teacher in the loop (augment off: the stored logits are the
# targets), what is left is the student's own float arithmetic: the values below hold to < 1e-6 between MKL's
# default and AVX2 code paths on one CPU; the tolerance is 1e-4.
GOLDEN_DEFAULT_LOSS = 3.91433
GOLDEN_DEFAULT_NORMS = {  # measured on an Intel Xeon (AMX), torch 2.14.1, commit 99ee6c9's tree
    "mean": 0.30509350, "std": 0.37580794, "net.0.weight": 2.30451311, "net.1.weight": 3.99918721,
    "net.1.bias": 0.00104301, "net.1.running_mean": 0.47988467, "net.1.running_var": 2.45879510,
    "net.4.weight": 3.24322720, "net.5.weight": 5.65176586, "net.5.bias": 0.01006919,
    "net.5.running_mean": 1.16423636, "net.5.running_var": 3.42801353, "net.9.weight": 1.84386170,
    "net.9.bias": 0.26092680}
HINTS = "distill.hints=[[net.9, net.6]]"  # teacher digits_cnn: 64×4×4 after conv 3; student: 32×4×4 after conv 2


pytestmark = pytest.mark.usefixtures("one_thread")  # golden values are one-thread figures (conftest.py)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """prepare, train-teacher, baseline (off), synthesize on the tiny settings, tracked in a local sqlite."""
    from kdpipe.stages import run_stage

    root = tmp_path_factory.mktemp("routes")
    tree = Config().model_dump(mode="json")
    for section, values in {**TINY, "baseline": {"enabled": False}}.items():
        tree[section].update(values)
    tree["tracking"]["uri"] = f"sqlite:///{root / 'mlflow.db'}"
    tree["device"] = "cpu"
    (root / "params.yaml").write_text(yaml.safe_dump(tree, sort_keys=False))
    with contextlib.chdir(root):
        cfg = load_config("params.yaml")
        for stage in ("prepare", "train-teacher", "baseline", "synthesize"):
            run_stage(stage, cfg)
    return root


@pytest.fixture
def proj(base, tmp_path, monkeypatch):
    p = tmp_path / "p"
    shutil.copytree(base, p, ignore=shutil.ignore_patterns("mlflow.db"))
    monkeypatch.chdir(p)
    return p


def distill(*overrides: str) -> dict:
    from kdpipe.stages import run_stage

    return run_stage("distill", load_config("params.yaml", list(overrides)))


def last_run(base, stage: str = "distill"):
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{base / 'mlflow.db'}")
    exp = client.get_experiment_by_name("kdpipe").experiment_id
    run = client.search_runs([exp], f"tags.`kdpipe.stage` = '{stage}'", order_by=["attributes.start_time DESC"])[0]
    return client, run


# ------------------------------------------------------------------ from scratch: the same student as before
def fixed_synthetic_set(proj) -> None:
    """data/synthetic/samples.pt with seeded uint8 images and N(0, 3²) logits, its meta.json sha256 to match."""
    g = torch.Generator().manual_seed(0)
    syn = load_torch(proj / "data/synthetic/samples.pt")
    x = torch.randint(0, 256, syn["x"].shape, generator=g, dtype=torch.uint8)
    logits = 3.0 * torch.randn(syn["logits"].shape, generator=g)
    save_torch({**syn, "x": x, "logits": logits}, proj / "data/synthetic/samples.pt")
    meta = load_json(proj / "data/synthetic/meta.json")
    save_json({**meta, "sha256": sha256_tensors(x, logits)}, proj / "data/synthetic/meta.json")


def test_scratch_start_gives_the_plain_kd_student(proj, base):
    fixed_synthetic_set(proj)
    distill("distill.init=scratch")
    history = (proj / "data/student/history.csv").read_text().splitlines()
    loss = float(history[-1].split(",")[history[0].split(",").index("loss")])
    norms = {k: float(v.double().norm()) for k, v in load_torch(proj / "data/student/model.pt").items()
             if v.is_floating_point()}
    assert loss == pytest.approx(GOLDEN_DEFAULT_LOSS, rel=1e-4)
    assert norms.keys() == GOLDEN_DEFAULT_NORMS.keys()
    assert all(norms[k] == pytest.approx(v, rel=1e-4, abs=1e-7) for k, v in GOLDEN_DEFAULT_NORMS.items()), norms
    _, run = last_run(base)
    assert run.data.tags["kdpipe.privacy"] == "data-free" and run.data.tags["kdpipe.route"] == "data-free"
    assert [(d.dataset.name, {t.key: t.value for t in d.tags}["kdpipe.data_kind"]) for d in run.inputs.dataset_inputs] \
        == [("synthetic", "synthetic")]
    assert load_json(proj / "data/student/spec.json")["route"] == "data-free"


# ------------------------------------------------------------------ the EMA student
def test_ema_writes_the_moving_average_of_the_student(proj):
    """distill.ema = d writes θ_ema (θ_ema ← d·θ_ema + (1 − d)·θ each step, BN buffers too): with d → 0 it is the
    last step's student; with d = 0.9 it lags behind it; the logged agreement is the written student's."""
    fixed_synthetic_set(proj)
    runs = {}
    for d in (0.0, 1e-12, 0.9):
        distill("distill.init=scratch", f"distill.ema={d}")
        runs[d] = load_torch(proj / "data/student/model.pt")
    floats = [k for k, v in runs[0.0].items() if v.is_floating_point()]
    gap = lambda a, b: max(float((runs[a][k] - runs[b][k]).abs().max()) for k in floats)  # noqa: E731
    assert gap(0.0, 1e-12) < 1e-6 and gap(0.0, 0.9) > 1e-3
    net = build_model(load_json(proj / "data/student/spec.json"))
    net.load_state_dict(runs[0.9])
    syn = load_torch(proj / "data/synthetic/samples.pt")
    with torch.no_grad():
        agree = (net.eval()(syn["x"].float() / 255).argmax(1) == syn["logits"].argmax(1)).float().mean().item()
    last = (proj / "data/student/history.csv").read_text().splitlines()
    col = last[0].split(",").index("synthetic_agreement")
    assert float(last[-1].split(",")[col]) == pytest.approx(agree, abs=1e-6)


# ------------------------------------------------------------------ default start: the synthesis proxy student
def test_default_starts_from_the_synthesis_proxy_student(proj):
    proxy = load_torch(proj / "data/synthetic/student.pt")
    assert load_json(proj / "data/synthetic/meta.json")["student_arch"] == "digits_cnn_small"
    distill("distill.epochs=1", "distill.lr=1e-9")  # (almost) no step: the weights stay the proxy's
    got = load_torch(proj / "data/student/model.pt")
    weights = [k for k, v in proxy.items() if k.endswith(("weight", "bias"))]
    assert len(weights) == 8 and max(float((got[k] - proxy[k]).abs().max()) for k in weights) < 1e-6
    distill("distill.epochs=1", "distill.lr=1e-9", "distill.init=scratch")
    scratch = load_torch(proj / "data/student/model.pt")
    assert min(float((scratch[k] - proxy[k]).abs().max()) for k in weights) > 1e-3


def test_missing_proxy_student_is_one_clear_error(proj, capsys):
    (proj / "data/synthetic/student.pt").unlink()
    assert cli(["distill"]) == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert "distill.init=synthesis" in line and "data/synthetic/student.pt" in line and "distill.init=scratch" in line
    assert cli(["distill", "--set", "distill.init=scratch", "--set", "distill.epochs=1"]) == 0


# ------------------------------------------------------------------ real and mixed data
@pytest.mark.parametrize("route, tag, inputs", [("real", "kd-real", {"real-train": "real"}),
                                                ("mixed", "kd-mixed", {"synthetic": "synthetic", "real-train": "real"})])
def test_real_and_mixed_routes_are_tracked_as_real(proj, base, route, tag, inputs):
    from kdpipe.lineage import lineage

    out = distill(f"distill.data={route}", "distill.real_fraction=0.25")
    assert out["route"] == tag and math.isfinite(out["loss"])
    client, run = last_run(base)
    assert run.data.tags["kdpipe.privacy"] == "real-data" and run.data.tags["kdpipe.route"] == tag
    got = {d.dataset.name: {t.key: t.value for t in d.tags}["kdpipe.data_kind"] for d in run.inputs.dataset_inputs}
    assert got == inputs
    if route == "mixed":  # 16 real + 48 synthetic samples per batch of 64
        assert run.data.params["real.n_per_batch"] == "16" and run.data.params["synthetic.n_per_batch"] == "48"
    # lineage shows the route (kd-real: straight to the teacher run; kd-mixed: through synthesize)
    res = lineage(client, run.info.run_id)
    assert res["ok"], res["problems"]
    assert [s["stage"] for s in res["chain"]] == (["distill", "train-teacher"] if route == "real"
                                                  else ["distill", "synthesize", "train-teacher"])
    assert res["chain"][0]["route"] == tag
    # a distill run tagged data-free that logged the real data is still an error
    client.set_tag(run.info.run_id, "kdpipe.privacy", "data-free")
    bad = lineage(client, run.info.run_id)
    assert not bad["ok"] and "data-free stage 'distill'" in bad["problems"][0] and "real-train real" in bad["problems"][0]


def test_private_real_data_is_refused(proj, capsys):
    for route in ("real", "mixed"):
        assert cli(["distill", "--set", "data.private=true", "--set", f"distill.data={route}"]) == 2
        err = capsys.readouterr().err
        assert f"distill.data '{route}'" in err and "data.private is true" in err
    assert not (proj / "data/student").exists()
    with pytest.raises(ConfigError, match="distill.feature_weight > 0 needs distill.hints"):
        load_config(None, ["distill.feature_weight=1"])


def test_real_route_is_not_data_free_but_the_default_is(proj):
    """The guard of the data-free stages blocks the real data on the default route only."""
    from kdpipe import data
    from kdpipe.stages import data_free_stage

    cfg = load_config("params.yaml")
    assert data_free_stage("distill", cfg) and data_free_stage("synthesize", load_config("params.yaml", ["distill.data=real"]))
    assert not data_free_stage("distill", load_config("params.yaml", ["distill.data=mixed"]))
    with data.data_free("distill", False), pytest.raises(ConfigError, match="data-free"):
        from kdpipe.routes import real_pool

        real_pool(None, 64, "cpu")


# ------------------------------------------------------------------ schedules, hints, fine-tune
def test_temperature_schedule_changes_T_per_step(proj, base):
    """T linear 20 -> 4 and α cosine 1 -> 0.5 over 2 epochs × 3 steps (192 samples, batch 64): the
    values of each epoch's last step (2, 5) are logged: T = 20 − 16·s/6, α = .5 + .25·(1 + cos(π·s/6))."""
    distill("distill.temperature_schedule={kind: linear, start: 20, end: 4}",
            "distill.alpha_schedule={kind: cosine, start: 1.0, end: 0.5}")
    client, run = last_run(base)
    T = [m.value for m in client.get_metric_history(run.info.run_id, "temperature")]
    alpha = [m.value for m in client.get_metric_history(run.info.run_id, "alpha")]
    assert T == pytest.approx([14.666667, 6.666667], rel=1e-6)
    assert alpha == pytest.approx([0.875, 0.5 + 0.25 * (1 + math.cos(5 * math.pi / 6))], rel=1e-6)
    hist = (proj / "data/student/history.csv").read_text().splitlines()
    assert hist[0] == "epoch,phase,loss,synthetic_agreement,temperature,alpha" and hist[1].split(",")[4] == "14.666667"


def test_feature_kd_learns_the_adapters(proj, base):
    out = distill("distill.feature_weight=1.0", HINTS, "distill.alpha=0.5", "distill.ce_weight=0.1")
    client, run = last_run(base)
    feat = [m.value for m in client.get_metric_history(run.info.run_id, "feature_loss")]
    assert len(feat) == 2 and all(math.isfinite(f) and f > 0 for f in feat)
    assert run.data.metrics["adapter_delta"] > 1e-3  # the 1×1 conv 32 -> 64 was trained
    assert math.isfinite(out["loss"])
    with pytest.raises(ConfigError, match=r"distill.hints: the student has no module 'net\.99'"):
        distill("distill.feature_weight=1.0", "distill.hints=[[net.9, net.99]]")


def test_finetune_phase_on_real_labels(proj, base):
    distill("distill.data=real", "distill.finetune_epochs=2", "distill.finetune_lr=0.01")
    client, run = last_run(base)
    hist = [line.split(",") for line in (proj / "data/student/history.csv").read_text().splitlines()[1:]]
    assert [h[1] for h in hist] == ["kd", "kd", "finetune", "finetune"]
    # real train split: 1167 samples / 64 = 19 steps per epoch; cosine lr after 19 of 38 steps: 0.01·(1 + cos(π/2))/2
    lr = [m.value for m in client.get_metric_history(run.info.run_id, "lr")]
    assert lr[2] == pytest.approx(0.005, rel=1e-6) and lr[3] == pytest.approx(0.0, abs=1e-12)


# ------------------------------------------------------------------ two teachers
def test_two_teachers_guide_synthesis_and_soft_targets(proj, base):
    from kdpipe.losses import kd_loss_probs, multi_teacher_targets
    from kdpipe.losses import kd_per_sample
    from kdpipe.stages import run_stage
    from kdpipe.teachers import target_logits

    # targets as logits: KD against them is KD against the averaged tempered probabilities
    t, s = torch.randn(2, 5, 10), torch.randn(5, 10)
    p = multi_teacher_targets(t, 3.0, [1.0, 0.5])
    assert kd_per_sample(s, target_logits(t, 3.0, torch.tensor([1.0, 0.5])), 3.0).mean().item() == pytest.approx(
        kd_loss_probs(s, p, 3.0).item(), rel=1e-5)

    g = torch.Generator().manual_seed(0)  # a second teacher: the first with perturbed weights
    sd = load_torch(proj / "data/teacher/model.pt")
    save_torch({k: v + 0.05 * torch.randn(v.shape, generator=g) if k.endswith("weight") else v for k, v in sd.items()},
               proj / "second.pt")
    teachers = "teachers=[{}, {arch: digits_cnn, checkpoint: second.pt, weight: 0.5}]"
    cfg = load_config("params.yaml", [teachers])
    run_stage("synthesize", cfg)
    # the stored logits are the guide's: log of (1·p_1 + 0.5·p_2) / 1.5 on the stored images
    from kdpipe.teachers import load_teachers

    ens = load_teachers(cfg, "cpu")[0]
    syn = load_torch(proj / "data/synthetic/samples.pt")
    x = syn["x"].float() / 255
    with torch.no_grad():
        want = multi_teacher_targets(ens.logits(x), 1.0, [1.0, 0.5]).clamp_min(1e-12).log()
    assert torch.allclose(syn["logits"], want, atol=1e-5)
    out = run_stage("distill", load_config("params.yaml", [teachers, "distill.alpha=0.7"]))
    assert math.isfinite(out["loss"])
    _, run = last_run(base)
    assert len(run.data.tags["teachers.sha256"].split(",")) == 2
    with pytest.raises(ConfigError, match=r"teachers\.1\.arch is needed"):
        run_stage("distill", load_config("params.yaml", ["teachers=[{}, {checkpoint: second.pt}]"]))


# ------------------------------------------------------------------ dvc.yaml follows the config
def test_dvc_yaml_is_the_default_rendering(proj, capsys):
    from kdpipe import dag

    text = (ROOT / "dvc.yaml").read_text()
    assert dag.render(Config(), text) == text, "dvc.yaml is out of date: run 'kdpipe dag --write'"
    deps = lambda t, stage: [d for d in yaml.safe_load(t)["stages"][stage]["deps"] if not d.startswith("kdpipe/")]
    assert deps(text, "distill") == ["data/synthetic", "data/teacher"] and deps(text, "synthesize") == ["data/teacher"]
    real = dag.render(load_config(None, ["distill.data=real"]), text)
    assert deps(real, "distill") == ["data/teacher", "data/prepared"] and deps(real, "synthesize") == ["data/teacher"]
    mixed = dag.render(load_config(None, ["distill.data=mixed", "teachers=[{}, {arch: x, checkpoint: t2.pt}]"]), text)
    assert deps(mixed, "distill") == ["data/synthetic", "data/teacher", "t2.pt", "data/prepared"]
    assert deps(mixed, "synthesize") == ["data/teacher", "t2.pt"]
    shutil.copy(ROOT / "dvc.yaml", proj / "dvc.yaml")
    with pytest.raises(ConfigError, match="kdpipe dag --write"):
        dag.check(load_config(None, ["distill.data=real"]), proj / "dvc.yaml")
    assert cli(["dag", "--write", "--set", "distill.data=real"]) == 0
    assert (proj / "dvc.yaml").read_text() == real
    dag.check(load_config(None, ["distill.data=real"]), proj / "dvc.yaml")


# ------------------------------------------------------------------ routes side by side
def test_evaluate_and_summary_put_the_routes_side_by_side(proj):
    from kdpipe.pipeline import routes
    from kdpipe.stages import run_stage

    distill("distill.data=real")
    run_stage("evaluate", load_config("params.yaml"))
    m = load_json(proj / "data/reports/metrics.json")
    assert m["student"]["route"] == "kd-real" and m["routes"] == {"kd-real": m["student"]["accuracy"]}
    e = {"int8_accuracy": 0.5}  # export's figure, once it has run
    assert routes(m, e) == [("teacher", "", m["teacher"]["accuracy"]), ("student", "KD real", m["student"]["accuracy"]),
                            ("student", "KD real + INT8", 0.5)]


def test_keep_reservoir_writes_a_uniform_sample_of_every_round(proj):
    """synthesize.keep=reservoir: the same run (generator, proxy student bit for bit: the reservoir draws from
    its own generator), but the set written spans every round instead of the buffer's last ones."""
    from kdpipe.stages import run_stage
    from kdpipe.teachers import load_teachers

    out = {}
    for keep in ("buffer", "reservoir"):
        cfg = load_config("params.yaml", ["synthesize.rounds=6", f"synthesize.keep={keep}"])  # 384 made, 192 kept
        run_stage("synthesize", cfg)
        out[keep] = {f: (proj / "data/synthetic" / f).read_bytes() for f in ("generator.pt", "student.pt")}
        out[keep]["samples"] = load_torch(proj / "data/synthetic/samples.pt")
        out[keep]["meta"] = load_json(proj / "data/synthetic/meta.json")
    buf, res = out["buffer"], out["reservoir"]
    assert buf["generator.pt"] == res["generator.pt"] and buf["student.pt"] == res["student.pt"]
    assert res["meta"]["kept"] == "reservoir" and res["meta"]["n"] == len(res["samples"]["x"]) == 192
    # the reservoir keeps about half of each round's 64 samples (hypergeometric sd 3.5: 16-48 is beyond 4.5 sd)
    per_round = torch.bincount(res["samples"]["age"] // 64, minlength=6)
    assert len(per_round) == 6 and per_round.min() >= 16 and per_round.max() <= 48, per_round.tolist()
    assert not torch.equal(buf["samples"]["age"].sort().values, res["samples"]["age"].sort().values)
    # the stored logits are the teacher's on the stored (quantized) images
    teacher = load_teachers(cfg, "cpu")[0]
    with torch.no_grad():
        want = teacher(res["samples"]["x"].float() / 255)
    assert torch.allclose(res["samples"]["logits"], want, atol=1e-4)


# ------------------------------------------------------------------ mixup (function matching)
def test_mix_is_a_convex_pair_with_beta_weights():
    """mix(x, a, g): row i = λ_i·x_i + (1 − λ_i)·x_π(i), λ_i ~ Beta(a, a): on one-hot rows λ_i is read back; its mean
    is ½ and its variance 1 / (4(2a + 1)) (n = 4000: standard errors ~0.005 and ~0.002); the same g, the same mix."""
    from kdpipe.stages.distill import mix

    n = 4000
    x = torch.eye(n).view(n, 1, 1, n)
    for a in (0.2, 1.0):
        out = mix(x, a, torch.Generator().manual_seed(0)).view(n, n)
        assert torch.equal(out, mix(x, a, torch.Generator().manual_seed(0)).view(n, n))
        assert torch.allclose(out.sum(1), torch.ones(n)) and (out >= 0).all() and ((out > 0).sum(1) <= 2).all()
        lam = out.diagonal()[(out > 0).sum(1) == 2]  # rows whose partner is another row
        assert lam.mean().item() == pytest.approx(0.5, abs=0.02)
        assert lam.var().item() == pytest.approx(1 / (4 * (2 * a + 1)), abs=0.01)


def test_distill_mixup_relabels_the_mixed_images_with_the_teacher(proj, base):
    """With distill.mixup the teacher runs on each (mixed) batch: the run differs from the plain one, stays finite,
    and logs the key."""
    plain = distill("distill.init=scratch")
    mixed = distill("distill.init=scratch", "distill.mixup=0.4")
    assert math.isfinite(mixed["loss"]) and mixed["loss"] != plain["loss"]
    _, run = last_run(base)
    assert run.data.params["distill.mixup"] == "0.4"


# ------------------------------------------------------------------ flip (natural images)
def test_flips_mirror_about_half_the_rows_and_only_those():
    """flips(n, g): each row with probability ½ (n = 10,000: standard error 0.005), the same g the same draws;
    flip_rows reverses the width of exactly the drawn rows."""
    from kdpipe.stages.distill import flip_rows, flips

    f = flips(10_000, torch.Generator().manual_seed(0))
    assert f.float().mean().item() == pytest.approx(0.5, abs=0.02)
    assert torch.equal(f, flips(10_000, torch.Generator().manual_seed(0)))
    x = torch.arange(4 * 2 * 3 * 5, dtype=torch.float32).view(4, 2, 3, 5)
    out = flip_rows(x, torch.tensor([True, False, True, False]))
    assert torch.equal(out[0], x[0, :, :, [4, 3, 2, 1, 0]]) and torch.equal(out[2], x[2].flip(-1))
    assert torch.equal(out[1], x[1]) and torch.equal(out[3], x[3])


def test_distill_flip_relabels_the_mirrored_images_with_the_teacher(proj, base):
    """With distill.flip the teacher runs on each (half-mirrored) batch: the run differs from the plain one, stays
    finite, and logs the key."""
    plain = distill("distill.init=scratch")
    flipped = distill("distill.init=scratch", "distill.flip=true")
    assert math.isfinite(flipped["loss"]) and flipped["loss"] != plain["loss"]
    _, run = last_run(base)
    assert run.data.params["distill.flip"] == "True"
