"""``kdpipe lineage``: from a registered student (or any stage run) back to the data, for an auditor.

    kdpipe lineage kdpipe-student | kdpipe-student/3 | kdpipe-student@candidate | <run-id>
                   [--verbose] [--json] [--verify] [--html FILE]

The chain, each link read from MLflow (tags written by the stages, see kdpipe/tracking.py,
kdpipe/provenance.py and kdpipe/registry.py):
  model version → its export run → distill run (same ``student.sha256``) → synthetic data version
  (distill's dataset input, digest = DVC md5 of data/synthetic) → synthesize run (same
  ``synthetic.sha256``) → teacher run (same ``teacher.sha256``; a teacher card ends the chain at its
  file) → the real train split the teacher learned from (the teacher run's data input).
The text starts with the verdict and a header (model, commit, data, teacher, results), then one line
per step; ``--verbose`` adds every hash and parameter. ``--verify`` downloads the registered model and
re-hashes it and every artifact the chain names in this working copy (DVC outputs by their dvc.lock
md5, files by sha256), naming each one that differs. Exit 1 on a data-free stage (synthesize,
distill) that logged a real-data input, a missing link, or a failed check. A distill run on a
real-data route (distill.data real|mixed: tags ``kdpipe.route`` kd-real|kd-mixed and ``kdpipe.privacy``
real-data) may log the real train split: the verdict names the route; kd-real links straight to the
teacher run (no synthetic set).
"""
from __future__ import annotations

import html
import json
import re
import textwrap
from datetime import datetime, timezone
from pathlib import Path

from kdpipe import paths
from kdpipe.stages import DATA_FREE

# stage -> (tag that names what it consumed, the stage that produced it)
UPSTREAM = {
    "export": ("student.sha256", "distill"),
    "evaluate": ("student.sha256", "distill"),
    "distill": ("synthetic.sha256", "synthesize"),
    "synthesize": ("teacher.sha256", "train-teacher"),
}
SECTION = {"train-teacher": "teacher.", "synthesize": "synthesize.", "distill": "distill.", "export": "export.",
           "evaluate": "evaluate."}
# what each stage reads and writes, as the auditor names it: (artifact, DVC path, fallback) where the fallback
# (a stage run outside DVC has no dvc.lock tags) is the stage's own digest tag, or "input": its logged data input
IO = {
    "train-teacher": (("real train split", paths.PREPARED, "input"), ("teacher", paths.TEACHER, "teacher.sha256")),
    "synthesize": (("teacher", paths.TEACHER, "teacher.sha256"), ("synthetic set", paths.SYNTHETIC, "synthetic.dvc_md5")),
    "distill": (("synthetic set", paths.SYNTHETIC, "input"), ("student", paths.STUDENT, "student.sha256")),
    "evaluate": (("student", paths.STUDENT, "student.sha256"), ("reports", paths.REPORTS / "metrics.json", None)),
    "export": (("student", paths.STUDENT, "student.sha256"), ("ONNX student", paths.EXPORT / "student.onnx", "onnx.sha256")),
}
TAG_FILES = {"teacher.sha256": paths.TEACHER / "model.pt", "student.sha256": paths.STUDENT / "model.pt",
             "onnx.sha256": paths.EXPORT / "student.onnx", "synthetic.dvc_md5": paths.SYNTHETIC}
NAMES = {"data/export/metrics.json": "export metrics", "data/export/student.int8.onnx": "INT8 ONNX student",
         "data/reports/metrics.json": "reports", "data/teacher/model.pt": "teacher"}
RESULTS = ("teacher_accuracy", "student_accuracy", "onnx_accuracy", "fidelity_agreement", "fidelity_kl",
           "onnx_teacher_agreement", "max_abs_diff")


class LineageError(RuntimeError):
    pass


