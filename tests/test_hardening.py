"""Bad input, bad numbers, bad files: one line, the right exit code, nothing lost."""
import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray
import torch

from cohort import methods
from cohort.cli import main
from cohort.data import epoch_batches
from cohort.runtime.local import run_cohort
from cohort.errors import TrainingDiverged
from cohort.runs import latest_checkpoint, read_checkpoint
from conftest import tiny_cohort

ROOT = Path(__file__).resolve().parents[1]
BASE = ["--students", "2", "--arch", "resnet8", "--dataset", "digits", "--epochs", "1",
        "--batch-size", "64", "--no-progress"]


def run_cli(capsys, command, *args):
    code = main([command, *args])
    err = capsys.readouterr().err.strip()
    return code, err


BAD_COHORT_FLAGS = [
    (["--students", "1"], "--students"),
    (["--temperature", "0"], "--temperature"),
    (["--temperature", "-1"], "--temperature"),
    (["--kd-weight", "-0.5"], "--kd-weight"),
    (["--arch", "resnet9"], "--arch"),
    (["--arch", "resnet8,wrn_16_2,resnet20"], "--arch"),
    (["--dataset", "imagenet"], "--dataset"),
    (["--schedule", "linear"], "--schedule"),
    (["--exchange", "mpi"], "--exchange"),
    (["--batch-size", "0"], "--batch-size"),
    (["--batch-size", "100000"], "--batch-size"),
    (["--epochs", "0"], "--epochs"),
    (["--lr", "0"], "--lr"),
    (["--dataset", "cifar10", "--data-dir", "/nonexistent/cifar"], "--data-dir"),
    (["--dataset", "parquet", "--data-dir", "/nonexistent/x.parquet"], "--data-dir"),
    (["--placement", "scatter"], "--placement"),
    (["--max-restarts", "-1"], "--max-restarts"),
]


@pytest.mark.parametrize("flags,flag", BAD_COHORT_FLAGS, ids=[f[1] + ":" + f[0][-1] for f in BAD_COHORT_FLAGS])
def test_bad_cohort_flag_is_one_line_exit_2_before_anything(tmp_path, capsys, flags, flag):
    out = tmp_path / "run"
    code, err = run_cli(capsys, "dml", *BASE, "--output", str(out), *flags)
    assert code == 2
    assert len(err.splitlines()) == 1 and flag in err, err
    assert not out.exists()
    assert not ray.is_initialized()


def test_kdcl_variant_and_general_without_held_out_split(tmp_path, capsys):
    code, err = run_cli(capsys, "kdcl", *BASE, "--output", str(tmp_path / "a"), "--variant", "max")
    assert code == 2 and "--variant" in err and "minlogit" in err
    # general fits its weights on a held-out split: 10% by default, never none
    code, err = run_cli(capsys, "kdcl", *BASE, "--output", str(tmp_path / "b"), "--variant", "general",
                        "--val-fraction", "0")
    assert code == 2 and "--val-fraction" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "b").exists() and not ray.is_initialized()


def write_parquet(path, labels):
    images = [bytes(64) for _ in labels]
    table = pa.table({"image": pa.array([list(b) for b in images], pa.list_(pa.uint8())),
                      "height": [8] * len(labels), "width": [8] * len(labels),
                      "label": labels, "split": ["train"] * (len(labels) - 2) + ["test"] * 2})
    pq.write_table(table, path)


def test_parquet_with_bad_columns_or_labels(tmp_path, capsys):
    write_parquet(tmp_path / "ok.parquet", [0, 1] * 10)
    pq.write_table(pa.table({"pixels": [b"x"], "label": [0]}), tmp_path / "nocol.parquet")
    code, err = run_cli(capsys, "dml", *BASE, "--output", str(tmp_path / "r1"), "--dataset", "parquet",
                        "--data-dir", str(tmp_path / "nocol.parquet"))
    assert code == 2 and "--data-dir" in err and "image" in err
    meta = pq.read_table(tmp_path / "ok.parquet")
    meta = meta.replace_schema_metadata({b"num_classes": b"2"})
    labels = meta.column("label").to_pylist()
    labels[0] = 7
    bad = meta.set_column(meta.schema.get_field_index("label"), "label", pa.array(labels))
    pq.write_table(bad, tmp_path / "badlabel.parquet")
    code, err = run_cli(capsys, "dml", *BASE, "--output", str(tmp_path / "r2"), "--dataset", "parquet",
                        "--data-dir", str(tmp_path / "badlabel.parquet"))
    assert code == 2 and "--data-dir" in err and "label" in err


def test_resume_without_checkpoint_or_with_other_settings(tmp_path, capsys, digits):
    code, err = run_cli(capsys, "dml", *BASE, "--output", str(tmp_path / "none"), "--resume")
    assert code == 2 and "--resume" in err and "no checkpoint" in err
    run_cohort(tiny_cohort(tmp_path / "r", epochs=1), digits)
    before = sorted(p.name for p in (tmp_path / "r").rglob("*"))
    code, err = run_cli(capsys, "dml", *BASE, "--runtime", "local", "--output", str(tmp_path / "r"),
                        "--resume", "--temperature", "4", "--lr", "0.05")
    assert code == 2 and "temperature (1.0 -> 4.0)" in err and "lr" in err
    assert sorted(p.name for p in (tmp_path / "r").rglob("*")) == before


