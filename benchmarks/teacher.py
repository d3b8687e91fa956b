"""KDCL teacher: time per step of building the teacher, beside one student's training step.

Per training step KDCL builds one teacher from the K students' logits
(`cohort.losses.kdcl_teacher`); this measures that cost for the per-step variants (naive,
minlogit, linear; general is recomputed once per epoch and left out) for K = 2 and 4 students,
B = 128 and C = 10 and 100 classes, and sets it beside the cost of one student step on the same
device: forward, cross-entropy, backward and an SGD step (momentum 0.9) of resnet32
(`cohort.models.build_model("resnet32", C)`) on a B x 3 x 32 x 32 batch.

The teacher's inputs are float32 logits on the device, z_k = (1 + k/2) * noise + (3 - k/3) *
onehot(y) (fixed seed), detached like the students' logits in a step. Each round times, per C,
`--student-steps` student steps (their median) and, per (variant, K), `--reps` back-to-back
teacher builds (their mean); the order of the two parts alternates between rounds, and a
warm-up pass comes first. On a GPU the device is synchronised before and after each timed
block. Per round one ratio teacher_ms / student_step_ms (shown in percent); reported: medians
over rounds with their interquartile range (IQR). Target (from tests/test_losses.py): the linear teacher for
K = 4, B = 128, C = 100 under 5 ms. On a GPU the JSON also holds the number of host syncs each
variant makes (torch.cuda sync debug mode).
"""
from __future__ import annotations

import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

from common import compare, describe, finish, info, machine, median, parser, spread_stats, table

BATCH = 128
VARIANTS = ("naive", "minlogit", "linear")
STUDENTS = (2, 4)
CLASSES = (10, 100)
TARGET_MS = 5.0   # linear teacher, K=4, B=128, C=100


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def teacher_inputs(k: int, classes: int, device: torch.device) -> tuple[list[torch.Tensor], torch.Tensor]:
    g = torch.Generator().manual_seed(1000 * k + classes)
    y = torch.randint(0, classes, (BATCH,), generator=g)
    onehot = F.one_hot(y, classes).float()
    zs = [(1.0 + 0.5 * i) * torch.randn(BATCH, classes, generator=g) + (3.0 - i / 3) * onehot
          for i in range(k)]
    return [z.to(device) for z in zs], y.to(device)


class StudentStep:
    """One training step of resnet32 on a fixed random batch."""

    def __init__(self, classes: int, device: torch.device):
        from cohort.models import build_model
        g = torch.Generator().manual_seed(classes)
        self.model = build_model("resnet32", classes).to(device).train()
        self.opt = torch.optim.SGD(self.model.parameters(), lr=0.01, momentum=0.9)
        self.x = torch.randn(BATCH, 3, 32, 32, generator=g).to(device)
        self.y = torch.randint(0, classes, (BATCH,), generator=g).to(device)
        self.device = device

    def __call__(self) -> float:
        """Milliseconds of one step."""
        sync(self.device)
        t0 = time.perf_counter()
        self.opt.zero_grad(set_to_none=True)
        F.cross_entropy(self.model(self.x), self.y).backward()
        self.opt.step()
        sync(self.device)
        return (time.perf_counter() - t0) * 1e3


def time_teacher(zs, y, variant: str, reps: int, device: torch.device) -> float:
    """Mean milliseconds of one `kdcl_teacher` call over `reps` back-to-back calls."""
    from cohort.losses import kdcl_teacher
    sync(device)
    t0 = time.perf_counter()
    for _ in range(reps):
        kdcl_teacher(zs, y, variant)
    sync(device)
    return (time.perf_counter() - t0) * 1e3 / reps


def count_host_syncs(zs, y, variant: str) -> int:
    """Host synchronisations of one teacher build (CUDA only), via the sync debug mode."""
    from cohort.losses import kdcl_teacher
    previous = torch.cuda.get_sync_debug_mode()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            kdcl_teacher(zs, y, variant)
        finally:
            torch.cuda.set_sync_debug_mode(previous)
    return sum("synchroniz" in str(w.message).lower() for w in caught)


