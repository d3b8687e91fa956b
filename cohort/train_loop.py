"""One data-parallel training job on Ray Train (TorchTrainer + DDP), for any `TrainTask`.

    run_train_job(task, cfg, run, dataset) -> summary

The driver checks that the cluster can hold the workers, writes the run directory's
config.json, puts the dataset into the object store once and starts a TorchTrainer with
N workers (gloo on CPU, nccl on GPU). Each worker runs `_worker_loop`:

* every epoch's sample order is `epoch_batches(n, B, seed, epoch)`, B the GLOBAL batch, so
  every rank knows every batch without messages; each step augments the whole global batch
  with the step's seed (the same draw as a single process) and keeps rows
  [rank * B/N, (rank + 1) * B/N) of it: the ranks' shares are disjoint and cover the batch;
* with N > 1 every BatchNorm is synchronised (`cohort.sync_bn`) and the model wrapped in DDP
  by `ray.train.torch.prepare_model`, so N workers compute what one worker computes with the
  same global batch (up to float rounding);
* the learning rate is a pure function of the epoch; the task's batch statistics are
  averaged over the epoch and all-reduced over ranks;
* rank 0 evaluates on the test set, builds the metric rows and, every `checkpoint_every`
  epochs and at the end, a checkpoint (model, optimizer, schedule, epoch, task state) that
  it reports with `ray.train.report`; the other ranks report without one.

Checkpoints live in RUN/checkpoints/epoch-NNNN/ (RunConfig storage_path=RUN, name
"checkpoints"), each a cohort checkpoint (meta.json + train_state.pt) that `runs.py` can
read. Rerunning with `resume` makes Ray Train load its snapshot of that folder, so
`ray.train.get_checkpoint()` returns the latest one (the run directory's latest checkpoint is
the fallback when Ray has no snapshot); FailureConfig(max_failures) restarts a failed worker
group from the latest checkpoint within one run. The metric rows travel with the report to a
callback on the Train controller (on the driver's node), which appends them to
RUN/metrics.parquet and prints the epoch line. After training, `task.finish` runs on the
driver with the task state of the final checkpoint (ONE writes best_student.pt there).

To train something else (a KD/TAKD stage), write a `cohort.task.TrainTask` (model + loss +
evaluation) and a config subclassing `TrainJobConfig`, then call `run_train_job`; see
`cohort.one` for a complete example.

Ray is imported here and in the other runtime modules only.
"""
from __future__ import annotations

import json
import logging
import math
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq
import ray
import ray.train
import torch
import torch.distributed as dist
from ray.train import (Checkpoint, CheckpointConfig, FailureConfig, LoggingConfig, RunConfig,
                       ScalingConfig, UserCallback)
from ray.train.torch import TorchConfig, TorchTrainer
from torch.nn.parallel import DistributedDataParallel

from .cluster import ResourceError, cluster_totals, connect, describe, unit_resources
from .cohort import dataset_arrays, dataset_from_arrays
from .data import Dataset, augment_batch, derive_seed, epoch_batches
from .engine import should_checkpoint
from .errors import TrainingDiverged
from .optim import learning_rate, make_optimizer, set_learning_rate
from .progress import say
from .runs import RunDir, latest_checkpoint, load_checkpoint_file, summarize, write_json
from .student import VIEW_STREAM, DataSpec, _to_cpu
from .sync_bn import synchronise_batchnorm
from .task import EpochContext, EvalSet, TrainJobConfig, TrainTask
from .telemetry import Telemetry

STORAGE_NAME = "checkpoints"      # Ray Train's run name: its folder is RUN/checkpoints
STATE_FILE = "train_state"        # RUN/checkpoints/epoch-NNNN/train_state.pt
PROGRESS_SECONDS = 10.0


# ---- resources ------------------------------------------------------------------------------
def worker_resources(cfg: TrainJobConfig) -> tuple[float, float]:
    """(CPUs, GPUs) per worker, after checking that the cluster can hold N of them at all."""
    totals = cluster_totals()
    cpus, gpus = unit_resources(cfg.workers, cfg.cpus_per_worker, cfg.gpus_per_worker,
                                use_gpus=cfg.device != "cpu")
    asked = {"CPU": cpus * cfg.workers, "GPU": gpus * cfg.workers}
    if any(asked[k] > totals[k] + 1e-9 for k in asked):
        raise ResourceError(f"{cfg.workers} workers ask for {describe(asked)} "
                            f"(CPU {cpus:g}, GPU {gpus:g} each), but the cluster has {describe(totals)}")
    return float(cpus), float(gpus)


