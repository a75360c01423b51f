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
    # A stage's first unit applies its leading ops (those before its first conv) to both
    # paths: IM, appendix: "when preactivation is used (Fig. 4d/e), these projection
    # shortcuts are also with pre-activation".
    shared_preact: bool
    projection_bn: bool  # projection shortcut is conv+BN; False keeps the identity path clean
    # What zero_init_residual zeroes so that F(x) = 0 at init: "bn" the gamma of the BN that
    # ends F, "conv" the last conv's weight; "" refused (ZERO_INIT_REFUSED says why).
    zero_init: str

    @property
    def lead(self) -> list[str]:
        """The ops before a unit's first conv."""
        ops = self.layer.split()
        return ops[: ops.index("conv")]


# Each row read against IM Fig. 4, for a two-conv unit (F = the layer ops, then the last):
#   (a) original          x_{l+1} = relu(bn2(conv2(relu(bn1(conv1(x))))) + h(x))
#   (b) bn_after_add      x_{l+1} = relu(bn2(conv2(relu(bn1(conv1(x)))) + h(x)))
#   (c) relu_before_add   x_{l+1} = relu(bn2(conv2(relu(bn1(conv1(x)))))) + h(x)
#   (d) relu_only_preact  x_{l+1} = bn2(conv2(relu(bn1(conv1(relu(x)))))) + h(x)
#   (e) full_preact       x_{l+1} = conv2(relu(bn2(conv1(relu(bn1(x)))))) + h(x)
# (tests/test_models.py holds each order to its formula, written out, on real tensors.)
UNITS: dict[str, Unit] = {
    "original": Unit("conv bn relu", "conv bn", "relu", "", False, True, "bn"),
    "bn_after_add": Unit("conv bn relu", "conv", "bn relu", "", False, True, ""),
    "relu_before_add": Unit("conv bn relu", "conv bn relu", "", "", False, True, ""),
    # Without a ReLU after the add the last unit's output would reach the pool unrectified.
    "relu_only_preact": Unit("relu conv bn", "relu conv bn", "", "relu", True, True, "bn"),
    # ResNet v2, as fb.resnet.torch preresnet.lua and Kaiming's resnet-pre-act.lua build it.
    # Zeroing the last conv, not the BN before it: BN-ReLU of gamma 0 outputs exactly 0,
    # where ReLU passes no gradient, and the branch would never train.
    "full_preact": Unit("bn relu conv", "bn relu conv", "", "bn relu", True, False, "conv"),
}

