"""Joining or starting Ray, what the cluster holds and whether it can grow, reserving resources
with a bounded wait, and the device Ray gave this process.

A request the cluster can never hold fails at once; one that may fit later (resources busy, or
an autoscaler that can add nodes) is asked for and waited on up to --startup-timeout, then
fails with one line saying what was asked and what exists. `Capacity` is the snapshot that
decides (totals, nodes, whether an autoscaler runs and, where it says so, how far it can
grow); `never_fits` is the pure decision.
"""
from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass

import ray
import ray.job_config
import torch
from ray.util.placement_group import placement_group, remove_placement_group

from ..devices import assigned_device, cpu_only_environment, packed_gpus
from ..errors import ResourceError   # raised here; callers import it from here too

KINDS = ("CPU", "GPU")
EPS = 1e-9
AUTOSCALING_ENV = "RAY_COHORT_AUTOSCALING"   # 1 / 0: say whether an autoscaler runs
NODE_GROUP_LABEL = "ray.io/node-group"       # Ray sets it from RAY_NODE_TYPE_NAME
V1_STATUS_KEY = "__autoscaling_status"       # what autoscaler v1's monitor publishes (`ray status`)


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


# ---- is there an autoscaler? --------------------------------------------------------------
@dataclass(frozen=True)
class ScalerSignals:
    """What the cluster says about an autoscaler; `autoscaling` reads them."""
    override: str | None = None                 # RAY_COHORT_AUTOSCALING, when set
    node_groups: tuple | None = None            # (min, max) node counts per group of the cluster
                                                # config an autoscaler reported; None: none reported
    v1_node_types: dict | None = None           # autoscaler v1's node -> node type map, if any
    v2_enabled: bool = False                    # the GCS runs autoscaler v2
    labelled_groups: tuple = ()                 # the alive nodes' node-group labels


def autoscaling(signals: ScalerSignals) -> bool:
    """Whether an autoscaler may add nodes, in this order of trust:

    1. RAY_COHORT_AUTOSCALING=1 or 0 decides when set: for an autoscaler these signals miss
       (or to turn the waiting off);
    2. the cluster config an autoscaler reports to the GCS (Anyscale, and Ray's autoscaler v2
       after 2.60; what Ray Data and Ray Train read): some node group can grow;
    3. autoscaler v1's status: its monitor also runs on a fixed cluster, read-only, and then
       names every node's type "node_<node id>"; any other type comes from an autoscaling
       config (`ray up`, KubeRay);
    4. autoscaler v2 (default for `ray up` since Ray 2.50, and on KubeRay with autoscaling):
       the nodes it starts carry a node type (RAY_NODE_TYPE_NAME, the ray.io/node-group label);
       a hand-started node carries none.
    Nothing of these: a fixed cluster."""
    if signals.override is not None and signals.override.strip():
        return signals.override.strip().lower() in ("1", "true", "yes", "on")
    if signals.node_groups is not None:
        return any(most == -1 or most > least for least, most in signals.node_groups)
    if signals.v1_node_types:
        return any(kind != f"node_{node}" for node, kind in signals.v1_node_types.items())
    return signals.v2_enabled and any(signals.labelled_groups)


def _cluster_config():
    """The cluster config an autoscaler reported to the GCS, or None (a private Ray API:
    absent or changed in another Ray version means none)."""
    try:
        return ray._private.state.state.get_cluster_config()
    except Exception:  # noqa: BLE001
        return None


def _v1_node_types() -> dict | None:
    try:
        from ray.experimental.internal_kv import _internal_kv_get
        status = _internal_kv_get(V1_STATUS_KEY)
        if not status:
            return None
        return json.loads(status).get("autoscaler_report", {}).get("node_type_mapping")
    except Exception:  # noqa: BLE001
        return None


def _v2_enabled() -> bool:
    try:
        from ray.autoscaler.v2.utils import is_autoscaler_v2
        return bool(is_autoscaler_v2(fetch_from_server=True))
    except Exception:  # noqa: BLE001
        return False