# ---- the driver ------------------------------------------------------------------------------
def run_train_job(task: TrainTask, cfg: TrainJobConfig, run: RunDir, dataset: Dataset,
                  callbacks: list | None = None) -> dict:
    """Train `task` as a Ray Train job writing the run directory `run` (planned, not started);
    returns the summary. `callbacks` are extra Ray Train UserCallbacks (a sweep's forwarder of
    rank 0's rows to Tune). Raises ResourceError before writing anything when the cluster is too
    small, TrainingDiverged on a non-finite loss, ray.train.TrainingFailedError otherwise."""
    connect(cfg.method, cfg.name)
    cpus, gpus = worker_resources(cfg)
    run.path = run.path.resolve()   # workers and the controller have other working directories
    latest = latest_checkpoint(run.path) if cfg.resume else None
    resumed_from = _epochs_completed(latest) if latest else 0
    run.start()
    writer = _RunDirWriter(run, task, cfg.progress)
    trainer = TorchTrainer(
        _worker_loop,
        train_loop_config={"task": task, "data": ray.put(dataset_arrays(dataset)),
                           "threads": max(1, int(cpus)),
                           "resume_from": str(latest) if latest else None},
        torch_config=TorchConfig(backend="nccl" if gpus > 0 else "gloo"),
        scaling_config=ScalingConfig(num_workers=cfg.workers, use_gpu=gpus > 0,
                                     resources_per_worker=_bundle(cpus, gpus)),
        run_config=RunConfig(
            name=STORAGE_NAME, storage_path=str(run.path),
            failure_config=FailureConfig(max_failures=cfg.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.keep_checkpoints),
            callbacks=[writer, *(callbacks or [])], logging_config=LoggingConfig(log_level="WARNING")),
    )
    try:
        result = trainer.fit()
    except ray.train.TrainingFailedError as exc:
        raise _diverged(exc) or exc
    extra = {"workers": cfg.workers}
    if resumed_from:
        extra["resumed_from_epoch"] = resumed_from
    if result.checkpoint is not None:
        with result.checkpoint.as_directory() as folder:
            state = load_checkpoint_file(Path(folder) / f"{STATE_FILE}.pt")
        extra.update(task.finish(run.path, state.get("task", {})))
    return _write_summary(run, cfg, extra)


def _bundle(cpus: float, gpus: float) -> dict:
    return {"CPU": cpus, "GPU": gpus} if gpus > 0 else {"CPU": cpus}


def _epochs_completed(checkpoint_dir: Path) -> int:
    return int(json.loads((Path(checkpoint_dir) / "meta.json").read_text())["epochs_completed"])


def _diverged(exc: Exception) -> TrainingDiverged | None:
    for failure in getattr(exc, "worker_failures", {}).values():
        if isinstance(failure, TrainingDiverged):
            return failure
    return None


def _write_summary(run: RunDir, cfg: TrainJobConfig, extra: dict) -> dict:
    metrics = run.path / "metrics.parquet"
    rows = pq.read_table(metrics).to_pylist() if metrics.exists() else []
    previous = run.path / "summary.json"
    if previous.exists():   # keep what the controller-side writer recorded (restarts)
        old = json.loads(previous.read_text())
        extra = {**{k: v for k, v in old.items() if k == "restarts"}, **extra}
    summary = {**summarize(rows, cfg.to_dict()), **extra}
    write_json(run.path / "summary.json", summary)
    return summary


class _RunDirWriter(UserCallback):
    """Runs on the Train controller: appends rank 0's rows to RUN/metrics.parquet and prints
    the epoch line. Rows of epochs a restarted worker group trains again are replaced."""

    def __init__(self, run: RunDir, task: TrainTask, progress: bool):
        self.run, self.task, self.progress = run, task, progress
        self.restarts = 0

    def after_report(self, run_context, metrics, checkpoint):
        report = metrics[0] if metrics else {}
        rows = report.get("rows")
        if not rows:
            return
        self.run.truncate_metrics(report["epoch"])
        self.run.append_metrics(rows)
        if self.progress:
            say(self.task.epoch_line(rows))

    def after_exception(self, run_context, worker_exceptions):
        self.restarts += 1
        self.run.extra_summary["restarts"] = self.restarts
        if self.progress:
            ranks = ", ".join(str(r) for r in sorted(worker_exceptions))
            say(f"[{self.task.cfg.name}] worker(s) {ranks} failed; Ray Train restarts the group "
                f"from the latest checkpoint if --max-failures allows")


