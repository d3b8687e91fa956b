"""ONE overhead: Ray Train with 1 worker vs the same loop in this process (no Ray).

Both train the same ONE network (cohort.models.build_one, `--arch` trunk, 3 branches) on the
same synthetic CIFAR-shaped data with the very same loop, `cohort.runtime.network.train`:

* `ray train` - `--runtime ray`, workers=1 (TorchTrainer, one worker with `--threads` CPUs and
                threads, a report every epoch, telemetry, the run directory);
* `local`     - `--runtime local` (a LocalHost: rows and checkpoints written in this process).

So the difference is Ray Train's overhead and nothing else. Timed with stamps the method
itself takes (a One whose `begin_epoch`, `after_step` and `epoch_rows` record the wall
clock): per epoch, the median step time, the evaluation, and the gap from the end of the
evaluation to the next epoch's start (for Ray Train: the report, telemetry, the loop). The
first epoch (warm-up) and the last (shutdown) are not timed. A run's steady epoch is estimated
as steps x (median step) + median eval + median gap: medians of many steps are far steadier on
a shared CPU than epoch wall times (which swing by +-15% here). `--rounds` rounds alternate
the order (ray, local | local, ray); each gives one ratio; reported: the median of the
per-round ratios, their interquartile range (IQR) as the spread, and the margin to the target.
Target: ray train / local <= 1.05.
"""
from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

import torch

from common import compare, describe, finish, info, machine, median, parser, start_ray, table

from cohort.methods.one import One, OneConfig   # noqa: E402


class StampedOne(One):
    """ONE whose rows carry the wall clock of its epoch start, every step's end and its
    evaluation (the stamps are taken where the loop calls the method, on every runtime)."""

    def begin_epoch(self, epoch: int) -> dict:
        self.bench_steps = [time.perf_counter()]
        return {**super().begin_epoch(epoch), "bench_epoch_started": time.time()}

    def after_step(self, model, step: int) -> None:
        super().after_step(model, step)
        self.bench_steps.append(time.perf_counter())

    def epoch_rows(self, model, test, ctx) -> list[dict]:
        started = time.time()
        rows = super().epoch_rows(model, test, ctx)
        steps = [b - a for a, b in zip(self.bench_steps, self.bench_steps[1:])]
        stamps = {"bench_eval_started": started, "bench_eval_done": time.time(),
                  "bench_step_median": median(steps[1:] or steps)}   # step 0 includes the epoch set-up
        return [{**row, **stamps} for row in rows]


def one_config(args, output: Path, runtime: str) -> OneConfig:
    return OneConfig(arch=args.arch, branches=3, dataset="synthetic", epochs=args.epochs,
                     batch_size=128, lr=0.05, schedule="constant", rampup_epochs=0,
                     output=str(output), progress=False, workers=1, checkpoint_every=10_000,
                     cpus_per_worker=float(args.threads), eval_batch_size=256, runtime=runtime,
                     device="cuda" if args.device.startswith("cuda") else "cpu")


def timed_round(args, data, output: Path, runtime: str) -> tuple[dict, float]:
    """One run: ({step, eval, gap, epoch}: medians over the timed epochs), end-to-end seconds."""
    import pyarrow.parquet as pq

    from cohort.runtime import run
    cfg = one_config(args, output, runtime)
    t0 = time.perf_counter()
    run(cfg, data, method=StampedOne(cfg))
    wall = time.perf_counter() - t0
    rows = {r["epoch"]: r for r in pq.read_table(output / "metrics.parquet").to_pylist()
            if r["member"] == "branch0"}
    epochs = [rows[e] for e in sorted(rows)]
    timed = list(zip(epochs[1:-1], epochs[2:]))   # (epoch e, epoch e + 1) for e = 1 .. E-2
    step = median([a["bench_step_median"] for a, _ in timed])
    evaluation = median([a["bench_eval_done"] - a["bench_eval_started"] for a, _ in timed])
    gap = median([b["bench_epoch_started"] - a["bench_eval_done"] for a, b in timed])
    steps = args.train_images // 128
    return {"step": step, "eval": evaluation, "gap": gap,
            "epoch": steps * step + evaluation + gap}, wall


