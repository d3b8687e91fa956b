"""Command-line flags shared by the jobs, and the `cohort` console script.

Every bad value becomes one line, `error: <flag>: <what is allowed>`, and exit code 2,
before Ray starts or anything is written.
"""
from __future__ import annotations

import argparse
import sys
from typing import Callable, Sequence

from .config import EXCHANGES, KDCL_VARIANTS, PLACEMENTS, VIEWS, CohortConfig
from .data import DATASETS, DataError
from .errors import CheckpointError, RunFailed, TrainingDiverged, UsageError
from .distill import add_kd_flags, add_takd_flags, run_kd_job, run_takd_job
from .one import add_one_flags, run_one_job
from .optim import SCHEDULES
from .report import add_report_flags, run_report_job
from .sweep import add_sweep_flags, run_sweep_job

EXIT_USAGE = 2


class Parser(argparse.ArgumentParser):
    """argparse, but its errors are one line (no usage dump) with exit code 2."""

    def error(self, message: str):
        print(f"error: {message}", file=sys.stderr)
        sys.exit(EXIT_USAGE)


def int_list(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()] if text else []


def non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0 (got {value})")
    return value


def str_list(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def add_data_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dataset", default="cifar100", choices=DATASETS)
    p.add_argument("--data-dir", default=None, help="dataset root (CIFAR's torchvision layout) or Parquet path")
    p.add_argument("--val-fraction", type=float, default=0.0, help="held-out share of the training set")
    p.add_argument("--crop-padding", type=int, default=-1, help="random-crop padding; -1 = dataset default")


def add_optim_flags(p: argparse.ArgumentParser, epochs: int, batch_size: int, lr: float, wd: float) -> None:
    p.add_argument("--epochs", type=int, default=epochs)
    p.add_argument("--batch-size", type=int, default=batch_size)
    p.add_argument("--lr", type=float, default=lr)
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--weight-decay", type=float, default=wd)
    p.add_argument("--nesterov", action="store_true")
    p.add_argument("--schedule", default="step", choices=SCHEDULES)
    p.add_argument("--milestones", type=int_list, default=[],
                   help="step schedule: comma list of epochs (default 50%%,75%% of --epochs)")
    p.add_argument("--gamma", type=float, default=0.1, help="step schedule decay factor")


def add_run_flags(p: argparse.ArgumentParser, output: str) -> None:
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", default=output, help="run directory")
    p.add_argument("--name", default="", help="run name (default: the output directory's name)")
    p.add_argument("--overwrite", action="store_true", help="replace the run already in --output")
    p.add_argument("--resume", action="store_true", help="continue from --output's latest checkpoint")
    p.add_argument("--checkpoint-every", type=int, default=1, help="epochs between checkpoints")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda[:N] (single-process runtime)")
    p.add_argument("--no-progress", dest="progress", action="store_false")


def add_worker_flags(p: argparse.ArgumentParser) -> None:
    """Where a Ray Train job (ONE, a KD/TAKD stage) runs."""
    p.add_argument("--workers", type=int, default=1, help="N data-parallel Ray Train workers")
    p.add_argument("--gpus-per-worker", type=float, default=-1.0,
                   help="default 1 when the cluster has GPUs (nccl), else 0 (gloo on CPU)")
    p.add_argument("--cpus-per-worker", type=float, default=-1.0,
                   help="default 1 with GPUs, else the cluster's CPUs shared among the workers")
    p.add_argument("--max-failures", type=int, default=0,
                   help="worker-group failures Ray Train recovers from the latest checkpoint")
    p.add_argument("--steps-per-epoch", type=int, default=0,
                   help="train only the first N global batches of each epoch (smoke tests); 0 = all")


def add_cohort_flags(p: argparse.ArgumentParser, method: str) -> None:
    p.add_argument("--students", type=int, default=2)
    p.add_argument("--arch", default="resnet32", help="one arch, or a comma list (one per student)")
    add_data_flags(p)
    add_optim_flags(p, epochs=200, batch_size=64, lr=0.1, wd=5e-4)
    p.add_argument("--temperature", type=float, default=1.0 if method == "dml" else 3.0)
    p.add_argument("--kd-weight", type=float, default=1.0, help="lambda, the weight of the KL term")
    if method == "kdcl":
        p.add_argument("--variant", default="linear", choices=KDCL_VARIANTS)
    p.add_argument("--views", default="", choices=("",) + VIEWS,
                   help="augmented views: shared (DML default) or separate per student (KDCL default)")
    add_run_flags(p, output=f"runs/{method}")
    p.add_argument("--runtime", default="ray", choices=("ray", "local"),
                   help="ray: one actor per student; local: all students in this process")
    p.add_argument("--gpus-per-student", type=float, default=-1.0,
                   help="default 1 when the cluster has GPUs, else 0")
    p.add_argument("--cpus-per-student", type=float, default=-1.0,
                   help="default: the cluster's CPUs shared among the students (fractions allowed)")
    p.add_argument("--exchange", default="store", choices=EXCHANGES)
    p.add_argument("--placement", default="pack", choices=PLACEMENTS)
    p.add_argument("--startup-timeout", type=float, default=60.0,
                   help="seconds to wait for the cluster to fit the cohort")
    p.add_argument("--max-restarts", type=non_negative_int, default=3,
                   help="cohort restarts after a dead actor")


def cohort_config(args: argparse.Namespace, method: str) -> CohortConfig:
    return CohortConfig(
        method=method, students=args.students, archs=str_list(args.arch), dataset=args.dataset,
        data_dir=args.data_dir, val_fraction=args.val_fraction, crop_padding=args.crop_padding,
        epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, momentum=args.momentum,
        weight_decay=args.weight_decay, nesterov=args.nesterov, schedule=args.schedule,
        milestones=args.milestones, gamma=args.gamma, temperature=args.temperature,
        kd_weight=args.kd_weight, variant=getattr(args, "variant", "linear"), views=args.views,
        seed=args.seed, output=args.output, name=args.name, overwrite=args.overwrite,
        resume=args.resume, checkpoint_every=args.checkpoint_every, device=args.device,
        progress=args.progress, gpus_per_student=args.gpus_per_student,
        cpus_per_student=args.cpus_per_student, exchange=args.exchange, placement=args.placement,
        startup_timeout=args.startup_timeout)


def run_cohort_job(args: argparse.Namespace, method: str) -> dict:
    cfg = cohort_config(args, method)
    if args.runtime == "local":
        from .engine import run_local
        return run_local(cfg)
    from .cohort import run_ray
    return run_ray(cfg, max_restarts=args.max_restarts)


def print_summary(summary: dict) -> None:
    for member, entry in summary.get("members", {}).items():
        print(f"{member:>10}: final {entry['final_test_acc']:.2f}%  best {entry['best_test_acc']:.2f}% "
              f"(epoch {entry['best_epoch'] + 1})", flush=True)


COMMANDS: dict[str, tuple[Callable, Callable]] = {
    "dml": (lambda p: add_cohort_flags(p, "dml"), lambda a: run_cohort_job(a, "dml")),
    "kdcl": (lambda p: add_cohort_flags(p, "kdcl"), lambda a: run_cohort_job(a, "kdcl")),
    "independent": (lambda p: add_cohort_flags(p, "independent"),
                    lambda a: run_cohort_job(a, "independent")),
    "one": (add_one_flags, run_one_job),
    "kd": (add_kd_flags, run_kd_job),
    "takd": (add_takd_flags, run_takd_job),
    "report": (add_report_flags, run_report_job),
    "sweep": (add_sweep_flags, run_sweep_job),
}


def build_parser() -> Parser:
    parser = Parser(prog="cohort", description="Knowledge distillation cohorts on PyTorch and Ray")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    for name, (add_flags, _) in COMMANDS.items():
        add_flags(sub.add_parser(name))
    return parser


def run_guarded(job: Callable[[], object]) -> int:
    """Run a job, turning known errors into one line: usage errors exit 2, failures exit 1."""
    from .cluster import ResourceError
    try:
        result = job()
    except (UsageError, DataError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except CheckpointError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except (ResourceError, TrainingDiverged, RunFailed) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if isinstance(result, dict):
        print_summary(result)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # argparse: --help (0) or a bad flag (2, already printed)
        return exc.code
    _, run = COMMANDS[args.command]
    return run_guarded(lambda: run(args))


if __name__ == "__main__":
    sys.exit(main())
