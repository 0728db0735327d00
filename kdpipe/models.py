"""Models by name. Every model is wrapped in :class:`Classifier`, which takes float images in
[0, 1] (N×C×H×W) and normalises inside the graph, so training, synthesis and ONNX share one input
convention. A *spec* (plain dict, saved as spec.json beside the weights) is what rebuilds a model."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kdpipe.config import ConfigError


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


def cnn_small(in_channels: int, num_classes: int, width: int = 16) -> nn.Sequential:
    """A small plain CNN for 32×32 images (the seeds' CIFAR-10 "CNN student"): 3 conv-BN-ReLU-maxpool
    blocks of width w, 2w, 4w (32 → 16 → 8 → 4 px), global average pool, linear. w=16: 24 k parameters."""
    w = width
    return nn.Sequential(
        *_conv_bn(in_channels, w), nn.MaxPool2d(2), *_conv_bn(w, 2 * w), nn.MaxPool2d(2),
        *_conv_bn(2 * w, 4 * w), nn.MaxPool2d(2),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4 * w, num_classes),
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


class WideBlock(nn.Module):
    """Pre-activation wide basic block (Zagoruyko & Komodakis 2016), dropout 0:
    o = relu(bn1(x)),  y = conv2(relu(bn2(conv1_s(o)))) + (x if C_in = C_out else convShortcut_s(o)).
    Module names as in Fast-Datafree / CMI's ``wresnet.py`` (same state_dict keys)."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.bn1, self.relu1 = nn.BatchNorm2d(cin), nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2, self.relu2 = nn.BatchNorm2d(cout), nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.convShortcut = None if cin == cout else nn.Conv2d(cin, cout, 1, stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        o = self.relu1(self.bn1(x))
        y = self.conv2(self.relu2(self.bn2(self.conv1(o))))
        return y + (x if self.convShortcut is None else self.convShortcut(o))


class _Stage(nn.Module):
    def __init__(self, n: int, cin: int, cout: int, stride: int):
        super().__init__()
        self.layer = nn.Sequential(*[WideBlock(cin if i == 0 else cout, cout, stride if i == 0 else 1) for i in range(n)])

    def forward(self, x):
        return self.layer(x)


class WideResNet(nn.Module):
    """WRN-d-k for 32×32: conv3×3(16) → 3 stages of n = (d−4)/6 blocks, widths 16k, 32k, 64k, strides
    1, 2, 2 → BN-ReLU → global average pool → linear. WRN-40-2: 2.24 M parameters, WRN-16-2: 0.69 M."""

    def __init__(self, depth: int, widen: int, in_channels: int, num_classes: int):
        super().__init__()
        n, w = (depth - 4) // 6, [16, 16 * widen, 32 * widen, 64 * widen]
        self.conv1 = nn.Conv2d(in_channels, w[0], 3, 1, 1, bias=False)
        self.block1, self.block2, self.block3 = (_Stage(n, w[i], w[i + 1], s) for i, s in enumerate((1, 2, 2)))
        self.bn1, self.relu = nn.BatchNorm2d(w[3]), nn.ReLU(inplace=True)
        self.fc = nn.Linear(w[3], num_classes)
        for m in self.modules():  # the reference initialisation
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block3(self.block2(self.block1(self.conv1(x))))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(self.relu(self.bn1(x)), 1), 1))


def resnet_cifar(layers: list[int], in_channels: int, num_classes: int) -> nn.Module:
    """CIFAR ResNet (He et al. 2016, as in CRD / Fast-Datafree): torchvision's BasicBlock ResNet with a
    3×3 stride-1 stem and no max-pool, so a 32×32 input keeps 32, 16, 8, 4 px through the 4 stages.
    ResNet-18 [2,2,2,2]: 11.17 M parameters; ResNet-34 [3,4,6,3]: 21.28 M (10 classes)."""
    from torchvision.models.resnet import BasicBlock, ResNet

    net = ResNet(BasicBlock, layers, num_classes=num_classes)
    net.conv1 = nn.Conv2d(in_channels, 64, 3, 1, 1, bias=False)
    nn.init.kaiming_normal_(net.conv1.weight, mode="fan_out", nonlinearity="relu")
    net.maxpool = nn.Identity()
    return net


