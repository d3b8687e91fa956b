"""The run directory every job writes.

    RUN/config.json        every resolved setting
    RUN/metrics.parquet    one row per (epoch, member)
    RUN/summary.json       final and best test accuracy per member
    RUN/checkpoints/epoch-NNNN/   one consistent snapshot: meta.json + <member>.pt
    RUN/tensorboard/       TensorBoard event files: scalar `<member>/<column>` at step = epoch

RUN is a local path or a URI (cohort.storage: s3://, gs://, anything pyarrow opens). A
checkpoint's meta.json is its completion marker, written after its member files; readers
take only checkpoints that have one, so none is ever read half-written. Locally the whole
snapshot is also written to a temporary directory and renamed into place; an object store
has no rename, so there the marker alone does it. Nothing here imports Ray.
"""
from __future__ import annotations

import json
import math
import numbers
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterable

import pyarrow as pa
import torch

from . import storage
from .errors import CheckpointError, UsageError
from .storage import Location, is_remote

# Settings that change where or how fast a run goes, not its numbers: a resumed run may differ in these.
RUNTIME_KEYS = frozenset({
    "resume", "overwrite", "output", "checkpoint_every", "cpus_per_student", "gpus_per_student",
    "placement", "exchange", "device", "workers", "gpus_per_worker", "cpus_per_worker",
    "max_failures", "progress",
    "address", "keep_checkpoints", "startup_timeout", "name", "max_restarts", "runtime", "recipe",
})
RUN_FILES = ("config.json", "metrics.parquet", "summary.json", "checkpoints", "tensorboard",
             "report.md", "curves.png", "best_student.pt")
METRIC_COLUMNS = ("method", "member", "epoch", "train_loss", "train_ce", "train_kd", "train_acc",
                  "test_acc", "test_loss", "lr", "epoch_seconds", "images_per_second")


def config_differences(old: dict, new: dict) -> list[str]:
    """Settings (outside RUNTIME_KEYS) whose values differ, as 'key (old -> new)'."""
    keys = sorted((set(old) | set(new)) - RUNTIME_KEYS)
    return [f"{k} ({old.get(k)!r} -> {new.get(k)!r})" for k in keys if old.get(k) != new.get(k)]


write_json = storage.write_json   # atomic locally, one whole object on an object store
MARKER = "meta.json"              # a checkpoint is complete once this file exists


def load_checkpoint_file(path: Location) -> dict:
    """torch.load with weights_only=True; unreadable files become a one-line CheckpointError."""
    try:
        return storage.load_torch(path)
    except Exception as exc:  # truncated zip, pickle of a foreign object, ...
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"cannot load checkpoint {path}: not a readable cohort checkpoint "
                              f"({reason[:200]})") from None


