"""The single-process cohort: the reference every distributed runtime must match.

Trains K students in one process with a method of cohort.methods. Each step every student
forwards its view of the same batch, all detached logits build the targets, then every
student takes its step (the papers' simultaneous update).
"""
from __future__ import annotations

import time
from typing import Sequence

import torch
import torch.nn.functional as F

from . import losses
from .config import CohortConfig, validate_against_data, validate_cohort
from .data import Dataset, epoch_batches, load_dataset
from .methods import get_method, needs_general_weights
from .metrics import accuracy_and_loss, ensemble_metrics
from .progress import epoch_line, say, step_bar
from .runs import RunDir, latest_checkpoint, read_checkpoint
from .student import DataSpec, Student, resolve_device


# ---- bookkeeping shared with the Ray runtime ---------------------------------------------
def load_cohort_data(cfg) -> Dataset:
    return load_dataset(cfg.dataset, cfg.data_dir, val_fraction=cfg.val_fraction, seed=cfg.seed)


def prepare_run(cfg: CohortConfig, dataset: Dataset | None = None) -> tuple[RunDir, Dataset]:
    """Validate everything, then load the data and plan the run directory (nothing written)."""
    validate_cohort(cfg)
    dataset = dataset if dataset is not None else load_cohort_data(cfg)
    validate_against_data(cfg, dataset)
    run = RunDir.plan(cfg.output, cfg.to_dict(), resume=cfg.resume, overwrite=cfg.overwrite)
    return run, dataset


def general_weights(val_logits: Sequence[torch.Tensor], val_labels: torch.Tensor) -> torch.Tensor:
    """KDCL-general ensemble weights from the members' held-out predictions."""
    return losses.kdcl_general_weights([F.softmax(z.float(), 1) for z in val_logits], val_labels)


def epoch_rows(cfg, epoch: int, lr: float, names: Sequence[str], train_stats: Sequence[dict],
               test_logits: Sequence[torch.Tensor], test_labels: torch.Tensor,
               epoch_seconds: float) -> list[dict]:
    """One metrics row per member plus the ensemble's."""
    rows = []
    for name, stats, logits in zip(names, train_stats, test_logits):
        acc, loss = accuracy_and_loss(logits, test_labels)
        rows.append({"method": cfg.method, "member": name, "epoch": epoch, "lr": lr,
                     "test_acc": acc, "test_loss": loss, "epoch_seconds": epoch_seconds, **stats})
    acc, loss = ensemble_metrics(test_logits, test_labels)
    rows.append({"method": cfg.method, "member": "ensemble", "epoch": epoch, "lr": lr,
                 "test_acc": acc, "test_loss": loss, "epoch_seconds": epoch_seconds})
    return rows


def restore_point(run: RunDir) -> tuple[int, dict[str, dict]]:
    """(epochs completed, member states) of the run's latest checkpoint."""
    meta, states = read_checkpoint(latest_checkpoint(run.path))
    return meta["epochs_completed"], states


def should_checkpoint(cfg, epoch: int) -> bool:
    return (epoch + 1) % cfg.checkpoint_every == 0 or epoch + 1 == cfg.epochs


# ---- the single-process loop -------------------------------------------------------------
def train_step(students: Sequence[Student], method, cfg, images, labels, weights, step: int) -> None:
    logits = [s.forward(images, step) for s in students]
    targets = method.targets([z.detach() for z in logits], labels, cfg, weights)
    for k, (student, z) in enumerate(zip(students, logits)):
        loss = method.loss(k, z, targets, labels, cfg)
        with torch.no_grad():
            ce = F.cross_entropy(z, labels)
            kd = method.kd_term(k, z.detach(), targets, cfg)
        student.learn(loss, z, labels, ce, kd, step)


def run_local(cfg: CohortConfig, dataset: Dataset | None = None, on_epoch=None) -> dict:
    """Train the cohort in this process; returns the summary. `on_epoch(rows)` is called
    after every epoch's metrics are written."""
    run, dataset = prepare_run(cfg, dataset)
    run.start()
    device = resolve_device(cfg.device)
    spec = DataSpec.of(dataset, cfg.crop_padding)
    students = [Student(k, arch, cfg, spec, device) for k, arch in enumerate(cfg.archs)]
    start = 0
    if cfg.resume:
        start, states = restore_point(run)
        for s in students:
            s.load_state_dict(states[s.name])
        run.truncate_metrics(start)
    train_images = dataset.train_images.to(device)
    train_labels = dataset.train_labels.to(device)
    method = get_method(cfg.method)
    for epoch in range(start, cfg.epochs):
        started = time.perf_counter()
        weights = None
        if needs_general_weights(cfg):
            weights = general_weights([s.predict(dataset.val_images, cfg.eval_batch_size)
                                       for s in students], dataset.val_labels)
        lr = [s.begin_epoch(epoch) for s in students][0]
        batches = epoch_batches(dataset.num_train, cfg.batch_size, cfg.seed, epoch)
        with step_bar(len(batches), f"epoch {epoch + 1}", cfg.progress) as bar:
            for step, idx in enumerate(batches):
                idx = idx.to(device)
                train_step(students, method, cfg, train_images[idx], train_labels[idx], weights, step)
                bar.update()
        stats = [s.end_epoch() for s in students]
        test_logits = [s.predict(dataset.test_images, cfg.eval_batch_size) for s in students]
        rows = epoch_rows(cfg, epoch, lr, [s.name for s in students], stats, test_logits,
                          dataset.test_labels, time.perf_counter() - started)
        run.append_metrics(rows)
        if should_checkpoint(cfg, epoch):
            run.save_checkpoint(epoch, {s.name: s.state_dict() for s in students},
                                keep=cfg.keep_checkpoints)
        if cfg.progress:
            say(epoch_line(cfg.name, epoch, cfg.epochs, rows))
        if on_epoch is not None:
            on_epoch(rows)
    return run_summary(run)


def run_summary(run: RunDir) -> dict:
    import json
    return json.loads((run.path / "summary.json").read_text())
