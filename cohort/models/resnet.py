"""CIFAR ResNets with basic blocks (He et al. 2016), as used by KD benchmarks.

Depth 6n+2: a 3×3 stem and three stages of n blocks (16/32/64 channels, strides 1/2/2).
Where a block changes shape the shortcut is a 1×1 conv + BN projection (RepDistiller's
choice, not the paper's zero-padding option A), so resnet32 has ≈0.47M parameters for
100 classes. The ×4 variants (resnet8x4, resnet32x4) use a 32-channel stem and stages of
64/128/256 channels.

Note: the official ONE code's ResNet-110 uses bottleneck blocks; every ResNet here uses
basic blocks, as the KD benchmarks (RepDistiller, PCL) do.
"""
from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

from .base import SplitNet


def conv3x3(in_ch: int, out_ch: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=1, bias=False)


class BasicBlock(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, stride: int):
        super().__init__()
        self.conv1 = conv3x3(in_ch, out_ch, stride)
        self.bn1 = nn.BatchNorm2d(out_ch)
        self.conv2 = conv3x3(out_ch, out_ch)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut = None
        if stride != 1 or in_ch != out_ch:
            self.shortcut = nn.Sequential(nn.Conv2d(in_ch, out_ch, 1, stride=stride, bias=False),
                                          nn.BatchNorm2d(out_ch))

    def residual_norm(self) -> nn.BatchNorm2d:
        return self.bn2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.shortcut is None else self.shortcut(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


def make_stage(in_ch: int, out_ch: int, blocks: int, stride: int) -> nn.Sequential:
    layers = [BasicBlock(in_ch, out_ch, stride)]
    layers += [BasicBlock(out_ch, out_ch, 1) for _ in range(blocks - 1)]
    return nn.Sequential(*layers)


class CifarResNet(SplitNet):
    def __init__(self, depth: int, num_classes: int, in_channels: int = 3,
                 widths: tuple = (16, 16, 32, 64)):
        if (depth - 2) % 6 != 0:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2 (got {depth})")
        n = (depth - 2) // 6
        stem_ch, c1, c2, c3 = widths
        stem = nn.Sequential(conv3x3(in_channels, stem_ch), nn.BatchNorm2d(stem_ch), nn.ReLU(inplace=True))
        trunk = nn.Sequential(OrderedDict(
            stem=stem,
            stage1=make_stage(stem_ch, c1, n, 1),
            stage2=make_stage(c1, c2, n, 2),
        ))
        super().__init__(trunk, make_stage(c2, c3, n, 2), trunk_channels=c2,
                         feature_channels=c3, num_classes=num_classes)
        self.depth = depth


WIDE_X4 = (32, 64, 128, 256)  # RepDistiller's resnet8x4 / resnet32x4


def resnet_factories() -> dict:
    factories = {}
    for depth in (8, 14, 20, 32, 44, 56, 110):
        factories[f"resnet{depth}"] = (lambda d: lambda nc, ic: CifarResNet(d, nc, ic))(depth)
    for depth in (8, 32):
        factories[f"resnet{depth}x4"] = (lambda d: lambda nc, ic: CifarResNet(d, nc, ic, WIDE_X4))(depth)
    return factories
