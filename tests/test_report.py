"""`cohort report` (report.md + curves.png) for cohort, ONE, TAKD-stage and sweep directories,
and the TensorBoard event files every run writes beside metrics.parquet."""
import json
import math
import runpy
import statistics
import struct
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import tiny_cohort

from cohort.cli import main
from cohort.report import natural_key, write_report
from cohort.runs import RunDir

ROOT = Path(__file__).resolve().parents[1]


# ---- helpers ---------------------------------------------------------------------------------
def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    assert data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    from PIL import Image
    with Image.open(path) as image:
        image.verify()   # decodes the chunks: a truncated or corrupt PNG raises
    return width, height


def md_section_table(text: str, heading: str) -> list[dict]:
    """The first Markdown table after `heading`, as dicts keyed by the header cells."""
    lines = text.splitlines()
    start = lines.index(heading)
    rows, header = [], None
    for line in lines[start + 1:]:
        if line.startswith("#"):
            break
        if not line.startswith("|"):
            if header:
                break
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if header is None:
            header = cells
        elif not set("".join(cells)) <= set("-: "):
            rows.append(dict(zip(header, cells)))
    assert header, f"no table after {heading!r}"
    return rows


def expected_stats(rows: list[dict]) -> dict[str, dict]:
    """Final and best test accuracy per member, computed here straight from the rows."""
    out = {}
    for member in {r["member"] for r in rows}:
        mine = sorted((r for r in rows if r["member"] == member), key=lambda r: r["epoch"])
        # "best": the best val_acc (earliest on ties) when the rows have one, else the final epoch
        scored = [r for r in mine if r.get("val_acc") is not None]
        best = max(scored, key=lambda r: (r["val_acc"], -r["epoch"])) if scored else mine[-1]
        out[member] = {"final": mine[-1]["test_acc"], "best": best["test_acc"],
                       "best_epoch": best["epoch"] + 1, "loss": mine[-1]["test_loss"]}
    return out


def scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def synthetic_run(path: Path, config: dict, rows: list[dict], summary_extra: dict | None = None):
    run = RunDir(path, config).start()
    if summary_extra:
        run.extra_summary.update(summary_extra)
    for epoch in sorted({r["epoch"] for r in rows}):
        run.append_metrics([r for r in rows if r["epoch"] == epoch])
    return run


# ---- a real DML run on digits --------------------------------------------------------------------
@pytest.fixture(scope="module")
def dml_run(tmp_path_factory, digits):
    from cohort.runtime.local import run_cohort
    out = tmp_path_factory.mktemp("report") / "dml-r8x2"
    run_cohort(tiny_cohort(out, epochs=2, archs=["resnet8", "resnet14"]), dataset=digits)   # curves apart
    return out


def test_dml_report_tables_match_metrics(dml_run):
    report, curves = write_report(dml_run)
    assert report == dml_run / "report.md" and curves == dml_run / "curves.png"
    text = report.read_text()
    rows = pq.read_table(dml_run / "metrics.parquet").to_pylist()
    expected = expected_stats(rows)
    table = {r["member"]: r for r in md_section_table(text, "## Accuracy")}
    assert list(table) == ["student0", "student1", "ensemble"]
    for member, want in expected.items():
        got = table[member]
        assert float(got["final test acc (%)"]) == pytest.approx(want["final"], abs=0.005)
        assert float(got["best test acc (%)"]) == pytest.approx(want["best"], abs=0.005)
        assert int(got["best epoch"]) == want["best_epoch"]
        assert float(got["final test loss"]) == pytest.approx(want["loss"], abs=5e-5)
    summary = json.loads((dml_run / "summary.json").read_text())["members"]
    for member in expected:   # the same numbers summary.json holds
        assert float(table[member]["final test acc (%)"]) == pytest.approx(
            summary[member]["final_test_acc"], abs=0.005)

    gain = expected["ensemble"]["final"] - statistics.fmean(
        expected[m]["final"] for m in ("student0", "student1"))
    assert f"**Ensemble gain over the mean student: {gain:+.2f} points** (final)" in text
    assert "Mean of the 2 students: final " in text

    seconds = {r["epoch"]: r["epoch_seconds"] for r in rows}
    times = {r[""]: r["value"] for r in md_section_table(text, "## Time per epoch")}
    assert times["epochs timed"] == "2"
    assert float(times["mean (s)"]) == pytest.approx(statistics.fmean(seconds.values()), abs=0.005)
    assert float(times["total (s)"]) == pytest.approx(sum(seconds.values()), abs=0.05)

    config = {r["setting"].strip("`"): r["value"] for r in md_section_table(text, "## Configuration")}
    assert config["method"] == "dml" and config["archs"] == "resnet8, resnet14"
    assert config["lr"] == "0.1" and config["epochs"] == "2"
    assert "![test accuracy and loss per epoch](curves.png)" in text


