"""Independent training: K students side by side, each on cross-entropy alone (the baseline
every cohort method is measured against, with the same data order and recipe)."""
from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F

from ..config import CohortConfig, redefault
from ..step import StepLoss
from .base import CohortMethod, register


@dataclass
class IndependentConfig(CohortConfig):
    method: str = redefault(CohortConfig, "method", "independent")
    output: str = redefault(CohortConfig, "output", "runs/independent")


@register
class Independent(CohortMethod):
    name = "independent"
    summary = "K students trained alone side by side (the baseline; cross-entropy only)"
    Config = IndependentConfig
    uses_peers = False

    def targets(self, logits, labels, weights):
        return None

    def loss(self, k, z, targets, labels) -> StepLoss:
        # kd is 0 and weighs 0: the column stays comparable with the distilling methods'
        return StepLoss({"ce": F.cross_entropy(z, labels), "kd": z.new_zeros(())}, {"kd": 0.0})
