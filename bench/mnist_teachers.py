"""A foreign (TensorFlow/Keras) MNIST teacher for the ImageFolder benchmarks, exported to ONNX with tf2onnx.

What it does (all under ``--work``, default ``/work/bench-mnist``):

1. unpacks ``--archive`` (default ``/work/shared/datasets/mnist-train.tar.gz``: ImageFolder
   ``mnist/train/<0..9>/*.png``, 60,000 28x28 grey PNGs) to ``<work>/mnist/train`` (skipped when already there);
2. carves a seeded, stratified split of the 60,000 images, 50,000 train / 5,000 val / 5,000 test
   (sklearn ``train_test_split`` twice: 10,000 held out of the sorted file list, then halved; ``stratify``,
   ``random_state=0``), writes ``<work>/split.json`` (paths relative to ``<work>/mnist/train``, per split) and the
   val and test splits as ImageFolder trees ``<work>/val/<class>/*.png`` and ``<work>/test/<class>/*.png``
   (hard links, else copies);
3. trains a Keras CNN with BatchNormalization on the 50,000 train images only: NHWC input ``(N, 28, 28, 1)``
   float32 in [0, 255], ``Rescaling(1/255)`` first; Conv(32)-BN-ReLU-Conv(32)-BN-ReLU-MaxPool-Conv(64)-BN-ReLU-
   Conv(64)-BN-ReLU-MaxPool-Flatten-Dense(128)-ReLU-Dense(10) logits; Adam with a cosine learning rate 1e-3 -> 0,
   5 epochs, batch 128, seed 0, one CPU thread;
4. exports it with tf2onnx (opset 17) to ``<work>/keras_mnist.onnx`` with metadata_props ``classes``
   ``["0", ..., "9"]``, checks it (onnx.checker; onnxruntime vs Keras < 1e-4 on the test split) and writes
   ``<work>/keras_mnist.json``: accuracies, training wall time, versions, ONNX op types, sha256.

Run it in an environment with tensorflow(-cpu), tf2onnx, onnx, onnxruntime, scikit-learn, numpy and pillow (not
the project's venv; tf2onnx 1.17's ``from_keras`` does not take Keras 3 models, so the inference function is
converted)::

    python bench/mnist_teachers.py [--work /work/bench-mnist] [--epochs 5]

About 45-80 s per epoch on one CPU thread (oneDNN kernels; 379 s of training on a shared 2-core machine), 4-7
minutes in all.
"""
from __future__ import annotations

import os

