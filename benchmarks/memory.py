"""Memory: peak resident memory per student actor, and object-store use over 1,000 exchange steps.

Part 1 (actors). A real DML cohort (run_ray, K = 2, resnet20, synthetic 3x32x32, one epoch).
While it trains, the driver finds each StudentWorker by name, asks its pid, and samples
/proc/<pid>/status every 0.2 s: VmHWM (peak resident set, as the kernel counts it, which
includes shared object-store pages the process touched: the dataset is read zero-copy from
the store), and the largest RssAnon seen (private memory: heap, model, activations).

Part 2 (exchange). K stand-in students (benchmarks/exchange.py's Peer: the project's
StoreExchange, no model) exchange 128 x 100 float32 logits for `--steps` steps. Each member's
channel is one object-store buffer allocated when the cohort connects and rewritten in place
every step. Every `--every` steps: the object store's bytes in use and object count (the
raylet's FormatGlobalMemoryInfo, what `ray memory --stats-only` prints), each actor's live
object references (its core worker's reference table) and its RSS. Flat means: the store's
bytes and objects never exceed what they were after the first steps, and the reference
tables do not grow. RSS is reported, not judged (allocator arenas move it a little).
"""
from __future__ import annotations

import os
import tempfile
import threading
import time
from pathlib import Path

import torch

from common import finish, machine, parser, proc_memory, start_ray, table

B, C = 128, 100
MiB = 1024 * 1024


def store_stats() -> dict:
    import ray
    from ray._private.internal_api import get_memory_info_reply, get_state_from_address
    reply = get_memory_info_reply(get_state_from_address(ray.get_runtime_context().gcs_address))
    return {"bytes_used": int(reply.store_stats.object_store_bytes_used),
            "objects": int(reply.store_stats.num_local_objects)}


# ---- part 1: a real cohort ----------------------------------------------------------------------
def actor_part(ray, args) -> list[dict]:
    from cohort.ray.actors import run_ray
    from cohort.methods import config_class
    from cohort.data import load_dataset

    data = load_dataset("synthetic", synthetic_samples=(args.train_images, 256),
                        synthetic_shape=(3, 32, 32), synthetic_classes=100)
    with tempfile.TemporaryDirectory(prefix="bench-memory-") as tmp:
        cfg = config_class("dml")(students=args.students, archs=[args.arch],
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
def exchange_part(ray, args) -> tuple[list[dict], list[dict]]:
    import exchange as bench_exchange
    ray.cloudpickle.register_pickle_by_value(bench_exchange)   # workers need not import it

    series, summary = [], []
    for world in (2, 4):
        peers = bench_exchange.start_peers(ray, world, args.device, 0.0)
        ray.get([p.run.remote("store", "warm", 20) for p in peers])   # channels allocated, warm
        points = []
        for done in range(0, args.steps + 1, args.every):
            if done:
                ray.get([p.run.remote("store", f"m{done}", args.every) for p in peers])
            stats = store_stats()
            refs = ray.get([p.live_references.remote() for p in peers])
            rss = ray.get([p.rss_bytes.remote() for p in peers])
            points.append({"K": world, "transport": "store", "steps": done,
                           "store_bytes": stats["bytes_used"], "store_objects": stats["objects"],
                           "refs_max": max(refs), "rss_mib_max": max(r["VmRSS"] for r in rss) / MiB})
        series += points
        first, last = points[0], points[-1]
        summary.append({"K": world, "transport": "store", "steps": args.steps,
                        "store_kib_start": first["store_bytes"] / 1024,
                        "store_kib_max": max(p["store_bytes"] for p in points) / 1024,
                        "store_kib_end": last["store_bytes"] / 1024,
                        "objects_start": first["store_objects"],
                        "objects_max": max(p["store_objects"] for p in points),
                        "refs_start": first["refs_max"], "refs_end": last["refs_max"],
                        "rss_mib_start": first["rss_mib_max"], "rss_mib_end": last["rss_mib_max"],
                        "flat": (max(p["store_bytes"] for p in points) <= first["store_bytes"]
                                 and max(p["store_objects"] for p in points) <= first["store_objects"]
                                 and last["refs_max"] <= first["refs_max"])})
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
                          "store_kib_end", "objects_start", "objects_max", "refs_start", "refs_end",
                          "rss_mib_start", "rss_mib_end", "flat"],
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