def _resolve(client, ref: str):
    """(model version or None, run id) for 'name', 'name/version', 'name@alias' or a run id."""
    if re.fullmatch(r"[0-9a-f]{32}", ref):
        return None, ref
    if "@" in ref:
        name, alias = ref.split("@", 1)
        mv = client.get_model_version_by_alias(name, alias)
    elif "/" in ref:
        name, version = ref.rsplit("/", 1)
        mv = client.get_model_version(name, version)
    else:
        versions = client.search_model_versions(f"name = '{ref}'")
        if not versions:
            raise LineageError(f"no registered model '{ref}' (and it is not a run id)")
        mv = max(versions, key=lambda v: int(v.version))
    mv = client.get_model_version(mv.name, mv.version)  # search results carry no aliases
    if not mv.run_id:
        raise LineageError(f"model version {mv.name}/{mv.version} has no source run")
    return mv, mv.run_id


def _time(ms) -> str:
    return datetime.fromtimestamp(ms / 1000, timezone.utc).isoformat(timespec="seconds")


def _step(run) -> dict:
    tags, info = run.data.tags, run.info
    stage = tags.get("kdpipe.stage", "?")
    return {
        "stage": stage,
        "run_id": info.run_id,
        "status": info.status,
        "start": _time(info.start_time),
        "git_commit": tags.get("git.commit"),
        "git_dirty": tags.get("git.dirty") == "True",
        "params_sha256": tags.get("kdpipe.params_sha256"),
        "parent_run_id": tags.get("mlflow.parentRunId"),
        "prefect_flow_run_id": tags.get("prefect.flow_run_id"),
        "data": tags.get("kdpipe.data"),
        "params": {k: v for k, v in sorted(run.data.params.items()) if k.startswith(SECTION.get(stage, "\0"))},
        "hashes": {k: v for k, v in sorted(tags.items()) if k.endswith(".sha256") or k.startswith("dvc.")
                   and k != "dvc.tagged" or k == "synthetic.dvc_md5"},
        "inputs": [{"name": d.dataset.name, "digest": d.dataset.digest, "source": d.dataset.source,
                    **{t.key.replace("mlflow.data.", "").replace("kdpipe.", ""): t.value for t in d.tags}}
                   for d in run.inputs.dataset_inputs],
    }


def _find(client, experiment_ids, stage: str, tag: str, value: str):
    runs = client.search_runs(experiment_ids, f"tags.`kdpipe.stage` = '{stage}' and tags.`{tag}` = '{value}' "
                              "and attributes.status = 'FINISHED'", order_by=["attributes.start_time DESC"], max_results=1)
    return runs[0] if runs else None


def _artifacts(step: dict) -> dict:
    """{"in": ..., "out": ...}: what the step read and wrote, each {name, path, digest, kind}, one digest per
    artifact: the dvc.lock md5 when DVC ran the stage, else the stage's own tag or its data input's digest."""
    out = {}
    io = IO.get(step["stage"], ())
    if step.get("route") in ("kd-real", "kd-mixed"):  # distill on a real-data route
        io = ((("real train split" if step["route"] == "kd-real" else "synthetic set + real train split"),
               paths.PREPARED if step["route"] == "kd-real" else paths.SYNTHETIC, "input"), io[1])
    for side, (name, path, fallback) in zip(("in", "out"), io):
        card = name == "teacher" and step.get("teacher")  # a teacher file from the card: its sha256
        lock = None if card else step["hashes"].get(f"dvc.{'deps' if side == 'in' else 'outs'}.{path.as_posix()}")
        if lock:
            digest, kind = lock, "dvc md5"
        elif card:
            path, digest, kind = Path(step["teacher"]["source"]), step["teacher"]["sha256"], "sha256"
        elif fallback == "input" and step["inputs"]:
            want = "real" if name.startswith("real") else "synthetic"
            digest = next((i["digest"] for i in step["inputs"] if i.get("data_kind") == want), step["inputs"][0]["digest"])
            kind = "dvc md5"
        elif fallback in TAG_FILES and step["hashes"].get(fallback):
            path, digest = TAG_FILES[fallback], step["hashes"][fallback]
            kind = "dvc md5" if fallback.endswith("md5") else "sha256"
        else:
            digest, kind = None, None
        out[side] = {"name": name, "path": Path(path).as_posix(), "digest": digest, "kind": kind}
    return out


