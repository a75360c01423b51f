"""CIFAR ResNets (He et al. 2015, Sec. 4.2; He et al. 2016): 3x3 stem, three stages, 32x32."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from resnet_train.models.blocks import (UNITS, ResidualBlock, init_weights, make_head_act,
                                        make_stage)


class CifarResNet(nn.Module):
    """Stages of width w, 2w, 4w (x block expansion) on 32x32 input, no max pool."""

    def __init__(self, block: type[ResidualBlock], layers: tuple[int, int, int],
                 num_classes: int = 10, *, width: int = 16, in_channels: int = 3,
                 variant: str = "v1", shortcut: str = "A", unit: str = "original",
                 zero_init_residual: bool = False, shortcut_variant: str | None = None) -> None:
        super().__init__()
        # With full pre-activation the stem is a bare conv: the first unit's shared BN-ReLU
        # normalises both its paths (fb.resnet.torch preresnet, Kaiming's resnet-pre-act.lua).
        # A unit that leads with a bare ReLU keeps the stem's BN-ReLU; layer1's first unit
        # then omits its ReLU, which would see rectified input.
        bare_stem = "bn" in UNITS[unit].lead
        self.conv1 = nn.Conv2d(in_channels, width, 3, padding=1, bias=False)
        self.bn1 = nn.Identity() if bare_stem else nn.BatchNorm2d(width)
        self.relu = nn.Identity() if bare_stem else nn.ReLU(inplace=True)
        common = dict(unit=unit, shortcut=shortcut, variant=variant,
                      shortcut_variant=shortcut_variant)
        self.layer1, c = make_stage(block, width, width, layers[0], 1,
                                    first_preact="shared" if bare_stem else "omit", **common)
        self.layer2, c = make_stage(block, c, width * 2, layers[1], 2, first_preact="shared",
                                    **common)
        self.layer3, c = make_stage(block, c, width * 4, layers[2], 2, first_preact="shared",
                                    **common)
        self.final_act = make_head_act(unit, c)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(c, num_classes)
        init_weights(self, zero_init_residual)

    def forward(self, x: Tensor) -> Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        x = self.avgpool(self.final_act(x))
        return self.fc(torch.flatten(x, 1))
