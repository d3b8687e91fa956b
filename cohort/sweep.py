"""Ray Tune sweeps over every method: `cohort sweep` / `jobs/sweep.py`.

    cohort sweep --method dml --students 2 --arch resnet8 --dataset digits --epochs 8 \\
        --grid temperature=1,2,4 --sample lr=loguniform:0.01:0.2 --samples 2 \\
        --scheduler asha --metric best_student --name t-sweep --storage runs/sweeps

The method's own flags (those of `cohort <method>`) are the fixed settings of every trial;
`--grid FLAG=V1,V2` and `--sample FLAG=DIST:A:B` (uniform, loguniform, choice), or a YAML
file (`--space`), name the searched ones by the same flag names. Everything is checked before
Ray starts: an unknown flag, a bad value or a metric the method does not report is one line
naming the flag and exit code 2.

Each trial is a Tune function trainable that builds its method's config from the fixed
flags and its searched values and runs it, reporting every epoch's test accuracies (one
scalar per member plus `best_student`, `mean_student` and `ensemble`; for ONE also
`best_branch`, `mean_branch`, `average`) so ASHA can stop it early. Methods plug in through
one registry entry each (SWEEP_METHODS):

* DML / KDCL trials start their cohort: the trial's placement group is its own bundle plus
  one bundle per student, and `cohort.run_ray` places the student actors in those bundles,
  so concurrent trials never starve each other and a stopped trial's actors go with it.
* ONE trials run their TorchTrainer inside the trainable (the Ray 2.60 Train/Tune pattern:
  a run directory, hence a Train run name, per trial, and a Train callback forwarding rank 0's
  metric rows to Tune). Ray Train reserves its workers' placement group itself, so the trial
  reserves only its own bundle and the sweep caps concurrency at what the cluster holds.

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
import importlib
import itertools
import json
import math
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

from .errors import UsageError

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
    run: Callable[[Any, argparse.Namespace, Callable[[list], None]], dict] | None = None
    units: str = "students"          # config field: number of per-unit bundles (students / workers)
    unit_cpus: str = "cpus_per_student"
    unit_gpus: str = "gpus_per_student"
    member: str = "student"          # what the per-member metric rows are called
    nested: bool = True              # True: the units live in bundles of the trial's placement group
    # the trial's run directory -> the run directory whose metrics and checkpoints it reports
    history: Callable[[Path], Path] = lambda run_dir: run_dir


def _cohort_method(name: str) -> SweepMethod:
    def add_flags(p):
        from .cli import add_cohort_flags
        add_cohort_flags(p, name)

    def build(args):
        from .cli import cohort_config
        return cohort_config(args, name)

    def validate(cfg):
        from .config import validate_cohort
        validate_cohort(cfg)

    def run(cfg, args, on_epoch):
        from .cohort import run_ray
        return run_ray(cfg, max_restarts=args.max_restarts, on_epoch=on_epoch)

    return SweepMethod(name, add_flags, build, validate, run)


def _last_stage(run_dir: Path) -> Path:
    """A KD trial's chain reports its last stage, the distilled student (RUN/stage1-ARCH)."""
    from .distill import stage_name
    config = run_dir / "config.json"
    if not config.exists():
        return run_dir / "not-started"
    chain = json.loads(config.read_text())["chain"]
    return run_dir / stage_name(len(chain) - 1, chain[-1])


def _train_method(name: str, module: str, add_flags: str, build: str, validate: str,
                  runner: str, member: str, history=lambda run_dir: run_dir) -> SweepMethod:
    """A method that runs as Ray Train job(s): ONE, or a KD chain (its last stage, the student,
    is what the trial reports). `runner(cfg, callbacks=...)` takes the Tune forwarder. Ray Train
    reserves each trial's workers itself, so the trials are not nested (see _concurrency)."""
    def attr(function: str):   # imported lazily: the sweep's flags load before Ray does
        return getattr(importlib.import_module(f"cohort.{module}"), function)

    return SweepMethod(
        name, add_flags=lambda p: attr(add_flags)(p), build=lambda a: attr(build)(a),
        validate=lambda c: attr(validate)(c),
        run=lambda cfg, args, on_epoch: attr(runner)(cfg, callbacks=[_tune_forwarder()]),
        units="workers", unit_cpus="cpus_per_worker", unit_gpus="gpus_per_worker",
        member=member, nested=False, history=history)


