"""The split every classifier here follows, so ONE can share a trunk between branches.

    logits = classifier(flatten(avgpool(last_stage(trunk(x)))))

`trunk` is the stem and all stages but the last; `last_stage` is the last stage plus any
final normalisation it needs; `classifier` is one nn.Linear. State dict keys therefore start
with "trunk.", "last_stage." or "classifier." in every family.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


def global_pool(features: torch.Tensor) -> torch.Tensor:
    """B×C×H×W → B×C. Adaptive, so any input size (8×8 digits, 32×32 CIFAR) works."""
    return F.adaptive_avg_pool2d(features, 1).flatten(1)


def init_weights(module: nn.Module) -> nn.Module:
    """Kaiming-normal convs (fan_out, as He et al.), BN weight 1 / bias 0, default Linear."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            m.reset_parameters()  # weight 1, bias 0, fresh running statistics
        elif isinstance(m, nn.Linear):
            m.reset_parameters()
    return module


def residual_norms(model: nn.Module) -> list[nn.BatchNorm2d]:
    """The BatchNorm that ends each residual branch (a block's `residual_norm()`, where the
    block has one: basic ResNet blocks, MobileNetV2's residual blocks; pre-activation WRN blocks
    end with a convolution and have none)."""
    return [norm for m in model.modules() if hasattr(m, "residual_norm")
            for norm in [m.residual_norm()] if norm is not None]


def zero_init_residual(model: nn.Module) -> nn.Module:
    """Set the scale γ of every residual branch's last BatchNorm to 0, so each block starts as
    the identity (Goyal et al. 2017; torchvision's zero_init_residual). Draws no random number,
    so the other weights stay those of the seed."""
    with torch.no_grad():
        for norm in residual_norms(model):
            norm.weight.zero_()
    return model


class SplitNet(nn.Module):
    """A classifier made of a shared-able trunk, a last stage and a linear head."""

    def __init__(self, trunk: nn.Module, last_stage: nn.Module, trunk_channels: int,
                 feature_channels: int, num_classes: int):
        super().__init__()
        self.trunk = trunk
        self.last_stage = last_stage
        self.classifier = nn.Linear(feature_channels, num_classes)
        self.trunk_channels = trunk_channels
        self.feature_channels = feature_channels
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(global_pool(self.last_stage(self.trunk(x))))


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of scalar parameters (all of them, or only those with requires_grad)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
