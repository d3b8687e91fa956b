"""Methods are data: how a cohort's detached logits become each member's targets, and its loss.

Every runtime calls `targets` once per step with all members' detached logits (in member
order) and then `loss` for the members it holds, so the single-process cohort, the Ray
actors and any other runtime compute identical numbers.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F

from . import losses

Targets = Any


@dataclass(frozen=True)
class Method:
    name: str
    uses_peers: bool
    # (detached logits of all members, labels, config, kdcl weights) -> targets
    targets: Callable[[Sequence[torch.Tensor], torch.Tensor, Any, Any], Targets]
    # (member index, its logits with graph, targets, labels, config) -> scalar loss
    loss: Callable[[int, torch.Tensor, Targets, torch.Tensor, Any], torch.Tensor]
    # (member index, its detached logits, targets, config) -> distillation term, for logs
    kd_term: Callable[[int, torch.Tensor, Targets, Any], torch.Tensor]


def _peers(k: int, all_logits: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    return [z for j, z in enumerate(all_logits) if j != k]


def _zero(k, z, targets, cfg):
    return z.new_zeros(())


def _dml_kd(k, z, all_logits, cfg):
    peers = _peers(k, all_logits)
    return sum(losses.soft_kl(z, p, cfg.temperature) for p in peers) / len(peers)


METHODS: dict[str, Method] = {
    "independent": Method(
        "independent", False,
        targets=lambda logits, labels, cfg, weights: None,
        loss=lambda k, z, targets, labels, cfg: F.cross_entropy(z, labels),
        kd_term=_zero),
    "dml": Method(
        "dml", True,
        targets=lambda logits, labels, cfg, weights: list(logits),
        loss=lambda k, z, all_logits, labels, cfg: losses.dml_loss(
            z, _peers(k, all_logits), labels, cfg.temperature, cfg.kd_weight),
        kd_term=_dml_kd),
    "kdcl": Method(
        "kdcl", True,
        targets=lambda logits, labels, cfg, weights: losses.kdcl_teacher(
            logits, labels, cfg.variant, weights),
        loss=lambda k, z, teacher, labels, cfg: losses.kdcl_loss(
            z, teacher, labels, cfg.temperature, cfg.kd_weight),
        kd_term=lambda k, z, teacher, cfg: losses.soft_kl(z, teacher, cfg.temperature)),
}


def get_method(name: str) -> Method:
    return METHODS[name]


def needs_general_weights(cfg) -> bool:
    return cfg.method == "kdcl" and cfg.variant == "general"
