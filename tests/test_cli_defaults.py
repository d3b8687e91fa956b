"""The command line's defaults, read through the real parsers (cohort.cli.build_parser and the
config builders every job uses), and --overwrite on a run directory that holds a user's file."""
import json
import math
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


def cosine(base: float, epochs: int, at) -> list[float]:
    return [0.5 * base * (1 + math.cos(math.pi * e / epochs)) for e in at]


@pytest.mark.parametrize("method", ["dml", "kdcl", "independent"])
def test_cohort_defaults_learn_with_cosine_and_zero_init(method):
    cfg = config(method)
    assert (cfg.epochs, cfg.lr, cfg.schedule, cfg.zero_init_residual) == (200, 0.1, "cosine", "auto")
    assert (cfg.batch_size, cfg.momentum, cfg.weight_decay, cfg.warmup_epochs) == (64, 0.9, 5e-4, 0.0)
    at = [0, 1, 99, 100, 150, 199]
    assert lrs(cfg, at) == pytest.approx(cosine(0.1, 200, at), rel=1e-12)
    assert config(method, "--zero-init-residual", "off").zero_init_residual == "off"


@pytest.mark.parametrize("method", ["dml", "kdcl", "independent"])
def test_step_schedule_decays_at_half_and_three_quarters(method):
    cfg = config(method, "--schedule", "step")
    got = lrs(cfg, [0, 98, 99, 100, 101, 148, 149, 150, 151, 199])
    want = [0.1] * 3 + [0.01] * 4 + [0.001] * 3
    assert got == pytest.approx(want, rel=1e-12)
    # the milestones follow --epochs: 8 epochs decay after epochs 4 and 6
    short = config(method, "--schedule", "step", "--epochs", "8")
    assert lrs(short, range(8)) == pytest.approx([0.1] * 4 + [0.01] * 2 + [0.001] * 2, rel=1e-12)


def test_recipes_keep_the_papers_settings_reachable():
    mcl = config("dml", "--recipe", "mcl-okd")
    assert (mcl.schedule, mcl.batch_size, mcl.nesterov, mcl.zero_init_residual) == ("cosine", 128, True, "off")
    # a boolean flag beside a recipe wins over it, either way
    assert config("dml", "--recipe", "mcl-okd", "--no-nesterov").nesterov is False
    assert config("dml", "--recipe", "mcl-okd", "--zero-init-residual", "on").zero_init_residual == "on"
    one = config("one", "--recipe", "one-official")
    assert (one.schedule, one.milestones, one.batch_size, one.rampup_epochs) == ("step", [150, 225], 128, 80)
    assert one.zero_init_residual == "off"
    pcl = config("pcl", "--recipe", "pcl-paper")
    assert (pcl.ema_decay, pcl.branches, pcl.schedule) == (0.999, 3, "step")


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


def test_kd_defaults_and_the_repdistiller_recipe():
    cfg = config("kd")
    assert cfg.chain == ["resnet110", "resnet8"]   # the default teacher is trained first
    assert config("kd", "--teacher", "resnet32").chain == ["resnet32", "resnet8"]
    # a model file as the teacher: its own arch (read by the runtime)
    assert config("kd", "--teacher-checkpoint", "t.pt").chain == ["", "resnet8"]
    assert (cfg.temperature, cfg.alpha, cfg.lr, cfg.batch_size, cfg.epochs) == (4.0, 0.9, 0.1, 64, 200)
    assert cfg.schedule == "cosine" and cfg.workers == 1 and cfg.zero_init_residual == "auto"
    paper = config("kd", "--recipe", "repdistiller")
    assert (paper.temperature, paper.alpha, paper.lr, paper.batch_size, paper.epochs) == (4.0, 0.9, 0.05, 64, 240)
    assert paper.milestones == [150, 180, 210] and paper.schedule == "step" and paper.gamma == 0.1
    got = lrs(paper, [0, 149, 150, 179, 180, 209, 210, 239])
    assert got == pytest.approx([0.05, 0.05, 5e-3, 5e-3, 5e-4, 5e-4, 5e-5, 5e-5], rel=1e-12)
    # the distilled stage trains with exactly these settings
    stage = stage_config(paper, 1, "/teacher.pt")
    assert (stage.temperature, stage.alpha, stage.lr, stage.batch_size, stage.epochs) == (4.0, 0.9, 0.05, 64, 240)
    assert stage.milestones == [150, 180, 210] and stage.teacher == "/teacher.pt"
    assert stage.zero_init_residual == "off"
    takd = config("takd")
    assert takd.chain == ["resnet110", "resnet20", "resnet8"]
    assert (takd.lr, takd.batch_size, takd.epochs, takd.schedule) == (0.1, 64, 200, "cosine")
    takd = config("takd", "--recipe", "repdistiller")
    assert (takd.lr, takd.batch_size, takd.epochs, takd.milestones) == (0.05, 64, 240, [150, 180, 210])


def test_branch_defaults_ramp_up_over_the_official_share_of_the_run():
    cfg = config("one")
    assert (cfg.temperature, cfg.rampup_epochs, cfg.branches, cfg.kd_weight) == (3.0, 80, 3, 1.0)
    assert (cfg.arch, cfg.epochs, cfg.batch_size, cfg.lr, cfg.schedule) == ("resnet32", 300, 64, 0.1, "cosine")
    assert methods.get("one").members(cfg) == ["branch0", "branch1", "branch2", "ensemble", "average"]
    for method in ("one", "okddip", "pcl"):
        assert config(method, "--epochs", "30").rampup_epochs == 8        # 80/300 of the run
        assert config(method, "--epochs", "5").rampup_epochs == 1
        assert config(method, "--epochs", "30", "--rampup-epochs", "0").rampup_epochs == 0


def test_kdcl_general_gets_a_held_out_split_by_default():
    assert config("kdcl", "--variant", "general").val_fraction == 0.1
    assert config("kdcl").val_fraction == 0.0
    assert config("kdcl", "--variant", "general", "--val-fraction", "0.2").val_fraction == 0.2


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
