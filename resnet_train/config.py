"""The config schema (one dataclass field per key: type, default, help) and its loading.

Only this module reads YAML, and only with ``yaml.safe_load``. A config is loaded as
defaults <- ``base:`` chain <- file <- command-line ``key=value`` overrides, then validated.
The result is a frozen ``Config``; ``--help``, ``--print-config`` and validation all come
from the dataclasses below.

Each key also says what a change of it does when a run resumes (``opt(resume=...)``, one of
``RESUME_CLASSES``): ``resume_changes(stored, cfg)`` compares a checkpoint's stored config
with the new one and sorts the changes into applied and refused (``ResumeDiff``);
``resume_refusal`` and ``resume_notice`` give the one-line texts the trainer raises / prints.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal

import yaml

from .errors import ConfigError


@dataclass(frozen=True)
class ResumeClass:
    """What a changed key does when a run resumes from a checkpoint (see RESUME_CLASSES)."""
    label: str                                  # the marker in --help and the README
    meaning: str                                # one line for the README legend
    refused: bool = False                       # refused unless in checkpoint.allow_changes ...
    only_if: tuple[str, Any] | None = None   # ... only when the NEW config has key == value
    why: str = ""                               # added to the refusal when only_if applies
    compared: bool = True


# Every schema key names one of these in opt(resume=...). The conditional classes are the
# keys that are harmless except under one schedule; the condition is read from the new config
# because it is the new schedule that drives every later step.
RESUME_CLASSES: dict[str, ResumeClass] = {
    "safe": ResumeClass("safe", "applied on resume and listed in one notice line"),
    "state": ResumeClass("refused", "changes what the saved state means: refused on resume "
                         "unless allowed by checkpoint.allow_changes", refused=True),
    "length": ResumeClass(
        "refused under cosine", "the training length: applied on resume, except with "
        "schedule.name=cosine (refused unless allowed)", refused=True,
        only_if=("schedule.name", "cosine"),
        why="the cosine lr curve is defined by the training length"),
    "eval": ResumeClass(
        "refused under plateau", "validation-only: applied on resume, except with "
        "schedule.name=plateau (refused unless allowed)", refused=True,
        only_if=("schedule.name", "plateau"),
        why="the plateau schedule's saved best error and bad-epoch count were measured with "
            "the old validation settings"),
    "ignored": ResumeClass("not compared", "describes the resume itself; never compared",
                           compared=False),
}


def opt(default: Any, help: str, *, resume: str, min: float | None = None,
        min_open: bool = False, max: float | None = None, max_open: bool = False):
    """A schema field: default, one-line help, what a change of it does on resume (a name in
    RESUME_CLASSES; required, so that no key goes unclassified) and an optional numeric range."""
    if resume not in RESUME_CLASSES:
        raise ValueError(f"opt(resume={resume!r}): expected one of {', '.join(RESUME_CLASSES)}")
    meta = {"help": help, "resume": resume, "min": min, "min_open": min_open, "max": max,
            "max_open": max_open}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata=meta)
    return field(default=default, metadata=meta)


# --------------------------------------------------------------------------- schema


@dataclass(frozen=True)
class RunConfig:
    name: str = opt("run", "run name; the run directory defaults to runs/<name>", resume="safe")
    dir: str | None = opt(None, "run directory (default runs/<run.name>)", resume="safe")
    seed: int = opt(0, "seed for weights, data order and augmentation", resume="state")
    deterministic: bool = opt(False, "deterministic kernels; CPU resume is then bitwise exact",
                              resume="safe")
    device: Literal["auto", "cpu", "cuda"] = opt(
        "auto", "training device; auto = cuda if available", resume="safe")
    log_every: int = opt(50, "steps between log points: per-iteration train loss/error and lr "
                             "(metrics.jsonl, TensorBoard iter/*) and progress values",
                         resume="safe", min=1)
    diagnostics_every: int = opt(
        0, "every N steps: per-stage gradient norms, per-block ||F(x)||/||x|| and BN gamma "
        "histograms to TensorBoard diag/* (0 = off, no cost)", resume="safe", min=0)
    progress: Literal["auto", "bar", "lines", "none"] = opt(
        "auto", "console progress: tqdm bar on a TTY, plain lines otherwise (auto)", resume="safe")
    threads: int | None = opt(
        None, "intra-op CPU threads of each process; default: OMP_NUM_THREADS if set, else on "
        "CPU with folder data the usable cores minus data.workers (>= 1), else torch's default",
        resume="safe", min=1)
    keep_host_memory: bool = opt(
        True, "on CPU (glibc): freed tensor memory stays in the process instead of being "
        "faulted in again every step (faster; the resident size stays at its peak)",
        resume="safe")


@dataclass(frozen=True)
class ModelConfig:
    arch: str = opt("resnet20", "architecture, e.g. resnet20, resnet50, plain34, preact_resnet164",
                    resume="state")
    variant: Literal["v1", "v1.5"] | None = opt(
        None, "ImageNet bottleneck stride: v1 in the 1x1 (paper), v1.5 in the 3x3 (default)",
        resume="state")
    shortcut: Literal["A", "B", "C", "none"] | None = opt(
        None, "A zero-pad identity, B projection on change, C projection always, none = plain",
        resume="state")
    unit: Literal["original", "bn_after_add", "relu_before_add", "relu_only_preact",
                  "full_preact"] | None = opt(
        None, "residual unit order (He et al. 2016 Fig. 4)", resume="state")
    # The weights were initialised with it: the resolved config must keep saying so.
    zero_init_residual: bool = opt(
        False, "start blocks as identities: zero the last BN gamma of F (original: block = "
        "relu(x); relu_only_preact) or F's last conv (full_preact); refused for bn_after_add, "
        "relu_before_add", resume="state")
    shortcut_variant: Literal["scale_shortcut", "scale_both", "exclusive_gating",
                              "exclusive_gating_b0", "exclusive_gating_b7", "shortcut_gating",
                              "shortcut_gating_b0", "conv", "dropout"] | None = opt(
        None, "He et al. 2016 Table 1 shortcut (scaling, gating with b_g -6/0/-7, 1x1 conv, "
        "dropout 0.5); null = identity", resume="state")
    width: int | None = opt(None, "base width override (64 ImageNet, 16 CIFAR)",
                               resume="state", min=1)
    log_block_norms: bool = opt(False, "log ||F(x)||/||x|| per residual block to TensorBoard",
                                resume="safe")
    # Fine-tuning. A run from weights is a new run (position, optimizer and schedule start
    # fresh); on resume the checkpoint's weights win, but the record must keep saying where
    # the run started from, hence "state".
    weights: str | None = opt(
        None, "initialise from a state-dict file, a resnet-train checkpoint or torchvision:NAME "
        "(e.g. torchvision:IMAGENET1K_V2); a head of another class count is replaced",
        resume="state")
    weights_from: Literal["native", "akamaster"] = opt(
        "native", "layout of model.weights: native (ours = torchvision's key names) or akamaster "
        "(akamaster/pytorch_resnet_cifar10 checkpoints, converted exactly)", resume="state")
    freeze: list[str] = opt(
        [], "modules not trained, e.g. [conv1, bn1, layer1]; their BatchNorm statistics are "
        "frozen too", resume="state")


@dataclass(frozen=True)
class TrainAugConfig:
    aug: Literal["paper", "random_resized_crop", "cifar", "none"] = opt(
        "paper", "train augmentation: paper scale aug, random_resized_crop, cifar pad-crop, none",
        resume="state")
    scale: list[int] = opt([256, 480], "paper aug: short side drawn from [min, max]",
                           resume="state")
    crop: int = opt(224, "train crop size", resume="state", min=1)
    rrc_scale: list[float] = opt([0.08, 1.0], "random_resized_crop area range", resume="state")
    rrc_ratio: list[float] = opt([0.75, 1.3333333], "random_resized_crop aspect-ratio range",
                                 resume="state")
    flip: bool = opt(True, "random horizontal flip, p=0.5", resume="state")
    pad: int = opt(4, "cifar aug: zero padding before the random crop", resume="state", min=0)
    pca_lighting: float = opt(0.0, "AlexNet PCA lighting alpha std (paper: 0.1)",
                              resume="state", min=0)
    color_jitter: float = opt(0.0, "brightness/contrast/saturation jitter strength",
                              resume="state", min=0)


@dataclass(frozen=True)
class ValAugConfig:
    # Not validation-only: folder datasets train at it with train.aug=none, and their
    # pixel-mean image is computed at it.
    resize: int = opt(256, "validation short side", resume="state", min=1)
    crop: int = opt(224, "validation centre crop", resume="eval", min=1)
    protocol: Literal["center", "ten_crop", "multiscale"] = opt(
        "center", "test views: centre crop, 10-crop, or full images at val.scales (folders)",
        resume="eval")
    scales: list[int] = opt([224, 256, 384, 480, 640],
                            "multiscale protocol: short sides of the fully-convolutional test",
                            resume="eval", min=1)
    flip: bool = opt(False, "multiscale protocol: also average the horizontal flips",
                     resume="eval")
    # The papers' numbers are measured with their test protocol (DRL Tables 2, 3: 10-crop;
    # Table 4: multi-scale), too costly for every epoch: one more pass after the last epoch.
    final_protocol: Literal["same", "center", "ten_crop", "multiscale"] = opt(
        "same", "protocol of one more evaluation after the last epoch (the paper's test); "
        "same = none beyond data.val.protocol", resume="safe")


@dataclass(frozen=True)
class DataConfig:
    dataset: Literal["synthetic", "synthetic_imagenet", "cifar10", "cifar100", "imagenet",
                     "folder"] = opt("synthetic", "dataset", resume="state")
    root: str | None = opt(None, "dataset root directory (not needed for synthetic)",
                              resume="safe")
    batch_size: int = opt(256, "GLOBAL batch size, split across ranks", resume="state", min=1)
    workers: int = opt(4, "loader worker processes per rank (folder datasets)", resume="safe",
                       min=0)
    num_classes: int | None = opt(None, "number of classes (default: from the dataset)",
                                     resume="state", min=1)
    image_size: int = opt(32, "synthetic: image side in pixels", resume="state", min=8)
    train_samples: int = opt(20000, "synthetic: training images per epoch", resume="state", min=1)
    val_samples: int = opt(2000, "synthetic: validation images (fixed set)", resume="eval", min=1)
    synthetic_classes: int = opt(10, "synthetic: number of classes (10..16)", resume="state",
                                 min=10, max=16)
    train_dir: str = opt("train", "folder datasets: training split directory", resume="safe")
    val_dir: str = opt("val", "folder datasets: validation split directory", resume="eval")
    val_split: Literal["test", "holdout"] = opt(
        "test", "CIFAR validation: the test set, or a seeded holdout from train (paper 45k/5k)",
        resume="state")
    holdout_size: int = opt(5000, "CIFAR holdout: images held out of train", resume="state",
                            min=1)
    holdout_seed: int = opt(0, "seed of the CIFAR holdout and of data.val_fraction's split "
                            "(fixed across runs)", resume="state")
    val_fraction: float = opt(
        0.0, "folder datasets: hold out this fraction of each train/ class as the validation "
        "split (stratified, seeded by data.holdout_seed; val/ is then not read)",
        resume="state", min=0, max=1, max_open=True)
    cifar100_labels: Literal["fine", "coarse"] = opt(
        "fine", "CIFAR-100: the 100 fine labels or the 20 coarse superclasses", resume="state")
    download: bool = opt(False, "CIFAR: download and verify the archive if missing",
                         resume="safe")
    normalize: Literal["channel", "pixel_mean"] = opt(
        "channel", "mean subtraction per channel, or the per-pixel mean image of the train set",
        resume="state")
    mean: list[float] | None = opt(None, "per-channel mean in [0,1] (default: dataset's)",
                                      resume="state")
    std: list[float] | None = opt(None, "per-channel std in [0,1] (default: dataset's)",
                                     resume="state")
    divide_std: bool = opt(True, "divide by the std after mean subtraction", resume="state")
    # The cached mean image is keyed by it: a change recomputes a different normalisation.
    pixel_mean_samples: int = opt(
        10000, "folder pixel_mean: training images averaged (evenly spaced; 0 = all)",
        resume="state", min=0)
    on_bad_image: Literal["skip", "error"] = opt(
        "skip", "unreadable image: skip (report it; a training batch gets another image in its "
        "place, a validation pass does not count it) or error (stop with the path)",
        resume="safe")
    # Off: every crop equals torchvision's resize-then-crop within rounding. On: a JPEG crop
    # that shrinks 2x or more is decoded at 1/2..1/8 scale in the DCT (several times faster
    # on big photos; on a 512 px photo halved the pixels differ by about 2 grey levels).
    jpeg_draft: bool = opt(False, "folder JPEGs: DCT-scaled decode when a crop shrinks >= 2x "
                           "(faster on big photos, not torchvision's exact pixels)",
                           resume="state")
    # device: workers only read the files; the batch is decoded by one decode_jpeg call on
    # the training device (nvjpeg on CUDA), for GPUs faster than the CPU cores can decode.
    decode: Literal["cpu", "device"] = opt(
        "cpu", "folder JPEGs: decode in the loader workers (cpu, torchvision's exact pixels) or "
        "on the training device (device: batched nvjpeg on CUDA; about a grey level off)",
        resume="state")
    pin_memory: bool = opt(True, "pinned host memory for loader batches (CUDA)", resume="safe")
    prefetch: int = opt(4, "batches prefetched per worker", resume="safe", min=1)
    train: TrainAugConfig = field(default_factory=TrainAugConfig)
    val: ValAugConfig = field(default_factory=ValAugConfig)


@dataclass(frozen=True)
class OptimConfig:
    lr: float = opt(0.1, "learning rate for the global batch", resume="state", min=0,
                    min_open=True)
    momentum: float = opt(0.9, "SGD momentum", resume="state", min=0, max=1, max_open=True)
    weight_decay: float = opt(1e-4, "L2 weight decay", resume="state", min=0)
    nesterov: bool = opt(False, "Nesterov momentum", resume="state")
    no_decay_bn_bias: bool = opt(False, "no weight decay on BN parameters and biases",
                                 resume="state")
    backbone_lr_scale: float = opt(
        1.0, "lr factor for every parameter outside the classifier head fc (fine-tuning: e.g. "
        "0.1 for pre-trained layers)", resume="state", min=0)
    lr_scaling: Literal["none", "linear"] = opt("none", "linear: lr x global_batch / 256",
                                                resume="state")


@dataclass(frozen=True)
class ScheduleConfig:
    name: Literal["constant", "step", "multistep", "plateau", "cosine"] = opt(
        "multistep", "lr schedule", resume="state")
    unit: Literal["epoch", "iter"] = opt("epoch", "unit of step_size / milestones",
                                         resume="state")
    step_size: int = opt(30, "step: decay every step_size units", resume="state", min=1)
    milestones: list[int] = opt([100, 150], "multistep: decay at these epochs / iterations",
                                resume="state")
    gamma: float = opt(0.1, "decay factor", resume="state", min=0, min_open=True, max=1)
    patience: int = opt(5, "plateau: epochs without improvement before a decay",
                        resume="state", min=0)
    threshold: float = opt(1e-3, "plateau: minimal absolute decrease of val error",
                           resume="state", min=0)
    min_lr: float = opt(0.0, "lower bound of the lr (plateau, cosine)", resume="state", min=0)
    warmup: int = opt(0, "warm-up length (warmup_unit) starting at warmup_start_factor x lr",
                      resume="state", min=0)
    warmup_shape: Literal["linear", "constant"] = opt(
        "linear", "warm-up: linear ramp to lr, or constant factor (He et al. 2016: 0.01 for "
        "400 iterations)", resume="state")
    warmup_unit: Literal["epoch", "iter"] = opt("epoch", "unit of the warm-up length",
                                                resume="state")
    warmup_start_factor: float = opt(0.1, "lr factor at the start of the warm-up",
                                     resume="state", min=0)
    low_lr_until_error: float | None = opt(
        None, "ResNet-110 warm-up: lr x low_lr_factor until train error < this",
        resume="state", min=0, max=1)
    low_lr_factor: float = opt(0.1, "ResNet-110 warm-up: lr factor while the error is high",
                               resume="state", min=0, min_open=True)


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = opt(160, "training epochs", resume="length", min=1)
    iterations: int | None = opt(None, "training length in iterations (overrides epochs)",
                                    resume="length", min=1)
    amp: Literal["auto", "none", "bf16", "fp16"] = opt("auto", "mixed precision", resume="safe")
    channels_last: Literal["auto", "true", "false"] = opt(
        "auto", "NHWC memory format; auto = on CPU, and on CUDA with amp", resume="safe")
    compile: bool = opt(False, "torch.compile the model", resume="safe")
    label_smoothing: float = opt(0.0, "label smoothing of the objective (the logged train "
                                 "loss stays plain cross-entropy)", resume="state", min=0, max=1,
                                 max_open=True)
    # BatchNorm sees micro-batches: a change alters the training maths, not just the memory.
    accum_steps: int = opt(1, "gradient accumulation micro-steps per optimizer step",
                           resume="state", min=1)
    max_bad_steps: int = opt(5, "consecutive skipped (non-finite) steps before stopping; fp16 "
                                "allows 16 more while the grad scaler calibrates",
                             resume="safe", min=1)
    # The plateau rule counts validated epochs: its saved bad-epoch count is in this unit.
    eval_every: int = opt(1, "validate every N epochs (and always at the end)", resume="eval",
                          min=1)
    # The running statistics are an average over the last ~10 steps' weights; early on, at
    # lr 0.1, a plain net compounds their lag layer by layer (a bf16 plain-20 scored 0.44
    # val top-1 with them, 0.82 with these; README "Precise BatchNorm statistics").
    precise_bn: int = opt(0, "recompute BatchNorm statistics over this many training batches "
                          "before each epoch-end validation and save (0 = off)", resume="eval",
                          min=0)


@dataclass(frozen=True)
class CheckpointConfig:
    resume: str = opt("auto", "auto: newest in the run dir; a path: seeds a run dir with no "
                              "checkpoint of its own; none: fresh start (refused over checkpoints)",
                      resume="ignored")
    every_steps: int = opt(0, "also save last.pt every N steps (0 = off)", resume="safe", min=0)
    every_epochs: int = opt(0, "keep epoch_NNN.pt every N epochs (0 = off)", resume="safe",
                            min=0)
    keep_last: int = opt(3, "epoch_NNN.pt files kept (0 = all)", resume="safe", min=0)
    signals: list[str] = opt(["SIGTERM", "SIGUSR1"], "signals that save last.pt and exit",
                             resume="safe")
    signal_check_every: int = opt(10, "DDP: steps between agreeing on a received signal",
                                  resume="safe", min=1)
    allow_changes: list[str] = opt(
        [], "keys refused on resume that may change anyway, e.g. [optim.weight_decay]; a "
            "section (optim) allows all its keys, all allows every change", resume="ignored")


@dataclass(frozen=True)
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)

    @property
    def run_dir(self) -> str:
        return self.run.dir or os.path.join("runs", self.run.name)


# --------------------------------------------------------------------------- introspection


def _is_section(tp) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _hints(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def iter_keys(cls=Config, prefix: str = ""):
    """Yield (dotted_key, type, field) for every leaf key of the schema."""
    hints = _hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if _is_section(tp):
            yield from iter_keys(tp, f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}", tp, f


def type_name(tp) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Union or origin is types.UnionType:
        inner = [a for a in args if a is not type(None)]
        return f"{type_name(inner[0])} or null"
    if origin is Literal:
        return "one of " + "|".join(str(a) for a in args)
    if origin is list:
        return f"list[{type_name(args[0])}]"
    return getattr(tp, "__name__", str(tp))


def _default_of(f) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    return f.default_factory()


def resume_class(key: str) -> ResumeClass:
    """The ResumeClass of a dotted leaf key (KeyError if there is no such key)."""
    for k, _, f in iter_keys():
        if k == key:
            return RESUME_CLASSES[f.metadata["resume"]]
    raise KeyError(key)


def help_text() -> str:
    """Every key with its type, default, help and what a change does on resume: the body of
    ``resnet-train --help``."""
    lines = []
    for key, tp, f in iter_keys():
        default = _default_of(f)
        label = RESUME_CLASSES[f.metadata["resume"]].label
        lines.append(f"  {key} ({type_name(tp)}, default {_yaml_scalar(default)}) "
                     f"[resume: {label}]\n      {f.metadata['help']}")
    lines.append("\n  [resume: ...] is what a changed key does when a run resumes:")
    lines += [f"    {c.label}: {c.meaning}" for c in RESUME_CLASSES.values()]
    return "\n".join(lines)


def _yaml_scalar(v: Any) -> str:
    """A value in YAML flow style, on one line (``[1, 2]``, ``null``, ``auto``)."""
    text = yaml.safe_dump(v, default_flow_style=True, width=float("inf"))
    return text.strip().removesuffix("...").strip().replace("\n", " ")


# --------------------------------------------------------------------------- coercion


def _to_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "yes", "on", "1"):
        return True
    if isinstance(value, str) and value.lower() in ("false", "no", "off", "0"):
        return False
    raise ValueError


def _to_int(value: Any) -> int:
    if isinstance(value, bool):
        raise ValueError
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str):
        try:
            return int(value.replace("_", ""))
        except ValueError:
            f = float(value)  # "1e3"; a ValueError here is the caller's "bad value"
            if f.is_integer():
                return int(f)
    raise ValueError


def _to_float(value: Any) -> float:
    if isinstance(value, bool):
        raise ValueError
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):  # YAML 1.1 reads "1e-4" as a string
        return float(value)
    raise ValueError


def _to_str(value: Any) -> str:
    if isinstance(value, (str, int, float)) and not isinstance(value, bool):
        return str(value)
    raise ValueError


# Scalar types: a converter each, raising ValueError for a value of the wrong kind.
_SCALARS = {bool: _to_bool, int: _to_int, float: _to_float, str: _to_str}


def _coerce(value: Any, tp, key: str) -> Any:
    """Convert a YAML or command-line value to the declared type, or raise ConfigError."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)

    def bad():
        return ConfigError(f"{key}: expected {type_name(tp)}, got {value!r}")

    if origin is typing.Union or origin is types.UnionType:
        if value is None or (isinstance(value, str) and value.lower() in ("null", "none", "~")
                             and str not in args):
            return None
        inner = [a for a in args if a is not type(None)][0]
        try:
            return _coerce(value, inner, key)
        except ConfigError:
            raise bad() from None
    if origin is Literal:
        for a in args:
            if value == a or (isinstance(value, bool) and str(value).lower() == a) or (
                    isinstance(value, (int, float)) and not isinstance(value, bool)
                    and str(value) == a):
                return a
        raise ConfigError(f"{key}: {value!r} is not one of {', '.join(map(str, args))}")
    if origin is list:
        if isinstance(value, str):
            parsed = _parse_scalar(value)
            value = parsed if isinstance(parsed, list) else [parsed]
        if not isinstance(value, (list, tuple)):
            raise bad()
        return [_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)]
    if tp not in _SCALARS:
        raise bad()
    try:
        return _SCALARS[tp](value)
    except ValueError:
        raise bad() from None


