"""Resolved settings of a cohort run (DML, KDCL, independent students) and their validation.

Validation happens once, before any work starts; a bad value raises UsageError naming the flag.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field

from .errors import UsageError
from .optim import SCHEDULES

COHORT_METHODS = ("independent", "dml", "kdcl")
KDCL_VARIANTS = ("naive", "linear", "minlogit", "general")
EXCHANGES = ("store", "collective")
PLACEMENTS = ("pack", "spread")
VIEWS = ("shared", "separate")


@dataclass
class CohortConfig:
    method: str = "dml"
    students: int = 2
    archs: list[str] = field(default_factory=lambda: ["resnet32"])
    dataset: str = "cifar100"
    data_dir: str | None = None
    val_fraction: float = 0.0
    epochs: int = 200
    batch_size: int = 128
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    nesterov: bool = False
    schedule: str = "step"
    milestones: list[int] = field(default_factory=list)
    gamma: float = 0.1
    temperature: float = 1.0
    kd_weight: float = 1.0
    variant: str = "linear"
    views: str = ""            # "" = the method's default: shared for DML, separate for KDCL
    crop_padding: int = -1     # -1 = the dataset's default
    seed: int = 0
    output: str = "runs/cohort"
    name: str = ""
    overwrite: bool = False
    resume: bool = False
    checkpoint_every: int = 1
    keep_checkpoints: int = 2
    eval_batch_size: int = 1024
    device: str = "auto"
    progress: bool = True
    # Ray runtime only
    gpus_per_student: float = -1.0   # -1 = 1 when the cluster has GPUs, else 0
    cpus_per_student: float = -1.0   # -1 = the cluster's CPUs shared among the students
    exchange: str = "store"
    placement: str = "pack"
    startup_timeout: float = 60.0

    def __post_init__(self):
        if len(self.archs) == 1 and self.students > 1:
            self.archs = self.archs * self.students
        if not self.views:
            self.views = "separate" if self.method == "kdcl" else "shared"
        if not self.name:
            self.name = os.path.basename(os.path.normpath(self.output)) or "run"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @property
    def member_names(self) -> list[str]:
        return [f"student{k}" for k in range(self.students)]


def check(condition: bool, flag: str, message: str) -> None:
    if not condition:
        raise UsageError(flag, message)


def choice(value: str, allowed, flag: str) -> None:
    check(value in allowed, flag, f"{value!r} is not one of: {', '.join(allowed)}")


def validate_training(cfg) -> None:
    """Checks shared by every job: numbers in range, names known."""
    check(cfg.epochs >= 1, "--epochs", f"must be >= 1 (got {cfg.epochs})")
    check(cfg.batch_size >= 1, "--batch-size", f"must be >= 1 (got {cfg.batch_size})")
    check(cfg.lr > 0, "--lr", f"must be > 0 (got {cfg.lr})")
    check(cfg.weight_decay >= 0, "--weight-decay", f"must be >= 0 (got {cfg.weight_decay})")
    check(0 <= cfg.momentum < 1, "--momentum", f"must be in [0, 1) (got {cfg.momentum})")
    check(cfg.temperature > 0, "--temperature", f"must be > 0 (got {cfg.temperature})")
    check(cfg.kd_weight >= 0, "--kd-weight", f"must be >= 0 (got {cfg.kd_weight})")
    check(0 <= cfg.val_fraction < 1, "--val-fraction", f"must be in [0, 1) (got {cfg.val_fraction})")
    check(cfg.checkpoint_every >= 1, "--checkpoint-every", f"must be >= 1 (got {cfg.checkpoint_every})")
    choice(cfg.schedule, SCHEDULES, "--schedule")
    check(all(m >= 1 for m in cfg.milestones), "--milestones", "epochs must be >= 1")
    check(cfg.device in ("auto", "cpu") or cfg.device.startswith("cuda"), "--device",
          f"{cfg.device!r} is not one of: auto, cpu, cuda[:N]")


def validate_archs(archs, students: int, flag: str = "--arch") -> None:
    from .models import MODEL_NAMES
    for arch in archs:
        choice(arch, MODEL_NAMES, flag)
    check(len(archs) == students, flag,
          f"a heterogeneous list needs one arch per student ({len(archs)} given for --students {students})")


def validate_cohort(cfg: CohortConfig) -> None:
    choice(cfg.method, COHORT_METHODS, "--method")
    check(cfg.students >= 2, "--students", f"must be >= 2 (got {cfg.students})")
    validate_archs(cfg.archs, cfg.students)
    validate_training(cfg)
    choice(cfg.variant, KDCL_VARIANTS, "--variant")
    choice(cfg.exchange, EXCHANGES, "--exchange")
    choice(cfg.placement, PLACEMENTS, "--placement")
    choice(cfg.views, VIEWS, "--views")
    if cfg.method == "kdcl" and cfg.variant == "general":
        check(cfg.val_fraction > 0, "--val-fraction",
              "KDCL-general needs a held-out split: give --val-fraction > 0 (e.g. 0.1)")
    check(cfg.gpus_per_student == -1 or cfg.gpus_per_student >= 0, "--gpus-per-student", "must be >= 0")
    check(cfg.cpus_per_student == -1 or cfg.cpus_per_student > 0, "--cpus-per-student", "must be > 0")


def validate_against_data(cfg, dataset) -> None:
    """Checks that need the dataset's size."""
    check(cfg.batch_size <= dataset.num_train, "--batch-size",
          f"{cfg.batch_size} is larger than the training set ({dataset.num_train} images)")


def validate_train_job(cfg) -> None:
    """Checks of every Ray Train job (ONE, KD/TAKD stages): training numbers and workers."""
    validate_training(cfg)
    check(cfg.workers >= 1, "--workers", f"must be >= 1 (got {cfg.workers})")
    check(cfg.batch_size >= 2, "--batch-size", f"must be >= 2 for BatchNorm (got {cfg.batch_size})")
    check(cfg.batch_size % cfg.workers == 0, "--batch-size",
          f"the global batch {cfg.batch_size} must split evenly over --workers {cfg.workers}")
    check(cfg.max_failures >= 0, "--max-failures", f"must be >= 0 (got {cfg.max_failures})")
    check(cfg.steps_per_epoch >= 0, "--steps-per-epoch", f"must be >= 0 (got {cfg.steps_per_epoch})")
    check(cfg.keep_checkpoints >= 1, "keep_checkpoints", f"must be >= 1 (got {cfg.keep_checkpoints})")
    check(cfg.gpus_per_worker == -1 or cfg.gpus_per_worker >= 0, "--gpus-per-worker", "must be >= 0")
    check(cfg.cpus_per_worker == -1 or cfg.cpus_per_worker > 0, "--cpus-per-worker", "must be > 0")
