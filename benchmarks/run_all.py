"""Run every benchmark, one process each (each starts and stops its own Ray), then print the
headline ratios against their targets.

    python benchmarks/run_all.py [--device cuda] [--quick] [--out-dir benchmarks/results]
                                 [--only exchange,scaling]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from common import HERE, machine, table

BENCHMARKS = ("data_path", "exchange", "scaling", "memory", "one_overhead")


def headline(name: str, r: dict) -> list[dict]:
    if name == "data_path":
        return [{"benchmark": "data path: batched uint8 augment vs DataLoader+PIL", "target": ">= 5x",
                 "measured": f"{r['ratio_vs_best_torchvision']:.1f}x", "met": r["met"]}]
    if name == "exchange":
        rows = [{"benchmark": f"exchange: store / bare gloo all_gather, K={k}", "target": "<= 1.0",
                 "measured": f"{v:.2f}", "met": v <= 1.0} for k, v in r["store_vs_bare"].items()]
        if r["exposed"]:
            rows.append({"benchmark": "exchange: exposed share of step time (worst transport)",
                         "target": "< 5%", "measured": f"{r['worst_exposed_pct']:.1f}%",
                         "met": r["worst_exposed_pct"] < 5})
        return rows
    if name == "scaling":
        return [{"benchmark": f"scaling K={r['students']}: sequential on one core / actors",
                 "target": ">= 1.7x", "measured": f"{r['sequential_1thread_over_ray']:.2f}x",
                 "met": r["met_one_core"]},
                {"benchmark": f"scaling K={r['students']}: sequential on all cores / actors",
                 "target": ">= 1.7x", "measured": f"{r['sequential_over_ray']:.2f}x",
                 "met": r["met_all_threads"]},
                {"benchmark": "scaling: cohort step / one student alone", "target": "(1.0 ideal)",
                 "measured": f"{r['cohort_step_over_alone']:.2f}x", "met": ""}]
    if name == "memory":
        peak = max(a["peak_rss_mib"] for a in r["actors"])
        private = max(a["peak_private_mib"] for a in r["actors"])
        return [{"benchmark": "memory: object store over 1,000 exchange steps", "target": "flat",
                 "measured": "flat" if r["flat"] else "grows", "met": r["flat"]},
                {"benchmark": "memory: peak RSS per student actor", "target": "(reported)",
                 "measured": f"{peak:.0f} MiB ({private:.0f} private)", "met": ""}]
    if name == "one_overhead":
        return [{"benchmark": "ONE: Ray Train 1 worker / bare loop, per epoch", "target": "<= 1.05",
                 "measured": f"{r['ratio']:.3f}", "met": r["met"]}]
    return []


def main() -> None:
    p = argparse.ArgumentParser(description="run every benchmark")
    p.add_argument("--device", default="cpu")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out-dir", default=str(HERE / "results"))
    p.add_argument("--only", default="", help="comma list of: " + ", ".join(BENCHMARKS))
    args = p.parse_args()
    chosen = [b for b in (args.only.split(",") if args.only else BENCHMARKS) if b]
    unknown = set(chosen) - set(BENCHMARKS)
    if unknown:
        p.error(f"--only: unknown {', '.join(sorted(unknown))}")
    out_dir = Path(args.out_dir)
    rows, failed = [], []
    started = time.perf_counter()
    for name in chosen:
        out = out_dir / f"{name}.json"
        command = [sys.executable, str(HERE / f"{name}.py"), "--device", args.device, "--out", str(out)]
        if args.quick:
            command.append("--quick")
        print(f"\n=== {name}: {' '.join(command[1:])}", flush=True)
        if subprocess.call(command) != 0:
            failed.append(name)
            continue
        rows += headline(name, json.loads(out.read_text()))
    for r in rows:
        r["met"] = {True: "yes", False: "NO"}.get(r["met"], r["met"])
    info = machine(args.device)
    print(table(rows, ["benchmark", "target", "measured", "met"],
                f"summary ({info['cores']} x {info['cpu']}, {args.device}, "
                f"{time.perf_counter() - started:.0f}s)"))
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "summary.json").write_text(json.dumps({"machine": info, "rows": rows,
                                                      "failed": failed}, indent=2) + "\n")
    if failed:
        print(f"failed: {', '.join(failed)}")
        sys.exit(1)


if __name__ == "__main__":
    main()