# zero_init_residual, per unit order (IM Fig. 4), for a block with an identity shortcut:
#   original          last BN gamma  -> block(x) = relu(x)   (the ReLU after the addition)
#   relu_only_preact  last BN gamma  -> block(x) = x
#   full_preact       last conv      -> block(x) = x
#   bn_after_add, relu_before_add: refused, for the reasons below.
ZERO_INIT_REFUSED = {
    "bn_after_add": "the BN after the addition normalises x, so no block starts as an identity",
    "relu_before_add": "F ends with a ReLU whose input would be exactly 0, where ReLU passes "
                       "no gradient: the branches would never train",
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


@dataclass(frozen=True)
class ShortcutVariant:
    """One shortcut of IM Table 1 / Fig. 2: out = post(branch * F(x) + shortcut * h(x))."""

    shortcut: float = 1.0  # constant scale of h(x)
    branch: float = 1.0  # constant scale of F(x)
    gate: str = ""  # "exclusive": h * (1 - g), F * g; "shortcut": h * (1 - g)
    gate_bias: float = 0.0  # b_g of g(x) = sigmoid(conv1x1(x) + b_g)
    dropout: float = 0.0  # drop ratio on h(x)
    kind: str = ""  # a shortcut kind (SHORTCUTS) the variant implies


# IM Table 1 (ResNet-110, original units, CIFAR-10 test error, median of 5 runs); the paper
# does not say what the units that change dimensions do: here every unit gets the variant,
# applied to whatever its shortcut h(x) is (identity, option A's padded identity, projection).
SHORTCUT_VARIANTS: dict[str, ShortcutVariant] = {
    "scale_shortcut": ShortcutVariant(shortcut=0.5),  # lambda = 0.5, F unscaled: fail
    "scale_both": ShortcutVariant(shortcut=0.5, branch=0.5),  # "frozen gating": 12.35
    "exclusive_gating": ShortcutVariant(gate="exclusive", gate_bias=-6.0),  # 8.70
    "exclusive_gating_b0": ShortcutVariant(gate="exclusive", gate_bias=0.0),  # fail (0..-5)
    "exclusive_gating_b7": ShortcutVariant(gate="exclusive", gate_bias=-7.0),  # 9.81
    "shortcut_gating": ShortcutVariant(gate="shortcut", gate_bias=-6.0),  # 6.91
    "shortcut_gating_b0": ShortcutVariant(gate="shortcut", gate_bias=0.0),  # 12.86
    # "1x1 convolutional shortcut ... (known as option C)" (IM Sec. 3.1): 12.22
    "conv": ShortcutVariant(kind="C"),
    # IM Sec. 3.1: dropout "statistically imposes a scale of lambda with an expectation of
    # 0.5 on the shortcut", so no 1/(1-p) rescaling while training: fail
    "dropout": ShortcutVariant(dropout=0.5),
}


def _make_gate(variant, inplanes: int, outplanes: int, stride: int) -> nn.Conv2d | None:
    """g(x) = sigmoid(W_g x + b_g), W_g a 1x1 conv (IM Sec. 3.1), one gate per element."""
    if variant is None or not variant.gate:
        return None
    gate = nn.Conv2d(inplanes, outplanes, 1, stride=stride, bias=True)
    nn.init.constant_(gate.bias, variant.gate_bias)
    return gate


class ResidualBlock(nn.Module):
    """out = post(F(x) + shortcut(x)), with F's op order taken from `UNITS[unit]`.

    With shortcut "none" there is no addition at all: the plain net of He et al. 2015.
    When `report_norms` is set, each forward stores `last_norms = (||F(x)||, ||x||)`, L2 over
    the whole batch tensor, detached float32 scalars; x is the block's input.
    """

    expansion = 1
    units: tuple[str, ...] = tuple(UNITS)  # the orders (UNITS keys) build_model allows

    def __init__(self, convs: list[nn.Conv2d], stride: int, *, unit: str, shortcut: str,
                 preact: str = "branch", shortcut_variant: str | None = None) -> None:
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
        # IM Table 1's shortcut variants; None is the plain sum F(x) + h(x).
        self.shortcut_variant = (None if shortcut_variant is None
                                 else SHORTCUT_VARIANTS[shortcut_variant])
        self.gate = _make_gate(self.shortcut_variant, convs[0].in_channels,
                               convs[-1].out_channels, stride)
        self.zero_init = spec.zero_init
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
            h = x if self.downsample is None else self.downsample(x)
            if self.shortcut_variant is not None:
                out, h = self._vary(out, h, x)
            out = out + h
        for name in self.post_ops:
            out = getattr(self, name)(out)
        return out

    def _vary(self, f: Tensor, h: Tensor, x: Tensor) -> tuple[Tensor, Tensor]:
        """(F, h) scaled, gated or dropped as the shortcut variant says (IM Fig. 2)."""
        v = self.shortcut_variant
        if self.gate is not None:
            g = torch.sigmoid(self.gate(x))
            h = h * (1 - g)
            if v.gate == "exclusive":
                f = f * g
        if v.dropout:
            # training: h times a keep-mask, not rescaled by 1/(1-p), so E = (1-p) h as the
            # paper says; eval: (1-p) h, that expectation
            h = F.dropout(h, v.dropout, self.training) * (1 - v.dropout)
        return f * v.branch, h * v.shortcut

    def zero_init_last(self) -> None:
        """Zero the layer that ends F (`Unit.zero_init`: BN gamma or last conv): F(x) = 0."""
        if not self.zero_init:
            raise ValueError("this unit order cannot start as an identity")
        last = next(n for n in reversed(self.branch_ops) if n != "relu")
        nn.init.zeros_(getattr(self, last).weight)


def _norm(t: Tensor) -> Tensor:
    return torch.linalg.vector_norm(t.detach(), dtype=torch.float32)


class BasicBlock(ResidualBlock):
    """Two 3x3 convs (ResNet-18/34 and the CIFAR 6n+2 nets)."""

    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, *, unit: str = "original",
                 shortcut: str = "B", variant: str = "v1.5", preact: str = "branch",
                 shortcut_variant: str | None = None) -> None:
        # variant only moves the stride inside a bottleneck; a basic block has one place for it
        convs = [conv3x3(inplanes, planes, stride), conv3x3(planes, planes)]
        super().__init__(convs, stride, unit=unit, shortcut=shortcut, preact=preact,
                         shortcut_variant=shortcut_variant)


