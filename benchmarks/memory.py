"""Memory: peak resident memory per student actor, and object-store use over 1,000 exchange steps.

Part 1 (actors). A real DML cohort (run_ray, K = 2, resnet20, synthetic 3x32x32, one epoch).
While it trains, the driver finds each StudentWorker by name, asks its pid, and samples
/proc/<pid>/status every 0.2 s: VmHWM (peak resident set, as the kernel counts it, which
includes shared object-store pages the process touched: the dataset is read zero-copy from
the store), and the largest RssAnon seen (private memory: heap, model, activations).

Part 2 (exchange). K stand-in students (benchmarks/exchange.py's Peer: the project's
Mailbox and StoreExchange, no model) exchange 128 x 100 float32 logits for `--steps` steps,
on the inline path (`store`, what these logits take) and the object-store path (`store_ref`,
what logits above 96 KiB take). Every `--every` steps: the object store's bytes in use and
object count (the raylet's FormatGlobalMemoryInfo, what `ray memory --stats-only` prints),
each actor's live object references (its core worker's reference table), its mailbox
backlog, and its RSS. Flat means: at most 10% of the steps' logits in the store at any sample
(frees are asynchronous, so a few steps are in flight), back to the starting bytes (within one
step) within 15 s of the last step, no growing reference table, an empty mailbox.

RSS is reported, not judged: on the inline path each peer's logits are unpickled in the
actor's `deliver` thread and freed by the training thread, and glibc's per-thread arenas make
RSS creep by tens of MiB over the first ~10k steps, then plateau (measured to 20k steps; flat
with MALLOC_ARENA_MAX=1). No object is retained: the store and reference counts stay flat.
"""
from __future__ import annotations

import os
import tempfile
import threading
import time
from pathlib import Path

import torch

from common import finish, machine, parser, start_ray, table

B, C = 128, 100
MiB = 1024 * 1024


def store_stats() -> dict:
    import ray
    from ray._private.internal_api import get_memory_info_reply, get_state_from_address
    reply = get_memory_info_reply(get_state_from_address(ray.get_runtime_context().gcs_address))
    return {"bytes_used": int(reply.store_stats.object_store_bytes_used),
            "objects": int(reply.store_stats.num_local_objects)}


def proc_memory(pid: int) -> dict:
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM", "RssAnon", "RssShmem", "RssFile"):
            fields[key] = int(value.split()[0]) * 1024
    return fields


# ---- part 1: a real cohort ----------------------------------------------------------------------
def actor_part(ray, args) -> list[dict]:
    from cohort.cohort import run_ray
    from cohort.config import CohortConfig
    from cohort.data import load_dataset

    data = load_dataset("synthetic", synthetic_samples=(args.train_images, 256),
                        synthetic_shape=(3, 32, 32), synthetic_classes=100)
    with tempfile.TemporaryDirectory(prefix="bench-memory-") as tmp:
        cfg = CohortConfig(method="dml", students=args.students, archs=[args.arch],
                           dataset="synthetic", epochs=1, batch_size=B, lr=0.05,
                           schedule="constant", output=str(Path(tmp) / "mem"), progress=False,
                           checkpoint_every=10_000, eval_batch_size=256,
                           device="cuda" if args.device.startswith("cuda") else "cpu")
        names = [f"{cfg.method}-{cfg.name}-student-{k}" for k in range(args.students)]
        peaks: dict[str, dict] = {}
        done = threading.Event()

        def watch():
            pids = {}
            while not done.is_set():
                for name in names:
                    try:
                        if name not in pids:
                            pids[name] = ray.get(ray.get_actor(name).pid.remote(), timeout=5)
                        m = proc_memory(pids[name])
                    except Exception:      # not up yet, or already gone
                        continue
                    peak = peaks.setdefault(name, {"pid": pids[name], "VmHWM": 0, "RssAnon_max": 0,
                                                   "RssShmem_max": 0, "samples": 0})
                    peak["VmHWM"] = max(peak["VmHWM"], m["VmHWM"])
                    peak["RssAnon_max"] = max(peak["RssAnon_max"], m["RssAnon"])
                    peak["RssShmem_max"] = max(peak["RssShmem_max"], m["RssShmem"])
                    peak["samples"] += 1
                done.wait(0.2)

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        try:
            run_ray(cfg, data)
        finally:
            done.set()
            watcher.join()
    dataset_mib = sum(t.numel() * t.element_size() for t in
                      (data.train_images, data.train_labels, data.test_images, data.test_labels)) / MiB
    return [{"actor": name, "arch": args.arch, "peak_rss_mib": p["VmHWM"] / MiB,
             "peak_private_mib": p["RssAnon_max"] / MiB, "peak_shared_mib": p["RssShmem_max"] / MiB,
             "dataset_mib": dataset_mib, "samples": p["samples"]} for name, p in sorted(peaks.items())]


