"""``kdpipe init DIR --teacher FILE [--set teacher.<key>=<value> ...]``: a teacher-only project anywhere.

Writes DIR/params.yaml (the schema's defaults, data.name: none, the teacher card completed from the file),
DIR/dvc.yaml (synthesize -> distill -> evaluate -> export, the teacher file and the card as deps), .gitignore,
and initialises git and DVC there (with kdpipe's DVC plot template, .dvc/plots/bars.json); the teacher file is
copied to DIR/teacher/ and versioned with ``dvc add``.
The card is loaded once before anything is written: an incomplete card fails (exit 2) naming its keys.
A teacher without BatchNorm (folded by its exporter) gets the BN prior on standard targets
(``synthesize.stats: standard``: N(0, 1) per channel of every convolution) when it has convolutions, else the no-BN
recipe (NO_BN_RECIPE: no BN prior at all); --set synthesize.stats=null picks the recipe, and any other --set wins.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import yaml
from torch import nn

from kdpipe.config import STANDARD_STATS, Config, ConfigError, apply_override, validate

# without any BN prior: DAFL's activation and information-entropy terms, the image prior and jitter (chosen on MNIST
# val, docs/benchmarks.md: 0.9438 without jitter, 0.9546 with 0.125, 0.9330 with w_ie 5 too); the standard prior
# (stats: standard) beats it there, 0.9868, and is the default where the teacher has convolutions
NO_BN_RECIPE = {"w_bn": 0.0, "w_act": 0.1, "w_ie": 1.0, "w_tv": 1.0, "jitter": 0.125}
GITIGNORE = ("mlflow.db\nmlflow.db-journal\nmlartifacts/\nmlruns/\n/data/.resume/\n/data/.timings/\n.prefect/\n__pycache__/\n"
             "dvc_plots/\n")
HEADER = ("# kdpipe teacher-only project (kdpipe init): the one parameter file; `kdpipe params` lists the keys.\n"
          "# teacher: the card of the teacher file (what it takes as input); data.name none: no real data anywhere.\n")


@contextmanager
def _cwd(path: Path):
    old = Path.cwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(old)


def _run(cmd: list[str], cwd: Path) -> None:
    exe = shutil.which(cmd[0]) or str(Path(sys.executable).parent / cmd[0])
    r = subprocess.run([exe, *cmd[1:]], cwd=cwd, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"'{' '.join(cmd)}' failed in {cwd}: {r.stderr.strip() or r.stdout.strip()}")


def init(dest: str | Path, teacher: str | Path, overrides: list[str] = (), git: bool = True) -> Path:
    from kdpipe.teacher_card import CARD_KEYS, has_batchnorm, is_file_source, is_torchscript, load_card

    dest, src = Path(dest).resolve(), Path(teacher)
    if not src.is_file():
        raise ConfigError(f"--teacher '{src}' does not exist")
    if (dest / "params.yaml").exists() or (dest / "dvc.yaml").exists():
        raise ConfigError(f"'{dest}' already holds a kdpipe project (params.yaml / dvc.yaml)")
    tree = Config().model_dump(mode="json")
    tree["data"]["name"] = "none"
    tree["baseline"]["enabled"] = False
    for k in CARD_KEYS:
        tree["teacher"].pop(k)  # the card: only what the user says or the file tells (mean/std must be said)
    for item in overrides:
        apply_override(tree, item)
    t = tree["teacher"]
    rel = f"teacher/{src.name}"
    whole_file = src.suffix.lower() == ".onnx" or is_torchscript(src)
    if whole_file:
        t["source"] = rel
    else:  # a state_dict: its architecture comes from --set teacher.source=torchvision:<name> | timm:<name> | zoo name
        if not t.get("source") or is_file_source(str(t["source"])):
            raise ConfigError(f"--teacher '{src}' is a state_dict: name its architecture with --set teacher.source="
                              "torchvision:<name>, timm:<name> or a zoo name")
        t["checkpoint"] = rel
    extra = [t["classes"]] if isinstance(t.get("classes"), str) and Path(t["classes"]).is_file() else []
    validate(tree)
    stats = tree.get("synthesize", {}).get("stats")
    if stats and stats != STANDARD_STATS and not Path(stats).is_file():
        raise ConfigError(f"synthesize.stats '{stats}' does not exist")
    # load the card from a staging copy: every check before the project is written
    dest.mkdir(parents=True, exist_ok=True)
    (dest / "teacher").mkdir(exist_ok=True)
    shutil.copy2(src, dest / rel)
    for f in extra:
        shutil.copy2(f, dest / "teacher" / Path(f).name)
        t["classes"] = f"teacher/{Path(f).name}"
    if stats and stats != STANDARD_STATS:  # the data owner's activation statistics travel with the teacher
        shutil.copy2(stats, dest / "teacher" / Path(stats).name)
        tree["synthesize"]["stats"] = f"teacher/{Path(stats).name}"
    try:
        with _cwd(dest):
            cfg = validate(tree)
            model, card = load_card(cfg.teacher)
    except ConfigError:
        shutil.rmtree(dest / "teacher")
        raise
    t.update({"input_size": card.input_size, "channels": card.channels, "layout": card.layout})
    if not isinstance(t.get("classes"), str):
        t["classes"] = card.classes
    bn = has_batchnorm(model)
    said = {o.split("=", 1)[0].strip() for o in overrides}
    if bn and stats == STANDARD_STATS:
        shutil.rmtree(dest / "teacher")
        raise ConfigError("synthesize.stats: standard is for a teacher without BatchNorm; this teacher has BatchNorm "
                          "layers, whose own running statistics are the prior (leave synthesize.stats unset)")
    standard = not bn and "synthesize.stats" not in said and any(isinstance(m, nn.Conv2d) for m in model.modules())
    if standard:  # a folded BN: its outputs' statistics at BN's initial γ = 1, β = 0 (kdpipe/synth/bn_hooks.py)
        tree["synthesize"]["stats"] = STANDARD_STATS
    elif not bn and not stats:
        for k, v in NO_BN_RECIPE.items():
            if f"synthesize.{k}" not in said:
                tree["synthesize"][k] = v
    cfg = validate(tree)
    from kdpipe import dag

    (dest / "params.yaml").write_text(HEADER + yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
    with _cwd(dest):
        (dest / "dvc.yaml").write_text(dag.project_yaml(cfg))
    gi = dest / ".gitignore"
    gi.write_text((gi.read_text() if gi.exists() else "") + GITIGNORE)
    if git:
        if not (dest / ".git").exists():
            _run(["git", "init", "-q"], dest)
        if not (dest / ".dvc").exists():
            _run(["dvc", "init", "-q"], dest)
        dag.write_templates(dest)  # .dvc/plots/bars.json: dvc.yaml's bar plots (with --no-git: `kdpipe dag --write`)
        _run(["dvc", "add", "-q", rel], dest)
        _run(["git", "add", "-A"], dest)
        r = subprocess.run(["git", "commit", "-qm", f"kdpipe init: teacher {src.name}"], cwd=dest, capture_output=True, text=True)
        committed = r.returncode == 0
    print(f"[kdpipe] init {dest}: teacher {rel} ({card.loader}, sha256 {card.sha256[:12]}), "
          f"{card.channels}x{card.input_size}x{card.input_size} {card.layout}, range {list(card.range)}, "
          f"{len(card.classes)} classes; no real data", flush=True)
    if not bn:
        prior = ("the BN prior on N(0, 1) targets for its convolutions' outputs (synthesize.stats: standard; "
                 "synthesize.stats=null for the recipe without it)" if standard else
                 f"the data owner's statistics ({tree['synthesize']['stats']})" if stats else
                 f"no BN-statistics prior: {NO_BN_RECIPE}")
        print(f"[kdpipe] the teacher has no BatchNorm layers (its exporter folded them?): synthesis uses {prior} "
              "(params.yaml: synthesize)", flush=True)
    if git and not committed:
        print("[kdpipe] git and DVC are initialised; commit when ready (git identity not set)", flush=True)
    if not git:
        print("[kdpipe] after `git init && dvc init` there, run `kdpipe dag --write` (DVC's plot template)", flush=True)
    print(f"[kdpipe] next: cd {dest} && dvc repro   (or kdpipe run)", flush=True)
    return dest
