"""The ResNet family, selected by name: `build_model(arch, num_classes, **options)`.

A new architecture is one entry in `ARCH_SPECS`.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass
from typing import Any

from torch import nn

from resnet_train.errors import UserError
from resnet_train.models.blocks import (SHORTCUT_VARIANTS, SHORTCUTS, UNITS, ZERO_INIT_REFUSED,
                                        BasicBlock, Bottleneck, OneLayerBlock, ResidualBlock,
                                        collect_block_norms, set_report_norms)
from resnet_train.models.cifar import CifarResNet
from resnet_train.models.imagenet import ImageNetResNet

__all__ = ["ARCHS", "ARCH_SPECS", "OPTIONS", "SHORTCUTS", "SHORTCUT_VARIANTS", "UNITS",
           "ArchSpec", "ResidualBlock", "arch_family", "build_model", "collect_block_norms",
           "set_report_norms"]


@dataclass(frozen=True)
class ArchSpec:
    """One named network: its family, block, blocks per stage and default options."""

    family: str  # key of FAMILIES
    block: type[ResidualBlock]
    layers: tuple[int, ...]
    shortcut: str  # default shortcut
    unit: str = "original"  # default unit
    pinned: tuple[str, ...] = ()  # options the name itself fixes (plain*, preact_*)


@dataclass(frozen=True)
class Family:
    network: type[nn.Module]
    width: int  # base width of the paper
    variants: tuple[str, ...]  # first is the default


FAMILIES = {
    "imagenet": Family(ImageNetResNet, 64, ("v1.5", "v1")),
    # Kaiming's CIFAR bottleneck code strides in the first 1x1; basic blocks have no choice.
    "cifar": Family(CifarResNet, 16, ("v1",)),
}

_B, _P, _1 = BasicBlock, Bottleneck, OneLayerBlock
_PLAIN = dict(shortcut="none", pinned=("shortcut",))
_PREACT = dict(unit="full_preact", pinned=("unit",))

ARCH_SPECS: dict[str, ArchSpec] = {
    # He et al. 2015, Table 1; resnet200 from He et al. 2016, Table 5
    "resnet18": ArchSpec("imagenet", _B, (2, 2, 2, 2), "B"),
    "resnet34": ArchSpec("imagenet", _B, (3, 4, 6, 3), "B"),
    "resnet50": ArchSpec("imagenet", _P, (3, 4, 6, 3), "B"),
    "resnet101": ArchSpec("imagenet", _P, (3, 4, 23, 3), "B"),
    "resnet152": ArchSpec("imagenet", _P, (3, 8, 36, 3), "B"),
    "resnet200": ArchSpec("imagenet", _P, (3, 24, 36, 3), "B"),
    "plain18": ArchSpec("imagenet", _B, (2, 2, 2, 2), **_PLAIN),
    "plain34": ArchSpec("imagenet", _B, (3, 4, 6, 3), **_PLAIN),
    "plain50": ArchSpec("imagenet", _P, (3, 4, 6, 3), **_PLAIN),
    "plain101": ArchSpec("imagenet", _P, (3, 4, 23, 3), **_PLAIN),
    "plain152": ArchSpec("imagenet", _P, (3, 8, 36, 3), **_PLAIN),
    "preact_resnet18": ArchSpec("imagenet", _B, (2, 2, 2, 2), "B", **_PREACT),
    "preact_resnet34": ArchSpec("imagenet", _B, (3, 4, 6, 3), "B", **_PREACT),
    "preact_resnet50": ArchSpec("imagenet", _P, (3, 4, 6, 3), "B", **_PREACT),
    "preact_resnet101": ArchSpec("imagenet", _P, (3, 4, 23, 3), "B", **_PREACT),
    "preact_resnet152": ArchSpec("imagenet", _P, (3, 8, 36, 3), "B", **_PREACT),
    "preact_resnet200": ArchSpec("imagenet", _P, (3, 24, 36, 3), "B", **_PREACT),
    # CIFAR, depth 6n+2 (He et al. 2015, Sec. 4.2)
    "resnet20": ArchSpec("cifar", _B, (3, 3, 3), "A"),
    "resnet32": ArchSpec("cifar", _B, (5, 5, 5), "A"),
    "resnet44": ArchSpec("cifar", _B, (7, 7, 7), "A"),
    "resnet56": ArchSpec("cifar", _B, (9, 9, 9), "A"),
    "resnet110": ArchSpec("cifar", _B, (18, 18, 18), "A"),
    "resnet1202": ArchSpec("cifar", _B, (200, 200, 200), "A"),
    "plain20": ArchSpec("cifar", _B, (3, 3, 3), **_PLAIN),
    "plain32": ArchSpec("cifar", _B, (5, 5, 5), **_PLAIN),
    "plain44": ArchSpec("cifar", _B, (7, 7, 7), **_PLAIN),
    "plain56": ArchSpec("cifar", _B, (9, 9, 9), **_PLAIN),
    "plain110": ArchSpec("cifar", _B, (18, 18, 18), **_PLAIN),
    "preact_resnet110": ArchSpec("cifar", _B, (18, 18, 18), "A", **_PREACT),
    # CIFAR, depth 9n+2 bottleneck (He et al. 2016). The first unit already changes width
    # (16 -> 64), so option A would zero-pad 3/4 of it: project instead (and A is refused
    # for every bottleneck net, see build_model).
    "resnet164": ArchSpec("cifar", _P, (18, 18, 18), "B"),
    "resnet1001": ArchSpec("cifar", _P, (111, 111, 111), "B"),
    "preact_resnet164": ArchSpec("cifar", _P, (18, 18, 18), "B", **_PREACT),
    "preact_resnet1001": ArchSpec("cifar", _P, (111, 111, 111), "B", **_PREACT),
    # CIFAR, depth 3n+2 with one 3x3 conv per unit (He et al. 2016, Table 3, "ResNet-110
    # (1layer skip)"): 108 units of one layer keep ResNet-110's layer count and its convs.
    "resnet110_1layer": ArchSpec("cifar", _1, (36, 36, 36), "A"),
    "preact_resnet110_1layer": ArchSpec("cifar", _1, (36, 36, 36), "A", **_PREACT),
}

ARCHS: list[str] = sorted(ARCH_SPECS)

# Option name -> what None (the default) means.
OPTIONS = {
    "variant": "v1.5 for ImageNet nets (the only choice for CIFAR nets is v1)",
    "shortcut": "the arch's: B for ImageNet nets, A for CIFAR basic, B for CIFAR bottleneck",
    "unit": "the arch's: original, full_preact for preact_* (*_1layer: only these two)",
    "zero_init_residual": "False",
    "shortcut_variant": "plain identity sum F(x) + h(x) (IM Table 1's variants: SHORTCUT_VARIANTS)",
    "width": "64 for ImageNet nets, 16 for CIFAR nets",
    "in_channels": "3",
    "report_norms": "False",
}


def _cifar_depth_spec(arch: str) -> ArchSpec | None:
    """resnet{d} / plain{d} for any CIFAR depth d = 6n+2 the table does not name (e.g. the
    degradation study's small demo nets: 8, 14, 26); resnet50 stays ImageNet's."""
    m = re.fullmatch(r"(resnet|plain)(\d+)", str(arch))
    if m is None or (int(m.group(2)) - 2) % 6 or int(m.group(2)) < 8:
        return None
    n = (int(m.group(2)) - 2) // 6
    if m.group(1) == "plain":
        return ArchSpec("cifar", _B, (n, n, n), **_PLAIN)
    return ArchSpec("cifar", _B, (n, n, n), "A")


def _spec(arch: str) -> ArchSpec:
    if arch in ARCH_SPECS:
        return ARCH_SPECS[arch]
    spec = _cifar_depth_spec(arch)
    if spec is not None:
        return spec
    # Names are matched exactly (configs, run tables and resume compare the string), but the
    # hint ignores case: RESNET50 -> 'resnet50'.
    close = difflib.get_close_matches(str(arch).lower(), ARCHS, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise UserError(f"unknown arch {arch!r}{hint}; valid: {', '.join(ARCHS)}, and "
                    f"resnet<d> / plain<d> for any CIFAR depth d = 6n+2")


def arch_family(arch: str) -> str:
    """'imagenet' or 'cifar': which resolution and datasets the arch is built for."""
    return _spec(arch).family


def _choice(name: str, value: Any, choices: tuple[str, ...], where: str = "") -> str:
    if value not in choices:
        raise UserError(f"model option {name}={value!r} is not valid{where}; "
                        f"valid: {', '.join(choices)}")
    return value


def _positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise UserError(f"model option {name}={value!r} must be a positive integer")
    return value


def _flag(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise UserError(f"model option {name}={value!r} must be true or false")
    return value


def _shortcut_options(arch: str, spec, given: dict) -> tuple[str | None, str]:
    """(shortcut_variant, shortcut) for ``arch``, refusing combinations no paper net has."""
    sv_name = given.get("shortcut_variant")
    if sv_name is not None:
        _choice("shortcut_variant", sv_name, tuple(SHORTCUT_VARIANTS))
    implied = SHORTCUT_VARIANTS[sv_name].kind if sv_name else ""
    shortcut = _choice("shortcut", given.get("shortcut", implied or spec.shortcut), SHORTCUTS)
    if implied and shortcut != implied:
        raise UserError(f"shortcut_variant={sv_name!r} is option {implied}; got "
                        f"shortcut={shortcut!r}")
    if sv_name and shortcut == "none":
        raise UserError(f"shortcut_variant={sv_name!r} needs a shortcut; {arch} has none")
    if shortcut == "A" and spec.block is Bottleneck:
        # fb.resnet.torch's option A pads by concatenating zeros (C -> 2C), which cannot
        # build the first bottleneck unit (64 -> 256) at all; DRL uses B for bottleneck nets.
        raise UserError(f"shortcut='A' is not valid for {arch} (a bottleneck net): its first "
                        "unit widens 4x, so a zero-padded identity would carry only 1/4 of "
                        "the channels; use B (projection on change, the papers' choice) or C")
    return sv_name, shortcut


def _zero_init_option(arch: str, given: dict, shortcut: str, unit: str,
                      sv_name: str | None) -> bool:
    """``zero_init_residual``, refused where no block could start as an identity."""
    zero_init = _flag("zero_init_residual", given.get("zero_init_residual", False))
    if zero_init and shortcut == "none":
        raise UserError(f"zero_init_residual needs a shortcut: {arch} with shortcut='none' "
                        "would output zeros from every block")
    if zero_init and unit in ZERO_INIT_REFUSED:
        raise UserError(f"zero_init_residual is not valid with unit={unit!r}: "
                        f"{ZERO_INIT_REFUSED[unit]}")
    if zero_init and sv_name:
        raise UserError(f"zero_init_residual is not valid with shortcut_variant={sv_name!r}: "
                        "its shortcut is not an identity, so no block starts as one")
    return zero_init


def build_model(arch: str, num_classes: int, **options: Any) -> nn.Module:
    """Build `arch` with `num_classes` outputs; options left out or None take the arch's default.

    Options: variant, shortcut, unit, zero_init_residual, shortcut_variant, width,
    in_channels, report_norms (see `OPTIONS`). Raises UserError for an unknown arch, option
    or value, and for combinations the papers' nets cannot be built with.
    """
    spec = _spec(arch)
    family = FAMILIES[spec.family]
    unknown = sorted(set(options) - set(OPTIONS))
    if unknown:
        raise UserError(f"unknown model option {unknown[0]!r}; valid: {', '.join(OPTIONS)}")
    given = {k: v for k, v in options.items() if v is not None}
    for name in spec.pinned:
        if name in given and given[name] != getattr(spec, name):
            raise UserError(f"{arch} fixes {name}={getattr(spec, name)!r}; got {given[name]!r}")
    variant = _choice("variant", given.get("variant", family.variants[0]), family.variants,
                      f" for {arch} ({spec.family} net)")
    sv_name, shortcut = _shortcut_options(arch, spec, given)
    unit = _choice("unit", given.get("unit", spec.unit), tuple(UNITS))
    if unit not in spec.block.units:
        raise UserError(f"model option unit={unit!r} is not valid for {arch} (one conv per "
                        "unit; He et al. 2016, Table 3 builds it with the original and the "
                        f"full pre-activation unit only); valid: {', '.join(spec.block.units)}")
    zero_init = _zero_init_option(arch, given, shortcut, unit, sv_name)
    model = family.network(
        spec.block, spec.layers, _positive_int("num_classes", num_classes),
        width=_positive_int("width", given.get("width", family.width)),
        in_channels=_positive_int("in_channels", given.get("in_channels", 3)),
        variant=variant, shortcut=shortcut, unit=unit, zero_init_residual=zero_init,
        shortcut_variant=sv_name)
    set_report_norms(model, _flag("report_norms", given.get("report_norms", False)))
    return model
