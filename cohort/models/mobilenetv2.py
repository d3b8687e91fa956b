"""MobileNetV2 (Sandler et al. 2018) adapted to 32×32 inputs.

Width multiplier 1.0, expansion 6, the paper's seven bottleneck groups
(channels 16/24/32/64/96/160/320) and a 1×1 conv to 1280 channels before pooling.
CIFAR strides: the stem is stride 1 and the second group (24 channels) is stride 1, so
only the 32-, 64- and 160-channel groups downsample: 32×32 → 16 → 8 → 4 at the end.
2,351,972 parameters with 100 classes (2,236,682 with 10).

Split for ONE: `trunk` = stem + groups 1–5 (up to 96 channels, at 8×8 for 32×32 inputs);
`last_stage` = groups 6–7 (the last downsampling, 160 and 320 channels) + the 1280 head.
"""
from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

from .base import SplitNet

# (expansion t, output channels c, repeats n, stride s of the first block), CIFAR strides
GROUPS = (
    (1, 16, 1, 1),
    (6, 24, 2, 1),  # stride 2 on ImageNet
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)
TRUNK_GROUPS = 5
STEM_CHANNELS, HEAD_CHANNELS = 32, 1280


def conv_bn_relu(in_ch: int, out_ch: int, kernel: int, stride: int = 1, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_ch, out_ch, kernel, stride=stride, padding=kernel // 2, groups=groups, bias=False),
        nn.BatchNorm2d(out_ch),
        nn.ReLU6(inplace=True),
    )


class InvertedResidual(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, stride: int, expansion: int):
        super().__init__()
        hidden = in_ch * expansion
        layers = [] if expansion == 1 else [conv_bn_relu(in_ch, hidden, 1)]
        layers += [
            conv_bn_relu(hidden, hidden, 3, stride, groups=hidden),  # depthwise
            nn.Conv2d(hidden, out_ch, 1, bias=False),  # linear bottleneck: no activation
            nn.BatchNorm2d(out_ch),
        ]
        self.body = nn.Sequential(*layers)
        self.use_residual = stride == 1 and in_ch == out_ch

    def residual_norm(self):
        return self.body[-1] if self.use_residual else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.body(x)
        return x + out if self.use_residual else out


def make_group(in_ch: int, expansion: int, out_ch: int, repeats: int, stride: int) -> nn.Sequential:
    blocks = [InvertedResidual(in_ch, out_ch, stride, expansion)]
    blocks += [InvertedResidual(out_ch, out_ch, 1, expansion) for _ in range(repeats - 1)]
    return nn.Sequential(*blocks)


def make_groups(in_ch: int, settings, first_index: int) -> tuple:
    """Named groups ("group1", ...) built from `settings`, and their output channels."""
    groups = OrderedDict()
    for index, (t, c, n, s) in enumerate(settings, start=first_index):
        groups[f"group{index}"] = make_group(in_ch, t, c, n, s)
        in_ch = c
    return groups, in_ch


class MobileNetV2(SplitNet):
    def __init__(self, num_classes: int, in_channels: int = 3):
        trunk_layers, trunk_ch = make_groups(STEM_CHANNELS, GROUPS[:TRUNK_GROUPS], 1)
        trunk = nn.Sequential(OrderedDict(stem=conv_bn_relu(in_channels, STEM_CHANNELS, 3), **trunk_layers))
        last_layers, last_ch = make_groups(trunk_ch, GROUPS[TRUNK_GROUPS:], TRUNK_GROUPS + 1)
        last_stage = nn.Sequential(OrderedDict(**last_layers, head=conv_bn_relu(last_ch, HEAD_CHANNELS, 1)))
        super().__init__(trunk, last_stage, trunk_channels=trunk_ch,
                         feature_channels=HEAD_CHANNELS, num_classes=num_classes)


def mobilenet_factories() -> dict:
    return {"mobilenetv2": lambda nc, ic: MobileNetV2(nc, ic)}
