"""bench/peer.py's own arithmetic: the budget plan's wall model and the per-budget table (no Fast-Datafree, no
teacher: those runs live outside the repository, docs/peer.md)."""
import importlib.util
import json
import types
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def peer():
    spec = importlib.util.spec_from_file_location("peer", ROOT / "bench" / "peer.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_distill_wall_fit_recovers_the_per_image_and_per_epoch_costs(peer):
    """distill_s = a + c·kept + b·kept·epochs: exact points give back (a, c, b); the plan then fits the budget."""
    a, c, b = 2.0, 0.007, 0.0016
    pts = [[k, e, a + c * k + b * k * e] for k, e in ((256, 1), (768, 2), (5000, 20), (18816, 4), (5000, 18))]
    fa, fc, fb = peer._fit_distill(pts)
    assert (fa, fc, fb) == pytest.approx((a, c, b), rel=1e-6, abs=1e-6)


def test_plan_fits_rounds_and_epochs_to_the_budget(peer, tmp_path):
    """With synthesize_s = 5·R and distill_s = 0.007·kept + 0.0016·kept·E, a 900 s budget at share 0.8 gives
    R = 144 rounds and the most epochs that fit the remaining 180 s; the capacity shares the cache (same key)."""
    preset = {"synthesize": {"batch_size": 128, "capacity": 5000}, "distill": {"augment": True}}
    big = {**preset, "synthesize": {"batch_size": 128, "capacity": 20000}}
    assert peer.calib_key(preset, 1) == peer.calib_key(big, 1) != peer.calib_key(preset, 2)
    cal = {"synth": [[2, 10.0, 5000], [6, 30.0, 5000]],
           "distill": [[k, e, 0.007 * k + 0.0016 * k * e] for k, e in ((256, 1), (768, 2), (5000, 3))], "source": []}
    (tmp_path / f"calib-{peer.calib_key(preset, 1)}.json").write_text(json.dumps(cal))
    a = types.SimpleNamespace(work=str(tmp_path), threads=1, synth_share=0.8, calib_rounds="2,6")
    plan, _ = peer.kdpipe_plan(a, None, preset, 900.0)
    assert plan["rounds"] == 144 and plan["kept_planned"] == 5000 and plan["epochs"] == 18  # (180 − 35) / 8
    plan, _ = peer.kdpipe_plan(a, None, big, 900.0)  # no 20,000 points: the 5,000 ones
    assert plan["rounds"] == 144 and plan["kept_planned"] == 18432 and plan["epochs"] == 1


def test_plan_without_a_cache_calibrates_with_two_projects_and_caches_them(peer, tmp_path, monkeypatch):
    """No cache for this preset: two calibration projects (R1, R2 rounds with 1 and 2 distill epochs), named by the
    cache key, their walls written to the cache, and the plan fitted from them."""
    preset = {"synthesize": {"batch_size": 128, "capacity": 5000}}
    made = []

    def project(a, tdir, proj, pre, extra):  # the walls of synthesize_s = 5·R, distill_s = 0.0016·kept·E
        made.append((proj.name, extra))
        r, e = extra["synthesize"]["rounds"], extra["distill"]["epochs"]
        return {"stage_s": {"synthesize": 5.0 * r, "distill": 0.0016 * min(5000, r * 128) * e}}

    monkeypatch.setattr(peer, "kdpipe_project", project)
    a = types.SimpleNamespace(work=str(tmp_path), threads=1, synth_share=0.8, calib_rounds="2,6")
    plan, cache = peer.kdpipe_plan(a, None, preset, 900.0)
    key = peer.calib_key(preset, 1)
    assert [m[0] for m in made] == [f"calib-{key}-r2", f"calib-{key}-r6"] and cache.name == f"calib-{key}.json"
    assert json.loads(cache.read_text())["synth"] == [[2, 10.0, 5000], [6, 30.0, 5000]]
    assert plan["rounds"] == 144 and plan["epochs"] == 22  # 180 / (0.0016 · 5000)
    made.clear()
    assert peer.kdpipe_plan(a, None, preset, 900.0)[0]["rounds"] == 144 and not made  # the cache, no new project


def test_table_reads_val_everywhere_and_test_only_where_asked(peer, capsys):
    """The recorded rows print per budget; a configuration not named in --test shows 'not read' for test."""
    peer.table(types.SimpleNamespace(test="b15-tuned"))
    out = capsys.readouterr().out
    assert "15 minutes" in out and "| kdpipe | b15-tuned | 0 | 0.6236 | 0.6264 (0.759)" in out
    assert "| kdpipe | b15-nayer | 0 | 0.6380 | not read |" in out
    assert "| fast | b15-tuned | mean of 2 | 0.2068, spread 0.0928 | **0.2014** (0.244), spread 0.0940 | | |" in out
