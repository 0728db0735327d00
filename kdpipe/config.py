"""The one parameter schema. ``params.yaml`` mirrors it; nothing else defines a parameter.

Loading order: the YAML file (``params.yaml`` by default), then ``--set key=value`` overrides.
Unknown keys, wrong types and out-of-range values raise :class:`ConfigError` naming the key,
before any work is done (the CLI turns it into exit code 2); a key that moved (``MOVED``, e.g.
``synthesize.alpha`` -> ``replay.alpha``) fails the same way, naming its new home.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


class ConfigError(ValueError):
    """A parameter problem, already phrased for the user (names the key)."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DataCfg(_Section):
    # none: a teacher-only project (no real data on the machine; the teacher comes from its card, teacher.source)
    name: Literal["digits", "imagefolder", "mnist", "cifar10", "none"] = "digits"  # the real data source; none: no real data (teacher-only project)
    root: str | None = None  # imagefolder: <root>/train/<class>/*; mnist/cifar10: torchvision root
    image_size: int | None = Field(None, ge=4, le=1024)  # square H=W; None = the dataset's own
    channels: Literal[1, 3] | None = None  # None = the dataset's own
    val_fraction: float = Field(0.15, gt=0.0, lt=0.5)  # share of the data carved (seeded, stratified) for validation
    test_fraction: float = Field(0.2, gt=0.0, lt=0.5)  # share of the data carved for the test split (reported once)
    private: bool = False  # the real data may not be used beyond the teacher: no baseline stage


class TrainCfg(_Section):
    epochs: int = Field(20, ge=1)  # passes over the train split
    batch_size: int = Field(64, ge=1)  # global batch (all ranks together under torchrun)
    lr: float = Field(0.05, gt=0)  # peak SGD learning rate (OneCycle)
    momentum: float = Field(0.9, ge=0, lt=1)  # SGD momentum
    nesterov: bool = True  # Nesterov momentum (when momentum > 0)
    weight_decay: float = Field(5e-4, ge=0)  # SGD weight decay
    pct_start: float = Field(0.15, gt=0, lt=1)  # OneCycle: the fraction of the steps spent warming up to lr
    shift: float = Field(0.125, ge=0, lt=0.5)  # augmentation: random shifts up to ±shift of the image size
    label_smoothing: float = Field(0.0, ge=0, lt=1)  # cross-entropy label smoothing


class TeacherCfg(TrainCfg):
    arch: str = "digits_cnn"  # train-teacher's architecture (when teacher.source is null)
    checkpoint: str | None = None  # a state_dict (weights_only=True): for arch, or for a card's named source
    # The teacher card (kdpipe/teacher_card.py): a teacher handed over, used as it is (no train-teacher stage).
    # null source: the teacher is train-teacher's (data/teacher). Otherwise: a *.onnx file from any producer,
    # torchvision:<name>, timm:<name> or a zoo name (these three with checkpoint = its state_dict).
    source: str | None = None  # null: train-teacher's; a *.onnx file, torchvision:<name>, timm:<name> or a zoo name (README: I only have a teacher)
    input_size: int | None = Field(None, ge=4, le=1024)  # H = W of the teacher's input; null: read from the ONNX file
    channels: Literal[1, 3] | None = None  # null: read from the file (ONNX input, first conv of a state_dict)
    layout: Literal["NCHW", "NHWC"] | None = None  # the teacher's input layout; null: read from the ONNX input shape
    range: tuple[float, float] | None = None  # what the teacher's input values span, e.g. [0, 1] or [0, 255] (required)
    mean: list[float] | None = None  # the normalisation a caller applies before the teacher, (x - mean) / std, in
    std: list[float] | None = None  # units of `range`; null: none (both required keys of a card, null allowed)
    classes: list[str] | int | str | None = None  # names, a count, or a file (one per line / a JSON list); null: ONNX metadata
    torchscript_runs_code: bool = False  # accept a TorchScript archive: torch.jit.load RUNS CODE from the file

    @model_validator(mode="after")
    def _card(self):
        if self.range is not None and not self.range[1] > self.range[0]:
            raise ValueError(f"teacher.range must be [low, high] with high > low, got {list(self.range)}")
        if (self.mean is None) != (self.std is None):
            raise ValueError("teacher.mean and teacher.std go together (both null: no normalisation)")
        if self.std is not None and (any(v <= 0 for v in self.std) or len(self.std) != len(self.mean)):
            raise ValueError("teacher.std must be positive, one value per channel like teacher.mean")
        return self


