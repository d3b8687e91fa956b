"""DML/KDCL cohorts as Ray actors: transports, equivalence, resume, recovery, placement."""
import os
import signal
import urllib.request
import threading
import time

from pathlib import Path

import pytest
import ray
import torch

from cohort.cli import run_guarded
from cohort.ray.cluster import ResourceError
from cohort.config import EXCHANGES
from cohort.ray.actors import ActorCohort, run_ray
from cohort.data import load_dataset
from cohort.runtime.local import run_cohort
from cohort.runs import latest_checkpoint, load_checkpoint_file, read_checkpoint
from conftest import assert_states_equal, free_port, numbers_of, rows_of, small, tiny_cohort



METRICS_PORT = free_port()


@pytest.fixture(scope="module", autouse=True)
def ray_cluster():
    # address="local": a cluster of its own, even when another session on this machine runs one
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
             _metrics_export_port=METRICS_PORT)
    yield
    ray.shutdown()


class Stop(Exception):
    """Stands for Ctrl+C or a lost driver: the run ends where it is."""



def final_states(run_dir):
    return read_checkpoint(latest_checkpoint(run_dir))[1]


def assert_states_close(a, b, atol):
    assert set(a) == set(b)
    for name in a:
        for key, value in a[name]["model"].items():
            if value.is_floating_point():
                assert torch.allclose(value, b[name]["model"][key], atol=atol), (name, key)


def faulty_worker(kind: str, member: int, epoch: int, step: int, record: Path, times: int = 1):
    """The real student actor, except that student `member` fails at (epoch, step), at most
    `times` times over all attempts (each failure leaves a file in `record`): `kill` SIGKILLs
    its own process mid-step (`kill-wiring`: while the cohort is wired, before training), `nan` /
    `inf` make its loss non-finite, `close` closes its
    object-store channel (--exchange store), `stall` never publishes that step's logits
    (every member's exchange then times out after STALL_TIMEOUT seconds) and `kill-slow` is
    `kill` after which every restarted student takes SLOW_START seconds to start."""
    import threading
    import uuid
    from cohort.ray.actors import StudentWorker

    class FaultyWorker(StudentWorker):
        def __init__(self, *args, **kwargs):
            if kind == "kill-slow" and any(record.iterdir()):
                time.sleep(SLOW_START)   # a restart whose actors cannot start in time
            super().__init__(*args, **kwargs)
            if self.student.index == member and kind in ("kill", "kill-slow", "nan", "inf"):
                self.student.learn = self._failing(self.student.learn)

        def connect(self, transport, wiring):
            if self.student.index == member and kind == "kill-wiring" and not any(record.iterdir()):
                (record / f"{kind}-{os.getpid()}").touch()
                os.kill(os.getpid(), signal.SIGKILL)
            super().connect(transport, wiring)
            if kind == "stall":
                self.exchange.timeout = STALL_TIMEOUT
            if self.student.index == member and kind in ("close", "stall"):
                self.exchange.publish = self._failing_publish(self.exchange.publish)

        def _failing_publish(self, publish):
            def wrapped(key, logits):
                if tuple(key) == (epoch, step) and len(list(record.iterdir())) < times:
                    (record / f"{kind}-{os.getpid()}").touch()
                    if kind == "close":
                        self._channel.close()      # this write and its peers' reads fail
                    else:
                        threading.Event().wait()   # until the restart kills this actor
                return publish(key, logits)
            return wrapped

        def _failing(self, learn):
            def wrapped(loss, logits, labels, at_step):
                if (self.student.epoch, at_step) == (epoch, step) and len(list(record.iterdir())) < times:
                    (record / f"{kind}-{os.getpid()}").touch()
                    if kind in ("kill", "kill-slow"):
                        os.kill(os.getpid(), signal.SIGKILL)
                    loss.terms["ce"] = loss.terms["ce"] * float(kind)
                return learn(loss, logits, labels, at_step)
            return wrapped

    # a name of its own: Ray caches actor classes by name
    FaultyWorker.__name__ = FaultyWorker.__qualname__ = f"FaultyWorker_{uuid.uuid4().hex}"
    record.mkdir(parents=True, exist_ok=True)
    return FaultyWorker


@pytest.fixture(scope="module")
def data(digits):
    return small(digits)


THREE = [("dml", "linear"), ("kdcl", "linear"), ("kdcl", "general")]


