"""Models by name. Every model is wrapped in :class:`Classifier`, which takes float images in
[0, 1] (N×C×H×W) and normalises inside the graph, so training, synthesis and ONNX share one input
convention. A *spec* (plain dict, saved as spec.json beside the weights) is what rebuilds a model."""
from __future__ import annotations

import torch
from torch import nn


class Classifier(nn.Module):
    def __init__(self, net: nn.Module, mean, std, expand_to: int = 0):
        super().__init__()
        self.net = net
        self.expand_to = expand_to  # grey input fed to a 3-channel torchvision net
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = (x - self.mean) / self.std
        if self.expand_to:
            x = x.expand(-1, self.expand_to, -1, -1)
        return self.net(x)


def _conv_bn(cin: int, cout: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


def digits_cnn(in_channels: int, num_classes: int, width: int = 32) -> nn.Sequential:
    """Small VGG-style CNN for 8×8 digits: 3 conv-BN-ReLU blocks, 2 pools, global pool, linear."""
    w = width
    return nn.Sequential(
        *_conv_bn(in_channels, w), *_conv_bn(w, w), nn.MaxPool2d(2),
        *_conv_bn(w, 2 * w), *_conv_bn(2 * w, 2 * w), nn.MaxPool2d(2),
        *_conv_bn(2 * w, 4 * w),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4 * w, num_classes),
    )


def digits_cnn_small(in_channels: int, num_classes: int) -> nn.Sequential:
    """The student: a quarter of the teacher's width, two conv blocks."""
    return nn.Sequential(
        *_conv_bn(in_channels, 16), nn.MaxPool2d(2),
        *_conv_bn(16, 32),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, num_classes),
    )


def lenet5(in_channels: int, num_classes: int, width: float = 1.0) -> nn.Sequential:
    """LeNet-5 on 32×32 input (as DAFL/DFAD), with BatchNorm after each conv so the teacher carries
    the feature statistics that BN-prior synthesis matches. width=0.5 is LeNet-5-half."""
    c1, c2, c3, f = int(6 * width), int(16 * width), int(120 * width), int(84 * width)
    return nn.Sequential(
        nn.Conv2d(in_channels, c1, 5), nn.BatchNorm2d(c1), nn.ReLU(inplace=True), nn.MaxPool2d(2),
        nn.Conv2d(c1, c2, 5), nn.BatchNorm2d(c2), nn.ReLU(inplace=True), nn.MaxPool2d(2),
        nn.Conv2d(c2, c3, 5), nn.BatchNorm2d(c3), nn.ReLU(inplace=True),
        nn.Flatten(), nn.Linear(c3, f), nn.ReLU(inplace=True), nn.Linear(f, num_classes),
    )


ZOO = {
    "digits_cnn": digits_cnn,
    "digits_cnn_small": digits_cnn_small,
    "lenet5": lenet5,
    "lenet5_half": lambda c, n: lenet5(c, n, width=0.5),
}


def make_spec(arch: str, meta: dict) -> dict:
    """A model spec from the data meta (classes, channels, size, normalisation)."""
    return {
        "arch": arch,
        "num_classes": len(meta["classes"]),
        "classes": list(meta["classes"]),
        "in_channels": int(meta["channels"]),
        "image_size": int(meta["image_size"]),
        "mean": list(meta["mean"]),
        "std": list(meta["std"]),
    }


def build_model(spec: dict) -> Classifier:
    arch, c, n = spec["arch"], spec["in_channels"], spec["num_classes"]
    if arch in ZOO:
        return Classifier(ZOO[arch](c, n), spec["mean"], spec["std"])
    import torchvision

    if arch not in torchvision.models.list_models(module=torchvision.models):
        known = sorted(ZOO) + ["<any torchvision classification model>"]
        raise ValueError(f"unknown architecture '{arch}'; known: {', '.join(known)}")
    net = torchvision.models.get_model(arch, weights=None, num_classes=n)
    return Classifier(net, spec["mean"], spec["std"], expand_to=3 if c == 1 else 0)


def penultimate(model: nn.Module) -> nn.Linear:
    """The last Linear layer: its input is the feature vector (DAFL's activation term)."""
    last = None
    for m in model.modules():
        if isinstance(m, nn.Linear):
            last = m
    if last is None:
        raise ValueError("model has no Linear layer")
    return last