class StudentCfg(_Section):
    arch: str = "digits_cnn_small"  # the student's architecture: a zoo name or any torchvision classification model


class BaselineCfg(TrainCfg):
    """The student's architecture trained from scratch on the real data (where it may be used)."""

    enabled: bool = True  # train the baseline (false: the stage writes a disabled spec)


STANDARD_STATS = "standard"  # synthesize.stats: the standard-normal prior, no file


class SynthesizeCfg(_Section):
    # buffer / schedule
    capacity: int = Field(4096, ge=16)  # synthetic samples kept (SSD-KD: ~10 % of the real set)
    rounds: int = Field(40, ge=1)  # synthesize-then-distill rounds
    batch_size: int = Field(256, ge=2)  # generated per round (enters the buffer: partial update)
    g_steps: int = Field(5, ge=1)  # generator steps per round (warm-started: Fast-DFKD)
    kd_steps: int = Field(20, ge=0)  # proxy-student KD steps per round (feeds the adversarial term)
    warmup_rounds: int = Field(5, ge=0)  # rounds without adversarial term
    # generator
    nz: int = Field(256, ge=8)  # latent code size of the generator
    ngf: int = Field(32, ge=8)  # generator width
    lr_g: float = Field(3e-3, gt=0)  # generator Adam learning rate
    lr_z: float = Field(1e-2, ge=0)  # 0: latent codes are not optimised
    # the generator's input: "noise" (z ~ N(0, I), optimised at lr_z) | "nayer": NAYER's noisy layer over a fixed
    # class embedding, re-drawn each round and trained at lr_g (kdpipe/synth/generator.py::NoisyLatent; lr_z unused)
    latent: Literal["noise", "nayer"] = "noise"
    # loss weights (0 switches a term off)
    w_ce: float = Field(1.0, ge=0)  # weight of CE to the sampled target classes
    w_bn: float = Field(10.0, ge=0)  # weight of the BN-statistics prior (DeepInversion)
    w_adv: float = Field(0.5, ge=0)  # weight of the adversarial teacher-student disagreement term
    w_act: float = Field(0.0, ge=0)  # DAFL activation term
    w_ie: float = Field(0.0, ge=0)  # DAFL information entropy (class balance; balanced_targets does this by default)
    w_tv: float = Field(0.0, ge=0)  # image prior (DeepInversion): total variation; stands in for w_bn without BN
    w_l2: float = Field(0.0, ge=0)  # image prior: ℓ2 of the image about mid-grey
    jitter: float = Field(0.0, ge=0, lt=0.5)  # DeepInversion's jitter: the teacher sees each generated image shifted by up to this fraction of its side; 0: off
    # the BN prior's targets for a teacher without BN: a file of the data owner's activation statistics (kdpipe
    # activation-stats); "standard": N(0, 1) per channel of every convolution's output (a folded BN at its initial
    # γ = 1, β = 0; kdpipe/synth/bn_hooks.py); null: none
    stats: str | None = None
    bn_momentum: float = Field(0.9, ge=0, lt=1)  # Fast: batch stats mixed with momentum
    # SSD-KD parts
    phi: bool = False  # modulating function φ (section phi) on the generator's adversarial term (off: see docs/benchmarks.md)
    phi_ce: bool = False  # ... and on the generator's CE term (the note's choice; pushes samples to high confidence)
    eviction: Literal["balanced", "fifo"] = "balanced"  # buffer: oldest of the largest class, or oldest
    # what the stage writes: the replay buffer as it ends (the last rounds' samples), or a uniform reservoir sample
    # of every round's samples (Algorithm R, kdpipe/synth/replay.py); the buffer feeds the proxy student either way
    keep: Literal["buffer", "reservoir"] = "buffer"
    balanced_targets: bool = False  # draw target classes inversely to the buffer histogram
    priority: bool = False  # prioritized replay δ (section replay) for the proxy student (off: see docs/benchmarks.md)
    meta: bool = False  # Reptile-style meta update of the generator (Fast's fast/meta warm start)
    meta_lr: float = Field(0.5, gt=0, le=1)  # Reptile step η of the meta update
    kd_lr: float = Field(0.05, gt=0)  # proxy student's SGD learning rate
    temperature: float = Field(4.0, gt=0)  # proxy student's KD temperature
    adam_beta1: float = Field(0.5, ge=0, lt=1)  # Adam β₁ of the generator and the latent codes (Fast: 0.5)
    adam_beta2: float = Field(0.999, ge=0, lt=1)  # Adam β₂ of the generator and the latent codes (Fast: 0.999)
    kd_momentum: float = Field(0.9, ge=0, lt=1)  # proxy student's SGD momentum
    kd_nesterov: bool = True  # proxy student's Nesterov momentum (when kd_momentum > 0)
    kd_weight_decay: float = Field(5e-4, ge=0)  # proxy student's SGD weight decay
    kd_batch_cap: int = Field(4, ge=1)  # proxy student's KD batch: min(batch_size, kd_batch_cap × samples in the buffer)


    @property
    def stats_file(self) -> str | None:
        """synthesize.stats when it names the data owner's file (not null, not "standard")."""
        return None if self.stats in (None, STANDARD_STATS) else self.stats


