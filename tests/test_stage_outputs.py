"""What the stages leave behind: a failed ONNX check keeps the previous export; a same-input synthesize re-run
writes the same DVC output (timings live outside it)."""
from __future__ import annotations

import pytest
import yaml

from conftest import tiny_params
from kdpipe import paths
from kdpipe.cli import main
from kdpipe.utils import dvc_md5, sha256_file


@pytest.fixture
def tiny_run(in_tmp):
    p = tiny_params()
    p["tracking"]["enabled"] = False
    p["baseline"]["enabled"] = False
    (in_tmp / "params.yaml").write_text(yaml.safe_dump(p))
    for stage in ("prepare", "train-teacher", "baseline", "synthesize", "distill", "evaluate", "export"):
        assert main([stage]) == 0
    return in_tmp


def test_failed_onnx_check_keeps_the_previous_export(tiny_run, capsys):
    before = sha256_file(paths.EXPORT / "student.onnx"), (paths.EXPORT / "metrics.json").read_text()
    assert main(["export", "--set", "export.atol=1e-12", "--set", "export.int8=false"]) == 1
    err = capsys.readouterr().err
    assert "onnxruntime differs from PyTorch by" in err and "export.atol 1e-12" in err and "was not replaced" in err
    assert (sha256_file(paths.EXPORT / "student.onnx"), (paths.EXPORT / "metrics.json").read_text()) == before
    assert not [f for f in paths.EXPORT.iterdir() if f.name.endswith(".tmp")]


def test_same_input_synthesize_rerun_keeps_its_dvc_md5(tiny_run):
    first = dvc_md5(paths.SYNTHETIC)
    timing = (paths.TIMINGS / "synthesize.json").read_text()
    assert main(["synthesize"]) == 0
    assert dvc_md5(paths.SYNTHETIC) == first  # downstream stages stay cached under dvc repro
    assert "wall_s" in timing and "wall_s" not in (paths.SYNTHETIC / "meta.json").read_text()


def test_jitter_is_off_by_default_and_changes_synthesis_when_on(tiny_run):
    """synthesize.jitter = 0 draws nothing (the default's bits are the same as before the key existed);
    > 0 shifts what the teacher sees, so the generator and the set it writes change."""
    base = dvc_md5(paths.SYNTHETIC)
    assert main(["synthesize", "--set", "synthesize.jitter=0"]) == 0
    assert dvc_md5(paths.SYNTHETIC) == base
    assert main(["synthesize", "--set", "synthesize.jitter=0.25"]) == 0
    assert dvc_md5(paths.SYNTHETIC) != base