def line_pixels(panel, colour: str, alpha: float = 0.9, tolerance: int = 14):
    """(rows, columns) of the pixels of `panel` (H x W x 3 uint8) drawn in the matplotlib colour
    `colour` at `alpha` over white, within `tolerance` per channel."""
    import numpy as np
    from matplotlib.colors import to_rgb
    want = 255 * (alpha * np.array(to_rgb(colour)) + (1 - alpha))
    near = (np.abs(panel.astype(float) - want) <= tolerance).all(axis=2)
    return np.nonzero(near)


def test_dml_curves_png_is_a_legible_figure(dml_run):
    """Decoded pixels: an accuracy panel and a loss panel side by side, each with a line per
    student in its own colour spanning the epochs."""
    import numpy as np
    from PIL import Image
    _, curves = write_report(dml_run)
    width, height = png_size(curves)
    assert 1000 <= width <= 2000 and 350 <= height <= 700
    with Image.open(curves) as image:
        pixels = np.asarray(image.convert("RGB"))
    ink = (pixels < 245).any(axis=2)
    assert 0.03 < ink.mean() < 0.5, ink.mean()      # not blank, not a solid block
    colours = {tuple(p) for p in pixels.reshape(-1, 3)[::7]}
    assert len(colours) > 50                          # antialiased lines and text, not flat fills
    half = width // 2
    for name, panel in (("accuracy", pixels[:, :half]), ("loss", pixels[:, half:])):
        assert (panel < 245).any(axis=2).mean() > 0.02, f"the {name} panel is empty"
        for member, colour in (("student0", "C0"), ("student1", "C1")):
            rows, cols = line_pixels(panel, colour)
            assert len(rows) > 100, f"no {member} line ({colour}) in the {name} panel"
            # a curve from epoch 1 to epoch 2, not just a legend swatch
            assert cols.max() - cols.min() > 0.3 * half, f"{member}'s {name} line is too short"
    # two different plots, not one panel drawn twice
    assert not np.array_equal(pixels[:, :half], pixels[:, half:2 * half])


def test_tensorboard_event_files_hold_per_member_scalars(dml_run):
    rows = pq.read_table(dml_run / "metrics.parquet").to_pylist()
    found = scalars(dml_run / "tensorboard")
    for member in ("student0", "student1", "ensemble"):
        for key in ("test_acc", "test_loss"):
            want = [(r["epoch"], r[key]) for r in sorted(rows, key=lambda r: r["epoch"])
                    if r["member"] == member]
            got = found[f"{member}/{key}"]
            assert [s for s, _ in got] == [0, 1]
            assert [v for _, v in got] == pytest.approx([v for _, v in want], rel=1e-6)
    for key in ("train_loss", "train_kd", "lr", "images_per_second"):
        assert f"student0/{key}" in found
    assert "ensemble/train_loss" not in found   # absent (NaN) values are not logged
    assert not any(tag.endswith("/epoch") or tag.endswith("/method") for tag in found)


