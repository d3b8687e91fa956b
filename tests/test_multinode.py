"""Several nodes: a Ray cluster of three nodes on this machine (ray.cluster_utils.Cluster), a
head that takes no work (num_cpus=0, as in docker/rayjob.yaml) and two 2-CPU worker nodes.
Cohorts spread over the workers, Train workers on two nodes, a KD stage, a sweep, a student
SIGKILLed on a worker node and a worker node lost mid-run.

No worker shares the driver's disk: every run directory (and the KD stage's teacher file)
is an s3:// URI on a real S3 server on loopback (conftest's `s3`: moto's server mode, the
nodes reach it through the standard AWS variables). The checks read the runs through
pyarrow's S3 filesystem, never through local paths.
"""
import contextlib
import json
import os
import signal
import time

import pyarrow.parquet as pq
import pytest
import ray
import torch
from ray.cluster_utils import Cluster

from cohort.cli import main, run_guarded
from cohort.ray import cluster as cluster_api
from cohort.export import save_plain_model
from cohort.models import build_model
from cohort.methods.one import OneConfig
from cohort.ray.actors import run_ray
from cohort.runs import latest_checkpoint, read_checkpoint
from cohort.runtime import run as run_job
from cohort.runtime.local import run_cohort
from cohort.storage import location
from conftest import BUCKET, assert_states_equal, numbers_of, small, tiny_cohort

NODE_CPUS = 2
STORE_BYTES = 80 * 1024 ** 2
# A killed raylet is declared dead after 3 missed 1-second health checks (default: 5 x 3 s).
FAST_NODE_DEATH = {"health_check_period_ms": 1000, "health_check_failure_threshold": 3}


def add_worker(cluster: Cluster):
    node = cluster.add_node(num_cpus=NODE_CPUS, object_store_memory=STORE_BYTES)
    cluster.wait_for_nodes()
    return node


@pytest.fixture(scope="module")
def cluster(s3):   # the S3 server first: the nodes inherit the AWS variables
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 0, "include_dashboard": False, "object_store_memory": STORE_BYTES,
        "_system_config": FAST_NODE_DEATH})
    try:
        for _ in range(2):
            add_worker(cluster)
        ray.init(address=cluster.address, log_to_driver=False)
        yield cluster
    finally:
        ray.shutdown()
        cluster.shutdown()


@pytest.fixture(autouse=True)
def idle(cluster):
    """Every case starts on an idle cluster."""
    settle()


def s3_folder(name: str) -> str:
    return f"s3://{BUCKET}/multinode/{name}"


@pytest.fixture
def run_root(tmp_path) -> str:
    """Where a case's run directories go: a folder of its own in the S3 bucket."""
    return s3_folder(tmp_path.name)


@pytest.fixture(scope="module")
def data(digits):
    return small(digits)


# ---- reading what a run left (a local path or a URI) ---------------------------------------
def _open(uri: str):
    where = location(uri)   # the project's S3 filesystem, with its timeouts
    return where.fs, where.path


def read_json(uri: str) -> dict:
    fs, path = _open(uri)
    with fs.open_input_stream(path) as f:
        return json.loads(f.read())


def read_rows(run: str) -> list[dict]:
    fs, path = _open(f"{run}/metrics.parquet")
    return pq.read_table(path, filesystem=fs).to_pylist()


def final_states(run: str) -> dict:
    return read_checkpoint(latest_checkpoint(run))[1]


# ---- where things ran ----------------------------------------------------------------------
def actor_table() -> list[dict]:
    """Every actor the GCS knows, dead ones too: id, name, class, pid, start time, state and
    node id (the
    tests run Ray without a dashboard, so not through ray.util.state)."""
    from ray._private.state import state
    from ray.core.generated import gcs_pb2
    actors = []
    for raw in state._connect_and_get_accessor().get_actor_table(None, None):
        actor = gcs_pb2.ActorTableData.FromString(raw)
        actors.append({"id": actor.actor_id.hex(), "name": actor.name, "class": actor.class_name,
                       "pid": actor.pid, "start": actor.start_time,
                       "state": gcs_pb2.ActorTableData.ActorState.Name(actor.state),
                       "node": actor.node_id.hex() or actor.address.node_id.hex()})
    return actors


