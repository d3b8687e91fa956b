"""Exchange: per-step latency of sharing one step's logits among K students, and its exposed cost.

Part 1 (latency). One step's logits, B x C = 128 x 100 float32 (51 kB), go from every member
to every member, K = 2 and 4, through

* `store`      - cohort.ray.exchange.StoreExchange between Ray actors, exactly the class training
                 uses: each member rewrites one object-store channel (a mutable shared-memory
                 object) that its K-1 peers read;
* `collective` - cohort.ray.exchange.CollectiveExchange between the same actors (gloo all_gather);
* `refs`       - cohort.ray.exchange.RefsExchange, the transport on Ray's public APIs only (what
                 `store` falls back to when the channel API is missing or changed): one actor
                 call per peer and step. Payloads under 100 KiB, as these 51 kB, travel inside
                 the call (gRPC; Ray inlines arguments that small), which is also the design
                 `store` replaced (formerly `actor_push` here);
* `refs_put`   - the same class with its inline limit at 0: every step each member `ray.put`s its
                 logits (a new object in the shared-memory store) and hands the ObjectRef, inside
                 a list so that Ray passes it unresolved, to each peer in the call; peers
                 `ray.get` it. The path `refs` takes above 100 KiB (formerly `ray_put` here);
* `bare`       - torch.distributed gloo all_gather among K plain processes (multiprocessing, no
                 Ray): what a cohort written on torch.distributed alone would pay;
* `shm_floor`  - the floor of any transport on one host: K plain processes (no Ray, no
                 torch.distributed) sharing one multiprocessing.shared_memory block, two slots
                 per member (double buffering) and one sequence counter per member, waited on by
                 spinning with sched_yield (ShmExchange below).

Every member returns owned copies of its peers' logits, as training needs. All sets of
processes stay up side by side; one round runs every transport for `--steps` steps (publish
+ gather back to back, nothing to overlap with, one thread per member), in the listed order in
even rounds and the reverse order in odd ones; round 0 is a warm-up. Reported per transport:
the median per-step latency over all members and rounds, and its ratios to `bare` and to
`shm_floor`, each the median of the per-round ratios (each round: median step of the transport
over median step of the reference in that round) with the interquartile range of the
per-round ratios as its spread.

Part 2 (exposed). A real DML cohort (run_ray, resnet20, synthetic 32x32, K = 2, one actor and
one thread per student) with `store`, `refs` and `collective`, interleaved (store, refs,
collective | collective, refs, store | ...) for `--train-rounds` rounds; the first epoch of
every run is a warm-up.
From metrics.parquet: the students' `exchange_seconds` (time blocked in gather: transport
latency not hidden behind the cross-entropy, plus waiting for a slower peer) over
`train_seconds`. In each step the member that publishes last waits for the transport alone, so
the least-waiting member's share is an upper bound of the transport's own exposed cost; the
mean over members (the headline) adds the imbalance between peers (on a shared CPU, mostly
other processes taking a core from one of them).

Targets: store no slower than bare all_gather (K = 2 and 4); exposed exchange < 5% of step time.
Also printed, with no target: refs / store latency (what the fallback from `store` costs).
"""
from __future__ import annotations

import multiprocessing as mp
import os
import socket
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from common import (compare, describe, finish, machine, median, parser, percentile, proc_memory,
                    quartiles, start_ray, table)

B, C = 128, 100
PROCESS_TRANSPORTS = ("bare", "shm_floor")            # plain processes, no Ray
ACTOR_TRANSPORTS = ("store", "collective", "refs", "refs_put")
TRANSPORTS = ("store", "collective", "refs", "refs_put", "bare", "shm_floor")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def timed_steps(exchange, tag, steps: int, device) -> list[float]:
    logits = torch.randn(B, C, device=device)
    out = []
    for step in range(steps):
        t0 = time.perf_counter()
        exchange.publish((tag, step), logits)
        gathered = exchange.gather((tag, step))
        if device.type == "cuda":
            torch.cuda.synchronize()
        out.append(time.perf_counter() - t0)
        assert len(gathered) == exchange.world
    return out


# ---- plain processes: gloo all_gather, and the shared-memory floor ----------------------------
class BareAllGather:
    def __init__(self, world: int, device):
        self.world, self.device = world, device

    def publish(self, key, logits):
        self._out = [torch.empty_like(logits) for _ in range(self.world)]
        torch.distributed.all_gather(self._out, logits.contiguous())

    def gather(self, key):
        return self._out


