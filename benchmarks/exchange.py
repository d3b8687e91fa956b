"""Exchange: per-step latency of sharing one step's logits among K students, and its exposed cost.

Part 1 (latency). One step's logits, B x C = 128 x 100 float32 (51 kB), go from every member
to every member, K = 2 and 4, through

* `store`      - cohort.exchange.StoreExchange between Ray actors, exactly the class training
                 uses: each member rewrites one object-store channel (a mutable shared-memory
                 object) that its K-1 peers read;
* `collective` - cohort.exchange.CollectiveExchange between the same actors (gloo all_gather);
* `actor_push` - not project code: the design `store` replaced, one actor call per peer and
                 step carrying the logits (ActorPush below);
* `bare`       - the floor: torch.distributed gloo all_gather among K plain processes
                 (multiprocessing, no Ray).

All sets of processes stay up side by side; the transports run in interleaved rounds of
`--steps` steps (publish + gather back to back, nothing to overlap with), one thread each.
Reported: the median per-step latency over all members and rounds, and the ratio to `bare`.

Part 2 (exposed). A short real DML cohort (run_ray, resnet20, synthetic 32x32, K = 2, one
actor and one thread per student) with each transport; from metrics.parquet the students'
`exchange_seconds` (time blocked in gather: transport latency not hidden behind the
cross-entropy, plus waiting for a slower peer) over `train_seconds`. In each step the member
that publishes last waits for the transport alone, so the least-waiting member's share is an
upper bound of the transport's own exposed cost; the mean over members adds the imbalance
between peers (on a shared CPU, mostly other processes taking a core from one of them).

Targets: store no slower than bare all_gather; exposed exchange < 5% of step time.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import socket
import sys
import tempfile
import time
from pathlib import Path

import torch

from common import finish, machine, median, parser, percentile, proc_memory, start_ray, table

B, C = 128, 100


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


# ---- the floor: plain processes ---------------------------------------------------------------
class BareAllGather:
    def __init__(self, world: int, device):
        self.world, self.device = world, device

    def publish(self, key, logits):
        self._out = [torch.empty_like(logits) for _ in range(self.world)]
        torch.distributed.all_gather(self._out, logits.contiguous())

    def gather(self, key):
        return self._out


def bare_worker(rank: int, world: int, port: int, device: str, conn) -> None:
    import datetime
    torch.set_num_threads(1)
    dev = torch.device(device if device == "cpu" else f"cuda:{rank % max(1, torch.cuda.device_count())}")
    backend = "nccl" if dev.type == "cuda" else "gloo"
    torch.distributed.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                         world_size=world, timeout=datetime.timedelta(seconds=300))
    exchange = BareAllGather(world, dev)
    conn.send("ready")
    while True:
        command = conn.recv()
        if command is None:
            break
        tag, steps = command
        conn.send(timed_steps(exchange, tag, steps, dev))
    torch.distributed.destroy_process_group()


class BareGroup:
    def __init__(self, world: int, device: str):
        ctx = mp.get_context("spawn")
        port = free_port()
        self.conns, self.procs = [], []
        for rank in range(world):
            mine, theirs = ctx.Pipe()
            p = ctx.Process(target=bare_worker, args=(rank, world, port, device, theirs), daemon=True)
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


# ---- the alternative: one actor call per peer and step (not project code) --------------------------
class ActorPush:
    """The design `store` replaced, for comparison: every step each member calls `deliver` on
    each peer with its logits (a numpy array inside the call), and waits for K-1 deliveries."""

    def __init__(self, rank: int, peers: list):
        import threading
        self.rank, self.peers, self.world = rank, peers, len(peers)
        self.inbox: dict = {}
        self.ready = threading.Condition()
        self._own = None

    def deliver(self, key, sender: int, value) -> None:   # runs in the actor's other thread
        with self.ready:
            self.inbox.setdefault(key, {})[sender] = value
            self.ready.notify_all()

    def publish(self, key, logits) -> None:
        self._own = logits.detach()
        value = self._own.cpu().numpy()
        for j, peer in enumerate(self.peers):
            if j != self.rank:
                peer.deliver.remote(key, self.rank, value)

    def gather(self, key) -> list:
        with self.ready:
            self.ready.wait_for(lambda: len(self.inbox.get(key, ())) == self.world - 1)
            got = self.inbox.pop(key)
        return [self._own if j == self.rank else torch.from_numpy(got[j].copy())
                for j in range(self.world)]


# ---- Ray actors with the transports ---------------------------------------------------------------
class Peer:
    """A stand-in StudentWorker: the same transports and wiring, no model."""

    def __init__(self, rank: int, world: int, device: str):
        torch.set_num_threads(1)
        self.rank, self.world = rank, world
        self.device = torch.device(device)
        self.store = self.collective = self.actor_push = None

    def rendezvous(self):
        import ray
        return ray.util.get_node_ip_address(), free_port()

    def node(self) -> str:
        import ray
        return ray.get_runtime_context().get_node_id()

    def open_channel(self, peers, nodes):   # as StudentWorker.open_channel
        from cohort.exchange import StoreExchange
        self._channel = StoreExchange.open(self.rank, peers, nodes, 4 * B * C + 4096)
        return self._channel

    def connect(self, peers, master, channels) -> None:
        from cohort.exchange import CollectiveExchange, StoreExchange
        self.store = StoreExchange(self.rank, self._channel, channels, self.device)
        self.collective = CollectiveExchange(self.rank, self.world, master, self.device)
        self.actor_push = ActorPush(self.rank, peers)

    def deliver(self, key, sender, value) -> None:
        self.actor_push.deliver(key, sender, value)

    def run(self, transport: str, tag, steps: int) -> list[float]:
        return timed_steps(getattr(self, transport), tag, steps, self.device)

    def live_references(self) -> int:
        import ray
        return len(ray._private.worker.global_worker.core_worker.get_all_reference_counts())

    def rss_bytes(self) -> dict:
        return proc_memory(os.getpid())


def start_peers(ray, world: int, device: str, gpus: float):
    actor = ray.remote(Peer)
    peers = [actor.options(num_cpus=0, num_gpus=gpus, max_concurrency=4).remote(r, world, device)
             for r in range(world)]
    master = ray.get(peers[0].rendezvous.remote())
    nodes = ray.get([p.node.remote() for p in peers])
    channels = ray.get([p.open_channel.remote(peers, nodes) for p in peers])
    ray.get([p.connect.remote(peers, master, channels) for p in peers])
    return peers


def latency_part(ray, args) -> tuple[list[dict], dict]:
    worlds = [2, 4]
    rounds = 3 if args.quick else 5
    steps = args.steps
    gpus = 0.0
    if args.device.startswith("cuda"):
        gpus = min(1.0, torch.cuda.device_count() / max(worlds))
    groups = {k: start_peers(ray, k, args.device, gpus) for k in worlds}
    bare = {k: BareGroup(k, args.device) for k in worlds}
    transports = ["store", "collective", "actor_push", "bare"]
    samples = {(k, t): [] for k in worlds for t in transports}
    for rnd in range(rounds + 1):                     # round 0 warms up every path
        for k in worlds:
            for t in transports:
                tag = f"{t}-{rnd}"
                if t == "bare":
                    per_rank = bare[k].run(tag, steps)
                else:
                    per_rank = ray.get([p.run.remote(t, tag, steps) for p in groups[k]])
                if rnd:
                    samples[(k, t)] += [x for rank in per_rank for x in rank]
    for k in worlds:
        bare[k].close()
        for p in groups[k]:
            ray.kill(p)
    rows = []
    for k in worlds:
        floor = median(samples[(k, "bare")])
        for t in transports:
            s = samples[(k, t)]
            rows.append({"K": k, "transport": t, "median_ms": 1e3 * median(s),
                         "p90_ms": 1e3 * percentile(s, 90), "mean_ms": 1e3 * sum(s) / len(s),
                         "vs_bare": median(s) / floor})
    return rows, {"rounds": rounds, "steps_per_round": steps}


def exposed_part(ray, args) -> list[dict]:
    import pyarrow.parquet as pq

    from cohort.cohort import run_ray
    from cohort.config import CohortConfig
    from cohort.data import load_dataset

    samples = (512, 256) if args.quick else (1024, 256)
    data = load_dataset("synthetic", synthetic_samples=samples, synthetic_shape=(3, 32, 32),
                        synthetic_classes=100)
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-exchange-") as tmp:
        for transport in ("store", "collective"):
            cfg = CohortConfig(method="dml", students=2, archs=[args.arch], dataset="synthetic",
                               epochs=args.epochs, batch_size=B, lr=0.05, schedule="constant",
                               output=str(Path(tmp) / transport), progress=False, exchange=transport,
                               device="cuda" if args.device.startswith("cuda") else "cpu",
                               checkpoint_every=10_000, eval_batch_size=256)
            run_ray(cfg, data)
            table_ = pq.read_table(Path(tmp) / transport / "metrics.parquet").to_pylist()
            members = [r for r in table_ if r["member"] != "ensemble" and r["epoch"] >= 1]
            if not members:      # a one-epoch run: keep its only epoch
                members = [r for r in table_ if r["member"] != "ensemble"]
            by_member: dict[str, list[float]] = {}
            for r in members:
                waited_trained = by_member.setdefault(r["member"], [0.0, 0.0])
                waited_trained[0] += r["exchange_seconds"]
                waited_trained[1] += r["train_seconds"]
            students = len(by_member)
            steps = len(members) // students * (samples[0] // B)
            waited = sum(w for w, _ in by_member.values())
            trained = sum(t for _, t in by_member.values())
            # Every step, the member that publishes last waits only for the transport; the others
            # also wait for it. The least-waiting member's total bounds the transport's share.
            least = min(w for w, _ in by_member.values())
            rows.append({"transport": transport, "students": students, "arch": args.arch,
                         "steps_per_student": steps,
                         "step_ms": 1e3 * trained / (students * steps),
                         "exposed_ms": 1e3 * waited / (students * steps),
                         "exposed_pct": 100 * waited / trained,
                         "least_member_exposed_ms": 1e3 * least / steps,
                         "least_member_pct": 100 * least * students / trained})
    return rows


def main() -> None:
    p = parser("exchange", __doc__)
    p.add_argument("--steps", type=int, default=100, help="exchange steps per round (default 100)")
    p.add_argument("--arch", default="resnet20", help="model of the training part (default resnet20)")
    p.add_argument("--epochs", type=int, default=2,
                   help="epochs of the training part; the first is a warm-up when > 1 (default 2)")
    p.add_argument("--skip-training", action="store_true", help="latency part only")
    args = p.parse_args()
    if args.quick:
        args.steps = min(args.steps, 50)
    started = time.perf_counter()
    torch.set_num_threads(1)
    ray = start_ray(num_cpus=os.cpu_count())
    lat_rows, lat_meta = latency_part(ray, args)
    print(table(lat_rows, ["K", "transport", "median_ms", "p90_ms", "mean_ms", "vs_bare"],
                f"exchange latency per step, {B}x{C} float32 logits, {lat_meta['rounds']} rounds x "
                f"{lat_meta['steps_per_round']} steps, all members pooled"))
    exposed_rows = []
    if not args.skip_training:
        exposed_rows = exposed_part(ray, args)
        print(table(exposed_rows, ["transport", "students", "arch", "steps_per_student", "step_ms",
                                   "exposed_ms", "exposed_pct", "least_member_exposed_ms",
                                   "least_member_pct"],
                    "exposed exchange inside real DML training steps (run_ray, synthetic 32x32)"))
    store_vs_bare = {r["K"]: r["vs_bare"] for r in lat_rows if r["transport"] == "store"}
    worst_exposed = max((r["exposed_pct"] for r in exposed_rows), default=float("nan"))
    print("\nstore / bare all_gather: " + ", ".join(f"K={k}: {v:.2f}x" for k, v in store_vs_bare.items())
          + " (target <= 1.0)")
    if exposed_rows:
        print(f"exposed exchange: worst {worst_exposed:.2f}% of step time (target < 5%)")
    ray.shutdown()
    finish(args, "exchange", {"machine": machine(args.device), "latency": lat_rows, **lat_meta,
                              "exposed": exposed_rows, "store_vs_bare": store_vs_bare,
                              "worst_exposed_pct": worst_exposed,
                              "targets": {"store_vs_bare": 1.0, "exposed_pct": 5.0}}, started)


if __name__ == "__main__":
    sys.exit(main())
