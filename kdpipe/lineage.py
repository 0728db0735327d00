"""``kdpipe lineage``: from a registered student (or any stage run) back to the data, for an auditor.

    kdpipe lineage kdpipe-student | kdpipe-student/3 | kdpipe-student@candidate | <run-id>  [--json]

The chain, each link read from MLflow (tags written by the stages, see kdpipe/tracking.py):
  model version → its export run → distill run (same ``student.sha256``) → synthetic data version
  (distill's dataset input, digest = DVC md5 of data/synthetic) → synthesize run (same
  ``synthetic.sha256``) → teacher run (same ``teacher.sha256``; a bring-your-own checkpoint shows its
  hash) → teacher data digest (the teacher run's real-data input).
Every step shows its run, git commit and dirty flag, params hash, Prefect flow run, dvc.lock hashes.
Exit 1, naming the run, if a data-free stage (synthesize, distill) logged a real-data input, or if a
link is missing. A distill run on a real-data route (distill.data real|mixed: tags ``kdpipe.route``
kd-real|kd-mixed and ``kdpipe.privacy`` real-data) may log the real train split: the chain shows its
route instead; kd-real links straight to the teacher run (no synthetic set).
"""
from __future__ import annotations

import json
import re
from datetime import datetime, timezone

DATA_FREE = ("synthesize", "distill")
# stage -> (tag that names what it consumed, the stage that produced it)
UPSTREAM = {
    "export": ("student.sha256", "distill"),
    "evaluate": ("student.sha256", "distill"),
    "distill": ("synthetic.sha256", "synthesize"),
    "synthesize": ("teacher.sha256", "train-teacher"),
}
SECTION = {"train-teacher": "teacher.", "synthesize": "synthesize.", "distill": "distill.", "export": "export."}


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
    if not mv.run_id:
        raise LineageError(f"model version {mv.name}/{mv.version} has no source run")
    return mv, mv.run_id


def _step(run) -> dict:
    tags, info = run.data.tags, run.info
    stage = tags.get("kdpipe.stage", "?")
    return {
        "stage": stage,
        "run_id": info.run_id,
        "status": info.status,
        "start": datetime.fromtimestamp(info.start_time / 1000, timezone.utc).isoformat(timespec="seconds"),
        "git_commit": tags.get("git.commit"),
        "git_dirty": tags.get("git.dirty"),
        "params_sha256": tags.get("kdpipe.params_sha256"),
        "parent_run_id": tags.get("mlflow.parentRunId"),
        "prefect_flow_run_id": tags.get("prefect.flow_run_id"),
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
            break
        if step["stage"] not in UPSTREAM:
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
        model = {"name": mv.name, "version": mv.version, "aliases": list(getattr(mv, "aliases", []) or []),
                 "source": mv.source, "run_id": mv.run_id, "tags": dict(mv.tags)}
        # the data owner's checks (kdpipe score) of this version, newest first
        for r in client.search_runs(exps, f"tags.`kdpipe.stage` = 'score' and tags.`kdpipe.scored_model` = "
                                    f"'{mv.name}/{mv.version}'", order_by=["attributes.start_time DESC"]):
            scores.append({"run_id": r.info.run_id, "metrics": dict(r.data.metrics), "data": r.data.params.get("data"),
                           "start": _step(r)["start"]})
    return {"ref": ref, "model": model, "chain": chain, "teacher": teacher, "real_data": real_data or "used",
            "owner_scores": scores, "problems": problems, "ok": not problems}


def format_text(res: dict) -> str:
    out = [f"lineage of {res['ref']}"]
    if res["model"]:
        m = res["model"]
        metrics = ", ".join(f"{k}={v}" for k, v in sorted(m["tags"].items()) if k != "run_id")
        out.append(f"  model      {m['name']}/{m['version']} aliases {m['aliases'] or '-'}  source {m['source']}")
        out.append(f"             {metrics}")
    for s in res["chain"]:
        commit = (s["git_commit"] or "?")[:12] + (" (dirty)" if s["git_dirty"] == "True" else "")
        out.append(f"  {s['stage']:<10} run {s['run_id']}  {s['start']}  commit {commit}  "
                   f"params {str(s['params_sha256'])[:12]}" + (f"  prefect {s['prefect_flow_run_id']}"
                                                               if s["prefect_flow_run_id"] else "")
                   + (f"  route {s['route']}" if s.get("route") else ""))
        for k, v in s["hashes"].items():
            out.append(f"             {k} = {v}")
        for i in s["inputs"]:
            out.append(f"             input [{i.get('data_kind')}] {i['name']} digest {i['digest']} ({i.get('context')})")
        if s["params"]:
            out.append("             " + " ".join(f"{k}={v}" for k, v in s["params"].items()))
    if res.get("teacher"):
        t = res["teacher"]
        card = {k: v for k, v in t["card"].items() if k in ("input_size", "channels", "layout", "range", "mean", "std",
                                                           "loader")}
        out.append(f"  teacher    {t['source']}  sha256 {t['sha256']}  (a teacher card: no train-teacher run)")
        out.append(f"             card {json.dumps(card)}, {len(t['card'].get('classes', []))} classes")
    if res.get("real_data") == "none":
        out.append("  real data  none: no real data was used by any stage (data.name: none)")
    for sc in res.get("owner_scores", []):
        m = ", ".join(f"{k}={v:.4f}" for k, v in sorted(sc["metrics"].items()))
        out.append(f"  owner score run {sc['run_id']}  {sc['start']}  on {sc['data']}: {m}")
    route = next((s["route"] for s in res["chain"] if s.get("route")), None)
    if res["ok"] and route in ("kd-real", "kd-mixed"):
        out.append(f"  route {route}: distill trained on the real train split (kdpipe.privacy=real-data); "
                   "synthesize logged synthetic inputs only")
    elif res["ok"]:
        out.append("  data-free check: OK (synthesize and distill logged synthetic inputs only)")
    out += [f"  PROBLEM: {p}" for p in res["problems"]]
    return "\n".join(out)


def main(ref: str, uri: str, as_json: bool = False) -> int:
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    try:
        res = lineage(MlflowClient(tracking_uri=uri), ref)
    except (LineageError, MlflowException) as e:
        print(f"kdpipe lineage: {ref}: {e}", flush=True)
        return 1
    print(json.dumps(res, indent=2) if as_json else format_text(res), flush=True)
    return 0 if res["ok"] else 1
