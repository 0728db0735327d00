"""Teacher-only projects, end to end, each in an empty temp folder with no dataset in it: `kdpipe init` ->
`dvc repro` (or `kdpipe run --no-dvc`) -> data/export/student.onnx -> `kdpipe score` on a labelled folder on
the data owner's side -> `kdpipe lineage`. Real producers: (a) the Keras CNN exported by tf2onnx (NHWC, BN folded;
tests/fixtures/keras_digits.onnx, made by tests/fixtures/make_keras_teacher.py), (b) a custom PyTorch module
exported with its BatchNormalization nodes, (c) a torchvision:resnet18 state_dict with 10 classes, (d) a timm
state_dict."""
from __future__ import annotations

import json
import os
import re
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from conftest import BIN, ROOT, project_env, run
from test_teacher_card import KERAS, export_bn_kept, trained_custom

pytestmark = pytest.mark.slow

KDPIPE = BIN + "/kdpipe"
TINY = ["synthesize.rounds=4", "synthesize.batch_size=64", "synthesize.capacity=192", "synthesize.g_steps=2",
        "synthesize.kd_steps=4", "synthesize.warmup_rounds=1", "distill.epochs=2", "distill.batch_size=64",
        "evaluate.fidelity_samples=256", "export.calibration_samples=64"]
NO_NORM = ["teacher.mean=null", "teacher.std=null"]


def owner_folder(dest: Path) -> Path:
    """The data owner's labelled digits (the Keras fixture's own test split) as PNGs: <dest>/<class>/<i>.png."""
    from PIL import Image
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x = np.rint(d.images * (255.0 / 16.0)).astype(np.uint8)
    _, xt, _, yt = train_test_split(x, d.target, test_size=0.2, random_state=0, stratify=d.target)
    for i, (img, c) in enumerate(zip(xt, yt)):
        (dest / str(c)).mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(dest / str(c) / f"{i}.png")
    return dest


def ran_stages(output: str) -> set[str]:
    return set(re.findall(r"Running stage '([\w-]+)'", output))


def allowed(path: str, proj: Path, test_dir: Path) -> bool:
    """A file a teacher-only run may open: its project, Python and the installed packages, the system, its own
    temp files (onnxruntime's quantizer) - not the test's folder, where the handed-over files and the owner's
    data are."""
    p = Path(path)
    if p.is_relative_to(proj):
        return True
    if p.is_relative_to(test_dir):
        return False
    if p.is_relative_to(tempfile.gettempdir()) and "pytest-of" not in path:
        return True
    if p.is_relative_to(ROOT):  # the checkout: only the venv and the kdpipe sources (editable install), and its
        # .git, which MLflow's git context reads for the entry point's (the kdpipe script's) repository
        return any(p.is_relative_to(ROOT / d) for d in (".venv", "kdpipe", "flows", ".git"))
    roots = [sys.prefix, sys.base_prefix, "/usr", "/lib", "/etc", "/proc", "/sys", "/dev", "/opt", "/root/.pyenv",
             str(Path.home() / ".cache"), str(Path.home() / ".config"), str(Path.home() / ".gitconfig"),
             "/tmp/torchinductor_root"]
    return any(p.is_relative_to(r) for r in roots)


def check_lineage(proj: Path, env: dict, teacher_file: Path) -> str:
    out = run([KDPIPE, "lineage", "kdpipe-student@candidate"], proj, env=env).stdout
    sha = __import__("hashlib").sha256(teacher_file.read_bytes()).hexdigest()
    assert out.startswith("lineage of kdpipe-student@candidate: data-free, no real data anywhere")
    assert f"  teacher   teacher/{teacher_file.name} sha256 {sha} (card: " in out
    assert "  data      none: no stage read real data" in out
    commit = run(["git", "rev-parse", "HEAD"], proj, env=env).stdout.strip()
    assert f"  commit    {commit} (clean)" in out
    assert len(out.strip().splitlines()) <= 25
    verbose = run([KDPIPE, "lineage", "kdpipe-student@candidate", "--verbose"], proj, env=env).stdout
    lock = yaml.safe_load((proj / "dvc.lock").read_text())
    syn_md5 = next(o["md5"] for o in lock["stages"]["synthesize"]["outs"] if o["path"] == "data/synthetic")
    assert f"synthetic.dvc_md5 = {syn_md5}" in verbose
    assert '"layout": "' in verbose and "teacher card {" in verbose
    assert run([KDPIPE, "lineage", "kdpipe-student@candidate", "--verify"], proj, env=env).returncode == 0
    return out