def resnet_he(n: int, in_channels: int, num_classes: int) -> nn.Module:
    """ResNet-(6n+2) for 32×32 (He et al. 2016, §4.2; CRD's resnet8/resnet20): conv3×3(16) → 3 stages of n
    torchvision BasicBlocks, widths 16, 32, 64, strides 1, 2, 2 (1×1-conv projection shortcuts, option B) →
    global average pool → linear. ResNet-8: 78 k parameters; ResNet-20: 0.27 M."""
    from torchvision.models.resnet import BasicBlock

    layers, cin = [nn.Conv2d(in_channels, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU(inplace=True)], 16
    for cout, stride in ((16, 1), (32, 2), (64, 2)):
        for i in range(n):
            s = stride if i == 0 else 1
            down = None if (s == 1 and cin == cout) else nn.Sequential(nn.Conv2d(cin, cout, 1, s, bias=False), nn.BatchNorm2d(cout))
            layers.append(BasicBlock(cin, cout, s, down))
            cin = cout
    net = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, num_classes))
    for m in net.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
    return net


ZOO = {
    "cnn_small": cnn_small,
    "digits_cnn": digits_cnn,
    "digits_cnn_small": digits_cnn_small,
    "lenet5": lenet5,
    "lenet5_half": lambda c, n: lenet5(c, n, width=0.5),
    "resnet8": lambda c, n: resnet_he(1, c, n),
    "resnet20": lambda c, n: resnet_he(3, c, n),
    "resnet18_cifar": lambda c, n: resnet_cifar([2, 2, 2, 2], c, n),
    "resnet34_cifar": lambda c, n: resnet_cifar([3, 4, 6, 3], c, n),
    "wrn16_1": lambda c, n: WideResNet(16, 1, c, n),
    "wrn16_2": lambda c, n: WideResNet(16, 2, c, n),
    "wrn40_1": lambda c, n: WideResNet(40, 1, c, n),
    "wrn40_2": lambda c, n: WideResNet(40, 2, c, n),
}
# torchvision models whose training-mode output is a tuple with auxiliary logits: built without them
_NO_AUX = {"googlenet", "inception_v3"}


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
    """``spec["arch"]``: a ZOO name, or any torchvision classification model by name (random init,
    ``num_classes``; a grey input is expanded to the 3 channels those nets expect)."""
    arch, c, n = spec["arch"], spec["in_channels"], spec["num_classes"]
    if arch in ZOO:
        return Classifier(ZOO[arch](c, n), spec["mean"], spec["std"])
    import torchvision

    if arch not in torchvision.models.list_models(module=torchvision.models):
        known = sorted(ZOO) + ["<any torchvision classification model>"]
        raise ConfigError(f"unknown architecture '{arch}' (teacher.arch / student.arch); known: {', '.join(known)}")
    kw = {"aux_logits": False, "init_weights": True} if arch in _NO_AUX else {}
    if arch.startswith("vit_"):  # position embeddings are sized for the input (patches: side / 14, 16 or 32)
        kw["image_size"] = spec["image_size"]
    elif arch == "maxvit_t":
        kw["input_size"] = (spec["image_size"], spec["image_size"])
    try:
        net = torchvision.models.get_model(arch, weights=None, num_classes=n, **kw)
    except (ValueError, AssertionError) as e:  # e.g. maxvit_t, vit_*: input size vs partition / patch size
        raise ConfigError(f"architecture '{arch}' cannot take {spec.get('image_size')} px input: {e}") from None
    return Classifier(net, spec["mean"], spec["std"], expand_to=3 if c == 1 else 0)


def penultimate(model: nn.Module) -> nn.Module:
    """The last fully-connected layer: its first input is the feature vector (DAFL's activation term). An
    nn.Linear, or in a graph converted from ONNX (onnx2torch) its MatMul/Gemm node (tf2onnx's Dense)."""
    last = None
    for m in model.modules():
        if isinstance(m, nn.Linear) or type(m).__name__ in ("OnnxMatMul", "OnnxGemm"):
            last = m
    if last is None:
        raise ConfigError("synthesize.w_act > 0 needs the teacher's last fully-connected layer (Linear, MatMul or "
                          "Gemm), and this teacher has none: set synthesize.w_act=0")
    return last