def lineage(client, ref: str) -> dict:
    mv, run_id = _resolve(client, ref)
    run = client.get_run(run_id)
    exps = [run.info.experiment_id]
    chain, problems, real_data, teacher = [], [], None, None
    while run is not None:
        step = _step(run)
        chain.append(step)
        tags = run.data.tags
        step["route"] = tags.get("kdpipe.route") if step["stage"] == "distill" else None
        real_route = step["stage"] == "distill" and tags.get("kdpipe.privacy") == "real-data" \
            and step["route"] in ("kd-real", "kd-mixed")
        if step["stage"] in DATA_FREE and not real_route:
            real = [i for i in step["inputs"] if i.get("data_kind") != "synthetic"]
            if real:
                problems.append(f"data-free stage '{step['stage']}' (run {run.info.run_id}) logged a non-synthetic "
                                f"data input: {', '.join(i['name'] + ' ' + str(i.get('data_kind')) for i in real)}")
        if tags.get("kdpipe.real_data") == "none":
            real_data = "none"
        if step["stage"] == "synthesize" and tags.get("teacher.source"):  # a teacher from its card: the chain's end
            step["teacher"] = {"source": tags["teacher.source"], "sha256": tags.get("teacher.sha256"),
                               "card": json.loads(tags.get("teacher.card", "{}"))}
            teacher = step["teacher"]
        step["artifacts"] = _artifacts(step)
        if step["stage"] not in UPSTREAM or teacher:
            break
        tag, producer = UPSTREAM[step["stage"]] if step["route"] != "kd-real" else ("teacher.sha256", "train-teacher")
        value = run.data.tags.get(tag)
        nxt = _find(client, exps, producer, tag, value) if value else None
        if nxt is None:
            problems.append(f"broken link: no finished '{producer}' run with {tag} = {value} "
                            f"(from {step['stage']} run {run.info.run_id})")
        run = nxt
    model, scores = None, []
    if mv is not None:
        model = {"name": mv.name, "version": str(mv.version), "aliases": sorted(getattr(mv, "aliases", []) or []),
                 "registered": _time(mv.creation_timestamp), "source": mv.source, "run_id": mv.run_id,
                 "onnx_sha256": mv.tags.get("onnx.sha256"), "tags": dict(mv.tags)}
        # the data owner's checks (kdpipe score) of this version, newest first
        for r in client.search_runs(exps, f"tags.`kdpipe.stage` = 'score' and tags.`kdpipe.scored_model` = "
                                    f"'{mv.name}/{mv.version}'", order_by=["attributes.start_time DESC"]):
            scores.append({"run_id": r.info.run_id, "metrics": dict(r.data.metrics), "data": r.data.params.get("data"),
                           "start": _time(r.info.start_time)})
    for consumer, producer in zip(chain, chain[1:]):  # linked by a digest tag: one artifact, one digest (the writer's)
        a, b = consumer.get("artifacts", {}).get("in"), producer.get("artifacts", {}).get("out")
        if a and b and a["name"] == b["name"] and b["digest"]:
            consumer["artifacts"]["in"] = dict(b)
    route = next((s["route"] for s in chain if s.get("route")), None)
    data = next((s["data"] for s in chain if s.get("data")), None)
    if data is None and chain and chain[0]["parent_run_id"]:  # runs logged before the kdpipe.data tag: the parent's params
        try:
            data = client.get_run(chain[0]["parent_run_id"]).data.params.get("data.name")
        except Exception:  # noqa: BLE001 - a deleted parent only costs the dataset's name
            data = None
    return {"ref": ref, "model": model, "chain": chain, "teacher": teacher, "real_data": real_data or "used",
            "data": "none" if real_data == "none" else data, "route": route or "data-free",
            "owner_scores": scores, "problems": problems, "ok": not problems}