def main() -> None:
    p = parser("one_overhead", __doc__)
    p.add_argument("--arch", default="resnet20", help="trunk of the ONE network (default resnet20)")
    p.add_argument("--train-images", type=int, default=1536, help="per epoch (default 1536: 12 steps)")
    p.add_argument("--epochs", type=int, default=5,
                   help="per run; epochs 2..E-1 are timed (default 5: three epochs)")
    p.add_argument("--rounds", type=int, default=4, help="interleaved rounds (default 4)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads of both (the worker gets as many CPUs); default 1: on a "
                        "shared CPU, 2-thread timings swing by 2-5x with other processes' load")
    args = p.parse_args()
    if args.quick:
        args.train_images, args.epochs, args.rounds = 256, 3, 2
    if args.epochs < 3:
        p.error("--epochs must be >= 3 (the first and last epochs are not timed)")
    started = time.perf_counter()
    from cohort.data import load_dataset

    ray = start_ray(num_cpus=os.cpu_count())
    data = load_dataset("synthetic", synthetic_samples=(args.train_images, 256),
                        synthetic_shape=(3, 32, 32), synthetic_classes=100)
    threads = args.threads
    torch.set_num_threads(threads)
    parts = {"ray": [], "local": []}          # per round: that run's medians
    walls = {"ray": [], "local": []}
    with tempfile.TemporaryDirectory(prefix="bench-one-") as tmp:
        for rnd in range(args.rounds):
            order = ("ray", "local") if rnd % 2 == 0 else ("local", "ray")   # ABBA: no order bias
            for variant in order:
                part, wall = timed_round(args, data, Path(tmp) / f"{variant}{rnd}", variant)
                parts[variant].append(part)
                walls[variant].append(wall)
            print(f"round {rnd + 1}/{args.rounds} ({', '.join(order)}): steady epoch s ray "
                  f"{parts['ray'][-1]['epoch']:.3f}, local {parts['local'][-1]['epoch']:.3f} "
                  f"(load {os.getloadavg()[0]:.1f})", flush=True)
    ray.shutdown()
    per_round = [r["epoch"] / b["epoch"] for r, b in zip(parts["ray"], parts["local"])]
    step_round = [r["step"] / b["step"] for r, b in zip(parts["ray"], parts["local"])]
    e2e_round = [r / b for r, b in zip(walls["ray"], walls["local"])]
    part = {v: {k: median([x[k] for x in runs]) for k in ("epoch", "step", "eval", "gap")}
            for v, runs in parts.items()}
    comparison = compare("ONE: Ray Train 1 worker / local, per steady epoch", per_round, 1.05, "<=")
    per_step = info("ONE: Ray Train / local, median step", step_round, "(reported)")
    e2e = info("ONE: Ray Train / local, end to end incl. startup", e2e_round, "(reported)")
    ratio = comparison["median"]
    rows = [{"variant": "ray train, 1 worker", **{f"{k}_s": v for k, v in part["ray"].items()},
             "end_to_end_s": median(walls["ray"]), "vs_local": ratio},
            {"variant": f"local, {threads} threads", **{f"{k}_s": v for k, v in part["local"].items()},
             "end_to_end_s": median(walls["local"]), "vs_local": 1.0}]
    steps = args.train_images // 128
    print(table(rows, ["variant", "epoch_s", "step_s", "eval_s", "gap_s", "end_to_end_s", "vs_local"],
                f"ONE ({args.arch} trunk, 3 branches), {steps} steps of batch 128 + eval per epoch, "
                f"epochs 2..{args.epochs - 1} of {args.epochs} timed, {args.rounds} interleaved "
                f"rounds; epoch = steps x median step + eval + gap; vs_local: median of per-round ratios"))
    print()
    for c in (comparison, per_step, e2e):
        print(describe(c))
    finish(args, "one_overhead", {"machine": machine(args.device), "arch": args.arch,
                                  "epochs": args.epochs, "train_images": args.train_images,
                                  "rounds": args.rounds, "parts": parts, "end_to_end_seconds": walls,
                                  "rows": rows, "ratio": ratio, "end_to_end_ratio": e2e["median"],
                                  "target": 1.05, "met": comparison["met"],
                                  "comparisons": [comparison], "info": [per_step, e2e]}, started)


if __name__ == "__main__":
    main()