class ReplayCfg(_Section):
    """Prioritized replay δ (kdpipe/synth/replay.py), one setting for both users: synthesize's proxy student
    (synthesize.priority) and distill (distill.priority)."""

    alpha: float = Field(0.6, ge=0)  # prioritized replay: priority exponent α
    beta0: float = Field(0.4, ge=0, le=1)  # prioritized replay: importance-weight exponent β at the start (annealed to 1)
    iw_norm: Literal["max", "mean"] = "mean"  # importance weights / their batch mean (the loss keeps its scale) or max (Schaul et al.)
    eps: float = Field(1e-3, gt=0)  # prioritized replay: ε in the priority p_i = KL_i + ε


class PhiCfg(_Section):
    """SSD-KD's modulating function φ (kdpipe/synth/phi.py), one setting for both users: synthesize's generator
    and proxy student (synthesize.phi, synthesize.phi_ce) and distill (distill.phi)."""

    gamma: float = Field(2.0, ge=0)  # focusing exponent γ of φ
    clip: float = Field(5.0, gt=1)  # φ's upper clip


# keys that moved to a section of their own: an old key fails naming its new home (before any work)
MOVED = {"synthesize.alpha": "replay.alpha", "synthesize.beta0": "replay.beta0", "synthesize.iw_norm": "replay.iw_norm",
         "synthesize.priority_eps": "replay.eps", "synthesize.phi_gamma": "phi.gamma", "synthesize.phi_clip": "phi.clip"}


class ScheduleCfg(_Section):
    """A value over training (kdpipe.schedules.value); start/end None = the base value (e.g. distill.temperature)."""

    kind: Literal["constant", "linear", "cosine", "step"] = "constant"  # how the value moves over the steps
    start: float | None = Field(None, gt=0)  # value at the first step (null: the base value)
    end: float | None = Field(None, gt=0)  # value at the last step (null: the base value)
    milestones: list[float] = []  # step: fractions of training in (0, 1) where the value jumps towards end

    @model_validator(mode="after")
    def _milestones(self):
        if self.kind == "step" and (not self.milestones or not all(0 < m < 1 for m in self.milestones)):
            raise ValueError(f"kind 'step' needs milestones: fractions of training in (0, 1), got {self.milestones}")
        return self


class AlphaScheduleCfg(ScheduleCfg):
    start: float | None = Field(None, ge=0, le=1)  # α at the first step (null: distill.alpha)
    end: float | None = Field(None, ge=0, le=1)  # α at the last step (null: distill.alpha)


