"""ONE, Knowledge Distillation by On-the-Fly Native Ensemble (Lan, Zhu, Gong NeurIPS 2018).

One network (`cohort.models.build_one`): a shared trunk, m branches and a gate. Every step

    L = Σ_i CE(z_i, y) + CE(z_e, y) + λ(t) · Σ_i soft_kl(z_i, z_e, T),   z_e = Σ_i g_i z_i

with λ(t) ramped up as in the official code: λ(t) = kd_weight · exp(−5 (1 − t/T_r)²) for
epochs t < T_r (`--rampup-epochs`, 80 there), kd_weight afterwards; T_r = 0 turns it off.

Rows per epoch: branch0..branch{m-1}, `ensemble` (the gated teacher, E-ONE) and `average`
(mean of the branches' softmax). Branch rows carry `gate_weight` (mean gate weight on the
test set) and `train_gate_weight`; every row carries `kd_weight`, the epoch's λ(t).

Deployment: RUN/best_student.pt, one branch as a plain network ({arch, num_classes,
in_channels, model, branch, epoch, test_acc, selection}) loading strictly into
`build_model(arch, ...)`. It is chosen without looking at the test set: the branch and epoch
with the best validation accuracy when `--val-fraction` > 0, else the final epoch's branch
with the best training accuracy.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..config import TrainJobConfig, at_least, auto_or, choice, redefault, setting
from ..export import atomic_torch_save
from ..losses import one_ensemble_logits, soft_kl
from ..metrics import accuracy_and_loss, ensemble_metrics
from ..models import MODEL_NAMES, build_one, zero_init_wanted
from ..step import StepLoss
from ..storage import location
from ..student import DataSpec
from ..student import seeded as seeded_build
from .base import PAPER_INIT, EpochContext, EvalSet, NetworkMethod, Recipe, register

OFFICIAL_RAMPUP_EPOCHS, OFFICIAL_EPOCHS = 80, 300


@dataclass
class BranchConfig(TrainJobConfig):
    """A multi-branch network on a shared trunk (ONE, OKDDip, PCL)."""
    arch: str = setting("resnet32", "the architecture the trunk and branches come from")
    branches: int = setting(3, "m, the number of branches", check=at_least(2))
    epochs: int = redefault(TrainJobConfig, "epochs", OFFICIAL_EPOCHS)
    rampup_epochs: int = setting(-1, "epochs of the ramp-up of lambda, exp(-5 (1 - t/T)^2), as "
                                     "the official ONE code; 0 = none; -1: the official share "
                                     f"of the run, {OFFICIAL_RAMPUP_EPOCHS}/{OFFICIAL_EPOCHS} "
                                     "of --epochs", check=auto_or(at_least(0)))

    def __post_init__(self):
        if self.rampup_epochs == -1:
            self.rampup_epochs = round(self.epochs * OFFICIAL_RAMPUP_EPOCHS / OFFICIAL_EPOCHS)
        super().__post_init__()

    @property
    def member_names(self) -> list[str]:
        return [f"branch{i}" for i in range(self.branches)]

    def check(self) -> None:
        super().check()
        choice(self.arch, MODEL_NAMES, "--arch")


@dataclass
class OneConfig(BranchConfig):
    method: str = redefault(BranchConfig, "method", "one")
    output: str = redefault(BranchConfig, "output", "runs/one")


def rampup_weight(kd_weight: float, epoch: int, rampup_epochs: int) -> float:
    """λ(t) of the official ONE code: kd_weight · exp(−5 (1 − t/T_r)²) while t < T_r."""
    if rampup_epochs <= 0 or epoch >= rampup_epochs:
        return float(kd_weight)
    phase = 1.0 - epoch / rampup_epochs
    return float(kd_weight) * math.exp(-5.0 * phase * phase)


def seeded(cfg, build):
    """The network `build()` makes, its initial weights a pure function of the seed."""
    return seeded_build(cfg.seed, 0, build, zero_init_wanted(cfg.zero_init_residual, cfg.arch))


def branch_logits_on(model, test: EvalSet, forward=None) -> tuple[list[torch.Tensor], list]:
    """Every branch's logits (CPU float32) on a split, and any extra outputs per chunk."""
    forward = forward or model
    chunks, extras = [], []
    for x in test.batches():
        logits, *extra = forward(x)
        chunks.append([z.float().cpu() for z in logits])
        extras.append([e.float().cpu() for e in extra])
    branch = [torch.cat([c[i] for c in chunks]) for i in range(len(chunks[0]))]
    return branch, [torch.cat([e[j] for e in extras]) for j in range(len(extras[0]))]


