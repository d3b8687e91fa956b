"""Ray Tune sweeps over every method: `cohort sweep` / `jobs/sweep.py`.

    cohort sweep --method dml --students 2 --arch resnet8 --dataset digits --epochs 8 \\
        --grid temperature=1,2,4 --sample lr=loguniform:0.01:0.2 --samples 2 \\
        --scheduler asha --metric best_student --name t-sweep --storage runs/sweeps

The method's own flags (those of `cohort <method>`) are the fixed settings of every trial;
`--grid FLAG=V1,V2` and `--sample FLAG=DIST:A:B` (uniform, loguniform, choice), or a YAML
file (`--space`), name the searched ones by the same flag names. Everything is checked before
Ray starts: an unknown flag, a bad value or a metric the method does not report is one line
naming the flag and exit code 2.

Every registered method can be swept (SWEEP_METHODS derives how from its family). Each
trial reports every epoch's test accuracies: one scalar per member plus `best_student`,
`mean_student` (and `best_branch`, `mean_branch` for multi-branch methods) and the method's
aggregates (`ensemble`, `average`), so ASHA can stop it early. The Tune side (trainable,
resources, Tuner, results) is cohort.ray.tune; nothing here imports Ray.

The sweep directory STORAGE/NAME is the Tune experiment (restorable: `--resume` continues an
interrupted sweep with Tuner.restore) and also holds

    sweep.json        the sweep's settings (what --resume rebuilds the trainable from)
    runs/<trial_id>/  each trial's run directory (config.json, metrics.parquet, checkpoints)
    results.parquet   one row per trial: searched values, final and best metrics, epochs, status
    best.json         the best trial's values, metrics, run directory and full config

A trial that restarts (a resumed sweep) continues from its run directory's latest checkpoint
and first reports the epochs it already has, so Tune and ASHA see every epoch once.
"""
from __future__ import annotations

import argparse
import itertools
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from . import methods
from .config import validate
from .errors import UsageError
from .flags import Parser, add_method_flags, config_from_args
from .storage import Location, location, read_parquet

SCHEDULERS = ("fifo", "asha")
DISTRIBUTIONS = ("uniform", "loguniform", "choice")
TRIAL_CPUS = 0.1          # the trial's own bundle: its process runs the driver loop and evaluation
EXIT_INTERRUPTED = 130
SPEC_FILE = "sweep.json"
RUNS_DIR = "runs"
# Flags of the methods that the sweep sets for every trial, or that make no sense in one.
CONTROLLED = {
    "output": "each trial writes its run directory under the sweep directory (--storage/--name)",
    "overwrite": "trials of a new sweep start from scratch; a resumed sweep continues them",
    "resume": "use the sweep's --resume",
    "name": "use the sweep's --name",
    "runtime": "sweep trials always run as Ray actors",
    "startup_timeout": "trials wait for their placement group in Tune",
}


# ---- methods ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class SweepMethod:
    """How a sweep runs one method."""
    name: str
    add_flags: Callable[[argparse.ArgumentParser], None] | None = None
    build: Callable[[argparse.Namespace], Any] | None = None        # fixed + searched flags -> config
    validate: Callable[[Any], None] | None = None                    # raises UsageError
    units: str = "students"          # config field: number of per-unit bundles (students / workers)
    unit_cpus: str = "cpus_per_student"
    unit_gpus: str = "gpus_per_student"
    member: str = "student"          # what the per-member metric rows are called
    nested: bool = True              # True: the units live in bundles of the trial's placement group
    # the trial's run directory -> the run directory whose metrics and checkpoints it reports
    history: Callable[[Location], Location] = lambda run_dir: run_dir


def _last_stage(run_dir: Location) -> Location:
    """A chain trial reports its last stage, the distilled student (RUN/stageI-ARCH)."""
    from .runtime.chain import stage_name
    config = run_dir / "config.json"
    if not config.exists():
        return run_dir / "not-started"
    chain = json.loads(config.read_text())["chain"]
    return run_dir / stage_name(len(chain) - 1, chain[-1])


def sweep_method(name: str) -> SweepMethod:
    """How a sweep runs a registered method, from its family: a cohort's students live in
    bundles of the trial's placement group; a Ray Train job (a network, or a chain's stages)
    reserves its workers itself, so those trials are not nested (see _concurrency)."""
    cls = methods.get(name)

    common = dict(add_flags=lambda p: add_method_flags(p, cls),
                  build=lambda args: config_from_args(cls, args), validate=validate,
                  member=cls.member_kind)
    if cls.family == "cohort":
        return SweepMethod(name, **common)
    return SweepMethod(name, **common, units="workers", unit_cpus="cpus_per_worker",
                       unit_gpus="gpus_per_worker", nested=False,
                       history=_last_stage if cls.family == "chain" else (lambda run_dir: run_dir))


