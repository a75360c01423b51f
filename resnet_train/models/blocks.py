"""Residual units (He et al. 2015; He et al. 2016, Fig. 4) and the helpers both families share.

A block is its convs plus one table entry (`UNITS`) saying where BN and ReLU go around them.
Names follow torchvision (`conv1, bn1, ..., downsample`) so that the original unit with a
projection shortcut loads torchvision's state dicts unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

SHORTCUTS = ("A", "B", "C", "none")


@dataclass(frozen=True)
class Unit:
    """Op order of one residual unit, as space-separated tokens conv / bn / relu."""

    layer: str  # around every conv of the branch but the last
    last: str  # around the last conv of the branch
    post: str  # after the addition; its "bn" is the last conv's BN
    head: str  # after the last unit, before pooling
    shared_preact: bool  # a stage's first unit applies its leading BN-ReLU to both paths
    projection_bn: bool  # projection shortcut is conv+BN; False keeps the identity path clean


UNITS: dict[str, Unit] = {
    "original": Unit("conv bn relu", "conv bn", "relu", "", False, True),
    "bn_after_add": Unit("conv bn relu", "conv", "bn relu", "", False, True),
    "relu_before_add": Unit("conv bn relu", "conv bn relu", "", "", False, True),
    # Without a ReLU after the add the last unit's output would reach the pool unrectified.
    "relu_only_preact": Unit("relu conv bn", "relu conv bn", "", "relu", False, True),
    # ResNet v2, as fb.resnet.torch preresnet.lua and Kaiming's resnet-pre-act.lua build it.
    "full_preact": Unit("bn relu conv", "bn relu conv", "", "bn relu", True, False),
}

# Where a unit's leading ops (those before its first conv) run: "branch" in F only;
# "shared" before the split, so a stage's first unit feeds normalised input to its shortcut;
# "omit" when the input is already BN-ReLU'd (the ImageNet stem before layer1).
PREACT_MODES = ("branch", "shared", "omit")


def conv3x3(inplanes: int, planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(inplanes, planes, 3, stride=stride, padding=1, bias=False)


def conv1x1(inplanes: int, planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(inplanes, planes, 1, stride=stride, bias=False)


class PadShortcut(nn.Module):
    """Option A: strided identity with zero-padded extra channels; adds no parameters."""

    def __init__(self, stride: int, extra_channels: int) -> None:
        super().__init__()
        self.stride = stride
        self.extra_channels = extra_channels

    def forward(self, x: Tensor) -> Tensor:
        s = self.stride
        return F.pad(x[:, :, ::s, ::s], (0, 0, 0, 0, 0, self.extra_channels))

    def extra_repr(self) -> str:
        return f"stride={self.stride}, extra_channels={self.extra_channels}"


def make_shortcut(kind: str, inplanes: int, outplanes: int, stride: int,
                  projection_bn: bool) -> nn.Module | None:
    """The shortcut module of one block; None means plain identity (or no shortcut at all)."""
    changes = stride != 1 or inplanes != outplanes
    if kind == "none" or (kind in ("A", "B") and not changes):
        return None
    if kind == "A":
        return PadShortcut(stride, outplanes - inplanes)
    layers: list[nn.Module] = [conv1x1(inplanes, outplanes, stride)]
    if projection_bn:
        layers.append(nn.BatchNorm2d(outplanes))
    return nn.Sequential(*layers)


class ResidualBlock(nn.Module):
    """out = post(F(x) + shortcut(x)), with F's op order taken from `UNITS[unit]`.

    With shortcut "none" there is no addition at all: the plain net of He et al. 2015.
    When `report_norms` is set, each forward stores `last_norms = (||F(x)||, ||x||)`, L2 over
    the whole batch tensor, detached float32 scalars; x is the block's input.
    """

    expansion = 1

    def __init__(self, convs: list[nn.Conv2d], stride: int, *, unit: str, shortcut: str,
                 preact: str = "branch") -> None:
        super().__init__()
        if preact not in PREACT_MODES:
            raise ValueError(f"preact={preact!r}; valid: {PREACT_MODES}")
        spec = UNITS[unit]
        k = len(convs)
        recipes = [spec.layer.split()] * (k - 1) + [spec.last.split()]
        lead = recipes[0][: recipes[0].index("conv")]
        pre = lead if preact == "shared" else []
        if preact != "branch":
            recipes[0] = recipes[0][len(lead):]
        post = spec.post.split()

        bn_channels: dict[int, int] = {}  # conv index -> channels of its BN
        branch: list[str] = []
        for i, (conv, recipe) in enumerate(zip(convs, recipes, strict=True), start=1):
            for tok in recipe:
                if tok == "bn":
                    before_conv = recipe.index("bn") < recipe.index("conv")
                    bn_channels[i] = conv.in_channels if before_conv else conv.out_channels
                branch.append({"conv": f"conv{i}", "bn": f"bn{i}", "relu": "relu"}[tok])
        if "bn" in pre:
            bn_channels[1] = convs[0].in_channels
        if "bn" in post:
            bn_channels[k] = convs[-1].out_channels
        for i, conv in enumerate(convs, start=1):
            setattr(self, f"conv{i}", conv)
            if i in bn_channels:
                setattr(self, f"bn{i}", nn.BatchNorm2d(bn_channels[i]))
        # Not in place: some orders apply ReLU to the block input, which the shortcut still
        # reads; ReLU saves its output for backward either way, so in-place would only spare
        # a transient buffer.
        self.relu = nn.ReLU()
        self.downsample = make_shortcut(shortcut, convs[0].in_channels, convs[-1].out_channels,
                                        stride, spec.projection_bn)
        self.residual = shortcut != "none"
        self.pre_ops = tuple("bn1" if t == "bn" else t for t in pre)
        self.branch_ops = tuple(branch)
        self.post_ops = tuple(f"bn{k}" if t == "bn" else t for t in post)
        self.report_norms = False
        self.last_norms: tuple[Tensor, Tensor] | None = None

    def forward(self, x: Tensor) -> Tensor:
        block_input = x
        for name in self.pre_ops:
            x = getattr(self, name)(x)
        out = x
        for name in self.branch_ops:
            out = getattr(self, name)(out)
        if self.report_norms:
            self.last_norms = (_norm(out), _norm(block_input))
        if self.residual:
            out = out + (x if self.downsample is None else self.downsample(x))
        for name in self.post_ops:
            out = getattr(self, name)(out)
        return out

    def zero_init_last(self) -> None:
        """Zero the last weighted layer of F (BN gamma, or the conv when F ends with one)."""
        last = next(n for n in reversed(self.branch_ops) if n != "relu")
        nn.init.zeros_(getattr(self, last).weight)


def _norm(t: Tensor) -> Tensor:
    return torch.linalg.vector_norm(t.detach(), dtype=torch.float32)


class BasicBlock(ResidualBlock):
    """Two 3x3 convs (ResNet-18/34 and the CIFAR 6n+2 nets)."""

    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, *, unit: str = "original",
                 shortcut: str = "B", variant: str = "v1.5", preact: str = "branch") -> None:
        # variant only moves the stride inside a bottleneck; a basic block has one place for it
        convs = [conv3x3(inplanes, planes, stride), conv3x3(planes, planes)]
        super().__init__(convs, stride, unit=unit, shortcut=shortcut, preact=preact)


# Which conv of a bottleneck carries the stride: the paper's 1x1, or the 3x3 (torchvision,
# NVIDIA, fb.resnet.torch), which keeps the 1x1 from discarding 3/4 of its input.
STRIDE_CONV = {"v1": 0, "v1.5": 1}


class Bottleneck(ResidualBlock):
    """1x1 reduce, 3x3, 1x1 expand by 4 (ResNet-50 and deeper, CIFAR 9n+2 nets)."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, *, unit: str = "original",
                 shortcut: str = "B", variant: str = "v1.5", preact: str = "branch") -> None:
        strides = [1, 1, 1]
        strides[STRIDE_CONV[variant]] = stride
        convs = [conv1x1(inplanes, planes, strides[0]), conv3x3(planes, planes, strides[1]),
                 conv1x1(planes, planes * self.expansion, strides[2])]
        super().__init__(convs, stride, unit=unit, shortcut=shortcut, preact=preact)


