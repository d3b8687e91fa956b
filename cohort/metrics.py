"""Test metrics of members and of the ensemble (mean of the members' softmax)."""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F


def accuracy_and_loss(logits: torch.Tensor, labels: torch.Tensor) -> tuple[float, float]:
    """Top-1 accuracy (%) and mean cross-entropy of logits."""
    logits = logits.float()
    acc = (logits.argmax(1) == labels).float().mean().item() * 100.0
    return acc, F.cross_entropy(logits, labels).item()


def ensemble_metrics(member_logits: Sequence[torch.Tensor], labels: torch.Tensor) -> tuple[float, float]:
    """Accuracy and NLL of the mean of the members' softmax probabilities."""
    probs = torch.stack([F.softmax(z.float(), dim=1) for z in member_logits]).mean(0)
    acc = (probs.argmax(1) == labels).float().mean().item() * 100.0
    nll = F.nll_loss(probs.clamp_min(1e-12).log(), labels).item()
    return acc, nll


def is_finite(value: float) -> bool:
    return not (math.isnan(value) or math.isinf(value))