COUNTER_BYTES = 64                      # one cache line per member's sequence counter


def shm_bytes(world: int) -> int:
    return world * COUNTER_BYTES + world * 2 * B * C * 4


class ShmExchange:
    """The floor: one shared-memory block among K plain processes on one host.

    Layout: K sequence counters (int64, one cache line each), then two B x C float32 slots per
    member. Step s: member i copies its logits into its slot s % 2 and sets its counter to s+1
    (publish); gather waits until every peer's counter reaches s+1 (spin, sched_yield after a
    few tries: K processes may share fewer cores) and copies the peers' slots s % 2 out. Two
    slots suffice: a member writes slot s % 2 again at step s+2 only after gathering step s+1,
    i.e. after every peer published s+1, which each did after it had finished reading step s.
    The counter is written after the data; x86 keeps stores in order (TSO), which this relies on.
    """

    def __init__(self, rank: int, world: int, name: str, device):
        from multiprocessing import shared_memory
        self.rank, self.world, self.device = rank, world, device
        self.shm = shared_memory.SharedMemory(name=name)
        self.seq = np.ndarray((world, COUNTER_BYTES // 8), dtype=np.int64, buffer=self.shm.buf)
        self.slots = np.ndarray((world, 2, B, C), dtype=np.float32, buffer=self.shm.buf,
                                offset=world * COUNTER_BYTES)
        self.step = 0
        self._own = None

    def publish(self, key, logits) -> None:
        self._own = logits.detach()
        np.copyto(self.slots[self.rank, self.step & 1], self._own.cpu().numpy())
        self.seq[self.rank, 0] = self.step + 1

    def gather(self, key) -> list:
        want, parity, seq = self.step + 1, self.step & 1, self.seq
        out = []
        for j in range(self.world):
            if j == self.rank:
                out.append(self._own)
                continue
            tries = 0
            while seq[j, 0] < want:
                tries += 1
                if tries > 20:
                    os.sched_yield()
            out.append(torch.from_numpy(self.slots[j, parity].copy()))
        self.step += 1
        return out

    def close(self) -> None:
        del self.seq, self.slots
        self.shm.close()


def process_worker(kind: str, rank: int, world: int, port: int, shm_name: str, device: str,
                   conn) -> None:
    torch.set_num_threads(1)
    dev = torch.device(device if device == "cpu" else f"cuda:{rank % max(1, torch.cuda.device_count())}")
    if kind == "bare":
        import datetime
        backend = "nccl" if dev.type == "cuda" else "gloo"
        torch.distributed.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}",
                                             rank=rank, world_size=world,
                                             timeout=datetime.timedelta(seconds=300))
        exchange = BareAllGather(world, dev)
    else:
        exchange = ShmExchange(rank, world, shm_name, torch.device("cpu"))
    conn.send("ready")
    while True:
        command = conn.recv()
        if command is None:
            break
        tag, steps = command
        conn.send(timed_steps(exchange, tag, steps, exchange.device))
    if kind == "bare":
        torch.distributed.destroy_process_group()
    else:
        exchange.close()


class ProcessGroup:
    """K plain processes (spawned, no Ray) running one of PROCESS_TRANSPORTS."""

    def __init__(self, kind: str, world: int, device: str):
        ctx = mp.get_context("spawn")
        port, self.shm = free_port(), None
        if kind == "shm_floor":
            from multiprocessing import shared_memory
            self.shm = shared_memory.SharedMemory(create=True, size=shm_bytes(world))
        self.conns, self.procs = [], []
        for rank in range(world):
            mine, theirs = ctx.Pipe()
            p = ctx.Process(target=process_worker, daemon=True,
                            args=(kind, rank, world, port, self.shm.name if self.shm else "",
                                  device, theirs))
            p.start()
            self.conns.append(mine)
            self.procs.append(p)
        for c in self.conns:
            assert c.recv() == "ready"

    def run(self, tag, steps) -> list[list[float]]:
        for c in self.conns:
            c.send((tag, steps))
        return [c.recv() for c in self.conns]

    def close(self):
        for c in self.conns:
            c.send(None)
        for p in self.procs:
            p.join(timeout=30)
        if self.shm is not None:
            self.shm.close()
            self.shm.unlink()