SWEEP_METHODS: dict[str, SweepMethod] = {
    "dml": _cohort_method("dml"),
    "kdcl": _cohort_method("kdcl"),
    "one": _train_method("one", "one", "add_one_flags", "one_config", "validate_one", "run_one",
                         member="branch"),
    "kd": _train_method("kd", "distill", "add_kd_flags", "kd_config", "validate_chain",
                        "run_chain", member="student", history=_last_stage),
}


def method_parser(method: str) -> argparse.ArgumentParser:
    from .cli import Parser
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
    if method.name == "one":
        return (["best_branch", "best_student", "mean_branch", "mean_student", "ensemble", "average"]
                + [f"branch{i}" for i in range(cfg.branches)])
    if method.name == "kd":   # the distilled student of the chain's last stage
        return ["best_student", "mean_student", "student"]
    return ["best_student", "mean_student", "ensemble"] + [f"student{k}" for k in range(cfg.students)]


def _tune_forwarder():
    """A Ray Train callback (it runs on the Train controller) that turns rank 0's metric rows
    into epoch_metrics and hands them to the Tune trial that started the trainer."""
    from ray.tune.integration.ray_train import TuneReportCallback

    class ForwardEpochMetrics(TuneReportCallback):
        def after_report(self, run_context, metrics, checkpoint):
            rows = (metrics[0] if metrics else {}).get("rows")
            if rows:
                super().after_report(run_context, [epoch_metrics(rows)], None)

    return ForwardEpochMetrics()


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
    def path(self) -> Path:
        return Path(self.storage).resolve() / self.name

    def search_key(self) -> dict:
        keys = ("method", "fixed", "grid", "sample", "samples", "scheduler", "metric",
                "grace_period", "reduction_factor")
        return {k: getattr(self, k) for k in keys}