# ---- part 2: 1,000 exchange steps ---------------------------------------------------------------
def settle(baseline: int, slack: int, seconds: float = 15.0) -> int:
    """Frees are asynchronous (an owner drops an object once its borrowers report back): wait
    until the store is back within `slack` bytes of `baseline`, or `seconds`; the bytes then."""
    deadline = time.monotonic() + seconds
    used = store_stats()["bytes_used"]
    while used > baseline + slack and time.monotonic() < deadline:
        time.sleep(0.5)
        used = store_stats()["bytes_used"]
    return used


def exchange_part(ray, args) -> tuple[list[dict], list[dict]]:
    import exchange as bench_exchange
    ray.cloudpickle.register_pickle_by_value(bench_exchange)   # workers need not import it

    series, summary = [], []
    for world in (2, 4):
        peers = bench_exchange.start_peers(ray, world, args.device, 0.0, channels=False)
        per_step = B * C * 4 * world           # every member's logits of one step
        for transport in ("store", "store_ref"):
            baseline = settle(store_stats()["bytes_used"], 0)
            ray.get([p.run.remote(transport, "warm", 20) for p in peers])
            settle(baseline, per_step)
            points = []
            for done in range(0, args.steps + 1, args.every):
                if done:
                    ray.get([p.run.remote(transport, f"m{done}", args.every) for p in peers])
                stats = store_stats()
                refs = ray.get([p.live_references.remote() for p in peers])
                backlog = ray.get([p.backlog.remote() for p in peers])
                rss = ray.get([p.rss_bytes.remote() for p in peers])
                point = {"K": world, "transport": transport, "steps": done,
                         "store_bytes": stats["bytes_used"], "store_objects": stats["objects"],
                         "refs_max": max(refs), "backlog_max": max(backlog),
                         "rss_mib_max": max(r["VmRSS"] for r in rss) / MiB}
                points.append(point)
            series += points
            first, last = points[0], points[-1]
            settled = store_stats()
            settled["bytes_used"] = settle(baseline, per_step)
            settled["objects"] = store_stats()["objects"]
            in_flight = max(p["store_bytes"] for p in points) - baseline
            summary.append({"K": world, "transport": transport, "steps": args.steps,
                            "store_kib_start": baseline / 1024,
                            "store_kib_max": max(p["store_bytes"] for p in points) / 1024,
                            "max_steps_in_flight": max(0, in_flight) / per_step,
                            "store_kib_settled": settled["bytes_used"] / 1024,
                            "objects_settled": settled["objects"],
                            "refs_start": first["refs_max"], "refs_end": last["refs_max"],
                            "backlog_end": last["backlog_max"],
                            "rss_mib_start": first["rss_mib_max"], "rss_mib_end": last["rss_mib_max"],
                            "flat": (settled["bytes_used"] <= baseline + per_step
                                     and in_flight <= 0.1 * args.steps * per_step
                                     and last["refs_max"] <= first["refs_max"] + 2 * world
                                     and last["backlog_max"] == 0)})
        for p in peers:
            ray.kill(p)
    return series, summary


def main() -> None:
    p = parser("memory", __doc__)
    p.add_argument("--students", type=int, default=2)
    p.add_argument("--arch", default="resnet20")
    p.add_argument("--train-images", type=int, default=1024)
    p.add_argument("--steps", type=int, default=1000, help="exchange steps per transport (default 1000)")
    p.add_argument("--every", type=int, default=100, help="sample every N steps (default 100)")
    args = p.parse_args()
    if args.quick:
        args.steps, args.every, args.train_images = 200, 50, 512
    started = time.perf_counter()
    torch.set_num_threads(1)
    ray = start_ray(num_cpus=os.cpu_count())
    actors = actor_part(ray, args)
    print(table(actors, ["actor", "arch", "peak_rss_mib", "peak_private_mib", "peak_shared_mib",
                         "dataset_mib", "samples"],
                "student actors of a real DML cohort (run_ray), one epoch"))
    series, summary = exchange_part(ray, args)
    print(table(summary, ["K", "transport", "steps", "store_kib_start", "store_kib_max",
                          "max_steps_in_flight", "store_kib_settled", "objects_settled", "refs_start",
                          "refs_end", "backlog_end", "rss_mib_start", "rss_mib_end", "flat"],
                f"object store and references over {args.steps} exchange steps of {B}x{C} float32 logits"))
    ray.shutdown()
    flat = all(r["flat"] for r in summary)
    print(f"\nobject store flat over {args.steps} steps: {'yes' if flat else 'NO'}; peak RSS per student "
          f"actor: {max(a['peak_rss_mib'] for a in actors):.0f} MiB "
          f"(private {max(a['peak_private_mib'] for a in actors):.0f} MiB)")
    finish(args, "memory", {"machine": machine(args.device), "actors": actors, "exchange": summary,
                            "series": series, "flat": flat}, started)


if __name__ == "__main__":
    main()
