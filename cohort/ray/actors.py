"""DML and KDCL cohorts on Ray: one actor per student, logits exchanged every step.

The driver starts the actors in a placement group, runs epochs, writes the run directory and
recovers from a member failure (a dead actor, a lost node, a failed logit exchange) by
restoring the whole cohort from the last checkpoint. It is not on the per-step path: the
actors exchange logits among themselves (cohort.ray.exchange).
"""
from __future__ import annotations

import socket
import time
import warnings
from typing import Callable

import ray
import torch
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from .. import methods
from ..config import CohortConfig
from ..data import Dataset, epoch_batches
from ..devices import check_gpu_settings, require_gpus
from ..errors import RunFailed, TrainingDiverged
from ..metrics import accuracy_and_loss
from ..progress import epoch_line, say, step_bar
from ..runs import latest_checkpoint
from ..runtime.common import (cohort_rows, general_weights, prepare_run, restore_point,
                              run_summary, should_checkpoint)
from ..student import DataSpec, Student
from .cluster import (Capacity, Request, bundle, capacity, connect, reserve, this_process_device,
                      reservation_timeout, unit_resources, wait_for_group)
from .exchange import (CollectiveExchange, ExchangeFailed, RefsExchange, StepMismatch,
                       StoreExchange, resolve_exchange)
from .telemetry import Telemetry

# A member's process or node is gone: the driver sees these on the member's pending call.
ACTOR_ERRORS = (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError,
                ray.exceptions.NodeDiedError)
PROGRESS_SECONDS = 10.0


class MemberFailed(RuntimeError):
    """A member failure the cohort restarts from: `what` completes "student1...", e.g.
    "'s actor died" or "'s logit exchange failed (RayChannelTimeoutError ...)"."""

    def __init__(self, member: str, cause: Exception, what: str = "'s actor died"):
        super().__init__(f"{member}{what}: {type(cause).__name__}")
        self.member, self.what = member, what


# ---- data travels once, through the object store -------------------------------------------
def dataset_arrays(dataset: Dataset) -> dict:
    """Numpy views of the dataset: actors on a node read them zero-copy from the object store."""
    fields = ("train_images", "train_labels", "test_images", "test_labels", "val_images", "val_labels")
    arrays = {f: getattr(dataset, f).numpy() for f in fields if getattr(dataset, f) is not None}
    meta = {k: getattr(dataset, k) for k in ("name", "num_classes", "mean", "std", "crop_padding", "flip")}
    return {"arrays": arrays, "meta": meta}


def dataset_from_arrays(payload: dict) -> Dataset:
    with warnings.catch_warnings():  # read-only views: we only ever index (copy) them
        warnings.simplefilter("ignore", UserWarning)
        tensors = {k: torch.from_numpy(v) for k, v in payload["arrays"].items()}
    return Dataset(**payload["meta"], **tensors)


