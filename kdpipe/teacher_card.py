"""The teacher card: a teacher someone handed over, used as it is, with no real data needed.

``teacher.source`` says what the teacher is:
  *.onnx               from any producer (PyTorch, Keras via tf2onnx, ...): onnx2torch turns the graph into a
                       trainable nn.Module, so gradients reach the input and BatchNormalization nodes become
                       nn.BatchNorm2d (the BN prior's hooks see them);
  torchvision:<name>   torchvision.models.get_model(name, num_classes=C), weights = ``teacher.checkpoint``;
  timm:<name>          timm.create_model(name, num_classes=C, in_chans=channels), weights = ``teacher.checkpoint``;
  <zoo name>           kdpipe.models.ZOO[name](channels, C), weights = ``teacher.checkpoint``.
State dicts load with ``torch.load(weights_only=True)``. A TorchScript archive is refused unless
``teacher.torchscript_runs_code: true`` (torch.jit.load runs code from the file; the run is tagged so).

The rest of the card maps kdpipe's own input convention (float N×C×H×W in [0, 1], what the generator
makes) to the teacher's:
    x_t = layout((lo + (hi − lo)·x − mean) / std)        range = [lo, hi]; mean/std null: no normalisation
``input_size``, ``channels``, ``layout`` and ``classes`` are read from the file where that is unambiguous
(ONNX input shape, ONNX metadata ``classes``, the first conv of a state_dict); ``range``, ``mean`` and
``std`` say how the teacher was fed and must be written on the card. Nothing is read from real data.
"""
from __future__ import annotations

import json
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from kdpipe.config import ConfigError, TeacherCfg
from kdpipe.utils import load_torch, sha256_file

CARD_KEYS = ("source", "checkpoint", "input_size", "channels", "layout", "range", "mean", "std", "classes")


def is_torchscript(p: Path) -> bool:
    """torch.jit.save writes a zip holding <name>/constants.pkl and <name>/code/; torch.save's zip has neither."""
    if not zipfile.is_zipfile(p):
        return False
    with zipfile.ZipFile(p) as z:
        return any(n.endswith("/constants.pkl") or "/code/" in n for n in z.namelist())


def refuse_torchscript(p: Path, key: str) -> None:
    raise ConfigError(
        f"{key} '{p}' is a TorchScript archive: opening it (torch.jit.load) runs code from the file. Convert it "
        "where it was made: to ONNX (torch.onnx.export(model, example, 'teacher.onnx'); teacher.source=teacher.onnx) "
        "or to a state_dict (torch.save(model.state_dict(), 'teacher.pt'); teacher.source=torchvision:<name>, "
        "timm:<name> or a zoo name, teacher.checkpoint=teacher.pt). If you trust the file, set "
        "teacher.torchscript_runs_code=true")


class CardTeacher(nn.Module):
    """The handed-over network behind the card's input mapping: forward takes kdpipe's [0, 1] N×C×H×W."""

    def __init__(self, net: nn.Module, conv: dict):
        super().__init__()
        self.net, self.layout, self.range = net, conv["layout"], conv["range"]
        self.normalise = conv.get("mean") is not None
        self.register_buffer("mean", torch.tensor(conv.get("mean") or [0.0], dtype=torch.float32))
        self.register_buffer("std", torch.tensor(conv.get("std") or [1.0], dtype=torch.float32))

    def to_teacher(self, x: torch.Tensor) -> torch.Tensor:
        return to_convention(x, {"layout": self.layout, "range": self.range,
                                 "mean": self.mean if self.normalise else None, "std": self.std})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(self.to_teacher(x))


@dataclass
class Card:
    """A complete card: every key resolved (from the config, else from the file)."""

    source: str
    checkpoint: str | None
    input_size: int
    channels: int
    layout: str
    range: tuple[float, float]
    mean: list[float] | None
    std: list[float] | None
    classes: list[str]
    files: list[str]  # what the teacher is read from (DVC deps): the source or checkpoint, a classes file
    sha256: str  # of the weights file (the ONNX / TorchScript file, or the checkpoint)
    loader: str  # onnx2torch | state_dict | torch.jit.load (runs code)

    def as_dict(self) -> dict:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.__dict__.items()}

    def input_convention(self) -> dict:
        """What a caller feeds the teacher (and the exported student): kept in spec.json and ONNX metadata."""
        return {"layout": self.layout, "range": list(self.range), "mean": self.mean, "std": self.std}