class DistillCfg(_Section):
    epochs: int = Field(10, ge=1)  # from the proxy student (init: synthesis); 40 from scratch (docs/benchmarks.md)
    batch_size: int = Field(128, ge=1)  # global batch
    lr: float = Field(0.05, gt=0)  # peak SGD learning rate (OneCycle)
    momentum: float = Field(0.9, ge=0, lt=1)  # SGD momentum
    nesterov: bool = True  # Nesterov momentum (when momentum > 0)
    weight_decay: float = Field(5e-4, ge=0)  # SGD weight decay
    pct_start: float = Field(0.15, gt=0, lt=1)  # OneCycle: the fraction of the steps spent warming up to lr
    temperature: float = Field(4.0, gt=0)  # KD temperature T (T² scales the loss)
    alpha: float = Field(1.0, ge=0, le=1)  # weight of KD; (1-alpha) on CE to the teacher's argmax
    priority: bool = False  # draw batches by prioritized replay δ over the synthetic set (off: docs/benchmarks.md)
    phi: bool = False  # weight per-sample KD by the modulating function φ (off: see docs/benchmarks.md)
    augment: bool = False  # random shifts of the synthetic images, re-labelled by the frozen teacher
    augment_shift: float = Field(0.125, gt=0, lt=0.5)  # with augment: shifts up to ±augment_shift of the image size
    flip: bool = False  # mirror each synthetic image left-right with probability ½, re-labelled by the frozen teacher
    # mixup of the batch's images, x = λ·x_i + (1 − λ)·x_j, λ ~ Beta(mixup, mixup), re-labelled by the frozen teacher
    # (function matching, Beyer et al. 2022); 0: off
    mixup: float = Field(0.0, ge=0)
    temperature_schedule: ScheduleCfg = ScheduleCfg()  # T over the steps (kdpipe/schedules.py); constant: temperature
    alpha_schedule: AlphaScheduleCfg = AlphaScheduleCfg()  # α over the steps; constant: alpha
    ce_weight: float | None = Field(None, ge=0)  # γ on CE; None: 1 − α (Hinton)
    feature_weight: float = Field(0.0, ge=0)  # β on the hint loss (kdpipe/feature_kd.py); 0: off
    feature_loss: Literal["mse", "at"] = "mse"  # mse on adapted features (FitNets) | attention transfer
    hints: list[tuple[str, str]] = []  # [teacher_module, student_module] pairs, by named_modules() name (first teacher)
    # routes (README "Objectives and routes"): what the student trains on; real|mixed make the stage not data-free
    data: Literal["synthetic", "real", "mixed"] = "synthetic"  # data/synthetic | the real train split | both
    real_fraction: float = Field(0.5, gt=0, lt=1)  # mixed: share of each batch drawn from the real train split
    finetune_epochs: int = Field(0, ge=0)  # last phase on hard labels (real ones when data is real|mixed); 0: off
    finetune_lr: float = Field(0.01, gt=0)  # learning rate of the fine-tune phase (cosine decay)
    # the student's start: "synthesis" = the proxy student trained alongside the generator (Fast-DFKD's student,
    # data/synthetic/student.pt) on the routes that read the synthetic set; the real route always starts from scratch
    init: Literal["synthesis", "scratch"] = "synthesis"
    # exponential moving average of the student's weights and BN buffers after every step (AveragedModel with
    # get_ema_multi_avg_fn): θ_ema ← d·θ_ema + (1 − d)·θ; the average is the student written; 0: off
    ema: float = Field(0.0, ge=0, lt=1)

    @model_validator(mode="after")
    def _hints(self):
        if self.feature_weight > 0 and not self.hints:
            raise ValueError("distill.feature_weight > 0 needs distill.hints: [teacher_module, student_module] pairs")
        return self


class TeacherRefCfg(_Section):
    """One member of the teacher ensemble (``teachers``, kdpipe/teachers.py)."""

    checkpoint: str | None = None  # None: the trained stage data/teacher; a folder: a trained stage (model.pt +
    #                                spec.json); a file: a state_dict / TorchScript archive for ``arch``
    arch: str | None = None  # needed with a checkpoint file; None: the folder's own
    weight: float = Field(1.0, gt=0)  # w_k in the average of the teachers' tempered probabilities


