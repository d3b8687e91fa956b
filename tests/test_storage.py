"""Run directories on an object store: every job writes and reads its run directory through
pyarrow's S3 filesystem, against a real S3 server (moto's server mode on loopback, spoken to
over HTTP; the endpoint and keys come from the standard AWS environment variables)."""
import io
import json
import os
import sys

import pyarrow.parquet as pq
import pytest
import ray
import ray.train
import torch
from ray import cloudpickle

from cohort.cli import main
from cohort.errors import UsageError
from cohort.methods.kd import ChainConfig
from cohort.methods.one import One, OneConfig
from cohort.ray.actors import run_ray
from cohort.report import write_report
from cohort.runs import latest_checkpoint, read_checkpoint
from cohort.runtime import run as run_job
from cohort.runtime.chain import run_chain
from cohort.runtime.local import run_cohort
from cohort.storage import RemotePath, location
from conftest import BUCKET, numbers_of, small, tiny_cohort

@pytest.fixture(scope="module")
def ray_cluster(s3):
    # address="local": a cluster of this module's own, whatever other Ray instances run here
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    cloudpickle.register_pickle_by_value(sys.modules[__name__])   # CrashAt travels to workers
    yield
    cloudpickle.unregister_pickle_by_value(sys.modules[__name__])
    ray.shutdown()


@pytest.fixture(autouse=True)
def in_tmp(tmp_path, monkeypatch):
    """Every test runs in an empty working directory: a stray local `s3:` folder would show."""
    monkeypatch.chdir(tmp_path)
    yield
    assert not (tmp_path / "s3:").exists()


@pytest.fixture(scope="module")
def data(digits):
    return small(digits)


def objects(s3, prefix: str) -> dict[str, str]:
    """{key below prefix: ETag} of every object under s3://BUCKET/prefix/."""
    pages = s3.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix + "/")
    return {o["Key"][len(prefix) + 1:]: o["ETag"] for page in pages for o in page.get("Contents", [])}


def read(s3, key: str) -> bytes:
    return s3.get_object(Bucket=BUCKET, Key=key)["Body"].read()


def rows(s3, prefix: str) -> list[dict]:
    return pq.read_table(io.BytesIO(read(s3, f"{prefix}/metrics.parquet"))).to_pylist()


def uri(prefix: str) -> str:
    return f"s3://{BUCKET}/{prefix}"


RUN_FILES = {"config.json", "metrics.parquet", "summary.json"}


def assert_run_files(found: dict, checkpoint: str, members) -> None:
    assert RUN_FILES <= set(found), sorted(found)
    assert {f"checkpoints/{checkpoint}/meta.json"} | {
        f"checkpoints/{checkpoint}/{m}.pt" for m in members} <= set(found), sorted(found)
    assert any(k.startswith("tensorboard/events.out.tfevents.") for k in found), sorted(found)


# ---- the location of a run -------------------------------------------------------------------
def test_a_path_stays_a_path_and_a_uri_never_becomes_a_local_folder(s3):
    assert location("runs/x") == location("runs/x") and not isinstance(location("runs/x"), RemotePath)
    assert str(location(uri("a/b"))) == uri("a/b")
    # a URI's options stay with every path below it, so str() is a URI that opens the same place
    endpoint = os.environ["AWS_ENDPOINT_URL"]
    run = location(f"{uri('a/b')}?endpoint_override={endpoint}") / "c"
    assert str(run) == f"{uri('a/b/c')}?endpoint_override={endpoint}"
    assert location(str(run)) == run and str(run.parent.parent) == f"{uri('a')}?endpoint_override={endpoint}"
    for bad, message in (("s3:/bucket/x", "is not a URI"), ("nope://b/x", "cannot open"),
                         ("s3://bucket", "needs a folder inside the bucket")):
        with pytest.raises(UsageError, match=f"^--output: .*{message}"):
            location(bad)


def test_cli_refuses_a_bad_uri_with_exit_2_before_any_work(tmp_path, capsys):
    code = main(["dml", "--output", "s3:/bucket/runs/dml", "--runtime", "local", "--dataset",
                 "digits", "--epochs", "1", "--no-progress"])
    assert code == 2
    assert capsys.readouterr().err.strip().startswith("error: --output: 's3:/bucket/runs/dml'")
    assert list(tmp_path.iterdir()) == []


def test_s3_requests_wait_longer_than_the_sdks_3_seconds(s3):
    """A stall of a busy server longer than the AWS SDK's 3-second default must not fail a
    checkpoint: the filesystem of an s3:// run has the longer timeouts, and Ray ships them."""
    from cohort.storage import S3_TIMEOUTS
    fs = location(uri("timeouts")).fs
    for shipped in (fs, cloudpickle.loads(cloudpickle.dumps(fs))):
        options = shipped.__reduce__()[1][0]
        assert {k: options[k] for k in S3_TIMEOUTS} == S3_TIMEOUTS


