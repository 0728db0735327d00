"""Side by side with a peer: Fast-Datafree's own code (github zju-vipa/Fast-Datafree, --method fast_meta / fast)
and kdpipe, on the same teacher weights, the same student architecture (ResNet-8), the same normalisation
(Fast's CIFAR-10 mean/std), the same held-out CIFAR-10 split and the same wall-clock budget for the data-free
phase, one thread each. docs/peer.md says how to run it, the patches, the mapping check and the figures.

    python bench/peer.py setup [--teacher-epochs 1 --teacher-subset 5000]    # once: split, teacher, mapping check
    python bench/peer.py run --budget-min 15 --seed 0 [--tag b15-s0] [--method fast_meta]

``setup`` (idempotent; each step skipped when its output exists):
  1. unpacks /work/shared/datasets/cifar10-train.tar.gz under <work>/data/ and carves a seeded (seed 0),
     stratified split of the 50,000 training images into <work>/data/split/{train,val,test}/<class>/ (symlinks;
     45,000 / 2,500 / 2,500);
  2. trains the teacher with Fast's own train_scratch.py (resnet20, Fast's normalisation), once;
  3. maps its state_dict to kdpipe's zoo definition (teacher_kdpipe.pt) and checks the logits are equal on a
     batch (atol 1e-5) through kdpipe's own teacher-card loader; the same check for the student architecture
     (resnet8, random weights, both directions); exports the teacher to ONNX.
``run``: Fast's datafree_kd.py with scripts/fast_cifar.sh's settings (stopped by the wall clock, bench/peer_fast.py)
and then kdpipe (``kdpipe init`` from the teacher state_dict + ``kdpipe run --no-dvc``, rounds/epochs fitted to the
budget from a measured per-round cost), then both exported students scored by one onnxruntime function on the
val and test folders. Writes bench/results/peer-<tag>.json and prints a table row.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import random
import shutil
import subprocess
import sys
import tarfile
import time
from datetime import date
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _info import flat_sets  # noqa: E402

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT))

MEAN = [0.4914, 0.4822, 0.4465]  # Fast-Datafree registry.NORMALIZE_DICT['cifar10']: both teachers' and students' input
STD = [0.2023, 0.1994, 0.2010]
CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
TEACHER, STUDENT = "resnet20", "resnet8"
# scripts/fast_cifar.sh (first line: fast_meta, g_steps 2), --dataset cifar10 as its header says; teacher/student ours
FAST_ARGS = ("--batch_size 256 --lr 0.2 --kd_steps 400 --ep_steps 400 --adv 1.1 --bn 10.0 --oh 0.4 --act 0 --balance 0 "
             "--T 20 --bn_mmt 0.9 --warmup 20 --epochs 220 --dataset cifar10 --g_steps 2 --lr_z 0.015 "
             "--lr_g 5e-3 --is_maml 1 --reset_l0 1 --reset_bn 0").split()


def sh(cmd: list[str], cwd: Path, env: dict, log: Path | None = None) -> str:
    print("+", " ".join(map(str, cmd)), flush=True)
    r = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True)
    if log:
        log.write_text(r.stdout + "\n--- stderr ---\n" + r.stderr)
    if r.returncode != 0:
        raise SystemExit(f"{cmd} failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
    return r.stdout


def env_1t(threads: int) -> dict:
    e = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
         "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}", "PYTHONUNBUFFERED": "1"}
    return e


# ---------------------------------------------------------------- key mapping Fast <-> kdpipe (resnet_tiny / resnet_he)
def fast_to_kdpipe(state: dict, n: int) -> dict:
    """Fast's resnet_tiny.ResNet(6n+2) keys -> kdpipe.models.resnet_he(n) (an nn.Sequential): conv1 -> 0, bn1 -> 1,
    layer{L}.{i}.* -> {3 + (L-1)·n + i}.* (BasicBlock attribute names are the same), fc -> {3n + 5}."""
    out = {}
    for k, v in state.items():
        k = k.removeprefix("module.")
        head, _, rest = k.partition(".")
        if head == "conv1":
            nk = f"0.{rest}"
        elif head == "bn1":
            nk = f"1.{rest}"
        elif head.startswith("layer"):
            i, _, rest2 = rest.partition(".")
            nk = f"{3 + (int(head[5:]) - 1) * n + int(i)}.{rest2}"
        elif head == "fc":
            nk = f"{3 * n + 5}.{rest}"
        else:
            raise KeyError(k)
        out[nk] = v
    return out


def kdpipe_to_fast(state: dict, n: int) -> dict:
    inv = {}
    for k, v in state.items():
        head, _, rest = k.partition(".")
        j = int(head)
        if j == 0:
            nk = f"conv1.{rest}"
        elif j == 1:
            nk = f"bn1.{rest}"
        elif j == 3 * n + 5:
            nk = f"fc.{rest}"
        else:
            b = j - 3
            nk = f"layer{b // n + 1}.{b % n}.{rest}"
        inv[nk] = v
    return inv


def _fast_modules(fast_dir: Path):
    """Fast's datafree/models/classifiers/resnet_tiny.py, loaded by path (it imports torch only; the datafree
    package's __init__ would import kornia, which the kdpipe venv does not have)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "fast_resnet_tiny", Path(fast_dir) / "datafree" / "models" / "classifiers" / "resnet_tiny.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# ---------------------------------------------------------------- setup
