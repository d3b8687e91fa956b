"""One training step, the same in every runtime: named loss terms in, an optimizer step out.

A method turns one step's logits into a `StepLoss`: named, unweighted loss terms (with graph),
their weights, and extra statistics to log. `take_step` checks the total is finite, steps the
optimizer, and adds the step's terms and statistics to an `EpochStats`; the logged `ce`, `kd`,
... are the very tensors the loss was built from, computed once.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from .errors import TrainingDiverged


@dataclass
class StepLoss:
    terms: dict[str, torch.Tensor]                       # unweighted, with graph
    weights: dict[str, float] = field(default_factory=dict)   # a missing name weighs 1
    stats: dict[str, torch.Tensor] = field(default_factory=dict)   # logged only

    def total(self) -> torch.Tensor:
        """Σ_name weight · term, in the terms' order."""
        total = None
        for name, term in self.terms.items():
            weight = self.weights.get(name, 1.0)
            part = term if weight == 1.0 else weight * term
            total = part if total is None else total + part
        return total


class EpochStats:
    """Sample-weighted means over an epoch of named scalars, summed on the device and read
    once per epoch (no host sync per step)."""

    def __init__(self, device: torch.device):
        self.device, self.names, self.sums = device, None, None

    def add(self, values: dict[str, torch.Tensor], samples: int) -> None:
        if self.names is None:
            self.names = list(values)
            self.sums = torch.zeros(len(self.names) + 1, dtype=torch.float64, device=self.device)
        with torch.no_grad():
            self.sums[:-1] += torch.stack([values[n].detach().double() for n in self.names]) * samples
            self.sums[-1] += samples

    def totals(self) -> torch.Tensor:
        """[Σ value·n ..., Σ n] (all-reduce this across ranks before `means`)."""
        return self.sums

    def means(self, sums: torch.Tensor | None = None) -> tuple[dict[str, float], float]:
        sums = self.sums if sums is None else sums
        if sums is None:
            return {}, 0.0
        values = sums.tolist()
        samples = max(values[-1], 1.0)
        return {n: v / samples for n, v in zip(self.names, values[:-1])}, values[-1]


def take_step(optimizer: torch.optim.Optimizer, loss: StepLoss, who: str, epoch: int, step: int,
              stats: EpochStats, samples: int, extra: dict[str, torch.Tensor] | None = None) -> float:
    """Check the total is finite, backpropagate, step the optimizer and record the step's
    `loss`, terms, statistics and `extra` in `stats`; returns the total's value."""
    total = loss.total()
    value = total.item()   # the one host sync per step: the finite check needs it
    if not math.isfinite(value):
        raise TrainingDiverged(who, epoch, step, value)
    optimizer.zero_grad(set_to_none=True)
    total.backward()
    optimizer.step()
    stats.add({"loss": total, **loss.terms, **loss.stats, **(extra or {})}, samples)
    return value