# ---- Ray actors with the transports ---------------------------------------------------------------
class Peer:
    """A stand-in StudentWorker: the same transports and wiring, no model."""

    def __init__(self, rank: int, world: int, device: str):
        torch.set_num_threads(1)
        self.rank, self.world = rank, world
        self.device = torch.device(device)
        self.store = self.collective = self.refs = self.refs_put = None

    def rendezvous(self):
        import ray
        return ray.util.get_node_ip_address(), free_port()

    def node(self) -> str:
        import ray
        return ray.get_runtime_context().get_node_id()

    def open_channel(self, peers, nodes):   # as StudentWorker.open_channel
        from cohort.ray.exchange import StoreExchange
        self._channel = StoreExchange.open(self.rank, peers, nodes, 4 * B * C + 4096)
        return self._channel

    def connect(self, peers, master, channels) -> None:
        from cohort.ray.exchange import CollectiveExchange, RefsExchange, StoreExchange
        self.store = StoreExchange(self.rank, self._channel, channels, self.device)
        self.collective = CollectiveExchange(self.rank, self.world, master, self.device)
        self.refs = RefsExchange(self.rank, peers, self.device)
        # its peers' deliveries reach it through deliver_logits (below): a handle per transport
        self.refs_put = RefsExchange(self.rank, [PutPeer(p) for p in peers], self.device,
                                     inline_bytes=0)

    def deliver_logits(self, sender, count, key, payload) -> None:   # as StudentWorker's
        self.refs.deliver(sender, count, key, payload)

    def deliver_put(self, sender, count, key, payload) -> None:
        self.refs_put.deliver(sender, count, key, payload)

    def run(self, transport: str, tag, steps: int) -> list[float]:
        return timed_steps(getattr(self, transport), tag, steps, self.device)

    def live_references(self) -> int:
        import ray
        return len(ray._private.worker.global_worker.core_worker.get_all_reference_counts())

    def rss_bytes(self) -> dict:
        return proc_memory(os.getpid())


class PutPeer:
    """A Peer's handle whose deliver_logits goes to its `refs_put` transport."""

    def __init__(self, peer):
        self.deliver_logits = peer.deliver_put


def start_peers(ray, world: int, device: str, gpus: float):
    actor = ray.remote(Peer)
    peers = [actor.options(num_cpus=0, num_gpus=gpus, max_concurrency=4).remote(r, world, device)
             for r in range(world)]
    master = ray.get(peers[0].rendezvous.remote())
    nodes = ray.get([p.node.remote() for p in peers])
    channels = ray.get([p.open_channel.remote(peers, nodes) for p in peers])
    ray.get([p.connect.remote(peers, master, channels) for p in peers])
    return peers


def latency_part(ray, args) -> tuple[list[dict], dict, dict]:
    worlds = [2, 4]
    rounds, steps = args.rounds, args.steps
    gpus = 0.0
    if args.device.startswith("cuda"):
        gpus = min(1.0, torch.cuda.device_count() / max(worlds))
    groups = {k: start_peers(ray, k, args.device, gpus) for k in worlds}
    procs = {(k, t): ProcessGroup(t, k, args.device) for k in worlds for t in PROCESS_TRANSPORTS}
    pooled = {(k, t): [] for k in worlds for t in TRANSPORTS}
    per_round = {(k, t): [] for k in worlds for t in TRANSPORTS}    # median step of each round
    for rnd in range(rounds + 1):                     # round 0 warms up every path
        order = TRANSPORTS if rnd % 2 == 0 else TRANSPORTS[::-1]
        for k in worlds:
            for t in order:
                tag = rnd          # the step key (round, step): two ints, as (epoch, step)
                if t in PROCESS_TRANSPORTS:
                    per_rank = procs[(k, t)].run(tag, steps)
                else:
                    per_rank = ray.get([p.run.remote(t, tag, steps) for p in groups[k]])
                if rnd:
                    samples = [x for rank in per_rank for x in rank]
                    pooled[(k, t)] += samples
                    per_round[(k, t)].append(median(samples))
        if rnd:
            print(f"round {rnd}/{rounds}: " + "; ".join(
                f"K={k} " + " ".join(f"{t} {1e3 * per_round[(k, t)][-1]:.2f}" for t in TRANSPORTS)
                for k in worlds) + f" ms (load {os.getloadavg()[0]:.1f})", flush=True)
    for group in procs.values():
        group.close()
    for k in worlds:
        for p in groups[k]:
            ray.kill(p)
    rows, ratios = [], {}
    for k in worlds:
        for t in TRANSPORTS:
            s = pooled[(k, t)]
            row = {"K": k, "transport": t, "median_ms": 1e3 * median(s),
                   "p90_ms": 1e3 * percentile(s, 90), "mean_ms": 1e3 * sum(s) / len(s),
                   "round_medians_ms": [1e3 * x for x in per_round[(k, t)]]}
            for ref, name in (("bare", "vs_bare"), ("shm_floor", "vs_shm_floor")):
                r = [a / b for a, b in zip(per_round[(k, t)], per_round[(k, ref)])]
                ratios[(k, t, ref)] = r
                q1, q3 = quartiles(r)
                row[name] = median(r)
                row[f"{name}_iqr"] = q3 - q1
            rows.append(row)
    return rows, {"rounds": rounds, "steps_per_round": steps,
                  "ratio_spread": "IQR of the per-round ratios"}, ratios


