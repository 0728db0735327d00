"""Real data: sources (digits, ImageFolder, torchvision MNIST/CIFAR-10) and the seeded, stratified
train/val/test split. Splits are stored once as uint8 N×C×H×W tensors in ``data/prepared/``; every
stage that may read real data reads them from there (the data-free stages never do, and
:func:`data_free` makes any attempt an error)."""
from __future__ import annotations

from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path

import numpy as np
import torch

from kdpipe import paths
from kdpipe.config import Config, ConfigError
from kdpipe.errors import DataError  # noqa: F401  (kdpipe.data.DataError, as before)
from kdpipe.utils import load_json, load_torch, save_json, save_torch, sha256_tensors

IMG_EXT = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".pgm", ".ppm"}


_DATA_FREE: ContextVar[tuple[str, bool] | None] = ContextVar("kdpipe_data_free", default=None)


@contextmanager
def data_free(stage: str, private: bool):
    """The privacy guard: while a data-free stage (synthesize, distill) runs, every read of the real
    data through this module raises ConfigError naming the stage and the path (in this thread/context)."""
    token = _DATA_FREE.set((stage, private))
    try:
        yield
    finally:
        _DATA_FREE.reset(token)


def _guard(path) -> None:
    if _DATA_FREE.get():
        stage, private = _DATA_FREE.get()
        raise ConfigError(f"stage '{stage}' is data-free and may not read the real data '{path}'"
                          + (" (data.private: true)" if private else ""))


def _digits():
    from sklearn.datasets import load_digits

    d = load_digits()
    x = np.rint(d.images * (255.0 / 16.0)).astype(np.uint8)[:, None]  # N×1×8×8, 0..16 -> 0..255
    return x, d.target.astype(np.int64), [str(c) for c in d.target_names]


def _read_images(files: list[Path], channels: int | None, size: int | None) -> np.ndarray:
    from PIL import Image

    mode = {1: "L", 3: "RGB", None: None}[channels]
    out, first, first_mode = [], None, None
    for f in files:
        try:
            im = Image.open(f)
            im.load()
        except Exception as e:  # PIL raises many kinds
            raise DataError(f"cannot read image '{f}': {e}") from None
        if channels is None:  # the dataset's own channels: those of the first image, the same for all
            own = "L" if im.mode in ("L", "1", "I;16", "I") else "RGB"
            first_mode = first_mode or (own, f)
            if own != first_mode[0]:
                raise DataError(f"images of mixed channels: '{f}' is {own}, '{first_mode[1]}' is {first_mode[0]}; "
                                f"set data.channels (1 or 3) to convert them all")
            mode = own
        im = im.convert(mode)
        if size is not None:
            im = im.resize((size, size), Image.BILINEAR)
        elif first is None:
            first = (im.size, f)
        elif im.size != first[0]:
            raise DataError(
                f"images of mixed sizes: '{f}' is {im.size[0]}x{im.size[1]}, '{first[1]}' is "
                f"{first[0][0]}x{first[0][1]}; set data.image_size to resize them all"
            )
        a = np.asarray(im, dtype=np.uint8)
        out.append(a[None] if a.ndim == 2 else a.transpose(2, 0, 1))
    return np.stack(out)


def _folder(split_dir: Path, classes: list[str] | None, channels, size):
    if not split_dir.is_dir():
        raise DataError(f"data folder '{split_dir}' does not exist (layout: <root>/train/<class>/<image>)")
    found = sorted(d.name for d in split_dir.iterdir() if d.is_dir())
    classes = classes or found
    files, labels = [], []
    for i, c in enumerate(classes):
        fs = sorted(p for p in (split_dir / c).glob("*") if p.suffix.lower() in IMG_EXT) if (split_dir / c).is_dir() else []
        files += fs
        labels += [i] * len(fs)
    if not files:
        raise DataError(f"data folder '{split_dir}' holds no images (layout: <root>/train/<class>/<image>)")
    nonempty = sorted({classes[i] for i in labels})
    if len(nonempty) < 2:
        raise DataError(f"data folder '{split_dir}' has {len(nonempty)} class(es) with images; at least 2 are needed")
    return _read_images(files, channels, size), np.asarray(labels, dtype=np.int64), classes


