"""A PyTorch MNIST teacher handed over as ONNX *with its BatchNormalization nodes kept* (the BN route of the
teacher-only benchmark; bench/mnist_teachers.py makes the Keras one, whose exporter folds BN away).

Same network as the Keras teacher: Conv(32)-BN-ReLU-Conv(32)-BN-ReLU-MaxPool-Conv(64)-BN-ReLU-Conv(64)-BN-ReLU-
MaxPool-Flatten-Linear(128)-ReLU-Linear(10), NCHW input in [0, 1] normalised by the caller with MNIST's
(0.1307, 0.3081). Trained on the 50,000 train images of ``<work>/split.json`` (bench/mnist_teachers.py carves it),
SGD + Nesterov, OneCycle, ``--epochs``, seed 0. Exported with torch.onnx.export (TorchScript exporter, opset 17,
training=PRESERVE, no constant folding: BatchNormalization stays a node), metadata ``classes``; checked against
onnxruntime. Writes ``<work>/torch_mnist.onnx`` and ``<work>/torch_mnist.json`` (accuracies on val and test).

    python bench/mnist_torch_teacher.py [--work /work/bench-mnist] [--epochs 4]
"""
from __future__ import annotations

import argparse
import hashlib
import json
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

MEAN, STD = 0.1307, 0.3081


def net() -> nn.Sequential:
    def block(cin, cout):
        return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]

    return nn.Sequential(*block(1, 32), *block(32, 32), nn.MaxPool2d(2), *block(32, 64), *block(64, 64), nn.MaxPool2d(2),
                         nn.Flatten(), nn.Linear(64 * 7 * 7, 128), nn.ReLU(inplace=True), nn.Linear(128, 10))


def load(root: Path, files: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    x = np.stack([np.asarray(Image.open(root / f).convert("L"), dtype=np.uint8) for f in files])
    y = np.array([int(f.split("/")[0]) for f in files])
    return torch.from_numpy(x)[:, None].float().div(255), torch.from_numpy(y)


def folder(root: Path) -> tuple[torch.Tensor, torch.Tensor]:
    files = sorted(str(p.relative_to(root)) for p in root.glob("*/*.png"))
    return load(root, files)


@torch.no_grad()
def accuracy(m, x, y) -> float:
    m.eval()
    return float(torch.cat([m((xb - MEAN) / STD).argmax(1) for xb in x.split(1000)]).eq(y).float().mean())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", default="/work/bench-mnist")
    ap.add_argument("--epochs", type=int, default=4)
    a = ap.parse_args()
    work = Path(a.work)
    split = json.loads((work / "split.json").read_text())
    x, y = load(work / split["root"], split["train"])
    xv, yv = folder(work / "val")
    xt, yt = folder(work / "test")
    torch.manual_seed(0)
    m = net()
    opt = torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4)
    steps = a.epochs * (len(x) // 128)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, 0.1, total_steps=steps)
    g = torch.Generator().manual_seed(0)
    t0 = time.perf_counter()
    for ep in range(a.epochs):
        m.train()
        perm = torch.randperm(len(x), generator=g)
        for i in range(len(x) // 128):
            idx = perm[i * 128:(i + 1) * 128]
            loss = nn.functional.cross_entropy(m((x[idx] - MEAN) / STD), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
        print(f"epoch {ep}: val {accuracy(m, xv, yv):.4f}", flush=True)
    wall = time.perf_counter() - t0
    m.eval()
    out = work / "torch_mnist.onnx"
    torch.onnx.export(m, (torch.rand(2, 1, 28, 28),), str(out), dynamo=False, opset_version=17,
                      training=torch.onnx.TrainingMode.PRESERVE, do_constant_folding=False,
                      input_names=["input"], output_names=["logits"], dynamic_axes={"input": {0: "n"}, "logits": {0: "n"}})
    import onnx
    import onnxruntime as ort

    model = onnx.load(str(out))
    model.metadata_props.add(key="classes", value=json.dumps([str(i) for i in range(10)]))
    onnx.checker.check_model(model)
    onnx.save(model, str(out))
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    ort_t = sess.run(None, {"input": ((xt - MEAN) / STD).numpy()})[0]
    with torch.no_grad():
        diff = float(np.abs(ort_t - m((xt - MEAN) / STD).numpy()).max())
    info = {"file": str(out), "sha256": hashlib.sha256(out.read_bytes()).hexdigest(), "bytes": out.stat().st_size,
            "torch": torch.__version__, "onnx": onnx.__version__, "opset": 17,
            "op_types": sorted({n.op_type for n in model.graph.node}),
            "input": {"layout": "NCHW", "range": [0, 1], "mean": [MEAN], "std": [STD], "shape": [None, 1, 28, 28]},
            "epochs": a.epochs, "train_wall_s": round(wall, 1), "val_accuracy": accuracy(m, xv, yv),
            "test_accuracy": accuracy(m, xt, yt), "onnxruntime_test_accuracy": float((ort_t.argmax(1) == yt.numpy()).mean()),
            "max_abs_diff_onnx_vs_torch": diff, "date": time.strftime("%Y-%m-%d")}
    (work / "torch_mnist.json").write_text(json.dumps(info, indent=2) + "\n")
    print(json.dumps(info, indent=2))


if __name__ == "__main__":
    main()
