"""README.md and the docs split from it, checked against the code and the tree (fast: nothing is run).

- every ``kdpipe <subcommand>`` exists in kdpipe.cli._parser(), and every ``--flag`` after it is an option of that
  subcommand (or of kdpipe itself); ``--set key=value`` / ``dvc exp run -S key=value`` keys are schema keys;
- every ``make <target>`` is a Makefile target, every ``python -m <module>`` imports (its flags are its parser's),
  every ``python <script>.py`` exists and knows its flags, every ``dvc repro <stage>`` is a dvc.yaml stage;
- every repo path named (in code blocks, and in backticks in the text) exists; run products (``data/...``, which
  exist only after a run) are checked against RUN_PRODUCTS, itself checked against kdpipe/paths.py and dvc.yaml;
- every markdown link to a local file or ``#anchor`` resolves, and every README heading the code names exists;
- every option of ``kdpipe`` (all subcommands) and of ``python -m flows.pipeline`` has help text.

test_checker_catches_mistakes feeds the checker made-up commands, flags, keys, paths and links.
"""
from __future__ import annotations

import argparse
import fnmatch
import importlib
import os
import re
import shlex
from functools import lru_cache
from pathlib import Path
from unittest import mock

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
# logs of past measurements and faults (commands as they were on their day): links are checked, not commands/paths
HISTORY_DOCS = {"benchmarks.md", "reliability.md"}

# Files a run writes under data/ (they exist only after `make run`, `kdpipe audit-memorization` or a teacher-only
# run). Each must lie under a path of kdpipe/paths.py or dvc.yaml (test_run_products_are_declared), so a typo in a
# path the docs name fails even on a fresh clone.
RUN_PRODUCTS = {
    "data/prepared/train.pt", "data/prepared/val.pt", "data/prepared/test.pt", "data/prepared/meta.json",
    "data/teacher/model.pt", "data/teacher/spec.json",
    "data/baseline/model.pt", "data/baseline/spec.json",
    "data/synthetic/samples.pt", "data/synthetic/meta.json", "data/synthetic/grid.png", "data/synthetic/histogram.csv",
    "data/synthetic/generator.pt", "data/synthetic/student.pt",
    "data/student/model.pt", "data/student/spec.json", "data/student/history.csv",
    "data/reports/metrics.json", "data/reports/predictions.csv", "data/reports/per_class.csv",
    "data/reports/figures/confusion_teacher.png", "data/reports/figures/confusion_student.png",
    "data/reports/figures/confusion_baseline.png", "data/reports/figures/confusion_student_vs_teacher.png",
    "data/reports/memorization.json", "data/reports/memorization.png",
    "data/export/student.onnx", "data/export/student.int8.onnx", "data/export/metrics.json",
    "data/.timings/synthesize.json",
}
# data/ folders that are not stage outputs: their defaults in the code
SCRATCH = {"data/.resume": "resume.dir", "data/external": "data.root"}
# Names the docs use that are not in a fresh clone: made by `make`/a run/DVC/MLflow, or the user's own files in
# the examples. A path matches an entry equal to it or a folder above it.
NOT_IN_REPO = {
    ".venv", "mlflow.db", "mlartifacts", "dvc.lock", "dvc_plots", ".dvc/cache", ".dvc/tmp",  # made by make install / a run / dvc
    "student_pytorch",  # an MLflow artifact folder of the registered model
    "kdpipe-pipeline/kdpipe-scheduled",  # a Prefect deployment (flow/deployment)
    "my-project", "keras_teacher.onnx", "my_teacher.pt", "classes.txt", "owner_images", "activation_stats.pt",
    "student.onnx", "opens.txt", "my.yaml", "t2.pt", "path/to/state_dict.pt", "lineage.html", "kdpipe-student/3",
    "n/a", "export/student.onnx", "kdpipe-pipeline/kdpipe-nightly", ".prefect", ".dvc/config.local",  # the user's files in the examples
    # docs/peer.md: files of Fast-Datafree's own tree and of the peer bench's scratch folder (outside the repo)
    "train_scratch.py", "fast_meta.py", "evaluators.py", "scripts/fast_cifar.sh", "split.json", "student_last.pt",
    "fast.json", "teacher/teacher.json",
}
EXTS = {".py", ".yaml", ".yml", ".md", ".json", ".csv", ".pt", ".pth", ".onnx", ".png", ".toml", ".txt", ".db",
        ".lock", ".html", ".svg", ".cfg", ".sh"}
