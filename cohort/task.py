"""What a single data-parallel training job trains: a model, its loss and its evaluation.

`cohort.train_loop` owns everything a job has in common: the sample order, the augmentation
of each global batch, each rank's share of it, DDP, the optimizer and learning-rate schedule,
checkpoints, resume, metrics rows and the run directory. A `TrainTask` supplies the rest:

    build_model(spec)          the trainable network (deterministic initial weights)
    setup(spec, device)        anything else the loss needs (e.g. a frozen teacher)
    begin_epoch(epoch)         per-epoch settings, returned as extra metric columns
    loss(model, x, y)          the loss of this rank's rows and named batch statistics
    epoch_rows(model, test, ctx)   metric rows after an epoch (rank 0, eval mode, no grad)
    state_dict / load_state_dict   task state kept in checkpoints (e.g. the best export)
    finish(run_path, state)    driver-side: write artefacts (best_student.pt), summary extras

ONE (`cohort.one.OneTask`) is one such task; a KD/TAKD stage is another (student from
`build_model`, teacher loaded in `setup` and run in eval mode under no_grad inside `loss`).
Nothing here imports Ray.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Iterator

import torch
from torch import nn

from .data import normalize_batch
from .progress import epoch_line
from .student import DataSpec


@dataclass
class TrainJobConfig:
    """Settings every Ray Train job has; a method's config subclasses it and adds its own."""
    method: str = "train"
    dataset: str = "cifar100"
    data_dir: str | None = None
    val_fraction: float = 0.0
    crop_padding: int = -1     # -1 = the dataset's default
    epochs: int = 200
    batch_size: int = 128      # GLOBAL batch: split evenly over the workers
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    nesterov: bool = False
    schedule: str = "step"
    milestones: list[int] = field(default_factory=list)
    gamma: float = 0.1
    temperature: float = 3.0
    kd_weight: float = 1.0
    seed: int = 0
    output: str = "runs/train"
    name: str = ""
    overwrite: bool = False
    resume: bool = False
    checkpoint_every: int = 1
    keep_checkpoints: int = 2
    eval_batch_size: int = 1024
    device: str = "auto"       # "cpu" keeps a GPU cluster's GPUs out of the job
    progress: bool = True
    steps_per_epoch: int = 0   # > 0: train only the first n global batches of each epoch (smoke tests)
    # where and how the job runs (not part of its numbers)
    workers: int = 1
    gpus_per_worker: float = -1.0   # -1 = 1 when the cluster has GPUs, else 0
    cpus_per_worker: float = -1.0   # -1 = 1 with GPUs, else the cluster's CPUs shared out
    max_failures: int = 0

    def __post_init__(self):
        if not self.name:
            self.name = os.path.basename(os.path.normpath(self.output)) or "run"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


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
    """What the loop knows at the end of an epoch, handed to `TrainTask.epoch_rows`."""
    epoch: int
    lr: float
    train: dict[str, float]   # global means over the epoch of the stats `loss` returned
    settings: dict            # what `begin_epoch` returned


class TrainTask:
    """Model + loss + evaluation of a Ray Train job (see the module docstring).

    The instance is built on the driver, pickled to every worker, and `finish` runs on the
    driver's instance. Workers call the methods in this order: build_model, setup,
    load_state_dict (when resuming), then per epoch begin_epoch, loss (every step),
    epoch_rows (rank 0 only), state_dict (rank 0, when checkpointing).
    """

    method = "train"

    def __init__(self, cfg: TrainJobConfig):
        self.cfg = cfg

    # ---- workers ------------------------------------------------------------------------
    def build_model(self, spec: DataSpec) -> nn.Module:
        raise NotImplementedError

    def setup(self, spec: DataSpec, device: torch.device) -> None:
        """Prepare what `loss` needs besides the trained model (a teacher, a buffer, ...)."""

    def begin_epoch(self, epoch: int) -> dict:
        """Per-epoch settings (e.g. a ramped loss weight), also written as metric columns."""
        return {}

    def loss(self, model: nn.Module, images: torch.Tensor, labels: torch.Tensor
             ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(loss to minimise, {name: scalar batch mean}) for this rank's rows of the batch.

        `model` is the DDP-wrapped network when there are several workers: call it, do not
        unwrap it, so gradients are averaged. The stats must have the same names on every
        step and rank; the loop averages them over the epoch's samples and all ranks.
        """
        raise NotImplementedError

    def epoch_rows(self, model: nn.Module, test: EvalSet, ctx: EpochContext) -> list[dict]:
        """Metric rows (one per member: at least member, test_acc, test_loss) after an epoch.
        Runs on rank 0 only, with the unwrapped model in eval mode and gradients off. The loop
        adds method, epoch, lr, epoch_seconds, images_per_second and the epoch's settings."""
        raise NotImplementedError

    def state_dict(self) -> dict:
        """Task state saved with each checkpoint (tensors, numbers, strings, lists, dicts)."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    def epoch_line(self, rows: list[dict]) -> str:
        """The progress line printed after each epoch."""
        return epoch_line(self.cfg.name, rows[0]["epoch"], self.cfg.epochs, rows)

    # ---- driver -------------------------------------------------------------------------
    def finish(self, run_path, state: dict) -> dict:
        """After training, on the driver, with the task state of the final checkpoint: write
        artefacts into the run directory; return entries to add to summary.json."""
        return {}