def test_report_command_and_job_script(dml_run, capsys, monkeypatch):
    (dml_run / "report.md").unlink(missing_ok=True)
    assert main(["report", str(dml_run)]) == 0
    assert f"wrote {dml_run / 'report.md'}" in capsys.readouterr().out
    assert (dml_run / "report.md").exists()
    (dml_run / "curves.png").unlink()
    monkeypatch.setattr(sys, "argv", ["jobs/report.py", str(dml_run)])
    with pytest.raises(SystemExit) as done:   # the script, run as `python jobs/report.py RUN_DIR`
        runpy.run_path(str(ROOT / "jobs" / "report.py"), run_name="__main__")
    assert done.value.code == 0 and (dml_run / "curves.png").exists()


# ---- bad paths -------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", ["missing", "file", "empty", "foreign", "corrupt"])
def test_bad_run_dir_is_one_line_and_exit_2(tmp_path, capsys, case):
    target = tmp_path / case
    if case == "file":
        target.write_text("not a run")
    elif case == "empty":
        target.mkdir()
    elif case == "foreign":
        target.mkdir()
        (target / "notes.txt").write_text("hello")
        (target / "sub").mkdir()
    elif case == "corrupt":
        target.mkdir()
        (target / "metrics.parquet").write_bytes(b"PAR1 truncated")
    assert main(["report", str(target)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith("error: RUN_DIR: ") and str(target) in err
    assert not (target / "report.md").exists() if target.is_dir() else True


# ---- ONE: branches, the gated ensemble and the averaged one --------------------------------------
def one_rows(epochs: int = 3) -> list[dict]:
    rows = []
    for e in range(epochs):
        accs = {"branch0": 50 + 10 * e, "branch1": 52 + 9 * e, "branch2": 48 + 11 * e,
                "ensemble": 56 + 10 * e, "average": 55 + 10 * e}
        if e == epochs - 1:
            accs["branch1"] -= 15.0   # its best is not its last epoch
        for member, acc in accs.items():
            row = {"method": "one", "member": member, "epoch": e, "test_acc": float(acc),
                   "val_acc": float(acc) + 1.0,   # the selection follows validation accuracy
                   "test_loss": 2.0 / (e + 1) + 0.01 * len(member), "lr": 0.1,
                   "epoch_seconds": 4.0 + e, "images_per_second": 900.0, "kd_weight": 0.5}
            if member.startswith("branch"):
                row["gate_weight"] = 1 / 3
            rows.append(row)
    return rows


def test_one_report_gated_ensemble_over_mean_branch(tmp_path):
    run = tmp_path / "one-r32x3"
    rows = one_rows()
    synthetic_run(run, {"method": "one", "arch": "resnet32", "branches": 3, "epochs": 3,
                        "name": "one-r32x3"}, rows,
                  {"best_student": {"member": "branch0", "epoch": 2, "test_acc": 70.0,
                                    "arch": "resnet32", "path": "best_student.pt"}})
    text = write_report(run)[0].read_text()
    table = {r["member"]: r for r in md_section_table(text, "## Accuracy")}
    assert list(table) == ["branch0", "branch1", "branch2", "ensemble", "average"]
    assert table["branch1"]["final test acc (%)"] == "55.00"
    assert table["branch1"]["best test acc (%)"] == "61.00" and table["branch1"]["best epoch"] == "2"
    mean_final = statistics.fmean([70.0, 55.0, 70.0])
    assert f"Mean of the 3 branches: final {mean_final:.2f}%" in text
    assert f"**Gated ensemble gain over the mean branch: {76.0 - mean_final:+.2f} points** (final)" in text
    assert f"(`average`) gain over the mean branch: {75.0 - mean_final:+.2f} points (final)" in text
    assert "exported best student: branch0 of epoch 3 (70.00%)" in text
    times = {r[""]: r["value"] for r in md_section_table(text, "## Time per epoch")}
    assert times["mean (s)"] == "5.00" and times["first epoch (s)"] == "4.00"
    png_size(run / "curves.png")
    assert sorted(t for t in scalars(run / "tensorboard") if t.startswith("branch0/")) == [
        "branch0/epoch_seconds", "branch0/gate_weight", "branch0/images_per_second",
        "branch0/kd_weight", "branch0/lr", "branch0/test_acc", "branch0/test_loss", "branch0/val_acc"]


def test_report_of_a_run_with_no_epochs_yet(tmp_path):
    RunDir(tmp_path / "fresh", {"method": "dml", "epochs": 5}).start()
    text = write_report(tmp_path / "fresh")[0].read_text()
    assert "No epochs recorded yet." in text and "epochs completed: 0 of 5" in text
    png_size(tmp_path / "fresh" / "curves.png")


# ---- TAKD: a directory of stage run directories --------------------------------------------------
def test_stages_report_has_a_section_per_stage(tmp_path):
    top = tmp_path / "takd"
    chain = ["resnet110", "resnet20", "resnet14", "resnet8"]
    finals = {}
    for i, arch in enumerate(chain):
        method = "independent" if i == 0 else "kd"
        rows = [{"method": method, "member": "student", "epoch": e, "test_acc": 40.0 + 10 * e - 2 * i,
                 "test_loss": 1.5 - 0.3 * e, "epoch_seconds": 2.0, "lr": 0.1} for e in range(3)]
        finals[arch] = rows[-1]["test_acc"]
        synthetic_run(top / f"stage{i}-{arch}", {"method": method, "arch": arch, "epochs": 3}, rows)
    (top / "config.json").write_text(json.dumps({"method": "takd", "chain": chain, "name": "takd"}))
    (top / "summary.json").write_text(json.dumps({"stages": [
        {"stage": i, "arch": a, "test_acc": finals[a]} for i, a in enumerate(chain)]}))
    text = write_report(top)[0].read_text()
    headings = [line for line in text.splitlines() if line.startswith("## Stage ")]
    assert headings == [f"## Stage {i}: stage{i}-{a}" for i, a in enumerate(chain)]
    summary = md_section_table(text, "## Stages")
    assert [r["arch"] for r in summary] == chain
    assert [float(r["final test acc (%)"]) for r in summary] == [finals[a] for a in chain]
    assert "Summary table written by the run:" in text
    assert "| `chain` | resnet110, resnet20, resnet14, resnet8 |" in text
    width, height = png_size(top / "curves.png")
    assert height > 3 * width / 3.5   # one row of two panels per stage


def test_natural_order_of_stage_names():
    names = ["stage10-resnet8", "stage2-resnet20", "stage1-resnet56", "stage0-resnet110"]
    assert sorted(names, key=natural_key) == ["stage0-resnet110", "stage1-resnet56",
                                              "stage2-resnet20", "stage10-resnet8"]


# ---- sweeps ---------------------------------------------------------------------------------------
def test_sweep_report_one_line_per_trial(tmp_path):
    sweep = tmp_path / "sweep-T"
    sweep.mkdir()
    trials = [{"trial_id": f"t{i:02d}", "temperature": t, "lr": 0.05, "status": status,
               "epochs": epochs, "final_test_acc": final, "best_test_acc": best}
              for i, (t, status, epochs, final, best) in enumerate([
                  (1.0, "TERMINATED", 4, 81.0, 82.5), (2.0, "TERMINATED", 4, 84.0, 84.25),
                  (4.0, "TERMINATED", 4, 83.0, 85.75), (8.0, "STOPPED", 1, 40.0, 40.0)])]
    pq.write_table(pa.Table.from_pylist(trials), sweep / "results.parquet")
    (sweep / "best.json").write_text(json.dumps({"metric": "best_test_acc", "mode": "max"}))
    text = write_report(sweep)[0].read_text()
    table = md_section_table(text, "## Trials")
    assert [r["trial_id"] for r in table] == ["t00", "t01", "t02", "t03"]
    assert [r[""] for r in table] == ["", "", "★", ""]
    assert [float(r["best_test_acc"]) for r in table] == [82.5, 84.25, 85.75, 40.0]
    assert "- searched: temperature, lr" in text
    assert "- best trial: **t02: temperature=4, lr=0.05** with best_test_acc = 85.75" in text
    assert "- status: STOPPED 1, TERMINATED 3" in text
    width, height = png_size(sweep / "curves.png")
    assert width >= 700 and height >= 400


def test_sweep_report_of_the_layout_cohort_sweep_writes(tmp_path):
    """cohort.sweep's results.parquet: final_/best_ per ranked quantity, best.json's metric
    and params name the ranking and the searched flags."""
    sweep = tmp_path / "sweep-dml"
    (sweep / "runs").mkdir(parents=True)
    rows = []
    for i, (t, kd, status, best) in enumerate([(1.0, 0.5, "completed", 90.0), (3.0, 0.5, "completed", 92.5),
                                               (1.0, 1.0, "stopped", 88.0), (3.0, 1.0, "error", None)]):
        row = {"trial_id": f"a{i}", "temperature": t, "kd_weight": kd, "status": status,
               "epochs": 0 if best is None else 2}
        for key in ("best_student", "mean_student", "ensemble"):
            row[f"final_{key}"] = None if best is None else best - 1.0
            row[f"best_{key}"] = best
        row["best_epoch"] = None if best is None else 1
        row["error"] = "RuntimeError: boom" if best is None else ""
        rows.append(row)
    pq.write_table(pa.Table.from_pylist(rows), sweep / "results.parquet")
    (sweep / "best.json").write_text(json.dumps({
        "metric": "best_student", "trial_id": "a1", "params": {"temperature": 3.0, "kd_weight": 0.5},
        "best": 92.5}))
    text = write_report(sweep)[0].read_text()
    assert "- searched: temperature, kd_weight" in text
    assert "- metric: `best_best_student` (max)" in text
    assert "- best trial: **a1: temperature=3, kd_weight=0.5** with best_best_student = 92.5" in text
    table = md_section_table(text, "## Trials")
    assert [r["trial_id"] for r in table] == ["a0", "a1", "a2", "a3"]
    assert [r[""] for r in table] == ["", "★", "", ""]
    assert table[3]["best_best_student"] == "–" and table[3]["error"] == "RuntimeError: boom"
    png_size(sweep / "curves.png")


# ---- TensorBoard across a resume and a restart -----------------------------------------------------
def test_tensorboard_replaces_epochs_trained_again(tmp_path):
    path = tmp_path / "run"

    def rows(epoch, acc):
        return [{"method": "dml", "member": m, "epoch": epoch, "test_acc": acc + k, "test_loss": 1.0}
                for k, m in enumerate(("student0", "student1", "ensemble"))]

    run = RunDir(path, {"method": "dml"}).start()
    for e in range(4):
        run.append_metrics(rows(e, 10.0 * e))
    run.truncate_metrics(2)               # in-process restart from the checkpoint after epoch 2
    run.append_metrics(rows(2, 200.0))
    resumed = RunDir(path, {"method": "dml"}, resume=True).start()   # a new process resumes
    resumed.truncate_metrics(3)
    resumed.append_metrics(rows(3, 300.0))
    resumed.append_metrics(rows(4, 400.0))
    got = scalars(path / "tensorboard")
    assert got["student0/test_acc"] == [(0, 0.0), (1, 10.0), (2, 200.0), (3, 300.0), (4, 400.0)]
    assert got["ensemble/test_acc"] == [(0, 2.0), (1, 12.0), (2, 202.0), (3, 302.0), (4, 402.0)]
    table = pq.read_table(path / "metrics.parquet").to_pylist()
    assert sorted((r["epoch"], r["test_acc"]) for r in table if r["member"] == "student0") == \
        [(0, 0.0), (1, 10.0), (2, 200.0), (3, 300.0), (4, 400.0)]
    assert all(math.isfinite(v) for _, v in got["student1/test_loss"])
