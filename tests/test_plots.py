"""DVC plots that read right (issue 25), checked with the real `dvc plots show --json` / `dvc metrics show` on
a tiny real run: per-class accuracy as grouped bars (teacher/student/baseline) from zero, titled confusion
charts that say whose predictions against what, distill's loss and agreement on their own axes, the synthetic
class histogram from zero, kdpipe's plot template (.dvc/plots/bars.json) written by `kdpipe dag --write`,
dvc_plots/ git-ignored, and an ONNX-vs-PyTorch difference that `dvc metrics show` does not round to 0."""
from __future__ import annotations

import contextlib
import json
import shutil
import subprocess

import pytest
import yaml

from conftest import BIN, ROOT, project_env, tiny_params
from kdpipe import dag
from kdpipe.cli import main
from kdpipe.config import Config, ConfigError, load_config

KERAS = ROOT / "tests" / "fixtures" / "keras_digits.onnx"  # a digits teacher from its card (no real data route)
NO_DATA = ["data.name=none", f"teacher.source={KERAS}", "teacher.range=[0, 255]", "teacher.mean=null",
           "teacher.std=null", "evaluate.fidelity_samples=64"]


def dvc(proj, *args) -> str:
    r = subprocess.run([f"{BIN}/dvc", *args], cwd=proj, env=project_env(proj), capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, f"dvc {' '.join(args)}: {r.stdout[-2000:]}\n{r.stderr[-2000:]}"
    return r.stdout


def shown(proj, *targets) -> dict:
    """`dvc plots show --json`: plot id -> the filled Vega-Lite spec (data-series plots only)."""
    out = json.loads(dvc(proj, "plots", "show", "--json", *targets))
    assert not out.get("errors"), out["errors"]
    return {pid: r[0]["content"] for pid, r in out["data"].items() if r[0]["type"] == "vega"}


def rows(spec: dict) -> list[dict]:
    return spec["data"]["values"]


def title(spec: dict) -> str:
    return spec["title"]["text"]


def y_encodings(spec) -> list[dict]:
    """Every encoding.y in a (layered) spec."""
    found = []
    if isinstance(spec, dict):
        if isinstance(spec.get("encoding"), dict) and "y" in spec["encoding"]:
            found.append(spec["encoding"]["y"])
        for v in spec.values():
            found += y_encodings(v)
    elif isinstance(spec, list):
        for v in spec:
            found += y_encodings(v)
    return found


@pytest.fixture(scope="module")
def proj(tmp_path_factory):
    """A tiny real run (every stage, in process), then a git + DVC repo holding the committed dvc.yaml,
    .gitignore, and `kdpipe dag --write` (which writes .dvc/plots/bars.json)."""
    proj = tmp_path_factory.mktemp("plots")
    p = tiny_params()
    p["tracking"]["enabled"] = False
    p["teacher"]["epochs"] = p["baseline"]["epochs"] = 1
    p["synthesize"].update(rounds=1, batch_size=32, capacity=64, g_steps=1, kd_steps=1, warmup_rounds=0)
    p["distill"].update(epochs=2, batch_size=32)
    p["export"]["int8"] = False
    (proj / "params.yaml").write_text(yaml.safe_dump(p, sort_keys=False))
    with contextlib.chdir(proj):
        for stage in ("prepare", "train-teacher", "baseline", "synthesize", "distill", "evaluate", "export"):
            assert main([stage]) == 0, stage
        shutil.copy(ROOT / "dvc.yaml", "dvc.yaml")
        shutil.copy(ROOT / ".gitignore", ".gitignore")
        env = project_env(proj)
        for cmd in (["git", "init", "-q"], [f"{BIN}/dvc", "init", "-q"], [f"{BIN}/dvc", "config", "core.analytics", "false"]):
            subprocess.run(cmd, cwd=proj, env=env, check=True, capture_output=True)
        assert not (proj / ".dvc/plots/bars.json").exists()
        assert main(["dag", "--write"]) == 0
    return proj


def test_the_committed_template_and_dvc_yaml_are_kdpipe_s():
    """.dvc/plots/bars.json is dag.TEMPLATES' rendering; dvc.yaml uses it for the bar plots."""
    assert (ROOT / ".dvc/plots/bars.json").read_text() == dag.template_text("bars"), "run 'kdpipe dag --write'"
    doc = yaml.safe_load((ROOT / "dvc.yaml").read_text())
    ev = {next(iter(p)): p[next(iter(p))] for p in doc["stages"]["evaluate"]["plots"] if isinstance(p, dict)}
    top = {next(iter(p)): p[next(iter(p))] for p in doc["plots"] if isinstance(p, dict)}
    assert ev["data/reports/per_class.csv"]["template"] == top["data/synthetic/histogram.csv"]["template"] == "bars"
    assert ev["data/reports/predictions.csv"]["template"] == "confusion"
    assert list(top) == ["distill_loss", "distill_agreement", "data/synthetic/histogram.csv"]
    assert "dvc_plots/" in (ROOT / ".gitignore").read_text().split()


def test_plots_of_a_real_run(proj):
    assert (proj / ".dvc/plots/bars.json").read_text() == dag.template_text("bars")  # written by `kdpipe dag --write`
    plots = shown(proj)
    assert {"distill_loss", "distill_agreement", "data/synthetic/histogram.csv", "data/reports/per_class.csv",
            "data/reports/predictions.csv"} <= set(plots)

    # per-class accuracy: horizontal bars from zero, one bar per model in each class (yOffset/colour: the model)
    pc = plots["data/reports/per_class.csv"]
    enc = pc["encoding"]
    assert title(pc) == "per-class accuracy (real test split)"
    assert enc["x"] == {"field": "accuracy", "type": "quantitative", "title": "accuracy", "scale": {"zero": True}}
    assert enc["y"]["field"] == "class" and enc["y"]["type"] == "nominal" and enc["y"]["title"] == "class"
    assert enc["yOffset"]["field"] == enc["color"]["field"] == "series" and pc["mark"]["type"] == "bar"
    assert any(t.get("as") == "series" and "datum.model" in t["calculate"] for t in pc["transform"])
    metrics = json.loads((proj / "data/reports/metrics.json").read_text())
    got = {(r["class"], r["model"]): float(r["accuracy"]) for r in rows(pc)}
    classes = list(metrics["teacher"]["per_class"])
    assert len(classes) == 10 and {m for _, m in got} == {"teacher", "student", "baseline"}
    assert got == {(c, m): metrics[m]["per_class"][c] for c in classes for m in ("teacher", "student", "baseline")}

    # the student's confusion chart: whose predictions against what
    cm = plots["data/reports/predictions.csv"]
    assert title(cm) == "student predictions vs true class (real test split)"
    assert cm["spec"]["encoding"]["x"]["field"] == "predicted" and cm["spec"]["encoding"]["x"]["title"] == "student prediction"
    assert cm["spec"]["encoding"]["y"]["field"] == "actual" and cm["spec"]["encoding"]["y"]["title"] == "true class"
    assert len(rows(cm)) == metrics["n_test"]

    # distill: loss and agreement each on its own plot and axis, the axis titled with the quantity
    loss, agree = plots["distill_loss"], plots["distill_agreement"]
    assert {y["field"] for y in y_encodings(loss)} == {"loss"}
    assert {y["title"] for y in y_encodings(loss)} == {"training loss (KD; CE if fine-tuning)"}
    assert {y["field"] for y in y_encodings(agree)} == {"synthetic_agreement"}
    assert {y["title"] for y in y_encodings(agree)} == {"top-1 agreement with the teacher"}
    assert title(loss) == "distill: training loss per epoch"
    assert title(agree) == "distill: agreement with the teacher (synthetic set)"
    assert loss["encoding"]["x"]["title"] == agree["encoding"]["x"]["title"] == "epoch"
    assert len(rows(loss)) == 2  # distill.epochs

    # the synthetic set's class histogram: bars from zero
    h = plots["data/synthetic/histogram.csv"]
    assert title(h) == "synthetic set: samples per teacher-predicted class"
    assert h["encoding"]["x"]["field"] == "count" and h["encoding"]["x"]["scale"]["zero"] is True
    assert h["encoding"]["y"]["field"] == "class" and h["encoding"]["x"]["title"] == "samples"
    meta = json.loads((proj / "data/synthetic/meta.json").read_text())
    assert [int(r["count"]) for r in rows(h)] == meta["histogram"]

    # `dvc plots show` writes dvc_plots/: git-ignored
    dvc(proj, "plots", "show")
    assert (proj / "dvc_plots/index.html").exists()
    assert subprocess.run(["git", "check-ignore", "-q", "dvc_plots/index.html"], cwd=proj).returncode == 0


def test_metrics_show_keeps_the_onnx_difference_readable(proj):
    e = json.loads((proj / "data/export/metrics.json").read_text())
    assert e["max_abs_diff_1e-6"] == round(e["max_abs_diff"] * 1e6, 4)
    shown_metrics = json.loads(dvc(proj, "metrics", "show", "--json"))
    assert shown_metrics[""]["data"]["data/export/metrics.json"]["data"]["max_abs_diff_1e-6"] == e["max_abs_diff_1e-6"]
    table = dvc(proj, "metrics", "show", "--md", "data/export/metrics.json").splitlines()  # as a user reads it
    head, row = ([c.strip() for c in line.strip("|").split("|")] for line in (table[0], table[2]))
    cell = dict(zip(head, row))
    if 1e-9 <= e["max_abs_diff"] < 5e-6:  # what dvc's default rounding (5 decimals) shows as 0.0
        assert float(cell["max_abs_diff"]) == 0.0 and float(cell["max_abs_diff_1e-6"]) > 0
    assert float(cell["max_abs_diff_1e-6"]) == pytest.approx(e["max_abs_diff_1e-6"], abs=1e-4)


def test_plots_without_real_data(proj, tmp_path, monkeypatch):
    """data.name none: per_class.csv is class,agreement,teacher_count (the real evaluate writes it); its
    plot draws the agreement per teacher class from zero; the confusion chart is the student vs the teacher."""
    work = tmp_path / "none"
    shutil.copytree(proj, work, symlinks=True)
    monkeypatch.chdir(work)
    assert main(["evaluate", *[a for s in NO_DATA for a in ("--set", s)]]) == 0
    assert (work / "data/reports/per_class.csv").read_text().splitlines()[0] == "class,agreement,teacher_count"
    assert main(["dag", "--write", *[a for s in NO_DATA for a in ("--set", s)]]) == 0
    cfg = load_config("params.yaml", NO_DATA)
    doc = yaml.safe_load((work / "dvc.yaml").read_text())
    assert doc["stages"]["evaluate"]["plots"] == yaml.safe_load(dag.project_yaml(cfg))["stages"]["evaluate"]["plots"]
    plots = shown(work, "data/reports/per_class.csv", "data/reports/predictions.csv")
    pc, cm = plots["data/reports/per_class.csv"], plots["data/reports/predictions.csv"]
    assert title(pc) == "student-teacher agreement per teacher class (held-out synthetic)"
    assert pc["encoding"]["x"]["field"] == "agreement" and pc["encoding"]["x"]["scale"]["zero"] is True
    assert pc["encoding"]["x"]["title"] == "agreement with the teacher" and pc["encoding"]["y"]["title"] == "teacher class"
    m = json.loads((work / "data/reports/metrics.json").read_text())
    assert sum(int(r["teacher_count"]) for r in rows(pc)) == m["n_heldout"] == 64
    assert title(cm) == "student vs teacher class (held-out synthetic)"
    assert cm["spec"]["encoding"]["y"]["title"] == "teacher class" and len(rows(cm)) == 64


def test_render_follows_the_route_and_replaces_the_old_history_plot(tmp_path):
    text = (ROOT / "dvc.yaml").read_text()
    real = yaml.safe_load(dag.render(load_config(None, ["distill.data=real"]), text))
    agree = next(p["distill_agreement"] for p in real["plots"] if "distill_agreement" in p)
    assert agree["y"] == {dag.HISTORY: "real_agreement"} and agree["title"].endswith("(real train split)")
    # a dvc.yaml of before (kdpipe init projects too): loss and agreement on one axis, a histogram not from zero
    before = ("plots:\n  - data/student/history.csv:\n      x: epoch\n      y: [loss, synthetic_agreement]\n"
              "  - data/synthetic/histogram.csv:\n      x: count\n      y: class\n      template: bar_horizontal\n"
              "  - data/synthetic/grid.png\n")
    old = text[:text.index("\nplots:\n") + 1] + before
    with pytest.raises(ConfigError, match="kdpipe dag --write"):
        dag.check(Config(), _write(tmp_path / "dvc.yaml", old))
    by_id = lambda doc: {(p if isinstance(p, str) else next(iter(p))): p for p in doc["plots"]}
    new = yaml.safe_load(dag.render(Config(), old))
    assert dag.HISTORY not in by_id(new) and by_id(new) == by_id(yaml.safe_load(text))
    dag.check(Config(), _write(tmp_path / "dvc.yaml", dag.render(Config(), old)))


def _write(path, text):
    path.write_text(text)
    return path


def test_templates_go_only_into_a_dvc_repo(tmp_path):
    assert dag.write_templates(tmp_path) == []  # a .dvc folder before `dvc init` would make dvc init fail
    assert not (tmp_path / ".dvc").exists()
    (tmp_path / ".dvc").mkdir()
    assert dag.write_templates(tmp_path) == [tmp_path / ".dvc/plots/bars.json"]
    assert dag.write_templates(tmp_path) == []  # up to date: left alone
    from kdpipe.project import GITIGNORE

    assert "dvc_plots/" in GITIGNORE.split()
