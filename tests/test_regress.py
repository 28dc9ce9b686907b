"""``bench check``: passes on its own baseline, fails on a drop beyond the tolerance or a missing cell.

The golden baseline is rewritten only on purpose: ``CERTBENCH_UPDATE_GOLDEN=1 pytest tests/test_regress.py``.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from bench.cli import main

FIXTURES = Path(__file__).parent / "fixtures" / "results"
GOLDEN_BASELINE = Path(__file__).parent / "golden" / "baseline_smoke.json"
CELL = "smoke/mnist/mnist/eps_3-10/ibp/seed0"


@pytest.fixture
def results(tmp_path: Path) -> Path:
    root = tmp_path / "results"
    shutil.copytree(FIXTURES, root)
    return root


@pytest.fixture
def baseline(results: Path, tmp_path: Path) -> Path:
    path = tmp_path / "baselines" / "smoke.json"
    assert main(["check", "--baseline", str(path), "--results", str(results), "--update", "--scale", "smoke"]) == 0
    return path


def _check(baseline: Path, results: Path, *extra: str) -> int:
    return main(["check", "--baseline", str(baseline), "--results", str(results), *extra])


def _shift(results: Path, cell: str, metric: str, by: float) -> None:
    path = results / cell / "result.json"
    record = json.loads(path.read_text())
    record["metrics"][metric] = round(record["metrics"][metric] + by, 6)
    path.write_text(json.dumps(record))


def test_update_records_cells_and_tolerance_from_the_seed_spread(baseline: Path):
    produced = baseline.read_text()
    if os.environ.get("CERTBENCH_UPDATE_GOLDEN") == "1":
        GOLDEN_BASELINE.write_text(produced)
    assert produced == GOLDEN_BASELINE.read_text()
    record = json.loads(produced)
    # The fixture's three linf-dist seeds at ε = 0.3 certify 66, 68 and 70 %: a 4-point range, so each of
    # those cells may drop 2 × 4 points; a cell without several seeds gets the 2-point floor.
    assert record["spread"]["smoke/mnist/mnist/eps_3-10/linf-dist"]["certified"]["range"] == 0.04
    assert record["cells"]["smoke/mnist/mnist/eps_3-10/linf-dist/seed1"]["tolerance"]["certified"] == 0.08
    assert record["tolerance"] == 0.02 and "tolerance" not in record["cells"][CELL]
    assert CELL in record["cells"] and not any("crown-ibp" in key for key in record["cells"])


def test_check_passes_on_its_baseline(baseline: Path, results: Path, capsys: pytest.CaptureFixture[str]):
    assert _check(baseline, results) == 0
    out = capsys.readouterr().out
    assert "check passed: 8 cells" in out and "REGRESSED" not in out


def test_check_fails_when_a_cell_drops_more_than_the_tolerance(baseline: Path, results: Path,
                                                               capsys: pytest.CaptureFixture[str]):
    _shift(results, CELL, "certified", -0.06)
    assert _check(baseline, results) == 1
    captured = capsys.readouterr()
    line = next(line for line in captured.out.splitlines() if line.startswith(CELL) and "certified" in line)
    assert line.split()[2:] == ["50.00", "44.00", "-6.00", "2.00", "REGRESSED"]
    assert "1 cells fell by more than their tolerance" in captured.err


def test_a_drop_within_the_tolerance_passes_unless_the_flag_tightens_it(baseline: Path, results: Path):
    _shift(results, CELL, "clean", -0.015)
    assert _check(baseline, results) == 0
    assert _check(baseline, results, "--tolerance", "0.01") == 1


def test_a_cell_with_a_wide_seed_spread_tolerates_more(baseline: Path, results: Path):
    noisy = "smoke/mnist/mnist/eps_3-10/linf-dist/seed0"
    _shift(results, noisy, "certified", -0.07)
    assert _check(baseline, results) == 0
    _shift(results, noisy, "certified", -0.02)
    assert _check(baseline, results) == 1


def test_improvements_pass_and_are_marked(baseline: Path, results: Path, capsys: pytest.CaptureFixture[str]):
    _shift(results, CELL, "certified", +0.1)
    assert _check(baseline, results) == 0
    assert any(line.startswith(CELL) and line.endswith("improved") for line in capsys.readouterr().out.splitlines())


def test_missing_or_corrupt_cells_fail(baseline: Path, results: Path, capsys: pytest.CaptureFixture[str]):
    (results / CELL / "result.json").write_text('{"schema": 1, "status": "comp')
    assert _check(baseline, results) == 1
    assert "MISSING" in capsys.readouterr().out
    shutil.rmtree(results / CELL)
    assert _check(baseline, results) == 1


def test_new_cells_are_listed_but_do_not_fail(baseline: Path, results: Path, capsys: pytest.CaptureFixture[str]):
    shutil.copytree(results / CELL, results / CELL.replace("seed0", "seed1"))
    record_path = results / CELL.replace("seed0", "seed1") / "result.json"
    record = json.loads(record_path.read_text())
    record["cell"]["seed"] = 1
    record_path.write_text(json.dumps(record))
    assert _check(baseline, results) == 0
    assert "not in the baseline" in capsys.readouterr().err


def test_spread_can_come_from_a_separate_multi_seed_run(results: Path, tmp_path: Path):
    single = tmp_path / "single"
    shutil.copytree(results / "smoke" / "cifar10", single / "smoke" / "cifar10")
    path = tmp_path / "b.json"
    assert main(["check", "--baseline", str(path), "--results", str(single), "--update",
                 "--spread-from", str(results)]) == 0
    record = json.loads(path.read_text())
    assert list(record["cells"]) == ["smoke/cifar10/cifar10/eps_8-255/linf-dist/seed0"]
    assert record["spread"]["smoke/mnist/mnist/eps_3-10/linf-dist"]["seeds"] == [0, 1, 2]
    assert "tolerance" not in record["cells"]["smoke/cifar10/cifar10/eps_8-255/linf-dist/seed0"]


def test_bad_baselines_and_flags_are_one_line_errors(tmp_path: Path, results: Path,
                                                      capsys: pytest.CaptureFixture[str]):
    missing = tmp_path / "none.json"
    assert _check(missing, results) == 2
    broken = tmp_path / "broken.json"
    broken.write_text('{"schema": 1, "cells": {"a/b": {"certified": 1.5}}}')
    assert _check(broken, results) == 2
    broken.write_text('{"schema": 1, "tolerance": 0.01, "cells": {"a/b": {"certified": 0.5}}}')
    assert _check(broken, results, "--tolerance", "2") == 2
    assert _check(broken, results, "--scale", "smoke") == 2
    err = capsys.readouterr().err
    assert "--update" in err and "Traceback" not in err
