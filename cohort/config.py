"""Every setting of every job: typed dataclasses, each default written once.

    JobConfig            what every job has: data, optimisation, run directory
    ├── CohortConfig     K students exchanging logits (DML, KDCL, independent)
    └── TrainJobConfig   one network trained data-parallel (ONE, OKDDip, PCL, KD stages)

A method's config subclasses one of these and adds or re-defaults its own fields
(`redefault`). Each field carries its help, its flag and its check in `setting(...)`; the
command line is generated from them (cohort.cli), config.json loads back into the same
class (`load_config`), sweeps search fields by name, and `validate` runs every check in one
place before anything starts: every number finite and in range, every name known. A bad value
raises UsageError naming the flag (one line, exit code 2).
"""
from __future__ import annotations

import dataclasses
import math
import os
import typing
from dataclasses import dataclass, field
from typing import Any, Callable

from .data import DATASETS
from .models.registry import RESIDUAL_INIT
from .errors import UsageError
from .optim import SCHEDULES
from .storage import location

EXCHANGES = ("store", "refs", "collective")
PLACEMENTS = ("pack", "spread")
VIEWS = ("shared", "separate")
RUNTIMES = ("ray", "local")


# ---- checks ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Check:
    ok: Callable[[Any], bool]
    rule: str                    # "must be >= 1": the message's tail


def at_least(low) -> Check:
    return Check(lambda v: v >= low, f"must be >= {low}")


def above(low) -> Check:
    return Check(lambda v: v > low, f"must be > {low}")


def unit_interval(closed: bool = False) -> Check:
    if closed:
        return Check(lambda v: 0 <= v <= 1, "must be in [0, 1]")
    return Check(lambda v: 0 <= v < 1, "must be in [0, 1)")


def auto_or(check: Check) -> Check:
    """-1 means "the default"; anything else must pass `check`."""
    return Check(lambda v: v == -1 or check.ok(v), f"{check.rule} (or -1 for the default)")


DEVICE = Check(lambda v: v in ("auto", "cpu") or v.startswith("cuda"), "is not one of: auto, cpu, cuda[:N]")


def setting(default=dataclasses.MISSING, help: str = "", *, factory=None, flag: str | None = None,
            choices=None, check: Check | None = None, cli: bool = True):
    """A config field with its help text, flag (default --field-name), allowed choices and
    check. cli=False keeps it off the command line (it is still in config.json)."""
    metadata = {"help": help, "flag": flag, "choices": choices, "check": check, "cli": cli}
    if factory is not None:
        return field(default_factory=factory, metadata=metadata)
    return field(default=default, metadata=metadata)


def redefault(base, name: str, default=dataclasses.MISSING, *, factory=None, **meta):
    """The field `name` of config class `base` with another default (a method's own; none given:
    the base's), and optionally other metadata (help=..., cli=...)."""
    inherited = base.__dataclass_fields__[name]
    metadata = {**inherited.metadata, **meta}
    if default is dataclasses.MISSING and factory is None:
        default, factory = inherited.default, (None if inherited.default_factory is dataclasses.MISSING
                                                else inherited.default_factory)
    if factory is not None:
        return field(default_factory=factory, metadata=metadata)
    return field(default=default, metadata=metadata)


FLIPS = ("auto", "on", "off")