# ---- the actor --------------------------------------------------------------------------
class StudentWorker:
    """One student in its own process (and on its own GPU when it has one)."""

    def __init__(self, index: int, arch: str, cfg: dict, data: dict, threads: int):
        torch.set_num_threads(max(1, threads))
        self.cfg = methods.load_config(cfg)
        self.dataset = dataset_from_arrays(data)
        self.device = this_process_device(self.cfg.device)   # what Ray assigned, never a guess
        spec = DataSpec.of(self.dataset, self.cfg.crop_padding, self.cfg.flip)
        self.student = Student(index, arch, self.cfg, spec, self.device)
        self.method = methods.of(self.cfg)
        self.exchange = None
        self._steps_done = 0
        self.telemetry = Telemetry(self.cfg.name, self.cfg.method, self.student.name)
        self.train_images = self.dataset.train_images.to(self.device)
        self.train_labels = self.dataset.train_labels.to(self.device)

    def steps_done(self) -> int:
        """Steps of the current epoch this student has taken (the driver's progress bar)."""
        return self._steps_done

    def pid(self) -> int:
        import os
        return os.getpid()

    def rendezvous(self) -> tuple[str, int]:
        """This node's address and a free port, for the collective transport's master."""
        with socket.socket() as s:
            s.bind(("", 0))
            port = s.getsockname()[1]
        return ray.util.get_node_ip_address(), port

    def node(self) -> str:
        return ray.get_runtime_context().get_node_id()

    def open_channel(self, peers: list, nodes: list) -> object:
        """This student's object-store channel, which its peers read (`--exchange store`)."""
        buffer_bytes = 4 * self.cfg.batch_size * self.dataset.num_classes + 4096
        self._channel = StoreExchange.open(self.student.index, peers, nodes, buffer_bytes)
        return self._channel

    def connect(self, transport: str, wiring) -> None:
        """`wiring`: every member's channel (store), every member's actor (refs), or the
        collective's master address."""
        rank = self.student.index
        if transport == "collective":
            self.exchange = CollectiveExchange(rank, self.cfg.students, wiring, self.device)
        elif transport == "refs":
            self.exchange = RefsExchange(rank, wiring, self.device)
        else:
            self.exchange = StoreExchange(rank, self._channel, wiring, self.device)

    def deliver_logits(self, sender: int, count: int, key: tuple, payload) -> None:
        """A peer's logits (`--exchange refs`); runs in the actor's second thread."""
        self.exchange.deliver(sender, count, key, payload)

    def load(self, state: dict) -> None:
        self.student.load_state_dict(state)

    def state(self) -> dict:
        return self.student.state_dict()

    def predict(self, split: str) -> torch.Tensor:
        images = getattr(self.dataset, f"{split}_images")
        return self.student.predict(images, self.cfg.eval_batch_size)

    def run_epoch(self, epoch: int, weights) -> dict:
        cfg, student = self.cfg, self.student
        batches = epoch_batches(self.dataset.num_train, cfg.batch_size, cfg.seed, epoch)
        lr = student.begin_epoch(epoch, len(batches))
        waited, last_print = 0.0, time.monotonic()
        for step, idx in enumerate(batches):
            self._steps_done = step
            step_started = time.perf_counter()
            idx = idx.to(self.device)
            images, labels = self.train_images[idx], self.train_labels[idx]
            logits = student.forward(images, step)
            key = (epoch, step)
            all_logits, exposed = None, 0.0
            if self.method.uses_peers:
                self.exchange.publish(key, logits)
                started = time.perf_counter()
                all_logits = self.exchange.gather(key)
                exposed = time.perf_counter() - started
                waited += exposed
            targets = self.method.targets(all_logits, labels, weights)
            loss = self.method.loss(student.index, logits, targets, labels)
            loss_value = student.learn(loss, logits, labels, step)
            step_seconds = time.perf_counter() - step_started
            self.telemetry.step(loss_value, step_seconds, exposed, len(labels))
            if cfg.progress and time.monotonic() - last_print > PROGRESS_SECONDS:
                last_print = time.monotonic()
                print(f"[{cfg.name}] {student.name} epoch {epoch + 1} step {step + 1}/{len(batches)} "
                      f"loss {loss_value:.3f} {len(labels) / step_seconds:.0f} img/s", flush=True)
        stats = student.end_epoch()
        stats["exchange_seconds"] = waited
        test_logits = student.predict(self.dataset.test_images, cfg.eval_batch_size)
        val_logits = (student.predict(self.dataset.val_images, cfg.eval_batch_size)
                      if self.dataset.val_images is not None else None)
        self.telemetry.flush()
        self.telemetry.set(epoch=epoch + 1,
                           test_accuracy=accuracy_and_loss(test_logits, self.dataset.test_labels)[0])
        return {"lr": lr, "stats": stats, "test_logits": test_logits, "val_logits": val_logits}

    def close(self) -> None:
        if self.exchange is not None:
            self.exchange.close()


# ---- the driver -------------------------------------------------------------------------
def student_resources(cfg: CohortConfig, cap: Capacity | None = None) -> tuple[float, float]:
    """(CPUs, GPUs) per student: one GPU each on a GPU cluster, else the CPUs shared out."""
    return unit_resources(cfg.students, cfg.cpus_per_student, cfg.gpus_per_student,
                          use_gpus=cfg.device != "cpu", cap=cap)


def student_request(cfg: CohortConfig, cpus: float, gpus: float) -> Request:
    return Request([bundle(cpus, gpus)] * cfg.students, f"a {cfg.students}-student cohort")