def carve_split(src: Path, dst: Path, n_val: int, n_test: int, seed: int = 0) -> dict:
    """Per class, a seeded shuffle of the sorted file names: the first n_test/10 -> test, next n_val/10 -> val,
    the rest -> train (stratified: the 10 classes have 5,000 images each)."""
    rng = random.Random(seed)
    counts = {"train": 0, "val": 0, "test": 0}
    tmp = dst.with_name(dst.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    for c in CLASSES:
        files = sorted(p.name for p in (src / c).iterdir())
        rng.shuffle(files)
        kt, kv = n_test // len(CLASSES), n_val // len(CLASSES)
        for split, names in (("test", files[:kt]), ("val", files[kt:kt + kv]), ("train", files[kt + kv:])):
            d = tmp / split / c
            d.mkdir(parents=True, exist_ok=True)
            for f in names:
                (d / f).symlink_to(src / c / f)
            counts[split] += len(names)
    index = {s: sorted(str(p.relative_to(tmp / s)) for p in (tmp / s).glob("*/*")) for s in ("val", "test")}
    digest = hashlib.sha256(json.dumps(index).encode()).hexdigest()[:16]
    (tmp / "split.json").write_text(json.dumps({"seed": seed, "counts": counts, "val_test_sha256_16": digest,
                                                "source": str(src)}, indent=2))
    tmp.rename(dst)
    return counts


def mapping_check(fast_dir: Path, teacher_fast: Path, teacher_kd: Path) -> dict:
    import torch

    from kdpipe.config import TeacherCfg
    from kdpipe.models import ZOO
    from kdpipe.teacher_card import load_card

    rt = _fast_modules(fast_dir)
    torch.manual_seed(0)
    x01 = torch.rand(64, 3, 32, 32)
    xn = (x01 - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
    res = {}
    # teacher: Fast's checkpoint in Fast's definition vs kdpipe's card loader (zoo resnet20 + Fast's normalisation)
    tf = rt.resnet20(num_classes=10).eval()
    tf.load_state_dict(torch.load(teacher_fast, map_location="cpu", weights_only=True)["state_dict"])
    cfg = TeacherCfg(source=TEACHER, checkpoint=str(teacher_kd), input_size=32, channels=3, range=[0, 1], mean=MEAN, std=STD, classes=CLASSES)
    tk, _ = load_card(cfg)
    with torch.no_grad():
        d = (tf(xn) - tk(x01)).abs().max().item()
    res["teacher_resnet20_max_abs_diff"] = d
    # student architecture: random weights, Fast -> kdpipe and kdpipe -> Fast
    for direction in ("fast->kdpipe", "kdpipe->fast"):
        torch.manual_seed(1)
        sf, sk = rt.resnet8(num_classes=10), ZOO[STUDENT](3, 10)
        for m in list(sf.modules()) + list(sk.modules()):  # non-trivial BN statistics
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5), m.running_var.uniform_(0.5, 2.0)
        if direction == "fast->kdpipe":
            sk.load_state_dict(fast_to_kdpipe(sf.state_dict(), 1))
        else:
            sf.load_state_dict(kdpipe_to_fast(sk.state_dict(), 1))
        sf.eval(), sk.eval()
        with torch.no_grad():
            res[f"student_resnet8_{direction}_max_abs_diff"] = (sf(xn) - sk(xn)).abs().max().item()
    res["n_params"] = {"resnet20": sum(p.numel() for p in tf.parameters()),
                       "resnet8": sum(p.numel() for p in rt.resnet8(num_classes=10).parameters())}
    res["ok"] = all(v < 1e-5 for k, v in res.items() if k.endswith("diff"))
    return res


def export_onnx(model, path: Path) -> None:
    """A Fast-defined model taking the normalised input (as kdpipe's card export does) -> ONNX, dynamic batch."""
    import torch

    model = model.eval()
    torch.onnx.export(model, (torch.zeros(1, 3, 32, 32),), str(path), input_names=["input"], output_names=["logits"],
                      dynamo=True, external_data=False, dynamic_shapes={"x": {0: torch.export.Dim("batch")}})


def setup(a) -> None:
    import torch

    work = Path(a.work)
    data = work / "data"
    src = data / "cifar10" / "train"
    if not src.is_dir():
        data.mkdir(parents=True, exist_ok=True)
        print(f"unpacking {a.tarball} -> {data}", flush=True)
        with tarfile.open(a.tarball) as t:
            t.extractall(data, filter="data")
    split = data / "split"
    if not split.is_dir():
        print("split:", carve_split(src, split, a.n_val, a.n_test), flush=True)
    tdir = work / "teacher"
    tfast = tdir / f"cifar10_{TEACHER}.pth"
    if not tfast.exists():
        tdir.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        cmd = [a.peer_python, HERE / "peer_fast.py", "--fast", a.fast, "--split", split,
               *(["--subset", str(a.teacher_subset)] if a.teacher_subset else []), "train_scratch.py", "--",
               "--model", TEACHER, "--dataset", "cifar10", "--epochs", a.teacher_epochs, "--batch-size", 128,
               "--lr", 0.1, "--lr_decay_milestones", a.teacher_milestones, "--workers", 0, "--seed", 0]
        sh(cmd, tdir, env_1t(a.threads), tdir / "train_scratch.log")
        shutil.copy(tdir / "checkpoints" / "scratch" / f"cifar10_{TEACHER}.pth", tfast)
        info = {"epochs": a.teacher_epochs, "subset": a.teacher_subset, "milestones": a.teacher_milestones,
                "wall_s": round(time.perf_counter() - t0, 1), "script": "Fast-Datafree train_scratch.py"}
        (tdir / "teacher.json").write_text(json.dumps(info, indent=2))
    tkd = tdir / f"{TEACHER}_kdpipe.pt"
    if not tkd.exists():
        sd = torch.load(tfast, map_location="cpu", weights_only=True)["state_dict"]
        torch.save(fast_to_kdpipe(sd, 3), tkd)
    check = mapping_check(Path(a.fast), tfast, tkd)
    (tdir / "mapping_check.json").write_text(json.dumps(check, indent=2))
    print("mapping check:", json.dumps(check), flush=True)
    if not check["ok"]:
        raise SystemExit("mapping check failed")
    (tdir / "classes.txt").write_text("\n".join(CLASSES) + "\n")
    if not (tdir / "teacher.onnx").exists():
        rt = _fast_modules(Path(a.fast))
        tf = rt.resnet20(num_classes=10)
        tf.load_state_dict(torch.load(tfast, map_location="cpu", weights_only=True)["state_dict"])
        export_onnx(tf, tdir / "teacher.onnx")
    print("setup done:", tdir, flush=True)


# ---------------------------------------------------------------- scoring (one function for every model)
_CACHE: dict = {}


def load_folder(folder: Path):
    """The images of an ImageFolder split (kdpipe.score.read_folder: the reader `kdpipe score` uses) in Fast's
    normalisation, and their labels; read once per folder."""
    import numpy as np

    from kdpipe.score import read_folder

    if folder not in _CACHE:
        x, y, _ = read_folder(folder, CLASSES, 3, 32)
        x = (x.numpy() - np.array(MEAN, np.float32).reshape(1, 3, 1, 1)) / np.array(STD, np.float32).reshape(1, 3, 1, 1)
        _CACHE[folder] = (np.ascontiguousarray(x, dtype=np.float32), y.numpy())
    return _CACHE[folder]


def score(onnx_path: Path, folder: Path, threads: int) -> tuple[float, "object"]:
    """Top-1 accuracy of an ONNX classifier taking Fast's normalised N×3×32×32 input, with onnxruntime."""
    import numpy as np
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads, so.inter_op_num_threads = threads, 1
    sess = ort.InferenceSession(str(onnx_path), so, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    x, y = load_folder(folder)
    pred = np.concatenate([sess.run(None, {name: x[i:i + 500]})[0].argmax(1) for i in range(0, len(x), 500)])
    return float((pred == y).mean()), pred


# ---------------------------------------------------------------- kdpipe: fit rounds/epochs to the budget
def kdpipe_env(proj: Path, threads: int) -> dict:
    e = env_1t(threads)
    e.update({"MLFLOW_TRACKING_URI": f"sqlite:///{proj / 'mlflow.db'}", "PREFECT_SERVER_ANALYTICS_ENABLED": "false"})
    return e


def kdpipe_sets(a, tdir: Path, preset: dict, extra: dict) -> list[str]:
    card = {"teacher": {"source": TEACHER, "input_size": 32, "channels": 3, "range": [0, 1], "mean": MEAN, "std": STD,
                        "classes": str(tdir / "classes.txt")}, "student": {"arch": STUDENT}}
    sets = list(flat_sets(card)) + list(flat_sets(preset)) + list(flat_sets(extra))
    return [x for s in sets for x in ("--set", s)]


def kdpipe_project(a, tdir: Path, proj: Path, preset: dict, extra: dict) -> dict:
    """kdpipe init (teacher state_dict + card) and kdpipe run --no-dvc; the stage walls from its stage lines."""
    import re

    env = kdpipe_env(proj, a.threads)
    shutil.rmtree(proj, ignore_errors=True)
    kd = Path(sys.executable).parent / "kdpipe"
    sh([kd, "init", proj, "--teacher", tdir / f"{TEACHER}_kdpipe.pt", "--no-git",
        *kdpipe_sets(a, tdir, preset, extra)], proj.parent, env)
    t0 = time.perf_counter()
    log = sh([kd, "run", "--no-dvc"], proj, env, proj / "run.log")
    wall = time.perf_counter() - t0
    stage = {m[0]: float(m[1]) for m in re.findall(r"\[kdpipe\] (\S+)\s+([\d.]+)s", log)}
    return {"stage_s": stage, "run_wall_s": round(wall, 1), "log": log}


def _fit(points: list) -> tuple[float, float]:
    """seconds = a + b·x by least squares over the observed (x, seconds) points (a >= 0); one distinct x: a = 0."""
    xs = sorted({p[0] for p in points})
    if len(xs) < 2:
        x, y = points[-1]
        return 0.0, y / x
    n = len(points)
    mx, my = sum(p[0] for p in points) / n, sum(p[1] for p in points) / n
    b = sum((p[0] - mx) * (p[1] - my) for p in points) / sum((p[0] - mx) ** 2 for p in points)
    a = my - b * mx
    if a < 0 or b <= 0:  # noisy points: fall back to the proportional fit through the largest x
        x, y = max(points)
        return 0.0, y / x
    return a, b


def _fit_distill(points: list) -> tuple[float, float, float]:
    """distill_s = a + c·kept + b·kept·epochs over the observed (kept, epochs, seconds) points, a, b, c >= 0
    (scipy's non-negative least squares)."""
    import numpy as np
    from scipy.optimize import nnls

    m = np.array([[1.0, k, k * e] for k, e, _ in points])
    (a, c, b), _ = nnls(m, np.array([p[2] for p in points], dtype=float))
    return float(a), float(c), float(b)


def calib_key(preset: dict, threads: int) -> str:
    """The calibration cache's key: what sets the cost per round and per distilled image (the buffer's capacity and
    the flip leave it as it is), the host and the threads."""
    free = {("synthesize", "capacity"), ("distill", "flip")}
    cost = {s: {k: v for k, v in d.items() if (s, k) not in free} if isinstance(d, dict) else d for s, d in preset.items()}
    return hashlib.sha256(json.dumps(["v2", cost, platform.node(), threads], sort_keys=True).encode()).hexdigest()[:12]


def kdpipe_plan(a, tdir: Path, preset: dict, budget_s: float) -> tuple[dict, Path]:
    """rounds and epochs for a budget, from measured stage walls (cached per preset, machine and threads in
    <work>/calib-*.json; every run adds its own walls, so the fit sharpens):
        synthesize_s = a_s + b_s · rounds                    (points of the same capacity where there are some)
        distill_s    = a_d + c_d · kept + b_d · kept · epochs (c_d: the teacher's logits and the set's loading, once)
    fitted by (non-negative) least squares (first: two calibration projects, ``--calib-rounds`` R1,R2 with 1 and 2
    distill epochs), then
        rounds = floor((synth_share · B − a_s) / b_s);  kept = min(capacity, rounds · batch_size)
        epochs = max(1, floor(((1 − synth_share) · B − a_d − c_d · kept) / (b_d · kept)))"""
    key = calib_key(preset, a.threads)
    cache = Path(a.work) / f"calib-{key}.json"
    syn = preset.get("synthesize", {})
    bs, cap = int(syn.get("batch_size", 256)), int(syn.get("capacity", 4096))
    if cache.exists():
        cal = json.loads(cache.read_text())
    else:
        cal = {"synth": [], "distill": [], "source": []}
        for i, r_cal in enumerate(int(x) for x in a.calib_rounds.split(",")):
            proj = Path(a.work) / "runs" / f"calib-{key}-r{r_cal}"
            r = kdpipe_project(a, tdir, proj, preset, {"synthesize": {"rounds": r_cal}, "distill": {"epochs": i + 1},
                                                        "seed": 0})
            kept = min(cap, r_cal * bs)
            cal["synth"].append([r_cal, r["stage_s"]["synthesize"], cap])
            cal["distill"].append([kept, i + 1, r["stage_s"]["distill"]])
            cal["source"].append(f"calibration {proj.name} {date.today().isoformat()}")
        cache.write_text(json.dumps(cal, indent=2))
    same = [p[:2] for p in cal["synth"] if p[2] == cap]
    a_s, b_s = _fit(same or [p[:2] for p in cal["synth"]])
    a_d, c_d, b_d = _fit_distill(cal["distill"])
    rounds = max(1, math.floor((a.synth_share * budget_s - a_s) / b_s))
    kept = min(cap, rounds * bs)
    epochs = max(1, math.floor(((1 - a.synth_share) * budget_s - a_d - c_d * kept) / (b_d * kept)))
    fit = {"a_s": round(a_s, 2), "b_s": round(b_s, 3), "a_d": round(a_d, 2), "c_d": round(c_d, 6), "b_d": round(b_d, 6),
           "synth_points_same_capacity": len(same)}
    return {"rounds": rounds, "epochs": epochs, "kept_planned": kept, "fit": fit, "points": cal,
            "synth_share": a.synth_share, "cache": str(cache)}, cache


# ---------------------------------------------------------------- run
def commit_of(git_dir: Path | None, cwd: Path | None = None) -> str:
    args = ["git", f"--git-dir={git_dir}"] if git_dir else ["git"]
    r = subprocess.run([*args, "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True)
    return r.stdout.strip()


def run(a) -> None:
    import torch

    from _info import run_info, write_result

    work, tdir = Path(a.work), Path(a.work) / "teacher"
    split = work / "data" / "split"
    if not (tdir / "teacher.onnx").exists():
        raise SystemExit(f"no teacher in {tdir}: run `python bench/peer.py setup` first")
    budget_s = a.budget_min * 60.0
    tag = a.tag or f"b{a.budget_min:g}-s{a.seed}"
    rdir = work / "runs" / tag
    if rdir.exists() and not a.force:
        raise SystemExit(f"{rdir} exists: pick another --tag, or --force")
    shutil.rmtree(rdir, ignore_errors=True)
    rdir.mkdir(parents=True)
    preset = yaml.safe_load(Path(a.preset).read_text()) or {}
    for item in a.set:  # --set section.key=value on top of the preset (a lever row)
        keys, _, value = item.partition("=")
        *parents, last = keys.split(".")
        node = preset
        for k in parents:
            node = node.setdefault(k, {})
        node[last] = yaml.safe_load(value)
    info = run_info(a.threads)
    out = {"tag": tag, **info, "kdpipe_commit": info["commit"],
           "fast_datafree_commit": commit_of(Path(a.fast_git)) if Path(a.fast_git).exists() else None,
           "budget_s": budget_s, "seed": a.seed, "threads": a.threads, "teacher": TEACHER, "student": STUDENT,
           "normalisation": {"mean": MEAN, "std": STD},
           "split": json.loads((split / "split.json").read_text()),
           "teacher_info": json.loads((tdir / "teacher.json").read_text()),
           "mapping_check": json.loads((tdir / "mapping_check.json").read_text()),
           "load_1min_start": os.getloadavg()[0], "kdpipe_set": a.set, "only": a.only}
    onnx_dir = rdir / "onnx"
    onnx_dir.mkdir()

    # ---- Fast-Datafree, its own code
    if "fast" in a.only:
        fdir = rdir / "fast"
        (fdir / "checkpoints" / "pretrained").mkdir(parents=True)
        shutil.copy(tdir / f"cifar10_{TEACHER}.pth", fdir / "checkpoints" / "pretrained" / f"cifar10_{TEACHER}.pth")
        fargs = FAST_ARGS + ["--method", a.method, "--teacher", TEACHER, "--student", STUDENT, "--seed", str(a.seed),
                             "--workers", "0", "--save_dir", str(fdir / "run" / "synthesis"), "--log_tag", tag]
        fargs += a.fast_extra.split() if a.fast_extra else []
        t0 = time.perf_counter()
        sh([a.peer_python, HERE / "peer_fast.py", "--fast", Path(a.fast).resolve(), "--split", split,
            "--budget-s", budget_s, "--out", fdir / "fast.json", "datafree_kd.py", "--", *fargs],
           fdir, env_1t(a.threads), fdir / "datafree_kd.log")
        fres = json.loads((fdir / "fast.json").read_text())
        fres["wall_s"] = round(time.perf_counter() - t0, 1)
        fres["args"] = " ".join(fargs)
        rt = _fast_modules(Path(a.fast))
        sf = rt.resnet8(num_classes=10)
        sf.load_state_dict(torch.load(fdir / "student_last.pt", map_location="cpu", weights_only=True))
        export_onnx(sf, onnx_dir / "fast_student.onnx")
        out["fast"] = fres

    # ---- kdpipe
    if "kdpipe" in a.only:
        plan, cache = kdpipe_plan(a, tdir, preset, budget_s)
        proj = rdir / "kdpipe"
        extra = {"seed": a.seed, "synthesize": {"rounds": plan["rounds"]}, "distill": {"epochs": plan["epochs"]}}
        r = kdpipe_project(a, tdir, proj, preset, extra)
        shutil.copy(proj / "data" / "export" / "student.onnx", onnx_dir / "kdpipe_student.onnx")
        s = r["stage_s"]
        cal = json.loads(cache.read_text())  # this run's walls sharpen the next plan
        cal["synth"].append([plan["rounds"], s["synthesize"], int(preset.get("synthesize", {}).get("capacity", 4096))])
        cal["distill"].append([plan["kept_planned"], plan["epochs"], s["distill"]])
        cal["source"].append(f"run {tag}")
        cache.write_text(json.dumps(cal, indent=2))
        meta = json.loads((proj / "data" / "synthetic" / "meta.json").read_text())
        bs = int(preset.get("synthesize", {}).get("batch_size", 256))
        out["kdpipe"] = {"plan": plan, "stage_s": s, "datafree_s": round(s.get("synthesize", 0) + s.get("distill", 0), 1),
                         "run_wall_s": r["run_wall_s"], "rounds": plan["rounds"], "distill_epochs": plan["epochs"],
                         "synthetic_images": meta.get("generated", plan["rounds"] * bs), "kept_images": meta.get("n"),
                         "preset": preset}

    # ---- one evaluation for every model
    out["scores"] = {}
    models = {"teacher": tdir / "teacher.onnx", **{k: onnx_dir / f"{k}_student.onnx" for k in ("fast", "kdpipe")}}
    for name, path in models.items():
        if not path.exists():
            continue
        sc = {}
        for split_name in ("val", "test"):
            acc, _ = score(path, split / split_name, a.threads)
            sc[split_name] = round(acc, 4)
        out["scores"][name] = sc
    for name in ("fast", "kdpipe"):
        if name in out["scores"]:
            out["scores"][name]["test_over_teacher"] = round(out["scores"][name]["test"] / out["scores"]["teacher"]["test"], 4)
    out["load_1min_end"] = os.getloadavg()[0]
    path = write_result(out, f"peer-{tag}.json")
    t = out["scores"]
    row = (f"| {tag} | {budget_s / 60:g} min | {a.seed} | {t['teacher']['test']:.4f} | "
           + " | ".join(f"{t[k]['val']:.4f} / {t[k]['test']:.4f} ({t[k]['test_over_teacher']:.3f})" if k in t else "-"
                        for k in ("fast", "kdpipe"))
           + f" | {out.get('fast', {}).get('synthetic_images', '-')} / {out.get('kdpipe', {}).get('synthetic_images', '-')}"
           + f" | {out.get('fast', {}).get('datafree_s', '-')} / {out.get('kdpipe', {}).get('datafree_s', '-')} s |")
    print("| tag | budget | seed | teacher test | Fast val / test (ratio) | kdpipe val / test (ratio) | synthetic Fast / kdpipe "
          "| data-free s Fast / kdpipe |")
    print("|---|---|---|---|---|---|---|---|")
    print(row)
    print(path)


def config_of(tag: str) -> str:
    """A row's configuration: its tag without the seed (b15-s0-cap20k -> b15-cap20k)."""
    import re

    return re.sub(r"-s\d+(?=-|$)", "", tag)


def table(a) -> None:
    """One markdown table per budget from bench/results/peer-*.json: each implementation and configuration (the
    tag without its seed), per seed val / test / test÷teacher, images made, data-free wall; then the mean and the
    spread (max − min) over the seeds. Test is shown only for the configurations named in ``--test`` (the choices
    made on val, and Fast's rows): a lever row is read on val only."""
    from statistics import mean

    rows: dict = {}
    for f in sorted((HERE / "results").glob("peer-*.json")):
        d = json.loads(f.read_text())
        if "smoke" in d["tag"] or "scores" not in d:
            continue
        config = config_of(d["tag"])
        for impl in ("fast", "kdpipe"):
            if impl in d["scores"]:
                sc, run_ = d["scores"][impl], d.get(impl, {})
                rows.setdefault((d["budget_s"], impl, config), []).append(
                    (d["seed"], sc["val"], sc["test"], sc["test_over_teacher"], run_.get("synthetic_images", "-"),
                     run_.get("datafree_s", "-")))
    for budget in sorted({k[0] for k in rows}):
        print(f"\n{budget / 60:g} minutes\n")
        print("| implementation | configuration | seed | val | test (of teacher) | images made | data-free s |")
        print("|---|---|---|---|---|---|---|")
        for (b, impl, config), rs in sorted(rows.items()):
            if b != budget:
                continue
            shown = impl == "fast" or config in a.test.split(",")
            for seed, val, test, ratio, n, wall in sorted(rs):
                t = f"{test:.4f} ({ratio:.3f})" if shown else "not read"
                print(f"| {impl} | {config} | {seed} | {val:.4f} | {t} | {n} | {wall} |")
            tests, vals = [r[2] for r in rs], [r[1] for r in rs]
            t = (f"**{mean(tests):.4f}** ({mean(r[3] for r in rs):.3f}), spread {max(tests) - min(tests):.4f}" if shown
                 else "not read")
            print(f"| {impl} | {config} | mean of {len(rs)} | {mean(vals):.4f}, spread {max(vals) - min(vals):.4f} "
                  f"| {t} | | |")


def guard(a) -> None:
    """Re-run kdpipe's side of a recorded configuration (``--config``: a tag without its ``-sN``; its recorded
    preset, ``--set`` items and synthesize share, every recorded seed at once, one thread each) and exit 1 when the
    new mean val accuracy is under the recorded mean by more than max(2 × the recorded spread over seeds, --tol):
    the benchmark that catches a silent drop of the data-free recipe (new rows: peer-<config>-guard-sN.json)."""
    from statistics import mean

    def of(config):
        return [d for d in (json.loads(f.read_text()) for f in sorted((HERE / "results").glob("peer-*.json")))
                if config_of(d["tag"]) == config and "kdpipe" in d.get("scores", {})]

    ref = of(a.config)
    if not ref or any("plan" not in d["kdpipe"] for d in ref):
        raise SystemExit(f"no recorded kdpipe rows for configuration {a.config!r} in bench/results/peer-*.json made "
                         "by `run` (with their plan): nothing to guard")
    procs = []
    for d in ref:
        preset = Path(a.work) / "runs" / f"guard-{a.config}-s{d['seed']}.yaml"
        preset.parent.mkdir(parents=True, exist_ok=True)
        preset.write_text(yaml.safe_dump(d["kdpipe"]["preset"]))
        cmd = [sys.executable, __file__, "--work", a.work, "--threads", str(a.threads), "run",
               "--budget-min", f"{d['budget_s'] / 60:g}", "--seed", str(d["seed"]), "--tag",
               f"{a.config}-guard-s{d['seed']}", "--only", "kdpipe", "--preset", str(preset),
               "--synth-share", str(d["kdpipe"]["plan"]["synth_share"]), "--force"]
        procs.append(subprocess.Popen(cmd, env=env_1t(a.threads)))
    if any(p.wait() for p in procs):
        raise SystemExit("a guard run failed (its output is above)")
    new = of(f"{a.config}-guard")
    old_v, new_v = [d["scores"]["kdpipe"]["val"] for d in ref], [d["scores"]["kdpipe"]["val"] for d in new]
    floor = mean(old_v) - max(2 * (max(old_v) - min(old_v)), a.tol)
    print(f"| {a.config} | recorded val {mean(old_v):.4f} (seeds {len(old_v)}, spread {max(old_v) - min(old_v):.4f}) "
          f"| now {mean(new_v):.4f} | floor {floor:.4f} | {'ok' if mean(new_v) >= floor else 'DROP'} |")
    if mean(new_v) < floor:
        raise SystemExit(1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", default="/work/peer", help="scratch folder outside the repository")
    ap.add_argument("--fast", default="/work/peer/Fast-Datafree", help="Fast-Datafree's exported tree")
    ap.add_argument("--fast-git", default="/work/.mirror/zju-vipa+Fast-Datafree/repo", help="its git dir (for the commit)")
    ap.add_argument("--peer-python", default="/work/peer/venv/bin/python", help="interpreter with Fast's extra deps")
    ap.add_argument("--threads", type=int, default=1)
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("setup")
    s.add_argument("--tarball", default="/work/shared/datasets/cifar10-train.tar.gz")
    s.add_argument("--n-val", type=int, default=2500)
    s.add_argument("--n-test", type=int, default=2500)
    s.add_argument("--teacher-epochs", type=int, default=1)
    s.add_argument("--teacher-subset", type=int, default=None, help="train the teacher on N seeded images (smoke)")
    s.add_argument("--teacher-milestones", default="120,150,180", help="train_scratch.py's lr decay epochs")
    r = sub.add_parser("run")
    r.add_argument("--budget-min", type=float, required=True, help="wall-clock budget of each data-free phase")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--tag", default=None)
    r.add_argument("--method", default="fast_meta", choices=["fast_meta", "fast"])
    r.add_argument("--fast-extra", default="", help="extra datafree_kd.py arguments (override FAST_ARGS)")
    r.add_argument("--preset", default=str(HERE / "presets" / "peer-cifar10.yaml"), help="kdpipe parameters")
    r.add_argument("--synth-share", type=float, default=0.8, help="kdpipe: share of the budget for synthesize")
    r.add_argument("--calib-rounds", default="2,6", help="rounds of the two calibration projects (first use only)")
    r.add_argument("--set", action="append", default=[], help="kdpipe parameter over the preset, key=value (repeatable)")
    r.add_argument("--only", default="fast,kdpipe")
    r.add_argument("--force", action="store_true")
    t = sub.add_parser("table", help="the markdown tables of bench/results/peer-*.json")
    t.add_argument("--test", default="", help="configurations (tags without the seed) whose test split is shown")
    g = sub.add_parser("guard", help="re-run a recorded kdpipe configuration; exit 1 on a drop beyond its spread")
    g.add_argument("--config", required=True, help="a configuration: the tag of its rows without -sN, e.g. b15-tuned")
    g.add_argument("--tol", type=float, default=0.01, help="the smallest drop that fails (val accuracy)")
    a = ap.parse_args()
    {"setup": setup, "run": run, "table": table, "guard": guard}[a.cmd](a)


if __name__ == "__main__":
    main()