def exposed_part(ray, args) -> tuple[list[dict], dict]:
    import pyarrow.parquet as pq

    from cohort.ray.actors import run_ray
    from cohort.methods import config_class
    from cohort.data import load_dataset

    data = load_dataset("synthetic", synthetic_samples=(args.train_images, 256),
                        synthetic_shape=(3, 32, 32), synthetic_classes=100)
    transports = ("store", "refs", "collective")
    runs: dict[str, list[dict]] = {t: [] for t in transports}
    with tempfile.TemporaryDirectory(prefix="bench-exchange-") as tmp:
        for rnd in range(args.train_rounds):
            for transport in (transports if rnd % 2 == 0 else transports[::-1]):
                out = Path(tmp) / f"{transport}-{rnd}"
                cfg = config_class("dml")(students=2, archs=[args.arch], dataset="synthetic",
                                   epochs=args.epochs, batch_size=B, lr=0.05, schedule="constant",
                                   output=str(out), progress=False, exchange=transport,
                                   device="cuda" if args.device.startswith("cuda") else "cpu",
                                   checkpoint_every=10_000, eval_batch_size=256)
                run_ray(cfg, data)
                table_ = pq.read_table(out / "metrics.parquet").to_pylist()
                members = [r for r in table_ if r["member"] != "ensemble" and r["epoch"] >= 1]
                if not members:      # a one-epoch run: keep its only epoch
                    members = [r for r in table_ if r["member"] != "ensemble"]
                by_member: dict[str, list[float]] = {}
                for r in members:
                    waited_trained = by_member.setdefault(r["member"], [0.0, 0.0])
                    waited_trained[0] += r["exchange_seconds"]
                    waited_trained[1] += r["train_seconds"]
                students = len(by_member)
                steps = len(members) // students * (args.train_images // B)
                waited = sum(w for w, _ in by_member.values())
                trained = sum(t for _, t in by_member.values())
                # Every step, the member that publishes last waits only for the transport; the
                # others also wait for it. The least-waiting member's total bounds its share.
                least = min(w for w, _ in by_member.values())
                runs[transport].append({
                    "round": rnd, "students": students, "steps_per_student": steps,
                    "step_ms": 1e3 * trained / (students * steps),
                    "exposed_ms": 1e3 * waited / (students * steps),
                    "exposed_pct": 100 * waited / trained,
                    "least_member_exposed_ms": 1e3 * least / steps,
                    "least_member_pct": 100 * least * students / trained})
            print(f"training round {rnd + 1}/{args.train_rounds}: exposed " + ", ".join(
                f"{t} {runs[t][-1]['exposed_pct']:.2f}%" for t in transports)
                + f" (load {os.getloadavg()[0]:.1f})", flush=True)
    rows = []
    for t in transports:
        rs = runs[t]
        row = {"transport": t, "students": rs[0]["students"], "arch": args.arch,
               "rounds": len(rs), "steps_per_student": rs[0]["steps_per_student"]}
        for key in ("step_ms", "exposed_ms", "exposed_pct", "least_member_exposed_ms",
                    "least_member_pct"):
            row[key] = median([r[key] for r in rs])
        q1, q3 = quartiles([r["exposed_pct"] for r in rs])
        row["exposed_pct_iqr"] = q3 - q1
        rows.append(row)
    return rows, runs