def test_truncated_or_foreign_checkpoint_is_a_clear_error(tmp_path, capsys, digits):
    run_cohort(tiny_cohort(tmp_path / "r", epochs=1), digits)
    member = latest_checkpoint(tmp_path / "r") / "student0.pt"
    member.write_bytes(member.read_bytes()[:1000])
    args = ["dml", *BASE, "--runtime", "local", "--lr", "0.1", "--schedule", "cosine",
            "--output", str(tmp_path / "r"), "--resume"]
    code, err = run_cli(capsys, *args)
    assert code == 2 and "cannot load checkpoint" in err and len(err.splitlines()) == 1
    import argparse
    torch.save({"model": argparse.Namespace(x=1)}, member)  # a pickled arbitrary object
    code, err = run_cli(capsys, *args)
    assert code == 2 and "cannot load checkpoint" in err


class RunsCodeWhenUnpickled:
    """Unpickling this creates the file `marker`: a stand-in for a malicious checkpoint."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return Path.touch, (self.marker,)


def test_checkpoints_never_unpickle_code_even_if_torch_defaults_to_unsafe(tmp_path, capsys, monkeypatch):
    """load_checkpoint_file asks for weights_only=True itself: with torch's default switched to
    full unpickling (TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD, which overrides only an unset argument),
    a checkpoint whose unpickling would run code is refused and the code never runs."""
    from cohort.errors import CheckpointError
    from cohort.runs import load_checkpoint_file
    marker = tmp_path / "code-ran"
    evil = tmp_path / "evil.pt"
    torch.save({"arch": "resnet8", "model": {}, "payload": RunsCodeWhenUnpickled(marker)}, evil)
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    # the premise: with the variable set, a torch.load that leaves weights_only unset runs the code
    probe = tmp_path / "probe.pt"
    torch.save(RunsCodeWhenUnpickled(tmp_path / "probe-ran"), probe)
    with pytest.warns(UserWarning, match="TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"):
        torch.load(probe)
    assert (tmp_path / "probe-ran").exists()

    with pytest.raises(CheckpointError, match="cannot load checkpoint"):
        load_checkpoint_file(evil)
    assert not marker.exists()
    # the same through a user's entry point: a KD teacher file, refused before anything runs
    code, err = run_cli(capsys, "kd", "--teacher-checkpoint", str(evil), "--dataset", "digits",
                        "--output", str(tmp_path / "run"))
    assert code == 2 and "cannot load checkpoint" in err and len(err.splitlines()) == 1
    assert not marker.exists() and not (tmp_path / "run").exists()


def test_non_finite_loss_stops_naming_member_epoch_step_and_keeps_checkpoint(tmp_path, digits, monkeypatch):
    dml = methods.METHODS["dml"]
    steps_per_epoch = len(epoch_batches(digits.num_train, 64, 0, 0))

    class Poisoned(dml):   # student1's loss turns NaN at the first step of epoch 1
        calls = 0

        def targets(self, *args):
            Poisoned.calls += 1
            return super().targets(*args)

        def loss(self, k, z, targets, labels):
            loss = super().loss(k, z, targets, labels)
            if k == 1 and Poisoned.calls > steps_per_epoch:
                loss.terms["ce"] = loss.terms["ce"] * float("nan")
            return loss

    monkeypatch.setitem(methods.METHODS, "dml", Poisoned)
    with pytest.raises(TrainingDiverged, match=r"'student1' at epoch 1, step 0"):
        run_cohort(tiny_cohort(tmp_path / "nan", epochs=3), digits)
    meta, states = read_checkpoint(latest_checkpoint(tmp_path / "nan"))
    assert meta["epochs_completed"] == 1
    assert all(torch.isfinite(v).all() for v in states["student1"]["model"].values()
               if v.is_floating_point())
    rows = pq.read_table(tmp_path / "nan" / "metrics.parquet").to_pylist()
    assert {r["epoch"] for r in rows} == {0}


def test_cli_process_exit_code_and_single_line(tmp_path):
    done = subprocess.run([sys.executable, str(ROOT / "jobs" / "dml.py"), *BASE, "--students", "1",
                           "--output", str(tmp_path / "x")], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [done.stderr.strip()]
    assert "--students" in done.stderr and not (tmp_path / "x").exists()


def test_local_instance_dashboard_listens_on_loopback_with_token_auth():
    """A job with no cluster starts one whose dashboard binds 127.0.0.1 and refuses requests
    without the token. RAY_AUTH_* are removed from the child's environment: an earlier
    ray.init() in this process sets RAY_AUTH_MODE=token, and the default is what matters."""
    probe = ("import urllib.error, urllib.request\n"
             "from cohort.ray.cluster import connect\n"
             "ctx = connect()\n"
             "print('DASHBOARD', ctx.dashboard_url)\n"
             "try:\n"
             "    urllib.request.urlopen(f'http://{ctx.dashboard_url}/api/jobs/', timeout=10)\n"
             "    print('STATUS 200')\n"
             "except urllib.error.HTTPError as exc:\n"
             "    print('STATUS', exc.code)\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120,
                          cwd=ROOT, env=env)
    line = [l for l in done.stdout.splitlines() if l.startswith("DASHBOARD")]
    assert line and line[0].split()[1].startswith("127.0.0.1:"), done.stdout + done.stderr[-2000:]
    assert "STATUS 401" in done.stdout, done.stdout + done.stderr[-2000:]
    assert "Token authentication is enabled" in done.stderr