class ActorCohort:
    """The K actors of one attempt (a restart makes a new one)."""

    worker_class = StudentWorker   # the actor's class (tests inject faults with a subclass)

    def __init__(self, cfg: CohortConfig, data_ref, group, first_bundle: int, cpus: float,
                 gpus: float, attempt: int, ready_by: float | None = None):
        """`ready_by` (time.monotonic(); restarts): every actor must have started by then."""
        self.cfg = cfg
        self.names = cfg.member_names
        suffix = f"-r{attempt}" if attempt else ""
        worker = ray.remote(self.worker_class)
        self.actors = [
            worker.options(
                name=f"{cfg.method}-{cfg.name}-student-{k}{suffix}", num_cpus=cpus, num_gpus=gpus,
                max_concurrency=2,  # deliver_logits(), pid() answer while run_epoch() trains
                scheduling_strategy=PlacementGroupSchedulingStrategy(
                    group, placement_group_bundle_index=first_bundle + k),
            ).remote(k, arch, cfg.to_dict(), data_ref, int(max(1, cpus)))
            for k, arch in enumerate(cfg.archs)]
        try:
            if ready_by is not None:
                self._await_started(ready_by, student_request(cfg, cpus, gpus))
            self._wire(cfg.exchange)
        except BaseException:   # a member lost while starting: no actor outlives this attempt
            self.shutdown()
            raise

    def _await_started(self, ready_by: float, request: Request) -> None:
        """ResourceError unless every actor answers by `ready_by`. A restart right after a
        lost node can find its placement group still ready (the GCS has not yet declared the
        node dead) and start a student in a bundle Ray then cannot place again: that student
        would wait for ever. (A dead actor answers at once; gather() reports it.)"""
        calls = [actor.node.remote() for actor in self.actors]
        left = max(0.0, ready_by - time.monotonic())
        ready, _ = ray.wait(calls, num_returns=len(calls), timeout=left)
        if len(ready) < len(calls):
            raise reservation_timeout(request, self.cfg.placement, self.cfg.startup_timeout)

    def _wire(self, exchange: str) -> None:
        if exchange == "collective":
            wiring = self.gather([self.actors[0].rendezvous.remote()])[0]
        elif exchange == "refs":
            wiring = self.actors
        else:
            wiring = self.call("open_channel", self.actors, self.call("node"))
        self.call("connect", exchange, wiring)

    def gather(self, futures: list, every_second: Callable[[], None] | None = None) -> list:
        """Results in member order. A dead actor or a failed exchange raises MemberFailed
        (a dead actor within about a second); a diverged loss or a step mismatch stops the
        run with its own one-line error. `every_second` runs while waiting (progress)."""
        pending = {ref: k for k, ref in enumerate(futures)}
        results = {}
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=1.0)
            if every_second is not None and not ready:
                every_second()
            for ref in ready:
                k = pending.pop(ref)
                try:
                    results[k] = ray.get(ref)
                except ACTOR_ERRORS as exc:
                    raise MemberFailed(self.names[k], exc) from exc
                except ray.exceptions.RayTaskError as exc:
                    if isinstance(exc.cause, ExchangeFailed):
                        raise MemberFailed(self.names[k], exc.cause,
                                           f"'s logit exchange failed ({exc.cause})") from exc
                    if isinstance(exc.cause, (TrainingDiverged, StepMismatch)):
                        raise exc.cause from None  # one line naming member/keys, epoch and step
                    raise
        return [results[k] for k in range(len(futures))]

    def call(self, method: str, *args) -> list:
        return self.gather([getattr(a, method).remote(*args) for a in self.actors])

    def load(self, states: dict) -> None:
        self.gather([a.load.remote(states[n]) for a, n in zip(self.actors, self.names)])

    def shutdown(self) -> None:
        for actor in self.actors:
            ray.kill(actor, no_restart=True)


def enclosing_group(students: int):
    """The placement group this code already runs in (a Tune trial reserves bundle 0 for
    itself and one bundle per student), or None."""
    group = ray.util.get_current_placement_group()
    if group is not None and len(group.bundle_specs) >= students + 1:
        return group
    return None


def place_students(cfg: CohortConfig) -> tuple:
    """(placement group, its first student bundle, CPUs and GPUs per student, whether this
    run owns the group): the enclosing Tune trial's group, else one reserved here, waiting
    up to --startup-timeout (an autoscaler is asked for it) unless it can never fit."""
    group = enclosing_group(cfg.students)
    if group is not None:
        spec = group.bundle_specs[1]
        cpus, gpus = spec.get("CPU", 0.0), spec.get("GPU", 0.0)
        require_gpus(cfg.device, gpus, "--gpus-per-student")
        return group, 1, cpus, gpus, False
    cap = capacity()
    cpus, gpus = student_resources(cfg, cap)
    require_gpus(cfg.device, gpus, "--gpus-per-student")
    group = reserve(student_request(cfg, cpus, gpus), cfg.placement, cfg.startup_timeout, cap)
    return group, 0, cpus, gpus, True


def run_ray(cfg: CohortConfig, dataset: Dataset | None = None,
            on_epoch: Callable[[list[dict]], None] | None = None) -> dict:
    """Train the cohort as Ray actors; returns the summary. `on_epoch(rows)` is called after
    every epoch's metrics are written (Ray Tune reports through it)."""
    cfg.exchange = resolve_exchange(cfg.exchange)   # store -> refs where the channel API changed
    run, dataset = prepare_run(cfg, dataset)   # all validation happens before Ray starts
    check_gpu_settings(cfg)
    connect(cfg.method, cfg.name)
    group, first_bundle, cpus, gpus, owned = place_students(cfg)
    run.start()
    data_ref = ray.put(dataset_arrays(dataset))
    placement = (group, first_bundle, cpus, gpus)
    try:
        return _train(cfg, run, dataset, data_ref, placement, cfg.max_restarts, on_epoch)
    finally:
        if owned:
            ray.util.remove_placement_group(group)


