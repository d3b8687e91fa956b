"""The method registry, the config tree and the command line generated from it (no Ray)."""
import dataclasses
import json

import pytest
import ray

from cohort import methods
from cohort.cli import build_parser, main
from cohort.config import flag_of, validate
from cohort.flags import config_from_args

NAMES = sorted(methods.METHODS)


def config(*argv):
    return config_from_args(methods.get(argv[0]), build_parser().parse_args(list(argv)))


def test_every_method_is_a_command_with_a_job_script_and_a_summary():
    from pathlib import Path
    root = Path(__file__).resolve().parents[1]
    assert {"independent", "dml", "kdcl", "one", "kd", "takd", "okddip", "pcl"} <= set(NAMES)
    for name in NAMES:
        cls = methods.get(name)
        assert cls.summary and cls.Config().method == name, name
        assert (root / "jobs" / f"{name}.py").is_file(), name
        assert cls.family in ("cohort", "network", "chain")


@pytest.mark.parametrize("name", NAMES)
def test_help_shows_every_flag_with_its_default(name, capsys):
    assert main([name, "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    for f in dataclasses.fields(methods.get(name).Config):
        if f.metadata.get("cli"):
            assert flag_of(f) in text, (name, f.name)
    assert text.count("(default:") >= sum(1 for f in dataclasses.fields(methods.get(name).Config)
                                          if f.metadata.get("cli"))


@pytest.mark.parametrize("name", NAMES)
def test_config_json_loads_back_into_the_same_tree(name):
    cfg = methods.get(name).Config(output="runs/x", epochs=7)
    again = methods.load_config(json.loads(json.dumps(cfg.to_dict())))
    assert type(again) is type(cfg) and again == cfg
    validate(again)


def test_defaults_are_written_once_and_the_cli_trains_the_python_api_recipe():
    for name in NAMES:
        assert config(name) == methods.get(name).Config(), name
    assert config("kd", "--teacher", "resnet20") == methods.get("kd").Config(teacher="resnet20")


BAD = [
    (["one", "--temperature", "inf"], "--temperature"),
    (["one", "--lr", "nan"], "--lr"),
    (["okddip", "--kd-weight", "-1"], "--kd-weight"),
    (["okddip", "--branches", "2"], "--branches"),
    (["pcl", "--branches", "1"], "--branches"),
    (["dml", "--momentum", "1.5"], "--momentum"),
    (["kdcl", "--startup-timeout", "inf"], "--startup-timeout"),
    (["kdcl", "--max-restarts", "-1"], "--max-restarts"),
    (["kd", "--teacher", "resnet20", "--alpha", "1.5"], "--alpha"),
    (["takd", "--gamma=-inf"], "--gamma"),
    (["one", "--workers", "2", "--batch-size", "63"], "--batch-size"),
]


@pytest.mark.parametrize("argv,flag", BAD)
def test_bad_numbers_exit_2_with_one_line_before_anything(argv, flag, tmp_path, capsys):
    out = tmp_path / "run"
    assert main([*argv, "--dataset", "digits", "--output", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {flag}:") and len(err.splitlines()) == 1, err
    assert not out.exists() and not ray.is_initialized()


def test_a_recipe_sets_the_papers_settings_and_flags_override_it(tmp_path):
    cfg = config("dml", "--recipe", "mcl-okd", "--epochs", "3")
    recipe = methods.get("dml").recipes["mcl-okd"]
    assert cfg.recipe == "mcl-okd" and cfg.epochs == 3
    assert {k: getattr(cfg, k) for k in recipe.settings if k != "epochs"} == \
        {k: v for k, v in recipe.settings.items() if k != "epochs"}
    assert cfg.to_dict()["recipe"] == "mcl-okd"   # config.json records it
    one = config("one", "--recipe", "one-official")
    assert (one.milestones, one.weight_decay, one.rampup_epochs) == ([150, 225], 1e-4, 80)
    kd = config("kd", "--recipe", "repdistiller", "--teacher", "resnet32")
    assert (kd.epochs, kd.batch_size, kd.lr, kd.temperature, kd.alpha) == (240, 64, 0.05, 4.0, 0.9)


def test_an_unknown_recipe_is_refused(capsys):
    assert main(["dml", "--recipe", "nope"]) == 2
    assert "--recipe" in capsys.readouterr().err


def test_sweeps_search_fields_by_name_or_flag():
    from cohort.sweep import parse_grid
    assert parse_grid("dml", "arch", "resnet8,resnet14") == ("archs", [["resnet8"], ["resnet14"]])
    assert parse_grid("dml", "archs", "resnet8") == ("archs", [["resnet8"]])
    assert parse_grid("okddip", "branches", "3,4") == ("branches", [3, 4])
