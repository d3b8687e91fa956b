"""One registry from architecture name to a freshly initialised SplitNet."""
from __future__ import annotations

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
