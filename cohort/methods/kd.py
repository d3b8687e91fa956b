"""KD (Hinton, Vinyals, Dean 2015) and TAKD (Mirzadeh et al. 2020): chains of KD stages.

A chain `a → b → c` trains `a` alone (cross-entropy), then `b` by KD from the trained `a`,
then `c` by KD from `b` (cohort.runtime.chain runs the stages):

    L = (1 − α) · CE(z_s, y) + α · soft_kl(z_s, z_teacher, T)

The teacher runs in eval mode without gradients on the same augmented batch as the student,
every step. `cohort kd` is a chain of two: `--teacher ARCH` trained first, or
`--teacher-checkpoint PATH` loaded (any model file this project writes).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..config import TrainJobConfig, choice, redefault, require, setting, unit_interval
from ..export import instantiate, save_plain_model
from ..losses import soft_kl
from ..metrics import accuracy_and_loss
from ..models import MODEL_NAMES, zero_init_wanted
from ..step import StepLoss
from ..storage import location
from ..student import DataSpec, seeded_model
from .base import PAPER_INIT, ChainMethod, EpochContext, EvalSet, NetworkMethod, Recipe, register

MODEL_FILE = "model.pt"
DEFAULT_TEACHER = "resnet110"   # TAKD's (Mirzadeh et al.) CIFAR teacher


@dataclass
class StageConfig(TrainJobConfig):
    """One network trained alone (no teacher) or by KD from `teacher` (a model file)."""
    method: str = redefault(TrainJobConfig, "method", "kd")
    arch: str = setting("resnet8", "the stage's network")
    stage: int = setting(0, "its place in the chain", cli=False)
    teacher: str = setting("", "the teacher's model file; empty: cross-entropy alone", cli=False)
    alpha: float = setting(0.9, "weight of the KD term; 1 - alpha weighs CE", check=unit_interval(True))
    temperature: float = redefault(TrainJobConfig, "temperature", 4.0)

    @property
    def member_names(self) -> list[str]:
        return ["student"]


def stage_method(teacher_path: str) -> str:
    """The `method` a stage's rows carry: KD from a teacher, or the chain's first model alone."""
    return "kd" if teacher_path else "alone"


class KdStage(NetworkMethod):
    """A plain network; its loss is CE alone, or KD from a frozen teacher."""
    name = "kd-stage"
    Config = StageConfig
    aggregates = ()

    def __init__(self, cfg: StageConfig, teacher: dict | None):
        super().__init__(cfg)
        self.teacher_payload = teacher   # CPU weights, pickled to the workers with the method
        self.teacher = None
        self.final: dict | None = None

    def build_model(self, spec: DataSpec):
        self.shape = {"num_classes": spec.num_classes, "in_channels": spec.in_channels}
        return seeded_model(self.cfg.arch, spec.num_classes, spec.in_channels, self.cfg.seed,
                            self.cfg.stage, zero_init_wanted(self.cfg.zero_init_residual, self.cfg.arch))

    def setup(self, spec: DataSpec, device: torch.device) -> None:
        if self.teacher_payload is not None:
            self.teacher = instantiate(self.teacher_payload).to(device).eval().requires_grad_(False)

    def loss(self, model, views, labels) -> StepLoss:
        logits = model(views[0])
        acc = {"acc": (logits.detach().argmax(1) == labels).float().mean()}
        ce = F.cross_entropy(logits, labels)
        if self.teacher is None:
            return StepLoss({"ce": ce, "kd": torch.zeros((), device=logits.device)}, {"kd": 0.0}, acc)
        with torch.no_grad():
            teacher_logits = self.teacher(views[0])
        kd = soft_kl(logits, teacher_logits, self.cfg.temperature)
        return StepLoss({"ce": ce, "kd": kd}, {"ce": 1.0 - self.cfg.alpha, "kd": self.cfg.alpha}, acc)

    def epoch_rows(self, model, test: EvalSet, ctx: EpochContext) -> list[dict]:
        logits = torch.cat([model(x).float().cpu() for x in test.batches()])
        acc, loss = accuracy_and_loss(logits, test.labels)
        if ctx.epoch == self.cfg.epochs - 1:  # the next stage's teacher: the final epoch's
            self.final = {"model": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
                          **self.shape}
        row = {"member": "student", "arch": self.cfg.arch, "test_acc": acc, "test_loss": loss,
               "train_loss": ctx.train["loss"], "train_ce": ctx.train["ce"],
               "train_kd": ctx.train["kd"], "train_acc": 100.0 * ctx.train["acc"]}
        if ctx.val is not None:
            val = torch.cat([model(x).float().cpu() for x in ctx.val.batches()])
            row["val_acc"] = accuracy_and_loss(val, ctx.val.labels)[0]
        return [row]

    def state_dict(self) -> dict:
        return {"final": self.final} if self.final is not None else {}

    def load_state_dict(self, state: dict) -> None:
        self.final = state.get("final")

    def finish(self, run_path, state: dict) -> dict:
        final = state.get("final")
        if final is None:
            return {}
        save_plain_model(location(run_path) / MODEL_FILE, self.cfg.arch, final["num_classes"],
                         final["in_channels"], final["model"], stage=self.cfg.stage)
        return {"model": MODEL_FILE}


# ---- the chains -------------------------------------------------------------------------------
@dataclass
class ChainConfig(TrainJobConfig):
    method: str = redefault(TrainJobConfig, "method", "takd")
    chain: list[str] = setting(factory=lambda: [DEFAULT_TEACHER, "resnet20", "resnet8"],
                               help="comma list of archs, first the teacher (at least 2)")
    teacher_checkpoint: str = setting("", "a model file this project saved (best_student.pt, "
                                          "model.pt, a cohort student), used as the first model",
                                      cli=False)
    alpha: float = redefault(StageConfig, "alpha", 0.9)
    temperature: float = redefault(StageConfig, "temperature", 4.0)
    baseline: bool = setting(False, "also train each distilled arch alone, for the table's last column")
    skip_trained: bool = setting(False, "reuse stages already trained in --output with the same settings")
    output: str = redefault(TrainJobConfig, "output", "runs/takd")

    @property
    def member_names(self) -> list[str]:
        return ["student"]   # what the chain reports: its last stage, the distilled student

    def check(self) -> None:
        super().check()
        for arch in self.chain:
            if arch:
                choice(arch, MODEL_NAMES, self.arch_flag)
        require(len(self.chain) >= 2, "--chain", f"needs at least 2 models (got {len(self.chain)})")

    arch_flag = "--chain"


@dataclass
class KdConfig(ChainConfig):
    """A chain of two: the teacher (an arch trained first, or a model file) and the student."""
    method: str = redefault(ChainConfig, "method", "kd")
    teacher: str = setting("", f"teacher arch, trained first; default {DEFAULT_TEACHER}, or the "
                               "arch of --teacher-checkpoint when one is given")
    teacher_checkpoint: str = redefault(ChainConfig, "teacher_checkpoint", "", cli=True)
    student: str = setting("resnet8", "the student arch")
    chain: list[str] = redefault(ChainConfig, "chain", factory=list, cli=False)
    skip_trained: bool = redefault(ChainConfig, "skip_trained", False, cli=False)
    output: str = redefault(ChainConfig, "output", "runs/kd")

    arch_flag = "--student"

    def check(self) -> None:
        if self.teacher:
            choice(self.teacher, MODEL_NAMES, "--teacher")
        super().check()

    def __post_init__(self):
        if not self.chain:   # "" = the checkpoint's arch (the runtime reads it)
            teacher = self.teacher or ("" if self.teacher_checkpoint else DEFAULT_TEACHER)
            self.chain = [teacher, self.student]
        super().__post_init__()


REPDISTILLER = Recipe(
    source="RepDistiller (github.com/HobbitLong/RepDistiller)'s KD: 240 epochs, batch 64, lr 0.05 "
           "x0.1 at 150/180/210, wd 5e-4, T=4, alpha=0.9",
    settings={"epochs": 240, "batch_size": 64, "lr": 0.05, "schedule": "step",
              "milestones": [150, 180, 210], "gamma": 0.1, "weight_decay": 5e-4,
              "temperature": 4.0, "alpha": 0.9, **PAPER_INIT})


@register
class Kd(ChainMethod):
    name = "kd"
    summary = "KD (Hinton et al.): a teacher (trained first, or loaded) distilled into a student"
    Config = KdConfig
    recipes = {"repdistiller": REPDISTILLER}


@register
class Takd(ChainMethod):
    name = "takd"
    summary = "TAKD: teacher -> assistant(s) -> student, each stage KD from the previous"
    Config = ChainConfig
    recipes = {"repdistiller": REPDISTILLER}