@pytest.mark.parametrize("method, variant", THREE, ids=[f"{m}-{v}" for m, v in THREE])
def test_three_students_store_collective_and_local_agree(tmp_path, digits, method, variant):
    """K = 3: every channel has two readers. Store, collective and the single-process
    reference train the same cohort (KDCL-general: the same held-out weights)."""
    val = 0.1 if variant == "general" else 0.0
    dataset = small(load_dataset("digits", val_fraction=val)) if val else small(digits)
    settings = dict(method=method, students=3, epochs=1, val_fraction=val,
                    temperature=3.0 if method == "kdcl" else 1.0)
    if method == "kdcl":
        settings["variant"] = variant
    # CPU kernels sum in a thread-count-dependent order, and SGD steps amplify the last bits:
    # the reference runs with the actors' single thread (conftest sets it).
    assert torch.get_num_threads() == 1
    run_cohort(tiny_cohort(tmp_path / "local", **settings), dataset)
    for exchange in EXCHANGES:
        run_ray(tiny_cohort(tmp_path / exchange, exchange=exchange, **settings), dataset)
    local = final_states(tmp_path / "local")
    store, collective = final_states(tmp_path / "store"), final_states(tmp_path / "collective")
    assert set(store) == {"student0", "student1", "student2"}
    assert_states_close(store, collective, atol=1e-6)
    assert_states_equal(store, final_states(tmp_path / "refs"))   # the same bytes travel
    assert_states_close(local, store, atol=1e-5)
    # the students really differ (so agreeing is not trivial)
    assert not torch.allclose(store["student0"]["model"]["classifier.weight"], store["student1"]["model"]["classifier.weight"])
    rows = {p: rows_of(tmp_path / p) for p in ("local", *EXCHANGES)}
    for a, b in zip(rows["local"], rows["store"]):
        assert a["member"] == b["member"]
        assert a["test_acc"] == pytest.approx(b["test_acc"], abs=0.6)
        if a["train_loss"] is not None:
            assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-4)
            assert a["train_kd"] == pytest.approx(b["train_kd"], rel=1e-3) and a["train_kd"] > 0
    for exchange in EXCHANGES:   # time blocked waiting for peers: real, within the epoch
        for row in rows[exchange][:3]:
            assert 0 < row["exchange_seconds"] < row["epoch_seconds"], (exchange, row)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, data):
    """A 4-epoch cohort checkpointed every 2 epochs, never interrupted: the reference."""
    path = tmp_path_factory.mktemp("uninterrupted") / "run"
    run_ray(tiny_cohort(path, epochs=4, checkpoint_every=2), data)
    return path


def test_resume_continues_from_the_checkpoint_to_the_uninterrupted_numbers(tmp_path, data, uninterrupted):
    cut = tmp_path / "cut"

    def stop_after_epoch_3(rows):   # epoch 3 has rows but no checkpoint (every 2 epochs)
        if rows[0]["epoch"] == 2:
            raise Stop()

    with pytest.raises(Stop):
        run_ray(tiny_cohort(cut, epochs=4, checkpoint_every=2), data, on_epoch=stop_after_epoch_3)
    assert latest_checkpoint(cut).name == "epoch-0002"
    before = [r for r in rows_of(cut) if r["epoch"] < 2]
    trained = []
    run_ray(tiny_cohort(cut, epochs=4, checkpoint_every=2, resume=True), data,
            on_epoch=lambda rows: trained.append(rows[0]["epoch"]))
    assert trained == [2, 3]                               # from the checkpoint, not from scratch
    rows = rows_of(cut)
    assert rows[:len(before)] == before                    # rows before the checkpoint untouched
    assert numbers_of(rows) == numbers_of(rows_of(uninterrupted))   # no duplicate, same numbers
    assert_states_equal(final_states(cut), final_states(uninterrupted))


@pytest.mark.parametrize("epoch", [1, 3], ids=["before-first-checkpoint", "after-checkpoint"])
def test_sigkilled_actor_restarts_the_cohort_to_the_uninterrupted_numbers(tmp_path, data, uninterrupted,
                                                                         monkeypatch, epoch):
    """student1's process is SIGKILLed mid-epoch; the cohort restarts from its last checkpoint
    (from scratch before the first one) and ends exactly where an uninterrupted run ends."""
    record = tmp_path / "killed"
    monkeypatch.setattr(ActorCohort, "worker_class", faulty_worker("kill", 1, epoch, 3, record))
    run = tmp_path / "kill"
    trained = []
    summary = run_ray(tiny_cohort(run, epochs=4, checkpoint_every=2, name=f"kill{epoch}"), data,
                      on_epoch=lambda rows: trained.append(rows[0]["epoch"]))
    assert len(list(record.iterdir())) == 1 and summary["restarts"] == 1
    restart_from = 0 if epoch < 2 else 2
    assert trained == list(range(epoch)) + list(range(restart_from, 4))
    assert numbers_of(rows_of(run)) == numbers_of(rows_of(uninterrupted))
    assert_states_equal(final_states(run), final_states(uninterrupted))