def _registry() -> dict[str, SweepMethod]:
    return {name: sweep_method(name) for name in methods.METHODS}


SWEEP_METHODS: dict[str, SweepMethod] = _registry()


def method_parser(method: str) -> argparse.ArgumentParser:

    parser = Parser(prog=f"cohort sweep --method {method}")
    SWEEP_METHODS[method].add_flags(parser)
    return parser


# ---- per-epoch metrics -------------------------------------------------------------------------
def epoch_metrics(rows: list[dict]) -> dict:
    """What Tune sees after an epoch: every member's test accuracy (%), the best and mean
    individual member, and `epoch` (epochs completed). Branches of ONE are also called
    students, so `best_student` means the same thing for every method."""
    out: dict[str, Any] = {"epoch": int(rows[0]["epoch"]) + 1}
    singles: dict[str, list[float]] = {}
    for row in rows:
        acc = row.get("test_acc")
        if acc is None:
            continue
        out[row["member"]] = float(acc)
        for kind in ("student", "branch"):
            if str(row["member"]).startswith(kind):
                singles.setdefault(kind, []).append(float(acc))
    for kind, accs in singles.items():
        for name in {kind, "student"}:
            out[f"best_{name}"] = max(accs)
            out[f"mean_{name}"] = sum(accs) / len(accs)
    return out


def metric_names(method: SweepMethod, cfg) -> list[str]:
    """Metrics a trial with config `cfg` reports (see epoch_metrics)."""
    kinds = ["student"] if method.member == "student" else [method.member, "student"]
    summary = [f"{stat}_{kind}" for kind in kinds for stat in ("best", "mean")]
    return summary + methods.get(method.name).members(cfg)


# ---- the search space --------------------------------------------------------------------------
@dataclass
class SweepSpec:
    """Everything a sweep needs to (re)build its experiment; stored as sweep.json."""
    method: str
    fixed: list[str]                      # the method's flags, as given
    grid: dict[str, list]                 # dest -> values
    sample: dict[str, list]               # dest -> [distribution, *arguments]
    samples: int = 1
    scheduler: str = "fifo"
    metric: str = "best_student"
    grace_period: int = 1
    reduction_factor: float = 2.0
    max_concurrent: int = 0
    name: str = "sweep"
    storage: str = "runs/sweeps"
    resources: dict = field(default_factory=dict)   # resolved once the cluster is known

    @property
    def path(self) -> Location:
        """STORAGE/NAME: a local folder, or a URI's folder (s3://, gs://, ...)."""
        return location(self.storage, "--storage").resolve() / self.name

    def search_key(self) -> dict:
        keys = ("method", "fixed", "grid", "sample", "samples", "scheduler", "metric",
                "grace_period", "reduction_factor")
        return {k: getattr(self, k) for k in keys}


