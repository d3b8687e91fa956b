"""Everything in this process: the reference every distributed runtime must match.

`run_cohort` trains K students of a CohortMethod: each step every student forwards its view
of the same batch, all detached logits build the targets, then every student takes its step
(the papers' simultaneous update). `run_network` trains a NetworkMethod with the loop the Ray
Train workers run (cohort.runtime.network), as one rank.
"""
from __future__ import annotations

import time
from typing import Sequence

from .. import methods
from ..data import Dataset, epoch_batches
from ..progress import epoch_line, say, step_bar
from ..runs import latest_checkpoint, read_checkpoint
from ..student import DataSpec, Student, resolve_device
from . import network
from .common import (cohort_rows, general_weights, prepare_run, restore_point, run_summary,
                     should_checkpoint, write_summary)


# ---- K students -----------------------------------------------------------------------------
def train_step(students: Sequence[Student], method, images, labels, weights, step: int) -> None:
    logits = [s.forward(images, step) for s in students]
    targets = method.targets([z.detach() for z in logits], labels, weights)
    for k, (student, z) in enumerate(zip(students, logits)):
        student.learn(method.loss(k, z, targets, labels), z, labels, step)


def run_cohort(cfg, dataset: Dataset | None = None, on_epoch=None) -> dict:
    """Train the cohort in this process; returns the summary. `on_epoch(rows)` is called
    after every epoch's metrics are written."""
    run, dataset = prepare_run(cfg, dataset)
    run.start()
    device = resolve_device(cfg.device)
    spec = DataSpec.of(dataset, cfg.crop_padding, cfg.flip)
    students = [Student(k, arch, cfg, spec, device) for k, arch in enumerate(cfg.archs)]
    start = 0
    if cfg.resume:
        start, states = restore_point(run)
        for s in students:
            s.load_state_dict(states[s.name])
        run.truncate_metrics(start)
    train_images = dataset.train_images.to(device)
    train_labels = dataset.train_labels.to(device)
    method = methods.of(cfg)
    for epoch in range(start, cfg.epochs):
        started = time.perf_counter()
        weights = None
        if method.needs_val_weights():
            weights = general_weights([s.predict(dataset.val_images, cfg.eval_batch_size)
                                       for s in students], dataset.val_labels)
        batches = epoch_batches(dataset.num_train, cfg.batch_size, cfg.seed, epoch)
        lr = [s.begin_epoch(epoch, len(batches)) for s in students][0]
        with step_bar(len(batches), f"epoch {epoch + 1}", cfg.progress) as bar:
            for step, idx in enumerate(batches):
                idx = idx.to(device)
                train_step(students, method, train_images[idx], train_labels[idx], weights, step)
                bar.update()
        stats = [s.end_epoch() for s in students]
        test_logits = [s.predict(dataset.test_images, cfg.eval_batch_size) for s in students]
        val_logits = ([s.predict(dataset.val_images, cfg.eval_batch_size) for s in students]
                      if dataset.val_images is not None else None)
        rows = cohort_rows(cfg, epoch, lr, [s.name for s in students], stats, test_logits,
                           dataset.test_labels, time.perf_counter() - started, val_logits,
                           dataset.val_labels)
        run.append_metrics(rows)
        if should_checkpoint(cfg, epoch):
            run.save_checkpoint(epoch, {s.name: s.state_dict() for s in students},
                                keep=cfg.keep_checkpoints)
        if cfg.progress:
            say(epoch_line(cfg.name, epoch, cfg.epochs, rows))
        if on_epoch is not None:
            on_epoch(rows)
    return run_summary(run)


# ---- one network ----------------------------------------------------------------------------
STATE = "train_state"   # the checkpoint's one member: RUN/checkpoints/epoch-NNNN/train_state.pt


class LocalHost(network.Host):
    def __init__(self, method, run, on_epoch=None):
        self.method, self.run, self.on_epoch_rows = method, run, on_epoch
        self.device = resolve_device(method.cfg.device)
        self.final_state = None

    def start_state(self):
        if not self.method.cfg.resume:
            return None
        _, states = read_checkpoint(latest_checkpoint(self.run.path))
        return states[STATE]

    def report(self, epoch, rows, checkpointing, state):
        cfg = self.method.cfg
        self.run.truncate_metrics(epoch)
        self.run.append_metrics(rows)
        if state is not None:
            self.run.save_checkpoint(epoch, {STATE: state}, keep=cfg.keep_checkpoints)
            self.final_state = state
        if cfg.progress:
            say(self.method.epoch_line(rows))
        if self.on_epoch_rows is not None:
            self.on_epoch_rows(rows)


def run_network(method, run, dataset: Dataset, on_epoch=None) -> dict:
    """Train a NetworkMethod in this process into the planned run directory `run`."""
    run.start()
    host = LocalHost(method, run, on_epoch)
    network.train(method, dataset, host)
    state = host.final_state
    if state is None and latest_checkpoint(run.path) is not None:
        state = read_checkpoint(latest_checkpoint(run.path))[1][STATE]
    extra = method.finish(run.path, state.get("task", {})) if state else {}
    return write_summary(run, method.cfg, {"workers": 1, **extra})