class BranchSelection:
    """Which branch of which epoch is deployed, chosen without the test set: the best
    validation accuracy (earliest on ties) when there is a validation split, else the final
    epoch's branch with the best training accuracy."""

    def __init__(self, cfg, candidates: list[int] | None = None, prefix: str = "branch"):
        self.cfg, self.best = cfg, None
        self.candidates = candidates   # the deployable branches (default: all)
        self.prefix = prefix           # their rows' member names: prefix + index

    def rule(self) -> str:
        return ("best val_acc over branches and epochs" if self.cfg.val_fraction > 0
                else "final epoch, branch with the best train_acc")

    def offer(self, model, epoch: int, rows: list[dict]) -> None:
        """`rows`: one per branch, in branch order, with val_acc (or train_acc)."""
        if self.cfg.val_fraction > 0:
            score = [r["val_acc"] for r in rows]
        elif epoch == self.cfg.epochs - 1:
            score = [r["train_acc"] for r in rows]
        else:
            return
        candidates = self.candidates if self.candidates is not None else range(len(rows))
        pick = max(candidates, key=lambda i: (score[i], -i))
        if self.best is not None and self.cfg.val_fraction > 0 and score[pick] <= self.best["score"]:
            return
        state = {k: v.detach().cpu().clone() for k, v in model.branch_state_dict(pick).items()}
        self.best = {"branch": pick, "epoch": epoch, "score": score[pick],
                     "test_acc": rows[pick]["test_acc"], "model": state, "arch": model.arch,
                     "num_classes": model.num_classes, "in_channels": model.in_channels}

    def export(self, run_path) -> dict:
        best = self.best
        if not best:
            return {}
        payload = {k: best[k] for k in ("arch", "num_classes", "in_channels", "model", "branch",
                                         "epoch", "test_acc")}
        atomic_torch_save({**payload, "selection": self.rule()}, location(run_path) / "best_student.pt")
        return {"best_student": {"member": f"{self.prefix}{best['branch']}", "epoch": best["epoch"],
                                 "test_acc": best["test_acc"], "arch": best["arch"],
                                 "selection": self.rule(), "path": "best_student.pt"}}


def branch_row(i: int, z, labels, train: dict, val=None) -> dict:
    acc, loss = accuracy_and_loss(z, labels)
    row = {"member": f"branch{i}", "test_acc": acc, "test_loss": loss,
           "train_ce": train[f"ce_{i}"], "train_acc": 100.0 * train[f"acc_{i}"]}
    if val is not None:
        row["val_acc"] = accuracy_and_loss(*val)[0]
    return row


class BranchMethod(NetworkMethod):
    """What the multi-branch methods (ONE, OKDDip, PCL) share: the ramped KD weight λ(t),
    written as each row's `kd_weight`, and the branch they export (`selection`)."""
    member_kind = "branch"

    def __init__(self, cfg: BranchConfig, selection: BranchSelection):
        super().__init__(cfg)
        self.kd_weight = rampup_weight(cfg.kd_weight, 0, cfg.rampup_epochs)
        self.selection = selection

    def begin_epoch(self, epoch: int) -> dict:
        self.kd_weight = rampup_weight(self.cfg.kd_weight, epoch, self.cfg.rampup_epochs)
        return {"kd_weight": self.kd_weight}

    def state_dict(self) -> dict:
        return {"best": self.selection.best} if self.selection.best is not None else {}

    def load_state_dict(self, state: dict) -> None:
        self.selection.best = state.get("best")

    def finish(self, run_path, state: dict) -> dict:
        self.selection.best = state.get("best")
        return self.selection.export(run_path)


