"""ONE (Lan, Zhu, Gong 2018): one shared trunk, m branches and a gate that weighs them.

Each branch is a copy of the architecture's last stage plus its own classifier, initialised
independently so the branches start apart. The gate reads the shared trunk features:
global average pool → Linear(C→m) → BatchNorm1d(m) → ReLU → softmax over branches.
The ensemble teacher z_e = Σ_i g_i z_i is formed by the loss, not here.
A branch is deployed as the plain `build_model(arch, ...)` network (trunk + that branch).
"""
from __future__ import annotations

import copy
from collections import OrderedDict

import torch
from torch import nn
from torch.nn import functional as F

from .base import global_pool, init_weights
from .registry import MODEL_NAMES, build_model

ONE_MODEL_NAMES = MODEL_NAMES


class Branch(nn.Module):
    """The last stage and classifier of one ONE branch (same keys as in the plain model)."""

    def __init__(self, last_stage: nn.Module, classifier: nn.Linear):
        super().__init__()
        self.last_stage = last_stage
        self.classifier = classifier

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.classifier(global_pool(self.last_stage(features)))


def share_trunk(net: nn.Module, arch: str, num_classes: int, branches: int, in_channels: int):
    """Give `net` (ONE, OKDDip, PCL) the trunk of a plain `arch` and m branches: that
    network's last stage and classifier, then m − 1 copies initialised afresh. Returns the
    plain network (its sizes)."""
    base = build_model(arch, num_classes, in_channels)
    net.arch, net.num_classes, net.in_channels = arch, num_classes, in_channels
    net.num_branches = branches
    net.trunk = base.trunk
    first = Branch(base.last_stage, base.classifier)
    net.branches = nn.ModuleList([first] + [init_weights(copy.deepcopy(first))
                                            for _ in range(branches - 1)])
    return base


class OneNet(nn.Module):
    def __init__(self, arch: str, num_classes: int, branches: int, in_channels: int = 3):
        super().__init__()
        if branches < 2:
            raise ValueError(f"--branches must be >= 2 for ONE (got {branches})")
        base = share_trunk(self, arch, num_classes, branches, in_channels)
        self.gate = nn.Sequential(
            nn.Linear(base.trunk_channels, branches),
            nn.BatchNorm1d(branches),
            nn.ReLU(inplace=True),
        )

    def forward(self, x: torch.Tensor) -> tuple:
        """(list of m branch logits, each B×C; gate weights B×m, rows on the simplex)."""
        features = self.trunk(x)
        logits = [branch(features) for branch in self.branches]
        gate = F.softmax(self.gate(global_pool(features)), dim=1)
        return logits, gate

    def branch_state_dict(self, index: int) -> "OrderedDict[str, torch.Tensor]":
        """State dict of trunk + branch `index`, loadable strictly into build_model(arch, ...)."""
        if not 0 <= index < self.num_branches:
            raise IndexError(f"branch {index} out of range for {self.num_branches} branches")
        state = OrderedDict((f"trunk.{k}", v) for k, v in self.trunk.state_dict().items())
        state.update(self.branches[index].state_dict())
        return state

    def export_branch(self, index: int) -> nn.Module:
        """Branch `index` as a plain single-branch network, in eval mode, on this net's device."""
        model = build_model(self.arch, self.num_classes, self.in_channels)
        model.load_state_dict(self.branch_state_dict(index), strict=True)
        reference = next(self.parameters())
        return model.to(device=reference.device, dtype=reference.dtype).eval()


def build_one(name: str, num_classes: int, branches: int, in_channels: int = 3) -> OneNet:
    return OneNet(name, num_classes, branches, in_channels)
