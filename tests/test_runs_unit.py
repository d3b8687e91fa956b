"""Fast unit tests of cohort.runs: the run directory, its files and checkpoints (no Ray)."""
from __future__ import annotations

import json
import math
import os
import pickle

import pyarrow.parquet as pq
import pytest
import torch
from torch.utils.tensorboard import SummaryWriter  # noqa: F401  (a slow one-off import: at collection)

from cohort import runs
from cohort.errors import CheckpointError, UsageError
from cohort.runs import RunDir, ScalarLog


def _files(folder):
    return sorted(p.name for p in folder.iterdir())


def _row(member, epoch, acc, **extra):
    return {"member": member, "epoch": epoch, "test_acc": acc, **extra}


def _scalars(folder, tag):
    """(step, value) of every point TensorBoard shows for `tag` (purges applied)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0})
    acc.Reload()
    if tag not in acc.Tags()["scalars"]:
        return []
    return [(e.step, e.value) for e in acc.Scalars(tag)]


# ----------------------------------------------------------------------------- config / json

def test_config_differences_sorted_with_reprs_and_runtime_keys_ignored():
    old = {"lr": 0.1, "method": "dml", "epochs": 5, "output": "a", "device": "cpu", "gone": 1}
    new = {"lr": 0.2, "method": "dml", "epochs": 6, "output": "b", "device": "cuda", "extra": "x"}
    assert runs.config_differences(old, new) == [
        "epochs (5 -> 6)", "extra (None -> 'x')", "gone (1 -> None)", "lr (0.1 -> 0.2)"]
    assert runs.config_differences(old, dict(old)) == []
    every_runtime_key = {k: 1 for k in runs.RUNTIME_KEYS}
    assert runs.config_differences(every_runtime_key, {k: 2 for k in runs.RUNTIME_KEYS}) == []


def test_write_json_is_sorted_indented_with_newline_and_leaves_no_temp(tmp_path):
    target = tmp_path / "x.json"
    runs.write_json(target, {"b": 1, "a": [1, 2]})
    assert target.read_text() == '{\n  "a": [\n    1,\n    2\n  ],\n  "b": 1\n}\n'
    runs.write_json(target, {"c": None})           # replaces the old content
    assert json.loads(target.read_text()) == {"c": None}
    assert _files(tmp_path) == ["x.json"]


def test_atomic_write_failure_keeps_old_file_and_removes_temp(tmp_path, monkeypatch):
    target = tmp_path / "x.json"
    target.write_text("old")

    def boom(src, dst):
        assert os.path.basename(src).startswith(".x.json.")   # the temp file sits beside it
        assert os.path.dirname(src) == str(tmp_path)
        raise OSError("disk full")

    monkeypatch.setattr(runs.os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        runs.write_json(target, {"a": 1})
    assert target.read_text() == "old"
    assert _files(tmp_path) == ["x.json"]


# ----------------------------------------------------------------------------- checkpoint files

def test_load_checkpoint_file_reads_tensors(tmp_path):
    state = {"w": torch.arange(3.0), "n": 4}
    torch.save(state, tmp_path / "a.pt")
    loaded = runs.load_checkpoint_file(tmp_path / "a.pt")
    assert torch.equal(loaded["w"], state["w"]) and loaded["n"] == 4


class _Foreign:
    pass


def test_load_checkpoint_file_refuses_foreign_pickles_and_garbage(tmp_path):
    torch.save({"obj": _Foreign()}, tmp_path / "foreign.pt")   # weights_only=True refuses it
    with pytest.raises(CheckpointError) as info:
        runs.load_checkpoint_file(tmp_path / "foreign.pt")
    msg = str(info.value)
    assert msg.startswith(f"cannot load checkpoint {tmp_path / 'foreign.pt'}: "
                          "not a readable cohort checkpoint (")
    assert "\n" not in msg and msg.endswith(")")
    assert info.value.__cause__ is None and info.value.__suppress_context__

    (tmp_path / "cut.pt").write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(CheckpointError, match="cut.pt: not a readable cohort checkpoint"):
        runs.load_checkpoint_file(tmp_path / "cut.pt")


def test_load_checkpoint_file_reason_is_first_line_capped_or_the_type(tmp_path, monkeypatch):
    def long_error(*args, **kwargs):
        raise RuntimeError("  " + "x" * 300 + "\nsecond line")

    monkeypatch.setattr(runs.torch, "load", long_error)
    with pytest.raises(CheckpointError) as info:
        runs.load_checkpoint_file(tmp_path / "a.pt")
    assert str(info.value).endswith("(" + "x" * 200 + ")")

    def silent(*args, **kwargs):
        raise EOFError()

    monkeypatch.setattr(runs.torch, "load", silent)
    with pytest.raises(CheckpointError, match=r"checkpoint \(EOFError\)$"):
        runs.load_checkpoint_file(tmp_path / "a.pt")

    seen = {}

    def spy(path, **kwargs):
        seen.update(kwargs, path=path)
        return {}

    monkeypatch.setattr(runs.torch, "load", spy)
    runs.load_checkpoint_file(tmp_path / "a.pt")
    assert seen == {"path": tmp_path / "a.pt", "map_location": "cpu", "weights_only": True}


# ----------------------------------------------------------------------------- plan / start

def test_plan_new_and_empty_directories(tmp_path):
    run = RunDir.plan(tmp_path / "new", {"method": "dml"})
    assert run.path == tmp_path / "new" and run.config == {"method": "dml"}
    assert run.resume is False and run.overwrite is False
    assert run.rows == [] and run.extra_summary == {}
    assert not (tmp_path / "new").exists()                  # plan writes nothing
    (tmp_path / "empty").mkdir()
    assert RunDir.plan(tmp_path / "empty", {}).overwrite is False
    assert RunDir.plan(tmp_path / "empty", {}, overwrite=True).overwrite is True


def test_plan_refuses_a_file_and_non_empty_directories_naming_the_flag(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(UsageError) as info:
        RunDir.plan(tmp_path / "file", {}, overwrite=True)
    assert info.value.flag == "--output"
    assert str(info.value) == f"--output: {tmp_path / 'file'} exists and is not a directory"

    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(UsageError) as info:
        RunDir.plan(other, {}, flag="--dir")
    assert str(info.value) == (f"--dir: {other} is not empty; pass --overwrite to replace it "
                               "or --resume to continue it")
    (other / "config.json").write_text("{}")
    with pytest.raises(UsageError, match=r"^--output: .* holds another run; pass --overwrite"):
        RunDir.plan(other, {})
    assert RunDir.plan(other, {}, overwrite=True).overwrite is True


def test_start_writes_config_and_overwrite_removes_only_run_files(tmp_path):
    path = tmp_path / "a" / "b"
    run = RunDir.plan(path, {"method": "kd", "lr": 0.1}).start()
    assert json.loads((path / "config.json").read_text()) == {"method": "kd", "lr": 0.1}
    assert (path / "checkpoints").is_dir()
    run.save_checkpoint(0, {"student0": {"w": torch.zeros(1)}})
    run.append_metrics([_row("student0", 0, 50.0)])
    (path / "report.md").write_text("old report")
    (path / "notes.txt").write_text("the user's")
    (path / "keep").mkdir()

    RunDir.plan(path, {"method": "dml"}, overwrite=True).start()
    assert _files(path) == ["checkpoints", "config.json", "keep", "notes.txt"]
    assert list((path / "checkpoints").iterdir()) == []
    assert json.loads((path / "config.json").read_text()) == {"method": "dml"}


def test_resume_needs_a_checkpoint_and_the_same_settings(tmp_path):
    path = tmp_path / "r"
    with pytest.raises(UsageError, match=r"^--resume: no checkpoint under "):
        RunDir.plan(path, {}, resume=True)
    run = RunDir.plan(path, {"lr": 0.1, "output": "x"}).start()
    with pytest.raises(UsageError, match=r"^--resume: no checkpoint under "):
        RunDir.plan(path, {"lr": 0.1}, resume=True)      # config.json but no checkpoint yet
    run.save_checkpoint(0, {"student0": {}})
    (path / "config.json").unlink()
    with pytest.raises(UsageError, match="--resume: no checkpoint"):
        RunDir.plan(path, {"lr": 0.1}, resume=True)      # checkpoint but no config.json
    run.start()
    with pytest.raises(UsageError) as info:
        RunDir.plan(path, {"lr": 0.2, "epochs": 3}, resume=True, overwrite=True)
    assert info.value.flag == "--resume"
    assert str(info.value) == ("--resume: configuration differs from the checkpointed run: "
                               "epochs (None -> 3), lr (0.1 -> 0.2)")
    resumed = RunDir.plan(path, {"lr": 0.1, "output": "y"}, resume=True, overwrite=True)
    assert resumed.resume is True and resumed.overwrite is False   # resume never deletes


def test_resume_start_reloads_metrics_and_truncate_forgets_later_epochs(tmp_path):
    path = tmp_path / "r"
    run = RunDir(path, {"method": "dml"}).start()
    rows = [_row(f"student{m}", e, 10.0 * e + m) for e in range(3) for m in range(2)]
    run.append_metrics(rows)
    run.save_checkpoint(2, {"student0": {}})
    again = RunDir(path, {"method": "dml"}, resume=True).start()
    assert again.rows == rows
    again.truncate_metrics(1)
    assert again.rows == rows[:2]
    fresh = RunDir(path, {"method": "dml"}).start()       # not a resume: starts with no rows
    assert fresh.rows == []


# ----------------------------------------------------------------------------- metrics

def test_append_metrics_writes_parquet_summary_and_scalars(tmp_path):
    run = RunDir(tmp_path, {"method": "dml"}).start()
    run.extra_summary = {"restarts": 1}
    run.append_metrics([_row("student0", 0, 40.0, lr=torch.tensor(0.1, dtype=torch.float64))])
    run.append_metrics(iter([_row("student0", 1, 55.0, lr=0.05)]))
    table = pq.read_table(tmp_path / "metrics.parquet").to_pylist()   # tensors as numbers
    assert table == [_row("student0", 0, 40.0, lr=0.1), _row("student0", 1, 55.0, lr=0.05)]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary == {"method": "dml", "epochs_completed": 2, "restarts": 1, "members": {
        "student0": {"best_test_acc": 55.0, "best_epoch": 1, "final_test_acc": 55.0,
                     "final_epoch": 1}}, "selection": runs.SELECTION_RULES["final_epoch"]}
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    assert _scalars(tmp_path / "tensorboard", "student0/test_acc") == [(0, 40.0), (1, 55.0)]
    assert _scalars(tmp_path / "tensorboard", "student0/lr") == [(0, pytest.approx(0.1)),
                                                                 (1, pytest.approx(0.05))]
    run._scalars.close()


def test_rundir_pickles_without_its_event_writer(tmp_path):
    run = RunDir(tmp_path, {"method": "dml"}).start()
    run.append_metrics([_row("student0", 0, 1.0)])
    assert run._scalars is not None
    clone = pickle.loads(pickle.dumps(run))
    assert clone._scalars is None and clone.rows == run.rows and clone.path == run.path
    assert run._scalars is not None            # the original keeps its writer
    run._scalars.close()


def test_scalar_log_skips_non_numbers_and_the_epoch(tmp_path):
    log = ScalarLog(tmp_path)
    log.write([{"note": "no member"}, {"member": "s", "no": "epoch"}])
    assert log.writer is None                   # nothing to log: no event file
    log.write([{"member": "s", "epoch": 3, "a": 1, "b": True, "c": "text", "d": float("nan"),
                "e": float("inf"), "f": torch.tensor(2.5), "g": None}])
    log.close()
    assert log.writer is None
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(tmp_path))
    acc.Reload()
    assert sorted(acc.Tags()["scalars"]) == ["s/a", "s/f"]
    assert [(e.step, e.value) for e in acc.Scalars("s/f")] == [(3, 2.5)]
    assert [(e.step, e.value) for e in acc.Scalars("s/a")] == [(3, 1.0)]


def test_scalar_log_purges_epochs_trained_again(tmp_path):
    log = ScalarLog(tmp_path)
    log.write([_row("s", 0, 1.0), _row("s", 1, 2.0)])
    log.write([_row("s", 2, 3.0)])                       # new epochs: same file
    assert len(list(tmp_path.glob("events.out.tfevents.*"))) == 1
    log.write([_row("s", 1, 20.0)])                      # epoch 1 again: a new, purging file
    log.write([_row("s", 2, 30.0)])
    log.close()
    assert len(list(tmp_path.glob("events.out.tfevents.*"))) == 2
    assert _scalars(tmp_path, "s/test_acc") == [(0, 1.0), (1, 20.0), (2, 30.0)]
    # A new process (a resume) on a folder with old events purges from its first epoch.
    again = ScalarLog(tmp_path)
    again.write([_row("s", 2, 300.0)])
    del again                                            # closes (and flushes) its file
    assert _scalars(tmp_path, "s/test_acc") == [(0, 1.0), (1, 20.0), (2, 300.0)]


def test_scalar_log_fresh_folder_has_no_purge(tmp_path, monkeypatch):
    import torch.utils.tensorboard as tb
    seen = []
    real = tb.SummaryWriter

    def spy(*args, **kwargs):
        seen.append(kwargs["purge_step"])
        return real(*args, **kwargs)

    monkeypatch.setattr(tb, "SummaryWriter", spy)
    log = ScalarLog(tmp_path / "tb")
    log.write([_row("s", 4, 1.0), _row("s", 5, 1.0)])
    log.close()
    log = ScalarLog(tmp_path / "tb")
    log.write([_row("s", 6, 1.0), _row("s", 5, 1.0)])
    log.close()
    assert seen == [None, 5]


# ----------------------------------------------------------------------------- checkpoints

def test_save_checkpoint_layout_and_keep(tmp_path):
    run = RunDir(tmp_path, {}).start()
    states = {"student1": {"w": torch.ones(2)}, "student0": {"w": torch.zeros(2)}}
    final = run.save_checkpoint(0, states, meta={"restarts": 2})
    assert final == tmp_path / "checkpoints" / "epoch-0001"
    assert _files(final) == ["meta.json", "student0.pt", "student1.pt"]
    meta, loaded = runs.read_checkpoint(final)
    assert meta == {"epochs_completed": 1, "members": ["student0", "student1"], "restarts": 2}
    assert torch.equal(loaded["student1"]["w"], torch.ones(2))
    assert runs.latest_checkpoint(tmp_path) == final
    for epoch in (1, 2, 3):
        run.save_checkpoint(epoch, states)
    assert _files(tmp_path / "checkpoints") == ["epoch-0003", "epoch-0004"]   # keep=2
    run.save_checkpoint(3, {"student0": {"w": torch.full((2,), 7.0)}}, keep=3)   # replaced
    assert _files(tmp_path / "checkpoints") == ["epoch-0003", "epoch-0004"]
    meta, loaded = runs.read_checkpoint(runs.latest_checkpoint(tmp_path))
    assert meta == {"epochs_completed": 4, "members": ["student0"]}
    assert torch.equal(loaded["student0"]["w"], torch.full((2,), 7.0))
    run.save_checkpoint(4, states, keep=1)
    assert _files(tmp_path / "checkpoints") == ["epoch-0005"]


def test_save_checkpoint_failure_leaves_no_partial_snapshot(tmp_path):
    run = RunDir(tmp_path, {}).start()
    run.save_checkpoint(0, {"student0": {}})
    with pytest.raises(Exception):
        run.save_checkpoint(1, {"student0": {"bad": lambda: 0}})   # not picklable
    assert _files(tmp_path / "checkpoints") == ["epoch-0001"]
    shutil_free = RunDir(tmp_path / "nofolder", {})               # start() never called
    assert shutil_free.save_checkpoint(9, {}).name == "epoch-0010"


def test_latest_checkpoint_ignores_incomplete_and_foreign_entries(tmp_path):
    assert runs.latest_checkpoint(tmp_path) is None               # no checkpoints folder
    root = tmp_path / "checkpoints"
    root.mkdir()
    assert runs.latest_checkpoint(tmp_path) is None
    for name in ("epoch-0002", "epoch-0010", "epoch-0011", ".tmp-x", "other"):
        (root / name).mkdir()
    for name in ("epoch-0002", "epoch-0010", ".tmp-x", "other"):
        (root / name / "meta.json").write_text('{"members": []}')
    assert runs.latest_checkpoint(str(tmp_path)) == root / "epoch-0010"


def test_read_checkpoint_errors_name_the_checkpoint(tmp_path):
    bad = tmp_path / "epoch-0001"
    bad.mkdir()
    with pytest.raises(CheckpointError, match=r"epoch-0001 has no readable meta.json"):
        runs.read_checkpoint(bad)
    (bad / "meta.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="has no readable meta.json"):
        runs.read_checkpoint(bad)
    (bad / "meta.json").write_text('{"epochs_completed": 1}')
    with pytest.raises(CheckpointError, match="has no readable meta.json"):
        runs.read_checkpoint(str(bad))
    (bad / "meta.json").write_text('{"members": ["student0"]}')
    with pytest.raises(CheckpointError, match="student0.pt: not a readable cohort checkpoint"):
        runs.read_checkpoint(bad)


# ----------------------------------------------------------------------------- summary

def test_summarize_chooses_best_on_validation_never_on_test():
    """With val_acc, "best" is the epoch of the best val_acc (earliest on ties) and reports
    that epoch's test accuracy, even where another epoch tests higher; without, the final."""
    rows = [_row("a", 2, 70.0, val_acc=80.0), _row("a", 0, 50.0, val_acc=60.0),
            _row("a", 1, 90.0, val_acc=75.0), _row("a", 3, 60.0, val_acc=80.0),
            _row("b", 0, float("nan")), _row("b", 1, 30.0, val_acc=float("nan")), _row("b", 2, None),
            {"member": "c", "epoch": 4}]
    out = runs.summarize(rows, {"method": "kdcl"})
    assert out == {"method": "kdcl", "epochs_completed": 5, "selection": runs.SELECTION_RULES["val_acc"],
                   "members": {
        "a": {"best_test_acc": 70.0, "best_epoch": 2, "best_val_acc": 80.0, "final_test_acc": 60.0,
              "final_epoch": 3},
        "b": {"best_test_acc": 30.0, "best_epoch": 1, "final_test_acc": 30.0, "final_epoch": 1}}}
    no_val = [{k: v for k, v in r.items() if k != "val_acc"} for r in rows if r["member"] == "a"]
    plain = runs.summarize(no_val, {})["members"]["a"]
    assert plain == {"best_test_acc": 60.0, "best_epoch": 3, "final_test_acc": 60.0, "final_epoch": 3}
    assert runs.summarize([], {}) == {"method": None, "epochs_completed": 0, "members": {},
                                      "selection": runs.SELECTION_RULES["final_epoch"]}
    zero = runs.summarize([_row("a", 0, 0.0)], {})["members"]["a"]
    assert zero == {"best_test_acc": 0.0, "best_epoch": 0, "final_test_acc": 0.0, "final_epoch": 0}
    assert math.isfinite(runs.summarize([_row("a", 0, 5)], {})["members"]["a"]["best_test_acc"])


