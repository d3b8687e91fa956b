"""GPUs and placement, right by construction (issue 12, sections 3 and 4).

This machine has no GPU, so the decisions are pure functions tested on their inputs: the
device from the GPU ids Ray assigned, the refusals and hints from a snapshot of the cluster,
whether an autoscaler runs. A local Ray instance with one (pretend) GPU shows that Ray's
assignment reaches them, and a small autoscaling cluster (Ray's fake multi-node provider on
this machine) shows a cohort waiting for nodes that a fixed cluster would refuse."""
import json
import os
import time

import pytest
import ray
import torch

from cohort.cli import main
from cohort.devices import (assigned_device, check_gpu_settings, cpu_only_environment,
                            packed_gpus, require_gpus)
from cohort.errors import ResourceError, UsageError
from cohort.methods import config_class
from cohort.ray import cluster
from cohort.ray.cluster import (Capacity, Request, ScalerSignals, autoscaling, capacity,
                                growth_ceiling, never_fits, reserve, unit_resources)
from conftest import free_port, small, tiny_cohort

CPU, GPU0 = torch.device("cpu"), torch.device("cuda", 0)


def fixed(cpus: float, gpus: float, nodes: int = 1) -> Capacity:
    """A cluster of `nodes` equal nodes and no autoscaler."""
    node = {"CPU": cpus / nodes, "GPU": gpus / nodes}
    return Capacity(totals={"CPU": cpus, "GPU": gpus}, nodes=(node,) * nodes)


def scaling(cpus: float, gpus: float, ceiling=None, node_types=()) -> Capacity:
    return Capacity(totals={"CPU": cpus, "GPU": gpus}, nodes=({"CPU": cpus, "GPU": gpus},),
                    autoscaling=True, ceiling=ceiling, node_types=node_types)


def students(k: int, cpus: float = 1.0, gpus: float = 1.0) -> Request:
    return Request([cluster.bundle(cpus, gpus)] * k, f"a {k}-student cohort")


# ---- the device: what Ray assigned ------------------------------------------------------------
@pytest.mark.parametrize("setting,gpu_ids,visible,expected", [
    ("auto", [], None, CPU),                       # no GPU assigned: the CPU, whatever torch sees
    ("auto", [], "0,1", CPU),                      # Ray 2.60 leaves a CPU actor's GPUs visible
    ("cpu", ["0"], "0", CPU),                      # --device cpu: the CPU even with a GPU assigned
    ("auto", ["0"], "0", GPU0),
    ("auto", ["3"], "3", GPU0),                    # Ray narrowed the visible GPUs to the assigned one
    ("cuda", ["3"], None, torch.device("cuda", 3)),   # variable unset: torch sees every GPU
    ("auto", ["1"], "0,1", torch.device("cuda", 1)),  # Ray Train: every worker's id is visible
    ("cuda:1", ["2", "5"], "5,2", torch.device("cuda", 1)),   # the second of its GPUs, as torch numbers them
    ("auto", ["GPU-1f2e"], "GPU-1f2e", GPU0),      # ids given as UUIDs
], ids=["none", "none-visible", "cpu", "one", "narrowed", "unset", "train", "nth", "uuid"])
def test_device_is_what_ray_assigned(setting, gpu_ids, visible, expected):
    assert assigned_device(setting, gpu_ids, visible) == expected


def test_students_sharing_a_gpu_both_train_on_it():
    """Fractional GPUs: Ray gives two actors the same id, and each sees only that GPU."""
    first = assigned_device("auto", ["2"], "2")
    second = assigned_device("auto", ["2"], "2")
    assert first == second == GPU0


def test_device_refusals_are_one_line():
    with pytest.raises(UsageError, match="^--device: cuda needs a GPU"):
        assigned_device("cuda", [], None)
    with pytest.raises(UsageError, match="^--device: cuda:1 asks for GPU 1"):
        assigned_device("cuda:1", ["0"], "0")
    with pytest.raises(RuntimeError, match="hides"):
        assigned_device("auto", ["1"], "0")
    with pytest.raises(RuntimeError, match="unset"):
        assigned_device("auto", ["GPU-1f2e"], None)


def test_a_cpu_process_hides_every_gpu():
    assert cpu_only_environment(CPU) == {"CUDA_VISIBLE_DEVICES": ""}
    assert cpu_only_environment(GPU0) == {}