def _flag_actions(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    """The parser's flags by config field name and by flag name (`arch` is field `archs`)."""
    actions = {}
    for a in parser._actions:
        if a.option_strings and a.dest != "help":
            actions[a.dest] = a
            for option in a.option_strings:
                actions.setdefault(_dest(option), a)
    return actions


def _dest(key: str) -> str:
    return key.strip().lstrip("-").replace("-", "_")


def _searchable(method: str, key: str, flag: str) -> argparse.Action:
    actions = _flag_actions(method_parser(method))
    dest = _dest(key)
    if dest in CONTROLLED:
        raise UsageError(flag, f"{key!r} cannot be searched: {CONTROLLED[dest]}")
    if dest not in actions:
        allowed = ", ".join(sorted(d for d in actions if d not in CONTROLLED))
        raise UsageError(flag, f"{key!r} is not a flag of `cohort {method}` (searchable: {allowed})")
    return actions[dest]


def _typed(action: argparse.Action, text, flag: str, key: str):
    """A searched value as the method's parser would read it."""
    if action.nargs == 0:   # store_true / store_false
        word = str(text).strip().lower()
        if word not in ("true", "false", "1", "0", "yes", "no"):
            raise UsageError(flag, f"{key}: {text!r} is not a boolean (true or false)")
        return word in ("true", "1", "yes")
    try:
        value = action.type(str(text).strip()) if action.type else str(text).strip()
    except (TypeError, ValueError):
        kind = getattr(action.type, "__name__", "value")
        raise UsageError(flag, f"{key}: {text!r} is not a valid {kind}") from None
    if action.choices is not None and value not in action.choices:
        raise UsageError(flag, f"{key}: {value!r} is not one of: "
                               f"{', '.join(str(c) for c in action.choices)}")
    return value


def _split(text: str, flag: str) -> tuple[str, str]:
    key, sep, values = str(text).partition("=")
    if not sep or not key.strip() or not values.strip():
        raise UsageError(flag, f"{text!r} is not FLAG=VALUES (e.g. temperature=1,2,4)")
    return key.strip(), values.strip()


def parse_grid(method: str, key: str, values, flag: str = "--grid") -> tuple[str, list]:
    action = _searchable(method, key, flag)
    items = values if isinstance(values, (list, tuple)) else str(values).split(",")
    items = [v for v in items if str(v).strip() != ""]
    if not items:
        raise UsageError(flag, f"{key}: no values")
    return action.dest, [_typed(action, v, flag, key) for v in items]


def parse_sample(method: str, key: str, text, flag: str = "--sample") -> tuple[str, list]:
    """`uniform:A:B`, `loguniform:A:B` or `choice:V1,V2,...` (a YAML mapping {dist: [args]} too)."""
    action = _searchable(method, key, flag)
    if isinstance(text, dict) and len(text) == 1:
        dist, args = next(iter(text.items()))
        args = list(args) if isinstance(args, (list, tuple)) else [args]
    else:
        dist, _, rest = str(text).partition(":")
        args = rest.split(",") if dist.strip() == "choice" else rest.split(":")
    dist = str(dist).strip()
    if dist not in DISTRIBUTIONS:
        raise UsageError(flag, f"{key}: distribution {dist!r} is not one of: {', '.join(DISTRIBUTIONS)}"
                               " (e.g. lr=loguniform:0.01:0.2)")
    if dist == "choice":
        values = [_typed(action, v, flag, key) for v in args if str(v).strip() != ""]
        if not values:
            raise UsageError(flag, f"{key}: choice needs at least one value")
        return action.dest, ["choice", *values]
    if action.type not in (int, float):
        raise UsageError(flag, f"{key}: {dist} needs a numeric flag; use choice:V1,V2")
    if len(args) != 2:
        raise UsageError(flag, f"{key}: {dist} takes two bounds, {dist}:LOW:HIGH")
    low, high = (_typed(action, v, flag, key) for v in args)
    if not low < high:
        raise UsageError(flag, f"{key}: the lower bound must be below the upper ({low} >= {high})")
    if dist == "loguniform" and low <= 0:
        raise UsageError(flag, f"{key}: loguniform needs positive bounds (got {low})")
    return action.dest, [dist, low, high]


def load_space(method: str, path: str) -> tuple[dict, dict]:
    """A YAML search space: {grid: {flag: [values] or "v1,v2"}, sample: {flag: "dist:a:b" or
    {dist: [a, b]}}}."""
    import yaml
    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except OSError as exc:
        raise UsageError("--space", f"cannot read {path}: {exc.strerror or exc}") from None
    except yaml.YAMLError as exc:
        raise UsageError("--space", f"{path} is not valid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(data, dict) or set(data) - {"grid", "sample"}:
        raise UsageError("--space", f"{path}: expected a mapping with `grid:` and/or `sample:` sections")
    grid, sample = {}, {}
    for key, values in (data.get("grid") or {}).items():
        dest, typed = parse_grid(method, str(key), values, "--space")
        grid[dest] = typed
    for key, text in (data.get("sample") or {}).items():
        dest, typed = parse_sample(method, str(key), text, "--space")
        sample[dest] = typed
    return grid, sample


# ---- flags ----------------------------------------------------------------------------------
class _Fixed(argparse.Action):
    """Collects a method flag, as typed, for the method's own parser to read later."""

    def __call__(self, parser, namespace, values, option_string=None):
        tokens = list(getattr(namespace, "fixed", None) or [])
        tokens.append(option_string)
        if self.nargs != 0:
            tokens.append(values)
        namespace.fixed = tokens


def add_sweep_flags(p: argparse.ArgumentParser) -> None:
    p.description = ("Ray Tune sweep of a method: its flags fix every trial, --grid / --sample / "
                     "--space search the rest")
    p.add_argument("--method", choices=tuple(SWEEP_METHODS), default=None,
                   help="the method every trial runs (required unless --resume)")
    p.add_argument("--grid", action="append", default=[], metavar="FLAG=V1,V2,...",
                   help="grid-search a flag of the method (repeatable), e.g. temperature=1,2,4")
    p.add_argument("--sample", action="append", default=[], metavar="FLAG=DIST:A:B",
                   help="sample a flag: uniform:A:B, loguniform:A:B or choice:V1,V2 (repeatable)")
    p.add_argument("--space", default=None, metavar="FILE.yaml",
                   help="YAML search space: {grid: {flag: [values]}, sample: {flag: 'dist:a:b'}}")
    p.add_argument("--samples", type=int, default=1,
                   help="draws of the sampled flags (each draw runs the whole grid)")
    p.add_argument("--scheduler", default="fifo", choices=SCHEDULERS)
    p.add_argument("--metric", default="best_student",
                   help="per-epoch test accuracy ASHA and the leaderboard use: best_student, "
                        "mean_student, ensemble, student<k> (ONE: best_branch, average, branch<i>)")
    p.add_argument("--grace-period", type=int, default=1, help="ASHA: epochs before a trial may stop")
    p.add_argument("--reduction-factor", type=float, default=2.0, help="ASHA: halving rate")
    p.add_argument("--max-concurrent", type=int, default=0,
                   help="trials at once (0: as many as the cluster holds)")
    p.add_argument("--name", default="sweep", help="the sweep's name: its directory is STORAGE/NAME")
    p.add_argument("--storage", default="runs/sweeps",
                   help="where sweeps live: a shared path on a cluster, or a URI (s3://bucket/sweeps, gs://...)")
    p.add_argument("--resume", action="store_true", help="continue the interrupted sweep STORAGE/NAME")
    group = p.add_argument_group("the method's fixed flags (`cohort <method> --help`)")
    taken = {s for a in p._actions for s in a.option_strings}
    for method in SWEEP_METHODS.values():
        if method.add_flags is None:
            continue
        scratch = argparse.ArgumentParser(add_help=False)
        method.add_flags(scratch)
        for action in scratch._actions:
            strings = [s for s in action.option_strings if s not in taken]
            if not strings:
                continue
            taken.update(strings)
            helptext = action.help if action.help not in (None, argparse.SUPPRESS) else ""
            group.add_argument(*strings, dest="fixed_" + action.dest, action=_Fixed,
                               nargs=0 if action.nargs == 0 else None, default=argparse.SUPPRESS,
                               metavar=action.metavar or action.dest.upper(), help=helptext)


def _check_range(args) -> None:
    if args.samples < 1:
        raise UsageError("--samples", f"must be >= 1 (got {args.samples})")
    if args.grace_period < 1:
        raise UsageError("--grace-period", f"must be >= 1 (got {args.grace_period})")
    if not args.reduction_factor > 1:
        raise UsageError("--reduction-factor", f"must be > 1 (got {args.reduction_factor})")
    if args.max_concurrent < 0:
        raise UsageError("--max-concurrent", f"must be >= 0 (got {args.max_concurrent})")
    if not args.name or "/" in args.name or args.name in (".", ".."):
        raise UsageError("--name", f"{args.name!r} is not a directory name")


def spec_from_args(args: argparse.Namespace) -> SweepSpec:
    """The sweep's settings from its flags; raises UsageError (nothing started, nothing written)."""
    _check_range(args)
    if args.method is None:
        raise UsageError("--method", f"required: one of {', '.join(SWEEP_METHODS)}")
    method = SWEEP_METHODS[args.method]
    fixed = list(getattr(args, "fixed", None) or [])
    grid, sample = load_space(args.method, args.space) if args.space else ({}, {})
    for text in args.grid:
        dest, values = parse_grid(args.method, *_split(text, "--grid"))
        grid[dest] = values
    for text in args.sample:
        dest, values = parse_sample(args.method, *_split(text, "--sample"))
        sample[dest] = values
    given = {_dest(t) for t in fixed if str(t).startswith("--")}
    for dest in given & set(CONTROLLED):
        raise UsageError("--" + dest.replace("_", "-"), f"set by the sweep: {CONTROLLED[dest]}")
    location(args.storage, "--storage")   # a path or a URI pyarrow opens, checked before Ray starts
    for dest in set(grid) & set(sample):
        raise UsageError("--sample", f"{dest} is also in the grid")
    method_flags = (method.unit_cpus, method.unit_gpus)
    for dest in set(grid) | set(sample):
        where = "--grid" if dest in grid else "--sample"
        if dest in given:
            raise UsageError(where, f"{dest} is searched and also given as a fixed flag")
        if dest in method_flags:
            raise UsageError(where, f"{dest} cannot be searched: every trial reserves the same resources")
    spec = SweepSpec(method=args.method, fixed=fixed, grid=grid, sample=sample, samples=args.samples,
                     scheduler=args.scheduler, metric=args.metric, grace_period=args.grace_period,
                     reduction_factor=args.reduction_factor, max_concurrent=args.max_concurrent,
                     name=args.name, storage=args.storage)
    check_trials(spec)
    return spec


# ---- trial configs ----------------------------------------------------------------------------
def trial_args(spec: SweepSpec, params: dict) -> argparse.Namespace:
    args = method_parser(spec.method).parse_args(spec.fixed)
    for dest, value in params.items():
        setattr(args, dest, value)
    return args


def _corners(spec: SweepSpec) -> list[dict]:
    """Searched values that span the space: every grid point with the sampled flags at their
    lower ends, and each sampled flag's ends (every choice) with the first grid point."""
    grid_points = [dict(zip(spec.grid, combo)) for combo in itertools.product(*spec.grid.values())]
    low = {dest: s[1] for dest, s in spec.sample.items()}
    points = [{**g, **low} for g in grid_points] or [low]
    first = grid_points[0] if grid_points else {}
    for dest, s in spec.sample.items():
        ends = s[1:] if s[0] == "choice" else [s[1], s[2]]
        points += [{**first, **low, dest: v} for v in ends]
    return points


def check_trials(spec: SweepSpec) -> list:
    """Build and validate the config of every corner of the space, and the metric."""
    method = SWEEP_METHODS[spec.method]
    configs = []
    for params in _corners(spec):
        args = trial_args(spec, params)
        cfg = method.build(args)
        method.validate(cfg)
        configs.append(cfg)
    allowed = [m for m in metric_names(method, configs[0])
               if all(m in metric_names(method, c) for c in configs)]
    if spec.metric not in allowed:
        raise UsageError("--metric", f"{spec.metric!r} is not one of: {', '.join(allowed)}")
    if spec.scheduler == "asha":
        longest = max(c.epochs for c in configs)
        if spec.grace_period > longest:
            raise UsageError("--grace-period", f"{spec.grace_period} is more than the trials' "
                                               f"{longest} epochs")
    return configs


# ---- the trial ------------------------------------------------------------------------------
def trial_config(spec: SweepSpec, params: dict, run_dir: Location, name: str):
    method = SWEEP_METHODS[spec.method]
    args = trial_args(spec, params)
    args.output, args.name = str(run_dir), name
    args.overwrite, args.resume = False, False
    setattr(args, method.unit_cpus, spec.resources["cpus"])
    setattr(args, method.unit_gpus, spec.resources["gpus"])
    return method.build(args), args


def stored_epochs(run_dir: Location) -> tuple[int, list[list[dict]]]:
    """(epochs completed by the latest checkpoint, their metric rows grouped by epoch)."""
    from .runs import MARKER, latest_checkpoint
    latest = latest_checkpoint(run_dir)
    if latest is None:
        return 0, []
    done = json.loads((latest / MARKER).read_text())["epochs_completed"]
    metrics = run_dir / "metrics.parquet"
    rows = read_parquet(metrics).to_pylist() if metrics.exists() else []
    by_epoch: dict[int, list[dict]] = {}
    for row in rows:
        if row["epoch"] < done:
            by_epoch.setdefault(row["epoch"], []).append(row)
    return done, [by_epoch[e] for e in sorted(by_epoch)]


def _cell(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 0.01 or abs(value) >= 1000 else f"{value:.2f}"
    return str(value)


def leaderboard(result: dict) -> str:
    metric, searched = result["metric"], result["searched"]
    header = ["rank", "trial", *searched, "status", "epochs", f"final {metric}", f"best {metric}"]
    lines = [[str(i + 1), r["trial_id"], *[_cell(r[k]) for k in searched], r["status"],
              str(r["epochs"]), _cell(r[f"final_{metric}"]), _cell(r[f"best_{metric}"])]
             for i, r in enumerate(result["trials"])]
    widths = [max(len(row[i]) for row in [header, *lines]) for i in range(len(header))]

    def fmt(row):
        return "  ".join(c.ljust(w) if i == 1 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))

    return "\n".join([fmt(header), *map(fmt, lines)])


