"""`cohort report RUN_DIR` / `jobs/report.py`: a Markdown report and a plot of a finished run.

Writes RUN_DIR/report.md and RUN_DIR/curves.png for

- a run directory (dml, kdcl, independent, one, kd): its configuration, a table per member
  of the final and best test accuracy, the ensemble's gain over the mean student (for ONE:
  the gated ensemble over the mean branch), and the time per epoch; the plot has the test
  accuracy and test loss per epoch of every member;
- a directory of stage run directories (TAKD: RUN/stage0-resnet110/, RUN/stage1-...): a
  summary table, then a section per stage; one row of plots per stage;
- a sweep directory with results.parquet (one row per trial): a table with a line per trial
  and a bar plot of the sweep's metric per trial.

Epochs are shown counted from 1 (metrics.parquet counts them from 0). Everything is read
from the files, so a report can be made of a run that is still going or was interrupted.
"""
from __future__ import annotations

import argparse
import io
import json
import math
import re
import statistics
from dataclasses import dataclass, field
from pathlib import Path

from . import storage
from .errors import UsageError
from .runs import choose
from .storage import read_parquet

FLAG = "RUN_DIR"
from .methods import METHODS  # noqa: E402

# members that combine the others, as the methods declare them
AGGREGATES = tuple(dict.fromkeys(a for m in METHODS.values() for a in m.aggregates))
RESERVED_DIRS = {"checkpoints", "tensorboard"}


# ---- reading ---------------------------------------------------------------------------------
@dataclass
class Run:
    path: Path
    config: dict
    rows: list[dict]
    summary: dict = field(default_factory=dict)

    @property
    def name(self) -> str:
        return str(self.config.get("name") or self.path.name)

    @property
    def method(self) -> str:
        methods = {r.get("method") for r in self.rows if r.get("method")}
        return str(self.config.get("method") or (methods.pop() if len(methods) == 1 else "?"))


def natural_key(text: str):
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", str(text))]


def _read_json(path: Path) -> dict:
    try:
        payload = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        raise UsageError(FLAG, f"{path} is not readable JSON ({_reason(exc)})") from None
    return payload if isinstance(payload, dict) else {}


def _read_parquet(path: Path) -> list[dict]:
    try:
        return read_parquet(path).to_pylist()
    except Exception as exc:  # truncated file, not Parquet, ...
        raise UsageError(FLAG, f"{path} is not a readable Parquet file ({_reason(exc)})") from None


def _reason(exc: Exception) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:200]


def is_run_dir(path: Path) -> bool:
    return (path / "metrics.parquet").is_file() or (path / "config.json").is_file()


def load_run(path: Path) -> Run:
    path = storage.location(path, FLAG)
    metrics = path / "metrics.parquet"
    rows = _read_parquet(metrics) if metrics.is_file() else []
    rows.sort(key=lambda r: (r.get("epoch", 0), natural_key(r.get("member", ""))))
    return Run(path, _read_json(path / "config.json"), rows, _read_json(path / "summary.json"))


def stage_dirs(path: Path) -> list[Path]:
    """Sub-directories that are run directories themselves (TAKD's stages), in natural order."""
    subs = [p for p in path.iterdir() if p.is_dir() and not p.name.startswith(".")
            and p.name not in RESERVED_DIRS and is_run_dir(p)]
    return sorted(subs, key=lambda p: natural_key(p.name))


def kind_of(path: Path) -> str:
    """'sweep', 'stages' or 'run'; UsageError naming RUN_DIR for anything else."""
    if not path.exists():
        raise UsageError(FLAG, f"{path} does not exist")
    if not path.is_dir():
        raise UsageError(FLAG, f"{path} is not a directory")
    if (path / "results.parquet").is_file():
        return "sweep"
    if stage_dirs(path):
        return "stages"
    if is_run_dir(path):
        return "run"
    raise UsageError(FLAG, f"{path} is not a run directory (no metrics.parquet, config.json, "
                           "results.parquet or stage run directories in it)")


# ---- numbers ---------------------------------------------------------------------------------
def _num(value) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def members_of(rows: list[dict]) -> list[str]:
    names = {r["member"] for r in rows if r.get("member") is not None}
    plain = sorted((n for n in names if n not in AGGREGATES), key=natural_key)
    return plain + [n for n in AGGREGATES if n in names]