def test_device_cuda_needs_gpus_per_process():
    require_gpus("auto", 0, "--gpus-per-student")
    require_gpus("cuda", 0.25, "--gpus-per-student")
    with pytest.raises(UsageError, match="^--device: cuda trains on GPUs, but --gpus-per-student comes to 0"):
        require_gpus("cuda", 0, "--gpus-per-student")
    with pytest.raises(UsageError, match="^--device: cuda:1 names GPU 1"):
        require_gpus("cuda:1", 1, "--gpus-per-worker")


# ---- GPU settings refused before anything starts ---------------------------------------------
def cohort(**overrides):
    return tiny_cohort("runs/unused", **{"device": "auto", **overrides})


def one(**overrides):
    settings = dict(arch="resnet8", dataset="digits", output="runs/unused", workers=2)
    settings.update(overrides)
    return config_class("one")(**settings)


def test_collective_exchange_refuses_students_sharing_a_gpu():
    with pytest.raises(UsageError, match=r"^--exchange: collective runs NCCL.*--gpus-per-student 0\.5"):
        check_gpu_settings(cohort(exchange="collective", gpus_per_student=0.5))
    check_gpu_settings(cohort(exchange="store", gpus_per_student=0.5))          # store shares fine
    check_gpu_settings(cohort(exchange="collective", gpus_per_student=1))
    check_gpu_settings(cohort(exchange="collective", gpus_per_student=0.5, device="cpu"))   # gloo
    check_gpu_settings(cohort(exchange="collective", gpus_per_student=0.5, runtime="local"))


def test_gpu_amounts_ray_would_refuse():
    with pytest.raises(UsageError, match=r"^--gpus-per-student: more than one GPU must be a whole number"):
        check_gpu_settings(cohort(gpus_per_student=1.5))
    with pytest.raises(UsageError, match=r"^--gpus-per-worker: 0\.5 lets 2 DDP ranks share a GPU"):
        check_gpu_settings(one(gpus_per_worker=0.5))
    check_gpu_settings(one(gpus_per_worker=0.5, workers=1))
    check_gpu_settings(one(gpus_per_worker=2))


