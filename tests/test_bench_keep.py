"""bench/keep.py: one synthesis gives both kept sets, and the buffer it saves is exactly what a ``keep: buffer``
synthesize stage writes (digits, 24 rounds: the buffer of 4,096 has evicted, so the two sets differ)."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SETS = ["--set", "synthesize.rounds=24", "--set", "distill.epochs=2"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


@pytest.mark.slow
def test_keep_bench_scores_both_sets_and_saves_the_buffer_the_stage_writes(tmp_path):
    work, out = tmp_path / "w", tmp_path / "keep.json"
    subprocess.run([sys.executable, str(ROOT / "bench" / "keep.py"), "--config", str(ROOT / "params.yaml"), *SETS,
                    "--workdir", str(work), "--seed", "0", "--out", str(out)], check=True, env=ENV, cwd=tmp_path)
    res = json.loads(out.read_text())
    rows = {r["keep"]: r for r in res["rows"]}
    assert set(rows) == {"reservoir", "buffer"} and res["seed"] == 0
    for r in rows.values():
        assert r["split"] == "val" and 0.0 < r["student_val"] <= 1.0
        assert (r["kept"], r["synthesized"]) == (4096, 24 * 256)
    # the balanced buffer is flatter than a uniform sample of the stream
    assert rows["buffer"]["hist_max"] - rows["buffer"]["hist_min"] < rows["reservoir"]["hist_max"] - rows["reservoir"]["hist_min"]

    # the same seed with keep: buffer, the stage alone, from the same prepared data and teacher
    ref = tmp_path / "ref"
    (ref / "data").mkdir(parents=True)
    for d in ("prepared", "teacher"):
        shutil.copytree(work / "data" / d, ref / "data" / d)
    code = ("from kdpipe.config import load_config; from kdpipe.stages import run_stage; "
            f"run_stage('synthesize', load_config({str(ROOT / 'params.yaml')!r}, {['tracking.enabled=false', 'baseline.enabled=false', 'synthesize.rounds=24', 'synthesize.keep=buffer', 'seed=0']!r}))")
    subprocess.run([sys.executable, "-c", code], check=True, env=ENV, cwd=ref)
    a = torch.load(work / "keep-buffer-samples.pt", weights_only=True)
    b = torch.load(ref / "data" / "synthetic" / "samples.pt", weights_only=True)
    assert torch.equal(a["x"], b["x"]) and torch.equal(a["logits"], b["logits"])
