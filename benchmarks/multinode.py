"""Several nodes: DML step time with the students on two worker nodes against all on one.

A Ray cluster of three nodes on this machine (ray.cluster_utils.Cluster): a head that takes no
work (num_cpus=0, as in docker/rayjob.yaml) and two worker nodes of `--node-cpus` logical CPUs,
each with its own raylet and object store. The same DML cohort (K = `--students`, resnet8 on
digits, batch 64, one thread per student, `--cpus-per-student` 0.5 so that one node holds all
K = 4) runs as

* `one node`  - --placement pack: every student on one worker node; logits travel through that
                node's shared-memory object store;
* `two nodes` - --placement spread: K/2 students per worker node; every step half the logits
                cross between the nodes' object stores (Ray's object manager).

On one machine the two nodes share its cores, so the ratio isolates what crossing nodes costs
the exchange (not a network: loopback), not extra compute. Timed: the training part of every
epoch but the first (`train_seconds` in metrics.parquet, the slowest member's), per step.
The variants run interleaved in `--rounds` rounds (one, two | two, one | ...); each round
gives one ratio two/one. Also reported: the students' exposed exchange share
(exchange_seconds / train_seconds, mean over members) per variant.
"""
from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

from common import describe, finish, info, machine, median, parser, table

VARIANTS = {"one": ("one node", "pack"), "two": ("two nodes", "spread")}


def start_cluster(node_cpus: float):
    import ray
    from ray.cluster_utils import Cluster
    store = 200 * 1024 ** 2
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 0, "include_dashboard": False, "object_store_memory": store})
    for _ in range(2):
        cluster.add_node(num_cpus=node_cpus, object_store_memory=store)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False)
    return cluster


def cohort_config(args, output: Path, placement: str):
    from cohort.methods import config_class
    return config_class("dml")(students=args.students, archs=[args.arch], dataset="digits",
                               epochs=args.epochs, batch_size=64, lr=0.1, schedule="cosine",
                               output=str(output), progress=False, device="cpu",
                               checkpoint_every=10_000, exchange=args.exchange,
                               placement=placement, cpus_per_student=args.cpus_per_student)


def student_rows(output: Path) -> list[dict]:
    import pyarrow.parquet as pq
    return [r for r in pq.read_table(output / "metrics.parquet").to_pylist() if r["member"] != "ensemble"]


def warm_measures(output: Path) -> tuple[float, float]:
    """(seconds of training per warm epoch, the slowest member's; the students' median exposed
    exchange share)."""
    rows = [r for r in student_rows(output) if r["epoch"] > 0]
    epochs = sorted({r["epoch"] for r in rows})
    seconds = sum(max(r["train_seconds"] for r in rows if r["epoch"] == e) for e in epochs)
    share = median([r["exchange_seconds"] / r["train_seconds"] for r in rows])
    return seconds / len(epochs), share


def student_nodes(method: str, name: str) -> list[str]:
    from ray._private.state import state
    from ray.core.generated import gcs_pb2
    prefix, nodes = f"{method}-{name}-student-", {}
    for raw in state._connect_and_get_accessor().get_actor_table(None, None):
        actor = gcs_pb2.ActorTableData.FromString(raw)
        if actor.name.startswith(prefix):
            nodes[actor.name] = actor.node_id.hex() or actor.address.node_id.hex()
    return sorted(nodes.values())


def settle(seconds: float = 60.0) -> None:
    """Wait until every CPU is free: the last run's actors and placement group are released
    asynchronously, and a placement decided on a half-busy cluster would differ."""
    import ray
    deadline = time.monotonic() + seconds
    while ray.available_resources().get("CPU", 0) < ray.cluster_resources().get("CPU", 0):
        if time.monotonic() > deadline:
            raise RuntimeError(f"the cluster stays busy: {ray.available_resources()}")
        time.sleep(0.2)


