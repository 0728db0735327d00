"""``kdpipe promote``: move alias ``promote.alias`` (champion) to a registered student version only when the
evaluate metrics the export stage wrote on that version (its tags) pass the gate in params.yaml (``promote:``).

    kdpipe promote [kdpipe-student | kdpipe-student/3 | kdpipe-student@candidate] [--config F] [--set promote.K=V]

The rule, top to bottom (docs/promote.md):
1. The version: ``name/version``, ``name@alias``, or ``name`` alone (= ``name@<tracking.alias>``, i.e. candidate);
   no ref = ``tracking.registered_model@tracking.alias``. An unknown model, version or alias is exit 2, and so is
   a gate with every threshold null (it would pass anything) or ``promote.alias`` equal to ``tracking.alias``.
2. The route: a version with a ``fidelity_agreement`` tag was evaluated without real data (data.name: none); one
   with ``student_accuracy`` on the real test split; one with neither carries no evaluate metrics: refused.
3. The checks, each threshold that is not null and belongs to the version's route:
     real data:    student_accuracy >= min_student_accuracy
                   student_accuracy / teacher_accuracy >= min_student_over_teacher
     no real data: fidelity_agreement >= min_fidelity_agreement
     both:         max_abs_diff (ONNX vs PyTorch logits) <= max_onnx_abs_diff
   A threshold whose metric the version does not carry fails (unrecorded is not a pass); a threshold of the other
   route is reported as not applicable; a route none of whose thresholds is set is refused.
4. The decision is recorded whether it passes or not: one MLflow run per decision in ``tracking.experiment``
   (run name ``promote``, tags ``kdpipe.stage=promote``, ``promotion.model``, ``promotion.version``,
   ``promotion.decision``, ``promotion.reason``, ``promotion.route``, ``promotion.previous``; params
   ``promote.<key>`` = the gate; metrics = the values checked): the history; and on the version the latest
   decision as tags ``promotion.decision`` (promoted|refused), ``promotion.reason``, ``promotion.checked_at`` (UTC
   ISO 8601), ``promotion.alias``, ``promotion.route``, ``promotion.gate`` (JSON), ``promotion.run_id``
   (``kdpipe lineage --json`` shows them with the model's tags).
5. Pass: the alias moves to the version (exit 0). Refused: the alias stays where it was, every failed metric is
   printed with its value and threshold (exit 1).
"""
from __future__ import annotations

import json
import math
import re
import sys
from datetime import datetime, timezone

from kdpipe.config import Config, ConfigError

THRESHOLDS = ("min_student_accuracy", "min_fidelity_agreement", "min_student_over_teacher", "max_onnx_abs_diff")
ROUTE = {"min_student_accuracy": "real", "min_student_over_teacher": "real", "min_fidelity_agreement": "none",
         "max_onnx_abs_diff": None}  # None: any route
ROUTE_NAME = {"real": "real data", "none": "no real data"}