def _restore(cfg, run, cohort: ActorCohort) -> int:
    """Load the latest checkpoint into the cohort (fresh students when there is none yet) and
    forget the rows of the epochs it will train again."""
    epoch = 0
    if latest_checkpoint(run.path) is not None:
        epoch, states = restore_point(run)
        cohort.load(states)
    run.truncate_metrics(epoch)
    return epoch


def _start(cfg, run, data_ref, placement, attempt: int) -> tuple[ActorCohort, int]:
    """A new cohort of actors and the epoch it starts at: a restart (attempt > 0) or --resume
    continues from the last checkpoint. A restart first waits, at most --startup-timeout, for
    the group to hold every bundle again (a lost node's bundles are placed anew)."""
    group, _, cpus, gpus = placement
    ready_by = None
    if attempt:   # at most --startup-timeout for the bundles and then the actors in them
        ready_by = time.monotonic() + cfg.startup_timeout
        wait_for_group(group, student_request(cfg, cpus, gpus), cfg.placement, cfg.startup_timeout)
    cohort = ActorCohort(cfg, data_ref, *placement, attempt, ready_by)
    try:
        epoch = _restore(cfg, run, cohort) if attempt or cfg.resume else 0
    except BaseException:
        cohort.shutdown()
        raise
    return cohort, epoch


def _train(cfg, run, dataset, data_ref, placement, max_restarts, on_epoch) -> dict:
    attempt, epoch, cohort = 0, 0, None
    try:
        while cohort is None or epoch < cfg.epochs:
            try:
                if cohort is None:   # the first attempt, or a restart (a member failed starting, too)
                    cohort, epoch = _start(cfg, run, data_ref, placement, attempt)
                    continue
                rows = _run_epoch(cfg, run, dataset, cohort, epoch)
                epoch += 1
                if on_epoch is not None:
                    on_epoch(rows)
            except MemberFailed as failure:
                attempt += 1
                if attempt > max_restarts:
                    raise RunFailed(
                        f"{failure.member}{failure.what} in epoch {epoch + 1} and --max-restarts "
                        f"{max_restarts} is used up; the run directory keeps its last checkpoint "
                        "(rerun with --resume to continue)") from failure
                say(f"[{cfg.name}] {failure.member}{failure.what} in epoch {epoch + 1}; "
                    f"restarting the cohort from its last checkpoint (restart {attempt}/{max_restarts})")
                if cohort is not None:
                    cohort.shutdown()
                cohort = None
                run.extra_summary["restarts"] = attempt
    finally:
        if cohort is not None:
            cohort.shutdown()
    return run_summary(run)


def _run_epoch(cfg, run, dataset, cohort: ActorCohort, epoch: int) -> list[dict]:
    started = time.perf_counter()
    weights = None
    if methods.of(cfg).needs_val_weights():
        weights = general_weights(cohort.call("predict", "val"), dataset.val_labels)
    steps = len(epoch_batches(dataset.num_train, cfg.batch_size, cfg.seed, epoch))
    with step_bar(steps, f"epoch {epoch + 1}", cfg.progress) as bar:
        def show_progress():   # a terminal only: student 0's step count, asked once a second
            if not bar.disable:
                done, _ = ray.wait([cohort.actors[0].steps_done.remote()], timeout=0.5)
                if done:
                    bar.update(ray.get(done[0]) - bar.n)
        results = cohort.gather([a.run_epoch.remote(epoch, weights) for a in cohort.actors],
                                show_progress)
    val = [r["val_logits"] for r in results] if dataset.val_images is not None else None
    rows = cohort_rows(cfg, epoch, results[0]["lr"], cohort.names, [r["stats"] for r in results],
                       [r["test_logits"] for r in results], dataset.test_labels,
                       time.perf_counter() - started, val, dataset.val_labels)
    run.append_metrics(rows)
    Telemetry(cfg.name, cfg.method, "ensemble").set(epoch=epoch + 1, test_accuracy=rows[-1]["test_acc"])
    if should_checkpoint(cfg, epoch):
        run.save_checkpoint(epoch, dict(zip(cohort.names, cohort.call("state"))),
                            keep=cfg.keep_checkpoints)
    if cfg.progress:
        say(epoch_line(cfg.name, epoch, cfg.epochs, rows))
    return rows