@pytest.mark.parametrize("producer", ["keras", "pytorch-bn"])
def test_init_dvc_repro_score_lineage(producer, tmp_path):
    if producer == "keras":
        teacher = KERAS
        card = ["teacher.range=[0, 255]", *NO_NORM]
    else:
        teacher = export_bn_kept(trained_custom(), tmp_path / "custom_bn.onnx")
        card = ["teacher.range=[0, 1]", *NO_NORM, "teacher.classes=10"]
    proj = tmp_path / "project"
    env = project_env(proj)
    r = run([KDPIPE, "init", str(proj), "--teacher", str(teacher), *[a for c in card + TINY for a in ("--set", c)]],
            tmp_path, env=env)
    assert "no real data" in r.stdout
    assert ("no BatchNorm layers" in r.stdout) == (producer == "keras")
    params = yaml.safe_load((proj / "params.yaml").read_text())
    # BN folded (keras): the BN prior on standard targets by default; BN kept: the teacher's own statistics
    assert params["synthesize"]["stats"] == ("standard" if producer == "keras" else None)
    assert params["data"]["name"] == "none" and params["teacher"]["source"] == f"teacher/{teacher.name}"
    assert params["teacher"]["layout"] == ("NHWC" if producer == "keras" else "NCHW")
    dvc = yaml.safe_load((proj / "dvc.yaml").read_text())
    assert list(dvc["stages"]) == ["synthesize", "distill", "evaluate", "export"]
    assert f"teacher/{teacher.name}" in dvc["stages"]["synthesize"]["deps"] and "teacher" in dvc["stages"]["synthesize"]["params"]

    trace = tmp_path / "opens.txt"
    first = run(["dvc", "repro"], proj, env={**env, "KDPIPE_TRACE_OPENS": str(trace)})
    assert ran_stages(first.stdout) == {"synthesize", "distill", "evaluate", "export"}
    assert (proj / "data/export/student.onnx").exists() and not (proj / "data/prepared").exists()
    opened = set(trace.read_text().split())
    assert str(proj / "teacher" / teacher.name) in opened
    outside = sorted(p for p in opened if not allowed(p, proj, tmp_path) and p != str(trace))
    assert outside == [], f"files read outside the project, the teacher and the installed packages: {outside[:10]}"
    assert not any("digits" in p and "sklearn" in p for p in opened) and str(teacher) not in opened
    assert ran_stages(run(["dvc", "repro"], proj, env=env).stdout) == set()  # a second repro is a no-op

    m = json.loads((proj / "data/reports/metrics.json").read_text())
    assert m["data"] == "none" and m["n_heldout"] == 256
    assert 0 <= m["student"]["agreement"] <= 1 and m["student"]["kl"] >= 0 and 0 <= m["student"]["ece"] <= 1
    e = json.loads((proj / "data/export/metrics.json").read_text())
    assert e["max_abs_diff"] < 1e-4 and e["top1_agreement"] == 1.0

    # the data owner's side: the exported student and the teacher on labelled images, onnxruntime alone
    owner = owner_folder(tmp_path / "owner")
    sc = run([KDPIPE, "score", "data/export/student.onnx", "--data", str(owner), "--teacher", f"teacher/{teacher.name}",
              "--out", str(tmp_path / "score.json")], proj, env=env)
    res = json.loads((tmp_path / "score.json").read_text())
    assert res["n"] == 360 and res["linked_model"] == "kdpipe-student/1"
    if producer == "keras":  # the fixture's own figure: 0.9944 on this split
        assert res["teacher_accuracy"] >= 0.98
    import onnxruntime as ort
    from PIL import Image

    sess = ort.InferenceSession(str(proj / "data/export/student.onnx"), providers=["CPUExecutionProvider"])
    files = sorted(owner.rglob("*.png"))
    x = np.stack([np.asarray(Image.open(f), dtype=np.float32) for f in files])[..., None]  # N×8×8×1 in [0, 255]
    if producer != "keras":
        x = x.transpose(0, 3, 1, 2) / 255.0
    y = np.array([int(f.parent.name) for f in files])
    acc = float((sess.run(None, {"input": x})[0].argmax(1) == y).mean())  # the student takes the teacher's input
    assert abs(acc - res["student_accuracy"]) < 1e-9, sc.stdout
    out = check_lineage(proj, env, teacher)
    assert f"  owner     score run {res['run_id'][:8]} " in out


@pytest.mark.parametrize("source", ["torchvision:resnet18", "timm:resnet10t"])
def test_state_dict_teacher_to_onnx(source, tmp_path):
    """A state_dict saved by a plain script (the issue's own example), in a folder holding only that file."""
    torch.manual_seed(0)
    if source.startswith("torchvision"):
        import torchvision

        net = torchvision.models.resnet18(num_classes=10)
    else:
        import timm

        net = timm.create_model("resnet10t", num_classes=10)
    with torch.no_grad():  # BN statistics of something, so the BN prior has a target
        net.train()
        net(torch.rand(16, 3, 32, 32))
    (tmp_path / "handed").mkdir()
    torch.save(net.state_dict(), tmp_path / "handed" / "my_teacher.pt")
    proj = tmp_path / "project"
    env = project_env(proj)
    sets = [f"teacher.source={source}", "teacher.input_size=32", "teacher.range=[0, 1]",
            "teacher.mean=[0.485, 0.456, 0.406]", "teacher.std=[0.229, 0.224, 0.225]", "teacher.classes=10",
            *TINY, "synthesize.rounds=2", "distill.epochs=1"]
    run([KDPIPE, "init", str(proj), "--teacher", str(tmp_path / "handed" / "my_teacher.pt"),
         *[a for s in sets for a in ("--set", s)]], tmp_path, env=env)
    r = run([KDPIPE, "run"], proj, env=env)  # dvc repro under one MLflow parent run
    assert "no real data" in r.stdout and ran_stages(r.stdout) == {"synthesize", "distill", "evaluate", "export"}
    assert (proj / "data/export/student.onnx").exists()
    e = json.loads((proj / "data/export/metrics.json").read_text())
    assert e["max_abs_diff"] < 1e-4
    # an owner folder of 3-channel images: the student is scored on its own (no ONNX teacher)
    from PIL import Image

    rng = np.random.default_rng(0)
    for c in range(10):
        (tmp_path / "owner" / str(c)).mkdir(parents=True)
        Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(tmp_path / "owner" / str(c) / "a.png")
    sc = run([KDPIPE, "score", "data/export/student.onnx", "--data", str(tmp_path / "owner")], proj, env=env)
    assert "student" in sc.stdout and "linked to kdpipe-student/1" in sc.stdout


