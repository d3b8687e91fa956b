"""One NetworkMethod as a data-parallel Ray Train job (TorchTrainer + DDP).

    run_train_job(method, run, dataset) -> summary

The driver checks that the cluster can hold the workers, writes the run directory's
config.json, puts the dataset into the object store once and starts a TorchTrainer with
N workers (gloo on CPU, nccl on GPU). Each worker runs the loop every runtime runs
(`cohort.runtime.network.train`) on a `RayHost`: with N > 1 every BatchNorm is synchronised
(`cohort.sync_bn`) and the model wrapped in DDP by `ray.train.torch.prepare_model`, so N
workers compute what one worker computes with the same global batch (up to float rounding);
the epoch statistics are all-reduced; rank 0's rows and checkpoints go to `ray.train.report`.

Checkpoints live in RUN/checkpoints/epoch-NNNN/ (RunConfig storage_path=RUN, name
"checkpoints", on RUN's filesystem: a local path or any URI of cohort.storage), each a cohort
checkpoint (train_state.pt, then meta.json) that `runs.py` can read. Ray Train uploads the
worker's files; the controller's callback then writes meta.json, the completion marker
(`runs.MARKER`), so a checkpoint whose upload was cut short is never taken for a whole one.
Rerunning with `resume` makes Ray Train load its snapshot of that folder, so
`ray.train.get_checkpoint()` returns the latest one (the run directory's latest checkpoint is
the fallback when Ray has no snapshot); FailureConfig(max_failures) restarts a failed worker
group from the latest checkpoint within one run. The metric rows travel with the report to a
callback on the Train controller (on the driver's node), which appends them to
RUN/metrics.parquet and prints the epoch line. After training, `method.finish` runs on the
driver with the method state of the final checkpoint (ONE writes best_student.pt there).
"""
from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path

import ray
import ray.train
import torch
import torch.distributed as dist
from ray.train import (Checkpoint, CheckpointConfig, FailureConfig, LoggingConfig, RunConfig,
                       ScalingConfig, UserCallback)
from ray.train.torch import TorchConfig, TorchTrainer

from ..config import TrainJobConfig
from ..data import Dataset
from ..devices import check_gpu_settings, require_gpus
from ..errors import TrainingDiverged
from ..methods import NetworkMethod
from ..progress import say
from ..runs import MARKER, RunDir, latest_checkpoint, load_checkpoint_file, write_json
from ..storage import RemotePath, ray_storage
from ..runtime.common import write_summary
from ..runtime.network import Host, train
from ..sync_bn import synchronise_batchnorm
from .actors import dataset_arrays, dataset_from_arrays
from .cluster import (Capacity, Request, bundle, capacity, connect,
                      refuse_if_never_fits, reserve, this_process_device, unit_resources)
from .telemetry import Telemetry

STORAGE_NAME = "checkpoints"      # Ray Train's run name: its folder is RUN/checkpoints
STATE_FILE = "train_state"        # RUN/checkpoints/epoch-NNNN/train_state.pt


# ---- resources ------------------------------------------------------------------------------
def worker_resources(cfg: TrainJobConfig, cap: Capacity | None = None) -> tuple[float, float]:
    """(CPUs, GPUs) per worker, after checking that the cluster can ever hold N of them
    (now, or once its autoscaler adds nodes); raises ResourceError at once if not."""
    cap = cap or capacity()
    cpus, gpus = unit_resources(cfg.workers, cfg.cpus_per_worker, cfg.gpus_per_worker,
                                use_gpus=cfg.device != "cpu", cap=cap)
    refuse_if_never_fits(worker_request(cfg, cpus, gpus), cap)
    require_gpus(cfg.device, gpus, "--gpus-per-worker")
    return float(cpus), float(gpus)


def worker_request(cfg: TrainJobConfig, cpus: float, gpus: float) -> Request:
    return Request([bundle(cpus, gpus)] * cfg.workers, f"{cfg.workers} workers", verb="ask",
                   unit="worker", gpu_flag="--gpus-per-worker")


def wait_for_workers(cfg: TrainJobConfig, cpus: float, gpus: float, cap: Capacity) -> None:
    """Reserve the workers' resources once and let go: waits up to the startup timeout for
    busy resources or an autoscaler's new nodes, then fails with one line, where Ray Train
    would retry its worker group without a deadline. Ray Train then reserves its own group."""
    group = reserve(worker_request(cfg, cpus, gpus), "pack", cfg.startup_timeout, cap)
    ray.util.remove_placement_group(group)