# --- the text an auditor reads -------------------------------------------------------------------------------

def verdict(res: dict) -> str:
    bad = [c for c in res.get("verify", []) if not c["ok"]]
    if not res["ok"]:
        return "FAILED: " + ", ".join(x for x in (f"{len(res['problems'])} problem(s)" if res["problems"] else "",
                                                  f"{len(bad)} artifact(s) differ (verify)" if bad else "") if x) \
            + ", listed below"
    if res["route"] in ("kd-real", "kd-mixed"):
        return (f"route {res['route']}: distill trained on the real train split (kdpipe.privacy=real-data); "
                "synthesize logged synthetic inputs only")
    if res["real_data"] == "none":
        return "data-free, no real data anywhere: the teacher came as a file; every stage read synthetic data only"
    return "data-free: after train-teacher, synthesize and distill read synthetic data only"


def _short(d: str | None, n: int = 12) -> str:
    return "-" if not d else d[:n] + ("…" if len(d) > n else "")


def _commit(res: dict) -> str:
    commits = {(s["git_commit"], s["git_dirty"]) for s in res["chain"]}
    if len(commits) == 1:
        (c, dirty), = commits
        return f"{c or '?'} ({'DIRTY: uncommitted changes' if dirty else 'clean'})"
    return "several: " + ", ".join(f"{(c or '?')[:12]}{' dirty' if d else ''}" for c, d in sorted(commits, key=str))


def _results(res: dict) -> str:
    tags = (res["model"] or {}).get("tags", {})
    r = {k: float(tags[k]) for k in RESULTS if k in tags}
    if not r:
        return "-"
    parts = [f"{k.replace('_accuracy', '')} {r[k]:.4f}" for k in ("teacher_accuracy", "student_accuracy", "onnx_accuracy")
             if k in r]
    where = "real test split"
    if "fidelity_agreement" in r:
        parts = [f"student-teacher agreement {r['fidelity_agreement']:.4f}", f"KL {r.get('fidelity_kl', 0):.4f}"]
        where = "held-out synthetic set"
    if "max_abs_diff" in r:
        parts.append(f"ONNX |diff| {r['max_abs_diff']:.1e}")
    return "  ".join(parts) + f"  ({where})"


def _teacher_line(res: dict) -> str:
    t = res.get("teacher")
    if t:
        c = t["card"]
        hw = c.get("input_size") or []
        size = "x".join(str(v) for v in ([c.get("channels")] + (list(hw) if isinstance(hw, (list, tuple)) else [hw, hw]))
                        if v)
        return (f"{t['source']} sha256 {t['sha256']} (card: {size} {c.get('layout', '')} range {c.get('range')}, "
                f"{len(c.get('classes', []))} classes)")
    tt = next((s for s in res["chain"] if s["stage"] == "train-teacher"), None)
    if tt is None:
        return "-"
    arch = tt["params"].get("teacher.arch", "?")
    how = ("checkpoint " + tt["params"]["teacher.checkpoint"]) if tt["params"].get("teacher.checkpoint", "None") != "None" \
        else f"trained by train-teacher run {tt['run_id'][:8]}"
    return f"{arch}, {how}; data/teacher/model.pt sha256 {_short(tt['hashes'].get('teacher.sha256'), 16)}"


def _data_line(res: dict) -> str:
    if res["data"] == "none":
        return "none: no stage read real data (data.name: none)"
    tt = next((s for s in res["chain"] if s["stage"] == "train-teacher"), None)
    split = ""
    if tt and tt["inputs"]:
        split = f", prepared splits {paths.PREPARED.as_posix()} dvc md5 {_short(tt['inputs'][0]['digest'])}"
    used = "train-teacher" + (" and distill" if res["route"] in ("kd-real", "kd-mixed") else "")
    return f"{res['data'] or '?'}{split} (read by {used} only)"


