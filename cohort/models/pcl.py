"""PCL (Wu & Gong, AAAI 2021): a shared trunk, m branches each on its own view, and a linear
peer-ensemble teacher on the branches' concatenated pooled features.

Each branch is a copy of the architecture's last stage plus its own classifier (as in ONE),
initialised independently. A branch is deployed as the plain `build_model(arch, ...)` network
(trunk + that branch); the temporal mean (EMA) copy is kept by the method, not here.
"""
from __future__ import annotations

import torch
from torch import nn

from .base import global_pool
from .one import OneNet, share_trunk


class PclNet(nn.Module):
    def __init__(self, arch: str, num_classes: int, branches: int = 3, in_channels: int = 3):
        super().__init__()
        if branches < 2:
            raise ValueError(f"--branches must be >= 2 for PCL (got {branches})")
        base = share_trunk(self, arch, num_classes, branches, in_channels)
        width = base.classifier.in_features
        self.ensemble = nn.Linear(branches * width, num_classes)   # the peer ensemble teacher

    def forward(self, views) -> tuple:
        """(list of m branch logits, each B×C; the peer ensemble's logits B×C). `views`: a list
        of m tensors, branch j's own augmentation of the batch (the trunk runs once per view),
        or one tensor that every branch sees (evaluation)."""
        if isinstance(views, torch.Tensor):
            shared = self.trunk(views)
            features = [shared] * self.num_branches
        else:
            if len(views) != self.num_branches:
                raise ValueError(f"PCL takes {self.num_branches} views, got {len(views)}")
            features = [self.trunk(v) for v in views]
        pooled = [global_pool(branch.last_stage(f)) for branch, f in zip(self.branches, features)]
        logits = [branch.classifier(h) for branch, h in zip(self.branches, pooled)]
        return logits, self.ensemble(torch.cat(pooled, dim=1))

    # Trunk + one branch as a plain network: ONE's logic, shared rather than copied.
    branch_state_dict = OneNet.branch_state_dict
    export_branch = OneNet.export_branch


def build_pcl(arch: str, num_classes: int, branches: int = 3, in_channels: int = 3) -> PclNet:
    return PclNet(arch, num_classes, branches, in_channels)
