"""The Ray Tune side of `cohort sweep` (the spec, its flags and search space: cohort.sweep).

Each trial is a Tune function trainable (`run_trial`) that builds its method's config from
the fixed flags and its searched values and runs it, reporting every epoch's test accuracies
so ASHA can stop it early:

* cohort trials (DML, KDCL, ...) start their student actors in bundles of the trial's own
  placement group (its own bundle plus one per student), so concurrent trials never starve
  each other and a stopped trial's actors go with it;
* Ray Train trials (ONE, OKDDip, PCL, KD chains) run their TorchTrainer inside the trainable
  (the Ray 2.60 Train/Tune pattern) with a Train callback forwarding rank 0's metric rows to
  Tune; Ray Train reserves its workers itself, so the trial reserves only its own bundle and
  the sweep caps concurrency at what the cluster holds.

`run_sweep` runs or restores the Tune experiment STORAGE/NAME (a local folder or a URI's:
Tune, the trials' run directories and the results all use its filesystem); `collect_results`
writes results.parquet and best.json; `run_sweep_job` is `cohort sweep`.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pyarrow as pa
from ray import tune
from ray.tune import ExperimentAnalysis, Tuner
from ray.tune.integration.ray_train import TuneReportCallback
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

from ..errors import UsageError
from ..runs import write_json
from ..storage import (first_line, location, ray_storage, read_parquet, require_bucket,
                       write_parquet)
from ..runtime import run
from .cluster import ResourceError, bundle, capacity, connect, describe, never_fits
from ..sweep import (EXIT_INTERRUPTED, RUNS_DIR, SPEC_FILE, SWEEP_METHODS, TRIAL_CPUS, SweepSpec,
                     _check_range, check_trials, epoch_metrics, leaderboard, metric_names,
                     spec_from_args, stored_epochs, trial_args, trial_config)


def tune_forwarder():
    """A Ray Train callback (it runs on the Train controller) that turns rank 0's metric rows
    into epoch_metrics and hands them to the Tune trial that started the trainer."""

    class ForwardEpochMetrics(TuneReportCallback):
        def after_report(self, run_context, metrics, checkpoint):
            rows = (metrics[0] if metrics else {}).get("rows")
            if rows:
                super().after_report(run_context, [epoch_metrics(rows)], None)

    return ForwardEpochMetrics()


# ---- resources ------------------------------------------------------------------------------
def resolve_resources(spec: SweepSpec) -> dict:
    """Per-unit (student / Train worker) CPUs and GPUs, after checking that the largest trial
    can ever fit the cluster (now, or once its autoscaler adds nodes); raises ResourceError
    naming both. `fits`: how many such trials the cluster holds at once (by what its autoscaler
    says it can grow to, where it says so); `grows`: an autoscaler that does not say how far."""
    method = SWEEP_METHODS[spec.method]
    configs = check_trials(spec)
    cfg = configs[0]
    cap = capacity()
    totals = cap.totals
    units = max(getattr(c, method.units) for c in configs)
    explicit_gpus = getattr(cfg, method.unit_gpus)
    gpus = explicit_gpus if explicit_gpus >= 0 else (
        1.0 if cap.has_gpus and getattr(cfg, "device", "auto") != "cpu" else 0.0)
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
    reason = never_fits([{"CPU": TRIAL_CPUS}] + [bundle(cpus, gpus)] * units, cap)
    if reason is not None:
        raise ResourceError(
            f"one {spec.method} trial needs {describe(need)} (the trial's own CPU {TRIAL_CPUS:g} + "
            f"{units} {method.units} x {describe({'CPU': cpus, 'GPU': gpus})}), but {reason}; "
            f"lower {flag} or --{method.units}, or add nodes")
    reach = _trials_within(cap.ceiling, need) if cap.autoscaling and cap.ceiling else math.inf
    grows = cap.autoscaling and math.isinf(reach)
    fits = _trials_within(totals, need) if grows or not cap.autoscaling else reach
    return {"cpus": cpus, "gpus": gpus, "trial_cpus": TRIAL_CPUS, "fits": max(1, int(fits)),
            "grows": grows}


def _trials_within(resources: dict, need: dict) -> float:
    """How many trials needing `need` fit in `resources` (inf for an unbounded ceiling)."""
    room = min(resources[k] / need[k] for k in need if need[k] > 0)
    return room if math.isinf(room) else math.floor(room + 1e-9)


def trial_resources(spec: dict, config: dict):
    """The trial's placement group: its own bundle, then (nested methods) one bundle per unit."""
    method = SWEEP_METHODS[spec["method"]]
    res = spec["resources"]
    bundles = [{"CPU": res["trial_cpus"]}]
    if method.nested:
        units = config.get(method.units)
        if units is None:
            units = getattr(method.build(trial_args(SweepSpec(**spec), {})), method.units)
        bundles += [bundle(res["cpus"], res["gpus"])] * int(units)
    return tune.PlacementGroupFactory(bundles, strategy="PACK")


