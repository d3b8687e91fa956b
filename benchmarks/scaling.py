"""Cohort scaling: K students as Ray actors vs the same K students one after another in one process.

The same DML cohort (resnet20 on synthetic CIFAR-shaped 3x32x32 data, 100 classes, batch 128,
same seed, same steps) trained by

* `ray`                  - cohort.cohort.run_ray: one actor per student, the machine's CPUs shared
                           out (on 2 cores and K = 2: one core and one thread each);
* `sequential`           - cohort.engine.run_local: every student in this process, one after
                           another each step (as the public DML code does), torch using all cores;
* `sequential, 1 thread` - the same with one thread: the resources of one actor;
* `one student alone`    - a single student (cross-entropy only) in this process, one thread.

Timed: the training part of the last epoch (`train_seconds` in metrics.parquet, the slowest
member's), so Ray startup, actor creation and evaluation are excluded. With the default single
epoch the actors' first (slower) steps in fresh processes are included, which only counts
against `ray`; `--epochs 2` times a warm second epoch instead. Variants run
interleaved for `--rounds` rounds; medians. Reported: sequential / ray wall-time ratio (target
>= 1.7x on 2 cores with K = 2) and the cohort's step time over one student alone.
"""
from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from common import finish, machine, median, parser, start_ray, table

B = 128


def cohort_config(args, output: Path, students: int):
    from cohort.config import CohortConfig
    return CohortConfig(method="dml", students=students, archs=[args.arch], dataset="synthetic",
                        epochs=args.epochs, batch_size=B, lr=0.05, schedule="constant",
                        output=str(output), progress=False, checkpoint_every=10_000,
                        eval_batch_size=256,
                        device="cuda" if args.device.startswith("cuda") else "cpu")


def last_epoch_train_seconds(output: Path) -> float:
    """Wall time of the last epoch's training: the slowest member's train_seconds."""
    import pyarrow.parquet as pq
    rows = pq.read_table(output / "metrics.parquet").to_pylist()
    last = max(r["epoch"] for r in rows)
    return max(r["train_seconds"] for r in rows if r["epoch"] == last and r["member"] != "ensemble")


def run_ray_variant(args, data, output):
    from cohort.cohort import run_ray
    run_ray(cohort_config(args, output, args.students), data)
    return last_epoch_train_seconds(output)


def run_local_variant(args, data, output, threads: int):
    from cohort.engine import run_local
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        run_local(cohort_config(args, output, args.students), data)
    finally:
        torch.set_num_threads(previous)
    return last_epoch_train_seconds(output)


def alone_variant(args, data, threads: int = 1) -> float:
    """One student's last epoch, the same steps, no peers (cross-entropy only)."""
    from cohort.data import epoch_batches
    from cohort.student import DataSpec, Student, resolve_device
    cfg = cohort_config(args, Path("unused"), args.students)
    device = resolve_device(cfg.device)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        student = Student(0, args.arch, cfg, DataSpec.of(data), device)
        images, labels = data.train_images.to(device), data.train_labels.to(device)
        for epoch in range(args.epochs):
            student.begin_epoch(epoch)
            for step, idx in enumerate(epoch_batches(data.num_train, B, cfg.seed, epoch)):
                idx = idx.to(device)
                logits = student.forward(images[idx], step)
                loss = F.cross_entropy(logits, labels[idx])
                student.learn(loss, logits, labels[idx], loss.detach(), loss.new_zeros(()), step)
            seconds = student.end_epoch()["train_seconds"]
    finally:
        torch.set_num_threads(previous)
    return seconds


def main() -> None:
    p = parser("scaling", __doc__)
    p.add_argument("--students", type=int, default=2, help="K (default 2)")
    p.add_argument("--arch", default="resnet20")
    p.add_argument("--train-images", type=int, default=1024, help="per epoch (default 1024: 8 steps)")
    p.add_argument("--epochs", type=int, default=1,
                   help="the last one is timed (default 1: every actor's first steps, in a fresh "
                        "process, count against ray)")
    p.add_argument("--rounds", type=int, default=3, help="interleaved repetitions (default 3)")
    args = p.parse_args()
    if args.quick:
        args.train_images, args.rounds = 512, 1
    started = time.perf_counter()
    from cohort.data import load_dataset

    cores = os.cpu_count() or 1
    ray = start_ray(num_cpus=cores)
    data = load_dataset("synthetic", synthetic_samples=(args.train_images, 256),
                        synthetic_shape=(3, 32, 32), synthetic_classes=100)
    all_threads = torch.get_num_threads()
    names = {"ray": f"ray: {args.students} actors",
             "seq": f"sequential, {all_threads} threads",
             "seq1": "sequential, 1 thread",
             "alone": "one student alone, 1 thread"}
    seconds = {k: [] for k in names}
    loads = []
    with tempfile.TemporaryDirectory(prefix="bench-scaling-") as tmp:
        for rnd in range(args.rounds):
            seconds["ray"].append(run_ray_variant(args, data, Path(tmp) / f"ray{rnd}"))
            seconds["seq"].append(run_local_variant(args, data, Path(tmp) / f"seq{rnd}", all_threads))
            seconds["seq1"].append(run_local_variant(args, data, Path(tmp) / f"seq1-{rnd}", 1))
            seconds["alone"].append(alone_variant(args, data))
            loads.append(round(os.getloadavg()[0], 2))
            print(f"round {rnd + 1}/{args.rounds}: " + ", ".join(
                f"{k} {v[-1]:.1f}s" for k, v in seconds.items()) + f" (load {loads[-1]})", flush=True)
    ray.shutdown()
    steps = args.train_images // B
    med = {k: median(v) for k, v in seconds.items()}
    rows = [{"variant": names[k], "epoch_train_s": med[k], "step_ms": 1e3 * med[k] / steps,
             "min_s": min(seconds[k]), "max_s": max(seconds[k]),
             "vs_ray": med[k] / med["ray"]} for k in names]
    print(table(rows, ["variant", "epoch_train_s", "step_ms", "min_s", "max_s", "vs_ray"],
                f"DML K={args.students} {args.arch}, {steps} steps of batch {B} (last of {args.epochs} "
                f"epochs), median of {args.rounds} interleaved rounds"))
    speedup = med["seq"] / med["ray"]
    speedup1 = med["seq1"] / med["ray"]
    over_alone = med["ray"] / med["alone"]
    print(f"\nsequential on one core (one device, as the public code: one GPU there, one core here) / ray"
          f" = {speedup1:.2f}x (target >= 1.7x: {'met' if speedup1 >= 1.7 else 'MISSED'})")
    print(f"sequential on all {all_threads} threads / ray = {speedup:.2f}x (target >= 1.7x: "
          f"{'met' if speedup >= 1.7 else 'MISSED'})")
    print(f"cohort step / one student alone = {over_alone:.2f}x (ideal 1.0)")
    finish(args, "scaling", {"machine": machine(args.device), "students": args.students,
                             "arch": args.arch, "steps": steps, "rounds": args.rounds,
                             "seconds": seconds, "rows": rows,
                             "loadavg_1m_after_rounds": loads,
                             "sequential_over_ray": speedup, "sequential_1thread_over_ray": speedup1,
                             "cohort_step_over_alone": over_alone, "target": 1.7,
                             "met_one_core": speedup1 >= 1.7, "met_all_threads": speedup >= 1.7}, started)


if __name__ == "__main__":
    main()
