"""ONE overhead: Ray Train with 1 worker vs a bare PyTorch loop over the same model and data.

Both train the same ONE network (cohort.models.build_one, `--arch` trunk, 3 branches) on the
same synthetic CIFAR-shaped data with the same steps: sample order, batched augmentation,
`OneTask.loss`, SGD, and after each epoch `OneTask.epoch_rows` (the test-set evaluation).

* `ray train` - cohort.one.run_one with workers=1 (TorchTrainer, one worker with `--threads`
                CPUs and threads, reports every epoch, run directory, a checkpoint at the end);
* `bare loop` - the same calls in a plain loop in this process, with as many threads.

Timed (steady state): from the start of epoch e to the start of epoch e+1, for every epoch but
the first (warm-up) and the last (final checkpoint, shutdown) - so each interval holds the
training steps, the evaluation, and for Ray Train its report and whatever happens between
epochs. The epoch starts are stamped by the task itself (a OneTask whose `begin_epoch` also
returns the wall clock). Per run the timed intervals are summed: by default epochs 2-4 of 5,
3 x 6 = 18 training steps and 3 evaluations. Also shown: end-to-end wall time including Ray
Train's startup. `--rounds` rounds alternate the order (ray, bare | bare, ray); each round
gives one ratio (ray's timed sum over bare's); reported: the median of the per-round ratios,
their interquartile range (IQR) as the spread, and the margin to the target.
Target: ray train / bare loop <= 1.05.
"""
from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

import torch

from common import compare, describe, finish, info, machine, median, parser, start_ray, table

from cohort.one import OneTask   # noqa: E402


class StampedOneTask(OneTask):
    """OneTask whose per-epoch settings include the wall clock at the start of the epoch."""

    def begin_epoch(self, epoch: int) -> dict:
        return {**super().begin_epoch(epoch), "bench_epoch_started": time.time()}

    def epoch_rows(self, model, test, ctx) -> list[dict]:
        started = time.time()
        rows = super().epoch_rows(model, test, ctx)
        stamps = {"bench_eval_started": started, "bench_eval_done": time.time()}
        return [{**row, **stamps} for row in rows]


def one_config(args, output: Path):
    from cohort.one import OneConfig
    return OneConfig(arch=args.arch, branches=3, dataset="synthetic", epochs=args.epochs,
                     batch_size=128, lr=0.05, schedule="constant", rampup_epochs=0,
                     output=str(output), progress=False, workers=1, checkpoint_every=10_000,
                     cpus_per_worker=float(args.threads),
                     eval_batch_size=256,
                     device="cuda" if args.device.startswith("cuda") else "cpu")


def phases(stamps: list[tuple[float, float, float]]) -> list[dict]:
    """Per epoch (not the first, not the last): the epoch-start-to-epoch-start interval and its
    parts: training steps, evaluation, and what lies between the end of the evaluation and the
    next epoch's start (for Ray Train: building the report, ray.train.report, the loop)."""
    out = []
    for (start, eval_start, eval_done), (next_start, _, _) in zip(stamps[1:-1], stamps[2:]):
        out.append({"epoch": next_start - start, "train": eval_start - start,
                    "eval": eval_done - eval_start, "between": next_start - eval_done})
    return out


def ray_train_round(args, data, output: Path) -> tuple[list[float], float, float]:
    import pyarrow.parquet as pq

    from cohort.one import run_one
    cfg = one_config(args, output)
    t0 = time.perf_counter()
    run_one(cfg, data, task=StampedOneTask(cfg))
    wall = time.perf_counter() - t0
    rows = pq.read_table(output / "metrics.parquet").to_pylist()
    stamps = sorted({r["epoch"]: (r["bench_epoch_started"], r["bench_eval_started"],
                                  r["bench_eval_done"]) for r in rows}.items())
    ips = [r["images_per_second"] for r in rows if r["member"] == "branch0" and r["epoch"] >= 1]
    return phases([s for _, s in stamps]), wall, median(ips)


def bare_round(args, data) -> tuple[list[float], float, float]:
    """The same work as _worker_loop with one worker, in a plain loop."""
    import math

    from cohort.data import augment_batch, derive_seed, epoch_batches
    from cohort.optim import learning_rate, make_optimizer, set_learning_rate
    from cohort.student import VIEW_STREAM, DataSpec, resolve_device
    from cohort.task import EpochContext, EvalSet

    cfg = one_config(args, Path("unused"))
    t0 = time.perf_counter()
    task = StampedOneTask(cfg)
    device = resolve_device(cfg.device)
    spec = DataSpec.of(data, cfg.crop_padding)
    model = task.build_model(spec).to(device)
    task.setup(spec, device)
    optimizer = make_optimizer(model.parameters(), cfg.lr, cfg.momentum, cfg.weight_decay, cfg.nesterov)
    images, labels = data.train_images.to(device), data.train_labels.to(device)
    test = EvalSet(data.test_images, data.test_labels, spec, device, cfg.eval_batch_size)
    stamps, ips = [], []
    for epoch in range(cfg.epochs):
        started = time.perf_counter()
        lr = learning_rate(cfg.lr, cfg.schedule, epoch, cfg.epochs, cfg.milestones, cfg.gamma)
        set_learning_rate(optimizer, lr)
        settings = task.begin_epoch(epoch)
        model.train()
        sums, names = None, None
        batches = epoch_batches(data.num_train, cfg.batch_size, cfg.seed, epoch)
        for step, idx in enumerate(batches):
            idx = idx.to(device)
            seed = derive_seed(cfg.seed, VIEW_STREAM, 0, epoch, step)
            views = augment_batch(images[idx], seed=seed, padding=spec.crop_padding,
                                  mean=spec.mean, std=spec.std)
            loss, stats = task.loss(model, views, labels[idx])
            if not math.isfinite(loss.item()):
                raise RuntimeError("diverged")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if names is None:
                names = sorted(stats)
                sums = torch.zeros(len(names) + 1, dtype=torch.float64, device=device)
            sums += torch.stack([stats[n].detach().double() for n in names]
                                + [torch.ones((), dtype=torch.float64, device=device)]) * len(idx)
        samples = max(sums[-1].item(), 1.0)
        train = {n: v / samples for n, v in zip(names, sums[:-1].tolist())}
        if epoch >= 1:
            ips.append(samples / (time.perf_counter() - started))
        model.eval()
        with torch.no_grad():
            rows = task.epoch_rows(model, test, EpochContext(epoch, lr, train, settings))
        model.train()
        stamps.append((settings["bench_epoch_started"], rows[0]["bench_eval_started"],
                       rows[0]["bench_eval_done"]))
    return phases(stamps), time.perf_counter() - t0, median(ips)


