"""Starting a new run from pre-trained weights: loading them and freezing modules.

A run from ``model.weights`` is a new run: only the weights (and BN statistics) come from
the file; position, optimizer and schedule start fresh. The lr of the pre-trained layers
relative to the head is ``optim.backbone_lr_scale`` (optim.param_groups).
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from .config import Config
from .errors import ConfigError


class FrozenStatsBatchNorm2d(nn.BatchNorm2d):
    """A BatchNorm2d that stays in eval mode: it normalises with its running statistics and
    never updates them, whatever ``model.train()`` says. The class is swapped in place, so the
    state dict (keys, buffers) is exactly a BatchNorm2d's and checkpoints stay portable."""

    frozen = True  # engine.precise_bn leaves these alone

    def train(self, mode: bool = True):
        return super().train(False)


def start_from_weights(model: nn.Module, cfg: Config, say: Callable[[str], None]) -> None:
    """Load ``cfg.model.weights`` into ``model`` strictly; a head of another class count is
    replaced by the model's fresh one (said in one line); anything else that does not fit
    is a CheckpointError naming the keys."""
    from .weights import (akamaster_normalization_note, check_torchvision_variant, fit_weights,
                          load_weights)
    m = cfg.model
    check_torchvision_variant(m.weights, m.arch, m.variant)
    state = load_weights(m.weights, m.arch, m.weights_from)
    note = akamaster_normalization_note(cfg.data) if m.weights_from == "akamaster" else None
    if note:
        say(note)
    for line in fit_weights(model, state, m.weights, new_head_ok=True):
        say(line)
    say(f"model.weights: initialised from {m.weights} (a new run: optimizer and schedule "
        f"start fresh)")


def freeze(model: nn.Module, names: list[str]) -> int:
    """Stop training the modules named in ``model.freeze`` (dotted names such as conv1,
    layer1 or layer2.0): no gradients, and their BatchNorms keep the statistics they have.
    Returns the number of parameters frozen."""
    modules = dict(model.named_modules())
    frozen = 0
    for name in names:
        if name not in modules or not name:
            top = ", ".join(n for n, _ in model.named_children())
            raise ConfigError(f"model.freeze: no module {name!r} in the model (its top-level "
                              f"modules: {top})")
        for sub in modules[name].modules():
            if type(sub) is nn.BatchNorm2d:
                sub.__class__ = FrozenStatsBatchNorm2d
                sub.eval()
        for p in modules[name].parameters():
            frozen += p.numel() if p.requires_grad else 0
            p.requires_grad_(False)
    if not any(p.requires_grad for p in model.parameters()):
        raise ConfigError(f"model.freeze: {names} freezes every parameter: nothing to train")
    return frozen
