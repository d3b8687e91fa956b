"""PCL, Peer Collaborative Learning for Online Knowledge Distillation (Wu & Gong, AAAI 2021).

One network (`cohort.models.pcl.PclNet`): a shared trunk and m branches; branch j sees its
own augmentation x_j of the batch. A linear peer-ensemble teacher reads the branches'
concatenated pooled features, z_e = W [f_1; …; f_m]. A temporal mean network (an EMA copy of
the whole network) gives the peer mean teacher: its branch l on view x_l gives z̃_l.

    L = CE(z_e, y) + Σ_j [ CE(z_j, y) + w(e)·soft_kl(z_j, z_e, T)
                           + w(e)·(1/(m−1)) Σ_{l≠j} soft_kl(z_j, z̃_l, T) ]

    θ̃ ← γ θ̃ + (1 − γ) θ   after every optimizer step s (0-based), γ = min(1 − 1/(s + 1), γ_max)

γ_max = 0.999 (the repro's, `--ema-decay 0.999`, the pcl-paper recipe). The default caps it at
1 − 10/S for a run of S optimizer steps, so the mean spans at most about the last tenth of a
short run (1/(1 − γ) steps); runs of 10,000 steps or more get 0.999. With 0.999, a 115-step run
on digits averages its whole trajectory from the initial weights and the mean network ends
at 83–89% against the live branches' 99%; with the cap (0.909 there) at 98.1–98.6% (measured).

w(e) = kd_weight · exp(−5 (1 − min(e, R)/R)²), R = 80 (ONE's ramp); T = 3; every target
detached. Choices where the paper leaves room (no official code; "repro" = the best-known
reproduction, see METHODS.md):
- γ as the repro; the BatchNorm running statistics are averaged like the weights (copying the
  live network's statistics, which describe other weights, leaves the mean network at chance:
  measured on digits), and the mean network runs in eval mode without gradients, so it never
  updates its statistics or calls a synchronised BatchNorm.
- the ramp divides by R = 80 (the repro's division by 1 is a bug).
- deployed: one branch of the temporal mean network (the paper's Algorithm 1 deploys the
  mean network), chosen like ONE's (cohort.methods.one.BranchSelection) among its branches.
Rows: branch0..m-1 (the live branches), ema0..ema{m-1} (the temporal mean network's),
`ensemble` (the peer-ensemble teacher) and `average` (mean of the live branches' softmax).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..config import auto_or, redefault, setting, unit_interval
from ..losses import soft_kl
from ..metrics import accuracy_and_loss, ensemble_metrics
from ..models.pcl import build_pcl
from ..step import StepLoss
from ..student import DataSpec
from .base import EpochContext, EvalSet, Recipe, register
from .okddip import OKDDIP_OFFICIAL
from .one import BranchConfig, BranchMethod, BranchSelection, branch_logits_on, seeded

PAPER_MAX_DECAY = 0.999
SHORT_RUN_HORIZON = 10   # the default γ_max keeps the mean's horizon within S / 10 steps


# ----------------------------------------------------------------------------- the math
def default_max_decay(total_steps: int) -> float:
    """min(0.999, 1 − 10/S) for a run of S optimizer steps (0 for runs of 10 steps or fewer)."""
    return min(PAPER_MAX_DECAY, max(0.0, 1.0 - SHORT_RUN_HORIZON / max(total_steps, 1)))


def ema_decay(step: int, max_decay: float = PAPER_MAX_DECAY) -> float:
    """γ = min(1 − 1/(s + 1), max_decay) at optimizer step s (0-based): 0 at the first step,
    so the mean starts as the network itself."""
    return min(1.0 - 1.0 / (step + 1), max_decay)


@torch.no_grad()
def ema_update(ema: torch.nn.Module, model: torch.nn.Module, step: int,
               max_decay: float = PAPER_MAX_DECAY) -> None:
    """θ̃ ← γ θ̃ + (1 − γ) θ for the parameters and the floating-point buffers (BatchNorm's
    running statistics, so they describe the averaged weights, not the live ones); integer
    buffers (num_batches_tracked) are copied."""
    decay = ema_decay(step, max_decay)
    for mean, live in zip(ema.state_dict().values(), model.state_dict().values()):
        if mean.is_floating_point():
            mean.mul_(decay).add_(live.detach(), alpha=1.0 - decay)
        else:
            mean.copy_(live)


def pcl_terms(branch_logits, ensemble_logits, mean_logits, labels, temperature: float) -> dict:
    """PCL's named, unweighted loss terms: `ce` = CE(z_e) + Σ_j CE(z_j); `kd_ensemble` =
    Σ_j soft_kl(z_j, z_e); `kd_mean` = Σ_j (1/(m−1)) Σ_{l≠j} soft_kl(z_j, z̃_l). The targets
    z_e and z̃ are detached (soft_kl detaches its target)."""
    m = len(branch_logits)
    ce = F.cross_entropy(ensemble_logits, labels)
    for z in branch_logits:
        ce = ce + F.cross_entropy(z, labels)
    kd_ensemble = sum(soft_kl(z, ensemble_logits, temperature) for z in branch_logits)
    kd_mean = sum(soft_kl(z, mean_logits[l], temperature)
                  for j, z in enumerate(branch_logits) for l in range(m) if l != j) / (m - 1)
    return {"ce": ce, "kd_ensemble": kd_ensemble, "kd_mean": kd_mean}


# ----------------------------------------------------------------------------- the method
@dataclass
class PclConfig(BranchConfig):
    method: str = redefault(BranchConfig, "method", "pcl")
    output: str = redefault(BranchConfig, "output", "runs/pcl")
    ema_decay: float = setting(-1.0, "γ_max, the temporal mean's largest decay; -1: "
                                     f"min({PAPER_MAX_DECAY}, 1 - {SHORT_RUN_HORIZON}/steps of the "
                                     "run), so short runs average only their last tenth",
                               check=auto_or(unit_interval()))

    @property
    def member_names(self) -> list[str]:
        return ([f"branch{i}" for i in range(self.branches)]
                + [f"ema{i}" for i in range(self.branches)])


PCL_PAPER = Recipe(   # the paper trains as OKDDip does, with 3 branches
    source="PCL (Wu & Gong 2021), OKDDip's recipe: 300 epochs, batch 128, SGD 0.9 Nesterov, "
           "lr 0.1 x0.1 at 150/225, wd 5e-4, T=3, 3 branches, ramp-up 80 epochs",
    settings={**OKDDIP_OFFICIAL.settings, "branches": 3, "ema_decay": PAPER_MAX_DECAY})


@register
class Pcl(BranchMethod):
    name = "pcl"
    summary = "PCL (peer collaborative learning): multi-view branches, a peer ensemble and an EMA mean teacher"
    Config = PclConfig
    recipes = {"pcl-paper": PCL_PAPER}
    aggregates = ("ensemble", "average")

    def __init__(self, cfg: PclConfig):
        super().__init__(cfg, BranchSelection(cfg, prefix="ema"))   # deploys a mean-network branch
        self.views = cfg.branches   # one augmentation per branch
        self.ema, self.ema_state, self.ema_steps = None, None, 0
        self.max_decay = PAPER_MAX_DECAY

    def setup(self, spec, device) -> None:
        super().setup(spec, device)
        cfg = self.cfg
        if cfg.ema_decay != -1:
            self.max_decay = cfg.ema_decay
            return
        steps = spec.num_train // cfg.batch_size   # full batches only (cohort.data.epoch_batches)
        if cfg.steps_per_epoch > 0:
            steps = min(steps, cfg.steps_per_epoch)
        self.max_decay = default_max_decay(cfg.epochs * steps)

    def build_model(self, spec: DataSpec):
        cfg = self.cfg
        return seeded(cfg, lambda: build_pcl(cfg.arch, spec.num_classes, cfg.branches, spec.in_channels))

    def _mean_network(self, model) -> torch.nn.Module:
        """The temporal mean network: the initial network, or the checkpoint's."""
        if self.ema is None:
            self.ema = copy.deepcopy(getattr(model, "module", model)).eval().requires_grad_(False)
            if self.ema_state is not None:
                self.ema.load_state_dict(self.ema_state)
        return self.ema

    def loss(self, model, views, labels) -> StepLoss:
        ema = self._mean_network(model)
        logits, ensemble = model(views)
        with torch.no_grad():
            mean_logits, _ = ema(views)
        terms = pcl_terms(logits, ensemble, mean_logits, labels, self.cfg.temperature)
        stats = {f"acc_{i}": (z.detach().argmax(1) == labels).float().mean()
                 for i, z in enumerate(logits)}
        stats["acc_ensemble"] = (ensemble.detach().argmax(1) == labels).float().mean()
        return StepLoss(terms, {"kd_ensemble": self.kd_weight, "kd_mean": self.kd_weight}, stats)

    def after_step(self, model, step: int) -> None:
        ema_update(self._mean_network(model), model, self.ema_steps, self.max_decay)
        self.ema_steps += 1

    def epoch_rows(self, model, test: EvalSet, ctx: EpochContext) -> list[dict]:
        live, (ensemble,) = branch_logits_on(model, test)
        mean, _ = branch_logits_on(self.ema, test)
        val = None
        if ctx.val is not None:
            val = branch_logits_on(self.ema, ctx.val)[0]
        rows = []
        for i, z in enumerate(live):
            acc, loss = accuracy_and_loss(z, test.labels)
            rows.append({"member": f"branch{i}", "test_acc": acc, "test_loss": loss,
                         "train_acc": 100.0 * ctx.train[f"acc_{i}"]})
        ema_rows = []
        for i, z in enumerate(mean):
            acc, loss = accuracy_and_loss(z, test.labels)
            row = {"member": f"ema{i}", "test_acc": acc, "test_loss": loss,
                   "train_acc": 100.0 * ctx.train[f"acc_{i}"]}   # the live branch's, for selection
            if val is not None:
                row["val_acc"] = accuracy_and_loss(val[i], ctx.val.labels)[0]
            ema_rows.append(row)
        self.selection.offer(self.ema, ctx.epoch, ema_rows)
        acc, loss = accuracy_and_loss(ensemble, test.labels)
        aggregate = [{"member": "ensemble", "test_acc": acc, "test_loss": loss,
                      "train_loss": ctx.train["loss"], "train_ce": ctx.train["ce"],
                      "train_kd": ctx.train["kd_ensemble"] + ctx.train["kd_mean"],
                      "train_acc": 100.0 * ctx.train["acc_ensemble"]}]
        acc, loss = ensemble_metrics(live, test.labels)
        aggregate.append({"member": "average", "test_acc": acc, "test_loss": loss})
        return rows + ema_rows + aggregate

    def state_dict(self) -> dict:
        state = {**super().state_dict(), "ema_steps": self.ema_steps}
        if self.ema is not None:
            state["ema"] = {k: v.detach().cpu() for k, v in self.ema.state_dict().items()}
        return state

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.ema_steps = int(state.get("ema_steps", 0))
        self.ema_state = state.get("ema")
        self.ema = None   # rebuilt from ema_state on the next step
