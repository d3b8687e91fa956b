"""What a method is: its config, its members, how one step becomes named loss terms, hooks.

Three families, by where the members live:

    CohortMethod    K students, each its own network (one Ray actor each, or all in one
                    process), exchanging detached logits every step: independent, DML, KDCL.
    NetworkMethod   one network (a shared trunk and branches, or a student with a frozen
                    teacher) trained data-parallel on Ray Train or in this process: ONE,
                    OKDDip, PCL, a KD stage.
    ChainMethod     a sequence of NetworkMethod stages, each teaching the next: KD, TAKD.

A method is one file in cohort/methods/ ending with `@register`: the command line (`cohort
NAME`, `jobs/NAME.py`), sweeps, reports and the runtimes read everything from the registry.
No runtime code lives here and nothing here imports Ray.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Iterator, Sequence

import torch
from torch import nn

from ..config import JobConfig
from ..data import normalize_batch
from ..progress import epoch_line
from ..step import StepLoss
from ..student import DataSpec

METHODS: dict[str, type["Method"]] = {}


# The papers initialise residual blocks the plain way and use no warm-up: their recipes say so.
PAPER_INIT = {"zero_init_residual": "off", "warmup_epochs": 0.0}


@dataclass(frozen=True)
class Recipe:
    """A paper's settings, applied by `--recipe NAME` (flags given beside it win)."""
    source: str
    settings: dict


def register(cls: type["Method"]) -> type["Method"]:
    if cls.name in METHODS:
        raise ValueError(f"method {cls.name!r} registered twice")
    METHODS[cls.name] = cls
    return cls


class Method:
    name: ClassVar[str]
    family: ClassVar[str]
    summary: ClassVar[str]                 # one line: `cohort NAME --help` and the README
    Config: ClassVar[type[JobConfig]]
    recipes: ClassVar[dict[str, Recipe]] = {}
    member_kind: ClassVar[str] = "student"          # what its single members are called
    aggregates: ClassVar[tuple[str, ...]] = ("ensemble",)   # rows combining members
    ensemble_label: ClassVar[str] = "ensemble"               # what reports call "ensemble"

    def __init__(self, cfg: JobConfig):
        self.cfg = cfg

    @classmethod
    def members(cls, cfg: JobConfig) -> list[str]:
        """Every member with a metrics row each epoch, aggregates last."""
        return list(cfg.member_names) + list(cls.aggregates)


class CohortMethod(Method):
    """K students; every step all their detached logits build the targets (`targets`, once
    per step in every member's process), then each member's loss (`loss`)."""
    family = "cohort"
    uses_peers: ClassVar[bool] = True

    def needs_val_weights(self) -> bool:
        """True: `targets` gets weights computed once per epoch from the members' held-out
        predictions (KDCL-general)."""
        return False

    def targets(self, logits: Sequence[torch.Tensor], labels: torch.Tensor, weights) -> Any:
        return list(logits)

    def loss(self, k: int, z: torch.Tensor, targets: Any, labels: torch.Tensor) -> StepLoss:
        raise NotImplementedError


# ---- one network -------------------------------------------------------------------------------
@dataclass
class EvalSet:
    """Un-augmented images of one split, normalised in chunks on the model's device."""
    images: torch.Tensor   # uint8 N x C x H x W (CPU)
    labels: torch.Tensor   # int64 N (CPU)
    spec: DataSpec
    device: torch.device
    batch_size: int = 1024

    def batches(self) -> Iterator[torch.Tensor]:
        for start in range(0, len(self.images), self.batch_size):
            chunk = self.images[start:start + self.batch_size].to(self.device, non_blocking=True)
            yield normalize_batch(chunk, mean=self.spec.mean, std=self.spec.std)


@dataclass
class EpochContext:
    """What the loop knows at the end of an epoch, handed to `NetworkMethod.epoch_rows`."""
    epoch: int
    lr: float
    train: dict[str, float]   # epoch means over all ranks of `loss`, the terms and the stats
    settings: dict            # what `begin_epoch` returned
    val: EvalSet | None = None


class NetworkMethod(Method):
    """One network trained data-parallel (cohort.runtime.network runs it). The instance is
    built on the driver, pickled to every worker, and `finish` runs on the driver's instance.
    Workers call: build_model, setup, load_state_dict (when resuming), then per epoch
    begin_epoch, per step loss and after_step, and on rank 0 epoch_rows and state_dict."""
    family = "network"
    views: ClassVar[int] = 1   # augmented views of each batch the loss takes

    def build_model(self, spec: DataSpec) -> nn.Module:
        raise NotImplementedError

    def setup(self, spec: DataSpec, device: torch.device) -> None:
        """Prepare what `loss` needs besides the trained model (a teacher, an EMA copy...)."""

    def begin_epoch(self, epoch: int) -> dict:
        """Per-epoch settings (e.g. a ramped loss weight), also written as metric columns."""
        return {}

    def loss(self, model: nn.Module, views: list[torch.Tensor], labels: torch.Tensor) -> StepLoss:
        """Named loss terms of this rank's rows. `views` holds `self.views` augmentations of
        the batch (view 0 is the one a single-view method uses). `model` is the DDP-wrapped
        network with several workers: call it, do not unwrap it. Term and stat names must be
        the same on every step and rank."""
        raise NotImplementedError

    def after_step(self, model: nn.Module, step: int) -> None:
        """Called after every optimizer step with the unwrapped model (e.g. an EMA update)."""

    def epoch_rows(self, model: nn.Module, test: EvalSet, ctx: EpochContext) -> list[dict]:
        """Metric rows (one per member: at least member, test_acc, test_loss; val_acc when
        ctx.val exists) after an epoch, on rank 0, model unwrapped, in eval mode, no grad."""
        raise NotImplementedError

    def state_dict(self) -> dict:
        """Method state saved with each checkpoint (tensors, numbers, strings, lists, dicts)."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    def epoch_line(self, rows: list[dict]) -> str:
        return epoch_line(self.cfg.name, rows[0]["epoch"], self.cfg.epochs, rows)

    def finish(self, run_path, state: dict) -> dict:
        """On the driver after training, with the method state of the final checkpoint: write
        artefacts into the run directory; return entries to add to summary.json."""
        return {}


class ChainMethod(Method):
    """Stages of NetworkMethods trained one after the other (cohort.runtime.chain)."""
    family = "chain"
    aggregates = ()