def run_trial(config: dict, spec: dict) -> None:
    """The Tune function trainable: one trial = one run of the method."""
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
    if method.nested:   # a cohort: its actors report each epoch's rows from this process
        run(cfg, on_epoch=lambda rows: tune.report(epoch_metrics(rows)))
    else:               # Ray Train: rank 0's rows come through the Train controller
        run(cfg, callbacks=[tune_forwarder()])


def trial_dirname(trial) -> str:
    return f"trial-{trial.trial_id}"


# ---- driving the sweep ------------------------------------------------------------------------
def param_space(spec: SweepSpec) -> dict:
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
    frozen = asdict(spec)
    fn = tune.with_parameters(run_trial, spec=frozen)
    return tune.with_resources(fn, lambda config: trial_resources(frozen, config))


def _tuner(spec: SweepSpec, concurrency: int):
    epochs = max(c.epochs for c in check_trials(spec))
    scheduler = FIFOScheduler()
    if spec.scheduler == "asha":
        scheduler = ASHAScheduler(time_attr="epoch", max_t=epochs, grace_period=spec.grace_period,
                                  reduction_factor=spec.reduction_factor)
    storage_path, filesystem = ray_storage(spec.path.parent)   # a local folder or a URI's
    return tune.Tuner(
        _trainable(spec), param_space=param_space(spec),
        tune_config=tune.TuneConfig(metric=spec.metric, mode="max", scheduler=scheduler,
                                    num_samples=spec.samples, max_concurrent_trials=concurrency,
                                    trial_dirname_creator=trial_dirname,
                                    reuse_actors=SWEEP_METHODS[spec.method].nested),
        run_config=tune.RunConfig(name=spec.name, storage_path=storage_path,
                                  storage_filesystem=filesystem, verbose=1))


def _concurrency(spec: SweepSpec) -> int | None:
    method = SWEEP_METHODS[spec.method]
    if method.nested:           # the trial's placement group holds everything it uses
        return spec.max_concurrent or None
    fits = spec.resources["fits"]   # Ray Train reserves its workers outside Tune's view
    if spec.max_concurrent and (spec.max_concurrent <= fits or spec.resources.get("grows")):
        return spec.max_concurrent   # (an autoscaler of unknown reach may make room for more)
    if spec.max_concurrent:
        print(f"sweep: --max-concurrent {spec.max_concurrent} lowered to {fits}: Ray Train reserves "
              "each ONE trial's workers itself, and the cluster holds that many trials", flush=True)
    return fits


def _resumed_spec(args: argparse.Namespace) -> SweepSpec:
    path = location(args.storage, "--storage").resolve() / args.name
    try:
        restorable = (path / SPEC_FILE).exists() and Tuner.can_restore(*ray_storage(path))
    except OSError as exc:   # an unreachable endpoint, a missing bucket, refused credentials
        raise UsageError("--storage", f"cannot read {path} ({first_line(exc)})") from None
    if not restorable:
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

    path = spec.path
    try:
        require_bucket(path, "--storage")
        taken = (path / SPEC_FILE).exists()
    except OSError as exc:   # an unreachable endpoint, a missing bucket, refused credentials
        raise UsageError("--storage", f"cannot read {path} ({first_line(exc)})") from None
    if not resume and taken:
        raise UsageError("--name", f"{path} holds a sweep already: pass --resume to continue it, "
                                   "or choose another --name or --storage")
    connect(f"sweep-{spec.method}", spec.name)
    spec.resources = resolve_resources(spec)
    concurrency = _concurrency(spec)
    path.mkdir(parents=True, exist_ok=True)
    write_json(path / SPEC_FILE, asdict(spec))
    if resume:
        experiment, filesystem = ray_storage(path)
        tuner = tune.Tuner.restore(experiment, trainable=_trainable(spec), resume_unfinished=True,
                                   resume_errored=True, storage_filesystem=filesystem)
    else:
        tuner = _tuner(spec, concurrency)
    tuner.fit()
    return collect_results(spec)


# ---- results ----------------------------------------------------------------------------------
def _trial_epochs(run_dir: Path) -> list[dict]:
    metrics = run_dir / "metrics.parquet"
    if not metrics.exists():
        return []
    by_epoch: dict[int, list[dict]] = {}
    for row in read_parquet(metrics).to_pylist():
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

    path = spec.path
    experiment, filesystem = ray_storage(path)
    analysis = ExperimentAnalysis(experiment, storage_filesystem=filesystem,
                                  default_metric=spec.metric, default_mode="max")
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
    write_parquet(pa.Table.from_pylist(rows), path / "results.parquet")
    ranked = sorted(rows, key=lambda r: (r[f"best_{spec.metric}"] is None,
                                         -(r[f"best_{spec.metric}"] or 0.0),
                                         -(r[f"final_{spec.metric}"] or 0.0)))
    best = None
    if ranked and ranked[0][f"best_{spec.metric}"] is not None:
        top = ranked[0]
        run_dir = location(top["run_dir"])
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