# ---- the driver ------------------------------------------------------------------------------
def run_train_job(task: NetworkMethod, run: RunDir, dataset: Dataset,
                  callbacks: list | None = None) -> dict:
    """Train `task` as a Ray Train job writing the run directory `run` (planned, not started);
    returns the summary. `callbacks` are extra Ray Train UserCallbacks (a sweep's forwarder of
    rank 0's rows to Tune). Raises ResourceError before writing anything when the cluster can
    never hold the workers (at once) or has not freed or grown room for them within the startup
    timeout, TrainingDiverged on a non-finite loss, ray.train.TrainingFailedError otherwise."""
    cfg = task.cfg
    check_gpu_settings(cfg)
    connect(cfg.method, cfg.name)
    cap = capacity()
    cpus, gpus = worker_resources(cfg, cap)
    wait_for_workers(cfg, cpus, gpus, cap)
    run.path = run.path.resolve()   # workers and the controller have other working directories
    storage_path, filesystem = ray_storage(run.path)
    latest = latest_checkpoint(run.path) if cfg.resume else None
    resumed_from = _epochs_completed(latest) if latest else 0
    run.start()
    writer = _RunDirWriter(run, task, cfg.progress)
    trainer = TorchTrainer(
        _worker_loop,
        train_loop_config={"task": task, "data": ray.put(dataset_arrays(dataset)),
                           "threads": max(1, int(cpus)),
                           "resume_from": ray_storage(latest) if latest else None},
        torch_config=TorchConfig(backend="nccl" if gpus > 0 and cfg.device != "cpu" else "gloo"),
        scaling_config=ScalingConfig(num_workers=cfg.workers, use_gpu=gpus > 0,
                                     resources_per_worker=bundle(cpus, gpus)),
        run_config=RunConfig(
            name=STORAGE_NAME, storage_path=storage_path, storage_filesystem=filesystem,
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
    return write_summary(run, cfg, extra)


def _epochs_completed(checkpoint_dir) -> int:
    return int(json.loads((checkpoint_dir / MARKER).read_text())["epochs_completed"])


def _diverged(exc: Exception) -> TrainingDiverged | None:
    for failure in getattr(exc, "worker_failures", {}).values():
        if isinstance(failure, TrainingDiverged):
            return failure
    return None


class _RunDirWriter(UserCallback):
    """Runs on the Train controller: marks each uploaded checkpoint complete, appends rank 0's
    rows to RUN/metrics.parquet and prints the epoch line. Rows of epochs a restarted worker
    group trains again are replaced."""

    def __init__(self, run: RunDir, task: NetworkMethod, progress: bool):
        self.run, self.task, self.progress = run, task, progress
        self.restarts = 0

    def after_report(self, run_context, metrics, checkpoint):
        report = metrics[0] if metrics else {}
        if checkpoint is not None:
            self._mark_complete(checkpoint, report["epoch"])
        rows = report.get("rows")
        if not rows:
            return
        self.run.truncate_metrics(report["epoch"])
        self.run.append_metrics(rows)
        if self.progress:
            say(self.task.epoch_line(rows))

    def _mark_complete(self, checkpoint: Checkpoint, epoch: int) -> None:
        """Write meta.json beside the train_state.pt Ray Train has finished uploading."""
        where = self.run.path
        folder = (RemotePath(checkpoint.filesystem, checkpoint.path, where.prefix, where.query)
                  if isinstance(where, RemotePath) else Path(checkpoint.path))
        cfg = self.task.cfg
        write_json(folder / MARKER, {"epochs_completed": epoch + 1, "members": [STATE_FILE],
                                     "method": cfg.method, "name": cfg.name})

    def after_exception(self, run_context, worker_exceptions):
        self.restarts += 1
        self.run.extra_summary["restarts"] = self.restarts
        if self.progress:
            ranks = ", ".join(str(r) for r in sorted(worker_exceptions))
            say(f"[{self.task.cfg.name}] worker(s) {ranks} failed; Ray Train restarts the group "
                f"from the latest checkpoint if --max-failures allows")


# ---- the workers -----------------------------------------------------------------------------
class RayHost(Host):
    """The loop's host inside a Ray Train worker."""

    def __init__(self, config: dict, method: NetworkMethod):
        context = ray.train.get_context()
        self.rank, self.world = context.get_world_rank(), context.get_world_size()
        self.device = this_process_device(method.cfg.device)   # what Ray assigned this worker
        self.method, self.resume_from = method, config["resume_from"]
        cfg = method.cfg
        self.telemetry = Telemetry(cfg.name, cfg.method, f"worker{self.rank}")   # live, per worker

    def prepare(self, model):
        if self.world > 1:
            model = synchronise_batchnorm(model, self.device)
        return ray.train.torch.prepare_model(model, move_to_device=self.device)   # DDP when world > 1

    def all_reduce(self, sums):
        if self.world > 1:
            dist.all_reduce(sums)

    def start_state(self):
        # Ray Train's latest checkpoint of this run (after a restart, or from its snapshot of
        # RUN/checkpoints when resuming); the run directory's latest if Ray has no snapshot
        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None and self.resume_from:
            path, filesystem = self.resume_from
            checkpoint = Checkpoint(path, filesystem)
        if checkpoint is None:
            return None
        with checkpoint.as_directory() as folder:
            return load_checkpoint_file(Path(folder) / f"{STATE_FILE}.pt")

    def on_step(self, value, seconds, samples):
        self.telemetry.step(value, seconds, None, samples)

    def on_epoch(self, epoch, rows):
        cfg = self.method.cfg
        for row in rows or []:   # live test accuracy per member (branch, ensemble, student)
            Telemetry(cfg.name, cfg.method, str(row["member"])).set(
                epoch=epoch + 1, test_accuracy=row["test_acc"])
        self.telemetry.flush()
        self.telemetry.set(epoch=epoch + 1)

    def report(self, epoch, rows, checkpointing, state):
        report = {"epoch": epoch, "rows": rows} if self.rank == 0 else {"epoch": epoch}
        if not checkpointing:
            ray.train.report(report)
            return
        with tempfile.TemporaryDirectory(prefix="cohort-ckpt-") as folder:
            checkpoint = _save(Path(folder), state) if state is not None else None
            ray.train.report(report, checkpoint=checkpoint,
                             checkpoint_dir_name=f"epoch-{epoch + 1:04d}")


def _worker_loop(config: dict) -> None:
    method: NetworkMethod = config["task"]
    torch.set_num_threads(config["threads"])
    logging.getLogger().setLevel(logging.WARNING)   # Ray Train logs every report at INFO
    dataset = dataset_from_arrays(ray.get(config["data"]))
    train(method, dataset, RayHost(config, method))


def _save(folder: Path, state: dict) -> Checkpoint:
    """The worker's part of a checkpoint: its state alone; the marker comes once uploaded."""
    torch.save(state, folder / f"{STATE_FILE}.pt")
    return Checkpoint.from_directory(str(folder))