STALL_TIMEOUT = 5.0


# refs and collective: ~35 s more each on this 2-core machine; tests/test_exchange.py shows that
# their timeouts raise the same ExchangeFailed that the driver turns into a restart here.
@pytest.mark.parametrize("exchange, fault", [("store", "close")], ids=["store-channel-closed"])
def test_a_failed_exchange_restarts_the_cohort_to_the_uninterrupted_numbers(tmp_path, data, uninterrupted,
                                                                            monkeypatch, capsys, exchange, fault):
    """A channel error (or an exchange timeout: fault "stall") in epoch 3 is a member failure,
    like a dead actor: the cohort restarts from the epoch-2 checkpoint and ends where an
    uninterrupted run ends."""
    record = tmp_path / "faults"
    monkeypatch.setattr(ActorCohort, "worker_class", faulty_worker(fault, 1, 2, 3, record))
    run, trained = tmp_path / "run", []
    summary = run_ray(tiny_cohort(run, epochs=4, checkpoint_every=2, exchange=exchange, name=f"x{fault}"),
                      data, on_epoch=lambda rows: trained.append(rows[0]["epoch"]))
    assert len(list(record.iterdir())) == 1 and summary["restarts"] == 1
    assert trained == [0, 1, 2, 3]                     # epoch 3 (index 2) failed, then 2 and 3 again
    said = capsys.readouterr().out
    assert "'s logit exchange failed (" in said and "of step (2, 3)" in said, said
    assert "restarting the cohort from its last checkpoint (restart 1/3)" in said
    assert numbers_of(rows_of(run)) == numbers_of(rows_of(uninterrupted))
    assert_states_equal(final_states(run), final_states(uninterrupted))


def test_a_member_lost_while_the_cohort_starts_is_restarted_too(tmp_path, data, monkeypatch, capsys):
    record = tmp_path / "killed"
    monkeypatch.setattr(ActorCohort, "worker_class", faulty_worker("kill-wiring", 1, 0, 0, record))
    summary = run_ray(tiny_cohort(tmp_path / "run", epochs=1, name="lostwiring"), data)
    assert len(list(record.iterdir())) == 1 and summary["restarts"] == 1
    assert summary["epochs_completed"] == 1
    assert "student1's actor died in epoch 1; restarting the cohort" in capsys.readouterr().out


@pytest.mark.parametrize("value", ["nan", "inf"])
def test_non_finite_loss_in_an_actor_names_the_member_and_keeps_the_checkpoint(tmp_path, data,
                                                                              monkeypatch, capsys, value):
    """One line naming the member, epoch and step, exit code 1: the actor's error, not Ray's
    remote traceback around it."""
    monkeypatch.setattr(ActorCohort, "worker_class", faulty_worker(value, 1, 1, 2, tmp_path / "r"))
    code = run_guarded(lambda: run_ray(tiny_cohort(tmp_path / "run", epochs=3), data))
    err = capsys.readouterr().err.strip()
    assert code == 1 and len(err.splitlines()) == 1, err
    assert f"non-finite loss {value} for member 'student1' at epoch 1, step 2" in err
    meta, states = read_checkpoint(latest_checkpoint(tmp_path / "run"))
    assert meta["epochs_completed"] == 1
    assert all(torch.isfinite(v).all() for v in states["student1"]["model"].values() if v.is_floating_point())
    assert {r["epoch"] for r in rows_of(tmp_path / "run")} == {0}


SLOW_START = 120.0