ONE_OFFICIAL = Recipe(
    source="the official ONE training script: 300 epochs, batch "
           "128, lr 0.1 x0.1 at 150/225, wd 1e-4, T=3, ramp-up 80 epochs",
    settings={"epochs": 300, "batch_size": 128, "lr": 0.1, "schedule": "step",
              "milestones": [150, 225], "gamma": 0.1, "weight_decay": 1e-4, "temperature": 3.0,
              "rampup_epochs": 80, **PAPER_INIT})


@register
class One(BranchMethod):
    name = "one"
    summary = "ONE (on-the-fly native ensemble): m branches on a shared trunk, a gated teacher"
    Config = OneConfig
    recipes = {"one-official": ONE_OFFICIAL}
    aggregates = ("ensemble", "average")
    ensemble_label = "gated ensemble"

    def __init__(self, cfg: OneConfig):
        super().__init__(cfg, BranchSelection(cfg))

    def build_model(self, spec: DataSpec):
        cfg = self.cfg
        return seeded(cfg, lambda: build_one(cfg.arch, spec.num_classes, cfg.branches, spec.in_channels))

    def loss(self, model, views, labels) -> StepLoss:
        logits, gate = model(views[0])
        ensemble = one_ensemble_logits(logits, gate)
        teacher = ensemble.detach()
        ces = [F.cross_entropy(z, labels) for z in logits]
        kds = [soft_kl(z, teacher, self.cfg.temperature) for z in logits]
        ce = F.cross_entropy(ensemble, labels)
        for term in ces:
            ce = ce + term
        stats = {"ce_ensemble": F.cross_entropy(teacher, labels),
                 "acc_ensemble": (teacher.argmax(1) == labels).float().mean()}
        for i, z in enumerate(logits):
            stats.update({f"ce_{i}": ces[i], f"kd_{i}": kds[i],
                          f"acc_{i}": (z.detach().argmax(1) == labels).float().mean(),
                          f"gate_{i}": gate[:, i].detach().mean()})
        return StepLoss({"ce": ce, "kd": sum(kds)}, {"kd": self.kd_weight}, stats)

    def epoch_rows(self, model, test: EvalSet, ctx: EpochContext) -> list[dict]:
        train = ctx.train
        branches, (gate,) = branch_logits_on(model, test)
        val = branch_logits_on(model, ctx.val)[0] if ctx.val is not None else None
        rows = []
        for i, z in enumerate(branches):
            row = branch_row(i, z, test.labels, train,
                             (val[i], ctx.val.labels) if val is not None else None)
            row.update(train_loss=train[f"ce_{i}"] + self.kd_weight * train[f"kd_{i}"],
                       train_kd=train[f"kd_{i}"], gate_weight=gate[:, i].mean().item(),
                       train_gate_weight=train[f"gate_{i}"])
            rows.append(row)
        self.selection.offer(model, ctx.epoch, rows)
        acc, loss = accuracy_and_loss(one_ensemble_logits(branches, gate), test.labels)
        rows.append({"member": "ensemble", "test_acc": acc, "test_loss": loss,
                     "train_loss": train["loss"], "train_ce": train["ce_ensemble"],
                     "train_acc": 100.0 * train["acc_ensemble"]})
        acc, loss = ensemble_metrics(branches, test.labels)
        rows.append({"member": "average", "test_acc": acc, "test_loss": loss})
        return rows

    def epoch_line(self, rows: list[dict]) -> str:
        first = rows[0]
        accs = " | ".join(f"{r['member']} {r['test_acc']:.2f}" for r in rows)
        gates = "/".join(f"{r['gate_weight']:.2f}" for r in rows if "gate_weight" in r)
        return (f"[{self.cfg.name}] epoch {first['epoch'] + 1}/{self.cfg.epochs} "
                f"({first['epoch_seconds']:.1f}s, {first['images_per_second']:.0f} img/s, "
                f"lr {first['lr']:.4g}, λ {first['kd_weight']:.3f}) | {accs} | gate {gates}")