def test_temporary_files_are_hidden_beside_their_target(tmp_path, monkeypatch):
    """Metrics and checkpoints are written under a dot-name in the same folder, then renamed
    (atomic on one file system; readers and the checkpoint listing never see them)."""
    run = RunDir(tmp_path, {}).start()
    replaced, renamed = [], []
    real_replace, real_rename = os.replace, os.rename
    monkeypatch.setattr(runs.os, "replace", lambda a, b: (replaced.append((a, b)), real_replace(a, b)))
    monkeypatch.setattr(runs.os, "rename", lambda a, b: (renamed.append((a, b)), real_rename(a, b)))
    run.append_metrics([_row("s", 0, 1.0)])
    run.save_checkpoint(0, {"s": {}})
    run._scalars.close()
    src, dst = next((a, b) for a, b in replaced if str(b).endswith("metrics.parquet"))
    assert os.path.dirname(src) == str(tmp_path) and os.path.basename(src).startswith(".metrics.")
    (src, dst), = renamed
    assert src.parent == tmp_path / "checkpoints" and src.name.startswith(".tmp-")
    assert dst == tmp_path / "checkpoints" / "epoch-0001"


def test_scalar_log_existing_empty_folder_has_no_purge(tmp_path, monkeypatch):
    import torch.utils.tensorboard as tb
    seen = []
    real = tb.SummaryWriter
    monkeypatch.setattr(tb, "SummaryWriter",
                        lambda *a, **k: (seen.append(k["purge_step"]), real(*a, **k))[1])
    (tmp_path / "tb").mkdir()
    (tmp_path / "tb" / "notes.txt").write_text("not an event file")
    log = ScalarLog(tmp_path / "tb")
    log.write([_row("s", 3, 1.0)])
    log.close()
    assert seen == [None]


def test_metrics_keep_columns_that_only_later_rows_have(tmp_path):
    """A column only some members have (a leader's train_loss, a mean network's val_acc) is
    kept even when the first row lacks it: pyarrow alone takes the first row's columns."""
    run = RunDir(tmp_path, {"method": "pcl"}).start()
    run.append_metrics([_row("branch0", 0, 40.0), _row("ema0", 0, 30.0, val_acc=35.0)])
    table = pq.read_table(tmp_path / "metrics.parquet").to_pylist()
    assert [r.get("val_acc") for r in table] == [None, 35.0]
    run._scalars.close()