def _node_groups(config) -> list[tuple[dict, int, int]]:
    """(resources, min count, max count) of each node group in a reported cluster config
    that can hold a node (max count -1: unbounded)."""
    if config is None:
        return []
    return [(dict(g.resources), g.min_count, g.max_count) for g in config.node_group_configs
            if g.resources and g.max_count != 0]


def scaler_signals(nodes: list[dict], config) -> ScalerSignals:
    groups = _node_groups(config)
    return ScalerSignals(override=os.environ.get(AUTOSCALING_ENV),
                         node_groups=tuple((least, most) for _, least, most in groups) or None,
                         v1_node_types=_v1_node_types(), v2_enabled=_v2_enabled(),
                         labelled_groups=tuple((n.get("Labels") or {}).get(NODE_GROUP_LABEL, "")
                                               for n in nodes))


# ---- what the cluster holds and can grow to ------------------------------------------------
def _cpu_gpu(resources) -> dict[str, float]:
    return {k: float(resources.get(k, 0.0)) for k in KINDS}


@dataclass(frozen=True)
class Capacity:
    """The cluster as a resource request sees it."""
    totals: dict                  # CPU and GPU of the alive nodes
    nodes: tuple = ()             # each alive node's CPU and GPU
    autoscaling: bool = False     # an autoscaler may add nodes
    ceiling: dict | None = None   # the most the autoscaler says it can grow to; None: unknown
    node_types: tuple = ()        # the CPU and GPU of each node type it can add, when it says

    @property
    def has_gpus(self) -> bool:
        """GPUs now, or GPU nodes the autoscaler says it can add."""
        return self.totals["GPU"] > 0 or bool(self.ceiling and self.ceiling.get("GPU", 0) > 0)


def growth_ceiling(groups: list[tuple[dict, int, int]], limits: dict) -> dict[str, float]:
    """The most CPU and GPU a cluster config's node groups can reach (each group's max count
    times its node's resources; a max count of -1 is unbounded), capped by its max_resources."""
    ceiling = {}
    for kind in KINDS:
        total = 0.0
        for resources, _, most in groups:
            each = float(resources.get(kind, 0))
            total += math.inf if each and most == -1 else each * max(most, 0)
        ceiling[kind] = min(total, float(limits.get(kind, math.inf)))
    return ceiling


def capacity() -> Capacity:
    """A snapshot of the connected cluster."""
    alive = [n for n in ray.nodes() if n.get("Alive")]
    config = _cluster_config()
    scaling = autoscaling(scaler_signals(alive, config))
    groups = _node_groups(config)
    ceiling, types = None, ()
    if scaling and groups:   # the autoscaler said how far it can grow
        ceiling = growth_ceiling(groups, dict(config.max_resources))
        types = tuple(_cpu_gpu(resources) for resources, _, _ in groups)
    return Capacity(totals=_cpu_gpu(ray.cluster_resources()),
                    nodes=tuple(_cpu_gpu(n.get("Resources", {})) for n in alive),
                    autoscaling=scaling, ceiling=ceiling, node_types=types)


def cluster_totals() -> dict[str, float]:
    return _cpu_gpu(ray.cluster_resources())


def unit_resources(units: int, cpus: float, gpus: float, use_gpus: bool = True,
                   cap: Capacity | None = None) -> tuple[float, float]:
    """(CPUs, GPUs) for each of `units` actors or Train workers; -1 means the default: one GPU
    each (and one CPU) on a GPU cluster (one with GPUs, or whose autoscaler says it can add
    some) unless `use_gpus` is off, else the cluster's CPUs shared out among the units,
    fractions allowed, so K students fit a laptop (and, on several nodes, the nodes)."""
    cap = cap or capacity()
    if gpus < 0:
        gpus = 1.0 if cap.has_gpus and use_gpus else 0.0
    if cpus <= 0:
        cpus = 1.0 if gpus > 0 else cpu_share([n["CPU"] for n in cap.nodes] or [cap.totals["CPU"]],
                                              units)
    return float(cpus), float(gpus)