def main() -> None:
    p = parser("teacher", __doc__)
    p.add_argument("--out-dir", default="",
                   help="write teacher.json into this folder (instead of --out / the default)")
    p.add_argument("--rounds", type=int, default=7, help="timed rounds after a warm-up (default 7)")
    p.add_argument("--reps", type=int, default=20,
                   help="teacher builds per (variant, K, C) and round (default 20)")
    p.add_argument("--student-steps", type=int, default=2,
                   help="student steps per C and round, their median is the round's (default 2)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads of both parts (default 1: on a shared CPU, multi-thread "
                        "timings of small ops swing by an order of magnitude with other load; "
                        "0: torch's default)")
    args = p.parse_args()
    if args.out_dir and not args.out:
        args.out = str(Path(args.out_dir) / "teacher.json")
    if args.quick:
        args.rounds, args.reps, args.student_steps = 2, 3, 1
    if args.rounds < 1 or args.reps < 1 or args.student_steps < 1:
        p.error("--rounds, --reps and --student-steps must be >= 1")
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    started = time.perf_counter()
    device = torch.device(args.device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())

    students = {c: StudentStep(c, device) for c in CLASSES}
    inputs = {(k, c): teacher_inputs(k, c, device) for k in STUDENTS for c in CLASSES}
    configs = [(v, k, c) for c in CLASSES for k in STUDENTS for v in VARIANTS]
    # Warm-up: allocator, kernels, cached solver tables.
    for c in CLASSES:
        students[c]()
    for v, k, c in configs:
        time_teacher(*inputs[k, c], v, 2, device)

    teacher_ms = {cfg: [] for cfg in configs}
    student_ms = {c: [] for c in CLASSES}
    for rnd in range(args.rounds):
        parts = ("student", "teacher") if rnd % 2 == 0 else ("teacher", "student")
        for part in parts:
            if part == "student":
                for c in CLASSES:
                    student_ms[c].append(median([students[c]() for _ in range(args.student_steps)]))
            else:
                for cfg in (configs if rnd % 2 == 0 else configs[::-1]):
                    v, k, c = cfg
                    teacher_ms[cfg].append(time_teacher(*inputs[k, c], v, args.reps, device))
        lin = teacher_ms["linear", 4, 100][-1]
        print(f"round {rnd + 1}/{args.rounds}: student step C=100 {student_ms[100][-1]:.1f} ms, "
              f"linear teacher K=4 C=100 {lin:.3f} ms", flush=True)

    results, infos, rows = [], [], []
    for cfg in configs:
        v, k, c = cfg
        ratios = [t / s for t, s in zip(teacher_ms[cfg], student_ms[c])]
        entry = info(f"KDCL {v} teacher / resnet32 student step (K={k}, B={BATCH}, C={c})",
                     [100.0 * r for r in ratios], "(reported)", unit="%")
        entry.update(variant=v, k=k, classes=c)
        infos.append(entry)
        t, s = spread_stats(teacher_ms[cfg]), spread_stats(student_ms[c])
        results.append({"variant": v, "k": k, "classes": c, "teacher_ms": t, "student_step_ms": s,
                        "ratio": spread_stats(ratios)})
        rows.append({"variant": v, "K": k, "C": c, "teacher_ms": t["median"], "teacher_iqr": t["spread"],
                     "student_step_ms": s["median"], "student_iqr": s["spread"],
                     "percent_of_step": entry["median"], "percent_iqr": entry["spread"]})
    comparison = compare(f"KDCL linear teacher, K=4, B={BATCH}, C=100 (ms)",
                         teacher_ms["linear", 4, 100], TARGET_MS, "<", unit="ms")
    host_syncs = None
    if device.type == "cuda":
        host_syncs = {f"{v} K={k} C={c}": count_host_syncs(*inputs[k, c], v) for v, k, c in configs}

    print(table(rows, ["variant", "K", "C", "teacher_ms", "teacher_iqr", "student_step_ms",
                       "student_iqr", "percent_of_step", "percent_iqr"],
                f"KDCL teacher per step vs one resnet32 student step, B={BATCH}, {device}, "
                f"{args.rounds} rounds (medians over rounds; IQR of the per-round values; "
                f"percent_of_step: 100 * teacher_ms / student_step_ms per round)"))
    print()
    print(describe(comparison))
    if host_syncs is not None:
        print(f"host syncs per teacher build: {host_syncs}")
    finish(args, "teacher", {"machine": machine(args.device), "batch": BATCH, "rounds": args.rounds,
                             "reps": args.reps, "student_steps": args.student_steps,
                             "results": results, "rows": rows, "host_syncs": host_syncs,
                             "comparisons": [comparison], "info": infos}, started)


if __name__ == "__main__":
    main()