def _flag_actions(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {a.dest: a for a in parser._actions if a.option_strings and a.dest != "help"}


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
    p.add_argument("--storage", default="runs/sweeps", help="where sweeps live (a shared path on a cluster)")
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


# ---- resources ------------------------------------------------------------------------------
def resolve_resources(spec: SweepSpec) -> dict:
    """Per-unit (student / Train worker) CPUs and GPUs, after checking that the largest trial
    fits the cluster; raises ResourceError naming both."""
    from .cluster import ResourceError, cluster_totals, describe
    method = SWEEP_METHODS[spec.method]
    configs = check_trials(spec)
    cfg = configs[0]
    totals = cluster_totals()
    units = max(getattr(c, method.units) for c in configs)
    explicit_gpus = getattr(cfg, method.unit_gpus)
    gpus = explicit_gpus if explicit_gpus >= 0 else (
        1.0 if totals["GPU"] > 0 and getattr(cfg, "device", "auto") != "cpu" else 0.0)
    explicit_cpus = getattr(cfg, method.unit_cpus)
    share = spec.max_concurrent or 1
    if explicit_cpus > 0:
        cpus = explicit_cpus
    elif gpus > 0:
        cpus = 1.0
    else:
        cpus = max(0.01, math.floor(100 * (totals["CPU"] - share * TRIAL_CPUS) / (share * units)) / 100)
    need = {"CPU": TRIAL_CPUS + units * cpus, "GPU": units * gpus}
    flag = "--" + method.unit_cpus.replace("_", "-")
    if any(need[k] > totals[k] + 1e-9 for k in need):
        raise ResourceError(
            f"one {spec.method} trial needs {describe(need)} (the trial's own CPU {TRIAL_CPUS:g} + "
            f"{units} {method.units} x {describe({'CPU': cpus, 'GPU': gpus})}), but the cluster has "
            f"{describe(totals)}; lower {flag} or --{method.units}, or add nodes")
    biggest_node = _largest_node()
    one = {"CPU": cpus, "GPU": gpus}
    if biggest_node and any(one[k] > biggest_node.get(k, 0.0) + 1e-9 for k in one):
        raise ResourceError(f"one of the {method.units} needs {describe(one)}, more than any node "
                            f"has (largest: {describe(biggest_node)})")
    fits = math.floor(min(totals[k] / need[k] for k in need if need[k] > 0) + 1e-9)
    return {"cpus": cpus, "gpus": gpus, "trial_cpus": TRIAL_CPUS, "fits": max(1, fits)}


def _largest_node() -> dict:
    import ray
    best = {}
    for node in ray.nodes():
        if node.get("Alive"):
            res = node.get("Resources", {})
            if res.get("CPU", 0.0) > best.get("CPU", 0.0):
                best = {"CPU": res.get("CPU", 0.0), "GPU": res.get("GPU", 0.0)}
    return best


def trial_resources(spec: dict, config: dict):
    """The trial's placement group: its own bundle, then (nested methods) one bundle per unit."""
    from ray import tune
    from .cluster import bundle
    method = SWEEP_METHODS[spec["method"]]
    res = spec["resources"]
    bundles = [{"CPU": res["trial_cpus"]}]
    if method.nested:
        units = config.get(method.units)
        if units is None:
            units = getattr(trial_args(SweepSpec(**spec), {}), method.units)
        bundles += [bundle(res["cpus"], res["gpus"])] * int(units)
    return tune.PlacementGroupFactory(bundles, strategy="PACK")


# ---- the trial ------------------------------------------------------------------------------
def trial_config(spec: SweepSpec, params: dict, run_dir: Path, name: str):
    method = SWEEP_METHODS[spec.method]
    args = trial_args(spec, params)
    args.output, args.name = str(run_dir), name
    args.overwrite, args.resume = False, False
    setattr(args, method.unit_cpus, spec.resources["cpus"])
    setattr(args, method.unit_gpus, spec.resources["gpus"])
    return method.build(args), args


def stored_epochs(run_dir: Path) -> tuple[int, list[list[dict]]]:
    """(epochs completed by the latest checkpoint, their metric rows grouped by epoch)."""
    import pyarrow.parquet as pq
    from .runs import latest_checkpoint
    latest = latest_checkpoint(run_dir)
    if latest is None:
        return 0, []
    done = json.loads((latest / "meta.json").read_text())["epochs_completed"]
    metrics = run_dir / "metrics.parquet"
    rows = pq.read_table(metrics).to_pylist() if metrics.exists() else []
    by_epoch: dict[int, list[dict]] = {}
    for row in rows:
        if row["epoch"] < done:
            by_epoch.setdefault(row["epoch"], []).append(row)
    return done, [by_epoch[e] for e in sorted(by_epoch)]


def run_trial(config: dict, spec: dict) -> None:
    """The Tune function trainable: one trial = one run of the method."""
    from ray import tune
    sweep = SweepSpec(**spec)
    method = SWEEP_METHODS[sweep.method]
    trial_id = tune.get_context().get_trial_id()
    run_dir = sweep.path / RUNS_DIR / trial_id
    cfg, args = trial_config(sweep, config, run_dir, f"{sweep.name}-{trial_id}")
    done, history = stored_epochs(method.history(run_dir))
    if done:                       # a restarted trial: continue its run, replay what Tune lost
        cfg.resume = True
        for rows in history:
            tune.report(epoch_metrics(rows))
        if done >= cfg.epochs:
            return
    elif run_dir.exists():         # started before, no checkpoint yet: start again
        cfg.overwrite = True
    method.run(cfg, args, lambda rows: tune.report(epoch_metrics(rows)))


def trial_dirname(trial) -> str:
    return f"trial-{trial.trial_id}"


# ---- driving the sweep ------------------------------------------------------------------------
def param_space(spec: SweepSpec) -> dict:
    from ray import tune
    space: dict[str, Any] = {d: tune.grid_search(v) for d, v in spec.grid.items()}
    for dest, (dist, *a) in spec.sample.items():
        numeric_int = all(isinstance(x, int) and not isinstance(x, bool) for x in a)
        if dist == "choice":
            space[dest] = tune.choice(a)
        elif dist == "uniform":
            space[dest] = tune.randint(a[0], a[1] + 1) if numeric_int else tune.uniform(*a)
        else:
            space[dest] = tune.lograndint(a[0], a[1] + 1) if numeric_int else tune.loguniform(*a)
    return space


def _trainable(spec: SweepSpec):
    from ray import tune
    frozen = asdict(spec)
    fn = tune.with_parameters(run_trial, spec=frozen)
    return tune.with_resources(fn, lambda config: trial_resources(frozen, config))


def _tuner(spec: SweepSpec, concurrency: int):
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
    epochs = max(c.epochs for c in check_trials(spec))
    scheduler = FIFOScheduler()
    if spec.scheduler == "asha":
        scheduler = ASHAScheduler(time_attr="epoch", max_t=epochs, grace_period=spec.grace_period,
                                  reduction_factor=spec.reduction_factor)
    return tune.Tuner(
        _trainable(spec), param_space=param_space(spec),
        tune_config=tune.TuneConfig(metric=spec.metric, mode="max", scheduler=scheduler,
                                    num_samples=spec.samples, max_concurrent_trials=concurrency,
                                    trial_dirname_creator=trial_dirname,
                                    reuse_actors=SWEEP_METHODS[spec.method].nested),
        run_config=tune.RunConfig(name=spec.name, storage_path=str(spec.path.parent), verbose=1))


def _concurrency(spec: SweepSpec) -> int | None:
    method = SWEEP_METHODS[spec.method]
    if method.nested:           # the trial's placement group holds everything it uses
        return spec.max_concurrent or None
    fits = spec.resources["fits"]   # Ray Train reserves its workers outside Tune's view
    if spec.max_concurrent and spec.max_concurrent <= fits:
        return spec.max_concurrent
    if spec.max_concurrent:
        print(f"sweep: --max-concurrent {spec.max_concurrent} lowered to {fits}: Ray Train reserves "
              "each ONE trial's workers itself, and the cluster holds that many trials", flush=True)
    return fits


def _resumed_spec(args: argparse.Namespace) -> SweepSpec:
    path = Path(args.storage).resolve() / args.name
    from ray.tune import Tuner
    if not (path / SPEC_FILE).exists() or not Tuner.can_restore(str(path)):
        raise UsageError("--resume", f"no restorable sweep at {path}")
    stored = SweepSpec(**json.loads((path / SPEC_FILE).read_text()))
    stored.storage = str(path.parent)
    asked = (args.method is not None or args.grid or args.sample or args.space
             or getattr(args, "fixed", None))
    if asked:
        if args.method is None:
            args.method = stored.method
        given = spec_from_args(args).search_key()
        diffs = [k for k, v in stored.search_key().items() if given[k] != v]
        if diffs:
            raise UsageError("--resume", "these settings differ from the stored sweep's: "
                                         + ", ".join(diffs) + " (leave them out to resume as stored)")
    return stored


def run_sweep(spec: SweepSpec, resume: bool = False) -> dict:
    """Run (or continue) the sweep; returns {"path", "trials", "best", "interrupted"}."""
    from ray import tune
    from .cluster import connect
    from .runs import write_json

    path = spec.path
    if not resume and (path / SPEC_FILE).exists():
        raise UsageError("--name", f"{path} holds a sweep already: pass --resume to continue it, "
                                   "or choose another --name or --storage")
    connect(f"sweep-{spec.method}", spec.name)
    spec.resources = resolve_resources(spec)
    concurrency = _concurrency(spec)
    path.mkdir(parents=True, exist_ok=True)
    write_json(path / SPEC_FILE, asdict(spec))
    if resume:
        tuner = tune.Tuner.restore(str(path), trainable=_trainable(spec), resume_unfinished=True,
                                   resume_errored=True)
    else:
        tuner = _tuner(spec, concurrency)
    tuner.fit()
    return collect_results(spec)


# ---- results ----------------------------------------------------------------------------------
def _trial_epochs(run_dir: Path) -> list[dict]:
    import pyarrow.parquet as pq
    metrics = run_dir / "metrics.parquet"
    if not metrics.exists():
        return []
    by_epoch: dict[int, list[dict]] = {}
    for row in pq.read_table(metrics).to_pylist():
        by_epoch.setdefault(row["epoch"], []).append(row)
    return [epoch_metrics(by_epoch[e]) for e in sorted(by_epoch)]


def _status(trial, epochs_run: int, epochs: int) -> str:
    if trial.status == "ERROR":
        return "error"
    if trial.status != "TERMINATED":
        return "unfinished"
    return "completed" if epochs_run >= epochs else "stopped"


def _error_line(trial) -> str:
    path = getattr(trial, "error_file", None) or ""
    try:
        text = Path(path).read_text().strip().splitlines() if path else []
    except OSError:
        text = []
    return text[-1][:300] if text else ""


def collect_results(spec: SweepSpec) -> dict:
    """results.parquet, best.json and the leaderboard, from Tune's trials and their run dirs."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from ray.tune import ExperimentAnalysis
    from .runs import write_json

    path = spec.path
    analysis = ExperimentAnalysis(str(path), default_metric=spec.metric, default_mode="max")
    searched = list(spec.grid) + list(spec.sample)
    method = SWEEP_METHODS[spec.method]
    reported = metric_names(method, check_trials(spec)[0])
    keys = [k for k in ("best_student", "mean_student", "ensemble", "average") if k in reported]
    if spec.metric not in keys:
        keys.append(spec.metric)
    rows = []
    for trial in sorted(analysis.trials, key=lambda t: t.trial_id):
        run_dir = path / RUNS_DIR / trial.trial_id
        history = _trial_epochs(method.history(run_dir))
        config_file = run_dir / "config.json"
        epochs = (json.loads(config_file.read_text())["epochs"] if config_file.exists()
                  else trial.config.get("epochs", 0))
        row = {"trial_id": trial.trial_id, **{k: trial.config.get(k) for k in searched},
               "status": _status(trial, len(history), epochs), "epochs": len(history)}
        for key in keys:
            values = [h.get(key) for h in history if h.get(key) is not None]
            row[f"final_{key}"] = values[-1] if values else None
            row[f"best_{key}"] = max(values) if values else None
        values = [(h.get(spec.metric), h["epoch"]) for h in history if h.get(spec.metric) is not None]
        row["best_epoch"] = max(values)[1] if values else None
        row["run_dir"] = str(run_dir)
        row["error"] = _error_line(trial) if trial.status == "ERROR" else ""
        rows.append(row)
    pq.write_table(pa.Table.from_pylist(rows), path / "results.parquet")
    ranked = sorted(rows, key=lambda r: (r[f"best_{spec.metric}"] is None,
                                         -(r[f"best_{spec.metric}"] or 0.0),
                                         -(r[f"final_{spec.metric}"] or 0.0)))
    best = None
    if ranked and ranked[0][f"best_{spec.metric}"] is not None:
        top = ranked[0]
        run_dir = Path(top["run_dir"])
        best = {"metric": spec.metric, "trial_id": top["trial_id"],
                "params": {k: top[k] for k in searched}, "best": top[f"best_{spec.metric}"],
                "best_epoch": top["best_epoch"], "final": top[f"final_{spec.metric}"],
                "epochs": top["epochs"], "status": top["status"], "run_dir": str(run_dir),
                "config": (json.loads((run_dir / "config.json").read_text())
                           if (run_dir / "config.json").exists() else {})}
        write_json(path / "best.json", best)
    interrupted = [r for r in rows if r["status"] == "unfinished"]
    return {"path": str(path), "metric": spec.metric, "searched": searched, "trials": ranked,
            "best": best, "interrupted": len(interrupted)}


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


def run_sweep_job(args: argparse.Namespace) -> dict:
    """`cohort sweep`: validate, run, write results, print the leaderboard."""
    if args.resume:
        _check_range(args)
        spec = _resumed_spec(args)
    else:
        spec = spec_from_args(args)
    result = run_sweep(spec, resume=args.resume)
    print(f"\nsweep {spec.name}: {len(result['trials'])} trials -> {result['path']}", flush=True)
    print(leaderboard(result), flush=True)
    if result["best"]:
        best = result["best"]
        print(f"best: {best['trial_id']} {best['params']} {spec.metric} {best['best']:.2f}% "
              f"(epoch {best['best_epoch']}) -> {best['run_dir']}", flush=True)
    if result["interrupted"]:
        print(f"sweep interrupted with {result['interrupted']} trial(s) unfinished; continue it "
              f"with: cohort sweep --resume --name {spec.name} --storage {spec.storage}",
              file=sys.stderr, flush=True)
        raise SystemExit(EXIT_INTERRUPTED)
    if result["trials"] and all(r["status"] == "error" for r in result["trials"]):
        print(f"error: every trial failed (first: {result['trials'][0]['error']})", file=sys.stderr)
        raise SystemExit(1)
    return {"sweep": result["path"], "best": result["best"]}
