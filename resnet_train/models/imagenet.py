"""ImageNet ResNets (He et al. 2015, Table 1): 7x7/2 stem, 3x3/2 max pool, four stages."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from resnet_train.models.blocks import ResidualBlock, init_weights, make_head_act, make_stage


class ImageNetResNet(nn.Module):
    """Stages of width w, 2w, 4w, 8w (x block expansion); torchvision's module names."""

    def __init__(self, block: type[ResidualBlock], layers: tuple[int, int, int, int],
                 num_classes: int = 1000, *, width: int = 64, in_channels: int = 3,
                 variant: str = "v1.5", shortcut: str = "B", unit: str = "original",
                 zero_init_residual: bool = False, shortcut_variant: str | None = None) -> None:
        super().__init__()
        # The stem keeps its BN-ReLU even for pre-activation units: it must precede the max
        # pool, so layer1's first unit omits its own (fb.resnet.torch preresnet.lua).
        self.conv1 = nn.Conv2d(in_channels, width, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        common = dict(unit=unit, shortcut=shortcut, variant=variant,
                      shortcut_variant=shortcut_variant)
        self.layer1, c = make_stage(block, width, width, layers[0], 1, first_preact="omit",
                                    **common)
        self.layer2, c = make_stage(block, c, width * 2, layers[1], 2, first_preact="shared",
                                    **common)
        self.layer3, c = make_stage(block, c, width * 4, layers[2], 2, first_preact="shared",
                                    **common)
        self.layer4, c = make_stage(block, c, width * 8, layers[3], 2, first_preact="shared",
                                    **common)
        self.final_act = make_head_act(unit, c)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(c, num_classes)
        init_weights(self, zero_init_residual)

    def forward(self, x: Tensor) -> Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = self.avgpool(self.final_act(x))
        # flatten, not view: a channels_last (N, C, 1, 1) tensor is not view-compatible
        return self.fc(torch.flatten(x, 1))
