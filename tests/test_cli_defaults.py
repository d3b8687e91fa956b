"""The command line's defaults, read through the real parsers (cohort.cli.build_parser and the
config builders every job uses), and --overwrite on a run directory that holds a user's file."""
import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from cohort import methods
from cohort.cli import build_parser, main
from cohort.flags import config_from_args
from cohort.optim import learning_rate
from cohort.runtime.chain import stage_config


def parse(*argv: str):
    return build_parser().parse_args(list(argv))


def config(*argv: str):
    """The config a job runs with, from its command line."""
    return config_from_args(methods.get(argv[0]), parse(*argv))


def lrs(cfg, epochs) -> list[float]:
    """The learning rate the runtimes use at each of `epochs` (0-based)."""
    return [learning_rate(cfg.lr, cfg.schedule, e, cfg.epochs, cfg.milestones, cfg.gamma)
            for e in epochs]


@pytest.mark.parametrize("method", ["dml", "kdcl", "independent"])
def test_cohort_step_schedule_decays_at_half_and_three_quarters(method):
    cfg = config(method)
    assert (cfg.epochs, cfg.lr, cfg.schedule, cfg.gamma) == (200, 0.1, "step", 0.1)
    assert (cfg.batch_size, cfg.momentum, cfg.weight_decay) == (64, 0.9, 5e-4)
    got = lrs(cfg, [0, 98, 99, 100, 101, 148, 149, 150, 151, 199])
    want = [0.1] * 3 + [0.01] * 4 + [0.001] * 3
    assert got == pytest.approx(want, rel=1e-12)
    # the milestones follow --epochs: 8 epochs decay after epochs 4 and 6
    short = config(method, "--epochs", "8")
    assert lrs(short, range(8)) == pytest.approx([0.1] * 4 + [0.01] * 2 + [0.001] * 2, rel=1e-12)


def test_dml_and_kdcl_method_defaults():
    dml = config("dml")
    assert dml.temperature == 1.0 and dml.kd_weight == 1.0 and dml.views == "shared"
    assert dml.students == 2 and dml.archs == ["resnet32", "resnet32"]
    kdcl = config("kdcl")
    assert kdcl.temperature == 3.0 and kdcl.variant == "linear" and kdcl.views == "separate"
    assert kdcl.kd_weight == 1.0


def test_sweep_trials_get_the_same_cohort_defaults():
    """A sweep's fixed flags are parsed by the method's own flags: same defaults."""
    from cohort.sweep import method_parser
    for method in ("dml", "kdcl"):
        swept = config_from_args(methods.get(method), method_parser(method).parse_args([]))
        direct = config(method)
        assert swept.to_dict() == direct.to_dict()


def test_kd_defaults_and_schedule():
    cfg = config("kd", "--teacher", "resnet32")
    assert cfg.chain == ["resnet32", "resnet8"]
    assert (cfg.temperature, cfg.alpha, cfg.lr, cfg.batch_size, cfg.epochs) == (4.0, 0.9, 0.05, 64, 240)
    assert cfg.milestones == [150, 180, 210] and cfg.schedule == "step" and cfg.gamma == 0.1
    assert cfg.workers == 1
    got = lrs(cfg, [0, 149, 150, 179, 180, 209, 210, 239])
    assert got == pytest.approx([0.05, 0.05, 5e-3, 5e-3, 5e-4, 5e-4, 5e-5, 5e-5], rel=1e-12)
    # the distilled stage trains with exactly these settings
    stage = stage_config(cfg, 1, "/teacher.pt")
    assert (stage.temperature, stage.alpha, stage.lr, stage.batch_size, stage.epochs) == (4.0, 0.9, 0.05, 64, 240)
    assert stage.milestones == [150, 180, 210] and stage.teacher == "/teacher.pt"
    # TAKD shares the recipe
    takd = config("takd")
    assert takd.chain == ["resnet110", "resnet20", "resnet8"]
    assert (takd.temperature, takd.alpha, takd.lr, takd.batch_size, takd.epochs) == (4.0, 0.9, 0.05, 64, 240)
    assert takd.milestones == [150, 180, 210]


def test_one_defaults_and_schedule():
    cfg = config("one")
    assert (cfg.temperature, cfg.rampup_epochs, cfg.branches, cfg.kd_weight) == (3.0, 80, 3, 1.0)
    assert (cfg.arch, cfg.epochs, cfg.batch_size, cfg.lr) == ("resnet32", 300, 128, 0.1)
    assert methods.get("one").members(cfg) == ["branch0", "branch1", "branch2", "ensemble", "average"]
    got = lrs(cfg, [0, 149, 150, 224, 225, 299])
    assert got == pytest.approx([0.1, 0.1, 0.01, 0.01, 0.001, 0.001], rel=1e-12)


# ---- --overwrite ----------------------------------------------------------------------------
LOCAL = ["dml", "--runtime", "local", "--students", "2", "--arch", "resnet8", "--dataset", "digits",
         "--epochs", "1", "--batch-size", "64", "--schedule", "constant", "--device", "cpu",
         "--no-progress"]


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_overwrite_replaces_the_run_and_keeps_the_users_files(tmp_path, capsys):
    out = tmp_path / "run"
    assert main([*LOCAL, "--lr", "0.1", "--output", str(out)]) == 0
    (out / "report.md").write_text("# the old run's report\n")   # written by `cohort report`
    (out / "notes.txt").write_text("my notes about this run\n")
    before = snapshot(out)
    assert {"config.json", "metrics.parquet", "summary.json", "report.md", "notes.txt"} <= set(before)
    capsys.readouterr()

    # without --overwrite: one line naming --output, exit 2, not a byte changed
    assert main([*LOCAL, "--lr", "0.05", "--output", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --output:") and "--overwrite" in err and len(err.splitlines()) == 1
    assert snapshot(out) == before

    # with --overwrite: the new run's artefacts replace the old ones; the user's file stays
    assert main([*LOCAL, "--lr", "0.05", "--output", str(out), "--overwrite"]) == 0
    after = snapshot(out)
    assert after["notes.txt"] == before["notes.txt"]
    assert json.loads(after["config.json"])["lr"] == 0.05
    assert json.loads(before["config.json"])["lr"] == 0.1
    rows = pq.read_table(out / "metrics.parquet").to_pylist()
    assert len(rows) == 3 and {r["epoch"] for r in rows} == {0}   # one epoch, not two runs' worth
    assert {r["lr"] for r in rows if r["member"] != "ensemble"} == {0.05}
    assert after["metrics.parquet"] != before["metrics.parquet"]
    assert "report.md" not in after   # the old run's report is gone with it