def cohorts(method: str, run: str) -> list[list[str]]:
    """The nodes of the students of each cohort a run started (its first, then each restart:
    the actors named <method>-<run>-student-<k><suffix>, grouped by suffix), oldest first."""
    prefix, started = f"{method}-{run}-student-", {}
    for actor in actor_table():
        if actor["name"].startswith(prefix):
            k, _, suffix = actor["name"][len(prefix):].partition("-")
            started.setdefault(suffix, {})[int(k)] = (actor["start"], actor["node"])
    ordered = sorted(started.values(), key=lambda members: min(t for t, _ in members.values()))
    return [[members[k][1] for k in sorted(members)] for members in ordered]


def student_nodes(method: str, run: str) -> list[str]:
    """The node of each student of a run's first cohort."""
    return cohorts(method, run)[0]


def worker_node_ids(cluster: Cluster) -> set[str]:
    return {node.node_id for node in cluster.worker_nodes}


def settle(seconds: float = 30.0) -> None:
    """Wait until every CPU is free again (the last run's actors and placement group are
    released asynchronously), so that a placement decides on an idle cluster."""
    deadline = time.monotonic() + seconds
    while ray.available_resources().get("CPU", 0) < ray.cluster_resources().get("CPU", 0):
        assert time.monotonic() < deadline, f"still busy: {ray.available_resources()}"
        time.sleep(0.2)


def alive_worker(cluster: Cluster, node_id: str):
    return next(node for node in cluster.worker_nodes if node.node_id == node_id)


# ---- cohorts over the nodes -------------------------------------------------------------------
SPREAD = dict(placement="spread", cpus_per_student=1)


@pytest.fixture(scope="module")
def packed(cluster, data):
    """A DML cohort packed on one worker node, never interrupted: the reference run."""
    run = s3_folder("reference/packed")
    settle()
    run_ray(tiny_cohort(run, placement="pack", cpus_per_student=1), data)
    nodes = student_nodes("dml", "packed")
    assert len(nodes) == 2 and len(set(nodes)) == 1 and set(nodes) <= worker_node_ids(cluster)
    return run


def assert_same_run(run: str, reference: str) -> None:
    assert numbers_of(read_rows(run)) == numbers_of(read_rows(reference))
    assert_states_equal(final_states(run), final_states(reference))


@pytest.mark.parametrize("exchange", ["store", "collective"])
def test_dml_spread_over_the_worker_nodes_trains_what_one_node_trains(cluster, run_root, data,
                                                                       packed, exchange):
    """--placement spread puts the two students on the two worker nodes (--placement pack put
    them on one); the logits cross nodes through the object store or the collective, and
    the cohort trains exactly what it trains on one node."""
    name = f"dml-{exchange}"
    summary = run_ray(tiny_cohort(f"{run_root}/{name}", exchange=exchange, **SPREAD), data)
    assert summary["epochs_completed"] == 2
    nodes = student_nodes("dml", name)
    assert len(set(nodes)) == 2 and set(nodes) == worker_node_ids(cluster), nodes
    assert_same_run(f"{run_root}/{name}", packed)


def test_kdcl_across_nodes_trains_what_one_process_trains(cluster, run_root, data):
    """KDCL (linear) with a student on each worker node: the rows and weights of the
    single-process reference (up to float rounding)."""
    settings = dict(method="kdcl", variant="linear", temperature=3.0, epochs=1)
    run_ray(tiny_cohort(f"{run_root}/kdcl", **SPREAD, **settings), data)
    run_cohort(tiny_cohort(f"{run_root}/kdcl-local", **settings), data)
    assert len(set(student_nodes("kdcl", "kdcl"))) == 2
    ray_rows, local_rows = read_rows(f"{run_root}/kdcl"), read_rows(f"{run_root}/kdcl-local")
    assert [r["member"] for r in ray_rows] == ["student0", "student1", "ensemble"]
    for a, b in zip(ray_rows, local_rows):
        if a["train_loss"] is not None:
            assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-4)
            assert a["train_kd"] == pytest.approx(b["train_kd"], rel=1e-3) and a["train_kd"] > 0
    ours, theirs = final_states(f"{run_root}/kdcl"), final_states(f"{run_root}/kdcl-local")
    for member in ours:
        for key, value in ours[member]["model"].items():
            if value.is_floating_point():
                assert torch.allclose(value, theirs[member]["model"][key], atol=1e-5), (member, key)