SKIP_DIRS = {".git", ".venv", "data", "mlartifacts", "mlruns", "__pycache__", ".dvc", ".prefect", "dvc_plots"}


# ---------------------------------------------------------------- what the code and the tree say


@lru_cache(maxsize=None)
def kdpipe_parser() -> argparse.ArgumentParser:
    from kdpipe.cli import _parser

    return _parser()


class _Captured(Exception):
    pass


@lru_cache(maxsize=None)
def flows_parser() -> argparse.ArgumentParser:
    """The parser flows.pipeline.main builds (taken at parse_args, so nothing runs)."""
    import flows.pipeline as fp

    got = {}

    def capture(self, args=None, namespace=None):
        got["parser"] = self
        raise _Captured

    with mock.patch.object(argparse.ArgumentParser, "parse_args", capture):
        try:
            fp.main([])
        except _Captured:
            pass
    return got["parser"]


def subparsers(p: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for a in p._actions:
        if isinstance(a, argparse._SubParsersAction):
            return dict(a.choices)
    return {}


def options(p: argparse.ArgumentParser) -> set[str]:
    return {s for a in p._actions for s in a.option_strings}


@lru_cache(maxsize=None)
def schema_keys() -> tuple[str, ...]:
    from kdpipe.config import describe

    return tuple(r[0] for r in describe())


def is_schema_key(key: str) -> bool:
    keys = schema_keys()
    return key in keys or any(k.startswith(key + ".") for k in keys)


@lru_cache(maxsize=None)
def make_targets() -> frozenset[str]:
    text = (ROOT / "Makefile").read_text()
    return frozenset(re.findall(r"^([A-Za-z0-9_.\-]+)\s*:(?!=)", text, re.M))


@lru_cache(maxsize=None)
def dvc_yaml() -> dict:
    return yaml.safe_load((ROOT / "dvc.yaml").read_text())


@lru_cache(maxsize=None)
def declared_outputs() -> frozenset[str]:
    """data/ paths the code and dvc.yaml declare: kdpipe/paths.py's constants, dvc.yaml's outs, metrics, plots."""
    from kdpipe import paths

    out = {str(v) for v in vars(paths).values() if isinstance(v, Path)}

    def names(items):  # a plot is a path, {path: props} or {id: {y: {path: column}}}
        for it in items or []:
            if not isinstance(it, dict):
                yield it
                continue
            for key, props in it.items():
                yield key
                if isinstance(props, dict) and isinstance(props.get("y"), dict):
                    yield from props["y"]

    d = dvc_yaml()
    for st in d["stages"].values():
        for kind in ("outs", "metrics", "plots"):
            out.update(names(st.get(kind)))
    out.update(names(d.get("plots")))
    return frozenset(p.rstrip("/") for p in out)


@lru_cache(maxsize=None)
def repo_basenames() -> frozenset[str]:
    names = {Path(p).name for p in RUN_PRODUCTS}
    for _, dirs, files in os.walk(ROOT):
        dirs[:] = [d for d in dirs if d not in SKIP_DIRS]
        names.update(files)
    return frozenset(names)


# ---------------------------------------------------------------- reading markdown


FENCE = re.compile(r"^\s*(```+|~~~+)\s*([\w+-]*)")
SHELL_LANGS = {"bash", "sh", "shell", "console"}
COMMANDS = ("kdpipe", "make", "python", "python3", "torchrun", "dvc")


def split_md(text: str) -> tuple[list[tuple[str, str]], str]:
    """(fenced blocks as (language, code), the prose with each block's lines blanked)."""
    blocks, prose, fence, lang, code = [], [], None, "", []
    for line in text.splitlines():
        m = FENCE.match(line)
        if fence is None and m:
            fence, lang, code = m.group(1), m.group(2), []
            prose.append("")
        elif fence is not None and line.strip().startswith(fence[0] * len(fence)) and not line.strip().strip(fence[0]):
            blocks.append((lang, "\n".join(code)))
            fence = None
            prose.append("")
        elif fence is not None:
            code.append(line)
            prose.append("")
        else:
            prose.append(line)
    return blocks, re.sub(r"<!--.*?-->", "", "\n".join(prose), flags=re.S)


def inline_code(prose: str) -> list[str]:
    return [" ".join(m.group(2).split()) for m in re.finditer(r"(`+)(.+?)\1", prose, re.S)]


def segments(line: str) -> list[list[str]]:
    """One shell line -> its simple commands (split at ; && || | &), comments dropped, [optional] brackets and
    '...' removed, leading VAR=value assignments dropped."""
    lx = shlex.shlex(line, posix=True, punctuation_chars=";&|")
    lx.whitespace_split = True
    out, cur = [], []
    for tok in lx:
        if tok and set(tok) <= set(";&|"):
            out.append(cur)
            cur = []
            continue
        tok = tok.lstrip("[").rstrip("]")
        if tok and tok not in ("...", "…"):
            cur.append(tok)
    out.append(cur)
    cleaned = []
    for seg in out:
        while seg and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=\S*", seg[0]):
            seg = seg[1:]
        if seg:
            cleaned.append(seg)
    return cleaned


def shell_commands(text: str) -> list[list[str]]:
    """Every simple command of the doc's shell blocks, and of inline code that starts with a command word."""
    blocks, prose = split_md(text)
    lines = []
    for lang, code in blocks:
        if lang in SHELL_LANGS:
            lines += code.replace("\\\n", " ").splitlines()
    lines += [c for c in inline_code(prose) if c.split()[0] in COMMANDS]
    cmds = []
    for line in lines:
        try:
            cmds += segments(line)
        except ValueError as e:  # unbalanced quotes
            cmds.append(["<unparsable>", line, str(e)])
    return cmds


def is_placeholder(tok: str) -> bool:
    return "<" in tok or bool(re.fullmatch(r"[A-Z][A-Z_]*", tok)) or tok in ("key", "key=value")


# ---------------------------------------------------------------- the checks


def _set_values(args: list[str], flags: tuple[str, ...]) -> list[str]:
    vals = []
    for i, tok in enumerate(args):
        if tok in flags and i + 1 < len(args):
            vals.append(args[i + 1])
        for f in flags:
            if f.startswith("--") and tok.startswith(f + "="):
                vals.append(tok[len(f) + 1:])
    return vals


def _check_keys(values: list[str], where: str) -> list[str]:
    bad = []
    for v in values:
        key = v.split("=", 1)[0]
        if "=" not in v or is_placeholder(key) or "<" in key:
            continue
        if not is_schema_key(key):
            from kdpipe.config import did_you_mean

            bad.append(f"{where}: '{key}' is not a parameter key{did_you_mean(key, list(schema_keys()))}")
    return bad


def _check_flags(args: list[str], known: set[str], where: str) -> list[str]:
    bad = []
    for tok in args:
        if tok.startswith("-") and tok != "-" and not re.fullmatch(r"-[\d.]+", tok):
            if tok.split("=", 1)[0] not in known:
                bad.append(f"{where}: no option {tok.split('=', 1)[0]}")
    return bad


def check_kdpipe(args: list[str], where: str) -> list[str]:
    top = kdpipe_parser()
    subs = subparsers(top)
    if not args or args[0].startswith("-"):
        return _check_flags(args, options(top), where)
    name, rest = args[0], args[1:]
    if is_placeholder(name):  # kdpipe <stage> --help: an option of every stage's subcommand
        from kdpipe.stages import STAGES

        known = set.intersection(*(options(subs[s]) for s in STAGES)) | options(top)
        return _check_flags(rest, known, where)
    if name not in subs:
        return [f"{where}: 'kdpipe {name}' is not a subcommand (kdpipe.cli: {', '.join(subs)})"]
    bad = _check_flags(rest, options(subs[name]) | options(top), where)
    bad += _check_keys(_set_values(rest, ("--set",)), where)
    if name == "params":
        pos = [t for t in rest if not t.startswith("-") and not is_placeholder(t)]
        from kdpipe.config import ConfigError, describe

        for section in pos:
            try:
                describe(section)
            except ConfigError as e:
                bad.append(f"{where}: {e}")
    return bad


def check_python_m(module: str, args: list[str], where: str) -> list[str]:
    try:
        importlib.import_module(module)
    except ImportError as e:
        return [f"{where}: python -m {module}: {e}"]
    if module == "kdpipe":
        return check_kdpipe(args, where)
    if module == "flows.pipeline":
        return _check_flags(args, options(flows_parser()), where) + _check_keys(_set_values(args, ("--set",)), where)
    return []


def check_command(cmd: list[str], where: str) -> list[str]:
    head, args = cmd[0], cmd[1:]
    if head == "<unparsable>":
        return [f"{where}: cannot parse {args[0]!r}: {args[1]}"]
    if head == "kdpipe":
        return check_kdpipe(args, where)
    if head in ("python", "python3") and args:
        if args[0] == "-m" and len(args) > 1:
            return check_python_m(args[1], args[2:], where)
        if args[0].endswith(".py"):
            script = ROOT / args[0]
            if not script.is_file():
                return [f"{where}: no script {args[0]}"]
            src = script.read_text()
            return [f"{where}: {args[0]} has no option {t}" for t in args[1:]
                    if t.startswith("--") and f'"{t.split("=", 1)[0]}"' not in src]
    if head == "torchrun" and "-m" in args:
        i = args.index("-m")
        if i + 1 < len(args):
            return check_python_m(args[i + 1], args[i + 2:], where)
    if head == "make":
        return [f"{where}: 'make {t}' is not a Makefile target" for t in args
                if not t.startswith("-") and "=" not in t and t not in make_targets()]
    if head == "dvc":
        bad = _check_keys(_set_values(args, ("-S", "--set-param")), where)
        if args[:1] == ["repro"]:
            stages = dvc_yaml()["stages"]
            bad += [f"{where}: 'dvc repro {t}': no such stage in dvc.yaml" for t in args[1:]
                    if not t.startswith("-") and not is_placeholder(t) and t not in stages]
        return bad
    return []


def check_commands(text: str, name: str = "doc") -> list[str]:
    bad = []
    for cmd in shell_commands(text):
        bad += check_command(cmd, f"{name}: `{' '.join(cmd)}`")
    return bad


def path_candidates(text: str) -> list[str]:
    """Tokens that name a path: in shell blocks (every word of every command) and in backticks in the text."""
    blocks, prose = split_md(text)
    toks = []
    for lang, code in blocks:
        if lang in SHELL_LANGS:
            for line in code.replace("\\\n", " ").splitlines():
                try:
                    toks += [t for seg in segments(line) for t in seg]
                except ValueError:
                    pass
    for span in inline_code(prose):
        if span.split()[0] in COMMANDS:
            try:
                toks += [t for seg in segments(span) for t in seg]
            except ValueError:
                pass
        else:
            toks.append(span)
    out = []
    for t in toks:
        if "<" in t or t.startswith(("-", "/")) or not re.fullmatch(r"[\w.\-*/]+", t, re.ASCII):
            continue
        if "/" in t or Path(t).suffix in EXTS:
            out.append(t)
    return out


def _under(path: str, entries) -> bool:
    return any(path == e or path.startswith(e + "/") for e in entries)


def check_path(path: str) -> str | None:
    p = path.rstrip("/")
    if p == "data" or p.startswith("data/"):
        products = RUN_PRODUCTS | set(declared_outputs()) | set(SCRATCH)
        if "*" in p:
            ok = any(fnmatch.fnmatch(r, p) for r in products)
        else:
            ok = p in products or any(r.startswith(p + "/") for r in products) or _under(p, SCRATCH)
        return None if ok else f"'{path}' is no run product (RUN_PRODUCTS, kdpipe/paths.py, dvc.yaml)"
    if ("*" in p and any(ROOT.glob(p))) or (ROOT / p).exists():
        return None
    if _under(p, NOT_IN_REPO):
        return None
    if "/" not in p and any(fnmatch.fnmatch(n, p) for n in repo_basenames()):  # named in its folder's row: `model.pt`
        return None
    return f"'{path}' does not exist in the repository"


def check_paths(text: str, name: str = "doc") -> list[str]:
    return [f"{name}: {msg}" for msg in dict.fromkeys(filter(None, map(check_path, path_candidates(text))))]


def slug(heading: str) -> str:
    """GitHub's anchor of a heading."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # link text only
    return re.sub(r"[^\w\- ]", "", text.strip().lower()).replace(" ", "-")


def headings(text: str) -> list[str]:
    _, prose = split_md(text)
    return [m.group(2).strip() for m in re.finditer(r"^(#{1,6})\s+(.+?)\s*#*\s*$", prose, re.M)]


def anchors(text: str) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    for h in headings(text):
        s = slug(h)
        n = seen.get(s, 0)
        out.add(s if n == 0 else f"{s}-{n}")
        seen[s] = n + 1
    return out


def check_links(text: str, md: Path) -> list[str]:
    _, prose = split_md(text)
    bad = []
    for m in re.finditer(r"\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)", prose):
        target = m.group(1)
        if re.match(r"[a-zA-Z][\w+.-]*:", target):  # http:, https:, mailto:
            continue
        file, _, anchor = target.partition("#")
        dest = (md.parent / file).resolve() if file else md
        if file and not dest.exists():
            bad.append(f"{md.name}: link ({target}): no file {file}")
            continue
        if anchor and dest.suffix == ".md" and anchor not in anchors(dest.read_text() if file else text):
            bad.append(f"{md.name}: link ({target}): no heading #{anchor} in {dest.name}")
    return bad


def help_gaps(p: argparse.ArgumentParser, prog: str) -> list[str]:
    gaps = []
    for a in p._actions:
        if isinstance(a, argparse._SubParsersAction):
            helps = {c.dest: c.help for c in a._choices_actions}
            for name, sp in a.choices.items():
                if not helps.get(name):
                    gaps.append(f"{prog} {name}: the subcommand has no help text")
                gaps += help_gaps(sp, f"{prog} {name}")
        elif not a.help or a.help == argparse.SUPPRESS:
            gaps.append(f"{prog}: {'/'.join(a.option_strings) or a.dest} has no help text")
    return gaps


# ---------------------------------------------------------------- the tests


def checked_docs() -> list[Path]:
    return [README] + sorted(p for p in (ROOT / "docs").glob("*.md") if p.name not in HISTORY_DOCS)


def all_docs() -> list[Path]:
    return [README] + sorted((ROOT / "docs").glob("*.md"))


def _rel(p: Path) -> str:
    return str(p.relative_to(ROOT))


@pytest.mark.parametrize("md", checked_docs(), ids=_rel)
def test_commands_subcommands_flags_and_keys_exist(md):
    text = md.read_text()
    assert shell_commands(text) or md != README
    assert check_commands(text, _rel(md)) == []


@pytest.mark.parametrize("md", checked_docs(), ids=_rel)
def test_paths_exist(md):
    assert check_paths(md.read_text(), _rel(md)) == []


@pytest.mark.parametrize("md", all_docs(), ids=_rel)
def test_links_resolve(md):
    assert check_links(md.read_text(), md) == []


@pytest.mark.parametrize("md", checked_docs(), ids=_rel)
def test_code_blocks_say_their_language(md):
    """Shell blocks are checked; output blocks say `text`, so a command is never skipped for lack of a tag."""
    blocks, _ = split_md(md.read_text())
    assert [code.splitlines()[:1] for lang, code in blocks if not lang] == []


def test_run_products_are_declared():
    declared = declared_outputs()
    assert [p for p in RUN_PRODUCTS if not _under(p, declared)] == []
    from kdpipe.config import Config

    assert Config().resume.dir == "data/.resume"
    assert '"data/external"' in (ROOT / "kdpipe" / "data.py").read_text()


def test_readme_headings_named_elsewhere_exist():
    """Code and config name README sections, e.g. (README: Multi-GPU and speed) or README "Objectives and routes"."""
    named = {}
    for base in ("kdpipe", "flows", "tests", "docs", "bench", ".ci"):
        for f in (ROOT / base).rglob("*"):
            if f.is_file() and f.suffix in {".py", ".md", ".yaml", ""} and f.name != Path(__file__).name \
                    and "__pycache__" not in f.parts:
                named[f] = f.read_text(errors="replace")
    for name in ("prefect.yaml", "Dockerfile", "Makefile", "pyproject.toml"):
        named[ROOT / name] = (ROOT / name).read_text()
    titles = {re.sub(r"[`*]", "", h) for h in headings(README.read_text())}
    refs = []
    for f, text in named.items():
        for m in re.finditer(r'README[,:]?\s*"([^"\n]+)"|\(README:\s*([^)"\n]+)\)', text):
            refs.append((_rel(f), (m.group(1) or m.group(2)).strip()))
    assert refs, "the pattern should find the README sections that kdpipe/config.py and prefect.yaml name"
    assert [r for r in refs if r[1] not in titles] == []


def test_readme_order_and_kept_sections():
    """The issue-25 layout: results first, then the teacher-only route, then reference; sections others rely on."""
    hs = headings(README.read_text())
    order = ["Requirements", "Two commands on a fresh machine", "What you get", "I only have a teacher", "Reference"]
    assert [h for h in hs if h in order] == order
    for kept in ("Lineage: what an auditor checks", "Outputs", "When things go wrong", "Prefect: run it, schedule it",
                 "MLflow: tracking, registry, audit", "Objectives and routes", "Multi-GPU and speed"):
        assert kept in hs


def test_outputs_table_lists_every_stage_output():
    """Every run product of the default pipeline is named in README's Outputs section."""
    text = README.read_text()
    outputs = text.split("## Outputs", 1)[1].split("\n## ", 1)[0]
    named = set(path_candidates(outputs))
    missing = [p for p in sorted(RUN_PRODUCTS) if p not in named and Path(p).name not in named]
    assert missing == []


def test_every_kdpipe_option_has_help():
    assert help_gaps(kdpipe_parser(), "kdpipe") == []


def test_every_flow_option_has_help():
    p = flows_parser()
    assert {"--config", "--set", "--no-dvc"} <= options(p)
    assert help_gaps(p, "python -m flows.pipeline") == []


GOOD = """
```bash
kdpipe distill --set distill.epochs=10
kdpipe params synthesize
python -m flows.pipeline --no-dvc --set distill.epochs=10
make run && dvc exp run -S distill.temperature=8
```
See `kdpipe/synth/`, `data/reports/metrics.json`, `configs/cifar10-cpu.yaml` and [Outputs](#outputs).

## Outputs
"""


@pytest.mark.parametrize("bad", [
    "```bash\nkdpipe distill --made-up-flag\n```",
    "```bash\nkdpipe distil\n```",
    "```bash\nkdpipe run --no-dvc --set distill.temprature=8\n```",
    "```bash\nkdpipe init d --teacher t.onnx --set teacher.rnage=[0,1]\n```",
    "```bash\nkdpipe params synthesise\n```",
    "```bash\nmake runn\n```",
    "```bash\npython -m flows.pipelin\n```",
    "```bash\npython -m flows.pipeline --no-dvcc\n```",
    "```bash\npython bench/speed.py --amps bf16\n```",
    "```bash\ndvc exp run -S distill.tempature=8\n```",
    "```bash\ndvc repro -f -s train-teachr\n```",
    "Run `kdpipe distill --epochs 3`.",
    "See `kdpipe/synht/`.",
    "See `configs/cifar10-gpu.yaml`.",
    "See `data/reprots/metrics.json`.",
    "See `data/reports/metrcs.json`.",
    "```bash\nkdpipe run --config configs/mnsit.yaml\n```",
    "See [the docs](docs/nope.md).",
    "See [below](#no-such-heading).",
    "See [algorithm](docs/algorithm.md#no-such-heading).",
])
def test_checker_catches_mistakes(bad):
    def problems(text):
        return check_commands(text) + check_paths(text) + check_links(text, README)

    assert problems(GOOD) == []
    assert problems(GOOD + "\n" + bad) != []
