"""DML/KDCL cohorts as Ray actors: transports, equivalence, resume, recovery, placement."""
import os
import shutil
import signal
import socket
import urllib.request
import threading
import time

import pyarrow.parquet as pq
import pytest
import ray
import torch

from cohort.cluster import ResourceError
from cohort.cohort import run_ray
from cohort.engine import run_local
from cohort.runs import latest_checkpoint, read_checkpoint
from conftest import tiny_cohort


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


METRICS_PORT = free_port()


@pytest.fixture(scope="module", autouse=True)
def ray_cluster():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             _metrics_export_port=METRICS_PORT)
    yield
    ray.shutdown()


def final_states(run_dir):
    return read_checkpoint(latest_checkpoint(run_dir))[1]


def assert_states_close(a, b, atol):
    for name in a:
        for key, value in a[name]["model"].items():
            if value.is_floating_point():
                assert torch.allclose(value, b[name]["model"][key], atol=atol), (name, key)


def test_transports_match_single_process(tmp_path, digits):
    """Store and collective give the same training as the single-process reference."""
    settings = dict(epochs=1, checkpoint_every=1)
    # CPU kernels sum in a thread-count-dependent order, and 22 SGD steps amplify the last
    # bits: the reference runs with the actors' single thread (conftest sets it).
    assert torch.get_num_threads() == 1
    run_local(tiny_cohort(tmp_path / "local", **settings), digits)
    run_ray(tiny_cohort(tmp_path / "store", exchange="store", **settings), digits)
    run_ray(tiny_cohort(tmp_path / "collective", exchange="collective", **settings), digits)
    local = final_states(tmp_path / "local")
    store, collective = final_states(tmp_path / "store"), final_states(tmp_path / "collective")
    assert_states_close(store, collective, atol=1e-6)
    assert_states_close(local, store, atol=1e-5)
    rows = {p: pq.read_table(tmp_path / p / "metrics.parquet").to_pylist()
            for p in ("local", "store")}
    for a, b in zip(rows["local"], rows["store"]):
        assert a["member"] == b["member"]
        assert a["test_acc"] == pytest.approx(b["test_acc"], abs=0.6)
        if a["train_loss"] is not None:
            assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-4)
    assert rows["store"][0]["exchange_seconds"] >= 0


def test_kdcl_heterogeneous_cohort_runs(tmp_path, digits):
    cfg = tiny_cohort(tmp_path / "k", method="kdcl", variant="minlogit", archs=["resnet8", "wrn_16_2"],
                      epochs=1, temperature=3.0)
    summary = run_ray(cfg, digits)
    assert set(summary["members"]) == {"student0", "student1", "ensemble"}


def test_resume_continues_to_the_same_numbers(tmp_path, digits):
    run_ray(tiny_cohort(tmp_path / "full", epochs=3), digits)
    cut = tmp_path / "cut"
    shutil.copytree(tmp_path / "full", cut)
    shutil.rmtree(cut / "checkpoints" / "epoch-0003")
    run_ray(tiny_cohort(cut, epochs=3, resume=True), digits)
    assert_states_close(final_states(tmp_path / "full"), final_states(cut), atol=0)
    acc = lambda p: [r["test_acc"] for r in pq.read_table(p / "metrics.parquet").to_pylist()]
    assert acc(tmp_path / "full") == acc(cut)


def test_killed_actor_is_replaced_and_the_run_completes(tmp_path, digits):
    cfg = tiny_cohort(tmp_path / "kill", epochs=4, name="killtest")
    killed = {}

    def kill_student_one():
        deadline = time.time() + 120
        while time.time() < deadline and latest_checkpoint(tmp_path / "kill") is None:
            time.sleep(0.1)
        actor = ray.get_actor("dml-killtest-student-1")
        killed["pid"] = ray.get(actor.pid.remote())
        os.kill(killed["pid"], signal.SIGKILL)

    killer = threading.Thread(target=kill_student_one, daemon=True)
    killer.start()
    summary = run_ray(cfg, digits)
    killer.join(timeout=5)
    assert "pid" in killed
    assert summary["restarts"] >= 1
    assert summary["epochs_completed"] == 4
    rows = pq.read_table(tmp_path / "kill" / "metrics.parquet").to_pylist()
    assert sorted({r["epoch"] for r in rows}) == [0, 1, 2, 3]
    assert len(rows) == 4 * 3  # no duplicated epochs after the restore


def test_too_large_cohort_fails_fast_with_what_was_asked(tmp_path, digits):
    cfg = tiny_cohort(tmp_path / "big", gpus_per_student=1, startup_timeout=5)
    started = time.time()
    with pytest.raises(ResourceError, match=r"GPU 2.*cluster has CPU 2, GPU 0"):
        run_ray(cfg, digits)
    assert time.time() - started < 30
    assert not (tmp_path / "big").exists()


def scrape(port: int) -> list[tuple[str, dict, float]]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    samples = []
    for line in text.splitlines():
        if line.startswith("ray_cohort_"):
            name, rest = line.split("{", 1)
            labels, value = rest.rsplit("}", 1)
            tags = dict(part.split("=", 1) for part in labels.split(",") if "=" in part)
            samples.append((name, {k: v.strip('"') for k, v in tags.items()}, float(value)))
    return samples


def test_live_metrics_reach_the_prometheus_endpoint(tmp_path, digits):
    run_ray(tiny_cohort(tmp_path / "m", epochs=2, name="metricsrun"), digits)
    deadline, found = time.time() + 60, {}
    while time.time() < deadline:
        found = {(name, tags.get("member")): value for name, tags, value in scrape(METRICS_PORT)
                 if tags.get("run") == "metricsrun" and tags.get("method") == "dml"}
        # gauges are exported every few seconds: wait for the last epoch's values
        if ("ray_cohort_test_accuracy", "student1") in found and found.get(("ray_cohort_epoch", "ensemble")) == 2.0:
            break
        time.sleep(2)
    for member in ("student0", "student1"):
        assert 10.0 < found[("ray_cohort_test_accuracy", member)] <= 100.0, found
        assert 0.0 < found[("ray_cohort_train_loss", member)] < 5.0, found
        assert found[("ray_cohort_images_per_second", member)] > 10.0, found
        assert 0.0 < found[("ray_cohort_step_seconds", member)] < 5.0, found
        assert found[("ray_cohort_exchange_seconds", member)] >= 0.0, found
    assert found[("ray_cohort_epoch", "ensemble")] == 2.0