def main() -> None:
    p = parser("one_overhead", __doc__)
    p.add_argument("--arch", default="resnet20", help="trunk of the ONE network (default resnet20)")
    p.add_argument("--train-images", type=int, default=768, help="per epoch (default 768: 6 steps)")
    p.add_argument("--epochs", type=int, default=5,
                   help="per run; epochs 2..E-1 are timed (default 5: three intervals, 18 steps)")
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
    epoch_s = {"ray": [], "bare": []}        # per round: that run's timed intervals
    walls = {"ray": [], "bare": []}
    train_ips = {"ray": [], "bare": []}
    with tempfile.TemporaryDirectory(prefix="bench-one-") as tmp:
        for rnd in range(args.rounds):
            order = ("ray", "bare") if rnd % 2 == 0 else ("bare", "ray")   # ABBA: no order bias
            for variant in order:
                if variant == "ray":
                    iv, wall, ips = ray_train_round(args, data, Path(tmp) / f"one{rnd}")
                else:
                    iv, wall, ips = bare_round(args, data)
                epoch_s[variant].append(iv)
                walls[variant].append(wall)
                train_ips[variant].append(ips)
            print(f"round {rnd + 1}/{args.rounds} ({', '.join(order)}): epoch s ray "
                  f"{[round(x['epoch'], 2) for x in epoch_s['ray'][-1]]}, bare "
                  f"{[round(x['epoch'], 2) for x in epoch_s['bare'][-1]]} "
                  f"(load {os.getloadavg()[0]:.1f})", flush=True)
    ray.shutdown()
    timed = {v: [sum(x["epoch"] for x in run) for run in runs] for v, runs in epoch_s.items()}
    per_round = [r / b for r, b in zip(timed["ray"], timed["bare"])]
    e2e_round = [r / b for r, b in zip(walls["ray"], walls["bare"])]
    part = {v: {k: median([x[k] for run in epoch_s[v] for x in run])
                for k in ("epoch", "train", "eval", "between")} for v in epoch_s}
    comparison = compare("ONE: Ray Train 1 worker / bare loop, per epoch", per_round, 1.05, "<=")
    e2e = info("ONE: Ray Train / bare loop, end to end incl. startup", e2e_round, "(reported)")
    ratio = comparison["median"]
    rows = [{"variant": "ray train, 1 worker", **{f"{k}_s": v for k, v in part["ray"].items()},
             "train_images_per_s": median(train_ips["ray"]), "end_to_end_s": median(walls["ray"]),
             "vs_bare": ratio},
            {"variant": f"bare loop, {threads} threads", **{f"{k}_s": v for k, v in part["bare"].items()},
             "train_images_per_s": median(train_ips["bare"]), "end_to_end_s": median(walls["bare"]),
             "vs_bare": 1.0}]
    steps = args.train_images // 128
    print(table(rows, ["variant", "epoch_s", "train_s", "eval_s", "between_s", "train_images_per_s",
                       "end_to_end_s", "vs_bare"],
                f"ONE ({args.arch} trunk, 3 branches), {steps} steps of batch 128 + eval per epoch, "
                f"epochs 2..{args.epochs - 1} of {args.epochs} timed ({(args.epochs - 2) * steps} "
                f"steps per run), {args.rounds} interleaved rounds; parts: medians per epoch; "
                f"vs_bare: median of per-round ratios"))
    print()
    for c in (comparison, e2e):
        print(describe(c))
    finish(args, "one_overhead", {"machine": machine(args.device), "arch": args.arch,
                                  "epochs": args.epochs, "train_images": args.train_images,
                                  "timed_steps_per_run": (args.epochs - 2) * steps,
                                  "rounds": args.rounds,
                                  "epoch_seconds": epoch_s, "end_to_end_seconds": walls,
                                  "train_images_per_second": train_ips, "rows": rows,
                                  "ratio": ratio, "end_to_end_ratio": e2e["median"], "target": 1.05,
                                  "met": comparison["met"], "comparisons": [comparison],
                                  "info": [e2e]}, started)


if __name__ == "__main__":
    main()
