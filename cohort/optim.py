"""Optimizer and learning-rate schedule shared by every runtime.

The learning rate is a pure function of the epoch, so a resumed run needs no scheduler state.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch

SCHEDULES = ("step", "cosine", "constant")


def default_milestones(epochs: int) -> tuple[int, ...]:
    """Decay at 50% and 75% of training (the CIFAR recipes' 150/225 of 300)."""
    return tuple(sorted({max(1, epochs // 2), max(1, (3 * epochs) // 4)}))


def learning_rate(base_lr: float, schedule: str, epoch: int, epochs: int,
                  milestones: Sequence[int] = (), gamma: float = 0.1) -> float:
    """Learning rate for `epoch` (0-based)."""
    if schedule == "constant":
        return base_lr
    if schedule == "step":
        steps = milestones or default_milestones(epochs)
        return base_lr * gamma ** sum(epoch >= m for m in steps)
    if schedule == "cosine":
        return 0.5 * base_lr * (1.0 + math.cos(math.pi * epoch / max(1, epochs)))
    raise ValueError(f"unknown schedule {schedule!r}; choose from: {', '.join(SCHEDULES)}")


def warmup_factor(epoch: int, step: int, steps: int, warmup_epochs: float) -> float:
    """Linear learning-rate warm-up (Goyal et al. 2017): the scheduled rate times
    (optimizer steps so far + 1) / (warm-up steps) during the first `warmup_epochs`, 1 after."""
    total = warmup_epochs * steps
    done = epoch * steps + step + 1
    return 1.0 if total <= 0 or done >= total else done / total


def make_optimizer(params, lr: float, momentum: float, weight_decay: float,
                   nesterov: bool = False) -> torch.optim.SGD:
    return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay,
                           nesterov=nesterov)


def set_learning_rate(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
