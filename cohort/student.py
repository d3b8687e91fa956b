"""One student: a model, its optimizer and schedule, and its view of the data.

All randomness is a pure function of (seed, member, epoch, step): the initial weights of
member k, the sample order of each epoch and every augmentation draw. A student restored
from a checkpoint therefore continues exactly as an uninterrupted one, in any runtime.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from .data import augment_batch, derive_seed, normalize_batch
from .models import build_model, zero_init_wanted
from .models.base import zero_init_residual
from .optim import learning_rate, make_optimizer, set_learning_rate, warmup_factor
from .step import EpochStats, StepLoss, take_step

INIT_STREAM, VIEW_STREAM = 101, 202  # seed domains, so init and augmentation never share a seed


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def seeded(seed: int, member: int, build, zero_residual: bool = False):
    """The network `build()` makes for member `member`, its initial weights a pure function of
    (seed, member), without touching the global RNG; `zero_residual`: every residual block
    starts as the identity (cohort.models.base.zero_init_residual)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(seed, INIT_STREAM, member))
        model = build()
    return zero_init_residual(model) if zero_residual else model


def seeded_model(arch: str, num_classes: int, in_channels: int, seed: int, member: int,
                 zero_residual: bool = False):
    """The initial plain `arch` network of member `member` (see `seeded`)."""
    return seeded(seed, member, lambda: build_model(arch, num_classes, in_channels), zero_residual)


@dataclass
class DataSpec:
    """What a student needs to know of the dataset (no images)."""
    num_classes: int
    in_channels: int
    mean: tuple
    std: tuple
    crop_padding: int
    flip: bool = True
    num_train: int = 0

    @classmethod
    def of(cls, dataset, crop_padding: int = -1, flip: str = "auto") -> "DataSpec":
        """The dataset's spec; `crop_padding` -1 and `flip` "auto" keep the dataset's own."""
        padding = dataset.crop_padding if crop_padding < 0 else crop_padding
        flips = dataset.flip if flip == "auto" else flip == "on"
        return cls(dataset.num_classes, dataset.in_channels, tuple(dataset.mean),
                   tuple(dataset.std), padding, flips, dataset.num_train)


class Student:
    def __init__(self, index: int, arch: str, cfg, spec: DataSpec, device: torch.device):
        self.index, self.arch, self.cfg, self.spec, self.device = index, arch, cfg, spec, device
        self.name = f"student{index}"
        self.model = seeded_model(arch, spec.num_classes, spec.in_channels, cfg.seed, index,
                                  zero_init_wanted(cfg.zero_init_residual, arch)).to(device)
        self.optimizer = make_optimizer(self.model.parameters(), cfg.lr, cfg.momentum,
                                        cfg.weight_decay, cfg.nesterov)
        # DML peers share views unless asked otherwise; KDCL students each draw their own.
        self.view_stream = index if cfg.views == "separate" else 0
        self.epoch = 0
        self._stats = None

    # ---- training -----------------------------------------------------------------------
    def begin_epoch(self, epoch: int, steps: int = 1) -> float:
        """Start epoch `epoch` of `steps` optimizer steps; returns its scheduled learning rate."""
        self.epoch, self.steps = epoch, steps
        lr = learning_rate(self.cfg.lr, self.cfg.schedule, epoch, self.cfg.epochs,
                           self.cfg.milestones, self.cfg.gamma)
        self.lr = lr
        set_learning_rate(self.optimizer, lr)
        self.model.train()
        self._stats = EpochStats(self.device)
        self._started = time.perf_counter()
        return lr

    def forward(self, images: torch.Tensor, step: int) -> torch.Tensor:
        """Logits (with graph) of this student's augmented view of a uint8 batch."""
        seed = derive_seed(self.cfg.seed, VIEW_STREAM, self.view_stream, self.epoch, step)
        views = augment_batch(images, seed=seed, padding=self.spec.crop_padding, flip=self.spec.flip,
                              mean=self.spec.mean, std=self.spec.std)
        return self.model(views)

    def learn(self, loss: StepLoss, logits: torch.Tensor, labels: torch.Tensor, step: int) -> float:
        """One optimizer step on the method's loss terms (cohort.step); returns the total."""
        accuracy = (logits.detach().argmax(1) == labels).float().mean()
        if self.cfg.warmup_epochs > 0:
            set_learning_rate(self.optimizer, self.lr * warmup_factor(
                self.epoch, step, self.steps, self.cfg.warmup_epochs))
        return take_step(self.optimizer, loss, self.name, self.epoch, step, self._stats,
                         len(labels), extra={"acc": accuracy})

    def end_epoch(self) -> dict:
        means, samples = self._stats.means()
        seconds = time.perf_counter() - self._started
        out = {f"train_{name}": value for name, value in means.items()}
        out["train_acc"] = 100.0 * means.get("acc", 0.0)
        out.update(train_seconds=seconds, images_per_second=samples / max(seconds, 1e-9))
        return out

    # ---- evaluation ---------------------------------------------------------------------
    @torch.no_grad()
    def predict(self, images: torch.Tensor, batch_size: int = 1024) -> torch.Tensor:
        """Logits (float32, CPU) of un-augmented uint8 images, in eval mode."""
        self.model.eval()
        out = []
        for start in range(0, len(images), batch_size):
            chunk = images[start:start + batch_size].to(self.device, non_blocking=True)
            x = normalize_batch(chunk, mean=self.spec.mean, std=self.spec.std)
            out.append(self.model(x).float().cpu())
        self.model.train()
        return torch.cat(out)

    # ---- state --------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"arch": self.arch, "index": self.index,
                "model": {k: v.detach().cpu() for k, v in self.model.state_dict().items()},
                "optimizer": _to_cpu(self.optimizer.state_dict())}

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])


def _to_cpu(obj):
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_to_cpu(v) for v in obj]
    return obj
