"""Ray Tune sweeps: a DML grid, ASHA stopping trials early, an interrupted sweep resumed,
and the flag errors that stop a sweep before Ray starts."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import ray

from cohort.cli import main
from cohort.runs import latest_checkpoint

ROOT = Path(__file__).resolve().parents[1]
# Tiny trials: 2 resnet8 students on digits, one trial at a time, small CPU shares.
BASE = ["--method", "dml", "--students", "2", "--arch", "resnet8", "--dataset", "digits",
        "--batch-size", "64", "--schedule", "cosine", "--cpus-per-student", "0.5",
        "--no-progress", "--max-concurrent", "1"]


@pytest.fixture(scope="module", autouse=True)
def ray_cluster():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def results(sweep: Path) -> list[dict]:
    return sorted(pq.read_table(sweep / "results.parquet").to_pylist(), key=lambda r: r["trial_id"])


def test_grid_over_temperature(tmp_path, capsys):
    """A 4-trial grid of 1-epoch DML trials: one row per trial, best.json, a leaderboard."""
    code = main(["sweep", *BASE, "--epochs", "1", "--grid", "temperature=1,2,3,4",
                 "--name", "grid", "--storage", str(tmp_path)])
    assert code == 0
    sweep = tmp_path / "grid"
    rows = results(sweep)
    assert sorted(r["temperature"] for r in rows) == [1.0, 2.0, 3.0, 4.0]
    assert all(r["status"] == "completed" and r["epochs"] == 1 for r in rows)
    assert all(0 < r["final_best_student"] <= 100 and r["final_ensemble"] > 0 for r in rows)
    for row in rows:   # each trial wrote its own cohort run directory under the sweep
        run = Path(row["run_dir"])
        assert run.parent == sweep / "runs"
        config = json.loads((run / "config.json").read_text())
        assert config["temperature"] == row["temperature"] and config["method"] == "dml"
        assert len(pq.read_table(run / "metrics.parquet")) == 3   # student0, student1, ensemble
    best = json.loads((sweep / "best.json").read_text())
    top = max(rows, key=lambda r: r["best_best_student"])
    assert best["trial_id"] == top["trial_id"] and best["params"] == {"temperature": top["temperature"]}
    from ray.tune import Tuner
    assert Tuner.can_restore(str(sweep))
    out = capsys.readouterr().out
    board = out[out.index("sweep grid: 4 trials"):]
    assert "rank" in board and board.count("completed") == 4 and top["trial_id"] in board


def test_asha_stops_poor_trials_early(tmp_path):
    """ASHA on the best student's per-epoch accuracy: the trial with a hopeless learning rate
    stops at the first rung (its actors released) while the good one runs all its epochs."""
    code = main(["sweep", *BASE, "--epochs", "2", "--grid", "lr=0.2,0.0001",
                 "--scheduler", "asha", "--grace-period", "1", "--reduction-factor", "2",
                 "--metric", "best_student", "--name", "asha", "--storage", str(tmp_path)])
    assert code == 0
    rows = {r["lr"]: r for r in results(tmp_path / "asha")}
    assert rows[0.2]["status"] == "completed" and rows[0.2]["epochs"] == 2
    stopped = [r for r in rows.values() if r["status"] == "stopped"]
    assert stopped and all(r["epochs"] < 2 for r in stopped)
    best = json.loads((tmp_path / "asha" / "best.json").read_text())
    assert best["params"] == {"lr": 0.2}


def test_interrupted_sweep_resumes(tmp_path):
    """Ctrl+C (SIGINT) stops a sweep's driver (a separate process on the same cluster) after
    its first trial; --resume runs the rest without training the finished trial again."""
    args = [*BASE, "--epochs", "1", "--grid", "temperature=1,2", "--name", "resume",
            "--storage", str(tmp_path)]
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address,
           "PYTHONPATH": str(ROOT)}
    driver = subprocess.Popen([sys.executable, str(ROOT / "jobs" / "sweep.py"), *args], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    sweep = tmp_path / "resume"
    finished = []
    deadline = time.monotonic() + 120
    while not finished and time.monotonic() < deadline and driver.poll() is None:
        # a trial is done once its last epoch's checkpoint is in place
        finished = [run for run in (sweep / "runs").glob("*") if latest_checkpoint(run) is not None]
        time.sleep(0.2)
    assert finished, f"no trial finished within 120 s: {driver.poll()}"
    driver.send_signal(signal.SIGINT)
    try:
        output, _ = driver.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        driver.kill()
        output, _ = driver.communicate()
    assert driver.returncode != 0, output
    before = {p: (p / "metrics.parquet").read_bytes() for p in finished}
    interrupted = results(sweep)
    assert [r["status"] for r in interrupted].count("completed") < 2

    assert main(["sweep", "--resume", "--name", "resume", "--storage", str(tmp_path)]) == 0
    rows = results(sweep)
    assert sorted(r["temperature"] for r in rows) == [1.0, 2.0]
    assert all(r["status"] == "completed" and r["epochs"] == 1 for r in rows)
    for path, data in before.items():   # finished trials were not trained again
        assert (path / "metrics.parquet").read_bytes() == data


@pytest.mark.parametrize("flags, flag", [
    (["--grid", "temprature=1,2"], "--grid"),
    (["--grid", "temperature=1,hot"], "--grid"),
    (["--sample", "lr=gaussian:0.1:0.2"], "--sample"),
    (["--grid", "temperature=1", "--metric", "student7"], "--metric"),
    (["--grid", "temperature=1", "--output", "x"], "--output"),
])
def test_bad_flags_fail_before_ray(tmp_path, capsys, flags, flag):
    code = main(["sweep", *BASE, *flags, "--name", "bad", "--storage", str(tmp_path)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith(f"error: {flag}:") and "\n" not in err
    assert not (tmp_path / "bad").exists()


def test_sweep_bigger_than_the_cluster_fails_fast(tmp_path, capsys):
    started = time.monotonic()
    code = main(["sweep", *BASE, "--students", "4", "--cpus-per-student", "1", "--grid",
                 "temperature=1,2", "--name", "big", "--storage", str(tmp_path)])
    assert code == 1 and time.monotonic() - started < 30
    err = capsys.readouterr().err
    assert "one dml trial needs CPU 4.1" in err and "the cluster has CPU 2" in err


def test_space_file_and_resume_mismatch(tmp_path, capsys):
    space = tmp_path / "space.yaml"
    space.write_text("grid:\n  temperature: [1, 2]\nsample:\n  lr: loguniform:0.01:0.2\n")
    from cohort.sweep import load_space
    grid, sample = load_space("dml", str(space))
    assert grid == {"temperature": [1.0, 2.0]} and sample == {"lr": ["loguniform", 0.01, 0.2]}
    code = main(["sweep", "--resume", "--name", "nothing", "--storage", str(tmp_path)])
    assert code == 2 and "error: --resume: no restorable sweep" in capsys.readouterr().err


# Ray Train trials: 1 worker, 3 steps of one epoch, so a trial is mostly Ray Train's start-up.
TRAIN = ["--dataset", "digits", "--batch-size", "64", "--epochs", "1",
         "--steps-per-epoch", "3", "--workers", "1", "--cpus-per-worker", "1", "--no-progress",
         "--max-concurrent", "1"]


def test_one_sweep_over_branch_counts(tmp_path):
    """ONE trials run a TorchTrainer inside the Tune trainable; the branch count is searched
    and each trial's rows (and the metric forwarded to Tune) have that many branches."""
    code = main(["sweep", "--method", "one", "--arch", "resnet8", *TRAIN, "--rampup-epochs", "0",
                 "--grid", "branches=2,3", "--metric", "best_branch", "--name", "one",
                 "--storage", str(tmp_path)])
    assert code == 0
    rows = {r["branches"]: r for r in results(tmp_path / "one")}
    assert sorted(rows) == [2, 3]
    for branches, row in rows.items():
        assert row["status"] == "completed" and row["epochs"] == 1
        assert 0 < row["final_best_branch"] <= 100 and row["final_average"] is not None
        members = {r["member"] for r in pq.read_table(Path(row["run_dir"]) / "metrics.parquet").to_pylist()}
        assert members == {f"branch{i}" for i in range(branches)} | {"ensemble", "average"}
    best = json.loads((tmp_path / "one" / "best.json").read_text())
    assert best["metric"] == "best_branch" and best["params"]["branches"] in (2, 3)


def test_kd_sweep_reports_the_student_stage(tmp_path):
    """A KD trial distils a given teacher file with the searched temperature (one trial: the
    grid machinery is the DML tests'); Tune and results.parquet see the student stage."""
    from cohort.export import save_plain_model
    from cohort.models import build_model
    teacher = tmp_path / "teacher.pt"
    save_plain_model(teacher, "resnet8", 10, 1, build_model("resnet8", 10, 1).state_dict())
    code = main(["sweep", "--method", "kd", "--teacher-checkpoint", str(teacher),
                 "--student", "resnet8", *TRAIN, "--grid", "temperature=2",
                 "--metric", "student", "--name", "kd", "--storage", str(tmp_path)])
    assert code == 0
    rows = results(tmp_path / "kd")
    assert [r["temperature"] for r in rows] == [2.0]
    for row in rows:
        assert row["status"] == "completed" and row["epochs"] == 1 and row["final_student"] > 0
        stage = json.loads((Path(row["run_dir"]) / "stage1-resnet8" / "config.json").read_text())
        assert stage["temperature"] == row["temperature"] and stage["teacher"] == str(teacher)