def format_text(res: dict, verbose: bool = False) -> str:
    out = [f"lineage of {res['ref']}: {verdict(res)}"]
    m = res["model"]
    if m:
        aliases = ", ".join("@" + a for a in m["aliases"]) or "no alias"
        out.append(f"  model     {m['name']}/{m['version']} ({aliases}), registered {m['registered']}")
        if m["onnx_sha256"]:
            out.append(f"  file      model.onnx sha256 {m['onnx_sha256']} (what the registry serves)")
    out.append(f"  commit    {_commit(res)}")
    out.append(f"  data      {_data_line(res)}")
    out.append(f"  teacher   {_teacher_line(res)}")
    if m:
        out.append(f"  results   {_results(res)}")
    for sc in res.get("owner_scores", [])[:3]:
        mm = ", ".join(f"{k} {v:.4f}" for k, v in sorted(sc["metrics"].items()) if "accuracy" in k or "agreement" in k)
        out.append(f"  owner     score run {sc['run_id'][:8]} {sc['start'][:16]} on {sc['data']}: {mm}")
    out.append("  chain (newest first; digests: dvc md5 of DVC outputs, else sha256):")
    for s in res["chain"]:
        a = s.get("artifacts", {})
        io = "  ".join(f"{side} {x['name']} {_short(x['digest'], 10)}" for side, x in a.items())
        route = f" [{s['route']}]" if s.get("route") else ""
        out.append(f"    {s['stage']:<13} run {s['run_id'][:8]} {s['start'][:16].replace('T', ' ')}{route}  {io}")
        if verbose:
            out += _verbose_step(s)
    if verbose and res.get("teacher"):
        out.append(f"    teacher card {json.dumps(res['teacher']['card'])}")
    out += [f"  PROBLEM: {p}" for p in res["problems"]]
    for c in res.get("verify", []):
        out.append(f"  verify    {'ok      ' if c['ok'] else 'MISMATCH'} {c['artifact']}: {c['path']} {c['detail']}")
    if not verbose:
        out.append("  (--verbose: every hash and parameter; --verify: re-hash the registered model and the files)")
    return "\n".join(out)


def _verbose_step(s: dict) -> list[str]:
    pad = " " * 8
    lines = [f"{pad}run {s['run_id']}  commit {s['git_commit']}{' (dirty)' if s['git_dirty'] else ''}",
             f"{pad}params sha256 {s['params_sha256']}"
             + (f"  prefect flow run {s['prefect_flow_run_id']}" if s["prefect_flow_run_id"] else "")]
    for side, x in s.get("artifacts", {}).items():
        lines.append(f"{pad}{side:<4}{x['name']}: {x['path']} {x['kind'] or ''} {x['digest'] or '-'}")
    for k, v in s["hashes"].items():
        if not k.startswith("dvc.deps.kdpipe/"):
            lines.append(f"{pad}{k} = {v}")
    code = {k[len("dvc.deps."):]: v for k, v in s["hashes"].items() if k.startswith("dvc.deps.kdpipe/")}
    if code:
        lines += textwrap.wrap("code " + " ".join(f"{p}:{v[:8]}" for p, v in code.items()), width=118,
                               initial_indent=pad, subsequent_indent=pad + "  ", break_on_hyphens=False)
    for i in s["inputs"]:
        lines.append(f"{pad}input [{i.get('data_kind')}] {i['name']} digest {i['digest']} ({i.get('context')})")
    if s["params"]:
        lines += textwrap.wrap("params " + " ".join(f"{k}={v}" for k, v in s["params"].items()), width=118,
                               initial_indent=pad, subsequent_indent=pad + "  ", break_on_hyphens=False)
    return lines


# --- --verify: re-hash what the chain names -------------------------------------------------------------------