# ---- the tree ---------------------------------------------------------------------------------
@dataclass
class JobConfig:
    method: str = setting("", cli=False)
    recipe: str = setting("", "a preset of a paper's settings (see --help's list); flags override it",
                          cli=False)
    # data
    dataset: str = setting("cifar100", "the dataset", choices=DATASETS)
    data_dir: str | None = setting(None, "dataset root (CIFAR's torchvision layout) or Parquet path")
    val_fraction: float = setting(0.0, "held-out share of the training set: chooses the best "
                                       "epoch/member (never the test set)", check=unit_interval())
    crop_padding: int = setting(-1, "random-crop padding; -1 = the dataset's default",
                                check=auto_or(at_least(0)))
    flip: str = setting("auto", "random horizontal flips; auto: the dataset's (off for digits and "
                                "mnist, where a mirrored digit is another class)", choices=FLIPS)
    # optimisation
    epochs: int = setting(200, "training epochs", check=at_least(1))
    batch_size: int = setting(64, "batch size", check=at_least(1))
    lr: float = setting(0.1, "base learning rate", check=above(0))
    momentum: float = setting(0.9, "SGD momentum", check=unit_interval())
    weight_decay: float = setting(5e-4, "SGD weight decay", check=at_least(0))
    nesterov: bool = setting(False, "Nesterov momentum")
    schedule: str = setting("cosine", "learning-rate schedule (the papers' step schedules are in "
                                      "their --recipe)", choices=SCHEDULES)
    milestones: list[int] = setting(factory=list, help="step schedule: comma list of epochs "
                                    "(default 50%,75% of --epochs)", check=at_least(1))
    gamma: float = setting(0.1, "step schedule decay factor", check=above(0))
    warmup_epochs: float = setting(0.0, "linear learning-rate warm-up over the first N epochs, "
                                        "per step (0: none)", check=at_least(0))
    zero_init_residual: str = setting("auto", "start each residual block's last BatchNorm scale "
                                              "at 0, so every block starts as the identity; auto: "
                                              "for nets of more than 10 residual blocks (resnet32 "
                                              "and deeper blow up at lr 0.1 without it, shallower "
                                              "ones learn faster with the plain init); the papers' "
                                              "recipes: off", choices=RESIDUAL_INIT)
    temperature: float = setting(3.0, "softmax temperature T of the KL terms", check=above(0))
    kd_weight: float = setting(1.0, "lambda, the weight of the KL terms", check=at_least(0))
    # the run
    seed: int = setting(0, "seed of every random draw (weights, sample order, augmentation)")
    output: str = setting("runs/run", "run directory: a path, or a URI (s3://bucket/prefix, gs://...)")
    name: str = setting("", "run name (default: the output directory's name)")
    overwrite: bool = setting(False, "replace the run already in --output")
    resume: bool = setting(False, "continue from --output's latest checkpoint")
    checkpoint_every: int = setting(1, "epochs between checkpoints", check=at_least(1))
    keep_checkpoints: int = setting(2, "checkpoints kept", check=at_least(1), cli=False)
    eval_batch_size: int = setting(1024, "evaluation batch size", check=at_least(1), cli=False)
    device: str = setting("auto", "auto, cpu or cuda[:N]; cpu keeps a GPU cluster's GPUs out",
                          check=DEVICE)
    progress: bool = setting(True, "progress bars and per-epoch lines", flag="--no-progress")
    runtime: str = setting("ray", "ray: on the Ray cluster; local: everything in this process",
                           choices=RUNTIMES)
    startup_timeout: float = setting(60.0, "seconds to wait for the cluster (or its autoscaler) "
                                           "to hold the students or workers", check=above(0))

    def __post_init__(self):
        if not self.name:
            self.name = os.path.basename(os.path.normpath(str(self.output))) or "run"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @property
    def member_names(self) -> list[str]:
        raise NotImplementedError

    def check(self) -> None:
        """Checks across fields (a subclass adds its own and calls super)."""