def test_a_restart_whose_students_do_not_start_fails_within_the_startup_timeout(tmp_path, data,
                                                                               monkeypatch, capsys):
    """A restart waits at most --startup-timeout for its students to start, not for ever: after
    a lost node Ray may place a student in a bundle it then cannot keep, and it never starts.
    Here the restarted students take SLOW_START s to start; the run stops after 3 s."""
    record = tmp_path / "killed"
    monkeypatch.setattr(ActorCohort, "worker_class", faulty_worker("kill-slow", 1, 1, 1, record))
    cfg = tiny_cohort(tmp_path / "run", epochs=3, name="slowrestart", startup_timeout=3)
    started = time.monotonic()
    code = run_guarded(lambda: run_ray(cfg, data))
    err = capsys.readouterr().err.strip()
    assert code == 1 and len(err.splitlines()) == 1, err
    assert "could not reserve CPU 2" in err and "within 3s" in err, err
    assert time.monotonic() - started < SLOW_START / 2
    assert read_checkpoint(latest_checkpoint(tmp_path / "run"))[0]["epochs_completed"] == 1


def test_a_member_that_keeps_dying_exhausts_max_restarts(tmp_path, data, monkeypatch, capsys):
    record = tmp_path / "killed"
    monkeypatch.setattr(ActorCohort, "worker_class", faulty_worker("kill", 0, 1, 1, record, times=99))
    cfg = tiny_cohort(tmp_path / "run", epochs=3, name="dies")
    cfg.max_restarts = 1
    code = run_guarded(lambda: run_ray(cfg, data))
    err = capsys.readouterr().err.strip()
    assert code == 1 and len(err.splitlines()) == 1, err
    assert "student0's actor died in epoch 2" in err and "--max-restarts 1" in err
    assert len(list(record.iterdir())) == 2                 # the first attempt and one restart
    assert read_checkpoint(latest_checkpoint(tmp_path / "run"))[0]["epochs_completed"] == 1


def blocker(cpus: float):
    group = ray.util.placement_group([{"CPU": cpus}])
    assert group.wait(timeout_seconds=60)
    return group


def test_cohort_waits_for_capacity_up_to_the_startup_timeout(tmp_path, data):
    """The cluster has 2 CPUs, but a placement group holds 1.5 of them: a cohort asking for
    2 x 1 CPU waits --startup-timeout seconds, then fails saying what it asked and what is free;
    when the holder lets go during the wait, the cohort starts and finishes."""
    held = blocker(1.5)
    try:
        started = time.monotonic()
        with pytest.raises(ResourceError, match=r"could not reserve CPU 2, GPU 0 \(2 bundles, pack\) within 3s; available now: CPU 0.5"):
            run_ray(tiny_cohort(tmp_path / "short", cpus_per_student=1, startup_timeout=3), data)
        assert time.monotonic() - started >= 3
        assert not (tmp_path / "short").exists()
    finally:
        ray.util.remove_placement_group(held)

    held = blocker(1.5)
    release = threading.Timer(3.0, ray.util.remove_placement_group, args=(held,))
    started = time.monotonic()
    release.start()
    summary = run_ray(tiny_cohort(tmp_path / "waits", cpus_per_student=1, epochs=1, startup_timeout=120), data)
    release.join()
    assert time.monotonic() - started >= 3                 # it waited for the holder
    assert summary["epochs_completed"] == 1


def test_kdcl_heterogeneous_cohort_runs(tmp_path, data):
    cfg = tiny_cohort(tmp_path / "k", method="kdcl", variant="minlogit", archs=["resnet8", "wrn_16_2"],
                      epochs=1, temperature=3.0)
    summary = run_ray(cfg, data)
    assert set(summary["members"]) == {"student0", "student1", "ensemble"}
    assert load_checkpoint_file(latest_checkpoint(tmp_path / "k") / "student1.pt")["arch"] == "wrn_16_2"


def test_too_large_cohort_fails_at_once_with_what_was_asked(tmp_path, data):
    """More GPUs than the cluster has is refused at once, not after --startup-timeout."""
    cfg = tiny_cohort(tmp_path / "big", gpus_per_student=1, startup_timeout=600)
    started = time.monotonic()
    with pytest.raises(ResourceError, match=r"GPU 2.*cluster has CPU 2, GPU 0"):
        run_ray(cfg, data)
    assert time.monotonic() - started < 120   # far below the 600 s it would wait
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


def test_live_metrics_reach_the_prometheus_endpoint(tmp_path, data):
    run_ray(tiny_cohort(tmp_path / "m", epochs=2, name="metricsrun"), data)
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
        assert 0.0 < found[("ray_cohort_exchange_seconds", member)] < found[("ray_cohort_step_seconds", member)], found
    assert found[("ray_cohort_epoch", "ensemble")] == 2.0
