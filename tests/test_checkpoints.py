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