class RunDir:
    """A run directory. `plan()` validates without writing; `start()` writes config.json."""

    def __init__(self, path: str | os.PathLike | Location, config: dict, resume: bool = False):
        self.path = storage.location(path)
        self.config = config
        self.resume = resume
        self.rows: list[dict] = []
        self.extra_summary: dict = {}  # e.g. restarts, merged into summary.json
        self._scalars: ScalarLog | None = None  # opened at the first append_metrics

    def __getstate__(self):  # Ray pickles RunDirs into callbacks: never the open event file
        return {**self.__dict__, "_scalars": None}

    # ---- set-up -------------------------------------------------------------------------
    @classmethod
    def plan(cls, path, config: dict, *, resume: bool = False, overwrite: bool = False,
             flag: str = "--output") -> "RunDir":
        """Check that a run may use `path`; raises UsageError, writes nothing."""
        path = storage.location(path, flag)
        try:
            storage.require_bucket(path, flag)
            if resume:
                cls._check_resumable(path, config)
            elif path.exists() and not path.is_dir():
                raise UsageError(flag, f"{path} exists and is not a directory")
            elif path.exists() and any(path.iterdir()) and not overwrite:
                what = "holds another run" if (path / "config.json").exists() else "is not empty"
                raise UsageError(flag, f"{path} {what}; pass --overwrite to replace it "
                                       "or --resume to continue it")
        except OSError as exc:   # an unreachable endpoint, a missing bucket, refused credentials
            raise UsageError(flag, f"cannot read {path} ({storage.first_line(exc)})") from None
        run = cls(path, config, resume=resume)
        run.overwrite = overwrite and not resume
        return run

    @staticmethod
    def _check_resumable(path: Location, config: dict) -> None:
        if not (path / "config.json").exists() or latest_checkpoint(path) is None:
            raise UsageError("--resume", f"no checkpoint under {path}")
        old = json.loads((path / "config.json").read_text())
        diffs = config_differences(old, config)
        if diffs:
            raise UsageError("--resume", "configuration differs from the checkpointed run: "
                                         + ", ".join(diffs))

    def start(self) -> "RunDir":
        if getattr(self, "overwrite", False):
            for name in RUN_FILES:  # only this project's artefacts, never the user's other files
                storage.remove(self.path / name)
        self.path.mkdir(parents=True, exist_ok=True)
        (self.path / "checkpoints").mkdir(exist_ok=True)
        if self.resume and (self.path / "metrics.parquet").exists():
            self.rows = storage.read_parquet(self.path / "metrics.parquet").to_pylist()
        write_json(self.path / "config.json", self.config)
        return self

    # ---- metrics ------------------------------------------------------------------------
    def truncate_metrics(self, start_epoch: int) -> None:
        """Forget rows of epochs a resumed run will train again."""
        self.rows = [r for r in self.rows if r["epoch"] < start_epoch]

    def append_metrics(self, rows: Iterable[dict]) -> None:
        rows = list(rows)
        self.rows.extend(rows)
        table = pa.Table.from_pylist(_same_columns([_clean_row(r) for r in self.rows]))
        storage.write_parquet(table, self.path / "metrics.parquet")
        write_json(self.path / "summary.json", {**summarize(self.rows, self.config), **self.extra_summary})
        if self._scalars is None:
            self._scalars = ScalarLog(self.path / "tensorboard")
        self._scalars.write(rows)

    # ---- checkpoints --------------------------------------------------------------------
    def save_checkpoint(self, epoch: int, members: dict[str, dict], meta: dict | None = None,
                        keep: int = 2) -> Location:
        """Write one consistent snapshot after `epoch` (0-based epochs completed = epoch + 1)."""
        root = self.path / "checkpoints"
        final = root / f"epoch-{epoch + 1:04d}"
        meta = {"epochs_completed": epoch + 1, "members": sorted(members), **(meta or {})}
        if is_remote(final):
            _write_marked_checkpoint(final, members, meta)
        else:
            _rename_checkpoint_into_place(final, members, meta)
        for old in _checkpoint_dirs(self.path)[:-keep]:
            _remove_checkpoint(old)
        return final


def _write_marked_checkpoint(final: Location, members: dict[str, dict], meta: dict) -> None:
    """On an object store: unmark any older snapshot of this epoch, write the member files,
    then the marker. A crash in between leaves an unmarked folder that readers skip."""
    _remove_checkpoint(final)
    for name, state in members.items():
        storage.save_torch(state, final / f"{name}.pt")
    write_json(final / MARKER, meta)


def _rename_checkpoint_into_place(final: Path, members: dict[str, dict], meta: dict) -> None:
    """Locally: the whole snapshot (marker last) in a hidden temporary folder, then renamed."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=".tmp-"))
    try:
        for name, state in members.items():
            torch.save(state, tmp / f"{name}.pt")
        write_json(tmp / MARKER, meta)
        if final.exists():
            shutil.rmtree(final)
        os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _remove_checkpoint(folder: Location) -> None:
    """The marker first, so a reader never takes a checkpoint whose files are going."""
    try:
        storage.remove(folder / MARKER)
        storage.remove(folder)
    except OSError:   # pruning an old snapshot is best effort, as it always was
        pass


class ScalarLog:
    """TensorBoard event files of a run: one scalar `<member>/<column>` per numeric column
    of every metrics row, at step = epoch, flushed after each append (a few ms per epoch).

    Rows that replace ones already logged (a resume, or a restart from a checkpoint) open a
    new event file that starts with a purge marker at their first epoch, so TensorBoard
    drops the stale points of the epochs trained again instead of drawing both.

    SummaryWriter writes local files only: for a run on an object store the events are
    written to a local temporary folder and its files uploaded after every flush."""

    SKIP = frozenset({"epoch"})

    def __init__(self, folder: Location):
        self.target = storage.location(folder)
        self.folder = None if is_remote(self.target) else self.target   # where SummaryWriter writes
        self.writer = None
        self.logged: set[tuple[str, int]] = set()

    def _has_events(self) -> bool:
        return any(p.name.startswith("events.out.tfevents.") for p in self.target.iterdir()) \
            if self.target.is_dir() else False

    def write(self, rows: list[dict]) -> None:
        rows = [r for r in rows if "member" in r and "epoch" in r]
        if not rows:
            return
        first = min(int(r["epoch"]) for r in rows)
        if self.writer is not None and any((str(r["member"]), int(r["epoch"])) in self.logged
                                          for r in rows):
            self.close()   # rows of epochs trained again: a new file that purges the old points
        if self.writer is None:
            from torch.utils.tensorboard import SummaryWriter
            stale = self._has_events()
            if self.folder is None:
                self.folder = Path(tempfile.mkdtemp(prefix="cohort-tb-"))
            self.writer = SummaryWriter(str(self.folder), purge_step=first if stale else None,
                                        flush_secs=3600)
            self.logged = set()
        for row in rows:
            member, epoch = str(row["member"]), int(row["epoch"])
            for key, value in row.items():
                if isinstance(value, torch.Tensor):
                    value = value.item()
                if (key in self.SKIP or isinstance(value, bool) or not isinstance(value, numbers.Real)
                        or not math.isfinite(value)):
                    continue
                self.writer.add_scalar(f"{member}/{key}", value, epoch)
            self.logged.add((member, epoch))
        self.writer.flush()
        self._upload()

    def _upload(self) -> None:
        if is_remote(self.target):
            storage.upload_folder(self.folder, self.target)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
            self._upload()
        if is_remote(self.target) and self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)   # the next writer gets a new one
            self.folder = None

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass


def _checkpoint_dirs(run_path: Location) -> list[Location]:
    """The run's complete checkpoints (those with their marker), oldest first."""
    root = storage.location(run_path) / "checkpoints"
    if not root.is_dir():
        return []
    done = [p for p in root.iterdir() if p.name.startswith("epoch-") and (p / MARKER).exists()]
    return sorted(done)


