"""dvc.yaml's config-dependent part. A DVC dependency cannot be conditional, so kdpipe writes the
data dependencies of the stages that follow the config into dvc.yaml:

    kdpipe dag [--config my.yaml] [--set distill.data=real]           # print dvc.yaml as the config needs it
    kdpipe dag --write [--set ...]                                    # write it (commit it with params.yaml)

  synthesize: data/teacher, every ``teachers`` checkpoint;
  distill:    data/synthetic (unless distill.data is real), data/teacher, the ``teachers`` checkpoints,
              data/prepared (only when distill.data is real or mixed);
  the plots (``evaluate_plots``, ``pipeline_plots``): titles and axes that say what is drawn; evaluate's
  per-class and confusion plots follow data.name (real test split, or held-out synthetic without real
  data), the distill agreement plot follows distill.data (synthetic_agreement, or real_agreement).
Only the data deps (every dep not under kdpipe/) of these stages and kdpipe's own plot entries are
rewritten, and the sections synthesize and distill share (SHARED: replay, phi) are added to their params
(a moved key, config.MOVED such as synthesize.alpha, is dropped); code deps, other params, outs, other
plots, the other stages and the comments stay as written
(ruamel.yaml round trip). ``--write`` also writes kdpipe's custom DVC plot templates (TEMPLATES) into
.dvc/plots/ when they are missing or differ (DVC reads custom templates from there).
tests/test_plots.py renders the plots with the real `dvc plots show --json`. ``kdpipe run``
refuses to start ``dvc repro`` when dvc.yaml is out of date for params.yaml, and so does a stage run
under dvc (e.g. ``dvc exp run -S distill.data=real``): the message says to run ``kdpipe dag --write``.
tests/test_routes.py checks that the committed dvc.yaml is the rendering of the default config.
"""
from __future__ import annotations

import io
from pathlib import Path

from kdpipe import paths
from kdpipe.config import MOVED, Config, ConfigError

RENDERED = ("synthesize", "distill")  # the stages whose data deps follow distill.data and teachers
HISTORY = str(paths.STUDENT / "history.csv")
# the sections a stage reads beyond its own, whatever the config: whole sections, so that any key of them re-runs it
SHARED = {"synthesize": ["replay", "phi"], "distill": ["replay", "phi"]}
# params a stage reads beyond its own section when the teacher is a card (teacher.source) / there is no real data
CARD_PARAMS = {"synthesize": ["teacher"], "distill": ["teacher", "synthesize"],
               "evaluate": ["seed", "teacher", "synthesize", "evaluate"], "export": ["teacher", "synthesize", "evaluate"]}


# kdpipe's custom DVC plot template (.dvc/plots/bars.json; `kdpipe dag --write` and `kdpipe init` write it).
# Horizontal bars from zero: x quantitative (<DVC_METRIC_X>), y nominal in file order (<DVC_METRIC_Y>); bars are
# grouped and coloured by the data's `model` column when it has one (per_class.csv: teacher/student/baseline;
# "model @ rev" under `dvc plots diff`), else by revision. DVC's bar_horizontal has scale.zero false.
BARS = {
    "$schema": "https://vega.github.io/schema/vega-lite/v5.json",
    "description": "kdpipe bars: horizontal bars from zero, grouped by the 'model' column when there is one, "
                   "else by revision (kdpipe/dag.py writes this file)",
    "data": {"values": "<DVC_METRIC_DATA>"},
    "title": {"text": "<DVC_METRIC_TITLE>", "anchor": "middle"},
    "width": "<DVC_METRIC_PLOT_WIDTH>",
    "height": {"step": 30, "for": "position"},  # per class, whatever the number of bars in it
    "transform": [
        {"joinaggregate": [{"op": "distinct", "field": "rev", "as": "n_revs"}]},
        {"calculate": "isValid(datum.model) ? (datum.n_revs > 1 ? datum.model + ' @ ' + datum.rev : datum.model)"
                      " : datum.rev", "as": "series"},
    ],
    "mark": {"type": "bar", "tooltip": {"content": "data"}},
    "encoding": {
        "x": {"field": "<DVC_METRIC_X>", "type": "quantitative", "title": "<DVC_METRIC_X_LABEL>",
              "scale": {"zero": True}},
        "y": {"field": "<DVC_METRIC_Y>", "type": "nominal", "title": "<DVC_METRIC_Y_LABEL>", "sort": None},
        "yOffset": {"field": "series", "sort": None},
        "color": {"field": "series", "type": "nominal", "sort": None, "title": None},
    },
}
TEMPLATES = {"bars": BARS}


def template_text(name: str) -> str:
    import json

    return json.dumps(TEMPLATES[name], indent=2) + "\n"


def write_templates(root: str | Path = ".") -> list[Path]:
    """kdpipe's DVC plot templates into ROOT/.dvc/plots/ (only in a DVC repo: a .dvc folder before `dvc init`
    would make it fail); returns the files written (missing or different)."""
    if not (Path(root) / ".dvc").is_dir():
        return []
    written = []
    for name in TEMPLATES:
        path, text = Path(root) / ".dvc" / "plots" / f"{name}.json", template_text(name)
        if not path.is_file() or path.read_text() != text:
            path.parent.mkdir(exist_ok=True)
            path.write_text(text)
            written.append(path)
    return written