def run_variant(args, data, output: Path, placement: str) -> tuple[float, float, int]:
    from cohort.ray.actors import run_ray
    settle()
    run_ray(cohort_config(args, output, placement), data)
    per_epoch, share = warm_measures(output)
    return per_epoch, share, len(set(student_nodes("dml", output.name)))


def main() -> None:
    p = parser("multinode", __doc__)
    p.add_argument("--students", type=int, default=4, help="K (default 4)")
    p.add_argument("--arch", default="resnet8")
    p.add_argument("--exchange", default="store", help="store or collective (default store)")
    p.add_argument("--node-cpus", type=float, default=2, help="logical CPUs per worker node (default 2)")
    p.add_argument("--cpus-per-student", type=float, default=0.5)
    p.add_argument("--epochs", type=int, default=3, help="per run; all but the first timed (default 3)")
    p.add_argument("--rounds", type=int, default=4, help="interleaved rounds (default 4)")
    args = p.parse_args()
    if args.quick:
        args.epochs, args.rounds = 2, 2
    started = time.perf_counter()
    from cohort.data import load_dataset
    import ray
    data = load_dataset("digits")
    steps_per_epoch = -(-data.num_train // 64)
    cluster = start_cluster(args.node_cpus)
    per_step = {k: [] for k in VARIANTS}
    shares = {k: [] for k in VARIANTS}
    spans = {k: [] for k in VARIANTS}
    loads = []
    try:
        with tempfile.TemporaryDirectory(prefix="bench-multinode-") as tmp:
            for rnd in range(args.rounds):
                order = list(VARIANTS) if rnd % 2 == 0 else list(VARIANTS)[::-1]
                for k in order:
                    seconds, share, nodes = run_variant(args, data, Path(tmp) / f"{k}{rnd}",
                                                        VARIANTS[k][1])
                    per_step[k].append(seconds / steps_per_epoch)
                    shares[k].append(share)
                    spans[k].append(nodes)
                loads.append(round(os.getloadavg()[0], 2))
                print(f"round {rnd + 1}/{args.rounds} ({', '.join(order)}): step " + ", ".join(
                    f"{VARIANTS[k][0]} {1e3 * v[-1]:.1f} ms on {spans[k][-1]} node(s)"
                    for k, v in per_step.items()) + f" (load {loads[-1]})", flush=True)
    finally:
        ray.shutdown()
        cluster.shutdown()
    assert all(n == 1 for n in spans["one"]) and all(n == 2 for n in spans["two"]), spans
    ratio = [b / a for a, b in zip(per_step["one"], per_step["two"])]
    rows = [{"variant": VARIANTS[k][0], "placement": VARIANTS[k][1], "nodes": spans[k][0],
             "step_ms": 1e3 * median(per_step[k]), "min_ms": 1e3 * min(per_step[k]),
             "max_ms": 1e3 * max(per_step[k]), "exchange_share": median(shares[k])}
            for k in VARIANTS]
    print(table(rows, ["variant", "placement", "nodes", "step_ms", "min_ms", "max_ms", "exchange_share"],
                f"DML K={args.students} {args.arch} on digits, --exchange {args.exchange}: "
                f"{steps_per_epoch * (args.epochs - 1)} warm steps of batch 64 per run, "
                f"{args.rounds} interleaved rounds"))
    infos = [info(f"multinode K={args.students}: step on two nodes / on one node", ratio,
                  "(1.0: crossing nodes costs nothing)")]
    print()
    print(describe(infos[0]))
    finish(args, "multinode", {"machine": machine(args.device), "students": args.students,
                               "arch": args.arch, "exchange": args.exchange,
                               "node_cpus": args.node_cpus, "cpus_per_student": args.cpus_per_student,
                               "epochs": args.epochs, "steps_per_epoch": steps_per_epoch,
                               "rounds": args.rounds, "step_seconds": per_step,
                               "exchange_share": shares, "rows": rows,
                               "loadavg_1m_after_rounds": loads, "info": infos}, started)


if __name__ == "__main__":
    main()