def _dir_changes(path: Path, recorded: str) -> str:
    """Which files of a DVC folder output differ from its recorded listing (the .dir object in DVC's cache)."""
    from kdpipe.utils import dvc_md5

    obj = Path(".dvc/cache/files/md5") / recorded[:2] / recorded[2:]
    if not obj.exists():
        return ""
    entries = {e["relpath"]: e["md5"] for e in json.loads(obj.read_text())}
    now = {f.relative_to(path).as_posix(): dvc_md5(f) for f in path.rglob("*") if f.is_file()}
    changed = sorted(p for p in entries.keys() | now.keys() if entries.get(p) != now.get(p))
    return f"; changed: {', '.join(changed[:5])}" if changed else ""


def verify(client, res: dict) -> list[dict]:
    """Re-hash the registered model (downloaded from the registry) and, in this working copy, every artifact
    the chain names: DVC outputs against their dvc.lock md5, other files against their sha256 tags."""
    from kdpipe.utils import dvc_md5, sha256_file

    checks = []
    m = res["model"]
    if m:
        from kdpipe.registry import served_sha256

        uri = f"models:/{m['name']}/{m['version']}"
        got = served_sha256(m["name"], m["version"], client.tracking_uri)
        ok = got is not None and got == m["onnx_sha256"]
        checks.append({"artifact": "registered model", "path": f"{uri} model.onnx", "ok": ok, "recorded":
                       m["onnx_sha256"], "found": got,
                       "detail": "sha256 matches" if ok else f"sha256 {_short(got)} != recorded {_short(m['onnx_sha256'])}"})
    wanted = {}  # path -> (kind, recorded): DVC outputs first, then sha256 tags of files no DVC output holds
    for s in res["chain"]:
        for key, recorded in s["hashes"].items():
            if key.startswith("dvc.outs."):
                wanted.setdefault(Path(key[len("dvc.outs."):]), ("dvc md5", recorded))
    outs = list(wanted)
    for s in res["chain"]:
        files = {"onnx.sha256": paths.EXPORT / "student.onnx", "student.sha256": paths.STUDENT / "model.pt",
                 "teacher.sha256": Path(res["teacher"]["source"]) if res.get("teacher") else paths.TEACHER / "model.pt"}
        for key, path in files.items():
            if s["hashes"].get(key) and not any(path == o or path.is_relative_to(o) for o in outs):
                wanted.setdefault(path, ("sha256", s["hashes"][key]))
    names = {Path(x["path"]): x["name"] for st in res["chain"] for x in st.get("artifacts", {}).values()}
    for path, (kind, recorded) in wanted.items():
        name = names.get(path) or NAMES.get(path.as_posix(), path.name)
        if not path.exists():
            checks.append({"artifact": name, "path": path.as_posix(), "ok": False, "recorded": recorded,
                           "found": None, "detail": "missing in this working copy (dvc pull / dvc checkout)"})
            continue
        got = dvc_md5(path) if kind == "dvc md5" else sha256_file(path)
        ok = got == recorded
        detail = f"{kind} matches" if ok else f"{kind} {_short(got)} != recorded {_short(recorded)}" + (
            _dir_changes(path, recorded) if path.is_dir() else "")
        checks.append({"artifact": name, "path": path.as_posix(), "ok": ok, "recorded": recorded, "found": got,
                       "detail": detail})
    return checks


# --- --html: the chain as a picture ----------------------------------------------------------------------------

