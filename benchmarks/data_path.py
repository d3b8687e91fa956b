"""Data path: images/s of cohort's batched uint8 augmentation vs torchvision DataLoader + PIL.

Both produce the same thing for every batch of an epoch: B normalised float32 views of
CIFAR-shaped uint8 images, each randomly cropped (zero padding 4) and flipped.

* cohort: the dataset is one uint8 tensor on the device; a batch is `images[idx]` followed
  by `cohort.data.augment_batch` (one batched gather, no per-image Python).
* torchvision: a map-style Dataset that makes a PIL image per sample and applies
  RandomCrop(32, padding=4), RandomHorizontalFlip, ToTensor, Normalize; a DataLoader
  collates (num_workers 0, and one worker per core), then the batch goes to the device.

Variants run interleaved in rounds of one epoch each (listed order in even rounds, reversed in
odd ones); round 0 is a warm-up. Each round gives one ratio: the best cohort variant over the
best torchvision variant in that round (each side in its best setting), and one core each
(1 thread vs num_workers=0). Reported: the median of the per-round ratios with their
interquartile range (IQR) as the spread, and the margin to the target. Target: >= 5x.
"""
from __future__ import annotations

import os
import time

import numpy as np
import torch

from common import compare, describe, finish, machine, median, parser, table

BATCH = 128
PADDING = 4


def cohort_epoch(images: torch.Tensor, mean, std, epoch: int, device) -> int:
    from cohort.data import augment_batch, derive_seed, epoch_batches
    seen = 0
    for step, idx in enumerate(epoch_batches(len(images), BATCH, 0, epoch)):
        views = augment_batch(images[idx.to(device)], seed=derive_seed(0, epoch, step),
                              padding=PADDING, mean=mean, std=std)
        seen += views.shape[0]
    if device.type == "cuda":
        torch.cuda.synchronize()
    return seen


class PILDataset(torch.utils.data.Dataset):
    """What torchvision.datasets.CIFAR10 does per sample: HWC uint8 -> PIL -> transforms."""

    def __init__(self, hwc: np.ndarray, labels: np.ndarray, transform):
        self.hwc, self.labels, self.transform = hwc, labels, transform

    def __len__(self):
        return len(self.hwc)

    def __getitem__(self, i):
        from PIL import Image
        return self.transform(Image.fromarray(self.hwc[i])), int(self.labels[i])


def torchvision_loader(hwc, labels, mean, std, workers: int):
    from torchvision import transforms as T
    transform = T.Compose([T.RandomCrop(32, padding=PADDING), T.RandomHorizontalFlip(), T.ToTensor(),
                           T.Normalize(mean, std)])
    return torch.utils.data.DataLoader(PILDataset(hwc, labels, transform), batch_size=BATCH,
                                       shuffle=True, drop_last=True, num_workers=workers,
                                       persistent_workers=workers > 0)


def torchvision_epoch(loader, device) -> int:
    seen = 0
    for views, _ in loader:
        views = views.to(device, non_blocking=True)
        seen += views.shape[0]
    if device.type == "cuda":
        torch.cuda.synchronize()
    return seen


def main() -> None:
    p = parser("data_path", __doc__)
    p.add_argument("--rounds", type=int, default=7, help="interleaved rounds after a warm-up (default 7)")
    args = p.parse_args()
    started = time.perf_counter()
    from cohort.data import load_dataset

    device = torch.device(args.device)
    n = 4096 if args.quick else 10240
    reps = min(args.rounds, 3) if args.quick else args.rounds
    data = load_dataset("synthetic", synthetic_samples=(n, 128), synthetic_shape=(3, 32, 32),
                        synthetic_classes=100)
    images = data.train_images.to(device)
    hwc = np.ascontiguousarray(data.train_images.permute(0, 2, 3, 1).numpy())
    labels = data.train_labels.numpy()
    cores = os.cpu_count() or 1
    all_threads = torch.get_num_threads()

    def with_threads(threads, fn):
        def run(epoch):
            torch.set_num_threads(threads)
            try:
                return fn(epoch)
            finally:
                torch.set_num_threads(all_threads)
        return run

    loaders = {w: torchvision_loader(hwc, labels, data.mean, data.std, w) for w in (0, cores)}
    variants = {
        f"cohort augment_batch ({all_threads} threads)":
            lambda e: cohort_epoch(images, data.mean, data.std, e, device),
        "cohort augment_batch (1 thread)":
            with_threads(1, lambda e: cohort_epoch(images, data.mean, data.std, e, device)),
        "torchvision DataLoader+PIL (num_workers=0)": lambda e: torchvision_epoch(loaders[0], device),
        f"torchvision DataLoader+PIL (num_workers={cores})":
            lambda e: torchvision_epoch(loaders[cores], device),
    }
    rates: dict[str, list[float]] = {k: [] for k in variants}
    for rep in range(reps + 1):               # rep 0 warms up (and starts the workers)
        order = list(variants) if rep % 2 == 0 else list(variants)[::-1]
        for name in order:
            t0 = time.perf_counter()
            seen = variants[name](rep)
            if rep:
                rates[name].append(seen / (time.perf_counter() - t0))
    rows = [{"variant": k, "images_per_s": median(v), "min": min(v), "max": max(v)}
            for k, v in rates.items()]
    ours = [k for k in variants if k.startswith("cohort")]
    theirs = [k for k in variants if k.startswith("torchvision")]
    best_round = [max(rates[k][r] for k in ours) / max(rates[k][r] for k in theirs)
                  for r in range(reps)]
    one_core = [rates["cohort augment_batch (1 thread)"][r]
                / rates["torchvision DataLoader+PIL (num_workers=0)"][r] for r in range(reps)]
    tv_best = max(median(rates[k]) for k in theirs)
    for r in rows:
        r["vs_best_torchvision"] = r["images_per_s"] / tv_best
    print(table(rows, ["variant", "images_per_s", "min", "max", "vs_best_torchvision"],
                f"data path, {n} images 3x32x32, batch {BATCH}, {reps} interleaved rounds "
                f"(images/s: medians)"))
    comparisons = [compare("data path: best cohort / best torchvision", best_round, 5.0, ">=")]
    one_core_c = [compare("data path: one core each (1 thread / num_workers=0)", one_core, 5.0, ">=")]
    print()
    comparisons += one_core_c
    for c in comparisons:
        print(describe(c))
    ratio, single = comparisons[0]["median"], comparisons[1]["median"]
    finish(args, "data_path", {"machine": machine(args.device), "images": n, "batch": BATCH,
                               "repetitions": reps, "rows": rows, "rates": rates,
                               "ratio_vs_best_torchvision": ratio, "ratio_one_core": single,
                               "target": 5.0, "met": ratio >= 5,
                               "comparisons": comparisons}, started)


if __name__ == "__main__":
    main()
