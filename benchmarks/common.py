"""Shared plumbing of the benchmarks: flags, machine description, tables, JSON.

Every benchmark compares things measured in the same run, interleaved (A, B, A, B, ...),
and reports medians and ratios: on a shared machine absolute times drift, ratios much less.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


def parser(name: str, doc: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=f"benchmarks/{name}.py", description=doc.strip().splitlines()[0])
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--out", default=str(HERE / "results" / f"{name}.json"),
                   help="where to write the JSON (default benchmarks/results/%(prog)s.json)")
    p.add_argument("--quick", action="store_true", help="a smoke run: fewer steps and repetitions")
    return p


def proc_memory(pid: int) -> dict:
    """Current and peak resident set size of a process, from /proc (bytes)."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM", "RssAnon", "RssShmem", "RssFile"):
            fields[key] = int(value.split()[0]) * 1024
    return fields


def machine(device: str = "cpu") -> dict:
    import torch
    info = {
        "cpu": _cpu_model(), "cores": os.cpu_count(), "python": platform.python_version(),
        "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
        "loadavg_1m_at_start": round(os.getloadavg()[0], 2), "device": device,
    }
    try:
        import ray
        info["ray"] = ray.__version__
    except ImportError:
        pass
    if device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["gpus"] = torch.cuda.device_count()
    return info


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def median(values) -> float:
    return float(statistics.median(values))


def percentile(values, q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    k = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return float(ordered[k])


def table(rows: list[dict], columns: list[str], title: str = "") -> str:
    """A markdown table (also readable on a terminal)."""
    def fmt(v):
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 1000 else f"{v:,.0f}"
        return str(v)
    cells = [[fmt(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) if cells else len(c)
              for i, c in enumerate(columns)]
    lines = [f"\n{title}"] if title else []
    lines.append("| " + " | ".join(c.ljust(w) for c, w in zip(columns, widths)) + " |")
    lines.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    lines += ["| " + " | ".join(v.ljust(w) for v, w in zip(row, widths)) + " |" for row in cells]
    return "\n".join(lines)


def finish(args, name: str, payload: dict, started: float) -> None:
    payload = {"benchmark": name, "command": " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
               "wall_seconds": round(time.perf_counter() - started, 1),
               "loadavg_1m_at_end": round(os.getloadavg()[0], 2), **payload}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(payload, indent=2, default=float) + "\n")
    print(f"\n{name}: {payload['wall_seconds']}s, load average {payload['loadavg_1m_at_end']}; wrote {out}")


def start_ray(**extra):
    """A private local Ray instance (never joins another engineer's cluster)."""
    import logging

    import ray
    os.environ.pop("RAY_ADDRESS", None)
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    if not ray.is_initialized():
        ray.init(address="local", include_dashboard=False, log_to_driver=False,
                 logging_level=logging.WARNING, **extra)
    return ray
