"""Run every benchmark, one process each (each starts and stops its own Ray), then print the
headline ratios against their targets and write benchmarks/results/summary.json.

    python benchmarks/run_all.py [--device cuda] [--quick] [--out-dir benchmarks/results]
                                 [--only exchange,scaling]

Summary columns: benchmark; target; measured (the median of the per-round ratios, or value);
spread (the interquartile range of the per-round values); margin (|measured - target|); met;
decisive (spread < margin). With --quick the JSON goes to $TMPDIR/cohort-benchmarks-quick/
unless --out-dir is given, so smoke numbers never land in benchmarks/results/.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from common import HERE, QUICK_DIR, command_line, machine, table, utc_now

BENCHMARKS = ("data_path", "exchange", "scaling", "memory", "one_overhead", "teacher", "multinode")


def _fmt(v: float, unit: str) -> str:
    if unit == "%":
        return f"{v:.2f}%"
    return f"{v:.3f}" if abs(v) < 10 else f"{v:.1f}"


def ratio_row(c: dict) -> dict:
    """A summary row from a benchmark's comparison (or target-less info) entry."""
    unit = c.get("unit", "x")
    row = {"benchmark": c["label"], "measured": _fmt(c["median"], unit),
           "spread": f"{_fmt(c['spread'], unit)} (n={c['rounds']})",
           "median": c["median"], "iqr": c["spread"], "rounds": c["rounds"],
           "per_round": c.get("per_round")}
    if c.get("target") is None:
        row.update(target=c.get('note', 'reported'), margin="", met="", decisive="")
    else:
        row.update(target=f"{c['op']} {c['target']:g}{'%' if unit == '%' else ''}",
                   margin=_fmt(c["margin"], unit), met=c["met"],
                   decisive=c["spread_smaller_than_margin"],
                   target_value=c["target"], op=c["op"],
                   spread_smaller_than_margin=c["spread_smaller_than_margin"])
    return row


def headline(name: str, r: dict) -> list[dict]:
    if name == "memory":
        peak = max(a["peak_rss_mib"] for a in r["actors"])
        private = max(a["peak_private_mib"] for a in r["actors"])
        return [{"benchmark": f"memory: object store over {r['exchange'][0]['steps']:,} exchange steps",
                 "target": "flat", "measured": "flat" if r["flat"] else "grows", "spread": "",
                 "margin": "", "met": r["flat"], "decisive": ""},
                {"benchmark": "memory: peak RSS per student actor", "target": "(reported)",
                 "measured": f"{peak:.0f} MiB ({private:.0f} private)", "spread": "", "margin": "",
                 "met": "", "decisive": ""}]
    if name == "teacher":
        # The 5 ms target, and per variant the teacher / student-step ratio at K=4, C=100.
        return [ratio_row(c) for c in r.get("comparisons", []) + r.get("info", [])
                if c.get("target") is not None or (c.get("k"), c.get("classes")) == (4, 100)]
    return [ratio_row(c) for c in r.get("comparisons", []) + r.get("info", [])]


def main() -> None:
    p = argparse.ArgumentParser(description="run every benchmark")
    p.add_argument("--device", default="cpu")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out-dir", default="",
                   help="default benchmarks/results (with --quick: $TMPDIR/cohort-benchmarks-quick)")
    p.add_argument("--only", default="", help="comma list of: " + ", ".join(BENCHMARKS))
    args = p.parse_args()
    chosen = [b for b in (args.only.split(",") if args.only else BENCHMARKS) if b]
    unknown = set(chosen) - set(BENCHMARKS)
    if unknown:
        p.error(f"--only: unknown {', '.join(sorted(unknown))}")
    out_dir = Path(args.out_dir) if args.out_dir else (QUICK_DIR if args.quick else HERE / "results")
    env = {**os.environ, "COHORT_BENCH_RUN_ALL": command_line()}
    date = utc_now()
    rows, failed, seconds = [], [], {}
    started = time.perf_counter()
    for name in chosen:
        out = out_dir / f"{name}.json"
        command = [sys.executable, str(HERE / f"{name}.py"), "--device", args.device, "--out", str(out)]
        if args.quick:
            command.append("--quick")
        print(f"\n=== {name}: {' '.join(command[1:])}", flush=True)
        t0 = time.perf_counter()
        code = subprocess.call(command, env=env)
        seconds[name] = round(time.perf_counter() - t0, 1)
        if code != 0:
            failed.append(name)
            continue
        rows += headline(name, json.loads(out.read_text()))
    shown = [{**r, "met": {True: "yes", False: "NO"}.get(r["met"], r["met"]),
              "decisive": {True: "yes", False: "no"}.get(r["decisive"], r["decisive"])} for r in rows]
    info = machine(args.device)
    total = time.perf_counter() - started
    print(table(shown, ["benchmark", "target", "measured", "spread", "margin", "met", "decisive"],
                f"summary ({info['cores']} x {info['cpu']}, {args.device}, {total:.0f}s; measured: "
                f"median of per-round ratios; spread: IQR of the per-round values (n rounds); "
                f"decisive: spread < margin)"))
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "summary.json").write_text(json.dumps({
        "date_utc": date, "finished_utc": utc_now(), "command": command_line(), "cwd": os.getcwd(),
        "quick": args.quick, "machine": info, "wall_seconds": round(total, 1),
        "benchmark_seconds": seconds,
        "columns": {"measured": "median of the per-round values (ratios unless a unit is shown)",
                    "spread": "interquartile range (q3 - q1) of the per-round values (n: rounds)",
                    "margin": "|measured - target|",
                    "decisive": "spread_smaller_than_margin: spread < margin"},
        "rows": rows, "failed": failed}, indent=2, default=float) + "\n")
    print(f"wrote {out_dir / 'summary.json'}")
    if failed:
        print(f"failed: {', '.join(failed)}")
        sys.exit(1)


if __name__ == "__main__":
    main()