def _number(tags: dict, key: str) -> float | None:
    try:
        v = float(tags[key])
    except (KeyError, TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def _check(key: str, limit: float, tags: dict) -> dict:
    """One threshold against the version's tags: {key, metric, value, limit, op, ok, text}."""
    if key == "min_student_over_teacher":
        s, t = _number(tags, "student_accuracy"), _number(tags, "teacher_accuracy")
        metric, value = "student_over_teacher", (s / t if s is not None and t else None)
    else:
        metric = {"min_student_accuracy": "student_accuracy", "min_fidelity_agreement": "fidelity_agreement",
                  "max_onnx_abs_diff": "max_abs_diff"}[key]
        value = _number(tags, metric)
    op = "<=" if key.startswith("max_") else ">="
    if value is None:
        return {"key": key, "metric": metric, "value": None, "limit": limit, "op": op, "ok": False,
                "text": f"{metric} not recorded on the version (promote.{key} {limit:g})"}
    ok = value <= limit if op == "<=" else value >= limit
    shown = op if ok else {"<=": ">", ">=": "<"}[op]
    return {"key": key, "metric": metric, "value": value, "limit": limit, "op": op, "ok": ok,
            "text": f"{metric} {value:.6g} {shown} promote.{key} {limit:g}"}


def promote(cfg: Config, ref: str | None, uri: str) -> int:
    """Judge the version ``ref`` names against ``cfg.promote``, record the decision, move the alias on a pass.
    Returns 0 (promoted) or 1 (refused); ConfigError (exit 2) for a bad gate or an unknown model/version/alias."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    from kdpipe.provenance import git_state
    from kdpipe.tracking import check_tracking, setup_mlflow

    gate, alias = cfg.promote, cfg.promote.alias
    limits = {k: getattr(gate, k) for k in THRESHOLDS if getattr(gate, k) is not None}
    if not limits:
        raise ConfigError("promote: every threshold (promote." + ", promote.".join(THRESHOLDS) + ") is null: a gate "
                          "that checks nothing would promote anything; set at least one")
    if not re.fullmatch(r"[A-Za-z0-9_-]+", alias) or re.fullmatch(r"[vV]\d+", alias) or alias == "latest":
        raise ConfigError(f"promote.alias '{alias}' is not a valid MLflow alias (letters, digits, _ and -; "
                          "not 'latest' or v<number>)")
    if alias == cfg.tracking.alias:
        raise ConfigError(f"promote.alias '{alias}' is tracking.alias, the one export moves to every new version: "
                          "use another name (default: champion)")

    # 1. the version
    if ref is None:
        if not cfg.tracking.registered_model or not cfg.tracking.alias:
            raise ConfigError("kdpipe promote: name the version (model/version or model@alias): tracking.registered_"
                              "model or tracking.alias is null")
        ref = f"{cfg.tracking.registered_model}@{cfg.tracking.alias}"
    elif "@" not in ref and "/" not in ref:
        if not cfg.tracking.alias:
            raise ConfigError(f"kdpipe promote: '{ref}': name the version ({ref}/<version> or {ref}@<alias>): "
                              "tracking.alias is null")
        ref = f"{ref}@{cfg.tracking.alias}"
    check_tracking(cfg)
    client = MlflowClient(tracking_uri=uri)
    try:
        if "@" in ref:
            name, by = ref.split("@", 1)
            mv = client.get_model_version_by_alias(name, by)
        else:
            name, version = ref.rsplit("/", 1)
            mv = client.get_model_version(name, version)
        current = client.get_registered_model(name).aliases.get(alias)  # the alias's version now (an int), or None
        current = None if current is None else str(current)
    except MlflowException as e:
        raise ConfigError(f"kdpipe promote: '{ref}' in {uri}: {e.message}") from None
    tags, label = dict(mv.tags), f"{mv.name}/{mv.version}"

    # 2. the route; 3. the checks
    route = "none" if "fidelity_agreement" in tags else "real" if "student_accuracy" in tags else None
    checks = [_check(k, v, tags) for k, v in limits.items() if route and ROUTE[k] in (None, route)]
    skipped = [k for k in limits if route and ROUTE[k] not in (None, route)]
    failed = [c for c in checks if not c["ok"]]
    if route is None:
        reason = "the version carries no evaluate metrics (no student_accuracy or fidelity_agreement tag)"
    elif not checks:
        reason = f"no threshold of the {ROUTE_NAME[route]} route is set (promote: all null for it)"
    elif failed:
        reason = "; ".join(c["text"] for c in failed)
    else:
        reason = f"{len(checks)} check(s) passed: " + "; ".join(c["text"] for c in checks)
    ok = route is not None and bool(checks) and not failed
    decision = "promoted" if ok else "refused"

    # 4. the record: one run per decision (history) ...
    mlflow = setup_mlflow(cfg)  # the experiment (created like the stages create it)
    exp = mlflow.get_experiment_by_name(cfg.tracking.experiment).experiment_id
    run = client.create_run(exp, run_name="promote", tags={
        "kdpipe.stage": "promote", "kdpipe.params_sha256": cfg.digest(), **git_state(), "promotion.model": mv.name,
        "promotion.version": mv.version, "promotion.decision": decision, "promotion.reason": reason[:4900],
        "promotion.route": route or "unknown", "promotion.alias": alias, "promotion.previous": current or "none",
        "promotion.source_run_id": mv.run_id or ""})
    rid = run.info.run_id
    from mlflow.entities import Metric, Param

    now_ms = int(datetime.now(timezone.utc).timestamp() * 1000)
    client.log_batch(rid, metrics=[Metric(c["metric"], c["value"], now_ms, 0) for c in checks if c["value"] is not None],
                     params=[Param(f"promote.{k}", str(getattr(gate, k))) for k in ("alias", *THRESHOLDS)])
    status = "FAILED"
    try:
        # 5. the alias, on a pass
        if ok:
            client.set_registered_model_alias(mv.name, alias, mv.version)
        # ... and the latest decision on the version
        version_tags = {"promotion.decision": decision, "promotion.reason": reason[:4900],
                        "promotion.checked_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                        "promotion.alias": alias, "promotion.route": route or "unknown", "promotion.run_id": rid,
                        "promotion.gate": json.dumps({k: getattr(gate, k) for k in THRESHOLDS})}
        for k, v in version_tags.items():
            client.set_model_version_tag(mv.name, mv.version, k, v)
        status = "FINISHED"
    finally:
        client.set_terminated(rid, status)

    print(f"kdpipe promote: {label} ({ROUTE_NAME.get(route, 'no evaluate metrics')}), gate promote.* -> {alias}",
          flush=True)
    for c in checks:
        print(f"  {'ok  ' if c['ok'] else 'FAIL'}  {c['text']}", flush=True)
    for k in skipped:
        print(f"  n/a   promote.{k} ({ROUTE_NAME[ROUTE[k]]} route only)", flush=True)
    if ok:
        was = "" if current is None else f" (was {current})" if current != mv.version else " (already there)"
        print(f"promoted: {mv.name}@{alias} -> version {mv.version}{was}; recorded in run {rid} and the version's "
              "promotion.* tags", flush=True)
        return 0
    print(f"kdpipe: promote refused {label}: {reason}; {mv.name}@{alias} stays "
          f"{'unset' if current is None else f'on version {current}'} (recorded in run {rid})", file=sys.stderr,
          flush=True)
    return 1
