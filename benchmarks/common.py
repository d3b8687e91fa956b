"""Shared plumbing of the benchmarks: flags, machine description, tables, JSON.

Every benchmark compares things measured in the same run, interleaved in rounds (A, B | B, A |
...), takes one ratio per round and reports the median ratio, its spread (the interquartile
range of the per-round ratios) and the margin to the target: on a shared machine absolute
times drift, ratios of neighbouring measurements much less. A comparison is decisive when its
spread is smaller than its margin (`spread_smaller_than_margin` in the JSON).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
QUICK_DIR = Path(os.environ.get("TMPDIR", "/tmp")) / "cohort-benchmarks-quick"


def parser(name: str, doc: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=f"benchmarks/{name}.py", description=doc.strip().splitlines()[0])
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--out", default="",
                   help=f"where to write the JSON (default benchmarks/results/{name}.json; with "
                        f"--quick {QUICK_DIR}/{name}.json, so smoke numbers never land in results/)")
    p.add_argument("--quick", action="store_true", help="a smoke run: fewer steps and repetitions")
    return p


def out_path(args, name: str) -> Path:
    if args.out:
        return Path(args.out)
    return (QUICK_DIR if args.quick else HERE / "results") / f"{name}.json"


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
        "memory_gib": _memory_gib(), "os": platform.platform(),
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


def _memory_gib() -> float:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 1024 ** 2, 1)
    except OSError:
        pass
    return float("nan")


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


def quartiles(values) -> tuple[float, float]:
    """First and third quartiles (linear interpolation between order statistics)."""
    ordered = sorted(float(v) for v in values)
    if len(ordered) < 2:
        return (ordered[0], ordered[0]) if ordered else (float("nan"), float("nan"))
    q1, _, q3 = statistics.quantiles(ordered, n=4, method="inclusive")
    return float(q1), float(q3)


SPREAD = "IQR: q3 - q1 of the per-round values (inclusive quartiles)"


def spread_stats(per_round) -> dict:
    """Median, quartiles, IQR ("spread"), min and max of per-round values."""
    values = [float(v) for v in per_round]
    q1, q3 = quartiles(values)
    return {"rounds": len(values), "per_round": values, "median": median(values), "q1": q1,
            "q3": q3, "spread": q3 - q1, "spread_stat": SPREAD, "min": min(values),
            "max": max(values)}


def compare(label: str, per_round, target: float, op: str, unit: str = "x") -> dict:
    """One comparison against its target, from per-round values (one ratio per interleaved
    round). `op` is "<=", "<", ">=" or ">". The spread is the interquartile range of the
    per-round values; the margin is the distance from their median to the target; the
    measurement is decisive when the spread is smaller than the margin."""
    st = spread_stats(per_round)
    med = st["median"]
    met = {"<=": med <= target, "<": med < target, ">=": med >= target, ">": med > target}[op]
    margin = abs(med - target)
    return {"label": label, "target": target, "op": op, "unit": unit, **st, "margin": margin,
            "met": bool(met), "spread_smaller_than_margin": bool(st["spread"] < margin)}


def info(label: str, per_round, note: str, unit: str = "x") -> dict:
    """A reported ratio without a target (median and spread only)."""
    return {"label": label, "target": None, "note": note, "unit": unit, **spread_stats(per_round)}


def describe(c: dict) -> str:
    """One line: median, spread, and for a comparison the margin to its target and whether met."""
    u = "" if c["unit"] == "x" else c["unit"]
    line = (f"{c['label']}: {c['median']:.3f}{u} (IQR {c['spread']:.3f}, min-max "
            f"{c['min']:.3f}-{c['max']:.3f} over {c['rounds']} rounds)")
    if c.get("target") is None:
        return f"{line}; {c.get('note', 'reported')}"
    return (f"{line}; target {c['op']} {c['target']:g}{u}: {'met' if c['met'] else 'MISSED'}, "
            f"margin {c['margin']:.3f} {'>' if c['spread_smaller_than_margin'] else '<='} spread")


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


def utc_now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def command_line() -> str:
    """The exact command line of this process (interpreter included), as a shell would take it."""
    return shlex.join([sys.executable, *sys.argv])


STARTED_UTC = utc_now()


def git_state() -> dict:
    """The commit the benchmark ran from, and whether tracked files differed from it."""
    import subprocess

    def git(*argv):
        return subprocess.run(["git", *argv], cwd=HERE, capture_output=True, text=True).stdout.strip()
    try:
        return {"commit": git("rev-parse", "HEAD"), "dirty": bool(git("status", "--porcelain", "-uno"))}
    except OSError:   # no git on this machine
        return {"commit": "", "dirty": None}


def finish(args, name: str, payload: dict, started: float) -> None:
    """Write the benchmark's JSON: machine, UTC start and end, exact command line, results."""
    payload = {"benchmark": name, "date_utc": STARTED_UTC, "finished_utc": utc_now(),
               "command": command_line(), "cwd": os.getcwd(),
               "run_all_command": os.environ.get("COHORT_BENCH_RUN_ALL", ""),
               "quick": bool(getattr(args, "quick", False)),
               "wall_seconds": round(time.perf_counter() - started, 1),
               "loadavg_1m_at_end": round(os.getloadavg()[0], 2), "git": git_state(), **payload}
    payload.setdefault("machine", machine(getattr(args, "device", "cpu")))
    out = out_path(args, name)
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
