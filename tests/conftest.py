import os
import socket
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
# Fewer helper processes and faster polling per Ray Train fit on a 2-core machine (the Train
# controller reads these from the environment ray.init starts it with): no preemption watcher,
# workers polled every 0.5 s. Set before any test module starts Ray.
os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
# The same float kernels on every x86 machine. Where the CPU has AVX-512, torch's own kernels,
# oneDNN's convolutions and MKL pick AVX-512 code that sums in another order (and blocks a
# batch of 32 differently from one of 64): over a few steps the drift grows to ~1e-4 and flips
# a sample's prediction. The recorded metrics (tests/data/) and the tolerances of the
# Ray-vs-one-process comparisons were set with AVX2 code, so every test process (Ray's workers
# inherit the environment) uses it. Measured on an AVX-512 machine: with these three, the
# 2-worker PCL run matches one process and the recorded runs match; with ATen's alone, not.
# Set before torch is imported.
for _variable, _isa in (("ATEN_CPU_CAPABILITY", "avx2"), ("ONEDNN_MAX_CPU_ISA", "AVX2"),
                        ("MKL_ENABLE_INSTRUCTIONS", "AVX2")):
    os.environ.setdefault(_variable, _isa)

import torch  # noqa: E402

# The test models are tiny: on 2 cores, one intra-op thread is faster and matches the
# single-threaded actors bit for bit.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def digits():
    from cohort.data import load_dataset
    return load_dataset("digits")


def tiny_cohort(output, **overrides):
    """A 2-student resnet8 cohort on digits small enough for a CPU test."""
    from cohort.methods import config_class
    settings = dict(method="dml", students=2, archs=["resnet8"], dataset="digits", epochs=2,
                    batch_size=64, lr=0.1, schedule="cosine", weight_decay=5e-4,
                    output=str(output), progress=False, device="cpu")
    settings.update(overrides)
    return config_class(settings["method"])(**settings)


def small(dataset, train: int = 448, test: int = 256):
    """The first `train` training and `test` test images of a dataset (its validation split
    kept): the equivalence and recovery tests need exact numbers, not learning."""
    import dataclasses
    return dataclasses.replace(dataset, train_images=dataset.train_images[:train],
                               train_labels=dataset.train_labels[:train],
                               test_images=dataset.test_images[:test],
                               test_labels=dataset.test_labels[:test])


# Columns that measure time, not training: they differ between any two runs.
TIMING_COLUMNS = frozenset({"epoch_seconds", "train_seconds", "images_per_second", "exchange_seconds"})


def numbers_of(rows):
    """Metric rows without their timing columns."""
    return [{k: v for k, v in row.items() if k not in TIMING_COLUMNS} for row in rows]


def assert_states_equal(a, b):
    """Two checkpoints' member states, bit for bit: models and optimizer momenta."""
    assert set(a) == set(b)
    for name in a:
        for key, value in a[name]["model"].items():
            assert torch.equal(value, b[name]["model"][key]), (name, key)
        for slot, state in a[name]["optimizer"]["state"].items():
            other = b[name]["optimizer"]["state"][slot]
            assert all(torch.equal(v, other[k]) for k, v in state.items()), (name, slot)


def rows_of(run_dir):
    """A run directory's metric rows."""
    import pyarrow.parquet as pq
    return pq.read_table(Path(run_dir) / "metrics.parquet").to_pylist()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# ---- a real S3 server on loopback (run directories on object storage) ---------------------
BUCKET = "cohort-test"
AWS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
       "AWS_DEFAULT_REGION": "us-east-1"}


@pytest.fixture(scope="module")
def s3():
    """An S3 server on 127.0.0.1 (moto's server mode, spoken to over HTTP) with one bucket;
    the standard AWS variables point at it for the module using it. Start it before Ray, so
    actors, Train workers and the nodes of a test cluster inherit them."""
    from moto.server import ThreadedMotoServer
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    saved = {k: os.environ.get(k) for k in (*AWS, "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3")}
    os.environ.pop("AWS_ENDPOINT_URL_S3", None)   # it would win over AWS_ENDPOINT_URL
    os.environ.update(AWS, AWS_ENDPOINT_URL=f"http://{host}:{port}")
    import boto3
    client = boto3.client("s3")
    client.create_bucket(Bucket=BUCKET)
    yield client
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    server.stop()