def is_file_source(source: str) -> bool:
    p = Path(source)
    return p.suffix.lower() in (".onnx", ".pt", ".pth", ".ts", ".jit") or p.is_file()


def card_files(t: TeacherCfg) -> list[str]:
    """The files a card's teacher is read from: the ONNX/TorchScript file or the checkpoint, and a classes file."""
    files = [t.source] if is_file_source(t.source) else [t.checkpoint] if t.checkpoint else []
    return files + ([t.classes] if isinstance(t.classes, str) else [])


def _classes(value) -> list[str] | None:
    if value is None:
        return None
    if isinstance(value, int):
        return [str(i) for i in range(value)]
    if isinstance(value, list):
        return [str(c) for c in value]
    p = Path(value)
    if not p.is_file():
        raise ConfigError(f"teacher.classes '{value}' is neither a list, a count nor an existing file")
    text = p.read_text()
    try:
        names = json.loads(text)
    except json.JSONDecodeError:
        names = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return [str(c) for c in names]


def _simplify_identities(model) -> None:
    """Identity nodes reading an initializer (torch.onnx.export shares equal initializers through them) are
    replaced by a copy of the initializer, so onnx2torch sees BatchNormalization's parameters as constants."""
    import onnx

    inits = {i.name: i for i in model.graph.initializer}
    keep = []
    for node in model.graph.node:
        if node.op_type == "Identity" and node.input[0] in inits:
            t = onnx.TensorProto()
            t.CopyFrom(inits[node.input[0]])
            t.name = node.output[0]
            model.graph.initializer.append(t)
        else:
            keep.append(node)
    del model.graph.node[:]
    model.graph.node.extend(keep)


def _onnx_input(model) -> tuple[str, list]:
    inits = {i.name for i in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in inits]
    if len(inputs) != 1:
        raise ConfigError(f"teacher.source: the ONNX graph has {len(inputs)} inputs; a classifier takes one image batch")
    dims = [d.dim_value if d.HasField("dim_value") else None for d in inputs[0].type.tensor_type.shape.dim]
    return inputs[0].name, dims


def _infer_layout(dims: list, layout: str | None, where: str) -> str:
    if layout:
        return layout
    if len(dims) != 4:
        raise ConfigError(f"teacher.source '{where}': input of rank {len(dims)}, not an image batch N×C×H×W or N×H×W×C")
    nchw, nhwc = dims[1] in (1, 3) and dims[3] not in (1, 3), dims[3] in (1, 3) and dims[1] not in (1, 3)
    if nchw == nhwc:
        raise ConfigError(f"teacher.layout: the ONNX input shape {dims} of '{where}' does not say whether channels come "
                          "first or last: set teacher.layout (NCHW or NHWC)")
    return "NCHW" if nchw else "NHWC"


def _load_onnx(t: TeacherCfg) -> tuple[nn.Module, dict]:
    import onnx
    from onnx2torch import convert

    model = onnx.load(t.source)
    _, dims = _onnx_input(model)
    layout = _infer_layout(dims, t.layout, t.source)
    c, h, w = (dims[1], dims[2], dims[3]) if layout == "NCHW" else (dims[3], dims[1], dims[2])
    meta = {p.key: p.value for p in model.metadata_props}
    found = {"layout": layout, "channels": c, "input_size": h if h == w else None,
             "classes": json.loads(meta["classes"]) if "classes" in meta else None}
    _simplify_identities(model)
    try:
        net = convert(model)
    except (NotImplementedError, ValueError, KeyError) as e:
        raise ConfigError(f"teacher.source '{t.source}': onnx2torch cannot convert this graph ({e}); export it with "
                          "opset 17 or lower, or hand over a state_dict for torchvision:/timm:/zoo") from None
    return net, found


def _state_dict(path: str) -> dict:
    state = load_torch(path)
    for k in ("state_dict", "model", "model_state_dict"):  # common wrappers of a training script's checkpoint
        if isinstance(state, dict) and isinstance(state.get(k), dict):
            state = state[k]
    if not isinstance(state, dict):
        raise ConfigError(f"teacher.checkpoint '{path}' holds a {type(state).__name__}, not a state_dict")
    return {k.removeprefix("module."): v for k, v in state.items()}


