"""Cohort scaling: K students as Ray actors vs the same K students one after another in one process.

The same DML cohort (resnet20 on synthetic CIFAR-shaped 3x32x32 data, 100 classes, batch 128,
same seed, same steps) trained by

* `ray`                  - cohort.ray.actors.run_ray: one actor per student, the machine's CPUs shared
                           out (on 2 cores and K = 2: one core and one thread each);
* `sequential`           - cohort.runtime.local.run_cohort: every student in this process, one after
                           another each step (as the public DML code does), torch using all cores;
* `sequential, 1 thread` - the same with one thread: the resources of one actor;
* `one student alone`    - a single student (cross-entropy only) in this process, one thread.

Each variant trains `--epochs` epochs of `--train-images` images (default 3 x 8 steps). Timed:
the training part of every epoch but the first (`train_seconds` in metrics.parquet, the
slowest member's, summed: by default 16 warm steps), so Ray startup, actor creation,
evaluation and the fresh processes' cold first steps are excluded; the first epoch is timed
separately and reported as the cold-start ratio. The variants run interleaved in `--rounds`
rounds, in the listed order in even rounds and reversed in odd ones; each round gives one
ratio per comparison. Reported: the median of the per-round ratios with their interquartile
range (IQR) as the spread, the margin to the target and whether the spread is smaller.
Targets: sequential / ray >= 1.7x on 2 cores with K = 2 (against one core, as the public code
runs on one device; and against all cores). Cohort step / one student alone is reported.
"""
from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from common import compare, describe, finish, info, machine, median, parser, start_ray, table

B = 128


def cohort_config(args, output: Path, students: int):
    from cohort.methods import config_class
    return config_class("dml")(students=students, archs=[args.arch], dataset="synthetic",
                        epochs=args.epochs, batch_size=B, lr=0.05, schedule="constant",
                        output=str(output), progress=False, checkpoint_every=10_000,
                        eval_batch_size=256,
                        device="cuda" if args.device.startswith("cuda") else "cpu")


def epoch_train_seconds(output: Path) -> list[float]:
    """Per epoch, the wall time of its training: the slowest member's train_seconds."""
    import pyarrow.parquet as pq
    rows = pq.read_table(output / "metrics.parquet").to_pylist()
    epochs = sorted({r["epoch"] for r in rows})
    return [max(r["train_seconds"] for r in rows if r["epoch"] == e and r["member"] != "ensemble")
            for e in epochs]


def run_ray_variant(args, data, output):
    from cohort.ray.actors import run_ray
    run_ray(cohort_config(args, output, args.students), data)
    return epoch_train_seconds(output)


def run_local_variant(args, data, output, threads: int):
    from cohort.runtime.local import run_cohort
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        run_cohort(cohort_config(args, output, args.students), data)
    finally:
        torch.set_num_threads(previous)
    return epoch_train_seconds(output)


def alone_variant(args, data, threads: int = 1) -> list[float]:
    """One student, the same epochs and steps, no peers (cross-entropy only): per epoch."""
    from cohort.data import epoch_batches
    from cohort.step import StepLoss
    from cohort.student import DataSpec, Student, resolve_device
    cfg = cohort_config(args, Path("unused"), args.students)
    device = resolve_device(cfg.device)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    seconds = []
    try:
        student = Student(0, args.arch, cfg, DataSpec.of(data), device)
        images, labels = data.train_images.to(device), data.train_labels.to(device)
        for epoch in range(args.epochs):
            student.begin_epoch(epoch)
            for step, idx in enumerate(epoch_batches(data.num_train, B, cfg.seed, epoch)):
                idx = idx.to(device)
                logits = student.forward(images[idx], step)
                loss = StepLoss({"ce": F.cross_entropy(logits, labels[idx])})
                student.learn(loss, logits, labels[idx], step)
            seconds.append(student.end_epoch()["train_seconds"])
    finally:
        torch.set_num_threads(previous)
    return seconds


