"""Joining or starting Ray, and reserving a cohort's resources with a bounded wait."""
from __future__ import annotations

import logging
import math
import os

import ray
import ray.job_config
from ray.util.placement_group import placement_group, remove_placement_group

from ..errors import ResourceError  # noqa: F401  (raised here; callers import it from here too)


def connect(method: str = "", run: str = "", address: str | None = None):
    """Join the cluster at `address` / RAY_ADDRESS (set inside `ray job submit`), else start a
    local instance whose dashboard listens on 127.0.0.1 only. Token authentication stays as
    Ray sets it (on for local clusters in Ray >= 2.59). The driver's job carries metadata
    {cohort_method, cohort_run} on the dashboard's Jobs page (a submission's own metadata is
    kept beside it)."""
    if ray.is_initialized():
        return None
    metadata = {k: v for k, v in (("cohort_method", method), ("cohort_run", run)) if v}
    job_config = ray.job_config.JobConfig(metadata=metadata)
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        return ray.init(address=address, job_config=job_config, logging_level=logging.WARNING)
    return ray.init(address="local", dashboard_host="127.0.0.1", job_config=job_config,
                    logging_level=logging.WARNING)


def cluster_totals() -> dict[str, float]:
    res = ray.cluster_resources()
    return {"CPU": float(res.get("CPU", 0.0)), "GPU": float(res.get("GPU", 0.0))}


def unit_resources(units: int, cpus: float, gpus: float, use_gpus: bool = True) -> tuple[float, float]:
    """(CPUs, GPUs) for each of `units` actors or Train workers; -1 means the default: one GPU
    each (and one CPU) on a GPU cluster unless `use_gpus` is off, else the cluster's CPUs shared
    out among the units, fractions allowed, so K students fit a laptop."""
    totals = cluster_totals()
    if gpus < 0:
        gpus = 1.0 if totals["GPU"] > 0 and use_gpus else 0.0
    if cpus <= 0:
        cpus = 1.0 if gpus > 0 else max(0.01, math.floor(100 * totals["CPU"] / units) / 100)
    return float(cpus), float(gpus)


def describe(resources: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:g}" for k, v in sorted(resources.items()))


def bundle(cpus: float, gpus: float) -> dict[str, float]:
    """A placement-group bundle; Ray rejects zero-valued entries."""
    out = {"CPU": cpus}
    if gpus > 0:
        out["GPU"] = gpus
    return out


def reserve(bundles: list[dict[str, float]], strategy: str, timeout: float, what: str):
    """A ready placement group, or ResourceError within `timeout` seconds (never waits forever)."""
    asked = {k: sum(b.get(k, 0.0) for b in bundles) for k in ("CPU", "GPU")}
    totals = cluster_totals()
    short = [k for k in asked if asked[k] > totals[k] + 1e-9]
    if short:
        raise ResourceError(f"{what} asks for {describe(asked)} in {len(bundles)} bundles "
                            f"({describe(bundles[0])} each), but the cluster has {describe(totals)}")
    group = placement_group(bundles, strategy=strategy.upper())
    if not group.wait(timeout_seconds=timeout):
        remove_placement_group(group)
        free = ray.available_resources()
        raise ResourceError(f"{what} could not reserve {describe(asked)} ({len(bundles)} bundles, "
                            f"{strategy}) within {timeout:g}s; available now: "
                            f"{describe({k: free.get(k, 0.0) for k in ('CPU', 'GPU')})}")
    return group