def member_stats(rows: list[dict]) -> dict[str, dict]:
    """Per member: final and best test accuracy (and their 0-based epochs), final test loss,
    mean images per second; from the rows with a test accuracy."""
    stats: dict[str, dict] = {}
    for member in members_of(rows):
        mine = [r for r in rows if r.get("member") == member and _num(r.get("test_acc")) is not None]
        if not mine:
            continue
        mine.sort(key=lambda r: r["epoch"])
        last = mine[-1]
        best, _ = choose(mine)   # on validation accuracy, never on the test set
        speeds = [s for s in (_num(r.get("images_per_second")) for r in mine) if s is not None]
        stats[member] = {
            "final_test_acc": float(last["test_acc"]), "final_epoch": int(last["epoch"]),
            "best_test_acc": float(best["test_acc"]), "best_epoch": int(best["epoch"]),
            "final_test_loss": _num(last.get("test_loss")),
            "images_per_second": statistics.fmean(speeds) if speeds else None,
        }
    return stats


def ensemble_gains(stats: dict[str, dict]) -> dict | None:
    """The ensemble's final and best accuracy minus the mean of the single members' (students
    or ONE's branches); None without an ensemble or single members."""
    singles = [m for m in stats if m not in AGGREGATES]
    if "ensemble" not in stats or not singles:
        return None
    mean_final = statistics.fmean(stats[m]["final_test_acc"] for m in singles)
    mean_best = statistics.fmean(stats[m]["best_test_acc"] for m in singles)
    out = {"singles": singles, "mean_final": mean_final, "mean_best": mean_best}
    for name in AGGREGATES:
        if name in stats:
            out[name] = {"final": stats[name]["final_test_acc"] - mean_final,
                         "best": stats[name]["best_test_acc"] - mean_best}
    return out


def epoch_times(rows: list[dict]) -> dict | None:
    """Seconds per epoch (one value per epoch: the longest its rows report)."""
    per_epoch: dict[int, float] = {}
    for r in rows:
        s = _num(r.get("epoch_seconds"))
        if s is not None:
            per_epoch[int(r["epoch"])] = max(per_epoch.get(int(r["epoch"]), 0.0), s)
    if not per_epoch:
        return None
    seconds = [per_epoch[e] for e in sorted(per_epoch)]
    return {"epochs": len(seconds), "mean": statistics.fmean(seconds),
            "median": statistics.median(seconds), "first": seconds[0],
            "mean_after_first": statistics.fmean(seconds[1:]) if len(seconds) > 1 else None,
            "total": sum(seconds)}


# ---- Markdown ----------------------------------------------------------------------------------
def _fmt(value, digits: int = 2) -> str:
    if value is None:
        return "–"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)
        return f"{value:.{digits}f}"
    if isinstance(value, (list, tuple)):
        return ", ".join(_fmt(v, digits) for v in value) or "–"
    if isinstance(value, dict):
        return json.dumps(value, sort_keys=True)
    return str(value)


def _short(value) -> str:
    """Sweep values: floats with up to 6 significant digits (0.05, 85.75, 1)."""
    if isinstance(value, float) and math.isfinite(value):
        return f"{value:.6g}"
    return _fmt(value)


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def md_table(header: list[str], rows: list[list], align: str = "") -> list[str]:
    align = align or "l" + "r" * (len(header) - 1)
    marks = {"l": "---", "r": "---:", "c": ":---:"}
    lines = ["| " + " | ".join(_cell(h) for h in header) + " |",
             "|" + "|".join(marks[a] for a in align) + "|"]
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    return lines


def _signed(value: float) -> str:
    return f"{value:+.2f}"


def config_lines(config: dict) -> list[str]:
    if not config:
        return ["No config.json in this directory."]
    def show(value) -> str:
        if isinstance(value, float) and math.isfinite(value):
            return repr(value)   # 0.1, 0.0005, -1.0: as configured
        if isinstance(value, (list, tuple)):
            return ", ".join(show(v) for v in value) or "–"
        return _fmt(value)

    return md_table(["setting", "value"], [[f"`{k}`", show(config[k])] for k in sorted(config)],
                    align="ll")


