"""Checkpoints are data, never code: torch.load(weights_only=True) refuses a pickle that carries code."""
import os
import pickle

import pytest
import torch

from kdpipe.models import build_model
from kdpipe.utils import load_torch, save_torch

SPEC = {"arch": "digits_cnn_small", "num_classes": 10, "classes": [str(i) for i in range(10)],
        "in_channels": 1, "image_size": 8, "mean": [0.3], "std": [0.4]}


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_crafted_pickle_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    f = tmp_path / "model.pt"
    f.write_bytes(pickle.dumps({"w": _Evil()}))
    with pytest.raises(pickle.UnpicklingError):
        load_torch(f)
    assert not (tmp_path / "pwned").exists()


def test_state_dict_roundtrip_is_atomic(tmp_path):
    m = build_model(SPEC)
    save_torch(m.state_dict(), tmp_path / "m.pt")
    assert [p.name for p in tmp_path.iterdir()] == ["m.pt"]  # no temp file left behind
    m2 = build_model(SPEC)
    m2.load_state_dict(load_torch(tmp_path / "m.pt"))
    x = torch.rand(3, 1, 8, 8)
    m.eval(), m2.eval()
    assert torch.equal(m(x), m2(x))


def _prepared(tmp_path):
    from kdpipe import data
    from kdpipe.config import load_config

    data.prepare(load_config(None, []))


def test_bring_your_own_teacher_state_dict(tmp_path, monkeypatch):
    from kdpipe.config import load_config
    from kdpipe.stages import train_teacher
    from kdpipe.tracking import Tracker

    monkeypatch.chdir(tmp_path)
    _prepared(tmp_path)
    from kdpipe import data

    spec = {**SPEC, "arch": "digits_cnn", "mean": data.load_meta()["mean"], "std": data.load_meta()["std"]}
    mine = build_model(spec)
    save_torch(mine.state_dict(), tmp_path / "mine.pt")
    out = train_teacher.run(load_config(None, [f"teacher.checkpoint={tmp_path / 'mine.pt'}"]), Tracker())
    assert "byo" in out
    saved = load_torch(tmp_path / "data/teacher/model.pt")
    assert all(torch.equal(saved[k], v) for k, v in mine.state_dict().items())


def test_mismatched_checkpoint_names_the_keys(tmp_path, monkeypatch):
    from kdpipe.config import ConfigError, load_config
    from kdpipe.stages import train_teacher
    from kdpipe.tracking import Tracker

    monkeypatch.chdir(tmp_path)
    _prepared(tmp_path)
    save_torch(build_model(SPEC).state_dict(), tmp_path / "student.pt")  # digits_cnn_small, not digits_cnn
    with pytest.raises(ConfigError, match=r"does not fit teacher.arch: missing keys \['net.10"):
        train_teacher.run(load_config(None, [f"teacher.checkpoint={tmp_path / 'student.pt'}"]), Tracker())
    assert not (tmp_path / "data/teacher").exists()
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ConfigError, match="not a loadable weights-only checkpoint"):
        train_teacher.run(load_config(None, [f"teacher.checkpoint={tmp_path / 'junk.pt'}"]), Tracker())