def to_html(res: dict) -> str:
    """One self-contained HTML page: the header, the chain as an SVG graph (artifacts as boxes, runs as
    arrows), and a table of every digest."""
    items = []  # top to bottom: ("node", label, digest) boxes, ("edge", label) arrows between them
    m = res["model"]
    if m:
        items += [("node", f"registered model {m['name']}/{m['version']}", f"model.onnx sha256 {_short(m['onnx_sha256'], 16)}"),
                  ("edge", "registered by the export run")]
    for s in res["chain"]:
        a = s.get("artifacts", {})
        for side in ("out", "in"):
            x = a.get(side)
            if x is None:
                continue
            label = f"{x['name']}: {x['path']}"
            if not (items and items[-1][0] == "node" and items[-1][1] == label):
                if items and items[-1][0] == "node":
                    items.append(("edge", ""))
                items.append(("node", label, f"{x['kind'] or ''} {_short(x['digest'], 16)}"))
            if side == "out":
                items.append(("edge", f"written by {s['stage']} run {s['run_id'][:8]}" + (f" [{s['route']}]" if s.get("route") else "")))
    if items and items[-1][0] == "edge":
        items.pop()
    if res["data"] == "none":
        items += [("edge", ""), ("node", "no real data", "the teacher came as a file (teacher card)")]
    w, bh, gap = 620, 46, 40
    n = sum(1 for it in items if it[0] == "node")
    svg = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{n * (bh + gap)}" '
           'font-family="sans-serif" font-size="12">',
           '<defs><marker id="a" markerWidth="8" markerHeight="8" refX="4" refY="4" orient="auto">'
           '<path d="M0,0 L8,4 L0,8 z"/></marker></defs>']
    y = 0
    for it in items:
        if it[0] == "node":
            fill = "#fde2e2" if "real train" in it[1] else "#e3f0fb"
            svg.append(f'<rect x="10" y="{y}" width="{w - 20}" height="{bh}" rx="6" fill="{fill}" stroke="#345"/>'
                       f'<text x="20" y="{y + 18}" font-weight="bold">{html.escape(it[1])}</text>'
                       f'<text x="20" y="{y + 36}" font-family="monospace">{html.escape(it[2])}</text>')
            y += bh
        else:  # the arrow points up: from what a run read to what it wrote
            svg.append(f'<line x1="{w // 2}" y1="{y + gap}" x2="{w // 2}" y2="{y + 4}" stroke="#345" marker-end="url(#a)"/>'
                       f'<text x="{w // 2 + 10}" y="{y + gap // 2 + 4}">{html.escape(it[1])}</text>')
            y += gap
    svg.append("</svg>")
    rows = "".join(f"<tr><td>{html.escape(s['stage'])}</td><td>{html.escape(s['run_id'])}</td><td>{html.escape(k)}</td>"
                   f"<td><code>{html.escape(v)}</code></td></tr>" for s in res["chain"] for k, v in s["hashes"].items())
    checks = "".join(f"<li>{'ok' if c['ok'] else '<b>MISMATCH</b>'} {html.escape(c['artifact'])}: "
                     f"{html.escape(c['path'])} {html.escape(c['detail'])}</li>" for c in res.get("verify", []))
    head = html.escape(format_text({**res, "verify": []}).split("  chain (")[0])
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>kdpipe lineage {html.escape(res['ref'])}</title>"
            f"</head><body><h1>kdpipe lineage: {html.escape(res['ref'])}</h1><pre>{head}</pre>"
            f"<p>Arrows point from what a run read to what it wrote.</p>{''.join(svg)}"
            + (f"<h2>verify</h2><ul>{checks}</ul>" if checks else "")
            + f"<h2>every digest</h2><table border='1' cellspacing='0'>{rows}</table></body></html>")


def main(ref: str, uri: str, as_json: bool = False, verbose: bool = False, verify_files: bool = False,
         html_path: str | None = None) -> int:
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    client = MlflowClient(tracking_uri=uri)
    try:
        res = lineage(client, ref)
        if verify_files:
            res["verify"] = verify(client, res)
            res["ok"] = res["ok"] and all(c["ok"] for c in res["verify"])
    except (LineageError, MlflowException) as e:
        print(f"kdpipe lineage: {ref}: {e}", flush=True)
        return 1
    if html_path:
        from kdpipe.utils import atomic_path

        with atomic_path(Path(html_path)) as tmp:
            tmp.write_text(to_html(res))
        if res["model"]:  # beside the model, in its export run
            client.log_artifact(res["model"]["run_id"], html_path, "lineage")
    print(json.dumps(res, indent=2) if as_json else format_text(res, verbose), flush=True)
    return 0 if res["ok"] else 1