def evaluate_plots(cfg: Config) -> list:
    """The evaluate stage's plots: the student's confusion chart, per-class bars, the PNG figures."""
    if cfg.data.name == "none":  # data/reports/per_class.csv: class,agreement,teacher_count
        confusion = {"title": "student vs teacher class (held-out synthetic)",
                     "x_label": "student prediction", "y_label": "teacher class"}
        bars = {"x": "agreement", "title": "student-teacher agreement per teacher class (held-out synthetic)",
                "x_label": "agreement with the teacher", "y_label": "teacher class"}
    else:  # class,model,accuracy: one row per class and model (teacher, student, baseline when it exists)
        confusion = {"title": "student predictions vs true class (real test split)",
                     "x_label": "student prediction", "y_label": "true class"}
        bars = {"x": "accuracy", "title": "per-class accuracy (real test split)",
                "x_label": "accuracy", "y_label": "class"}
    return [{str(paths.REPORTS / "predictions.csv"): {"template": "confusion", "x": "predicted", "y": "actual",
                                                       **confusion}},
            {str(paths.REPORTS / "per_class.csv"): {"template": "bars", "x": bars["x"], "y": "class",
                                                     **{k: v for k, v in bars.items() if k != "x"}}},
            str(paths.REPORTS / "figures")]


def pipeline_plots(cfg: Config) -> list:
    """dvc.yaml's top-level plots: distill's loss and agreement (each on its own axis), the synthetic set's
    class histogram (from zero), the sample grid."""
    on = "real train split" if cfg.distill.data == "real" else "synthetic set"
    agree = "real_agreement" if cfg.distill.data == "real" else "synthetic_agreement"
    return [{"distill_loss": {"template": "linear", "x": "epoch", "y": {HISTORY: "loss"},
                              "title": "distill: training loss per epoch",
                              "x_label": "epoch", "y_label": "training loss (KD; CE if fine-tuning)"}},
            {"distill_agreement": {"template": "linear", "x": "epoch", "y": {HISTORY: agree},
                                   "title": f"distill: agreement with the teacher ({on})",
                                   "x_label": "epoch", "y_label": "top-1 agreement with the teacher"}},
            {str(paths.SYNTHETIC / "histogram.csv"): {"template": "bars", "x": "count", "y": "class",
                                                      "title": "synthetic set: samples per teacher-predicted class",
                                                      "x_label": "samples", "y_label": "class"}},
            str(paths.SYNTHETIC / "grid.png")]


def _plot_id(item) -> str:
    return item if isinstance(item, str) else next(iter(item))


def set_plots(seq: list, want: list, drop: tuple = ()) -> None:
    """A dvc.yaml plots list (in place): each of ``want``'s entries replaces the one with its id when they
    differ, or is appended when missing; ``drop``'s ids are removed; other entries stay as written."""
    ids = {_plot_id(w): w for w in want}
    for i in reversed(range(len(seq))):
        pid = _plot_id(seq[i])
        if pid in drop:
            del seq[i]
        elif pid in ids and seq[i] != ids[pid]:
            seq[i] = ids[pid]
    have = {_plot_id(p) for p in seq}
    seq.extend(w for w in want if _plot_id(w) not in have)


def teacher_deps(cfg: Config) -> list[str]:
    """What the teacher is read from: the card's files (teacher.source / checkpoint / classes file) or data/teacher."""
    from kdpipe.teachers import teacher_files

    return teacher_files(cfg)


def data_deps(cfg: Config, stage: str) -> list[str]:
    members = [t.checkpoint for t in cfg.teachers if t.checkpoint]
    teachers = list(dict.fromkeys([*teacher_deps(cfg), *members]))
    real = cfg.data.name != "none"
    if stage == "synthesize":
        return teachers + ([cfg.synthesize.stats_file] if cfg.synthesize.stats_file else [])
    if stage == "distill":
        route = cfg.distill.data
        return [str(paths.SYNTHETIC)] * (route != "real") + teachers + [str(paths.PREPARED)] * (route != "synthetic")
    if stage == "evaluate":
        if not real:
            return [str(paths.SYNTHETIC), str(paths.STUDENT), *teacher_deps(cfg)]
        return [str(paths.PREPARED), *teacher_deps(cfg), str(paths.BASELINE), str(paths.STUDENT)]
    if stage == "export":
        if not real:
            return [str(paths.STUDENT), str(paths.REPORTS / "metrics.json"), str(paths.SYNTHETIC), *teacher_deps(cfg)]
        return [str(paths.STUDENT), str(paths.PREPARED), str(paths.REPORTS / "metrics.json"), str(paths.SYNTHETIC)]
    return [str(paths.PREPARED)] if stage in ("train-teacher", "baseline") else []


