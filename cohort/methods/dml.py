"""DML, Deep Mutual Learning (Zhang, Xiang, Hospedales, Lu 2018): K peers trained together.

    L_k = CE(z_k, y) + λ · (1/(K−1)) Σ_{l≠k} soft_kl(z_k, z_l, T)

Every peer updates on the same step from the others' detached logits of that step.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F

from ..config import CohortConfig, redefault
from ..losses import soft_kl
from ..step import StepLoss
from .base import PAPER_INIT, CohortMethod, Recipe, register


@dataclass
class DmlConfig(CohortConfig):
    method: str = redefault(CohortConfig, "method", "dml")
    temperature: float = redefault(CohortConfig, "temperature", 1.0)   # the paper's T
    output: str = redefault(CohortConfig, "output", "runs/dml")


MCL_OKD = Recipe(
    source="MCL-OKD's DML/KDCL setting: 300 epochs, cosine, "
           "batch 128, SGD 0.9 Nesterov, lr 0.1, wd 5e-4, T=2",
    settings={"epochs": 300, "schedule": "cosine", "batch_size": 128, "lr": 0.1,
              "momentum": 0.9, "nesterov": True, "weight_decay": 5e-4, "temperature": 2.0,
              **PAPER_INIT})


@register
class Dml(CohortMethod):
    name = "dml"
    summary = "DML (deep mutual learning): K peers, each distilled from the others every step"
    Config = DmlConfig
    recipes = {"mcl-okd": MCL_OKD}

    def loss(self, k, z, logits, labels) -> StepLoss:
        peers = [p for j, p in enumerate(logits) if j != k]
        kd = sum(soft_kl(z, p, self.cfg.temperature) for p in peers) / len(peers)
        return StepLoss({"ce": F.cross_entropy(z, labels), "kd": kd}, {"kd": self.cfg.kd_weight})