def test_a_missing_bucket_is_refused_before_anything_is_written(s3, capsys):
    code = main(["dml", "--output", "s3://no-such-bucket/runs/dml", "--runtime", "local",
                 "--dataset", "digits", "--epochs", "1", "--no-progress"])
    assert code == 2
    assert capsys.readouterr().err.strip() == ("error: --output: bucket 'no-such-bucket' of "
                                               "s3://no-such-bucket/runs/dml does not exist (create it first)")


# ---- a cohort in this process ----------------------------------------------------------------
class Stop(Exception):
    """Stands for Ctrl+C: the run ends where it is."""


def test_local_cohort_writes_refuses_overwrites_and_resumes_on_s3(s3, data):
    prefix = "runs/local"
    settings = dict(epochs=4, checkpoint_every=2, runtime="local")

    def stop_after_epoch_3(epoch_rows):   # epoch 3 has rows but no checkpoint
        if epoch_rows[0]["epoch"] == 2:
            raise Stop()

    with pytest.raises(Stop):
        run_cohort(tiny_cohort(uri(prefix), **settings), data, on_epoch=stop_after_epoch_3)
    found = objects(s3, prefix)
    assert_run_files(found, "epoch-0002", ["student0", "student1"])
    assert json.loads(read(s3, f"{prefix}/config.json"))["output"] == uri(prefix)

    # the same URI again, without --overwrite: refused, nothing touched
    with pytest.raises(UsageError, match=r"^--output: s3://.* holds another run"):
        run_cohort(tiny_cohort(uri(prefix), **settings), data)
    assert objects(s3, prefix) == found

    # a checkpoint cut short (files, no marker) is never taken: resume from epoch-0002
    s3.put_object(Bucket=BUCKET, Key=f"{prefix}/checkpoints/epoch-0003/student0.pt", Body=b"half")
    assert latest_checkpoint(uri(prefix)) == location(uri(prefix)) / "checkpoints" / "epoch-0002"
    before = [r for r in rows(s3, prefix) if r["epoch"] < 2]
    trained = []
    run_cohort(tiny_cohort(uri(prefix), resume=True, **settings), data,
               on_epoch=lambda r: trained.append(r[0]["epoch"]))
    assert trained == [2, 3]
    after = rows(s3, prefix)
    assert after[:len(before)] == before and [r["epoch"] for r in after].count(3) == 3
    meta, states = read_checkpoint(latest_checkpoint(uri(prefix)))
    assert meta["epochs_completed"] == 4 and set(states) == {"student0", "student1"}
    assert json.loads(read(s3, f"{prefix}/summary.json"))["epochs_completed"] == 4
    # the resumed rows went to a second event file (one that purges the epochs trained again)
    assert sum(k.startswith("tensorboard/events.out.tfevents.") for k in objects(s3, prefix)) == 2

    # --overwrite replaces the run: one epoch, its own files only
    run_cohort(tiny_cohort(uri(prefix), epochs=1, runtime="local", overwrite=True), data)
    assert {r["epoch"] for r in rows(s3, prefix)} == {0}
    assert sorted(k.split("/")[1] for k in objects(s3, prefix) if k.startswith("checkpoints/")) \
        == ["epoch-0001"] * 3

    # the report is read from and written to the bucket
    write_report(uri(prefix))
    assert read(s3, f"{prefix}/report.md").startswith(b"# ")
    assert read(s3, f"{prefix}/curves.png")[:8] == b"\x89PNG\r\n\x1a\n"


def test_takd_chain_reads_each_teacher_from_the_bucket(s3, data):
    """Stage 1 learns from stage 0's model.pt, read back from s3://; report of the stages."""
    prefix = "runs/takd"
    summary = run_chain(ChainConfig(chain=["resnet8", "resnet8"], epochs=1, steps_per_epoch=2,
                                    runtime="local", dataset="digits", batch_size=64,
                                    progress=False, output=uri(prefix)), data)
    assert [s["how"] for s in summary["stages"]] == ["trained", "trained"]
    found = objects(s3, prefix)
    assert {"stage0-resnet8/model.pt", "stage1-resnet8/model.pt", "summary.json"} <= set(found)
    config = json.loads(read(s3, f"{prefix}/stage1-resnet8/config.json"))
    assert config["teacher"] == uri(f"{prefix}/stage0-resnet8/model.pt")
    write_report(uri(prefix))
    assert b"## Stage 1: stage1-resnet8" in read(s3, f"{prefix}/report.md")


