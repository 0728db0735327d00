"""Real data routes: digits (embedded), ImageFolder, torchvision offline; seeded stratified splits."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from kdpipe import data
from kdpipe.config import load_config


def _cfg(*overrides):
    return load_config(None, list(overrides))


def _folder(root, classes=("a", "b", "c"), n=12, size=(10, 10), mode="L"):
    rng = np.random.default_rng(0)
    for c in classes:
        (root / "train" / c).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            shape = (size[1], size[0]) + (() if mode == "L" else (3,))
            Image.fromarray(rng.integers(0, 255, shape, dtype=np.uint8), mode).save(root / "train" / c / f"{i}.png")
    return root


def test_digits_split_is_stratified_and_seeded(in_tmp):
    meta = data.prepare(_cfg())
    s = meta["splits"]
    assert meta["channels"] == 1 and meta["image_size"] == 8 and len(meta["classes"]) == 10
    assert s["train"]["n"] + s["val"]["n"] + s["test"]["n"] == 1797
    assert s["test"]["n"] == 360  # 20 %
    # stratified: every class's share of the test split within 1 sample of its share overall
    total = np.array(s["train"]["counts"]) + np.array(s["val"]["counts"]) + np.array(s["test"]["counts"])
    assert np.all(np.abs(np.array(s["test"]["counts"]) - total * 360 / 1797) <= 1.0)
    again = data.prepare(_cfg())
    assert again["splits"]["test"]["sha256"] == s["test"]["sha256"]
    other = data.prepare(_cfg("seed=1"))
    assert other["splits"]["test"]["sha256"] != s["test"]["sha256"]
    x, y = data.load_split("test")
    assert x.dtype == torch.float32 and 0 <= x.min() and x.max() <= 1 and len(y) == 360


def test_imagefolder_route_carves_splits_and_resizes(in_tmp):
    _folder(in_tmp / "imgs")
    meta = data.prepare(_cfg("data.name=imagefolder", f"data.root={in_tmp / 'imgs'}", "data.image_size=8"))
    assert meta["classes"] == ["a", "b", "c"] and meta["channels"] == 1 and meta["image_size"] == 8
    assert sum(v["n"] for v in meta["splits"].values()) == 36
    assert all(min(v["counts"]) >= 1 for v in meta["splits"].values())
    x, _ = data.load_split("train")
    assert x.shape[1:] == (1, 8, 8)
    assert json.loads((in_tmp / "data/prepared/meta.json").read_text())["name"] == "imagefolder"


def test_imagefolder_rgb(in_tmp):
    _folder(in_tmp / "rgb", mode="RGB")
    meta = data.prepare(_cfg("data.name=imagefolder", f"data.root={in_tmp / 'rgb'}"))
    assert meta["channels"] == 3 and meta["image_size"] == 10 and len(meta["mean"]) == 3


@pytest.mark.parametrize("case, message", [
    ("missing", "does not exist"),
    ("empty", "holds no images"),
    ("one_class", r"1 class\(es\)"),
    ("mixed", "mixed sizes"),
])
def test_imagefolder_bad_input(in_tmp, case, message):
    root = in_tmp / case
    if case == "empty":
        (root / "train" / "a").mkdir(parents=True)
    elif case == "one_class":
        _folder(root, classes=("a",))
    elif case == "mixed":
        _folder(root, classes=("a", "b"))
        Image.fromarray(np.zeros((12, 12), np.uint8)).save(root / "train" / "b" / "odd.png")
    with pytest.raises(data.DataError, match=message):
        data.prepare(_cfg("data.name=imagefolder", f"data.root={root}"))
    assert not (in_tmp / "data").exists()


def test_torchvision_offline_points_to_imagefolder(in_tmp):
    with pytest.raises(data.DataError, match="data.name=imagefolder"):
        data.prepare(_cfg("data.name=mnist", f"data.root={in_tmp / 'tv'}"))