def per_round_of(rows: list[dict], k: int, transport: str) -> list[float]:
    return next(r["round_medians_ms"] for r in rows if r["K"] == k and r["transport"] == transport)


def main() -> None:
    p = parser("exchange", __doc__)
    p.add_argument("--steps", type=int, default=200, help="exchange steps per round (default 200)")
    p.add_argument("--rounds", type=int, default=10,
                   help="interleaved rounds of the latency part, after one warm-up round (default 10)")
    p.add_argument("--arch", default="resnet20", help="model of the training part (default resnet20)")
    p.add_argument("--epochs", type=int, default=2,
                   help="epochs per training run; the first is a warm-up when > 1 (default 2)")
    p.add_argument("--train-images", type=int, default=1536,
                   help="per epoch of the training part (default 1536: 12 steps)")
    p.add_argument("--train-rounds", type=int, default=3,
                   help="interleaved rounds of the training part, one run per transport each (default 3)")
    p.add_argument("--skip-training", action="store_true", help="latency part only")
    args = p.parse_args()
    if args.quick:
        args.steps, args.rounds = min(args.steps, 50), min(args.rounds, 3)
        args.train_images, args.train_rounds = 512, min(args.train_rounds, 2)
    started = time.perf_counter()
    torch.set_num_threads(1)
    ray = start_ray(num_cpus=os.cpu_count())
    lat_rows, lat_meta, ratios = latency_part(ray, args)
    print(table(lat_rows, ["K", "transport", "median_ms", "p90_ms", "mean_ms", "vs_bare",
                           "vs_bare_iqr", "vs_shm_floor", "vs_shm_floor_iqr"],
                f"exchange latency per step, {B}x{C} float32 logits, {lat_meta['rounds']} "
                f"interleaved rounds x {lat_meta['steps_per_round']} steps (ms: all members and "
                f"rounds pooled; ratios: median and IQR of the per-round ratios)"))
    comparisons = [compare(f"store / bare gloo all_gather, K={k}", ratios[(k, "store", "bare")],
                           1.0, "<=") for k in (2, 4)]
    refs_vs_store = {k: [a / b for a, b in zip(per_round_of(lat_rows, k, "refs"),
                                               per_round_of(lat_rows, k, "store"))] for k in (2, 4)}
    exposed_rows, exposed_runs = [], {}
    if not args.skip_training:
        exposed_rows, exposed_runs = exposed_part(ray, args)
        print(table(exposed_rows, ["transport", "students", "arch", "rounds", "steps_per_student",
                                   "step_ms", "exposed_ms", "exposed_pct", "exposed_pct_iqr",
                                   "least_member_exposed_ms", "least_member_pct"],
                    "exposed exchange inside real DML training steps (run_ray, synthetic 32x32), "
                    "medians over interleaved rounds"))
        comparisons += [compare(f"exposed share of step time, {t} (mean over members)",
                                [r["exposed_pct"] for r in exposed_runs[t]], 5.0, "<", "%")
                        for t in exposed_runs]
    ray.shutdown()
    print()
    for c in comparisons:
        print(describe(c))
    store_vs_bare = {k: median(ratios[(k, "store", "bare")]) for k in (2, 4)}
    for k in (2, 4):   # no target: what falling back from store to refs costs
        q1, q3 = quartiles(refs_vs_store[k])
        print(f"refs / store, K={k}: {median(refs_vs_store[k]):.2f} (IQR {q3 - q1:.2f})")
    worst_exposed = max((r["exposed_pct"] for r in exposed_rows), default=float("nan"))
    finish(args, "exchange", {"machine": machine(args.device), "latency": lat_rows, **lat_meta,
                              "per_round_ratios": {f"K={k} {t}/{ref}": v
                                                   for (k, t, ref), v in ratios.items()},
                              "exposed": exposed_rows, "exposed_runs": exposed_runs,
                              "train_images": args.train_images, "epochs": args.epochs,
                              "train_rounds": args.train_rounds,
                              "store_vs_bare": store_vs_bare, "worst_exposed_pct": worst_exposed,
                              "refs_vs_store": {k: median(v) for k, v in refs_vs_store.items()},
                              "comparisons": comparisons,
                              "targets": {"store_vs_bare": 1.0, "exposed_pct": 5.0}}, started)


if __name__ == "__main__":
    sys.exit(main())