class ExportCfg(_Section):
    opset: int = Field(18, ge=13, le=23)  # ONNX opset of the exported student
    atol: float = Field(1e-4, gt=0)  # largest |onnxruntime − PyTorch| logit difference accepted
    int8: bool = True  # also data/export/student.int8.onnx: static QDQ INT8, calibrated on synthetic samples only
    calibration_samples: int = Field(512, ge=1)  # synthetic samples drawn (seeded) for INT8 calibration
    # INT8 activations: int8 = S8S8 (onnxruntime's recommended default), uint8 = U8S8 (the faster kernels on
    # some x86 CPUs with VNNI: ResNet-8 at batch 64 on an AVX-512/VNNI EPYC 1.93x FP32's speed vs 0.80x, bench/int8.py)
    int8_activations: Literal["int8", "uint8"] = "int8"


class EvaluateCfg(_Section):
    """evaluate without real data (data.name: none): fidelity to the teacher on a held-out synthetic set (kdpipe/fidelity.py)."""

    fidelity_samples: int = Field(2048, ge=64)  # fresh images of the final generator, from their own seed
    ece_bins: int = Field(15, ge=2)  # bins of the expected calibration error against the teacher


class SpeedCfg(_Section):
    """Speed knobs (kdpipe/accel.py) of the training stages (train-teacher, baseline, synthesize, distill).
    "auto" = on for CUDA, off on CPU, so a CPU run is bit-identical with or without them; true/false
    forces a knob on any device."""

    amp: Literal["auto", "bf16", "off"] = "auto"  # bf16 autocast (auto: CUDA only; bf16: any device)
    channels_last: Literal["auto"] | bool = "auto"  # NHWC memory format for model and inputs
    compile: bool = False  # torch.compile the training forward (first steps pay the compile)
    cudnn_benchmark: bool = True  # CUDA: let cuDNN pick the fastest conv kernels (not bit-reproducible)
    fused: bool = True  # CUDA: fused SGD kernel (torch.optim.SGD(fused=True))
    data_on_device: Literal["auto"] | bool = "auto"  # whole split on the GPU (auto: if under a quarter of its memory)
    workers: int = Field(4, ge=0)  # DataLoader workers (pinned memory) when the split stays on the host
    sync_bn: bool = True  # multi-process (torchrun): BatchNorm statistics over the global batch, as with 1 process

    @field_validator("amp", mode="before")
    @classmethod
    def _amp_off(cls, v):  # YAML 1.1 reads an unquoted `off` (amp: off, --set speed.amp=off) as false
        return "off" if v is False else v


class TrackingCfg(_Section):
    enabled: bool = True  # log to MLflow
    uri: str | None = None  # None: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db in the project
    experiment: str = "kdpipe"  # MLflow experiment name
    registered_model: str | None = "kdpipe-student"  # export registers the ONNX student here (None: no)
    alias: str | None = "candidate"  # ... and points this alias at the new version


class PromoteCfg(_Section):
    """kdpipe promote (kdpipe/promote.py, docs/promote.md): the gate a registered version's evaluate metrics (its tags)
    must pass before ``alias`` moves to it. null = not checked; a gate with every threshold null is a config error."""

    alias: str = "champion"  # the alias moved to a version that passes the gate (must differ from tracking.alias)
    # lowest student test accuracy (tag student_accuracy; real data only); the digits default gives 0.973-0.986 (README)
    min_student_accuracy: float | None = Field(0.95, ge=0, le=1)
    # lowest student-teacher agreement on the held-out synthetic set (tag fidelity_agreement; no real data only): that
    # set is adversarial and reads 0.63-0.73 where real agreement is 0.95-0.99 (docs/benchmarks.md), hence 0.6
    min_fidelity_agreement: float | None = Field(0.6, ge=0, le=1)
    # lowest student_accuracy / teacher_accuracy (real data only); digits default 0.978 / 0.992 = 0.986
    min_student_over_teacher: float | None = Field(0.95, ge=0)
    # largest ONNX-vs-PyTorch logit difference (tag max_abs_diff; any route); export.atol's default (measured 4e-6)
    max_onnx_abs_diff: float | None = Field(1e-4, gt=0)


class ResumeCfg(_Section):
    """Resume checkpoints of the long stages (train-teacher, baseline, synthesize, distill): kdpipe/resume.py."""

    enabled: bool = True  # checkpoint long stages and resume them after a kill
    every: int = Field(5, ge=1)  # epochs (train-teacher, baseline, distill) or rounds (synthesize) between checkpoints
    dir: str = "data/.resume"  # scratch, not a DVC output (git-ignored); <dir>/<stage>.pt


