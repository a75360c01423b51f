"""Weights from elsewhere: state-dict files, our checkpoints, torchvision's weights enums and
akamaster/pytorch_resnet_cifar10's CIFAR checkpoints, as state dicts under our key names.

``load_weights`` reads (never unpickling code) and converts; ``fit_weights`` loads the result
into a model strictly, keeping the model's fresh head when only the class count differs.
"""

from __future__ import annotations

import http.client
import os
import pickle
import re

import torch
from torch import Tensor, nn
from torch.nn.modules.utils import consume_prefix_in_state_dict_if_present

from .checkpoint import check_fits, unwrap
from .errors import CheckpointError, UserError

SOURCES = ("native", "akamaster")

TORCHVISION = "torchvision:"
# torchvision's ResNets whose weights load into ours unchanged: the same module names
# (torchvision's naming is ours), option B projections, and the Bottleneck's stride on the
# 3x3 conv, which is our variant v1.5 (the default); resnet18/34 have no such choice.
TORCHVISION_ARCHS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")
# Where trainers keep the model's state dict inside a checkpoint: ours ("model"),
# akamaster's and many others' ("state_dict"), and "model_state".
WRAPPER_KEYS = ("model", "state_dict", "model_state")
# What wrappers prepend to every key: DataParallel / DDP, torch.compile.
WRAPPER_PREFIXES = ("module.", "_orig_mod.")
HEAD = ("fc.weight", "fc.bias")


def load_weights(spec: str, arch: str | None = None, source: str = "native") -> dict[str, Tensor]:
    """A state dict with our key names (CPU tensors) from `spec`: a file (a plain state dict,
    or one under "model", "state_dict" or "model_state"; wrapper prefixes stripped) or
    'torchvision:NAME' (a weights enum member of `arch`'s torchvision builder). With
    source='akamaster' the file is an akamaster/pytorch_resnet_cifar10 checkpoint. Unusable
    input is a UserError / CheckpointError of one line naming `spec`."""
    spec = str(spec)
    if source not in SOURCES:
        raise UserError(f"{spec}: unknown weights source {source!r}; valid: {', '.join(SOURCES)}")
    if spec.startswith(TORCHVISION):
        if source != "native":
            raise UserError(f"{spec}: torchvision's weights already have our key names; "
                            f"source {source!r} converts files only")
        return _torchvision_state(spec, arch)
    state = _read_state_file(spec)
    if source == "akamaster":
        try:
            state = from_akamaster(state)
        except CheckpointError as e:
            raise CheckpointError(f"{spec}: {e}") from None
    return state