def run_body(run: Run, level: str = "##", show_config: bool = True) -> list[str]:
    """Sections of one run directory's report (headings at `level`)."""
    lines: list[str] = []
    stats = member_stats(run.rows)
    epochs = 1 + max((int(r["epoch"]) for r in run.rows), default=-1)
    planned = run.config.get("epochs")
    lines += [f"- method: **{run.method}**",
              f"- run directory: `{run.path}`",
              f"- epochs completed: {epochs}" + (f" of {planned}" if planned else ""),
              f"- members: {', '.join(members_of(run.rows)) or '–'}"]
    for key in ("restarts", "resumed_from_epoch", "workers"):
        if key in run.summary:
            lines.append(f"- {key.replace('_', ' ')}: {run.summary[key]}")
    if run.summary.get("selection"):
        lines.append(f"- best means: {run.summary['selection']}")
    best = run.summary.get("best_student")
    if isinstance(best, dict):
        lines.append(f"- exported best student: {best.get('member')} of epoch "
                     f"{int(best.get('epoch', -1)) + 1} ({_fmt(_num(best.get('test_acc')))}%), "
                     f"`{best.get('path', 'best_student.pt')}`")
    lines.append("")

    lines += [f"{level} Accuracy", ""]
    if not stats:
        lines += ["No epochs recorded yet.", ""]
    else:
        speed = any(s["images_per_second"] is not None for s in stats.values())
        header = ["member", "final test acc (%)", "best test acc (%)", "best epoch",
                  "final test loss"] + (["images/s"] if speed else [])
        body = []
        for member, s in stats.items():
            row = [member, _fmt(s["final_test_acc"]), _fmt(s["best_test_acc"]),
                   str(s["best_epoch"] + 1), _fmt(s["final_test_loss"], 4)]
            if speed:
                row.append(_fmt(s["images_per_second"], 0))
            body.append(row)
        lines += md_table(header, body) + [""]
        lines += gain_lines(stats, run.method)

    times = epoch_times(run.rows)
    lines += [f"{level} Time per epoch", ""]
    if times is None:
        lines += ["No epoch times recorded.", ""]
    else:
        body = [["epochs timed", str(times["epochs"])],
                ["mean (s)", _fmt(times["mean"])], ["median (s)", _fmt(times["median"])],
                ["first epoch (s)", _fmt(times["first"])]]
        if times["mean_after_first"] is not None:
            body.append(["mean after the first (s)", _fmt(times["mean_after_first"])])
        body.append(["total (s)", _fmt(times["total"], 1)])
        lines += md_table(["", "value"], body) + [""]

    if show_config:
        lines += [f"{level} Configuration", ""] + config_lines(run.config) + [""]
    return lines


def gain_lines(stats: dict[str, dict], method: str) -> list[str]:
    gains = ensemble_gains(stats)
    if gains is None:
        return []
    kind = METHODS[method].member_kind if method in METHODS else "student"
    if all(m.startswith("branch") for m in gains["singles"]):
        kind = "branch"
    ensemble = METHODS[method].ensemble_label if method in METHODS else "ensemble"
    single = kind
    k = len(gains["singles"])
    plural = single + ("es" if single.endswith("ch") else "s")
    lines = [f"Mean of the {k} {plural}: final {_fmt(gains['mean_final'])}%, "
             f"best {_fmt(gains['mean_best'])}%.", ""]
    e = gains["ensemble"]
    lines.append(f"**{ensemble[0].upper() + ensemble[1:]} gain over the mean {single}: "
                 f"{_signed(e['final'])} points** (final), {_signed(e['best'])} points (best).")
    if "average" in gains:
        a = gains["average"]
        lines.append(f"Averaged-softmax ensemble (`average`) gain over the mean {single}: "
                     f"{_signed(a['final'])} points (final), {_signed(a['best'])} points (best).")
    return lines + [""]


def run_report(run: Run) -> str:
    lines = [f"# Report: {run.name}", ""] + run_body(run)
    lines += ["## Curves", "", "![test accuracy and loss per epoch](curves.png)", ""]
    return "\n".join(lines)


def stage_summary_rows(stages: list[Run]) -> list[list[str]]:
    rows = []
    for i, run in enumerate(stages):
        stats = member_stats(run.rows)
        trained = {m: s for m, s in stats.items()
                   if m not in AGGREGATES and not m.startswith("teacher")} or stats
        top = max(trained, key=lambda m: trained[m]["final_test_acc"]) if trained else None
        arch = run.config.get("arch") or run.config.get("student") or run.config.get("archs")
        epochs = 1 + max((int(r["epoch"]) for r in run.rows), default=-1)
        rows.append([str(i), run.path.name, run.method, _fmt(arch), str(epochs), top or "–",
                     _fmt(trained[top]["final_test_acc"]) if top else "–",
                     _fmt(trained[top]["best_test_acc"]) if top else "–"])
    return rows


