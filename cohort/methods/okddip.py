"""OKDDip, Online Knowledge Distillation with Diverse Peers (Chen, Mei, Wang, Feng, Chen,
AAAI 2020; official code github.com/DefangChen/OKDDip, train_GL.py and resnet_GL.py).

One network (`cohort.models.okddip.OkddipNet`): a shared trunk and m branches; branches
a = 1..P (P = m − 1, code indices 0..m−2) are peers with logits z_a and GAP features h_a,
branch L (index m−1) is the group leader with logits z_L, the deployed model.

    q_a = W_Q h_a,  k_a = W_K h_a                        (shared Linear(d → d/8, no bias))
    α_ab = softmax_b(q_a · k_b)                          (over all peers, b = a included,
                                                          no 1/√d scaling; per sample)
    t_a = Σ_b α_ab z_b                                   (peer a's target)
    t_L = (1/P) Σ_a z_a                                  (the leader's target)

    L = Σ_a CE(z_a, y) + CE(z_L, y) + λ(e) · [Σ_a KL_T(z_a ‖ t_a) + KL_T(z_L ‖ t_L)]

    KL_T(z ‖ t) = T² · (1/B) Σ_i Σ_c p_t (log p_t − log p_z),   p = softmax(· / T),

T = 3, λ(e) = kd_weight · w(e), w(e) = exp(−5 (1 − min(e, R)/R)²), R = 80 (0-based epoch e).

Neither target is detached, as in the official code: the KL gradient through t_a is what
trains W_Q and W_K (detached, the attention would get no gradient at all), and the leader's
KL also reaches the peers through t_L.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F

from ..config import at_least, redefault
from ..losses import _check_temperature
from ..metrics import accuracy_and_loss, ensemble_metrics
from ..models.okddip import build_okddip
from ..step import StepLoss
from ..student import DataSpec
from .base import PAPER_INIT, EpochContext, EvalSet, Recipe, register
from .one import BranchConfig, BranchMethod, BranchSelection, branch_logits_on, rampup_weight, seeded


OKDDIP_TERMS = ("ce", "kd_peers", "kd_leader")   # the named, unweighted loss terms


# ----------------------------------------------------------------------------- the math

def _logits(name: str, logits: Sequence[torch.Tensor], at_least: int) -> list[torch.Tensor]:
    members = list(logits)
    if len(members) < at_least:
        raise ValueError(f"{name} must hold at least {at_least} tensors, got {len(members)}")
    for i, z in enumerate(members):
        if not isinstance(z, torch.Tensor) or z.dim() != 2 or z.shape != members[0].shape:
            shape = tuple(z.shape) if isinstance(z, torch.Tensor) else type(z).__name__
            raise ValueError(f"{name}[{i}] must be a B x C tensor like {name}[0] "
                             f"{tuple(members[0].shape)}, got {shape}")
    return members


def okddip_attention(queries: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """``α[i, a, b] = softmax_b(q[i, a] · k[i, b])``: B×P×d' queries and keys → B×P×P.

    Every peer attends to every peer, itself included; no 1/√d' scaling (official code).
    Each row α[i, a, :] lies on the simplex. Differentiable in both arguments.
    """
    if queries.dim() != 3 or queries.shape != keys.shape:
        raise ValueError(f"queries and keys must both be B x P x d', got "
                         f"{tuple(queries.shape)} and {tuple(keys.shape)}")
    energy = torch.bmm(queries, keys.transpose(1, 2))   # B×P×P, energy[i, a, b] = q_a · k_b
    return F.softmax(energy, dim=-1)


def okddip_targets(peer_logits: Sequence[torch.Tensor],
                   alpha: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
    """(peer targets ``t_a = Σ_b α_ab z_b``, a list of P tensors B×C; the leader target
    ``(1/P) Σ_a z_a``, B×C). Not detached: gradient reaches α and every z_b."""
    peers = _logits("peer_logits", peer_logits, 1)
    p, bsz = len(peers), peers[0].shape[0]
    if alpha.dim() != 3 or tuple(alpha.shape) != (bsz, p, p):
        raise ValueError(f"alpha must be B x P x P = {bsz} x {p} x {p}, got {tuple(alpha.shape)}")
    z = torch.stack(peers, dim=1)                       # B×P×C
    mixed = torch.bmm(alpha, z)                         # B×P×C, mixed[i, a] = Σ_b α[i,a,b] z_b[i]
    return list(mixed.unbind(dim=1)), z.mean(dim=1)


def okddip_kl(student_logits: torch.Tensor, target_logits: torch.Tensor,
              temperature: float) -> torch.Tensor:
    """``T² · (1/B) Σ_i Σ_c p_t (log p_t − log p_s)``, ``p = softmax(z / T)``, target NOT detached.

    Written here instead of using `cohort.losses.soft_kl` because that one detaches its target
    (by design, for KD/DML/ONE), which would cut the only gradient path into W_Q and W_K.
    The official KL_Loss adds 1e-7 to p_t (unnormalised) before its log; the exact
    log-softmax is used here instead (a difference below ~C·1e-7 nats).
    """
    t = _check_temperature(temperature)
    if student_logits.dim() != 2 or student_logits.shape != target_logits.shape:
        raise ValueError(f"student and target logits must both be B x C, got "
                         f"{tuple(student_logits.shape)} and {tuple(target_logits.shape)}")
    log_ps = F.log_softmax(student_logits / t, dim=1)
    log_pt = F.log_softmax(target_logits / t, dim=1)
    return F.kl_div(log_ps, log_pt, reduction="batchmean", log_target=True) * (t * t)


def okddip_total(terms: dict[str, torch.Tensor], kd_weight: float) -> torch.Tensor:
    """``ce + kd_weight · (kd_peers + kd_leader)`` from the named terms of `okddip_loss`."""
    return terms["ce"] + float(kd_weight) * (terms["kd_peers"] + terms["kd_leader"])


def okddip_loss(branch_logits: Sequence[torch.Tensor], alpha: torch.Tensor, labels: torch.Tensor,
                temperature: float = 3.0, kd_weight: float = 1.0) -> dict[str, torch.Tensor]:
    """OKDDip's loss, by named terms (with graph). ``branch_logits``: the m branches' logits,
    peers first, the leader last (as `OkddipNet` returns them); ``alpha``: B×P×P attention.

    - ``ce``        Σ_a CE(z_a, y) + CE(z_L, y)
    - ``kd_peers``  Σ_a KL_T(z_a ‖ t_a),  t_a = Σ_b α_ab z_b         (unweighted)
    - ``kd_leader`` KL_T(z_L ‖ (1/P) Σ_a z_a)                         (unweighted)
    - ``total``     ce + kd_weight · (kd_peers + kd_leader)  (`okddip_total`; not a term:
      give the runtime the `OKDDIP_TERMS` with weight kd_weight on both KD terms)

    Targets are not detached (see the module docstring). In the official train_GL.py the
    leader target ``torch.mean(output_batch, dim=2)`` is not detached either, so the leader's
    KL also pulls the peers towards the leader; that is kept.
    """
    branches = _logits("branch_logits", branch_logits, 3)
    peers, leader = branches[:-1], branches[-1]
    _check_temperature(temperature)
    targets, leader_target = okddip_targets(peers, alpha)
    ce = F.cross_entropy(leader, labels)
    for z in peers:
        ce = ce + F.cross_entropy(z, labels)
    kd_peers = okddip_kl(peers[0], targets[0], temperature)
    for z, t in zip(peers[1:], targets[1:]):
        kd_peers = kd_peers + okddip_kl(z, t, temperature)
    kd_leader = okddip_kl(leader, leader_target, temperature)
    terms = {"ce": ce, "kd_peers": kd_peers, "kd_leader": kd_leader}
    return {**terms, "total": okddip_total(terms, kd_weight)}


def rampup(epoch: int, rampup_epochs: int = 80) -> float:
    """``w(e) = exp(−5 (1 − min(e, R)/R)²)`` (1 from epoch R on, and for R = 0): the same ramp
    as ONE and the official OKDDip code (`get_current_consistency_weight`, length 80)."""
    return rampup_weight(1.0, epoch, rampup_epochs)


# ----------------------------------------------------------------------------- the method
@dataclass
class OkddipConfig(BranchConfig):
    method: str = redefault(BranchConfig, "method", "okddip")
    branches: int = redefault(BranchConfig, "branches", 4,
                              help="m: m - 1 peers and the group leader (the last branch)",
                              check=at_least(3))
    output: str = redefault(BranchConfig, "output", "runs/okddip")


OKDDIP_OFFICIAL = Recipe(
    source="the official OKDDip code (train_GL.py): 300 epochs, batch 128, SGD 0.9 Nesterov, "
           "lr 0.1 x0.1 at 150/225, wd 5e-4, T=3, 3 peers + a leader, ramp-up 80 epochs",
    settings={"epochs": 300, "batch_size": 128, "lr": 0.1, "momentum": 0.9, "nesterov": True,
              "schedule": "step", "milestones": [150, 225], "gamma": 0.1, "weight_decay": 5e-4,
              "temperature": 3.0, "branches": 4, "rampup_epochs": 80, **PAPER_INIT})


@register
class Okddip(BranchMethod):
    name = "okddip"
    summary = "OKDDip (diverse peers): attention-weighted peer teachers and a group leader"
    Config = OkddipConfig
    recipes = {"okddip-official": OKDDIP_OFFICIAL}

    def __init__(self, cfg: OkddipConfig):
        super().__init__(cfg, BranchSelection(cfg, candidates=[cfg.branches - 1]))   # the leader

    def build_model(self, spec: DataSpec):
        cfg = self.cfg
        return seeded(cfg, lambda: build_okddip(cfg.arch, spec.num_classes, cfg.branches,
                                                spec.in_channels))

    def loss(self, model, views, labels) -> StepLoss:
        logits, queries, keys = model(views[0])
        terms = okddip_loss(logits, okddip_attention(queries, keys), labels, self.cfg.temperature)
        stats = {f"acc_{i}": (z.detach().argmax(1) == labels).float().mean()
                 for i, z in enumerate(logits)}
        return StepLoss({name: terms[name] for name in OKDDIP_TERMS},
                        {"kd_peers": self.kd_weight, "kd_leader": self.kd_weight}, stats)

    def epoch_rows(self, model, test: EvalSet, ctx: EpochContext) -> list[dict]:
        only_logits = lambda x: (model(x)[0],)   # noqa: E731  (evaluation needs no attention)
        branches, _ = branch_logits_on(model, test, only_logits)
        val = branch_logits_on(model, ctx.val, only_logits)[0] if ctx.val is not None else None
        rows = []
        for i, z in enumerate(branches):
            acc, loss = accuracy_and_loss(z, test.labels)
            row = {"member": f"branch{i}", "test_acc": acc, "test_loss": loss,
                   "train_acc": 100.0 * ctx.train[f"acc_{i}"], "role": "peer"}
            if val is not None:
                row["val_acc"] = accuracy_and_loss(val[i], ctx.val.labels)[0]
            rows.append(row)
        rows[-1].update(role="leader", train_loss=ctx.train["loss"], train_ce=ctx.train["ce"],
                        train_kd=ctx.train["kd_peers"] + ctx.train["kd_leader"])
        self.selection.offer(model, ctx.epoch, rows)
        acc, loss = ensemble_metrics(branches, test.labels)
        rows.append({"member": "ensemble", "test_acc": acc, "test_loss": loss})
        return rows
