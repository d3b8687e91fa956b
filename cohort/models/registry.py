"""One registry from architecture name to a freshly initialised SplitNet."""
from __future__ import annotations

import torch
from torch import nn

from .mobilenetv2 import mobilenet_factories
from .resnet import resnet_factories
from .wrn import wrn_factories

_FACTORIES = {**resnet_factories(), **wrn_factories(), **mobilenet_factories()}
MODEL_NAMES = tuple(_FACTORIES)


def build_model(name: str, num_classes: int, in_channels: int = 3) -> nn.Module:
    """A classifier returning B×num_classes logits, for any input size ≥ 1×1."""
    if name not in _FACTORIES:
        raise ValueError(f"unknown arch {name!r}; choose from: {', '.join(MODEL_NAMES)}")
    return _FACTORIES[name](num_classes, in_channels)


# Residual blocks beyond which the plain initialisation blows up at lr 0.1 (measured on digits,
# 5 epochs, batch 64, cosine): resnet20 (9 blocks) learns from it (96%), resnet32 (15) and
# resnet56 (27) end near chance (15-26%); zero-initialised, shallow nets learn slower instead
# (resnet8 after 3 epochs: 70-73% against 94-96% plain).
DEEP_RESIDUAL_BLOCKS = 10
RESIDUAL_INIT = ("auto", "on", "off")


def residual_blocks(name: str) -> int:
    """How many residual branches with a closing BatchNorm the plain network `name` has."""
    from .base import residual_norms
    with torch.device("meta"):   # shapes only: nothing allocated, no random number drawn
        return len(residual_norms(build_model(name, 10, 3)))


def zero_init_wanted(mode: str, arch: str) -> bool:
    """--zero-init-residual: on, off, or auto (on for nets deeper than DEEP_RESIDUAL_BLOCKS)."""
    if mode not in RESIDUAL_INIT:
        raise ValueError(f"zero_init_residual must be one of {RESIDUAL_INIT} (got {mode!r})")
    return mode == "on" or (mode == "auto" and residual_blocks(arch) > DEEP_RESIDUAL_BLOCKS)
