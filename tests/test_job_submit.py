"""`ray job submit -- python jobs/dml.py` against a head node on loopback, with token auth on."""
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ray_cli(*args, env, timeout=240):
    return subprocess.run([str(BIN / "ray"), *args], env=env, capture_output=True, text=True,
                          timeout=timeout)


def submit(*args, env, seconds: float = 90.0):
    """`ray job submit`, retried while the new head's dashboard agent is still starting."""
    deadline = time.time() + seconds
    while True:
        done = ray_cli("job", "submit", *args, env=env, timeout=300)
        if "No available agent" not in done.stderr or time.time() > deadline:
            return done
        time.sleep(2)


@pytest.fixture(scope="module")
def head(tmp_path_factory):
    env = {**os.environ, "RAY_AUTH_MODE": "token", "PATH": f"{BIN}:{os.environ['PATH']}"}
    gcs, dashboard = free_port(), free_port()
    started = ray_cli("start", "--head", f"--port={gcs}", "--dashboard-host=127.0.0.1",
                      f"--dashboard-port={dashboard}", "--num-cpus=2", "--include-dashboard=true",
                      "--disable-usage-stats", env=env)
    assert started.returncode == 0, started.stderr[-2000:]
    yield f"http://127.0.0.1:{dashboard}", env
    ray_cli("stop", "--force", env=env, timeout=60)


def test_submitted_dml_job_succeeds_and_writes_the_run(head, tmp_path):
    address, env = head
    out = tmp_path / "run"
    submitted = submit(
        "--address", address, "--submission-id", "cohort-dml-test",
        "--metadata-json", json.dumps({"method": "dml", "run": "job-test"}), "--",
        sys.executable, str(ROOT / "jobs" / "dml.py"), "--students", "2", "--arch", "resnet8",
        "--dataset", "digits", "--epochs", "1", "--batch-size", "64", "--output", str(out),
        "--no-progress", env=env)
    assert submitted.returncode == 0, submitted.stdout[-3000:] + submitted.stderr[-3000:]
    status = ray_cli("job", "status", "--address", address, "cohort-dml-test", env=env)
    assert "succeeded" in (status.stdout + status.stderr).lower()
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["members"]) == {"student0", "student1", "ensemble"}
    assert (out / "metrics.parquet").exists() and (out / "config.json").exists()


def test_unauthenticated_submission_is_refused(head):
    address, env = head
    bare = {k: v for k, v in env.items() if not k.startswith("RAY_AUTH")}
    refused = ray_cli("job", "submit", "--address", address, "--", "python", "-c", "print(1)",
                      env=bare, timeout=120)
    text = refused.stdout + refused.stderr
    assert "Authentication required" in text or "Unauthorized" in text, text[-2000:]
    listed = ray_cli("job", "list", "--address", address, env=env)
    assert "print(1)" not in listed.stdout