# ---- default CPU shares that fit the nodes --------------------------------------------------------
@pytest.mark.parametrize("nodes, units, share", [
    ([4], 2, 2.0), ([2], 3, 0.66),                 # one node: its CPUs shared out, as before
    ([0, 2, 2], 1, 2.0), ([0, 2, 2], 3, 1.0),      # a head without CPUs and two 2-CPU workers:
    ([0, 2, 2], 4, 1.0), ([3, 1], 2, 1.5),         # never the total / units no node holds
])
def test_default_cpu_share_fits_the_nodes(nodes, units, share):
    assert cluster_api.cpu_share(nodes, units) == share


# ---- Ray Train over the nodes -------------------------------------------------------------------
def train_worker_nodes(before: set[str]) -> list[str]:
    """The nodes of the Ray Train workers that are not among the actors `before`."""
    return [a["node"] for a in actor_table() if "TrainWorker" in a["class"] and a["id"] not in before]


def test_one_trains_with_two_train_workers_on_two_nodes(cluster, run_root, digits):
    before = {a["id"] for a in actor_table()}
    cfg = OneConfig(arch="resnet8", branches=3, dataset="digits", epochs=1, steps_per_epoch=3,
                    batch_size=64, workers=2, rampup_epochs=0, output=f"{run_root}/one",
                    progress=False)
    summary = run_job(cfg, digits)
    assert summary["workers"] == 2 and summary["epochs_completed"] == 1
    nodes = train_worker_nodes(before)
    assert len(nodes) == 2 and set(nodes) == worker_node_ids(cluster), nodes
    rows = read_rows(f"{run_root}/one")
    assert {r["member"] for r in rows} >= {"branch0", "branch1", "branch2", "ensemble"}


def constant_teacher(path: str, favourite: int) -> None:
    """A resnet8 whose logits ignore the input and always favour one class."""
    model = build_model("resnet8", 10, 1)
    with torch.no_grad():
        model.classifier.weight.zero_()
        model.classifier.bias.copy_(torch.nn.functional.one_hot(torch.tensor(favourite), 10) * 8.0)
    save_plain_model(path, "resnet8", 10, 1, model.state_dict())


def test_kd_stage_on_a_worker_node_follows_its_teacher(cluster, run_root, digits):
    """alpha = 1: KD alone; the driver on the head, the Train worker (and the teacher, read
    from the bucket and shipped to it) on a worker node, with the default CPUs: a node's 2, not the cluster's 4, which no
    node holds. The student learns to say what a teacher that always says 3 says."""
    teacher = f"{run_root}/teacher.pt"
    constant_teacher(teacher, favourite=3)
    before = {a["id"] for a in actor_table()}
    out = f"{run_root}/kd"
    assert main(["kd", "--teacher-checkpoint", teacher, "--student", "resnet8", "--dataset",
                 "digits", "--epochs", "1", "--steps-per-epoch", "6", "--workers", "1",
                 "--temperature", "1", "--alpha", "1.0", "--no-progress", "--output", out]) == 0
    summary = read_json(f"{out}/summary.json")
    student = summary["stages"][1]
    nodes = train_worker_nodes(before)
    assert len(nodes) == 1 and set(nodes) <= worker_node_ids(cluster), nodes
    share_of_threes = 100.0 * (digits.test_labels == 3).float().mean().item()
    assert student["test_acc"] == pytest.approx(share_of_threes, abs=2.0), student


# ---- a sweep over the nodes ---------------------------------------------------------------------
def test_two_trial_sweep_runs_one_trial_per_worker_node(cluster, run_root):
    """Each trial (0.1 CPU + 2 students x 0.9 CPU) fits one 2-CPU worker node only: the two
    trials run side by side, one per node."""
    code = main(["sweep", "--method", "dml", "--students", "2", "--arch", "resnet8", "--dataset",
                 "digits", "--epochs", "1", "--cpus-per-student", "0.9", "--grid",
                 "temperature=1,2", "--max-concurrent", "2", "--no-progress", "--name", "grid",
                 "--storage", run_root])
    assert code == 0
    fs, path = _open(f"{run_root}/grid/results.parquet")
    rows = pq.read_table(path, filesystem=fs).to_pylist()
    assert sorted(r["temperature"] for r in rows) == [1.0, 2.0]
    assert all(r["status"] == "completed" and r["epochs"] == 1 for r in rows), rows
    per_trial = [set(student_nodes("dml", f"grid-{r['trial_id']}")) for r in rows]
    assert all(len(nodes) == 1 for nodes in per_trial), per_trial    # a trial packs its students
    assert per_trial[0] != per_trial[1] and set.union(*per_trial) == worker_node_ids(cluster)