@dataclass
class CohortConfig(JobConfig):
    """K students, each its own network (one Ray actor each), exchanging logits every step."""
    students: int = setting(2, "K, the number of students", check=at_least(2))
    archs: list[str] = setting(factory=lambda: ["resnet32"], flag="--arch",
                               help="one arch, or a comma list (one per student)")
    views: str = setting("", "augmented views: shared (one draw for all) or separate (one per "
                             "student); default: the method's", choices=("",) + VIEWS)
    gpus_per_student: float = setting(-1.0, "default 1 when the cluster has GPUs, else 0",
                                      check=auto_or(at_least(0)))
    cpus_per_student: float = setting(-1.0, "default: the cluster's CPUs shared among the students "
                                            "(fractions allowed)", check=auto_or(above(0)))
    exchange: str = setting("store", "how logits travel between actors", choices=EXCHANGES)
    placement: str = setting("pack", "placement group strategy of the students", choices=PLACEMENTS)
    max_restarts: int = setting(3, "cohort restarts after a member failure (a dead actor, a lost "
                                   "node, a failed logit exchange)", check=at_least(0))

    default_views = "shared"

    def __post_init__(self):
        if len(self.archs) == 1 and self.students > 1:
            self.archs = self.archs * self.students
        if not self.views:
            self.views = self.default_views
        super().__post_init__()

    @property
    def member_names(self) -> list[str]:
        return [f"student{k}" for k in range(self.students)]

    def check(self) -> None:
        from .models import MODEL_NAMES
        for arch in self.archs:
            choice(arch, MODEL_NAMES, "--arch")
        require(len(self.archs) == self.students, "--arch",
                f"a heterogeneous list needs one arch per student ({len(self.archs)} given for "
                f"--students {self.students})")


@dataclass
class TrainJobConfig(JobConfig):
    """One network trained data-parallel by N Ray Train workers (or in this process)."""
    batch_size: int = redefault(JobConfig, "batch_size", help="GLOBAL batch size, split evenly "
                                                              "over --workers")
    workers: int = setting(1, "N data-parallel Ray Train workers", check=at_least(1))
    gpus_per_worker: float = setting(-1.0, "default 1 when the cluster has GPUs (nccl), else 0 "
                                           "(gloo on CPU)", check=auto_or(at_least(0)))
    cpus_per_worker: float = setting(-1.0, "default 1 with GPUs, else the cluster's CPUs shared "
                                           "among the workers", check=auto_or(above(0)))
    max_failures: int = setting(0, "worker-group failures Ray Train recovers from the latest "
                                   "checkpoint", check=at_least(0))
    steps_per_epoch: int = setting(0, "train only the first N global batches of each epoch "
                                      "(smoke tests); 0 = all", check=at_least(0))

    def check(self) -> None:
        require(self.batch_size >= 2, "--batch-size", f"must be >= 2 for BatchNorm (got {self.batch_size})")
        require(self.batch_size % self.workers == 0, "--batch-size",
                f"the global batch {self.batch_size} must split evenly over --workers {self.workers}")


# ---- validation -----------------------------------------------------------------------------
def require(condition: bool, flag: str, message: str) -> None:
    if not condition:
        raise UsageError(flag, message)


def choice(value, allowed, flag: str) -> None:
    require(value in allowed, flag, f"{value!r} is not one of: {', '.join(map(str, allowed))}")


def flag_of(f: dataclasses.Field) -> str:
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


def field_types(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _check_value(value, f: dataclasses.Field, kind) -> None:
    flag, meta = flag_of(f), f.metadata
    values = value if isinstance(value, list) else [value]
    for v in values:
        if isinstance(v, float) and not math.isfinite(v):
            raise UsageError(flag, f"must be a finite number (got {v})")
        if meta.get("choices") is not None:
            choice(v, meta["choices"], flag)
        check = meta.get("check")
        if check is not None and v is not None and not check.ok(v):
            raise UsageError(flag, f"{check.rule} (got {v})")


def validate(cfg: JobConfig) -> None:
    """Every field's check, then the config's cross-field checks; raises UsageError."""
    types = field_types(type(cfg))
    for f in dataclasses.fields(cfg):
        _check_value(getattr(cfg, f.name), f, types.get(f.name))
    cfg.check()
    location(cfg.output, "--output")   # a path, or a URI pyarrow opens: never a local "s3:" folder


def validate_against_data(cfg: JobConfig, dataset) -> None:
    """Checks that need the dataset's size."""
    require(cfg.batch_size <= dataset.num_train, "--batch-size",
            f"{cfg.batch_size} is larger than the training set ({dataset.num_train} images)")


def from_dict(cls, values: dict) -> JobConfig:
    """A config of class `cls` from a dict (config.json): unknown keys are refused."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise UsageError("config", f"unknown settings for {cls.__name__}: {', '.join(unknown)}")
    return cls(**values)
