"""Ray Tune sweeps: a DML grid, ASHA stopping trials early, an interrupted sweep resumed,
and the flag errors that stop a sweep before Ray starts."""
import json
import os
import signal
import subprocess
import sys
import threading
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
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def results(sweep: Path) -> list[dict]:
    return sorted(pq.read_table(sweep / "results.parquet").to_pylist(), key=lambda r: r["trial_id"])


def cluster_state() -> tuple[dict, dict]:
    """({actor id: (name, state, placement group id)}, {placement group id: state}), read from
    the GCS (the tests run Ray without a dashboard, so not through ray.util.state)."""
    from ray._private.state import state
    from ray.core.generated import gcs_pb2
    actors = {}
    for raw in state._connect_and_get_accessor().get_actor_table(None, None):
        actor = gcs_pb2.ActorTableData.FromString(raw)
        if actor.name:
            actors[actor.actor_id.hex()] = (actor.name, gcs_pb2.ActorTableData.ActorState.Name(actor.state),
                                            actor.placement_group_id.hex())
    groups = {gid: info["state"] for gid, info in ray.util.placement_group_table().items()}
    return actors, groups


class Watch(threading.Thread):
    """Samples the cluster every `interval` seconds while a sweep runs in this process's main
    thread: the student actors of each trial (their state and placement group) and every
    placement group's state. A trial is named by its actors, dml-<sweep>-<trial id>-student-k.

    With `sequential` (one trial at a time), students of a trial still alive `grace` seconds
    after the next trial asked for its students are a leak: recorded, then killed, so that a
    leak fails the test instead of starving the next trial forever."""

    def __init__(self, sweep: str, sequential: bool = False, grace: float = 10.0,
                 interval: float = 0.2):
        super().__init__(daemon=True)
        self.prefix = f"dml-{sweep}-"
        self.sequential, self.grace, self.interval = sequential, grace, interval
        self.samples: list[tuple[float, dict, dict]] = []  # (time, {trial: {name: (state, group)}}, groups)
        self.first_seen: dict[str, float] = {}              # trial -> when its students were first asked for
        self.leaks: list[str] = []
        self.done = threading.Event()

    def sample(self):
        actors, groups = cluster_state()
        trials: dict[str, dict] = {}
        for name, state, group in actors.values():
            if name.startswith(self.prefix) and "-student-" in name:
                trial = name[len(self.prefix):].rsplit("-student-", 1)[0]
                trials.setdefault(trial, {})[name] = (state, group)
        now = time.monotonic()
        for trial in trials:
            self.first_seen.setdefault(trial, now)
        return now, trials, groups

    def run(self):
        while not self.done.is_set():
            now, trials, groups = sample = self.sample()
            self.samples.append(sample)
            for trial in trials:
                alive = self.alive(sample, trial)
                successor = self.successor(trial)
                if self.sequential and alive and successor and now - self.first_seen[successor] > self.grace:
                    self.leaks.append(f"trial {trial}'s students {alive} still alive {self.grace:g} s "
                                      f"after trial {successor} started")
                    for name in alive:
                        ray.kill(ray.get_actor(name), no_restart=True)
            time.sleep(self.interval)

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc):
        self.done.set()
        self.join(timeout=10)
        self.samples.append(self.sample())

    def successor(self, trial: str) -> str | None:
        later = [t for t, at in self.first_seen.items() if at > self.first_seen[trial]]
        return min(later, key=self.first_seen.get) if later else None

    @staticmethod
    def alive(sample, trial: str) -> list[str]:
        return sorted(n for n, (state, _) in sample[1].get(trial, {}).items() if state == "ALIVE")

    def groups_of(self, trial: str) -> set[str]:
        """The placement groups the trial's students were placed in."""
        return {g for _, trials, _ in self.samples for _, g in trials.get(trial, {}).values() if g}