# ---- failures -----------------------------------------------------------------------------------
def test_sigkilled_student_on_a_worker_node_restarts_the_cohort(cluster, run_root, data, packed):
    """student1's process on its worker node is SIGKILLed after epoch 1: the cohort restarts
    from the checkpoint and ends where the uninterrupted run ends."""
    name, killed = "sigkill", []

    def kill_student1(rows):
        if rows[0]["epoch"] == 0:
            actor = next(a for a in actor_table() if a["name"] == f"dml-{name}-student-1")
            assert actor["node"] in worker_node_ids(cluster) and actor["state"] == "ALIVE"
            os.kill(actor["pid"], signal.SIGKILL)
            killed.append(actor["pid"])

    summary = run_ray(tiny_cohort(f"{run_root}/{name}", **SPREAD), data, on_epoch=kill_student1)
    assert killed and summary["restarts"] == 1 and summary["epochs_completed"] == 2
    assert_same_run(f"{run_root}/{name}", packed)


@contextlib.contextmanager
def deadline(seconds: float):
    """Fail instead of hanging: TimeoutError in this (the main) thread after `seconds`; a run
    waiting in Ray returns to Python every second, so its cleanup still runs."""
    def expire(signum, frame):
        raise TimeoutError(f"the run was still going after {seconds:g} s")
    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def remove_node_of(cluster: Cluster, actor_name: str) -> str:
    """Kill the raylet (and so every process) of the worker node an actor runs on."""
    node_id = next(a["node"] for a in actor_table() if a["name"] == actor_name)
    cluster.remove_node(alive_worker(cluster, node_id), allow_graceful=False)
    return node_id


@pytest.fixture
def replace_lost_nodes(cluster):
    """Whatever a test removes, the next test finds two worker nodes again."""
    yield
    while len(cluster.worker_nodes) < 2:
        add_worker(cluster)


def test_lost_node_the_cohort_restarts_on_the_node_left(cluster, run_root, data,
                                                        replace_lost_nodes):
    """One student per node (1 CPU each, spread); student1's node goes mid-run. Both students
    fit the node left: the cohort restarts there from its checkpoint and finishes."""
    name, lost = "lost", []

    def remove_student1_node(rows):
        if rows[0]["epoch"] == 0:
            lost.append(remove_node_of(cluster, f"dml-{name}-student-1"))

    with deadline(150):
        summary = run_ray(tiny_cohort(f"{run_root}/{name}", epochs=3, startup_timeout=60, **SPREAD),
                          data, on_epoch=remove_student1_node)
    assert summary["epochs_completed"] == 3 and summary["restarts"] >= 1
    last = cohorts("dml", name)[-1]
    assert len(last) == 2 and lost[0] not in last and len(set(last)) == 1
    assert {r["epoch"] for r in read_rows(f"{run_root}/{name}")} == {0, 1, 2}


def test_lost_node_the_cohort_no_longer_fits_fails_within_the_startup_timeout(
        cluster, run_root, data, capsys, replace_lost_nodes):
    """One 2-CPU student per 2-CPU node; after a node goes, the cohort cannot fit: the run
    fails once --startup-timeout has passed, in one line saying what it waits for. (Ray
    re-places the lost bundles only where they fit; the restart waits for its placement group
    with that deadline instead of starting students in bundles that stay pending for ever.)"""
    name, lost_at = "toobig", []

    def remove_student1_node(rows):
        if rows[0]["epoch"] == 0:
            remove_node_of(cluster, f"dml-{name}-student-1")
            lost_at.append(time.monotonic())

    cfg = tiny_cohort(f"{run_root}/{name}", epochs=3, placement="spread", cpus_per_student=2,
                      startup_timeout=5)
    with deadline(60):
        code = run_guarded(lambda: run_ray(cfg, data, on_epoch=remove_student1_node))
    err = capsys.readouterr().err.strip()
    assert code == 1 and len(err.splitlines()) == 1, err
    assert "could not reserve CPU 4" in err and "within 5s" in err, err
    assert time.monotonic() - lost_at[0] < 5 + 30   # the timeout, plus noticing the node is gone
    assert read_checkpoint(latest_checkpoint(f"{run_root}/{name}"))[0]["epochs_completed"] == 1