def make_stage(block: type[ResidualBlock], inplanes: int, planes: int, blocks: int,
               stride: int, *, unit: str, shortcut: str, variant: str,
               first_preact: str) -> tuple[nn.Sequential, int]:
    """`blocks` units, the first of which strides and widens; returns (stage, out channels)."""
    # Only units that share their leading BN-ReLU treat a stage's first block specially.
    mode = first_preact if UNITS[unit].shared_preact else "branch"
    layers = []
    for i in range(blocks):
        layers.append(block(inplanes, planes, stride if i == 0 else 1, unit=unit,
                            shortcut=shortcut, variant=variant,
                            preact=mode if i == 0 else "branch"))
        inplanes = planes * block.expansion
    return nn.Sequential(*layers), inplanes


def make_head_act(unit: str, channels: int) -> nn.Sequential:
    """What runs after the last unit, before pooling (BN-ReLU for full pre-activation)."""
    make = {"bn": lambda: nn.BatchNorm2d(channels), "relu": lambda: nn.ReLU(inplace=True)}
    return nn.Sequential(*(make[tok]() for tok in UNITS[unit].head.split()))


def init_weights(model: nn.Module, zero_init_residual: bool) -> None:
    """He normal (fan_out) convs, BN 1/0; Linear keeps PyTorch's default, as torchvision does."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    if zero_init_residual:
        for m in model.modules():
            if isinstance(m, ResidualBlock):
                m.zero_init_last()


def set_report_norms(model: nn.Module, on: bool) -> None:
    """Turn per-block norm reporting on or off (off also forgets the last values)."""
    for m in model.modules():
        if isinstance(m, ResidualBlock):
            m.report_norms = bool(on)
            if not on:
                m.last_norms = None


def collect_block_norms(model: nn.Module) -> dict[str, tuple[float, float]]:
    """{block name: (||F(x)||, ||x||)} from each block's last forward with reporting on."""
    return {name: (float(m.last_norms[0]), float(m.last_norms[1]))
            for name, m in model.named_modules()
            if isinstance(m, ResidualBlock) and m.last_norms is not None}