def stages_report(path: Path, top: Run, stages: list[Run]) -> str:
    lines = [f"# Report: {top.name}", "",
             f"A run of {len(stages)} stages under `{path}`, each its own run directory.", ""]
    lines += ["## Stages", ""]
    lines += md_table(["#", "stage", "method", "arch", "epochs", "member", "final test acc (%)",
                       "best test acc (%)"], stage_summary_rows(stages), align="rlllrlrr") + [""]
    table = top.summary.get("stages")
    if isinstance(table, list) and table and all(isinstance(r, dict) for r in table):
        keys = list(dict.fromkeys(k for r in table for k in r))
        lines += ["Summary table written by the run:", ""]
        lines += md_table(keys, [[_fmt(r.get(k)) for k in keys] for r in table],
                          align="l" * len(keys)) + [""]
    if top.rows:
        lines += ["## Whole run", ""] + run_body(top, "###", show_config=False)
    for i, run in enumerate(stages):
        lines += [f"## Stage {i}: {run.path.name}", ""] + run_body(run, "###")
    if top.config:
        lines += ["## Configuration", ""] + config_lines(top.config) + [""]
    lines += ["## Curves", "", "![test accuracy and loss per epoch, one row per stage](curves.png)", ""]
    return "\n".join(lines)


# ---- sweeps ------------------------------------------------------------------------------------
TRIAL_ID_COLUMNS = ("trial_id", "trial", "trial_name", "name")
META_COLUMNS = {"status", "error", "epochs", "epochs_run", "epochs_completed", "iterations",
                "training_iteration", "time_total_s", "path", "logdir", "trial_dir", "run_dir"}
METRIC_MARKERS = ("acc", "loss", "seconds", "time", "best", "final", "mean")


@dataclass
class Sweep:
    path: Path
    rows: list[dict]
    columns: list[str]
    best: dict

    @property
    def id_column(self) -> str | None:
        return next((c for c in TRIAL_ID_COLUMNS if c in self.columns), None)

    @property
    def searched(self) -> list[str]:
        """Columns holding the searched values: best.json's `params` when it names them, else
        the columns that are neither metadata nor metrics."""
        params = self.best.get("params")
        if isinstance(params, dict) and any(c in params for c in self.columns):
            return [c for c in self.columns if c in params]
        out = []
        for c in self.columns:
            bare = c.split("/", 1)[-1].lower()
            if c == self.id_column or bare in META_COLUMNS or c.lower() in META_COLUMNS:
                continue
            if c.startswith("config/") or not any(m in bare for m in METRIC_MARKERS):
                out.append(c)
        return out

    @property
    def metric(self) -> str | None:
        """The column the sweep ranks by: best.json's metric when it is a column, else the
        first best*/final* accuracy column, else the first numeric metric column."""
        numeric = [c for c in self.columns if any(_num(r.get(c)) is not None for r in self.rows)]
        named = self.best.get("metric")
        candidates = [named, f"best_{named}", f"final_{named}"] if isinstance(named, str) else []
        for c in candidates:
            if c in numeric:
                return c
        searched = set(self.searched)
        metrics = [c for c in numeric if c not in searched and c.lower() not in META_COLUMNS]
        for test in (lambda c: c.startswith("best") and "acc" in c,
                     lambda c: c.startswith("final") and "acc" in c,
                     lambda c: "acc" in c, lambda c: True):
            found = [c for c in metrics if test(c.lower())]
            if found:
                return found[0]
        return None

    @property
    def mode(self) -> str:
        mode = self.best.get("mode")
        if mode in ("min", "max"):
            return mode
        return "min" if self.metric and "loss" in self.metric.lower() else "max"

    def label(self, i: int) -> str:
        row = self.rows[i]
        values = ", ".join(f"{c.split('/', 1)[-1]}={_short(row.get(c))}" for c in self.searched)
        trial = str(row.get(self.id_column)) if self.id_column else f"#{i}"
        return f"{trial}: {values}" if values else trial


def load_sweep(path: Path) -> Sweep:
    table_path = path / "results.parquet"
    try:
        table = read_parquet(table_path)
    except Exception as exc:
        raise UsageError(FLAG, f"{table_path} is not a readable Parquet file ({_reason(exc)})") from None
    return Sweep(path, table.to_pylist(), list(table.column_names), _read_json(path / "best.json"))


def best_trial(sweep: Sweep) -> int | None:
    metric = sweep.metric
    scored = [(v, i) for i, r in enumerate(sweep.rows) if (v := _num(r.get(metric))) is not None]
    if not scored:
        return None
    pick = max if sweep.mode == "max" else min
    return pick(scored, key=lambda t: (t[0], -t[1]) if sweep.mode == "max" else (t[0], t[1]))[1]