def _load_named(t: TeacherCfg, n_classes: int, channels: int) -> nn.Module:
    from kdpipe.models import ZOO

    kind, _, name = t.source.partition(":") if ":" in t.source else ("zoo", "", t.source)
    if kind == "torchvision":
        import torchvision

        if name not in torchvision.models.list_models(module=torchvision.models):
            raise ConfigError(f"teacher.source '{t.source}': torchvision has no classification model '{name}'")
        return torchvision.models.get_model(name, weights=None, num_classes=n_classes)
    if kind == "timm":
        import timm

        if not timm.is_model(name):
            raise ConfigError(f"teacher.source '{t.source}': timm has no model '{name}'")
        return timm.create_model(name, pretrained=False, num_classes=n_classes, in_chans=channels)
    if kind == "zoo" and name in ZOO:
        return ZOO[name](channels, n_classes)
    raise ConfigError(f"teacher.source '{t.source}' is not a file, torchvision:<name>, timm:<name> or a zoo name "
                      f"({', '.join(sorted(ZOO))})")


def load_strict(net: nn.Module, state: dict, what: str) -> None:
    """``net.load_state_dict(state)``, or one ConfigError: ``what``, then the missing/unexpected keys or the shapes."""
    missing, unexpected = net.state_dict().keys() - state.keys(), state.keys() - net.state_dict().keys()
    if missing or unexpected:
        raise ConfigError(f"{what}: missing keys {sorted(missing)[:8]}, unexpected keys {sorted(unexpected)[:8]}")
    try:
        net.load_state_dict(state)
    except RuntimeError as e:
        raise ConfigError(f"{what}: {e}") from None


def _first_conv_channels(state: dict) -> int | None:
    w = next((v for v in state.values() if torch.is_tensor(v) and v.dim() == 4), None)
    return int(w.shape[1]) if w is not None and w.shape[1] in (1, 3) else None


def load_card(t: TeacherCfg) -> tuple[CardTeacher, Card]:
    """The teacher of the card ``t`` (frozen, eval, CPU) and the complete card; ConfigError naming the key
    when the card is incomplete or does not fit the file, before any work."""
    if t.source is None:
        raise ConfigError("teacher.source is not set: this project's teacher is train-teacher's (data/teacher)")
    missing = [k for k in ("range",) if getattr(t, k) is None] + \
              [k for k in ("mean", "std") if k not in t.model_fields_set]
    if missing:
        raise ConfigError(
            "the teacher card is incomplete: " + ", ".join(f"teacher.{k}" for k in missing) + " not set. "
            "teacher.range: what the teacher's input values span (e.g. [0, 1] or [0, 255]); teacher.mean/std: the "
            "normalisation applied before it, in units of range (null: none; ImageNet: [0.485, 0.456, 0.406] / "
            "[0.229, 0.224, 0.225])")
    src = Path(t.source)
    if is_file_source(t.source):
        if not src.is_file():
            raise ConfigError(f"teacher.source '{src}' does not exist")
        if src.suffix.lower() == ".onnx":
            net, found = _load_onnx(t)
            loader, digest = "onnx2torch", sha256_file(src)
        elif is_torchscript(src):
            if not t.torchscript_runs_code:
                refuse_torchscript(src, "teacher.source")
            net = torch.jit.load(str(src), map_location="cpu")
            found, loader, digest = {}, "torch.jit.load (runs code)", sha256_file(src)
        else:
            raise ConfigError(f"teacher.source '{src}' is a file but not ONNX or TorchScript: for a state_dict set "
                              "teacher.source=torchvision:<name>, timm:<name> or a zoo name, and teacher.checkpoint to the file")
    else:
        if not t.checkpoint:
            raise ConfigError(f"teacher.checkpoint is needed: teacher.source '{t.source}' names an architecture; "
                              "its weights are a state_dict file (torch.save(model.state_dict(), ...))")
        ck = Path(t.checkpoint)
        if not ck.is_file():
            raise ConfigError(f"teacher.checkpoint '{ck}' does not exist")
        if is_torchscript(ck):
            refuse_torchscript(ck, "teacher.checkpoint")
        try:
            state = _state_dict(str(ck))
        except ConfigError:
            raise
        except Exception as e:  # a pickle carrying code, a truncated file: one line naming the file
            why = next((ln for ln in str(e).splitlines() if ln.strip()), type(e).__name__).split(". ")[0]
            raise ConfigError(f"teacher.checkpoint '{ck}' is not a weights-only state_dict: {why}") from None
        found = {"channels": _first_conv_channels(state)}
        net, loader, digest = None, "state_dict", sha256_file(ck)
    classes = _classes(t.classes) or found.get("classes")
    channels = t.channels or found.get("channels")
    size = t.input_size or found.get("input_size")
    layout = t.layout or found.get("layout") or "NCHW"
    unknown = [k for k, v in (("classes", classes), ("channels", channels), ("input_size", size)) if not v]
    if unknown:
        raise ConfigError("the teacher card is incomplete: " + ", ".join(f"teacher.{k}" for k in unknown) +
                          f" cannot be read from '{t.source}': set " + ("it" if len(unknown) == 1 else "them"))
    for k, v in (("channels", t.channels), ("input_size", t.input_size), ("layout", t.layout)):
        if v is not None and found.get(k) not in (None, v):
            raise ConfigError(f"teacher.{k} is {v}, but '{t.source}' takes {found[k]}")
    if t.mean is not None and len(t.mean) != channels:
        raise ConfigError(f"teacher.mean has {len(t.mean)} values for a {channels}-channel teacher")
    if net is None:
        net = _load_named(t, len(classes), channels)
        load_strict(net, state, f"teacher.checkpoint '{t.checkpoint}' does not fit teacher.source '{t.source}' "
                                f"with {len(classes)} classes")
    card = Card(t.source, t.checkpoint, int(size), int(channels), layout, tuple(t.range), t.mean, t.std, classes,
                card_files(t), digest, loader)
    teacher = CardTeacher(net, card.input_convention()).eval().requires_grad_(False)
    with torch.no_grad():  # the card must fit the network: one forward of a dummy batch
        try:
            out = teacher(torch.rand(2, card.channels, card.input_size, card.input_size))
        except Exception as e:
            raise ConfigError(f"the teacher of '{t.source}' does not run on the card's input ({card.channels}×"
                              f"{card.input_size}×{card.input_size}, {layout}): {str(e).splitlines()[0]}") from None
    if out.dim() != 2 or out.shape[1] != len(classes):
        raise ConfigError(f"teacher.classes has {len(classes)} names, but the teacher of '{t.source}' outputs "
                          f"{tuple(out.shape[1:])} per sample")
    return teacher, card


