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

RENDERED = ("synthesize", "distill")
HISTORY = str(paths.STUDENT / "history.csv")


def data_deps(cfg: Config, stage: str) -> list[str]:
    members = [t.checkpoint for t in cfg.teachers if t.checkpoint]
    teachers = list(dict.fromkeys([str(paths.TEACHER), *members]))
    if stage == "synthesize":
        return teachers
    route = cfg.distill.data
    return [str(paths.SYNTHETIC)] * (route != "real") + teachers + [str(paths.PREPARED)] * (route != "synthetic")


def _yaml():
    from ruamel.yaml import YAML

    y = YAML()
    y.indent(mapping=2, sequence=4, offset=2)
    y.preserve_quotes, y.width = True, 4096
    return y


def render(cfg: Config, text: str) -> str:
    """dvc.yaml ``text`` with the config-dependent entries set for ``cfg``."""
    y = _yaml()
    doc = y.load(text)
    for stage in RENDERED:
        deps = doc["stages"][stage]["deps"]
        code = [d for d in deps if str(d).startswith("kdpipe/")]
        deps[:] = data_deps(cfg, stage) + code
    for plot in doc.get("plots", []):
        if HISTORY in plot:
            plot[HISTORY]["y"][1] = "real_agreement" if cfg.distill.data == "real" else "synthetic_agreement"
    out = io.StringIO()
    y.dump(doc, out)
    return out.getvalue()


def check(cfg: Config, path: str | Path = "dvc.yaml") -> None:
    """ConfigError when ``path``'s rendered deps are not those ``cfg`` needs."""
    text = Path(path).read_text()
    if render(cfg, text) != text:
        want = {s: data_deps(cfg, s) for s in RENDERED}
        raise ConfigError(f"{path} is out of date for these parameters (distill.data={cfg.distill.data}, "
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