class AuditCfg(_Section):
    """kdpipe audit-memorization (run by the data owner): synthetic samples vs their nearest real ones."""

    pixel_threshold: float = Field(0.05, gt=0)  # flag a synthetic sample whose nearest real one is closer (RMSE, [0,1] pixels)
    pairs: int = Field(16, ge=1)  # closest pairs drawn in data/reports/memorization.png


class Config(_Section):
    seed: int = 0  # seeds every random stream (splits, init, synthesis, batches)
    device: Literal["auto", "cpu", "cuda"] = "auto"  # auto: CUDA when available, else CPU
    data: DataCfg = DataCfg()
    teacher: TeacherCfg = TeacherCfg()
    student: StudentCfg = StudentCfg()
    teachers: list[TeacherRefCfg] = []  # empty: the one teacher of data/teacher; else the ensemble, this list
    baseline: BaselineCfg = BaselineCfg()
    synthesize: SynthesizeCfg = SynthesizeCfg()
    replay: ReplayCfg = ReplayCfg()  # prioritized replay δ (synthesize.priority, distill.priority)
    phi: PhiCfg = PhiCfg()  # the modulating function φ (synthesize.phi, synthesize.phi_ce, distill.phi)
    distill: DistillCfg = DistillCfg()
    evaluate: EvaluateCfg = EvaluateCfg()
    export: ExportCfg = ExportCfg()
    speed: SpeedCfg = SpeedCfg()
    tracking: TrackingCfg = TrackingCfg()
    promote: PromoteCfg = PromoteCfg()
    resume: ResumeCfg = ResumeCfg()
    audit: AuditCfg = AuditCfg()

    @model_validator(mode="after")
    def _private(self):
        if self.data.name == "none":
            if not self.teacher.source:
                raise ValueError("data.name 'none' (no real data): the teacher must come from its card: set "
                                 "teacher.source (a *.onnx file, torchvision:<name>, timm:<name> or a zoo name)")
            if self.distill.data != "synthetic":
                raise ValueError(f"distill.data '{self.distill.data}' needs real data, but data.name is 'none'")
        if self.data.private and self.distill.data != "synthetic":
            raise ValueError(f"distill.data '{self.distill.data}' trains on the real data, but data.private is true: "
                             "use distill.data=synthetic (data-free) or data.private=false")
        return self

    def digest(self) -> str:
        """sha256 of the canonical JSON of every parameter (the 'params hash')."""
        blob = json.dumps(self.model_dump(mode="json"), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()


def _fmt_error(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "<root>"
        if e["type"] == "extra_forbidden" and key in MOVED:
            lines.append(f"{key} moved to {MOVED[key]}: set '{MOVED[key]}' instead of '{key}'")
        elif e["type"] == "extra_forbidden":
            lines.append(f"unknown key '{key}'" + did_you_mean(key, [r[0] for r in describe()]))
        elif e["type"] == "value_error" and isinstance(e.get("input"), dict):  # a section's validator: its message names the keys
            lines.append(e["msg"].removeprefix("Value error, ") if key == "<root>" else f"{key}: {e['msg'].removeprefix('Value error, ')}")
        else:
            lines.append(f"key '{key}': {e['msg']} (got {e.get('input')!r})")
    return "invalid parameters: " + "; ".join(lines)


def _parse_value(text: str):
    """--set values are YAML scalars: 8, 0.5, true, null, digits, [1, 2]."""
    return yaml.safe_load(text) if text != "" else ""


def apply_override(tree: dict, item: str) -> None:
    if "=" not in item:
        raise ConfigError(f"override '{item}' is not of the form key=value")
    key, value = item.split("=", 1)
    parts = key.strip().split(".")
    node = tree
    for p in parts[:-1]:
        child = node.setdefault(p, {})
        if not isinstance(child, dict):
            raise ConfigError(f"unknown key '{key}': '{p}' is not a section")
        node = child
    node[parts[-1]] = _parse_value(value)


def load_config(path: str | Path | None = "params.yaml", overrides: list[str] | tuple = ()) -> Config:
    tree: dict = {}
    if path is not None:
        p = Path(path)
        if not p.exists():
            raise ConfigError(f"config file '{p}' does not exist" + (
                ": this folder is not a kdpipe project; make one with 'kdpipe init DIR --teacher FILE' (a teacher-only "
                "project: no real data needed), or pass --config" if str(path) == "params.yaml" else ""))
        try:
            tree = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config file '{p}' is not valid YAML: {e}") from None
        if not isinstance(tree, dict):
            raise ConfigError(f"config file '{p}' must hold a mapping at top level")
    for item in overrides:
        apply_override(tree, item)
    return validate(tree)


def validate(tree: dict) -> Config:
    """The parameter tree as a Config; ConfigError naming every bad key."""
    try:
        return Config.model_validate(tree)
    except ValidationError as e:
        raise ConfigError(_fmt_error(e)) from None


PARAMS_HEADER = (
    "# kdpipe parameters: mirrors kdpipe/config.py (the one schema). Embedded default: scikit-learn digits.\n"
    "# Override: kdpipe run --no-dvc --set key=value, or dvc exp run -S key=value.\n"
)


def dump_params() -> str:
    """params.yaml's text: the schema's defaults (``python -m kdpipe.config > params.yaml``)."""
    return PARAMS_HEADER + yaml.safe_dump(Config().model_dump(mode="json"), sort_keys=False)


if __name__ == "__main__":
    print(dump_params(), end="")


def _comments() -> dict[tuple[str, str], str]:
    """(class name, field) -> the comment after the field on its line, else the comment lines just above it:
    the schema's one-line meanings (``kdpipe params``)."""
    import io
    import tokenize

    out, cls, field, block = {}, None, None, []
    for tok in tokenize.generate_tokens(io.StringIO(Path(__file__).read_text()).readline):
        if tok.type == tokenize.NAME and tok.start[1] == 0:
            cls = None
            if tok.string == "class":
                cls = ""
        elif tok.type == tokenize.NAME and cls == "":
            cls = tok.string
        elif tok.type == tokenize.NAME and tok.start[1] == 4 and cls and field is None:
            field = tok.string
        elif tok.type == tokenize.COMMENT:
            text = tok.string.lstrip("# ").strip()
            if field:
                out.setdefault((cls, field), text)
            elif tok.start[1] == 4:
                block.append(text)
        elif tok.type == tokenize.NEWLINE:
            if field and block:
                out.setdefault((cls, field), " ".join(block))
            field, block = None, []
    return out


def _bounds(field) -> str:
    parts = []
    for m in field.metadata:
        for attr, sym in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<")):
            if getattr(m, attr, None) is not None:
                parts.append(f"{sym} {getattr(m, attr)}")
    return ", ".join(parts)


def _type_name(ann) -> str:
    text = str(ann).replace("typing.", "").replace("kdpipe.config.", "")
    return text.removeprefix("<class '").removesuffix("'>")


def describe(section: str | None = None) -> list[tuple[str, str, str, str, str]]:
    """(key, type, default, range, meaning) of every parameter (of one section), from the schema itself."""
    notes = _comments()

    def walk(model, prefix):
        for name, f in model.model_fields.items():
            key = f"{prefix}{name}"
            sub = f.annotation if isinstance(f.annotation, type) and issubclass(f.annotation, BaseModel) else None
            if sub is not None:
                yield from walk(sub, key + ".")
                continue
            owner = next(c.__name__ for c in model.__mro__ if name in getattr(c, "__annotations__", {}))
            default = f.default if f.default_factory is None else f.default_factory()
            yield (key, _type_name(f.annotation), json.dumps(default if not isinstance(default, BaseModel)
                                                                 else default.model_dump(mode="json")),
                   _bounds(f), notes.get((owner, name), ""))

    rows = list(walk(Config, ""))
    if section:
        rows = [r for r in rows if r[0] == section or r[0].startswith(section + ".")]
        if not rows:
            raise ConfigError(f"unknown section '{section}'{did_you_mean(section, [r[0] for r in walk(Config, '')])}")
    return rows


def did_you_mean(key: str, known: list[str]) -> str:
    import difflib

    close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""