def to_convention(x: torch.Tensor, conv: dict | None) -> torch.Tensor:
    """kdpipe's [0, 1] N×C×H×W -> a model's input convention ``conv`` (layout, range, mean, std; spec["input"])."""
    if not conv:
        return x
    lo, hi = conv["range"]
    x = lo + (hi - lo) * x
    if conv.get("mean") is not None:  # lists (spec.json) or tensors (CardTeacher's buffers, on x's device)
        mean, std = (torch.as_tensor(conv[k], dtype=x.dtype, device=x.device).view(1, -1, 1, 1) for k in ("mean", "std"))
        x = (x - mean) / std
    return x.permute(0, 2, 3, 1).contiguous() if conv["layout"] == "NHWC" else x


class InputAdapter(nn.Module):
    """The exported student takes the teacher's own input (a drop-in replacement): the inverse of the card,
        x = (std·x_t + mean − lo) / (hi − lo)   (N×H×W×C -> N×C×H×W first when the teacher is NHWC)."""

    def __init__(self, model: nn.Module, conv: dict):
        super().__init__()
        self.model, self.nhwc = model, conv["layout"] == "NHWC"
        self.lo, self.hi = (float(v) for v in conv["range"])
        c = 1 if conv.get("mean") is None else len(conv["mean"])
        self.register_buffer("mean", torch.tensor(conv.get("mean") or [0.0] * c).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(conv.get("std") or [1.0] * c).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.nhwc:
            x = x.permute(0, 3, 1, 2)
        return self.model((x * self.std + self.mean - self.lo) / (self.hi - self.lo))


def card_spec(card: Card) -> dict:
    """The model spec of a card teacher (what data/teacher/spec.json is for a trained one). Its mean/std are
    the card's normalisation in [0, 1] units (0.5/0.5 without one): the student's own input normalisation."""
    lo, hi = card.range
    c = card.channels
    mean = [(m - lo) / (hi - lo) for m in card.mean] if card.mean else [0.5] * c
    std = [s / (hi - lo) for s in card.std] if card.std else [0.5] * c
    return {"arch": f"card:{card.source}", "num_classes": len(card.classes), "classes": card.classes,
            "in_channels": c, "image_size": card.input_size, "mean": mean, "std": std,
            "input": card.input_convention(), "card": card.as_dict()}


def has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
