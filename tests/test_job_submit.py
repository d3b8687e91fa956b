"""`ray job submit -- python jobs/dml.py` against a head node on loopback, with token auth on."""
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from conftest import free_port

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent



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


def processes() -> dict[int, tuple[int, str]]:
    """{pid: (session id, command line)} of this host's running processes (Linux /proc). A
    zombie has ended, only its exit status waits to be reaped (by init, in a container that
    may never do so, once a killed process's parent is gone): it is not listed."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if (entry / "stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
                continue
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            found[int(entry.name)] = (os.getsid(int(entry.name)), cmdline)
        except (OSError, ProcessLookupError):
            pass   # exited meanwhile, or not ours to read
    return found


class Head:
    """A Ray head node on loopback that this module starts and stops by itself: `ray start
    --head --block` in a session (and process group) of its own with its own --temp-dir, so
    stopping it signals exactly its processes, never another Ray instance on the host (as
    `ray stop` would)."""

    def __init__(self, env: dict):
        self.env = env
        self.temp_dir = tempfile.mkdtemp(prefix="cohort-head-", dir="/tmp")   # short: socket paths
        self.gcs, dashboard = free_port(), free_port()
        self.address = f"http://127.0.0.1:{dashboard}"
        self.log = open(Path(self.temp_dir) / "ray-start.log", "w")
        self.proc = subprocess.Popen(
            [str(BIN / "ray"), "start", "--head", "--block", f"--port={self.gcs}",
             f"--temp-dir={self.temp_dir}", "--dashboard-host=127.0.0.1",
             f"--dashboard-port={dashboard}", "--num-cpus=2", "--include-dashboard=true",
             "--disable-usage-stats",
             # ports of their own: the fixed defaults (the job agent's 52365, the client
             # server's 10001) are taken whenever another Ray instance runs on the host
             f"--dashboard-agent-listen-port={free_port()}", f"--ray-client-server-port={free_port()}",
             f"--dashboard-agent-grpc-port={free_port()}", f"--runtime-env-agent-port={free_port()}",
             f"--metrics-export-port={free_port()}"],
            env=env, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        self.sid = self.proc.pid   # start_new_session: the session (and group) id is its pid
        deadline = time.monotonic() + 240
        try:
            while "Ray runtime started" not in self.output():
                assert self.proc.poll() is None, f"ray start exited: {self.output()[-2000:]}"
                assert time.monotonic() < deadline, f"head not up in 240 s: {self.output()[-2000:]}"
                time.sleep(0.5)
        except BaseException:
            self.stop()   # no half-started head left behind
            raise

    def output(self) -> str:
        return (Path(self.temp_dir) / "ray-start.log").read_text(errors="replace")

    def own_processes(self) -> dict[int, str]:
        """The head's processes: its session, or anything that names its --temp-dir."""
        return {pid: cmd for pid, (sid, cmd) in processes().items()
                if sid == self.sid or self.temp_dir in cmd}

    def stop(self, grace: float = 10.0) -> None:
        """SIGTERM to the head's process group; whatever of its own session is left after
        `grace` seconds is SIGKILLed (`ray start --block` stops its processes gracefully, but
        takes about 33 s to exit here)."""
        deadline = time.monotonic() + grace
        if self.proc.poll() is None:
            os.killpg(self.sid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                pass
        while self.own_processes() and time.monotonic() < deadline:
            time.sleep(0.5)
        for pid in self.own_processes():   # stragglers of its own session only
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


@pytest.fixture(scope="module")
def head():
    env = {**os.environ, "RAY_AUTH_MODE": "token", "PATH": f"{BIN}:{os.environ['PATH']}"}
    env.pop("RAY_ADDRESS", None)
    node = Head(env)
    yield node
    node.stop()
    shutil.rmtree(node.temp_dir, ignore_errors=True)


def test_submitted_dml_job_succeeds_and_writes_the_run(head, tmp_path):
    address, env = head.address, head.env
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
    address, env = head.address, head.env
    bare = {k: v for k, v in env.items() if not k.startswith("RAY_AUTH")}
    refused = ray_cli("job", "submit", "--address", address, "--", "python", "-c", "print(1)",
                      env=bare, timeout=120)
    text = refused.stdout + refused.stderr
    assert "Authentication required" in text or "Unauthorized" in text, text[-2000:]
    listed = ray_cli("job", "list", "--address", address, env=env)
    assert "print(1)" not in listed.stdout


def test_stopping_the_head_stops_its_processes_and_no_other_ray(head):
    """The teardown's promise, run last: stopping this module's head ends every process of
    its own and leaves another Ray instance on the host (one started here for the purpose)
    running and usable."""
    import ray
    started_here = not ray.is_initialized()
    if started_here:
        ray.init(address="local", num_cpus=1, include_dashboard=False, log_to_driver=False)
    try:
        session = ray._private.worker._global_node.get_session_dir_path()
        mine = head.own_processes()
        assert mine and head.proc.pid in mine
        assert any("raylet" in cmd for cmd in mine.values())
        assert any("gcs_server" in cmd for cmd in mine.values())
        others = {pid: cmd for pid, (sid, cmd) in processes().items()
                  if pid not in mine and session in cmd}
        assert any("raylet" in cmd for cmd in others.values()) and \
            any("gcs_server" in cmd for cmd in others.values()), "no bystander Ray processes found"

        head.stop()

        assert head.proc.returncode is not None
        assert not head.own_processes(), head.own_processes()
        still = processes()
        assert all(pid in still and still[pid][1] == cmd for pid, cmd in others.items()), \
            "stopping the head ended another Ray instance's processes"
        assert ray.get(ray.remote(lambda: 41 + 1).remote()) == 42   # the bystander still works
    finally:
        if started_here:
            ray.shutdown()