def stage_entry(cfg: Config, stage: str) -> dict:
    """A stage of a project made by ``kdpipe init`` (no code deps: the code is the installed kdpipe, whose
    version MLflow records): command, data deps, params, outs."""
    params = {"synthesize": ["seed", "device", "speed", "synthesize", *SHARED["synthesize"], "student.arch", "teachers"],
              "distill": ["seed", "device", "speed", "distill", *SHARED["distill"], "student.arch", "teachers"],
              "evaluate": [], "export": ["seed", "export", "tracking.registered_model", "tracking.alias"]}[stage]
    params += [p for p in CARD_PARAMS[stage] if p not in params]
    entry = {"cmd": f"kdpipe {stage}", "deps": data_deps(cfg, stage), "params": params}
    if stage == "evaluate":
        entry["metrics"] = [str(paths.REPORTS / "metrics.json")]
        entry["plots"] = evaluate_plots(cfg)
    elif stage == "export":
        entry["outs"] = [str(paths.EXPORT / "student.onnx"), str(paths.EXPORT / "student.int8.onnx")]
        entry["metrics"] = [str(paths.EXPORT / "metrics.json")]
    else:
        entry["outs"] = [str(paths.SYNTHETIC if stage == "synthesize" else paths.STUDENT)]
    return entry


def project_yaml(cfg: Config) -> str:
    """dvc.yaml of a teacher-only project (``kdpipe init``)."""
    import yaml

    from kdpipe.stages import stages_for

    doc = {"stages": {s: stage_entry(cfg, s) for s in stages_for(cfg)},
           "plots": pipeline_plots(cfg)}
    head = ("# kdpipe: a teacher-only project (kdpipe init). The DAG: synthesize -> distill -> evaluate -> export; the\n"
            "# teacher file and its card (params.yaml: teacher) are the deps. `kdpipe dag --write` re-renders the deps\n"
            "# and the plots (with their template, .dvc/plots/bars.json).\n")
    return head + yaml.safe_dump(doc, sort_keys=False)


def _yaml():
    from ruamel.yaml import YAML

    y = YAML()
    y.indent(mapping=2, sequence=4, offset=2)
    y.preserve_quotes, y.width = True, 4096
    return y


def render(cfg: Config, text: str) -> str:
    """dvc.yaml ``text`` with the config-dependent entries set for ``cfg``."""
    from kdpipe.stages import stages_for

    y = _yaml()
    doc = y.load(text)
    keep = stages_for(cfg)
    for stage in [s for s in doc["stages"] if s not in keep]:  # e.g. no prepare/train-teacher/baseline without data
        del doc["stages"][stage]
    card = cfg.teacher.source is not None
    for stage, entry in doc["stages"].items():
        deps = entry.setdefault("deps", [])
        code = [d for d in deps if str(d).startswith("kdpipe/")]
        want = data_deps(cfg, stage)
        if [d for d in deps if not str(d).startswith("kdpipe/")] != want:  # untouched when right (keeps comments)
            deps[:] = want + code
        if stage in SHARED:  # the shared sections, whole; a key that moved into one of them would be missing for DVC
            params = entry.setdefault("params", [])
            for i in reversed([i for i, p in enumerate(params) if str(p) in MOVED]):
                del params[i]
            params.extend(p for p in SHARED[stage] if p not in params)
        if card and stage in CARD_PARAMS:
            params = entry.setdefault("params", [])
            params.extend(p for p in CARD_PARAMS[stage] if p not in params)
    if "evaluate" in doc["stages"]:
        set_plots(doc["stages"]["evaluate"].setdefault("plots", []), evaluate_plots(cfg))
    if doc.get("plots") is None:
        doc["plots"] = []
    set_plots(doc["plots"], pipeline_plots(cfg), drop=(HISTORY,))  # HISTORY: the one loss+agreement plot of old
    out = io.StringIO()
    y.dump(doc, out)
    return out.getvalue()


def check(cfg: Config, path: str | Path = "dvc.yaml") -> None:
    """ConfigError when ``path``'s rendered deps are not those ``cfg`` needs."""
    import yaml

    text = Path(path).read_text()
    if yaml.safe_load(render(cfg, text)) != yaml.safe_load(text):  # the entries, not their formatting
        want = {s: data_deps(cfg, s) for s in RENDERED}
        raise ConfigError(f"{path} (data deps, params or plots) is out of date for these parameters (data.name={cfg.data.name}, "
                          f"teacher.source={cfg.teacher.source}, distill.data={cfg.distill.data}, "
                          f"{len(cfg.teachers)} teachers; data deps needed: {want}): run 'kdpipe dag --write' "
                          f"with the same parameters, then commit dvc.yaml")


def main(cfg: Config, write: bool, path: str | Path = "dvc.yaml") -> None:
    text = render(cfg, Path(path).read_text())
    if write:
        from kdpipe.utils import atomic_path

        with atomic_path(path) as tmp:
            tmp.write_text(text)
        print(f"[kdpipe] wrote {path}: " + "; ".join(f"{s} <- {', '.join(data_deps(cfg, s))}" for s in RENDERED))
        for t in write_templates(Path(path).parent):
            print(f"[kdpipe] wrote {t} (DVC plot template)")
    else:
        print(text, end="")
