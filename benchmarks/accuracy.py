"""Accuracy table: every method against independent training of the same architecture with
the same budget, on real images (Fashion-MNIST), several seeds.

    python benchmarks/accuracy.py [--train-images 3000] [--epochs 4] [--seeds 0,1,2] [--jobs 2]
                                  [--device cuda --full] [--quick] [--out FILE.json]

Every run uses the same data (a fixed slice of Fashion-MNIST's training set after 10% of it
is held out as validation, and a fixed slice of its test set), the same budget (epochs, batch 64, SGD 0.9,
lr 0.1 cosine, wd 5e-4; every other setting the project's default: the plain initialisation
for these shallow nets, flips, PCL's run-length EMA decay) and resnet8 members: two (or four) resnet8 students (independent, DML,
KDCL), a resnet8-based ONE / OKDDip / PCL network, or a resnet8 student distilled from a
resnet20 teacher (KD) or through a resnet14 assistant (TAKD), each stage with that budget.
Multi-branch methods ramp their KD weight over their papers' share of the run (80 of 300
epochs: the first epoch here).
Reported per method and seed: the final test accuracy of the best and the mean single member
(students, branches, the distilled student) and of the ensemble or aggregate; summarised as
mean ± std over seeds, with the gain of the mean member over independent training's. Nothing
is chosen on the test set: every number is the final epoch's.

Default budget (CPU, this repository's 2-core machine, under an hour): 3,000 training
images, the first 5,000 test images, 4 epochs, 3 seeds, 2 runs at a time, one thread each;
`--full` (for a GPU machine) trains on all 54,000 training images and tests on all 10,000,
for 30 epochs. Results: benchmarks/results/accuracy.json and accuracy.png, and a Markdown table.
"""
from __future__ import annotations

import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from common import finish, machine, out_path, parser

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# name -> (method, settings beyond the common budget)
RUNS = {
    "independent (2 x resnet8)": ("independent", {"students": 2}),
    "DML (K=2)": ("dml", {"students": 2}),
    "DML (K=4)": ("dml", {"students": 4}),
    "KDCL naive (K=2)": ("kdcl", {"students": 2, "variant": "naive"}),
    "KDCL linear (K=2)": ("kdcl", {"students": 2, "variant": "linear"}),
    "KDCL minlogit (K=2)": ("kdcl", {"students": 2, "variant": "minlogit"}),
    "KDCL general (K=2)": ("kdcl", {"students": 2, "variant": "general"}),
    "ONE (3 branches)": ("one", {"branches": 3}),
    "OKDDip (3 peers + leader)": ("okddip", {"branches": 4}),
    "PCL (3 branches)": ("pcl", {"branches": 3}),
    "KD (resnet20 -> resnet8)": ("kd", {"teacher": "resnet20", "student": "resnet8"}),
    "TAKD (resnet20 -> resnet14 -> resnet8)": ("takd", {"chain": ["resnet20", "resnet14", "resnet8"]}),
}
BASELINE = "independent (2 x resnet8)"


def config(method: str, extra: dict, args, seed: int, output: Path):
    from cohort import methods
    cls = methods.get(method).Config
    budget = dict(dataset="fashion-mnist", epochs=args.epochs, batch_size=64, lr=0.1,
                  momentum=0.9, weight_decay=5e-4, schedule="cosine", val_fraction=0.1, seed=seed,
                  output=str(output), overwrite=True, progress=False, runtime="local",
                  device=args.device)
    if method in ("independent", "dml", "kdcl"):
        budget["archs"] = ["resnet8"]
    if method in ("one", "okddip", "pcl"):
        budget["arch"] = "resnet8"
    return cls(**budget, **extra)


def singles_and_ensemble(method: str, summary: dict) -> tuple[list[float], float | None]:
    """Final test accuracies of the single members, and of the ensemble/aggregate."""
    members = summary["members"]
    if method in ("kd", "takd"):
        return [summary["stages"][-1]["test_acc"]], None
    singles = [e["final_test_acc"] for m, e in members.items()
               if m.startswith("student") or (m.startswith("branch"))]
    ensemble = members.get("ensemble", {}).get("final_test_acc")
    return singles, ensemble


def one_run(job: tuple) -> dict:
    label, seed, args_dict, out = job
    import argparse

    import torch
    torch.set_num_threads(1)
    from cohort.data import load_dataset
    from cohort.runtime import run

    args = argparse.Namespace(**args_dict)
    data = subset(load_dataset("fashion-mnist", val_fraction=0.1, seed=seed), args.train_images,
                  args.test_images)
    method, extra = RUNS[label]
    started = time.perf_counter()
    summary = run(config(method, extra, args, seed, Path(out)), data)
    singles, ensemble = singles_and_ensemble(method, summary)
    return {"label": label, "method": method, "seed": seed, "singles": singles,
            "best": max(singles), "mean": statistics.fmean(singles), "ensemble": ensemble,
            "seconds": time.perf_counter() - started}


