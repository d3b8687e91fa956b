"""KDCL, Online Knowledge Distillation via Collaborative Learning (Guo et al. CVPR 2020).

Each student sees its own augmentation of the batch; from all students' logits one teacher
z_t is built (variant naive, linear, minlogit or general: cohort.losses.kdcl_teacher), then

    L_k = CE(z_k, y) + λ · soft_kl(z_k, z_t, T)

KDCL-general weighs the students by their held-out predictions, recomputed once per epoch.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F

from ..config import CohortConfig, auto_or, redefault, require, setting, unit_interval
from ..losses import KDCL_VARIANTS, kdcl_teacher, soft_kl
from ..step import StepLoss
from .base import CohortMethod, register
from .dml import MCL_OKD


GENERAL_VAL_FRACTION = 0.1


@dataclass
class KdclConfig(CohortConfig):
    method: str = redefault(CohortConfig, "method", "kdcl")
    variant: str = setting("linear", "how the students' logits make the teacher", choices=KDCL_VARIANTS)
    output: str = redefault(CohortConfig, "output", "runs/kdcl")
    val_fraction: float = redefault(CohortConfig, "val_fraction", -1.0, check=auto_or(unit_interval()),
                                    help=f"held-out share of the training set: chooses the best "
                                         f"epoch/member (never the test set); -1: "
                                         f"{GENERAL_VAL_FRACTION} with --variant general (its "
                                         f"weights are fitted there), else 0")

    default_views = "separate"   # each student draws its own augmentation

    def __post_init__(self):
        if self.val_fraction == -1:
            self.val_fraction = GENERAL_VAL_FRACTION if self.variant == "general" else 0.0
        super().__post_init__()

    def check(self) -> None:
        super().check()
        if self.variant == "general":
            require(self.val_fraction > 0, "--val-fraction",
                    "KDCL-general needs a held-out split: give --val-fraction > 0 (e.g. 0.1)")


@register
class Kdcl(CohortMethod):
    name = "kdcl"
    summary = "KDCL (collaborative learning): an ensemble teacher of differently-augmented students"
    Config = KdclConfig
    recipes = {"mcl-okd": MCL_OKD}

    def needs_val_weights(self) -> bool:
        return self.cfg.variant == "general"

    def targets(self, logits, labels, weights):
        return kdcl_teacher(logits, labels, self.cfg.variant, weights)

    def loss(self, k, z, teacher, labels) -> StepLoss:
        kd = soft_kl(z, teacher, self.cfg.temperature)
        return StepLoss({"ce": F.cross_entropy(z, labels), "kd": kd}, {"kd": self.cfg.kd_weight})