def test_report_of_a_missing_s3_run_is_a_usage_error(s3):
    with pytest.raises(UsageError, match=r"^RUN_DIR: s3://.*/runs/none does not exist"):
        write_report(uri("runs/none"))


# ---- on Ray: actors and a Train job -----------------------------------------------------------
def test_ray_actors_write_the_same_numbers_to_s3(s3, data, ray_cluster, tmp_path):
    prefix = "runs/actors"
    run_ray(tiny_cohort(uri(prefix), epochs=2), data)
    run_cohort(tiny_cohort(tmp_path / "local", epochs=2, runtime="local"), data)
    assert_run_files(objects(s3, prefix), "epoch-0002", ["student0", "student1"])
    local = pq.read_table(tmp_path / "local" / "metrics.parquet").to_pylist()
    assert numbers_of(rows(s3, prefix)) == numbers_of(local)


class CrashAt(One):
    """Every rank raises when epoch `crash` begins: a run cut after that epoch's checkpoint."""

    def __init__(self, cfg, crash):
        super().__init__(cfg)
        self.crash = crash

    def begin_epoch(self, epoch):
        if epoch == self.crash:
            raise RuntimeError(f"injected failure at epoch {epoch}")
        return super().begin_epoch(epoch)


def test_one_on_ray_train_writes_checkpoints_best_student_and_resumes_on_s3(s3, data, ray_cluster):
    prefix = "runs/one"
    settings = dict(arch="resnet8", branches=2, dataset="digits", epochs=2, batch_size=64,
                    lr=0.1, rampup_epochs=1, workers=1, steps_per_epoch=3, progress=False,
                    output=uri(prefix))
    cfg = OneConfig(**settings)
    with pytest.raises(ray.train.TrainingFailedError, match="injected failure"):
        run_job(cfg, data, method=CrashAt(cfg, 1))
    found = objects(s3, prefix)
    assert_run_files(found, "epoch-0001", ["train_state"])
    first = rows(s3, prefix)
    assert {r["epoch"] for r in first} == {0}

    summary = run_job(OneConfig(resume=True, **settings), data)
    assert summary["resumed_from_epoch"] == 1 and summary["epochs_completed"] == 2
    after = rows(s3, prefix)
    assert after[:len(first)] == first and {r["epoch"] for r in after} == {0, 1}
    found = objects(s3, prefix)
    assert "checkpoints/epoch-0002/meta.json" in found and "best_student.pt" in found
    best = torch.load(io.BytesIO(read(s3, f"{prefix}/best_student.pt")), weights_only=True)
    assert best["arch"] == "resnet8" and best["epoch"] == 1


# ---- a sweep ----------------------------------------------------------------------------------
SWEEP = ["--method", "dml", "--students", "2", "--arch", "resnet8", "--dataset", "digits",
         "--batch-size", "64", "--cpus-per-student", "0.5", "--no-progress", "--max-concurrent",
         "1", "--epochs", "1", "--grid", "temperature=2", "--name", "grid"]   # one trial: time


def test_sweep_writes_its_trials_results_and_report_to_s3(s3, ray_cluster):
    storage = uri("sweeps")
    assert main(["sweep", *SWEEP, "--storage", storage]) == 0
    found = objects(s3, "sweeps/grid")
    assert {"results.parquet", "best.json", "sweep.json"} <= set(found), sorted(found)
    results = pq.read_table(io.BytesIO(read(s3, "sweeps/grid/results.parquet"))).to_pylist()
    assert [r["temperature"] for r in results] == [2.0]
    assert all(r["status"] == "completed" and r["run_dir"].startswith(storage) for r in results)
    for row in results:   # each trial's run directory is in the bucket too
        trial = row["run_dir"][len(uri("")):]
        assert RUN_FILES <= set(objects(s3, trial)), trial
    best = json.loads(read(s3, "sweeps/grid/best.json"))
    assert best["trial_id"] in {r["trial_id"] for r in results} and best["config"]["method"] == "dml"

    # the same name again is refused; --resume of the finished sweep trains nothing again
    assert main(["sweep", *SWEEP, "--storage", storage]) == 2
    before = {r["trial_id"]: read(s3, r["run_dir"][len(uri("")):] + "/metrics.parquet") for r in results}
    assert main(["sweep", "--resume", "--name", "grid", "--storage", storage]) == 0
    for row in results:
        assert read(s3, row["run_dir"][len(uri("")):] + "/metrics.parquet") == before[row["trial_id"]]

    write_report(f"{storage}/grid")
    assert read(s3, "sweeps/grid/report.md").startswith(b"# Sweep report: grid")