def test_init_refuses_an_incomplete_card(tmp_path):
    env = project_env(tmp_path)
    r = run([KDPIPE, "init", str(tmp_path / "p"), "--teacher", str(KERAS), "--set", "teacher.range=[0, 255]"],
            tmp_path, env=env, check=False)
    assert r.returncode == 2 and "teacher.mean, teacher.std not set" in r.stderr
    assert not (tmp_path / "p" / "params.yaml").exists()
    r = run([KDPIPE, "init", str(tmp_path / "q"), "--teacher", str(KERAS)], tmp_path, env=env, check=False)
    assert r.returncode == 2 and "teacher.range" in r.stderr
    r = run([KDPIPE, "synthesize", "--set", "teacher.source=my_teacher.onnx"], tmp_path, env=env, check=False)
    assert r.returncode == 2 and "not a kdpipe project; make one with 'kdpipe init DIR --teacher FILE'" in r.stderr
    torch.save({"w": torch.zeros(1)}, tmp_path / "x.pt")
    r = run([KDPIPE, "init", str(tmp_path / "r"), "--teacher", str(tmp_path / "x.pt")], tmp_path, env=env, check=False)
    assert r.returncode == 2 and "teacher.source=torchvision:<name>" in r.stderr
    assert os.listdir(tmp_path / "p") == []  # nothing written by a refused init


def test_init_with_owner_statistics(tmp_path):
    """The owner's `kdpipe activation-stats` file travels with the teacher: copied into the project, a DVC dep of
    synthesize, and the BN prior runs on it (no no-BN recipe)."""
    env = project_env(tmp_path)
    card = ["--set", "teacher.range=[0, 255]", "--set", "teacher.mean=null", "--set", "teacher.std=null"]
    owner = owner_folder(tmp_path / "owner")
    r = run([KDPIPE, "activation-stats", "--data", str(owner), "--out", str(tmp_path / "stats.pt"),
             "--set", f"teacher.source={KERAS}", *card], tmp_path, env=env)
    assert "mean and variance of 3 convolutions over 360 images" in r.stdout
    r = run([KDPIPE, "init", str(tmp_path / "p"), "--teacher", str(KERAS), *card,
             "--set", f"synthesize.stats={tmp_path / 'stats.pt'}"], tmp_path, env=env)
    assert "synthesis uses the data owner's statistics (teacher/stats.pt)" in r.stdout
    params = yaml.safe_load((tmp_path / "p/params.yaml").read_text())
    assert params["synthesize"]["stats"] == "teacher/stats.pt" and params["synthesize"]["w_bn"] == 10.0
    assert "teacher/stats.pt" in yaml.safe_load((tmp_path / "p/dvc.yaml").read_text())["stages"]["synthesize"]["deps"]
    r = run([KDPIPE, "init", str(tmp_path / "q"), "--teacher", str(KERAS), *card, "--set", "synthesize.stats=nope.pt"],
            tmp_path, env=env, check=False)
    assert r.returncode == 2 and "synthesize.stats 'nope.pt' does not exist" in r.stderr
    r = run([KDPIPE, "init", str(tmp_path / "s"), "--teacher", str(KERAS), *card], tmp_path, env=env)
    assert "synthesize.stats: standard" in r.stdout  # no owner at all: the standard-normal prior, no file to carry
    params = yaml.safe_load((tmp_path / "s/params.yaml").read_text())["synthesize"]
    assert params["stats"] == "standard" and params["w_bn"] == 10.0 and params["w_act"] == 0.0
    assert yaml.safe_load((tmp_path / "s/dvc.yaml").read_text())["stages"]["synthesize"]["deps"] == \
        [f"teacher/{KERAS.name}"]
    r = run([KDPIPE, "init", str(tmp_path / "t"), "--teacher", str(KERAS), *card, "--set", "synthesize.stats=null"],
            tmp_path, env=env)  # no BN prior at all: the recipe of DAFL terms, image prior and jitter
    params = yaml.safe_load((tmp_path / "t/params.yaml").read_text())["synthesize"]
    assert params["stats"] is None and params["w_bn"] == 0.0 and params["w_act"] == 0.1 and params["jitter"] == 0.125