def latest_checkpoint(run_path) -> Location | None:
    dirs = _checkpoint_dirs(run_path)
    return dirs[-1] if dirs else None


def read_checkpoint(path: Location) -> tuple[dict, dict[str, dict]]:
    """(meta, {member: state}) of a checkpoint directory."""
    path = storage.location(path)
    try:
        meta = json.loads((path / MARKER).read_text())
        names = meta["members"]
    except (OSError, ValueError, KeyError) as exc:
        raise CheckpointError(f"checkpoint {path} has no readable meta.json ({exc})") from None
    return meta, {name: load_checkpoint_file(path / f"{name}.pt") for name in names}


def _same_columns(rows: list[dict]) -> list[dict]:
    """Every row with every column any row has (None where it has none), in the order the
    columns first appear: pyarrow takes the columns from the first row alone."""
    columns = list(dict.fromkeys(key for row in rows for key in row))
    return [{key: row.get(key) for key in columns} for row in rows]


def _clean_row(row: dict) -> dict:
    out = {}
    for key, value in row.items():
        if isinstance(value, torch.Tensor):
            value = value.item()
        out[key] = value
    return out


SELECTION_RULES = {
    "val_acc": "the epoch with the best val_acc (earliest on ties); the test set is never used to choose",
    "final_epoch": "the final epoch (no validation split: give --val-fraction to choose on one)",
}


def _finite(value) -> bool:
    return isinstance(value, numbers.Real) and math.isfinite(value)


def choose(rows: list[dict]) -> tuple[dict, str]:
    """The row "best" means, of one member's rows (sorted by epoch, each with a test_acc):
    the best val_acc when the rows have one, else the final epoch's. Never the test set."""
    scored = [r for r in rows if _finite(r.get("val_acc"))]
    if scored:
        return max(scored, key=lambda r: (r["val_acc"], -r["epoch"])), "val_acc"
    return rows[-1], "final_epoch"


def summarize(rows: list[dict], config: dict) -> dict:
    """Final test accuracy per member, and the "best" one chosen by `choose`."""
    by_member: dict[str, list[dict]] = {}
    for row in sorted(rows, key=lambda r: r["epoch"]):
        if _finite(row.get("test_acc")):
            by_member.setdefault(row["member"], []).append(row)
    members, rules = {}, set()
    for member, mine in by_member.items():
        best, rule = choose(mine)
        rules.add(rule)
        members[member] = {"final_test_acc": mine[-1]["test_acc"], "final_epoch": mine[-1]["epoch"],
                           "best_test_acc": best["test_acc"], "best_epoch": best["epoch"]}
        if rule == "val_acc":
            members[member]["best_val_acc"] = best["val_acc"]
    epochs = 1 + max((r["epoch"] for r in rows), default=-1)
    rule = "val_acc" if "val_acc" in rules else "final_epoch"
    return {"method": config.get("method"), "epochs_completed": epochs, "members": members,
            "selection": SELECTION_RULES[rule]}
