"""The training-log layer of the CI gate (bench/trajectory.py) through ``bench check``: recorded per seed,
calibrated on a run under another CPU build, a rerun passes, rounding-sized drift passes, and a changed
schedule or loss fails naming cell, column and epoch."""

from __future__ import annotations

import csv
import json
import math
import shutil
from pathlib import Path

import pytest

from bench import trajectory
from bench.cli import main

FIXTURES = Path(__file__).parent / "fixtures" / "results"
CELL = "smoke/mnist/mnist/eps_1-10/ibp/seed0"


def _edit_log(folder: Path, column: str, epoch: int, factor: float) -> None:
    path = folder / "train_log.csv"
    with path.open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    rows[epoch][column] = repr(float(rows[epoch][column]) * factor)
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


@pytest.fixture
def roots(tmp_path: Path) -> dict[str, Path]:
    """results (the baseline's seed-0 runs), calibration (the same runs, every measured value moved by 1e-6
    of itself per epoch from epoch 1 on, as another CPU's rounding would) and the recorded files."""
    results, calibration = tmp_path / "results", tmp_path / "calibration"
    shutil.copytree(FIXTURES, results)
    shutil.copytree(FIXTURES, calibration)
    for log in calibration.rglob("train_log.csv"):
        with log.open(newline="") as fh:
            columns = next(csv.reader(fh))
        epochs = len(log.read_text().splitlines()) - 1
        for column in trajectory.MEASURED:
            if column in columns:
                for e in range(1, epochs):
                    _edit_log(log.parent, column, e, 1 + 1e-6 * e)
    baseline, logs = tmp_path / "smoke.json", tmp_path / "traj.json"
    assert main(["check", "--baseline", str(baseline), "--trajectories", str(logs), "--update", "--results",
                 str(results), "--calibrate-from", str(calibration), "--scale", "smoke"]) == 0
    return {"results": results, "baseline": baseline, "logs": logs}


def _check(roots: dict[str, Path], results: Path | None = None) -> int:
    return main(["check", "--baseline", str(roots["baseline"]), "--trajectories", str(roots["logs"]),
                 "--results", str(results or roots["results"])])


def test_a_method_tolerance_is_the_margin_times_its_largest_calibration_drift(roots: dict[str, Path]):
    recorded = json.loads(roots["logs"].read_text())
    logs = [k for k in recorded["cells"] if k.split("/")[4] == "linf-dist"]
    epochs = max(len(recorded["cells"][k]["loss"]) for k in logs)
    # The calibration moved every measured value by 1e-6 × epoch: the largest drift is at the last epoch of
    # the method's longest log; × MARGIN, rounded up to two digits.
    assert epochs > 2 and trajectory.MARGIN * 1e-6 * (epochs - 1) > trajectory.FLOOR
    assert recorded["tolerance"]["smoke/linf-dist"]["loss"] == pytest.approx(
        trajectory.MARGIN * 1e-6 * (epochs - 1), rel=0.1)
    assert set(recorded["tolerance"]["smoke/linf-dist"]) == {"loss"}
    assert CELL in recorded["cells"] and not {"wall_s", "acc", "train_certified"} & set(recorded["cells"][CELL])


def test_a_rerun_passes(roots: dict[str, Path], capsys: pytest.CaptureFixture[str]):
    assert _check(roots) == 0
    assert "trajectories passed" in capsys.readouterr().out


def test_drift_within_the_tolerance_passes(roots: dict[str, Path]):
    _edit_log(roots["results"] / CELL, "loss", 2, 1 + 1e-6)
    assert _check(roots) == 0


@pytest.mark.parametrize(("column", "factor"), [("loss", 1.01), ("loss", math.nan), ("eps", 1 + 1e-6), ("lr", 0.5)])
def test_a_changed_loss_or_schedule_diverges(roots: dict[str, Path], capsys: pytest.CaptureFixture[str],
                                             column: str, factor: float):
    _edit_log(roots["results"] / CELL, column, 1, factor)
    assert _check(roots) == 1
    captured = capsys.readouterr()
    row = next(line for line in captured.out.splitlines() if line.endswith("DIVERGED"))
    assert row.split()[:3] == [CELL, column, "1"]
    assert "diverged" in captured.err and "Traceback" not in captured.err


def test_fewer_epochs_diverge(roots: dict[str, Path], capsys: pytest.CaptureFixture[str]):
    log = roots["results"] / CELL / "train_log.csv"
    log.write_text("\n".join(log.read_text().splitlines()[:-1]) + "\n")
    assert _check(roots) == 1
    assert any(line.split()[:2] == [CELL, "epochs"] for line in capsys.readouterr().out.splitlines())


def test_a_seed_without_a_recorded_log_is_listed_not_failed(roots: dict[str, Path],
                                                            capsys: pytest.CaptureFixture[str]):
    other = CELL.replace("seed0", "seed7")
    shutil.copytree(roots["results"] / CELL, roots["results"] / other)
    record = json.loads((roots["results"] / other / "result.json").read_text())
    record["cell"]["seed"] = 7
    (roots["results"] / other / "result.json").write_text(json.dumps(record))
    _edit_log(roots["results"] / other, "loss", 1, 2.0)
    assert _check(roots) == 0
    assert other in capsys.readouterr().err


def test_calibration_with_another_recipe_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    results, calibration = tmp_path / "results", tmp_path / "calibration"
    shutil.copytree(FIXTURES, results)
    shutil.copytree(FIXTURES, calibration)
    _edit_log(calibration / CELL, "lr", 1, 0.5)
    assert main(["check", "--baseline", str(tmp_path / "b.json"), "--trajectories", str(tmp_path / "t.json"),
                 "--update", "--results", str(results), "--calibrate-from", str(calibration)]) == 2
    err = capsys.readouterr().err
    assert "not the same recipe" in err and "Traceback" not in err
    assert not (tmp_path / "b.json").exists() and not (tmp_path / "t.json").exists()


@pytest.mark.parametrize("args", [
    ["--trajectories", "t.json", "--fixed", "f"],                        # no baseline
    ["--baseline", "b.json", "--trajectories", "t.json", "--update"],    # no calibration
    ["--baseline", "b.json", "--calibrate-from", "c"],                   # calibration without --update
])
def test_bad_flags_are_one_line_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str]):
    args = [a if a.startswith("--") else str(tmp_path / a) for a in args]
    assert main(["check", *args, "--results", str(FIXTURES)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err


def test_a_corrupt_trajectories_file_is_a_one_line_error(roots: dict[str, Path], capsys: pytest.CaptureFixture[str]):
    roots["logs"].write_text("{}")
    assert _check(roots) == 2
    err = capsys.readouterr().err
    assert "not a schema-1 trajectories file" in err and "Traceback" not in err


def test_the_committed_trajectories_cover_every_baseline_cell():
    here = Path(__file__).parent.parent / "results" / "baselines"
    recorded = trajectory.load(here / "smoke-trajectories.json")
    cells = json.loads((here / "smoke.json").read_text())["cells"]
    assert set(cells) <= set(recorded.cells)
    assert {f"{k.split('/')[0]}/{k.split('/')[4]}" for k in recorded.cells} == set(recorded.tolerance)
    # Every recorded seed of every baseline cell: seeds 0-4 of the 5-seed measurement.
    assert {k.rsplit("/", 1)[1] for k in recorded.cells} == {f"seed{s}" for s in range(5)}
