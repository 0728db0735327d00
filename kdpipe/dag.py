"""dvc.yaml's config-dependent part. A DVC dependency cannot be conditional, so kdpipe writes the
data dependencies of the stages that follow the config into dvc.yaml:

    kdpipe dag [--config my.yaml] [--set distill.data=real]           # print dvc.yaml as the config needs it
    kdpipe dag --write [--set ...]                                    # write it (commit it with params.yaml)

  synthesize: data/teacher, every ``teachers`` checkpoint;
  distill:    data/synthetic (unless distill.data is real), data/teacher, the ``teachers`` checkpoints,
              data/prepared (only when distill.data is real or mixed);
  the history plot's agreement column (synthetic_agreement, or real_agreement on the real route).
Only the data deps (every dep not under kdpipe/) of these stages are rewritten; code deps, params,
outs, the other stages and the comments stay as written (ruamel.yaml round trip). ``kdpipe run``
refuses to start ``dvc repro`` when dvc.yaml is out of date for params.yaml, and so does a stage run
under dvc (e.g. ``dvc exp run -S distill.data=real``): the message says to run ``kdpipe dag --write``.
tests/test_routes.py checks that the committed dvc.yaml is the rendering of the default config.
"""
from __future__ import annotations

import io
from pathlib import Path

from kdpipe import paths
from kdpipe.config import Config, ConfigError

RENDERED = ("synthesize", "distill")  # the stages whose data deps follow distill.data and teachers
HISTORY = str(paths.STUDENT / "history.csv")
# params a stage reads beyond its own section when the teacher is a card (teacher.source) / there is no real data
CARD_PARAMS = {"synthesize": ["teacher"], "distill": ["teacher", "synthesize"],
               "evaluate": ["seed", "teacher", "synthesize", "evaluate"], "export": ["teacher", "synthesize", "evaluate"]}


def teacher_deps(cfg: Config) -> list[str]:
    """What the teacher is read from: the card's files (teacher.source / checkpoint / classes file) or data/teacher."""
    from kdpipe.teachers import teacher_files

    return teacher_files(cfg)


def data_deps(cfg: Config, stage: str) -> list[str]:
    members = [t.checkpoint for t in cfg.teachers if t.checkpoint]
    teachers = list(dict.fromkeys([*teacher_deps(cfg), *members]))
    real = cfg.data.name != "none"
    if stage == "synthesize":
        return teachers + ([cfg.synthesize.stats] if cfg.synthesize.stats else [])
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
    params = {"synthesize": ["seed", "device", "speed", "synthesize", "student.arch", "teachers"],
              "distill": ["seed", "device", "speed", "distill", "student.arch", "teachers"],
              "evaluate": [], "export": ["seed", "export", "tracking.registered_model", "tracking.alias"]}[stage]
    params += [p for p in CARD_PARAMS[stage] if p not in params]
    entry = {"cmd": f"kdpipe {stage}", "deps": data_deps(cfg, stage), "params": params}
    if stage == "evaluate":
        entry["metrics"] = [str(paths.REPORTS / "metrics.json")]
        entry["plots"] = [{str(paths.REPORTS / "predictions.csv"): {"template": "confusion", "x": "predicted", "y": "actual"}},
                          {str(paths.REPORTS / "per_class.csv"): {"x": "class", "y": "agreement"}},
                          str(paths.REPORTS / "figures")]
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
           "plots": [{HISTORY: {"x": "epoch", "y": ["loss", "synthetic_agreement"]}},
                     {str(paths.SYNTHETIC / "histogram.csv"): {"x": "count", "y": "class", "template": "bar_horizontal"}},
                     str(paths.SYNTHETIC / "grid.png")]}
    head = ("# kdpipe: a teacher-only project (kdpipe init). The DAG: synthesize -> distill -> evaluate -> export; the\n"
            "# teacher file and its card (params.yaml: teacher) are the deps. `kdpipe dag --write` re-renders the deps.\n")
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
        if card and stage in CARD_PARAMS:
            params = entry.setdefault("params", [])
            params.extend(p for p in CARD_PARAMS[stage] if p not in params)
    for plot in doc.get("plots", []):
        if HISTORY in plot:
            plot[HISTORY]["y"][1] = "real_agreement" if cfg.distill.data == "real" else "synthetic_agreement"
    out = io.StringIO()
    y.dump(doc, out)
    return out.getvalue()


def check(cfg: Config, path: str | Path = "dvc.yaml") -> None:
    """ConfigError when ``path``'s rendered deps are not those ``cfg`` needs."""
    import yaml

    text = Path(path).read_text()
    if yaml.safe_load(render(cfg, text)) != yaml.safe_load(text):  # the entries, not their formatting
        want = {s: data_deps(cfg, s) for s in RENDERED}
        raise ConfigError(f"{path} is out of date for these parameters (data.name={cfg.data.name}, teacher.source="
                          f"{cfg.teacher.source}, distill.data={cfg.distill.data}, "
                          f"{len(cfg.teachers)} teachers; data deps needed: {want}): run 'kdpipe dag --write' "
                          f"with the same parameters, then commit dvc.yaml")


def main(cfg: Config, write: bool, path: str | Path = "dvc.yaml") -> None:
    text = render(cfg, Path(path).read_text())
    if write:
        from kdpipe.utils import atomic_path

        with atomic_path(path) as tmp:
            tmp.write_text(text)
        print(f"[kdpipe] wrote {path}: " + "; ".join(f"{s} <- {', '.join(data_deps(cfg, s))}" for s in RENDERED))
    else:
        print(text, end="")