def main() -> None:
    p = parser("scaling", __doc__)
    p.add_argument("--students", type=int, default=2, help="K (default 2)")
    p.add_argument("--arch", default="resnet20")
    p.add_argument("--train-images", type=int, default=1024, help="per epoch (default 1024: 8 steps)")
    p.add_argument("--epochs", type=int, default=3,
                   help="per run; all but the first are timed (default 3: 16 warm steps)")
    p.add_argument("--rounds", type=int, default=4, help="interleaved rounds (default 4)")
    args = p.parse_args()
    if args.quick:
        args.train_images, args.epochs, args.rounds = 256, 2, 2
    if args.epochs < 2:
        p.error("--epochs must be >= 2 (the first epoch is the cold start, timed separately)")
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
    epochs_s = {k: [] for k in names}          # per round: per epoch seconds
    loads = []
    with tempfile.TemporaryDirectory(prefix="bench-scaling-") as tmp:
        for rnd in range(args.rounds):
            order = list(names) if rnd % 2 == 0 else list(names)[::-1]
            for k in order:
                out = Path(tmp) / f"{k}{rnd}"
                if k == "ray":
                    epochs_s[k].append(run_ray_variant(args, data, out))
                elif k == "alone":
                    epochs_s[k].append(alone_variant(args, data))
                else:
                    epochs_s[k].append(run_local_variant(args, data, out,
                                                         all_threads if k == "seq" else 1))
            loads.append(round(os.getloadavg()[0], 2))
            print(f"round {rnd + 1}/{args.rounds} ({', '.join(order)}): warm epochs " + ", ".join(
                f"{k} {sum(v[-1][1:]):.1f}s" for k, v in epochs_s.items())
                + f" (load {loads[-1]})", flush=True)
    ray.shutdown()
    warm = {k: [sum(e[1:]) for e in v] for k, v in epochs_s.items()}
    cold = {k: [e[0] for e in v] for k, v in epochs_s.items()}
    per_epoch = args.train_images // B
    steps = per_epoch * (args.epochs - 1)

    def ratios(num, den, source=warm):
        return [a / b for a, b in zip(source[num], source[den])]

    rows = [{"variant": names[k], "warm_train_s": median(warm[k]),
             "step_ms": 1e3 * median(warm[k]) / steps, "min_s": min(warm[k]), "max_s": max(warm[k]),
             "cold_epoch_s": median(cold[k]), "vs_ray": median(ratios(k, "ray"))} for k in names]
    print(table(rows, ["variant", "warm_train_s", "step_ms", "min_s", "max_s", "cold_epoch_s", "vs_ray"],
                f"DML K={args.students} {args.arch}: {steps} warm steps of batch {B} timed per run "
                f"(epochs 2..{args.epochs} of {per_epoch} steps), {args.rounds} interleaved rounds; "
                f"vs_ray: median of per-round ratios"))
    comparisons = [
        compare(f"scaling K={args.students}: sequential on one core / actors (warm)",
                ratios("seq1", "ray"), 1.7, ">="),
        compare(f"scaling K={args.students}: sequential on all cores / actors (warm)",
                ratios("seq", "ray"), 1.7, ">="),
        compare(f"scaling K={args.students}: sequential on one core / actors (first epoch, cold)",
                ratios("seq1", "ray", cold), 1.7, ">="),
    ]
    infos = [info("scaling: cohort step / one student alone (warm)", ratios("ray", "alone"),
                  "(1.0 ideal)")]
    print()
    for c in comparisons + infos:
        print(describe(c))
    speedup = median(ratios("seq", "ray"))
    speedup1 = median(ratios("seq1", "ray"))
    finish(args, "scaling", {"machine": machine(args.device), "students": args.students,
                             "arch": args.arch, "epochs": args.epochs, "steps_per_epoch": per_epoch,
                             "timed_steps": steps, "rounds": args.rounds,
                             "epoch_seconds": epochs_s, "rows": rows,
                             "loadavg_1m_after_rounds": loads,
                             "sequential_over_ray": speedup, "sequential_1thread_over_ray": speedup1,
                             "cohort_step_over_alone": infos[0]["median"], "target": 1.7,
                             "met_one_core": speedup1 >= 1.7, "met_all_threads": speedup >= 1.7,
                             "comparisons": comparisons, "info": infos}, started)


if __name__ == "__main__":
    main()
