"""The `cohort` console script and the jobs' command lines, generated from the config tree.

Every method in the registry is a sub-command whose flags are its config's fields (help and
default from `cohort.config.setting`); `--recipe NAME` applies a paper's settings under the
flags given. Every bad value becomes one line, `error: <flag>: <what is allowed>`, and exit
code 2, before Ray starts or anything is written.
"""
from __future__ import annotations

import sys
from typing import Callable, Sequence

from . import methods
from .data import DataError
from .errors import CheckpointError, ResourceError, RunFailed, TrainingDiverged, UsageError
from .flags import EXIT_USAGE, Parser, add_method_flags, config_from_args
from .report import add_report_flags, run_report_job
from .sweep import add_sweep_flags


def print_summary(summary: dict) -> None:
    for member, entry in summary.get("members", {}).items():
        print(f"{member:>10}: final {entry['final_test_acc']:.2f}%  best {entry['best_test_acc']:.2f}% "
              f"(epoch {entry['best_epoch'] + 1})", flush=True)
    best = summary.get("best_student")
    if isinstance(best, dict) and best.get("path"):
        print(f"{best['path']}: {best['member']} of epoch {best['epoch'] + 1} "
              f"({best['test_acc']:.2f}% test), a plain {best['arch']}, chosen by "
              f"{best.get('selection', 'its rule')}", flush=True)


def method_command(method: type[methods.Method]) -> tuple[Callable, Callable]:
    def run(args):
        from .runtime import run as run_method
        return run_method(config_from_args(method, args))
    return (lambda p: add_method_flags(p, method)), run


def run_sweep_job(args):
    from .ray.tune import run_sweep_job as run   # imports Ray only when a sweep runs
    return run(args)


def commands() -> dict[str, tuple[Callable, Callable]]:
    table = {name: method_command(cls) for name, cls in methods.METHODS.items()}
    table["report"] = (add_report_flags, run_report_job)
    table["sweep"] = (add_sweep_flags, run_sweep_job)
    return table


def build_parser() -> Parser:
    parser = Parser(prog="cohort", description="Knowledge distillation cohorts on PyTorch and Ray")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    for name, (add_flags, _) in commands().items():
        add_flags(sub.add_parser(name))
    return parser


def run_guarded(job: Callable[[], object]) -> int:
    """Run a job, turning known errors into one line: usage errors exit 2, failures exit 1."""
    try:
        result = job()
    except (UsageError, DataError, CheckpointError) as exc:
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
    _, run = commands()[args.command]
    return run_guarded(lambda: run(args))


if __name__ == "__main__":
    sys.exit(main())