def subset(dataset, train_images: int, test_images: int):
    """The first `train_images` training and `test_images` test images (0: all; the
    validation split is kept): the same slices for every method of a seed."""
    import dataclasses
    train = train_images if 0 < train_images < len(dataset.train_images) else len(dataset.train_images)
    test = test_images if 0 < test_images < len(dataset.test_images) else len(dataset.test_images)
    return dataclasses.replace(dataset, train_images=dataset.train_images[:train],
                               train_labels=dataset.train_labels[:train],
                               test_images=dataset.test_images[:test],
                               test_labels=dataset.test_labels[:test])


def summarise(results: list[dict]) -> list[dict]:
    def stats(values):
        values = [v for v in values if v is not None]
        if not values:
            return None, None
        return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)

    base = stats([r["mean"] for r in results if r["label"] == BASELINE])[0]
    table = []
    for label in RUNS:
        mine = [r for r in results if r["label"] == label]
        if not mine:
            continue
        row = {"method": label, "seeds": sorted(r["seed"] for r in mine)}
        for key in ("best", "mean", "ensemble"):
            row[key], row[f"{key}_std"] = stats([r[key] for r in mine])
        row["gain_mean_member"] = None if base is None else row["mean"] - base
        row["seconds"] = statistics.fmean(r["seconds"] for r in mine)
        table.append(row)
    return table


def markdown(table: list[dict]) -> str:
    def cell(mean, std):
        return "–" if mean is None else f"{mean:.2f} ± {std:.2f}"
    lines = ["| method | best member | mean member | ensemble / aggregate | gain of mean member over independent |",
             "|---|---:|---:|---:|---:|"]
    for r in table:
        gain = "–" if r["gain_mean_member"] is None else f"{r['gain_mean_member']:+.2f}"
        lines.append(f"| {r['method']} | {cell(r['best'], r['best_std'])} | "
                     f"{cell(r['mean'], r['mean_std'])} | {cell(r['ensemble'], r['ensemble_std'])} | {gain} |")
    return "\n".join(lines)


def plot(table: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(10, 4.5))
    xs = range(len(table))
    ax.bar([x - 0.2 for x in xs], [r["mean"] for r in table], 0.4, yerr=[r["mean_std"] for r in table],
           label="mean member")
    ax.bar([x + 0.2 for x in xs], [r["ensemble"] or 0 for r in table], 0.4,
           yerr=[r["ensemble_std"] or 0 for r in table], label="ensemble / aggregate")
    ax.set_xticks(list(xs), [r["method"] for r in table], rotation=35, ha="right", fontsize=8)
    low = min(r["mean"] for r in table) - 5
    ax.set_ylim(max(0, low), 100)
    ax.set_ylabel("final test accuracy (%)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    p = parser("accuracy", __doc__)
    p.add_argument("--train-images", type=int, default=3000, help="training images (0: all 60,000)")
    p.add_argument("--test-images", type=int, default=5000,
                   help="test images evaluated every epoch (0: all 10,000)")
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--jobs", type=int, default=2, help="runs at a time (one thread each)")
    p.add_argument("--full", action="store_true", help="all 60,000 images, 30 epochs (a GPU machine)")
    p.add_argument("--only", default="", help="comma list of method labels' prefixes (default: all)")
    args = p.parse_args()
    if args.quick:
        args.train_images, args.test_images, args.epochs, args.seeds = 512, 1000, 1, "0"
    if args.full:
        args.train_images, args.test_images, args.epochs = 0, 0, 30
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    labels = [l for l in RUNS if not args.only or any(l.startswith(o.strip()) for o in args.only.split(","))]
    started = time.perf_counter()
    import tempfile
    with tempfile.TemporaryDirectory(prefix="bench-accuracy-") as tmp:
        jobs = [(label, seed, {k: v for k, v in vars(args).items()}, str(Path(tmp) / f"{i}"))
                for i, (seed, label) in enumerate((s, l) for s in seeds for l in labels)]
        results = []
        with ProcessPoolExecutor(max_workers=args.jobs) as pool:
            for result in pool.map(one_run, jobs):
                results.append(result)
                print(f"{result['label']} seed {result['seed']}: best {result['best']:.2f} mean "
                      f"{result['mean']:.2f} ensemble {result['ensemble']} ({result['seconds']:.0f}s)",
                      flush=True)
    table = summarise(results)
    text = markdown(table)
    print(text)
    payload = {"machine": machine(args.device), "dataset": "fashion-mnist",
               "train_images": args.train_images or 54000, "test_images": args.test_images or 10000,
               "val_fraction": 0.1,
               "epochs": args.epochs, "seeds": seeds, "batch_size": 64, "lr": 0.1,
               "schedule": "cosine", "results": results, "table": table, "markdown": text}
    finish(args, "accuracy", payload, started)
    plot(table, out_path(args, "accuracy").with_suffix(".png"))


if __name__ == "__main__":
    main()