def cpu_share(node_cpus: list[float], units: int) -> float:
    """The largest CPU amount, in hundredths (at least 0.01), of which `units` bundles fit the
    nodes, each node holding as many as its CPUs allow: on one node, its CPUs / units; on two
    2-CPU nodes, 2 for 1 or 2 units and 1 for 3 or 4 (never 4 / 3, which no 2 nodes hold)."""
    def fits(share: float) -> bool:
        return sum(math.floor(n / share + EPS) for n in node_cpus) >= units
    candidates = {math.floor(100 * n / k + EPS) / 100 for n in node_cpus for k in range(1, units + 1)}
    return max([c for c in candidates if c > 0 and fits(c)], default=0.01)


def describe(resources: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:g}" for k, v in sorted(resources.items()))


def bundle(cpus: float, gpus: float) -> dict[str, float]:
    """A placement-group bundle; Ray rejects zero-valued entries."""
    out = {"CPU": cpus}
    if gpus > 0:
        out["GPU"] = gpus
    return out


def request_totals(bundles: list[dict]) -> dict[str, float]:
    return {k: sum(b.get(k, 0.0) for b in bundles) for k in KINDS}


def _holds(node: dict, one: dict) -> bool:
    return all(one.get(k, 0.0) <= node.get(k, 0.0) + EPS for k in KINDS)


def never_fits(bundles: list[dict], cap: Capacity) -> str | None:
    """Why `bundles` can never all be placed, as a clause for the error ("the cluster has
    ..."), or None when they fit now, once busy resources are freed, or maybe once an
    autoscaler adds nodes. An autoscaler that does not say how far it can grow gets the
    benefit of the doubt: the wait (--startup-timeout) bounds it."""
    asked = request_totals(bundles)
    if cap.autoscaling and cap.ceiling is None:
        return None
    limit = cap.ceiling if cap.autoscaling else cap.totals
    if any(asked[k] > limit[k] + EPS for k in KINDS):
        if cap.autoscaling:
            return (f"the cluster has {describe(cap.totals)} and its autoscaler can grow it to "
                    f"{describe(limit)}")
        return f"the cluster has {describe(cap.totals)} and no autoscaler to add nodes"
    hosts = cap.nodes + (cap.node_types if cap.autoscaling else ())   # nodes there may be
    for one in bundles:
        if hosts and not any(_holds(h, one) for h in hosts):
            largest = max(hosts, key=lambda h: (h["GPU"], h["CPU"]))
            return f"no node can hold a bundle of {describe(one)} (the largest: {describe(largest)})"
    return None


def pack_hint(bundles: list[dict], gpus_now: float, gpu_flag: str, unit: str) -> str:
    """The end of a refusal that names the packing flag ("; to share the 1 GPU(s) among the
    4 students, pass --gpus-per-student 0.25") when fractions of the cluster's GPUs would
    fit the units, else ""."""
    each, count = bundles[0].get("GPU", 0.0), len(bundles)
    if each <= 0 or gpus_now <= 0 or each * count <= gpus_now + EPS:
        return ""
    packed = packed_gpus(gpus_now, count)
    if not 0 < packed < each:
        return ""
    return f"; to share the {gpus_now:g} GPU(s) among the {count} {unit}s, pass {gpu_flag} {packed:g}"


# ---- asking for resources --------------------------------------------------------------------
@dataclass(frozen=True)
class Request:
    """What a job asks the cluster for, and how its errors name it."""
    bundles: list
    who: str                        # "a 4-student cohort", "2 workers"
    verb: str = "asks"              # "2 workers ask"
    unit: str = "student"
    gpu_flag: str = "--gpus-per-student"

    def refusal(self, reason: str, cap: Capacity) -> ResourceError:
        asked = request_totals(self.bundles)
        return ResourceError(f"{self.who} {self.verb} for {describe(asked)} in {len(self.bundles)} "
                             f"bundles ({describe(self.bundles[0])} each), but {reason}"
                             + pack_hint(self.bundles, cap.totals["GPU"], self.gpu_flag, self.unit))