for _k in ("OMP_NUM_THREADS", "TF_NUM_INTRAOP_THREADS", "TF_NUM_INTEROP_THREADS"):
    os.environ.setdefault(_k, "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import argparse
import hashlib
import json
import platform
import shutil
import tarfile
import time
from datetime import date
from pathlib import Path

import numpy as np

SEED = 0
CLASSES = [str(i) for i in range(10)]
OPSET = 17
NAME = "keras_mnist"


def unpack(archive: Path, work: Path) -> Path:
    root = work / "mnist" / "train"
    if root.is_dir() and sum(1 for _ in root.glob("*/*.png")) == 60000:
        print(f"{root}: already unpacked")
        return root
    print(f"unpacking {archive} -> {work}")
    with tarfile.open(archive) as tf:
        tf.extractall(work, filter="data")
    return root


def carve(root: Path, work: Path) -> dict[str, list[str]]:
    from sklearn.model_selection import train_test_split

    files = sorted(p.relative_to(root).as_posix() for p in root.glob("*/*.png"))
    labels = [f.split("/")[0] for f in files]
    tr, hold, _, y_hold = train_test_split(files, labels, test_size=10000, random_state=SEED, stratify=labels)
    va, te = train_test_split(hold, test_size=5000, random_state=SEED, stratify=y_hold)
    split = {"train": sorted(tr), "val": sorted(va), "test": sorted(te)}
    (work / "split.json").write_text(json.dumps({
        "root": "mnist/train", "seed": SEED,
        "method": "sklearn train_test_split(files sorted, test_size=10000, stratify, random_state=0), then the 10,000 "
                  "split test_size=5000 (stratify, random_state=0): train / val / test",
        "counts": {k: len(v) for k, v in split.items()},
        **split}, indent=0) + "\n")
    for name in ("val", "test"):
        dst = work / name
        if dst.exists():
            shutil.rmtree(dst)
        for c in CLASSES:
            (dst / c).mkdir(parents=True)
        for f in split[name]:
            try:
                os.link(root / f, dst / f)
            except OSError:
                shutil.copy2(root / f, dst / f)
    print("split:", {k: len(v) for k, v in split.items()}, f"-> {work / 'split.json'}, {work / 'val'}, {work / 'test'}")
    return split


def load(root: Path, files: list[str]) -> tuple[np.ndarray, np.ndarray]:
    from PIL import Image

    x = np.empty((len(files), 28, 28, 1), np.float32)
    for i, f in enumerate(files):
        with Image.open(root / f) as im:
            x[i, ..., 0] = np.asarray(im.convert("L"), dtype=np.float32)
    y = np.array([CLASSES.index(f.split("/")[0]) for f in files], np.int64)
    return x, y


def build_model(tf):
    L = tf.keras.layers

    def cbr(n):
        return [L.Conv2D(n, 3, use_bias=False), L.BatchNormalization(), L.ReLU()]

    return tf.keras.Sequential([
        tf.keras.Input((28, 28, 1), name="input"),
        L.Rescaling(1.0 / 255),
        *cbr(32), *cbr(32), L.MaxPooling2D(2),
        *cbr(64), *cbr(64), L.MaxPooling2D(2),
        L.Flatten(), L.Dense(128), L.ReLU(), L.Dense(10),
    ], name=NAME)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--archive", type=Path, default=Path("/work/shared/datasets/mnist-train.tar.gz"))
    ap.add_argument("--work", type=Path, default=Path("/work/bench-mnist"))
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--batch-size", type=int, default=128)
    args = ap.parse_args()
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    t_all = time.perf_counter()

    root = unpack(args.archive, work)
    split = carve(root, work)
    t = time.perf_counter()
    data = {k: load(root, v) for k, v in split.items()}
    print(f"decoded {sum(len(v) for v in split.values())} PNGs in {time.perf_counter() - t:.1f} s")

    import tensorflow as tf
    tf.config.threading.set_intra_op_parallelism_threads(1)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    tf.keras.utils.set_random_seed(SEED)
    tf.config.experimental.enable_op_determinism()
    import onnx
    import onnxruntime as ort
    import tf2onnx

    (x_tr, y_tr), (x_va, y_va), (x_te, y_te) = data["train"], data["val"], data["test"]
    model = build_model(tf)
    steps = args.epochs * -(-len(y_tr) // args.batch_size)
    lr = tf.keras.optimizers.schedules.CosineDecay(1e-3, decay_steps=steps)  # 1e-3 -> 0 over the run
    model.compile(optimizer=tf.keras.optimizers.Adam(lr),
                  loss=tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"])
    t = time.perf_counter()
    hist = model.fit(x_tr, y_tr, epochs=args.epochs, batch_size=args.batch_size, shuffle=True, verbose=2)
    train_s = time.perf_counter() - t
    k_va = model.predict(x_va, batch_size=500, verbose=0)
    k_te = model.predict(x_te, batch_size=500, verbose=0)
    acc_va, acc_te = float((k_va.argmax(1) == y_va).mean()), float((k_te.argmax(1) == y_te).mean())
    print(f"keras: train {train_s:.1f} s; val accuracy {acc_va:.4f}, test accuracy {acc_te:.4f}")

    spec = (tf.TensorSpec((None, 28, 28, 1), tf.float32, name="input"),)
    fn = tf.function(lambda x: model(x, training=False))
    proto, _ = tf2onnx.convert.from_function(fn, input_signature=spec, opset=OPSET)
    proto.doc_string = ("Keras CNN with BatchNormalization on MNIST (50,000-image split); NHWC (N,28,28,1) float32 in "
                        "[0, 255]; logits over classes 0..9. bench/mnist_teachers.py")
    del proto.metadata_props[:]
    proto.metadata_props.add(key="classes", value=json.dumps(CLASSES))
    onnx.checker.check_model(proto)
    path = work / f"{NAME}.onnx"
    onnx.save(proto, str(path))

    m = onnx.load(str(path))
    onnx.checker.check_model(m)
    so = ort.SessionOptions()
    so.intra_op_num_threads = so.inter_op_num_threads = 1
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    inp, out = sess.get_inputs()[0], sess.get_outputs()[0]
    o_va = np.concatenate([sess.run([out.name], {inp.name: x_va[i:i + 500]})[0] for i in range(0, len(x_va), 500)])
    o_te = np.concatenate([sess.run([out.name], {inp.name: x_te[i:i + 500]})[0] for i in range(0, len(x_te), 500)])
    diff = float(max(np.abs(o_va - k_va).max(), np.abs(o_te - k_te).max()))
    o_acc_va, o_acc_te = float((o_va.argmax(1) == y_va).mean()), float((o_te.argmax(1) == y_te).mean())
    ops = sorted({n.op_type for n in m.graph.node})
    print(f"onnxruntime: val accuracy {o_acc_va:.4f}, test accuracy {o_acc_te:.4f}; max |onnx - keras| = {diff:.2e}")
    print(f"ONNX op types: {ops}; input {inp.name} {inp.shape}, output {out.name} {out.shape}")
    if diff >= 1e-4:
        raise SystemExit(f"onnxruntime differs from Keras by {diff:.2e} >= 1e-4")

    sha = hashlib.sha256(path.read_bytes()).hexdigest()
    info = {
        "file": str(path), "sha256": sha, "bytes": path.stat().st_size,
        "versions": {"tensorflow": tf.__version__, "keras": getattr(tf.keras, "__version__", None),
                     "tf2onnx": tf2onnx.__version__, "onnx": onnx.__version__, "onnxruntime": ort.__version__,
                     "numpy": np.__version__, "opset": OPSET, "python": platform.python_version()},
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, 1 thread",
        "date": date.today().isoformat(),
        "input": {"name": inp.name, "shape": [d if isinstance(d, int) else None for d in inp.shape],
                  "dtype": "float32", "layout": "NHWC", "range": [0, 255]},
        "output": {"name": out.name, "shape": [d if isinstance(d, int) else None for d in out.shape], "kind": "logits"},
        "classes": CLASSES,
        "data": {"archive": str(args.archive), "train_root": str(root), "split": str(work / "split.json"),
                 "val_dir": str(work / "val"), "test_dir": str(work / "test"),
                 "counts": {k: len(v) for k, v in split.items()}},
        "training": {"epochs": args.epochs, "batch_size": args.batch_size, "optimizer": "Adam, lr cosine 1e-3 -> 0",
                     "seed": SEED,
                     "wall_s": round(train_s, 1),
                     "history": {k: [round(float(v), 5) for v in vs] for k, vs in hist.history.items()}},
        "params": int(model.count_params()),
        "keras_val_accuracy": acc_va, "keras_test_accuracy": acc_te,
        "onnxruntime_val_accuracy": o_acc_va, "onnxruntime_test_accuracy": o_acc_te,
        "max_abs_diff_onnx_vs_keras": diff,
        "op_types": ops, "batchnorm_folded": "BatchNormalization" not in ops,
        "total_wall_s": round(time.perf_counter() - t_all, 1),
    }
    (work / f"{NAME}.json").write_text(json.dumps(info, indent=2) + "\n")
    print(f"wrote {path} ({info['bytes']} bytes) and {work / (NAME + '.json')}; total {info['total_wall_s']} s")


if __name__ == "__main__":
    main()