def test_collective_with_shared_gpus_is_one_line_exit_2_before_anything(tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["dml", "--students", "2", "--arch", "resnet8", "--dataset", "digits",
                 "--epochs", "1", "--no-progress", "--exchange", "collective",
                 "--gpus-per-student", "0.5", "--output", str(out)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and err.startswith("error: --exchange:"), err
    assert not out.exists()


# ---- what the cluster can hold ---------------------------------------------------------------
def test_four_students_on_one_gpu_are_refused_naming_how_to_pack():
    request = students(4)
    reason = never_fits(request.bundles, fixed(16, 1))
    assert reason == "the cluster has CPU 16, GPU 1 and no autoscaler to add nodes"
    message = str(request.refusal(reason, fixed(16, 1)))
    assert message == ("a 4-student cohort asks for CPU 4, GPU 4 in 4 bundles (CPU 1, GPU 1 each), "
                       "but the cluster has CPU 16, GPU 1 and no autoscaler to add nodes; to share "
                       "the 1 GPU(s) among the 4 students, pass --gpus-per-student 0.25")
    assert never_fits(students(4, gpus=0.25).bundles, fixed(16, 1)) is None


def test_packing_hint_only_where_packing_helps():
    assert packed_gpus(1, 4) == 0.25 and packed_gpus(1, 3) == 0.3333 and packed_gpus(2, 4) == 0.5
    assert cluster.pack_hint(students(3).bundles, 1, "--gpus-per-student", "student").endswith(
        "pass --gpus-per-student 0.3333")
    assert cluster.pack_hint(students(2, gpus=0.5).bundles, 1, "--gpus-per-student", "student") == ""
    assert cluster.pack_hint(students(2).bundles, 0, "--gpus-per-student", "student") == ""   # no GPU
    assert cluster.pack_hint(students(2, gpus=0).bundles, 1, "--gpus-per-student", "student") == ""


def test_fixed_cluster_refuses_what_can_never_fit_and_waits_for_what_is_busy():
    assert never_fits(students(2).bundles, fixed(4, 2)) is None          # fits: wait if busy
    assert never_fits(students(2, cpus=3).bundles, fixed(4, 2)).startswith("the cluster has CPU 4")
    # two 1-GPU nodes hold 2 GPUs, but no node holds a 2-GPU bundle
    assert never_fits(students(1, gpus=2).bundles, fixed(4, 2, nodes=2)) == (
        "no node can hold a bundle of CPU 1, GPU 2 (the largest: CPU 2, GPU 1)")


def test_autoscaling_cluster_refuses_only_beyond_what_it_can_grow_to():
    request = students(4)
    assert never_fits(request.bundles, scaling(2, 0)) is None              # reach unknown: ask, wait
    assert never_fits(request.bundles, scaling(2, 0, ceiling={"CPU": 64, "GPU": 8},
                                                node_types=({"CPU": 8, "GPU": 1},))) is None
    assert never_fits(request.bundles, scaling(2, 0, ceiling={"CPU": 64, "GPU": 2})) == (
        "the cluster has CPU 2, GPU 0 and its autoscaler can grow it to CPU 64, GPU 2")
    assert never_fits(students(1, gpus=2).bundles, scaling(
        2, 0, ceiling={"CPU": 64, "GPU": 8}, node_types=({"CPU": 8, "GPU": 1},))).startswith(
        "no node can hold a bundle of CPU 1, GPU 2")


def test_default_gpus_count_gpu_nodes_the_autoscaler_can_add():
    assert unit_resources(4, -1, -1, cap=fixed(8, 0)) == (2.0, 0.0)
    assert unit_resources(4, -1, -1, cap=fixed(8, 1)) == (1.0, 1.0)
    assert unit_resources(4, -1, -1, use_gpus=False, cap=fixed(8, 1)) == (2.0, 0.0)
    assert unit_resources(4, -1, -1, cap=scaling(8, 0, ceiling={"CPU": 64, "GPU": 4})) == (1.0, 1.0)


def test_train_workers_refused_on_a_fixed_cluster_not_on_an_autoscaling_one():
    from cohort.ray.train import worker_resources
    with pytest.raises(ResourceError, match=r"^2 workers ask for CPU 2, GPU 2 in 2 bundles .* "
                                            r"pass --gpus-per-worker 0\.5$"):
        worker_resources(one(), fixed(8, 1))
    assert worker_resources(one(), scaling(1, 0)) == (0.5, 0.0)       # no GPU seen: CPUs shared
    assert worker_resources(one(gpus_per_worker=1), scaling(1, 0)) == (1.0, 1.0)


def sweep_spec(tmp_path, *flags):
    from cohort.cli import build_parser
    from cohort.sweep import spec_from_args
    args = build_parser().parse_args(
        ["sweep", "--method", "dml", "--students", "4", "--arch", "resnet8", "--dataset", "digits",
         "--cpus-per-student", "1", "--grid", "temperature=1,2", "--name", "s",
         "--storage", str(tmp_path), *flags])
    return spec_from_args(args)


def test_sweep_refuses_from_totals_only_without_an_autoscaler(tmp_path, monkeypatch):
    from cohort.ray import tune
    monkeypatch.setattr(tune, "capacity", lambda: fixed(2, 0))
    with pytest.raises(ResourceError, match=r"one dml trial needs CPU 4\.1, .*no autoscaler"):
        tune.resolve_resources(sweep_spec(tmp_path))
    monkeypatch.setattr(tune, "capacity", lambda: scaling(2, 0))
    resources = tune.resolve_resources(sweep_spec(tmp_path, "--max-concurrent", "3"))
    assert resources["grows"] and resources["fits"] == 1
    monkeypatch.setattr(tune, "capacity", lambda: scaling(2, 0, ceiling={"CPU": 9, "GPU": 0}))
    resources = tune.resolve_resources(sweep_spec(tmp_path))
    assert not resources["grows"] and resources["fits"] == 2       # 9 CPUs hold two 4.1-CPU trials


# ---- is there an autoscaler? -----------------------------------------------------------------
@pytest.mark.parametrize("signals,expected", [
    (ScalerSignals(), False),
    (ScalerSignals(override="1"), True),
    (ScalerSignals(override="0", v1_node_types={"10.0.0.2": "gpu-workers"}), False),
    (ScalerSignals(node_groups=((0, 4),)), True),                  # a reported config that can grow
    (ScalerSignals(node_groups=((0, -1),)), True),
    (ScalerSignals(node_groups=((1, 1), (2, 2)), v1_node_types={"a": "gpu"}), False),   # fixed sizes
    (ScalerSignals(v1_node_types={"ab12": "node_ab12", "cd34": "node_cd34"}), False),   # read-only
    (ScalerSignals(v1_node_types={"10.0.0.1": "ray.head.default"}), True),
    (ScalerSignals(v2_enabled=True, labelled_groups=("", "gpu-workers")), True),
    (ScalerSignals(v2_enabled=True, labelled_groups=("",)), False),
    (ScalerSignals(v2_enabled=False, labelled_groups=("gpu-workers",)), False),
], ids=["nothing", "env-on", "env-off", "config", "config-unbounded", "config-fixed", "v1-readonly",
        "v1-config", "v2-typed-nodes", "v2-plain-nodes", "labels-without-v2"])
def test_autoscaler_detection(signals, expected):
    assert autoscaling(signals) is expected


def test_growth_ceiling_of_a_reported_cluster_config():
    groups = [({"CPU": 8, "GPU": 1}, 0, 4), ({"CPU": 4}, 1, 1)]
    assert growth_ceiling(groups, {}) == {"CPU": 36, "GPU": 4}
    assert growth_ceiling(groups, {"GPU": 2}) == {"CPU": 36, "GPU": 2}
    assert growth_ceiling([({"CPU": 8, "GPU": 1}, 0, -1)], {})["GPU"] == float("inf")


# ---- on a local Ray instance with one (pretend) GPU ----------------------------------------
@pytest.fixture(scope="module", autouse=True)
def ray_at_module_end():
    yield
    ray.shutdown()


@pytest.fixture
def one_gpu():
    """Ray on this machine with 2 CPUs and one GPU resource: Ray assigns it (id '0') and sets
    CUDA_VISIBLE_DEVICES as it would on a GPU node; torch here sees no CUDA."""
    if not ray.is_initialized():
        ray.init(address="local", num_cpus=2, num_gpus=1, include_dashboard=False, log_to_driver=False)
    yield


def probe_actor():
    """An actor class (defined here so that Ray ships it by value) that reports what Ray
    assigned it and the device cohort decides on."""
    class Probe:
        def device(self, setting):
            from cohort.ray.cluster import this_process_device
            ids = ray.get_runtime_context().get_accelerator_ids()["GPU"]
            visible = os.environ.get("CUDA_VISIBLE_DEVICES")
            try:
                device = str(this_process_device(setting))
            except RuntimeError as exc:
                device = f"error: {exc}"
            return ids, visible, device, os.environ.get("CUDA_VISIBLE_DEVICES")
    return ray.remote(Probe)


def test_ray_assignment_decides_the_device(one_gpu):
    """No GPU asked: Ray 2.60 leaves CUDA_VISIBLE_DEVICES alone, the actor runs on the CPU and
    hides the GPUs. Half a GPU each: both actors get GPU 0 and decide on it (torch here has no
    CUDA, so the decision shows as the error that says so, not as a silent CPU fallback)."""
    probe = probe_actor()
    actors = [probe.options(num_cpus=0, num_gpus=gpus).remote() for gpus in (0, 0.5, 0.5)]
    try:
        ids, visible, device, after = ray.get(actors[0].device.remote("auto"), timeout=120)
        # Ray left the variable as the node had it (unset here), the student hid every GPU
        assert (ids, visible, device, after) == ([], os.environ.get("CUDA_VISIBLE_DEVICES"), "cpu", "")
        for ids, visible, device, _ in ray.get([a.device.remote("auto") for a in actors[1:]],
                                               timeout=120):
            assert ids == ["0"] and visible == "0"
            if torch.cuda.is_available():
                assert device == "cuda:0"
            else:
                assert device.startswith("error: Ray assigned GPU(s) 0, but torch sees 0 CUDA device(s)")
        assert ray.get(actors[1].device.remote("cpu"), timeout=120)[2:] == ("cpu", "")
    finally:
        for actor in actors:
            ray.kill(actor)


def test_a_student_without_a_gpu_on_a_gpu_node_trains_on_the_cpu(one_gpu, digits):
    """--gpus-per-student 0 on a GPU node: the student actor decides from Ray's (empty)
    assignment, not from the GPUs it can see, and hides them."""
    from cohort.ray.actors import StudentWorker, dataset_arrays
    cfg = tiny_cohort("runs/unused", device="auto", gpus_per_student=0)
    worker = ray.remote(StudentWorker).options(num_cpus=0, num_gpus=0).remote(
        0, "resnet8", cfg.to_dict(), dataset_arrays(small(digits, 64, 64)), 1)
    try:
        seen = worker.__ray_call__.remote(
            lambda self: (str(self.device), os.environ.get("CUDA_VISIBLE_DEVICES")))
        assert ray.get(seen, timeout=120) == ("cpu", "")
    finally:
        ray.kill(worker)


def test_four_students_on_a_one_gpu_cluster_fail_fast(one_gpu, tmp_path, capsys):
    out = tmp_path / "four"
    started = time.monotonic()
    code = main(["dml", "--students", "4", "--arch", "resnet8", "--dataset", "digits",
                 "--epochs", "1", "--no-progress", "--cpus-per-student", "0.25",
                 "--startup-timeout", "600", "--output", str(out)])
    err = capsys.readouterr().err.strip()
    assert code == 1 and len(err.splitlines()) == 1, err
    assert "GPU 4" in err and "pass --gpus-per-student 0.25" in err
    assert time.monotonic() - started < 60 and not out.exists()


def test_fractional_gpus_with_store_train(one_gpu, tmp_path, digits):
    """Two students on half of the GPU each, logits through the object store (--device cpu:
    this machine's torch has no CUDA; the students still hold their GPU shares)."""
    cfg = tiny_cohort(tmp_path / "halves", gpus_per_student=0.5, cpus_per_student=0.5,
                      exchange="store", epochs=1)
    from cohort.ray.actors import run_ray
    summary = run_ray(cfg, small(digits, 128, 64))
    assert summary["epochs_completed"] == 1


def test_busy_cluster_makes_a_train_job_wait_then_fail_with_what_it_asked(one_gpu, monkeypatch):
    from cohort.ray import train
    held = ray.util.placement_group([{"CPU": 1.5}])
    assert held.wait(timeout_seconds=60)
    try:
        started = time.monotonic()
        cfg = one(cpus_per_worker=1, gpus_per_worker=0, startup_timeout=2.0)
        with pytest.raises(ResourceError, match=r"^2 workers could not reserve CPU 2, GPU 0 \(2 bundles, "
                                                r"pack\) within 2s; available now: CPU 0\.5, GPU 1; "
                                                r"the cluster has CPU 2, GPU 1$"):
            train.wait_for_workers(cfg, 1.0, 0.0, capacity())
        assert time.monotonic() - started >= 2
    finally:
        ray.util.remove_placement_group(held)


def test_where_an_autoscaler_runs_it_is_asked_for_the_bundles_until_they_are_placed(
        one_gpu, monkeypatch):
    import ray.autoscaler.sdk
    asked = []
    monkeypatch.setattr(ray.autoscaler.sdk, "request_resources",
                        lambda bundles: asked.append(bundles))
    group = reserve(students(1, cpus=0.5, gpus=0), "pack", 30, cap=scaling(2, 1))
    ray.util.remove_placement_group(group)
    assert asked == [[{"CPU": 0.5}], []]       # asked, then withdrawn once placed
    asked.clear()
    ray.util.remove_placement_group(reserve(students(1, cpus=0.5, gpus=0), "pack", 30, fixed(2, 1)))
    assert asked == []                          # no autoscaler: nobody to ask


def test_local_instance_has_no_autoscaler(one_gpu, monkeypatch):
    """Its monitor runs read-only: it publishes a status whose node types it made up."""
    deadline = time.monotonic() + 30
    while cluster._v1_node_types() is None and time.monotonic() < deadline:
        time.sleep(0.5)
    assert cluster._v1_node_types()
    assert capacity().autoscaling is False
    monkeypatch.setenv(cluster.AUTOSCALING_ENV, "1")
    assert capacity().autoscaling is True


# ---- on an autoscaling cluster ------------------------------------------------------------
def fake_provider_config(gcs_address: str) -> dict:
    """Ray's fake multi-node provider: 'nodes' are raylets started on this machine. The head
    has 1 CPU and no GPU; up to two 1-CPU, 1-GPU workers, removed after 6 s idle."""
    small_store = {"object_store_memory": 100 * 1024 ** 2}
    return {
        "cluster_name": "cohort-test", "max_workers": 2, "upscaling_speed": 1.0,
        "idle_timeout_minutes": 0.1, "docker": {}, "auth": {"ssh_user": "nobody"},
        # its 'nodes' run no setup commands (no updater, no config check) and go by node id
        "provider": {"type": "fake_multinode", "gcs_address": gcs_address, "use_node_id_as_ip": True,
                     "disable_node_updaters": True, "disable_launch_config_check": True},
        "head_node_type": "ray.head.default",
        "available_node_types": {
            "ray.head.default": {"resources": {"CPU": 1}, "node_config": {}, "max_workers": 0},
            "gpu-workers": {"resources": {"CPU": 1, "GPU": 1, **small_store}, "node_config": {},
                            "min_workers": 0, "max_workers": 2}},
        "file_mounts": {}, "cluster_synced_files": [], "file_mounts_sync_continuously": False,
        "initialization_commands": [], "setup_commands": [], "head_setup_commands": [],
        "worker_setup_commands": [], "head_start_ray_commands": [], "worker_start_ray_commands": [],
    }


@pytest.fixture
def autoscaling_cluster(tmp_path, monkeypatch):
    from ray.autoscaler._private.fake_multi_node.node_provider import FAKE_HEAD_NODE_ID
    from ray.cluster_utils import Cluster
    ray.shutdown()
    monkeypatch.setenv("RAY_FAKE_CLUSTER", "1")            # lets the monitor load the fake provider
    monkeypatch.setenv("AUTOSCALER_UPDATE_INTERVAL_S", "1")
    monkeypatch.delenv(cluster.AUTOSCALING_ENV, raising=False)
    port = free_port()
    config = tmp_path / "autoscaler.json"
    config.write_text(json.dumps(fake_provider_config(
        f"{ray._private.services.get_node_ip_address()}:{port}")))
    head = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 1, "gcs_server_port": port, "autoscaling_config": str(config),
        "include_dashboard": False, "object_store_memory": 100 * 1024 ** 2,
        "env_vars": {"RAY_OVERRIDE_NODE_ID_FOR_TESTING": FAKE_HEAD_NODE_ID},   # the head it knows
        # worker raylets left behind by the monitor exit soon after the head goes
        "_system_config": {"gcs_rpc_server_reconnect_timeout_s": 5}})
    ray.init(address=head.address, log_to_driver=False)
    deadline = time.monotonic() + 30   # the monitor publishes its status within a few seconds
    while cluster._v1_node_types() is None and time.monotonic() < deadline:
        time.sleep(0.5)
    try:
        yield head
    finally:
        deadline = time.monotonic() + 30   # let the autoscaler remove its idle GPU nodes
        while ray.cluster_resources().get("GPU", 0) and time.monotonic() < deadline:
            time.sleep(1)
        ray.shutdown()
        head.shutdown()


def test_autoscaling_cluster_starts_nodes_for_a_cohort_it_cannot_hold_yet(autoscaling_cluster,
                                                                          tmp_path, digits):
    """The cluster has no GPU; a fixed one would refuse two 1-GPU students at once. Here the
    cohort asks, the autoscaler starts two GPU nodes, the students train; a request beyond
    its two nodes fails after --startup-timeout with what was asked and what exists."""
    cap = capacity()
    assert cap.autoscaling and cap.totals["GPU"] == 0
    from cohort.ray.actors import run_ray
    cfg = tiny_cohort(tmp_path / "grown", gpus_per_student=1, cpus_per_student=0.5, epochs=1,
                      startup_timeout=120)
    summary = run_ray(cfg, small(digits, 128, 64))   # on GPU nodes that did not exist
    assert summary["epochs_completed"] == 1
    with pytest.raises(ResourceError, match=r"^a 3-student cohort could not reserve CPU 1\.5, GPU 3 "
                                            r"\(3 bundles, pack\) within 3s; .*the cluster has CPU "
                                            r"[\d.]+, GPU [\d.]+ \(its autoscaler was asked"):
        reserve(students(3, cpus=0.5), "pack", 3)