def sweep_report(sweep: Sweep) -> str:
    metric, best = sweep.metric, best_trial(sweep)
    lines = [f"# Sweep report: {sweep.path.name}", "",
             f"- sweep directory: `{sweep.path}`",
             f"- trials: {len(sweep.rows)}",
             f"- searched: {', '.join(sweep.searched) or '–'}",
             f"- metric: `{metric}` ({sweep.mode})" if metric else "- metric: –"]
    if "status" in sweep.columns:
        counts: dict[str, int] = {}
        for r in sweep.rows:
            counts[str(r.get("status"))] = counts.get(str(r.get("status")), 0) + 1
        lines.append("- status: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
    if best is not None:
        lines.append(f"- best trial: **{sweep.label(best)}** with {metric} = "
                     f"{_short(sweep.rows[best][metric])}")
    lines += ["", "## Trials", "", "One line per trial; ★ marks the best.", ""]
    header = ["", *sweep.columns]
    body = [["★" if i == best else "", *(_short(r.get(c)) for c in sweep.columns)]
            for i, r in enumerate(sweep.rows)]
    numeric = ["r" if any(_num(r.get(c)) is not None for r in sweep.rows) else "l" for c in sweep.columns]
    lines += md_table(header, body, align="c" + "".join(numeric)) + [""]
    lines += ["## Metric per trial", "", f"![{metric} per trial](curves.png)", ""]
    return "\n".join(lines)


# ---- plots ---------------------------------------------------------------------------------------
def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=110)
    FigureCanvasAgg(fig)   # the Agg canvas: no display, no pyplot state
    return fig


def _style(member: str, index: int) -> dict:
    if member == "ensemble":
        return {"color": "black", "linewidth": 2.4, "zorder": 5}
    if member == "average":
        return {"color": "0.45", "linewidth": 2.0, "linestyle": "--", "zorder": 4}
    return {"color": f"C{index % 10}", "linewidth": 1.4, "alpha": 0.9}


