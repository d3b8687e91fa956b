"""The training loop of one network (a NetworkMethod), wherever it runs.

`train(method, dataset, host)` is the whole loop; a `Host` says where it runs: `LocalHost`
(this process, cohort.runtime.local) or Ray Train's workers (cohort.ray.train). Per step:

* every epoch's sample order is `epoch_batches(n, B, seed, epoch)`, B the GLOBAL batch, so
  every rank knows every batch without messages; each step augments the whole global batch
  with the step's seed (view j: stream j) and keeps rows [rank·B/N, (rank+1)·B/N): the
  ranks' shares are disjoint and cover the batch, and N ranks compute what one computes;
* the method's named loss terms go through `cohort.step.take_step` (finite check, backward,
  optimizer step, epoch statistics), then its `after_step` hook;
* rank 0 evaluates (test, and validation when there is a split), builds the metric rows and,
  every `checkpoint_every` epochs and at the end, the state to checkpoint; the host reports
  both (writes them, or hands them to Ray Train).
"""
from __future__ import annotations

import time

import torch

from ..config import TrainJobConfig
from ..data import Dataset, augment_batch, derive_seed, epoch_batches
from ..methods import EpochContext, EvalSet, NetworkMethod
from ..optim import learning_rate, make_optimizer, set_learning_rate, warmup_factor
from ..progress import say
from ..step import EpochStats, take_step
from ..student import VIEW_STREAM, DataSpec, _to_cpu
from .common import should_checkpoint

PROGRESS_SECONDS = 10.0


class Host:
    """Where the loop runs. Rank 0 of `world` processes owns the reports."""
    rank, world = 0, 1
    device: torch.device

    def prepare(self, model: torch.nn.Module) -> torch.nn.Module:
        """The model on the device, wrapped for data parallelism when world > 1."""
        return model.to(self.device)

    def all_reduce(self, sums: torch.Tensor) -> None:
        pass

    def start_state(self) -> dict | None:
        """The checkpoint state to continue from, or None."""
        return None

    def report(self, epoch: int, rows: list[dict] | None, checkpointing: bool,
               state: dict | None) -> None:
        """After every epoch, on every rank: rank 0's rows (None elsewhere) and, on
        checkpointing epochs, rank 0's state to save (None elsewhere)."""
        raise NotImplementedError

    def on_step(self, value: float, seconds: float, samples: int) -> None:
        pass

    def on_epoch(self, epoch: int, rows: list[dict] | None) -> None:
        pass


def checkpoint_state(epoch: int, core, optimizer, method: NetworkMethod, cfg) -> dict:
    return {"epochs_completed": epoch + 1,
            "model": {k: v.detach().cpu() for k, v in core.state_dict().items()},
            "optimizer": _to_cpu(optimizer.state_dict()),
            "schedule": {"lr": cfg.lr, "schedule": cfg.schedule, "epochs": cfg.epochs,
                         "milestones": list(cfg.milestones), "gamma": cfg.gamma},
            "task": _to_cpu(method.state_dict())}


def restore(state: dict | None, core, optimizer, method: NetworkMethod) -> int:
    """Load a checkpoint state into the model, optimizer and method; the epoch to start at."""
    if state is None:
        return 0
    core.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    method.load_state_dict(state.get("task", {}))
    return int(state["epochs_completed"])


def train(method: NetworkMethod, dataset: Dataset, host: Host) -> None:
    cfg: TrainJobConfig = method.cfg
    device, rank, world = host.device, host.rank, host.world
    spec = DataSpec.of(dataset, cfg.crop_padding, cfg.flip)
    model = host.prepare(method.build_model(spec))
    core = getattr(model, "module", model)   # DDP wraps the network
    method.setup(spec, device)
    optimizer = make_optimizer(core.parameters(), cfg.lr, cfg.momentum, cfg.weight_decay, cfg.nesterov)
    start = restore(host.start_state(), core, optimizer, method)

    images, labels = dataset.train_images.to(device), dataset.train_labels.to(device)
    test = EvalSet(dataset.test_images, dataset.test_labels, spec, device, cfg.eval_batch_size)
    val = (EvalSet(dataset.val_images, dataset.val_labels, spec, device, cfg.eval_batch_size)
           if dataset.val_images is not None else None)
    share = cfg.batch_size // world
    mine = slice(rank * share, (rank + 1) * share)
    who = f"{cfg.method} (rank {rank})"
    for epoch in range(start, cfg.epochs):
        started = time.perf_counter()
        lr = learning_rate(cfg.lr, cfg.schedule, epoch, cfg.epochs, cfg.milestones, cfg.gamma)
        set_learning_rate(optimizer, lr)
        settings = method.begin_epoch(epoch)
        model.train()
        batches = epoch_batches(dataset.num_train, cfg.batch_size, cfg.seed, epoch)
        if cfg.steps_per_epoch > 0:
            batches = batches[:cfg.steps_per_epoch]
        stats, last_print = EpochStats(device), time.monotonic()
        for step, idx in enumerate(batches):
            step_started = time.perf_counter()
            idx = idx.to(device)
            batch = images[idx]
            views = [augment_batch(batch, seed=derive_seed(cfg.seed, VIEW_STREAM, j, epoch, step),
                                   padding=spec.crop_padding, flip=spec.flip, mean=spec.mean, std=spec.std)[mine]
                     for j in range(method.views)]
            loss = method.loss(model, views, labels[idx][mine])
            if cfg.warmup_epochs > 0:
                set_learning_rate(optimizer, lr * warmup_factor(epoch, step, len(batches),
                                                                cfg.warmup_epochs))
            value = take_step(optimizer, loss, who, epoch, step, stats, share)
            method.after_step(core, step)
            host.on_step(value, time.perf_counter() - step_started, share)
            if rank == 0 and cfg.progress and time.monotonic() - last_print > PROGRESS_SECONDS:
                last_print = time.monotonic()
                say(f"[{cfg.name}] epoch {epoch + 1} step {step + 1}/{len(batches)} loss {value:.3f}")
        sums = stats.totals()
        host.all_reduce(sums)
        train_means, samples = stats.means(sums)
        train_seconds = time.perf_counter() - started
        rows = None
        if rank == 0:
            model.eval()
            with torch.no_grad():
                rows = method.epoch_rows(core, test, EpochContext(epoch, lr, train_means, settings, val))
            model.train()
            common = {"method": cfg.method, "epoch": epoch, "lr": lr,
                      "epoch_seconds": time.perf_counter() - started,
                      "images_per_second": samples / max(train_seconds, 1e-9), **settings}
            rows = [{**common, **row} for row in rows]
        host.on_epoch(epoch, rows)
        checkpointing = should_checkpoint(cfg, epoch)
        state = (checkpoint_state(epoch, core, optimizer, method, cfg)
                 if rank == 0 and checkpointing else None)
        host.report(epoch, rows, checkpointing, state)