def refuse_if_never_fits(request: Request, cap: Capacity) -> None:
    reason = never_fits(request.bundles, cap)
    if reason is not None:
        raise request.refusal(reason, cap)


def _ask_autoscaler(bundles: list[dict]) -> bool:
    """Tell the autoscaler to add nodes for `bundles` at once (past its upscaling speed);
    the pending placement group alone would also get them, one step at a time."""
    try:
        from ray.autoscaler.sdk import request_resources
        request_resources(bundles=[dict(b) for b in bundles])
        return True
    except Exception as exc:  # noqa: BLE001  (a hint: the placement group asks anyway)
        logging.getLogger(__name__).warning("request_resources failed: %s", exc)
        return False


def _withdraw_autoscaler_request() -> None:
    """A request stands until replaced; once the group holds its nodes (or gave up), drop it
    so the cluster can scale down after the run. Ray keeps one such request per cluster, so
    this also clears another driver's standing request_resources()."""
    try:
        from ray.autoscaler.sdk import request_resources
        request_resources(bundles=[])
    except Exception:  # noqa: BLE001
        pass


def reserve(request: Request, strategy: str, timeout: float, cap: Capacity | None = None):
    """A ready placement group for `request`, or ResourceError: at once when the cluster can
    never hold it, else after `timeout` seconds (never waits forever). Where an autoscaler
    runs, it is asked for the bundles while the group waits."""
    cap = cap or capacity()
    refuse_if_never_fits(request, cap)
    group = placement_group(request.bundles, strategy=strategy.upper())
    asked = cap.autoscaling and _ask_autoscaler(request.bundles)
    try:
        ready = group.wait(timeout_seconds=timeout)
    finally:
        if asked:
            _withdraw_autoscaler_request()
    if not ready:
        remove_placement_group(group)
        raise ResourceError(_timeout_message(request, strategy, timeout, cap))
    return group


def wait_for_group(group, request: Request, strategy: str, timeout: float) -> None:
    """Wait up to `timeout` seconds until every bundle of a group reserved earlier is placed,
    else ResourceError. After a lost node Ray re-places its bundles where the nodes left can
    hold them; an actor started in a bundle still pending would wait without a deadline."""
    if not group.wait(timeout_seconds=timeout):
        raise reservation_timeout(request, strategy, timeout)


def reservation_timeout(request: Request, strategy: str, timeout: float) -> ResourceError:
    """The one-line error of a request not placed within `timeout` seconds."""
    return ResourceError(_timeout_message(request, strategy, timeout, capacity()))


def _timeout_message(request: Request, strategy: str, timeout: float, cap: Capacity) -> str:
    free = ray.available_resources()
    now = cluster_totals()   # the autoscaler may have added some nodes meanwhile
    grew = (" (its autoscaler was asked for the bundles and did not add enough nodes in time)"
            if cap.autoscaling else "")
    return (f"{request.who} could not reserve {describe(request_totals(request.bundles))} "
            f"({len(request.bundles)} bundles, {strategy}) within {timeout:g}s; available now: "
            f"{describe(_cpu_gpu(free))}; the cluster has {describe(now)}{grew}"
            + pack_hint(request.bundles, now["GPU"], request.gpu_flag, request.unit))


# ---- the device Ray gave this process -----------------------------------------------------------
def this_process_device(setting: str) -> torch.device:
    """The device of a student actor or Train worker: the GPU Ray assigned it, else the CPU
    (`cohort.devices.assigned_device`); a CPU process gets every GPU hidden from it."""
    gpu_ids = ray.get_runtime_context().get_accelerator_ids().get("GPU", [])
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    device = assigned_device(setting, gpu_ids, visible)
    os.environ.update(cpu_only_environment(device))
    if device.type == "cuda" and device.index >= torch.cuda.device_count():
        raise RuntimeError(f"Ray assigned GPU(s) {', '.join(gpu_ids)}, but torch sees "
                           f"{torch.cuda.device_count()} CUDA device(s) "
                           f"(CUDA_VISIBLE_DEVICES={visible!r}); is this torch built with CUDA?")
    return device
