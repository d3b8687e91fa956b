"""OKDDip (Chen et al., AAAI 2020): a shared trunk, m branches — m−1 peers and a group leader —
and one shared attention (query and key maps) over the peers.

Each branch is a copy of the architecture's last stage plus its own classifier, re-initialised
independently (as in ONE, `cohort.models.one`). Branches 0..m−2 are the auxiliary peers;
branch m−1 is the group leader, the model that is deployed. For peer a with GAP feature
h_a (width d, the last stage's output channels) the net gives

    q_a = W_Q h_a,   k_a = W_K h_a,   W_Q, W_K: Linear(d → d // 8, no bias), shared by all peers.

The attention α_ab = softmax_b(q_a · k_b) and the peer targets are formed by the loss
(`cohort.methods.okddip`), not here. A branch is deployed as the plain `build_model(arch, ...)`
network (trunk + that branch).
"""
from __future__ import annotations

import torch
from torch import nn

from .base import global_pool
from .one import OneNet, share_trunk

ATTENTION_FACTOR = 8   # the key/query width is d // 8 (the official code's `factor`)


class OkddipNet(nn.Module):
    def __init__(self, arch: str, num_classes: int, branches: int = 4, in_channels: int = 3):
        super().__init__()
        if branches < 3:
            raise ValueError(f"--branches must be >= 3 for OKDDip: at least 2 peers and the "
                             f"group leader (got {branches})")
        base = share_trunk(self, arch, num_classes, branches, in_channels)
        self.feature_channels = base.classifier.in_features   # d, the GAP feature width
        if self.feature_channels < ATTENTION_FACTOR:
            raise ValueError(f"{arch}: feature width {self.feature_channels} is below "
                             f"{ATTENTION_FACTOR}, no room for a d // {ATTENTION_FACTOR} attention")
        width = self.feature_channels // ATTENTION_FACTOR
        self.query = nn.Linear(self.feature_channels, width, bias=False)   # W_Q
        self.key = nn.Linear(self.feature_channels, width, bias=False)     # W_K

    @property
    def num_peers(self) -> int:
        return self.num_branches - 1

    @property
    def leader_index(self) -> int:
        """The group leader's branch index (the last one), the deployed model."""
        return self.num_branches - 1

    def forward(self, x: torch.Tensor) -> tuple:
        """(list of m branch logits, each B×C, the leader last; peer queries B×P×d';
        peer keys B×P×d'), P = m − 1 peers, d' = d // 8.

        W_Q and W_K are applied here (inside forward, so DDP sees them used); the attention
        α = softmax(q kᵀ) is `cohort.methods.okddip.okddip_attention(queries, keys)`.
        """
        features = self.trunk(x)
        logits, peer_features = [], []
        for index, branch in enumerate(self.branches):
            h = global_pool(branch.last_stage(features))
            logits.append(branch.classifier(h))
            if index < self.num_peers:
                peer_features.append(h)
        h = torch.stack(peer_features, dim=1)          # B×P×d
        return logits, self.query(h), self.key(h)

    # Trunk + one branch as a plain network: the same logic as ONE (these use only trunk,
    # branches, num_branches, arch, num_classes, in_channels), shared rather than copied.
    branch_state_dict = OneNet.branch_state_dict
    export_branch = OneNet.export_branch

    def export_leader(self) -> nn.Module:
        """The group leader as a plain single-branch network, in eval mode."""
        return self.export_branch(self.leader_index)


def build_okddip(arch: str, num_classes: int, branches: int = 4, in_channels: int = 3) -> OkddipNet:
    return OkddipNet(arch, num_classes, branches, in_channels)