class OneLayerBlock(ResidualBlock):
    """One 3x3 conv in F: IM Table 3's "ResNet-110 (1layer skip)", 1 + 3 x 36 + 1 layers.

    IM Sec. 4.1: "a 110-layer ResNet architecture in which each shortcut skips only 1 layer
    (i.e., a Residual Unit has only 1 layer)". With h(x) the shortcut (identity, or option
    A's strided zero-padded identity where a stage's first unit widens):
      original     out = relu(bn1(conv1(x)) + h(x))            IM Fig. 4(a), DRL's order
      full_preact  out = conv1(relu(bn1(x))) + h(x)            IM Fig. 4(e)
    At a stage's first full pre-activation unit bn1-relu runs before the split and h reads
    its output, as in the two-conv nets (`Unit.shared_preact`). Table 3 reports these two
    orders only; Fig. 4(b-d) are drawn on two weight layers and stay refused here.
    """

    expansion = 1
    units = ("original", "full_preact")

    def __init__(self, inplanes: int, planes: int, stride: int = 1, *, unit: str = "original",
                 shortcut: str = "A", variant: str = "v1", preact: str = "branch",
                 shortcut_variant: str | None = None) -> None:
        if unit not in self.units:
            raise ValueError(f"unit={unit!r} for a 1-layer unit; valid: {self.units}")
        # variant only moves the stride inside a bottleneck; one conv has one place for it
        super().__init__([conv3x3(inplanes, planes, stride)], stride, unit=unit,
                         shortcut=shortcut, preact=preact, shortcut_variant=shortcut_variant)


# Which conv of a bottleneck carries the stride: the paper's 1x1, or the 3x3 (torchvision,
# NVIDIA, fb.resnet.torch), which keeps the 1x1 from discarding 3/4 of its input.
STRIDE_CONV = {"v1": 0, "v1.5": 1}


class Bottleneck(ResidualBlock):
    """1x1 reduce, 3x3, 1x1 expand by 4 (ResNet-50 and deeper, CIFAR 9n+2 nets)."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, *, unit: str = "original",
                 shortcut: str = "B", variant: str = "v1.5", preact: str = "branch",
                 shortcut_variant: str | None = None) -> None:
        strides = [1, 1, 1]
        strides[STRIDE_CONV[variant]] = stride
        convs = [conv1x1(inplanes, planes, strides[0]), conv3x3(planes, planes, strides[1]),
                 conv1x1(planes, planes * self.expansion, strides[2])]
        super().__init__(convs, stride, unit=unit, shortcut=shortcut, preact=preact,
                         shortcut_variant=shortcut_variant)


def make_stage(block: type[ResidualBlock], inplanes: int, planes: int, blocks: int,
               stride: int, *, unit: str, shortcut: str, variant: str,
               first_preact: str, shortcut_variant: str | None = None
               ) -> tuple[nn.Sequential, int]:
    """`blocks` units, the first of which strides and widens; returns (stage, out channels)."""
    # Only units that share their leading BN-ReLU treat a stage's first block specially.
    mode = first_preact if UNITS[unit].shared_preact else "branch"
    layers = []
    for i in range(blocks):
        layers.append(block(inplanes, planes, stride if i == 0 else 1, unit=unit,
                            shortcut=shortcut, variant=variant,
                            preact=mode if i == 0 else "branch",
                            shortcut_variant=shortcut_variant))
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