def test_grid_over_temperature_two_trials_at_a_time(tmp_path, capsys):
    """A 4-trial grid of 1-epoch DML trials, two at a time (2 x (0.1 + 2 x 0.4) CPUs fit the
    2-CPU cluster): trials overlap in time, all complete; one row per trial, best.json, a
    leaderboard; every student actor and placement group is gone at the end."""
    with Watch("grid") as watch:
        code = main(["sweep", *BASE, "--epochs", "1", "--grid", "temperature=1,2,3,4",
                     "--max-concurrent", "2", "--cpus-per-student", "0.4",
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
        assert config["cpus_per_student"] == 0.4
        assert len(pq.read_table(run / "metrics.parquet")) == 3   # student0, student1, ensemble
    best = json.loads((sweep / "best.json").read_text())
    top = max(rows, key=lambda r: r["best_best_student"])
    assert best["trial_id"] == top["trial_id"] and best["params"] == {"temperature": top["temperature"]}
    from ray.tune import Tuner
    assert Tuner.can_restore(str(sweep))
    out = capsys.readouterr().out
    board = out[out.index("sweep grid: 4 trials"):]
    assert "rank" in board and board.count("completed") == 4 and top["trial_id"] in board

    # Two trials ran at once: seen by the cluster (both trials' students alive in one sample,
    # in two distinct placement groups, both reserved) ...
    trials = [r["trial_id"] for r in rows]
    assert set(watch.first_seen) == set(trials)
    together = [(a, b, sample) for sample in watch.samples for a in trials for b in trials
                if a < b and len(watch.alive(sample, a)) == 2 and len(watch.alive(sample, b)) == 2]
    assert together, "no two trials had their students alive at the same time"
    a, b, sample = together[0]
    groups_a, groups_b = watch.groups_of(a), watch.groups_of(b)
    assert len(groups_a) == len(groups_b) == 1 and groups_a != groups_b
    assert {sample[2][g] for g in groups_a | groups_b} == {"CREATED"}

    # ... and by the run directories: each started (config.json) before the other's epoch ended
    def span(trial):
        run = sweep / "runs" / trial
        return ((run / "config.json").stat().st_mtime_ns,
                (latest_checkpoint(run) / "meta.json").stat().st_mtime_ns)
    spans = {t: span(t) for t in trials}
    assert any(spans[x][0] < spans[y][1] and spans[y][0] < spans[x][1]
               for x in trials for y in trials if x < y), spans

    # Nothing outlives the sweep.
    _, trials_now, groups_now = watch.samples[-1]
    assert all(state == "DEAD" for students in trials_now.values() for state, _ in students.values())
    assert all(groups_now[g] == "REMOVED" for t in trials for g in watch.groups_of(t))


def test_asha_stops_poor_trials_early_and_releases_their_actors(tmp_path):
    """ASHA on the best student's per-epoch accuracy, one trial at a time: the trials with a
    hopeless learning rate stop at the first rung while the good one runs all its epochs. A
    stopped trial's student actors are dead before the next trial's start (watched while the
    sweep runs), and its placement group is removed or handed to the next trial, never kept."""
    with Watch("asha", sequential=True) as watch:
        code = main(["sweep", *BASE, "--epochs", "2", "--grid", "lr=0.2,0.0001,0.00001",
                     "--scheduler", "asha", "--grace-period", "1", "--reduction-factor", "2",
                     "--metric", "best_student", "--name", "asha", "--storage", str(tmp_path)])
    assert code == 0
    rows = {r["lr"]: r for r in results(tmp_path / "asha")}
    assert rows[0.2]["status"] == "completed" and rows[0.2]["epochs"] == 2
    assert [rows[lr]["status"] for lr in (0.0001, 0.00001)] == ["stopped", "stopped"]
    assert rows[0.0001]["epochs"] == rows[0.00001]["epochs"] == 1
    best = json.loads((tmp_path / "asha" / "best.json").read_text())
    assert best["params"] == {"lr": 0.2}

    assert not watch.leaks, watch.leaks
    good, stopped, last = (rows[lr]["trial_id"] for lr in (0.2, 0.0001, 0.00001))
    order = sorted(watch.first_seen, key=watch.first_seen.get)
    assert order == [good, stopped, last]
    # the watcher saw the stopped trial's two students alive, in one placement group ...
    assert any(len(watch.alive(s, stopped)) == 2 for s in watch.samples)
    assert len(watch.groups_of(stopped)) == 1
    # ... and, while the next trial's students were alive, none of them
    after = [s for s in watch.samples if watch.alive(s, last)]
    assert after, "the watcher never saw the last trial's students alive"
    assert all(not watch.alive(s, stopped) for s in after)
    # the stopped trial's placement group: removed, or the one the next trial now uses (Tune
    # reuses a stopped trial's actor and reservation); at most one trial's group held at once
    for s in after:
        assert all(s[2][g] == "REMOVED" or g in watch.groups_of(last) for g in watch.groups_of(stopped))
    for s in watch.samples:
        used = {g for t in s[1] for _, g in s[1][t].values() if g and s[2].get(g) != "REMOVED"}
        assert len(used) <= 1, s
    # at the end: every student dead, every placement group removed
    _, trials_now, groups_now = watch.samples[-1]
    assert all(state == "DEAD" for students in trials_now.values() for state, _ in students.values())
    assert all(groups_now[g] == "REMOVED" for t in (good, stopped, last) for g in watch.groups_of(t))


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
    """Refused before Tune starts: no trial, no run directory, no student actor, no
    placement group (and far from any wait for resources that never come)."""
    started = time.monotonic()
    groups_before = set(ray.util.placement_group_table())
    code = main(["sweep", *BASE, "--students", "4", "--cpus-per-student", "1", "--grid",
                 "temperature=1,2", "--name", "big", "--storage", str(tmp_path)])
    assert code == 1 and time.monotonic() - started < 120
    err = capsys.readouterr().err
    assert "one dml trial needs CPU 4.1" in err and "the cluster has CPU 2" in err
    big = tmp_path / "big"
    assert not (big / "runs").exists() and not (big / "results.parquet").exists()
    assert not list(big.glob("**/trial-*"))   # no Tune trial directory
    actors, groups = cluster_state()
    assert not [name for name, _, _ in actors.values() if name.startswith("dml-big-")]
    assert set(groups) == groups_before


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


@pytest.mark.parametrize("method, counts", [("one", [2, 3]), ("pcl", [2])])
def test_multi_branch_sweep_over_branch_counts(tmp_path, method, counts):
    """ONE (and PCL, another Ray Train method, in one trial) run a TorchTrainer inside the
    Tune trainable; the branch count is searched and each trial's rows (and the metric
    forwarded to Tune) have that many branches."""
    from cohort import methods
    code = main(["sweep", "--method", method, "--arch", "resnet8", *TRAIN, "--rampup-epochs", "0",
                 "--grid", "branches=" + ",".join(map(str, counts)), "--metric", "best_branch",
                 "--name", method, "--storage", str(tmp_path)])
    assert code == 0
    rows = {r["branches"]: r for r in results(tmp_path / method)}
    assert sorted(rows) == counts
    for branches, row in rows.items():
        assert row["status"] == "completed" and row["epochs"] == 1
        assert 0 < row["final_best_branch"] <= 100 and row["final_average"] is not None
        members = {r["member"] for r in pq.read_table(Path(row["run_dir"]) / "metrics.parquet").to_pylist()}
        cfg = methods.get(method).Config(branches=branches)
        assert members == set(methods.get(method).members(cfg))
    best = json.loads((tmp_path / method / "best.json").read_text())
    assert best["metric"] == "best_branch" and best["params"]["branches"] in counts


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