def _torchvision(name: str, root: str | None):
    import torchvision

    root = root or "data/external"
    cls = {"mnist": torchvision.datasets.MNIST, "cifar10": torchvision.datasets.CIFAR10}[name]
    try:
        parts = [cls(root, train=t, download=True) for t in (True, False)]
    except Exception as e:
        raise DataError(
            f"cannot load or download {name} into '{root}' ({type(e).__name__}: {e}). Offline? Use the "
            f"ImageFolder route instead: data.name=imagefolder data.root=<dir with train/<class>/*>"
        ) from None
    xs, ys = [], []
    for ds in parts:
        x = ds.data.numpy() if torch.is_tensor(ds.data) else np.asarray(ds.data)
        xs.append(x[:, None] if x.ndim == 3 else x.transpose(0, 3, 1, 2))
        ys.append(np.asarray(ds.targets, dtype=np.int64))
    return xs, ys, list(parts[0].classes)


def _resize(x: np.ndarray, size: int | None) -> np.ndarray:
    if size is None or x.shape[-1] == size:
        return x
    t = torch.nn.functional.interpolate(torch.from_numpy(x).float(), size=(size, size), mode="bilinear", antialias=True)
    return t.round().clamp(0, 255).to(torch.uint8).numpy()


def _carve(x, y, frac, seed):
    from sklearn.model_selection import train_test_split  # here: scikit-learn is slow to import

    return train_test_split(x, y, test_size=frac, stratify=y, random_state=seed)


def prepare(cfg: Config) -> dict:
    """Load the configured source, carve seeded stratified splits, write data/prepared/."""
    _guard(paths.PREPARED)
    d, seed = cfg.data, cfg.seed
    splits: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    if d.name == "digits":
        x, y, classes = _digits()
        x = _resize(x, d.image_size)
    elif d.name == "imagefolder":
        if not d.root:
            raise DataError("data.root is required when data.name is 'imagefolder'")
        root = Path(d.root)
        if not root.is_dir():
            raise DataError(f"data.root '{root}' does not exist")
        x, y, classes = _folder(root / "train", None, d.channels, d.image_size)
        for s in ("val", "test"):
            if (root / s).is_dir():
                splits[s] = _folder(root / s, classes, d.channels, d.image_size or x.shape[-1])[:2]
    else:
        (x, xt), (y, yt), classes = _torchvision(d.name, d.root)
        x, xt = _resize(x, d.image_size), _resize(xt, d.image_size)
        splits["test"] = (xt, yt)
    if d.channels is not None and x.shape[1] != d.channels:
        conv = (lambda a: a.repeat(3, axis=1)) if d.channels == 3 else (lambda a: np.rint(a.mean(1, keepdims=True)).astype(np.uint8))
        x = conv(x)
        splits = {k: (conv(v[0]), v[1]) for k, v in splits.items()}

    if "test" not in splits:
        x, xt, y, yt = _carve(x, y, d.test_fraction, seed)
        splits["test"] = (xt, yt)
    if "val" not in splits:
        x, xv, y, yv = _carve(x, y, d.val_fraction / (1 - d.test_fraction), seed + 1)
        splits["val"] = (xv, yv)
    splits["train"] = (x, y)

    xf = torch.from_numpy(x).float() / 255.0
    meta = {
        "name": d.name,
        "classes": classes,
        "channels": int(x.shape[1]),
        "image_size": int(x.shape[-1]),
        "mean": xf.mean(dim=(0, 2, 3)).tolist(),
        "std": xf.std(dim=(0, 2, 3)).clamp_min(1e-3).tolist(),
        "splits": {},
    }
    for name, (xs, ys) in splits.items():
        xt_, yt_ = torch.from_numpy(np.ascontiguousarray(xs)), torch.from_numpy(ys)
        save_torch({"x": xt_, "y": yt_}, paths.PREPARED / f"{name}.pt")
        meta["splits"][name] = {
            "n": int(len(ys)),
            "counts": np.bincount(ys, minlength=len(classes)).tolist(),
            "sha256": sha256_tensors(xt_, yt_),
        }
    save_json(meta, paths.PREPARED / "meta.json")
    return meta


def load_split(split: str, device="cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """(float images in [0,1], labels) of a prepared split, on ``device``."""
    f = paths.PREPARED / f"{split}.pt"
    _guard(f)
    if not f.exists():
        raise DataError(f"prepared split '{f}' is missing: run the prepare stage first")
    d = load_torch(f)
    want = load_meta()["splits"].get(split, {}).get("sha256")
    if want != sha256_tensors(d["x"], d["y"]):  # e.g. a prepare run killed between its writes
        raise DataError(f"prepared split '{f}' does not match its sha256 in '{paths.PREPARED / 'meta.json'}': "
                        f"re-run the prepare stage")
    return d["x"].to(device).float().div_(255.0), d["y"].to(device)


def load_meta() -> dict:
    _guard(paths.PREPARED / "meta.json")
    return load_json(paths.PREPARED / "meta.json")