def plot_run_axes(run: Run, ax_acc, ax_loss, title: str) -> None:
    from matplotlib.ticker import MaxNLocator

    epochs = 1 + max((int(r["epoch"]) for r in run.rows), default=-1)
    marker = "o" if epochs <= 30 else None
    index = 0
    for member in members_of(run.rows):
        mine = sorted((r for r in run.rows if r.get("member") == member), key=lambda r: r["epoch"])
        style = _style(member, index)
        index += member not in AGGREGATES
        for ax, key in ((ax_acc, "test_acc"), (ax_loss, "test_loss")):
            points = [(int(r["epoch"]) + 1, v) for r in mine if (v := _num(r.get(key))) is not None]
            if points:
                xs, ys = zip(*points)
                ax.plot(xs, ys, label=member, marker=marker, markersize=3.5, **style)
    for ax, what in ((ax_acc, "test accuracy (%)"), (ax_loss, "test loss")):
        ax.set_title(f"{title}: {what}", fontsize=10)
        ax.set_xlabel("epoch")
        ax.set_ylabel(what)
        ax.grid(True, alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if not run.rows:
            ax.text(0.5, 0.5, "no epochs recorded", ha="center", va="center", transform=ax.transAxes)
    if ax_acc.get_legend_handles_labels()[0]:
        ax_acc.legend(fontsize=8, loc="lower right", ncol=2 if len(members_of(run.rows)) > 6 else 1)


def plot_runs(runs: list[tuple[str, Run]], out: Path) -> None:
    fig = _figure(12.0, 4.2 * len(runs))
    axes = fig.subplots(len(runs), 2, squeeze=False)
    for (title, run), (ax_acc, ax_loss) in zip(runs, axes):
        plot_run_axes(run, ax_acc, ax_loss, title)
    fig.tight_layout()
    _save_figure(fig, out)


def plot_sweep(sweep: Sweep, out: Path) -> None:
    metric = sweep.metric
    n = max(1, len(sweep.rows))
    fig = _figure(max(7.0, min(0.55 * n + 3.0, 24.0)), 5.0)
    ax = fig.subplots()
    labels = [sweep.label(i) for i in range(len(sweep.rows))]
    values = [_num(r.get(metric)) if metric else None for r in sweep.rows]
    statuses = [str(r.get("status", "")) for r in sweep.rows]
    palette = {}
    colors = []
    for s in statuses:
        palette.setdefault(s, f"C{len(palette) % 10}")
        colors.append(palette[s])
    xs = list(range(len(sweep.rows)))
    second = None
    if metric and metric.startswith("best_") and f"final_{metric[5:]}" in sweep.columns:
        second = f"final_{metric[5:]}"
    width = 0.4 if second else 0.7
    bars = ax.bar([x - width / 2 if second else x for x in xs],
                  [v if v is not None else 0.0 for v in values],
                  width=width, color=colors, edgecolor="black", linewidth=0.5)
    if second:
        ax.bar([x + width / 2 for x in xs], [_num(r.get(second)) or 0.0 for r in sweep.rows],
               width=width, color=colors, alpha=0.45, edgecolor="black", linewidth=0.5, hatch="//")
    for x, v in zip(xs, values):
        ax.annotate(f"{v:.2f}" if v is not None else "no result", (x - width / 2 if second else x,
                    v if v is not None else 0.0), ha="center", va="bottom", fontsize=8,
                    xytext=(0, 2), textcoords="offset points")
    best = best_trial(sweep)
    if best is not None:   # the best trial's bar: a thick outline
        bars.patches[best].set_linewidth(2.2)
    ax.set_xticks(xs)
    ax.set_xticklabels(labels, rotation=30 if n > 3 or max(map(len, labels or [""])) > 18 else 0,
                       ha="right" if n > 3 else "center", fontsize=8)
    ax.set_ylabel(metric or "metric")
    shown = [v for v in values if v is not None]
    if shown and metric and "acc" in metric:
        low = min(shown)
        ax.set_ylim(max(0.0, low - max(5.0, 0.15 * (max(shown) - low + 1))), min(100.0, max(shown) + 3))
    title = f"{sweep.path.name}: {metric or 'metric'} per trial"
    if second:
        title += f" (solid: {metric}, hatched: {second})"
    ax.set_title(title, fontsize=10)
    ax.grid(True, axis="y", alpha=0.3)
    from matplotlib.patches import Patch
    if len(palette) > 1 or (statuses and statuses[0]):
        ax.legend(handles=[Patch(color=c, label=s or "?") for s, c in palette.items()],
                  title="status", fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    if not sweep.rows:
        ax.text(0.5, 0.5, "no trials", ha="center", va="center", transform=ax.transAxes)
    fig.tight_layout()
    _save_figure(fig, out)


# ---- entry points --------------------------------------------------------------------------------
def write_report(run_dir) -> tuple[Path, Path]:
    """Write RUN_DIR/report.md and RUN_DIR/curves.png; returns their paths. Raises
    UsageError (naming RUN_DIR) for a path that is not a run, stages or sweep directory."""
    path = storage.location(run_dir, FLAG)   # a local path or a URI (s3://, gs://, ...)
    kind = kind_of(path)
    report, curves = path / "report.md", path / "curves.png"
    if kind == "sweep":
        sweep = load_sweep(path)
        text, draw = sweep_report(sweep), (lambda: plot_sweep(sweep, curves))
    elif kind == "stages":
        top = load_run(path)
        stages = [load_run(p) for p in stage_dirs(path)]
        text = stages_report(path, top, stages)
        draw = (lambda: plot_runs([(f"stage {i}: {r.path.name}", r) for i, r in enumerate(stages)],
                                  curves))
    else:
        run = load_run(path)
        text, draw = run_report(run), (lambda: plot_runs([(f"{run.name} ({run.method})", run)], curves))
    try:
        _write_text(report, text)
        draw()
    except OSError as exc:
        raise UsageError(FLAG, f"cannot write the report into {path} ({exc.strerror or exc})") from None
    return report, curves


def _write_text(path: Path, text: str) -> None:
    storage.write_text(path, text if text.endswith("\n") else text + "\n")


def _save_figure(fig, out) -> None:
    """PNG bytes written whole (locally renamed into place, on an object store one upload)."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    storage.write_bytes(out, buffer.getvalue())


def add_report_flags(p: argparse.ArgumentParser) -> None:
    p.description = ("Write RUN_DIR/report.md and RUN_DIR/curves.png for a run directory, a "
                     "directory of stage runs (TAKD) or a sweep directory (results.parquet)")
    p.add_argument("run_dir", metavar="RUN_DIR", help="run, stages or sweep directory")


def run_report_job(args: argparse.Namespace) -> None:
    report, curves = write_report(args.run_dir)
    print(f"wrote {report} and {curves}", flush=True)