def _parse_scalar(text: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


# --------------------------------------------------------------------------- building


def _all_keys() -> list[str]:
    keys = [k for k, _, _ in iter_keys()]
    sections = {k.rsplit(".", 1)[0] for k in keys if "." in k}
    return keys + sorted(sections)


def _unknown(key: str) -> ConfigError:
    close = difflib.get_close_matches(key, _all_keys(), n=1, cutoff=0.5)
    if not close:  # a misspelt leaf under the right section
        leaf = key.rsplit(".", 1)[-1]
        close = difflib.get_close_matches(leaf, [k.rsplit(".", 1)[-1] for k in _all_keys()], n=1)
        close = [k for k in _all_keys() if close and k.endswith("." + close[0])][:1]
    hint = f"; did you mean '{close[0]}'?" if close else ""
    return ConfigError(f"unknown config key '{key}'{hint}")


def _build(cls, values: dict[str, Any], prefix: str = ""):
    hints = _hints(cls)
    kwargs = {}
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        tp = hints[f.name]
        if _is_section(tp):
            sub = values.get(f.name, {})
            if sub is None:
                sub = {}
            if not isinstance(sub, dict):
                raise ConfigError(f"{key}: expected a mapping of keys, got {sub!r}")
            kwargs[f.name] = _build(tp, sub, key + ".")
        elif f.name in values:
            kwargs[f.name] = _coerce(values[f.name], tp, key)
    for name in values:
        if name not in {f.name for f in dataclasses.fields(cls)}:
            raise _unknown(f"{prefix}{name}")
    return cls(**kwargs)


def _merge(base: dict, top: dict) -> dict:
    out = dict(base)
    for k, v in top.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


PACKAGED_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")


def packaged_configs() -> list[tuple[str, str]]:
    """(file name, one-line description) of every config shipped in the package."""
    out = []
    for name in sorted(os.listdir(PACKAGED_DIR)):
        if name.endswith(".yaml"):
            out.append((name, _description(os.path.join(PACKAGED_DIR, name))))
    return out


def _description(path: str) -> str:
    """The first sentence of a config's leading comment block."""
    lines = []
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            if not line.startswith("#"):
                break
            lines.append(line.lstrip("#").strip())
    text = " ".join(lines)
    # A sentence ends at ". " but not after "al." (He et al. 2015), "e.g.", "Sec.", "Fig." ...
    end = re.search(r"(?<!\bal)(?<!e\.g)(?<!i\.e)(?<!Sec)(?<!Fig)(?<!Eq)(?<!\bvs)\.(\s|$)", text)
    text = text[:end.start() + 1] if end else text
    return text if len(text) <= 110 else text[:text.rfind(" ", 0, 106)] + " ..."


def is_bare_name(path: str) -> bool:
    """No directory part (``./`` aside, or the repository's configs/): may name a packaged
    config."""
    return os.path.dirname(os.path.normpath(path)) in ("", "configs")


def resolve_config_path(path: str, _from_base: bool = False, bare: bool | None = None) -> str:
    """``path`` itself when that file exists; else, for a bare name (no directory part, the
    .yaml optional), the packaged config of that name: a user who installed the package
    without the repository can still run ``--config imagenet_r50.yaml``. ``bare``: whether
    the name as written was bare (a ``base:`` is joined to its file's folder first). A path
    with a directory never falls back: a mistyped folder would train another recipe."""
    if os.path.isfile(path):
        return os.path.abspath(path)
    name = os.path.basename(path)
    if is_bare_name(path) if bare is None else bare:
        for candidate in (name, name + ".yaml"):
            packaged = os.path.join(PACKAGED_DIR, candidate)
            if os.path.isfile(packaged):
                return packaged
    what = "base config file" if _from_base else "config file"
    raise ConfigError(f"{what} not found: {os.path.abspath(path)} (resnet-train --list-configs "
                      f"lists the packaged ones)")


def read_yaml(path: str, _chain: tuple[str, ...] = (), bare: bool | None = None) -> dict:
    """Read a config file, resolving ``base:`` (relative to the file, else, for a bare name,
    a packaged config of that name) recursively."""
    path = resolve_config_path(path, bool(_chain), bare)
    if path in _chain:
        raise ConfigError(f"{path}: 'base' inheritance loops back to this file")
    try:
        with open(path, encoding="utf-8") as fh:
            data = yaml.safe_load(fh)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f":{mark.line + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"{path}{where}: malformed YAML: {problem}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: cannot read config: {e}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a config must be a mapping of keys, got {type(data).__name__}")
    base = data.pop("base", None)
    if base is not None:
        if not isinstance(base, str):
            raise ConfigError(f"{path}: 'base' must be a file path, got {base!r}")
        base_path = os.path.join(os.path.dirname(path), base)
        data = _merge(read_yaml(base_path, _chain + (path,), is_bare_name(base)), data)
    return data


def parse_override(text: str) -> tuple[list[str], Any]:
    """'a.b=value' -> (['a', 'b'], raw value) with the value left for type coercion."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' is not of the form key=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override '{text}' has an empty key")
    return key.split("."), raw


def _apply_override(data: dict, text: str) -> dict:
    parts, raw = parse_override(text)
    key = ".".join(parts)
    leaf_types = {k: tp for k, tp, _ in iter_keys()}
    if key not in leaf_types:
        raise _unknown(key)
    tp = leaf_types[key]
    # Strings stay verbatim (a run name "1e3" is a name); everything else is parsed as YAML,
    # then coerced to the declared type.
    value: Any = raw
    if not _accepts_plain_str(tp):
        value = _parse_scalar(raw)
    elif raw.strip().lower() in ("null", "~") and _is_optional(tp):
        value = None
    out = dict(data)
    node = out
    for p in parts[:-1]:
        nxt = node.get(p)
        node[p] = dict(nxt) if isinstance(nxt, dict) else {}
        node = node[p]
    node[parts[-1]] = value
    return out


def _is_optional(tp) -> bool:
    return type(None) in typing.get_args(tp)


def _accepts_plain_str(tp) -> bool:
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return _accepts_plain_str(args[0])
    return tp is str or typing.get_origin(tp) is Literal


def load_config(path: str | None = None, overrides: list[str] | tuple[str, ...] = (),
                data: dict | None = None, base: dict | None = None,
                paths: bool = True) -> Config:
    """Load, merge, override and validate a config; raise ConfigError on any problem.

    Precedence, lowest first: schema defaults, ``base`` (e.g. a checkpoint's stored config),
    the file at ``path``, ``data``, then the ``key=value`` overrides. ``paths=False`` skips
    the check that the dataset exists (--print-config).
    """
    values: dict = dict(base or {})
    if path is not None:
        values = _merge(values, read_yaml(path))
    if data is not None:
        values = _merge(values, data)
    for text in overrides:
        values = _apply_override(values, text)
    cfg = _build(Config, values)
    validate(cfg, paths)
    return cfg


def from_dict(values: dict) -> Config:
    """A Config from a plain dict (a checkpoint's stored config), validated."""
    cfg = _build(Config, values)
    validate(cfg)
    return cfg


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def dump(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def replace(cfg: Config, **dotted: Any) -> Config:
    """A copy of cfg with dotted keys replaced, e.g. replace(cfg, **{"train.epochs": 3})."""
    values = to_dict(cfg)
    for key, v in dotted.items():
        node = values
        parts = key.split(".")
        for p in parts[:-1]:
            node = node[p]
        node[parts[-1]] = v
    return from_dict(values)


# --------------------------------------------------------------------------- validation


def _check_ranges(obj, prefix: str = "") -> None:
    hints = _hints(type(obj))
    for f in dataclasses.fields(obj):
        key, value = f"{prefix}{f.name}", getattr(obj, f.name)
        if _is_section(hints[f.name]):
            _check_ranges(value, key + ".")
            continue
        lo, hi = f.metadata.get("min"), f.metadata.get("max")
        if lo is None and hi is None or value is None:
            continue
        for v in value if isinstance(value, list) else [value]:
            if lo is not None and (v < lo or (f.metadata["min_open"] and v == lo)):
                op = ">" if f.metadata["min_open"] else ">="
                raise ConfigError(f"{key}: must be {op} {lo}, got {v}")
            if hi is not None and (v > hi or (f.metadata["max_open"] and v == hi)):
                op = "<" if f.metadata["max_open"] else "<="
                raise ConfigError(f"{key}: must be {op} {hi}, got {v}")


def check_paths(cfg: Config) -> None:
    """The dataset's files exist (a run or an evaluation needs them; reading the recipe with
    --print-config does not)."""
    d = cfg.data
    if d.dataset in ("cifar10", "cifar100", "imagenet", "folder") and not d.root:
        raise ConfigError(f"data.root: required for data.dataset={d.dataset}")
    if d.dataset in ("imagenet", "folder") and d.root and not os.path.isdir(d.root):
        raise ConfigError(f"data.root: directory not found: {d.root}")
    if d.dataset in ("cifar10", "cifar100") and d.root and not d.download \
            and not os.path.isdir(d.root):
        raise ConfigError(f"data.root: directory not found: {d.root} (set data.download=true)")


def validate(cfg: Config, paths: bool = True) -> None:
    """Range and cross-key checks (and, with ``paths``, check_paths); raise ConfigError
    naming the key."""
    if paths:
        check_paths(cfg)
    _check_ranges(cfg)
    d, t = cfg.data, cfg.data.train
    if len(t.scale) != 2 or t.scale[0] > t.scale[1] or t.scale[0] < 1:
        raise ConfigError(f"data.train.scale: expected [min, max] with 1 <= min <= max, "
                          f"got {t.scale}")
    if t.aug == "paper" and d.dataset in ("imagenet", "folder") and t.crop > t.scale[0]:
        raise ConfigError(f"data.train.crop: {t.crop} is larger than the smallest scale "
                          f"data.train.scale[0]={t.scale[0]}")
    if d.val.crop > d.val.resize:
        raise ConfigError(f"data.val.crop: {d.val.crop} is larger than "
                          f"data.val.resize={d.val.resize}")
    for key, pair in (("data.train.rrc_scale", t.rrc_scale), ("data.train.rrc_ratio", t.rrc_ratio)):
        if len(pair) != 2 or not 0 < pair[0] <= pair[1]:
            raise ConfigError(f"{key}: expected [min, max] with 0 < min <= max, got {pair}")
    for key, v in (("data.mean", d.mean), ("data.std", d.std)):
        if v is not None and len(v) != 3:
            raise ConfigError(f"{key}: expected 3 values (RGB), got {v}")
    if d.std is not None and any(s <= 0 for s in d.std):
        raise ConfigError(f"data.std: every value must be > 0, got {d.std}")
    if d.decode == "device" and d.dataset not in ("imagenet", "folder"):
        raise ConfigError(f"data.decode: device decodes JPEG folders (imagenet, folder); "
                          f"{d.dataset} has nothing to decode")
    if cfg.optim.nesterov and cfg.optim.momentum == 0:
        raise ConfigError("optim.nesterov: Nesterov momentum needs optim.momentum > 0")
    s = cfg.schedule
    if s.name == "multistep" and sorted(s.milestones) != list(s.milestones):
        raise ConfigError(f"schedule.milestones: must be increasing, got {s.milestones}")
    if any(m < 0 for m in s.milestones):
        raise ConfigError(f"schedule.milestones: must be >= 0, got {s.milestones}")
    import signal as _signal
    for name in cfg.checkpoint.signals:
        if not isinstance(getattr(_signal, name, None), _signal.Signals):
            raise ConfigError(f"checkpoint.signals: unknown signal {name!r}")
    known = set(_all_keys())
    for entry in cfg.checkpoint.allow_changes:
        if entry != "all" and entry not in known:
            raise ConfigError(f"checkpoint.allow_changes: {_unknown(entry)} (entries are "
                              f"dotted keys, sections such as optim, or all)")


# --------------------------------------------------------------------------- resume


@dataclass(frozen=True)
class ResumeDiff:
    """The keys whose value differs between a checkpoint's stored config and the new one.

    ``applied`` and ``refused`` are ``"key: old -> new"`` strings (values in YAML flow style),
    in schema order; ``applied_keys`` / ``refused_keys`` are the bare dotted keys. ``reasons``
    explains refusals that depend on the new schedule (e.g. a length change under cosine).
    Allowed refusable changes (checkpoint.allow_changes) are in ``applied``.
    """
    applied: list[str] = field(default_factory=list)
    refused: list[str] = field(default_factory=list)
    applied_keys: list[str] = field(default_factory=list)
    refused_keys: list[str] = field(default_factory=list)
    reasons: list[str] = field(default_factory=list)


_MISSING = object()


def _stored_value(stored: Any, key: str) -> Any:
    node = stored
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return _MISSING
        node = node[part]
    return node


def _value(cfg: Config, key: str) -> Any:
    node: Any = cfg
    for part in key.split("."):
        node = getattr(node, part)
    return node


def _allowed(key: str, allow: list[str]) -> bool:
    return any(a == "all" or key == a or key.startswith(a + ".") for a in allow)


def resume_changes(stored: dict, cfg: Config) -> ResumeDiff:
    """Compare a checkpoint's stored config with the config of the resuming run.

    ``stored`` is the nested dict ``dataclasses.asdict`` wrote into the checkpoint. A key or
    section it lacks (an older checkpoint) counts as its schema default; keys it has that the
    schema does not (a newer version) are ignored; stored values are coerced to the declared
    type before comparing (a value this version does not accept counts as changed). Each
    changed key goes by its ``opt(resume=...)`` class (RESUME_CLASSES): safe ones to
    ``applied``, refusable ones to ``refused`` unless the new config's schedule makes them
    harmless or ``cfg.checkpoint.allow_changes`` allows them. Keys of class ``ignored``
    (checkpoint.resume, checkpoint.allow_changes) are never compared. Raises nothing.
    """
    allow = list(cfg.checkpoint.allow_changes)
    applied: list[tuple[str, str]] = []
    refused: list[tuple[str, str]] = []
    reasons: list[str] = []
    for key, tp, f in iter_keys():
        rc = RESUME_CLASSES[f.metadata["resume"]]
        if not rc.compared:
            continue
        new, raw = _value(cfg, key), _stored_value(stored, key)
        if raw is _MISSING:
            old = _default_of(f)
        else:
            try:
                old = _coerce(raw, tp, key)
            except ConfigError:
                old = raw
        if old == new:
            continue
        text = f"{key}: {_yaml_scalar(old)} -> {_yaml_scalar(new)}"
        refuse = rc.refused and (rc.only_if is None
                                 or _value(cfg, rc.only_if[0]) == rc.only_if[1])
        if refuse and not _allowed(key, allow):
            refused.append((key, text))
            if rc.only_if is not None:
                why = f"with {rc.only_if[0]}={rc.only_if[1]}, {rc.why}"
                if why not in reasons:
                    reasons.append(why)
        else:
            applied.append((key, text))
    return ResumeDiff(applied=[t for _, t in applied], refused=[t for _, t in refused],
                      applied_keys=[k for k, _ in applied], refused_keys=[k for k, _ in refused],
                      reasons=reasons)


# The keys that change what a validation measures (not only when it runs): after a resume
# that changes one, the best top-1 so far is not comparable with the next validation's.
# (A folder's validation files, data.val_dir's among them, are compared by their hash.)
MEASURE_KEYS = ("data.val.crop", "data.val.protocol", "data.val.scales", "data.val.flip",
                "data.val_samples", "train.precise_bn")


def measuring(keys: list[str], cfg: Config) -> list[str]:
    """Those of ``keys`` (changed on resume) that change what validation measures under
    ``cfg``: scales and flip only under the multiscale protocol, val_samples only for the
    synthetic sets (the others' validation split is their files)."""
    def live(key: str) -> bool:
        if key in ("data.val.scales", "data.val.flip"):
            return cfg.data.val.protocol == "multiscale"
        if key == "data.val_samples":
            return cfg.data.dataset.startswith("synthetic")
        return True
    return [k for k in keys if k in MEASURE_KEYS and live(k)]


def resume_refusal(path: str, diff: ResumeDiff) -> str:
    """The one-line ConfigError text for ``diff.refused`` (the caller raises it: exit 2)."""
    why = f" ({'; '.join(diff.reasons)})" if diff.reasons else ""
    return (f"checkpoint {path} was written with a different config: "
            f"{', '.join(diff.refused)}; these change what the saved state means{why}. "
            f"Restore them, start a new run.dir, or allow them with "
            f"checkpoint.allow_changes=[{','.join(diff.refused_keys)}]")


def resume_notice(diff: ResumeDiff) -> str:
    """The one-line notice for ``diff.applied``, printed when the resume goes ahead."""
    return f"resuming with changed settings: {', '.join(diff.applied)}"