def _read_state_file(path: str) -> dict[str, Tensor]:
    if os.path.isdir(path):
        raise CheckpointError(f"{path}: a directory, not a weights file")
    if not os.path.isfile(path):
        raise CheckpointError(f"weights file not found: {path}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        # weights_only refuses any global outside torch's allowlist: a pickled class or function
        code = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
        if code:
            raise CheckpointError(f"{path}: holds pickled code ({code[1]}), which is never run: "
                                  "save the model's state_dict() instead") from None
        raise CheckpointError(f"{path}: not a PyTorch weights file, or corrupt") from None
    except Exception as e:  # truncated zip archive, unreadable file, ...
        raise CheckpointError(f"{path}: not a readable weights file ({_reason(e)})") from None
    return _strip_prefixes(_as_state_dict(obj, path))


def _reason(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:160] if text else type(e).__name__


def _as_state_dict(obj: object, spec: str) -> dict[str, Tensor]:
    """The state dict in `obj`, itself or under one of WRAPPER_KEYS, as a plain dict."""
    if isinstance(obj, dict) and not all(isinstance(v, Tensor) for v in obj.values()):
        inner = next((obj[k] for k in WRAPPER_KEYS if isinstance(obj.get(k), dict)), None)
        obj = obj if inner is None else inner
    if not isinstance(obj, dict) or not obj:
        what = "an empty dict" if isinstance(obj, dict) else f"a {type(obj).__name__}"
        raise CheckpointError(f"{spec}: not a state dict (it holds {what})")
    for key, value in obj.items():
        if not isinstance(key, str) or not isinstance(value, Tensor):
            raise CheckpointError(
                f"{spec}: not a state dict: entry {key!r} is a {type(value).__name__}, not a "
                f"tensor, and no {' / '.join(map(repr, WRAPPER_KEYS))} entry holds one")
    return dict(obj)


def _strip_prefixes(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """`state` without the prefixes DDP and torch.compile put on every key (nested: both)."""
    state = dict(state)
    stripped = True
    while stripped and state:
        stripped = False
        for prefix in WRAPPER_PREFIXES:
            # Only a prefix on every key is a wrapper's; one on some keys is a module's name.
            if all(k.startswith(prefix) for k in state):
                consume_prefix_in_state_dict_if_present(state, prefix)
                stripped = True
    return state


def _torchvision_state(spec: str, arch: str | None) -> dict[str, Tensor]:
    """torchvision's weights for `arch`, through its weights API and torch.hub's cache."""
    # torchvision costs a second to import; only this path needs it.
    from torchvision.models import get_model_weights

    if arch is None:
        raise UserError(f"{spec}: the arch is needed to pick torchvision's weights")
    if arch not in TORCHVISION_ARCHS:
        raise UserError(f"{spec}: torchvision has no weights for arch {arch!r}; it has: "
                        f"{', '.join(TORCHVISION_ARCHS)}")
    enum = get_model_weights(arch)
    owner, _, name = spec[len(TORCHVISION):].rpartition(".")
    if owner not in ("", enum.__name__) or name not in enum.__members__:
        raise UserError(f"{spec}: not a torchvision weights name for {arch}; valid: "
                        f"{', '.join(enum.__members__)} (or {enum.__name__}.<name>)")
    weights = enum[name]
    try:
        state = weights.get_state_dict(progress=False, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError, pickle.UnpicklingError,
            http.client.HTTPException) as e:
        raise CheckpointError(
            f"{spec}: could not get {weights.url} ({_reason(e)}); the machine may be offline: "
            "download that file where there is a network and pass its path instead") from None
    return _strip_prefixes(_as_state_dict(state, spec))


# akamaster/pytorch_resnet_cifar10's trainer.py normalises with ImageNet's statistics.
AKAMASTER_MEAN, AKAMASTER_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


def akamaster_normalization_note(data) -> str | None:
    """A one-line note when ``data`` (a config's data section) does not normalise as
    akamaster's trainer did: their weights then see other inputs than they were trained on."""
    if data.normalize == "channel" and data.divide_std and data.mean == AKAMASTER_MEAN \
            and data.std == AKAMASTER_STD:
        return None
    return ("note: akamaster's weights were trained on (x - mean) / std with ImageNet's mean "
            f"{AKAMASTER_MEAN} and std {AKAMASTER_STD}; this config normalises otherwise "
            "(the packaged cifar10_akamaster.yaml does it their way)")


def check_torchvision_variant(spec: str, arch: str, variant: str | None) -> None:
    """torchvision's bottleneck ResNets put the stride in the 3x3 (our v1.5, the default):
    their weights load by key into a v1 network too, which is then silently another network
    (its outputs differ), so that combination is refused."""
    if spec.startswith(TORCHVISION) and variant == "v1" and arch in ("resnet50", "resnet101",
                                                                       "resnet152"):
        raise UserError(f"{spec}: torchvision's {arch} strides in the 3x3 conv "
                        f"(model.variant=v1.5); this config says model.variant=v1")


def fit_weights(model: nn.Module, state: dict, spec: str, *, new_head_ok: bool = True
                ) -> list[str]:
    """Load `state` into `model` strictly (keys and shapes). A head (fc) of another class
    count keeps the model's fresh one if `new_head_ok`; anything else that does not fit is a
    CheckpointError naming the first keys. Returns the notice lines (empty if all fit)."""
    own = unwrap(model).state_dict()
    state = dict(state)
    for key, value in own.items():
        # Files from before torch 0.4.1 (akamaster's among them) have no BN batch counters;
        # load_state_dict itself would fill in 0 for a plain dict.
        if key.endswith(".num_batches_tracked") and key not in state:
            state[key] = torch.zeros_like(value)
    head = _head_change(own, state)
    if head is not None:
        if not new_head_ok:
            raise CheckpointError(f"{spec}: its head fc has {head[0]} classes, the model "
                                  f"{head[1]}; a new head is not allowed here")
        state.update({k: own[k].clone() for k in HEAD if k in own and k in state})
    check_fits(model, state, spec)
    unwrap(model).load_state_dict(state, strict=True)
    return [] if head is None else \
        [f"{spec}: fc {head[0]} -> {head[1]} classes: the head is newly initialised"]


def _head_change(own: dict, state: dict) -> tuple[int, int] | None:
    """(classes in `state`, classes in the model) if fc differs only in its class count."""
    if "fc.weight" not in own or "fc.weight" not in state:
        return None
    mine, theirs = own["fc.weight"].shape, state["fc.weight"].shape
    if len(mine) != 2 or len(theirs) != 2 or mine[1] != theirs[1] or mine[0] == theirs[0]:
        return None
    return theirs[0], mine[0]


# --- akamaster/pytorch_resnet_cifar10 -------------------------------------------------------
#
# Their option A shortcut is F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, planes // 4, planes // 4)):
# the strided identity in the MIDDLE of the zero channels; ours (PadShortcut, fb.resnet.torch)
# puts it first: [x | zeros]. The spatial subsampling (::2 from pixel 0) is the same. Each
# stage's residual stream (what the units' conv2/bn2 write and the shortcuts carry) therefore
# holds the same features in another channel order; the units' inner channels (conv1 out,
# bn1, conv2 in) are private to a unit and keep theirs.

_STREAM_KEY = re.compile(r"layer(\d+)\.(\d+)\.(conv1|conv2|bn2)\."
                         r"(weight|bias|running_mean|running_var)")


def from_akamaster(state: dict) -> dict:
    """akamaster/pytorch_resnet_cifar10 -> our CIFAR ResNet (option A) state dict, exactly."""
    state = _strip_prefixes(state)
    for key in ("conv1.weight", "linear.weight", "layer1.0.conv2.weight"):
        if key not in state:
            raise CheckpointError(f"not an akamaster/pytorch_resnet_cifar10 ResNet: no {key!r}")
    projection = next((k for k in state if ".shortcut." in k), None)
    if projection is not None:
        # Their code always builds option A; a projection would also need no permutation.
        raise CheckpointError(f"{projection!r} is an option B shortcut: only akamaster's "
                              "option A nets (their resnet.py as published) are converted")
    orders = _akamaster_orders(state)
    last = max(orders)
    out: dict[str, Tensor] = {}
    for key, value in state.items():
        key = "fc." + key[len("linear."):] if key.startswith("linear.") else key
        dim_stage = (1, last) if key == "fc.weight" else _stream_dim(key)
        if dim_stage is not None:
            value = value.index_select(dim_stage[0], orders[dim_stage[1]])
        out[key] = value
        counter = key[: -len("running_var")] + "num_batches_tracked"
        if key.endswith(".running_var") and counter not in state:
            out[counter] = torch.tensor(0)  # their files predate BN's batch counter
    return out


def _stream_dim(key: str) -> tuple[int, int] | None:
    """(dim, stage) when a dim of `key`'s tensor indexes stage's residual stream channels
    (stage 0: the stem's output, which layer1 reads)."""
    m = _STREAM_KEY.fullmatch(key)
    if m is None:
        return None
    stage, unit, layer = int(m[1]), int(m[2]), m[3]
    if layer == "conv1":  # reads the stream: the previous stage's in a stage's first unit
        return 1, stage if unit > 0 else stage - 1
    return 0, stage  # conv2 and bn2 write it


def _akamaster_orders(state: dict) -> dict[int, Tensor]:
    """{stage: order}: our stream channel k is akamaster's channel order[k] after that stage."""
    order = torch.arange(state["conv1.weight"].shape[0])  # the stem: no padding yet
    orders = {0: order}
    stage = 1
    while f"layer{stage}.0.conv2.weight" in state:
        width = state[f"layer{stage}.0.conv2.weight"].shape[0]
        if width != len(order):
            # theirs [pad zeros | previous stream, in their order | pad zeros], ours
            # [previous stream | zeros]: the identity part composes with the previous order.
            # The channels padded with zeros may take the rest of theirs in any order, as
            # long as the whole stage uses it; take them in theirs.
            pad = (width - len(order)) // 2
            order = torch.cat([pad + order, torch.arange(pad),
                               torch.arange(pad + len(order), width)])
        orders[stage] = order
        stage += 1
    return orders
