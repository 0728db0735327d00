"""The baseline (student from scratch on real data) runs only where the real data may be used."""
import json

import pytest

from kdpipe.config import load_config
from kdpipe.stages import baseline
from kdpipe.tracking import Tracker


@pytest.mark.parametrize("override, reason", [("data.private=true", "data.private"),
                                              ("baseline.enabled=false", "baseline.enabled: false")])
def test_baseline_skipped(in_tmp, override, reason):
    out = baseline.run(load_config(None, [override]), Tracker())
    assert out == {"enabled": False, "reason": reason}
    spec = json.loads((in_tmp / "data/baseline/spec.json").read_text())
    assert spec["enabled"] is False
    assert not (in_tmp / "data/baseline/model.pt").exists()


def test_baseline_resumes_after_a_kill(in_tmp, monkeypatch, capsys):
    """baseline resumes like train-teacher: stopped right after its first resume checkpoint, the next run
    continues from it and writes the same weights as an uninterrupted run; the checkpoint is then removed."""
    import torch

    from kdpipe import data
    from kdpipe.utils import load_torch
    from test_checkpoints import Killed, killed_after_first_checkpoint

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        cfg = load_config(None, ["baseline.epochs=3", "resume.every=1"])
        data.prepare(cfg)
        ckpt, out = in_tmp / "data/.resume/baseline.pt", in_tmp / "data/baseline/model.pt"
        baseline.run(cfg, Tracker())
        reference = load_torch(out)
        assert not ckpt.exists()
        out.unlink()

        restore = killed_after_first_checkpoint(monkeypatch)
        with pytest.raises(Killed):
            baseline.run(cfg, Tracker())
        restore()
        assert load_torch(ckpt)["done"] == 1 and not out.exists()
        capsys.readouterr()
        baseline.run(cfg, Tracker())
        assert "baseline: resumed from data/.resume/baseline.pt after epoch 1" in capsys.readouterr().out
        assert not ckpt.exists()
        got = load_torch(out)
        assert got.keys() == reference.keys() and all(torch.equal(v, reference[k]) for k, v in got.items())
    finally:
        torch.set_num_threads(n)