# ---- the workers -----------------------------------------------------------------------------
def _worker_loop(config: dict) -> None:
    task: TrainTask = config["task"]
    cfg = task.cfg
    torch.set_num_threads(config["threads"])
    logging.getLogger().setLevel(logging.WARNING)   # Ray Train logs every report at INFO
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    dataset = dataset_from_arrays(ray.get(config["data"]))
    spec = DataSpec.of(dataset, cfg.crop_padding)

    model = task.build_model(spec)
    if world > 1:
        model = synchronise_batchnorm(model, device)
    model = ray.train.torch.prepare_model(model)   # to the device; DDP when world > 1
    core = model.module if isinstance(model, DistributedDataParallel) else model
    task.setup(spec, device)
    optimizer = make_optimizer(core.parameters(), cfg.lr, cfg.momentum, cfg.weight_decay,
                               cfg.nesterov)
    # Ray Train's latest checkpoint of this run (after a restart, or from its snapshot of
    # RUN/checkpoints when resuming); the run directory's latest if Ray has no snapshot of it
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None and config["resume_from"]:
        checkpoint = Checkpoint.from_directory(config["resume_from"])
    start = _restore(checkpoint, core, optimizer, task)

    images = dataset.train_images.to(device)
    labels = dataset.train_labels.to(device)
    test = EvalSet(dataset.test_images, dataset.test_labels, spec, device, cfg.eval_batch_size)
    share = cfg.batch_size // world
    mine = slice(rank * share, (rank + 1) * share)
    telemetry = Telemetry(cfg.name, cfg.method, f"worker{rank}")   # live gauges per worker
    for epoch in range(start, cfg.epochs):
        started = time.perf_counter()
        lr = learning_rate(cfg.lr, cfg.schedule, epoch, cfg.epochs, cfg.milestones, cfg.gamma)
        set_learning_rate(optimizer, lr)
        settings = task.begin_epoch(epoch)
        model.train()
        batches = epoch_batches(dataset.num_train, cfg.batch_size, cfg.seed, epoch)
        if cfg.steps_per_epoch > 0:
            batches = batches[:cfg.steps_per_epoch]
        names, sums, last_print = None, None, time.monotonic()
        for step, idx in enumerate(batches):
            step_started = time.perf_counter()
            idx = idx.to(device)
            seed = derive_seed(cfg.seed, VIEW_STREAM, 0, epoch, step)
            views = augment_batch(images[idx], seed=seed, padding=spec.crop_padding,
                                  mean=spec.mean, std=spec.std)[mine]
            loss, stats = task.loss(model, views, labels[idx][mine])
            value = loss.item()
            if not math.isfinite(value):
                raise TrainingDiverged(f"{cfg.method} (rank {rank})", epoch, step, value)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if names is None:
                names = sorted(stats)
                sums = torch.zeros(len(names) + 1, dtype=torch.float64, device=device)
            sums += torch.stack([stats[n].detach().double() for n in names]
                                + [torch.ones((), dtype=torch.float64, device=device)]) * share
            telemetry.step(value, time.perf_counter() - step_started, None, share)
            if rank == 0 and cfg.progress and time.monotonic() - last_print > PROGRESS_SECONDS:
                last_print = time.monotonic()
                say(f"[{cfg.name}] epoch {epoch + 1} step {step + 1}/{len(batches)} loss {value:.3f}")
        if world > 1:
            dist.all_reduce(sums)
        samples = max(sums[-1].item(), 1.0)
        train = {n: v / samples for n, v in zip(names, sums[:-1].tolist())}
        train_seconds = time.perf_counter() - started

        rows = None
        if rank == 0:
            model.eval()
            with torch.no_grad():
                rows = task.epoch_rows(core, test, EpochContext(epoch, lr, train, settings))
            model.train()
            common = {"method": cfg.method, "epoch": epoch, "lr": lr,
                      "epoch_seconds": time.perf_counter() - started,
                      "images_per_second": samples / max(train_seconds, 1e-9), **settings}
            rows = [{**common, **row} for row in rows]
            for row in rows:   # live test accuracy per member (branch, ensemble, student)
                Telemetry(cfg.name, cfg.method, str(row["member"])).set(
                    epoch=epoch + 1, test_accuracy=row["test_acc"])
        telemetry.flush()
        telemetry.set(epoch=epoch + 1)
        report = {"epoch": epoch, "rows": rows} if rank == 0 else {"epoch": epoch}
        if not should_checkpoint(cfg, epoch):
            ray.train.report(report)
            continue
        with tempfile.TemporaryDirectory(prefix="cohort-ckpt-") as folder:
            checkpoint = _save(Path(folder), epoch, core, optimizer, task, cfg) if rank == 0 else None
            ray.train.report(report, checkpoint=checkpoint,
                             checkpoint_dir_name=f"epoch-{epoch + 1:04d}")


def _save(folder: Path, epoch: int, core, optimizer, task: TrainTask, cfg) -> Checkpoint:
    state = {
        "epochs_completed": epoch + 1,
        "model": {k: v.detach().cpu() for k, v in core.state_dict().items()},
        "optimizer": _to_cpu(optimizer.state_dict()),
        "schedule": {"lr": cfg.lr, "schedule": cfg.schedule, "epochs": cfg.epochs,
                     "milestones": list(cfg.milestones), "gamma": cfg.gamma},
        "task": _to_cpu(task.state_dict()),
    }
    torch.save(state, folder / f"{STATE_FILE}.pt")
    write_json(folder / "meta.json", {"epochs_completed": epoch + 1, "members": [STATE_FILE],
                                      "method": cfg.method, "name": cfg.name})
    return Checkpoint.from_directory(str(folder))


def _restore(checkpoint: Checkpoint | None, core, optimizer, task: TrainTask) -> int:
    """Load the latest checkpoint into the model, optimizer and task; the epoch to start at."""
    if checkpoint is None:
        return 0
    with checkpoint.as_directory() as folder:
        state = load_checkpoint_file(Path(folder) / f"{STATE_FILE}.pt")
    core.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    task.load_state_dict(state.get("task", {}))
    return int(state["epochs_completed"])
