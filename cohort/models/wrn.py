"""Wide ResNets WRN-d-k (Zagoruyko & Komodakis 2016), pre-activation wide basic blocks.

A 3×3 stem (16 channels, no BN: blocks are pre-activation), then three stages of
n = (d−4)/6 blocks with 16k/32k/64k channels (strides 1/2/2), a final BN + ReLU, pooling
and a linear classifier. A shape-changing block projects its shortcut with a bare 1×1
conv applied to the pre-activated input, as in the paper's code. No dropout.
The final BN + ReLU belongs to `last_stage`, so a ONE branch normalises its own features.
"""
from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

from .base import SplitNet


class WideBlock(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, stride: int):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, stride=1, padding=1, bias=False)
        self.relu = nn.ReLU(inplace=True)  # acts on fresh BN outputs, never on x itself
        self.shortcut = None
        if stride != 1 or in_ch != out_ch:
            self.shortcut = nn.Conv2d(in_ch, out_ch, 1, stride=stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre = self.relu(self.bn1(x))
        identity = x if self.shortcut is None else self.shortcut(pre)
        out = self.conv1(pre)
        out = self.conv2(self.relu(self.bn2(out)))
        return out + identity


def make_stage(in_ch: int, out_ch: int, blocks: int, stride: int) -> nn.Sequential:
    layers = [WideBlock(in_ch, out_ch, stride)]
    layers += [WideBlock(out_ch, out_ch, 1) for _ in range(blocks - 1)]
    return nn.Sequential(*layers)


class WideResNet(SplitNet):
    def __init__(self, depth: int, widen: int, num_classes: int, in_channels: int = 3):
        if (depth - 4) % 6 != 0:
            raise ValueError(f"WRN depth must be 6n+4 (got {depth})")
        n = (depth - 4) // 6
        c1, c2, c3 = 16 * widen, 32 * widen, 64 * widen
        trunk = nn.Sequential(OrderedDict(
            stem=nn.Conv2d(in_channels, 16, 3, padding=1, bias=False),
            stage1=make_stage(16, c1, n, 1),
            stage2=make_stage(c1, c2, n, 2),
        ))
        last_stage = nn.Sequential(OrderedDict(
            stage3=make_stage(c2, c3, n, 2),
            bn=nn.BatchNorm2d(c3),
            relu=nn.ReLU(inplace=True),
        ))
        super().__init__(trunk, last_stage, trunk_channels=c2, feature_channels=c3,
                         num_classes=num_classes)
        self.depth, self.widen = depth, widen


WRN_CONFIGS = ((16, 1), (16, 2), (40, 1), (40, 2), (28, 10))


def wrn_factories() -> dict:
    return {f"wrn_{d}_{k}": (lambda d, k: lambda nc, ic: WideResNet(d, k, nc, ic))(d, k)
            for d, k in WRN_CONFIGS}
