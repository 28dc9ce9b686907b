"""``bench check``: passes on its own baseline; fails on a method's mean falling beyond its tolerance, a missing
cell, or a certified accuracy that looks unsound (far above the baseline, or above PGD accuracy).

The golden baseline is rewritten only on purpose: ``CERTBENCH_UPDATE_GOLDEN=1 pytest tests/test_regress.py``.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import statistics
from pathlib import Path

import pytest

from bench.cli import main
from bench.config import load_suite
from bench.regress import load_baseline
from methods import base as registry

FIXTURES = Path(__file__).parent / "fixtures" / "results"
GOLDEN_BASELINE = Path(__file__).parent / "golden" / "baseline_smoke.json"
COMMITTED = Path(__file__).parent.parent / "results" / "baselines" / "smoke.json"
CELL = "smoke/mnist/mnist/eps_3-10/ibp/seed0"
OTHER = "smoke/mnist/mnist/eps_1-10/ibp/seed0"  # the ibp pool is these two cells, tolerance the 0.5-point floor


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


def _set(results: Path, cell: str, **metrics: float) -> None:
    """New accuracies (multiples of 1/n) for a cell, its counts and verdict file following them: the reader
    refuses a record whose counts, metrics and verdicts disagree."""
    path = results / cell / "result.json"
    record = json.loads(path.read_text())
    record["metrics"].update(metrics)
    record["counts"].update({m: round(v * record["n_examples"]) for m, v in metrics.items()})
    path.write_text(json.dumps(record))
    lines = (results / cell / "verdicts.csv").read_text().splitlines()
    header = lines[0].split(",")
    rows = []
    for i, line in enumerate(lines[1:]):
        row = dict(zip(header, line.split(",")))
        row.update({m: str(int(i < record["counts"][m])) for m in ("clean", "pgd", "certified")})
        row["verdict"] = "certified" if row["certified"] == "1" else "attacked" if row["pgd"] == "0" else "unknown"
        rows.append(",".join(row[h] for h in header))
    (results / cell / "verdicts.csv").write_text("\n".join([lines[0], *rows]) + "\n")


def _shift(results: Path, cell: str, metric: str, by: float) -> None:
    record = json.loads((results / cell / "result.json").read_text())
    _set(results, cell, **{metric: round(record["metrics"][metric] + by, 6)})


def _add_seed(results: Path, cell: str, seed: int, certified: float) -> None:
    """A copy of ``cell`` as another seed of the same group, certifying ``certified``."""
    target = cell.rsplit("/", 1)[0] + f"/seed{seed}"
    shutil.copytree(results / cell, results / target)
    record = json.loads((results / target / "result.json").read_text())
    record["cell"]["seed"] = seed
    (results / target / "result.json").write_text(json.dumps(record))
    _set(results, target, certified=certified)


def _update_with_seeds(results: Path, tmp_path: Path, certified: list[tuple[float, float]]) -> dict:
    """--update with seeds 1, 2, … of the ibp pool's two cells (OTHER, CELL) certifying ``certified``."""
    seeds = tmp_path / "seeds"
    shutil.copytree(results, seeds)
    for seed, (a, b) in enumerate(certified, start=1):
        _add_seed(seeds, OTHER, seed, a)
        _add_seed(seeds, CELL, seed, b)
    path = tmp_path / "b.json"
    assert main(["check", "--baseline", str(path), "--results", str(results), "--update", "--spread-from",
                 str(seeds)]) == 0
    return json.loads(path.read_text())


def test_update_records_cells_pools_and_the_floor(baseline: Path):
    produced = baseline.read_text()
    if os.environ.get("CERTBENCH_UPDATE_GOLDEN") == "1":
        GOLDEN_BASELINE.write_text(produced)
    assert produced == GOLDEN_BASELINE.read_text()
    record = json.loads(produced)
    ibp = record["pools"]["smoke/ibp"]
    assert ibp["cells"] == [OTHER, CELL] and ibp["certified"] == pytest.approx((0.8 + 0.5) / 2)
    # No seed has every cell of a pool twice over here, so every pool gets the floor.
    assert record["spread"]["pools"] == {} and ibp["tolerance"] == {"certified": 0.005, "clean": 0.005}
    assert record["spread"]["cells"]["smoke/mnist/mnist/eps_3-10/linf-dist"]["certified"]["range"] == 0.04
    assert set(record["pools"]) == {"smoke/ibp", "smoke/linf-dist", "smoke/mystery"}
    assert record["cells"][CELL] == {"certified": 0.5, "clean": 0.86, "pgd": 0.62}


def test_a_pool_tolerance_is_z_sd_of_the_difference_of_two_seeds(results: Path, tmp_path: Path):
    record = _update_with_seeds(results, tmp_path, [(0.78, 0.52), (0.82, 0.46), (0.84, 0.50)])
    means = [(0.8 + 0.5) / 2, (0.78 + 0.52) / 2, (0.82 + 0.46) / 2, (0.84 + 0.50) / 2]
    spread = record["spread"]["pools"]["smoke/ibp"]
    assert spread["seeds"] == [0, 1, 2, 3] and spread["certified"]["values"] == pytest.approx(means)
    expected = math.ceil(3 * math.sqrt(2) * statistics.stdev(means) * 1000 - 1e-6) / 1000
    assert record["pools"]["smoke/ibp"]["tolerance"]["certified"] == expected == 0.054
    # Clean accuracy did not move between the copies: the floor.
    assert record["pools"]["smoke/ibp"]["tolerance"]["clean"] == 0.005


def test_a_cell_that_collapses_in_some_seed_is_left_out_of_its_pool(results: Path, tmp_path: Path):
    """A bimodal cell (certified 0.5, then 0.1 in one seed) would set the pool's tolerance by its jumps; it
    is recorded, named with its range, and left out of the pool, whose tolerance the other cell sets."""
    record = _update_with_seeds(results, tmp_path, [(0.78, 0.1), (0.82, 0.5), (0.80, 0.48)])
    pool = record["pools"]["smoke/ibp"]
    assert pool["cells"] == [OTHER] and pool["certified"] == pytest.approx(0.8)
    assert "10.0–50.0 %" in pool["left_out"][CELL] and CELL in record["cells"]
    values = [0.8, 0.78, 0.82, 0.80]
    assert pool["tolerance"]["certified"] == math.ceil(3 * math.sqrt(2) * statistics.stdev(values) * 1000 - 1e-6) / 1000


def test_check_passes_on_its_baseline(baseline: Path, results: Path, capsys: pytest.CaptureFixture[str]):
    assert _check(baseline, results) == 0
    out = capsys.readouterr().out
    assert "check passed: 3 method pools (8 cells)" in out and "REGRESSED" not in out


def test_a_pool_whose_mean_falls_beyond_its_tolerance_fails_naming_method_and_cells(
        baseline: Path, results: Path, capsys: pytest.CaptureFixture[str]):
    _shift(results, CELL, "certified", -0.02)  # the pool's mean falls by one point
    assert _check(baseline, results) == 1
    captured = capsys.readouterr()
    row = next(line for line in captured.out.splitlines() if line.startswith("smoke/ibp") and "certified" in line)
    assert row.split()[2:] == ["65.00", "64.00", "-1.00", "0.50", "REGRESSED"]
    cells = captured.out.split("cells of smoke/ibp:")[1]
    assert next(line for line in cells.splitlines() if line.startswith(CELL)).split()[1:4] == ["50.00", "48.00",
                                                                                              "-2.00"]
    assert "REGRESSED: smoke/ibp" in captured.err and "cells of smoke/linf-dist" not in captured.out


def test_a_drop_within_the_tolerance_passes_and_the_flag_sets_the_tolerance(baseline: Path, results: Path):
    _shift(results, CELL, "clean", -0.02)  # the pool's mean: −1 point
    assert _check(baseline, results, "--tolerance", "0.01") == 0
    assert _check(baseline, results) == 1


def test_moves_of_cells_that_cancel_in_the_mean_pass(baseline: Path, results: Path):
    _shift(results, CELL, "certified", -0.04)
    _shift(results, OTHER, "certified", +0.04)
    assert _check(baseline, results) == 0


def test_a_modest_rise_is_marked_improved(baseline: Path, results: Path, capsys: pytest.CaptureFixture[str]):
    _shift(results, CELL, "certified", +0.02)  # the mean: +1 point, between 1 and 2 tolerances of 0.8
    assert _check(baseline, results, "--tolerance", "0.008") == 0
    assert any(line.startswith("smoke/ibp") and line.endswith("improved") for line in capsys.readouterr().out.splitlines())


def test_a_rise_far_beyond_the_tolerance_fails_as_suspect(baseline: Path, results: Path,
                                                          capsys: pytest.CaptureFixture[str]):
    _shift(results, CELL, "certified", +0.04)  # the mean: +2 points, 4 tolerances
    assert _check(baseline, results) == 1
    err = capsys.readouterr().err
    assert "SUSPECT: smoke/ibp" in err and "check soundness" in err and "--update" in err


def test_certifying_more_than_pgd_leaves_robust_fails(baseline: Path, results: Path,
                                                      capsys: pytest.CaptureFixture[str]):
    _set(results, "smoke/mnist/mnist/eps_3-10/mystery/seed0", pgd=0.18, certified=0.2)
    assert _check(baseline, results) == 1
    captured = capsys.readouterr()
    assert "MISSING" in captured.out.split("cells of smoke/mystery:")[1]
    assert "MISSING: smoke/mystery" in captured.err and "check soundness" in captured.err


def test_missing_or_corrupt_cells_fail(baseline: Path, results: Path, capsys: pytest.CaptureFixture[str]):
    (results / CELL / "result.json").write_text('{"schema": 1, "status": "comp')
    assert _check(baseline, results) == 1
    assert "MISSING" in capsys.readouterr().out
    shutil.rmtree(results / CELL)
    assert _check(baseline, results) == 1


def test_new_cells_are_listed_but_do_not_fail(baseline: Path, results: Path, capsys: pytest.CaptureFixture[str]):
    _add_seed(results, CELL, 1, 0.5)
    assert _check(baseline, results) == 0
    assert "not in the baseline" in capsys.readouterr().err


def test_update_refuses_a_pool_whose_tolerance_reaches_its_value(results: Path, tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture[str]):
    mystery = "smoke/mnist/mnist/eps_3-10/mystery/seed0"
    for seed, certified in ((1, 0.0), (2, 0.4)):
        _add_seed(results, mystery, seed, certified)
    path = tmp_path / "b.json"
    assert main(["check", "--baseline", str(path), "--results", str(results), "--update"]) == 2
    assert "smoke/mystery" in capsys.readouterr().err and not path.exists()


def test_bad_baselines_and_flags_are_one_line_errors(tmp_path: Path, results: Path, baseline: Path,
                                                      capsys: pytest.CaptureFixture[str]):
    assert _check(tmp_path / "none.json", results) == 2
    broken = tmp_path / "broken.json"
    broken.write_text('{"schema": 1, "tolerance": 0.01, "cells": {"a/b": {"certified": 0.5}}}')
    assert _check(broken, results) == 2
    record = json.loads(baseline.read_text())
    record["cells"][CELL]["certified"] = 1.5
    broken.write_text(json.dumps(record))
    assert _check(broken, results) == 2
    record = json.loads(baseline.read_text())
    record["pools"]["smoke/ibp"]["cells"].append("smoke/nowhere/seed0")
    broken.write_text(json.dumps(record))
    assert _check(broken, results) == 2
    assert _check(baseline, results, "--tolerance", "2") == 2
    assert _check(baseline, results, "--scale", "smoke") == 2
    assert main(["check", "--baseline", str(tmp_path / "x.json"), "--results", str(results), "--update",
                 "--z", "0"]) == 2
    err = capsys.readouterr().err
    assert "--update" in err and "nowhere" in err and "Traceback" not in err


def test_the_committed_smoke_baseline_gates_every_method_and_no_cell_sits_at_chance():
    """Every registered method is a pool of the CI baseline, its tolerance below its value; no cell is
    indistinguishable from a constant classifier (clean within 3 binomial SDs of 10 %, or nothing certified)."""
    baseline = load_baseline(COMMITTED)
    assert {key.split("/")[1] for key in baseline.pools} == set(registry.list_methods())
    for key, pool in baseline.pools.items():
        assert all(pool.tolerance[m] < pool.baseline[m] for m in ("certified", "clean")), key
    start, stop = load_suite("mnist").scales["smoke"].test_range
    n = stop - start
    for cell, metrics in baseline.cells.items():
        assert metrics["clean"] > 0.1 + 3 * math.sqrt(0.1 * 0.9 / n) and metrics["certified"] > 0, cell


# --- fixed checkpoints ------------------------------------------------------------------------------------

def _tiny_cell(root: Path) -> str:
    """A finished-cell folder holding an untrained tiny IBP-family model for MNIST ε = 0.1."""
    import torch

    from bench.data import dataset_info

    key = "smoke/mnist/mnist/eps_1-10/ibp/seed0"
    cfg = dict(architecture="cnn-7", width=2, linear_size=8, batch_size=8, epochs=1, lr=1e-3, schedule="linear",
               ramp_start=0, ramp_epochs=1)
    method = registry.get("ibp")
    torch.manual_seed(0)
    model = method.deploy(method.build(dataset_info("mnist"), cfg))
    (root / key).mkdir(parents=True)
    torch.save(model.state_dict(), root / key / "model.pt")
    cell = {"suite": "mnist", "dataset": "mnist", "eps": "1/10", "method": "ibp", "scale": "smoke", "seed": 0}
    (root / key / "config.json").write_text(json.dumps({"cell": cell, "config": cfg}))
    return key


def test_fixed_checkpoints_are_recorded_and_checked_point_by_point(
        tmp_path: Path, data_dir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]):
    monkeypatch.setenv("BENCH_DATA_DIR", str(data_dir))
    key = _tiny_cell(tmp_path / "src")
    fixed = tmp_path / "fixed"
    assert main(["check", "--fixed", str(fixed), "--update", "--fixed-from", str(tmp_path / "src")]) == 0
    assert (fixed / key / "model.safetensors").exists() and not (fixed / key / "model.pt").exists()
    assert main(["check", "--fixed", str(fixed)]) == 0
    manifest = json.loads((fixed / "manifest.json").read_text())
    start, stop = load_suite("mnist").scales["smoke"].test_range
    assert manifest["cells"][key]["n"] == stop - start and manifest["cells"][key]["tolerance"] == 0
    # Three points whose recorded clean verdict no longer matches.
    lines = (fixed / key / "verdicts.csv").read_text().splitlines()
    header = lines[0].split(",")
    for i in (1, 2, 3):
        row = lines[i].split(",")
        row[header.index("clean")] = str(1 - int(row[header.index("clean")]))
        lines[i] = ",".join(row)
    (fixed / key / "verdicts.csv").write_text("\n".join(lines) + "\n")
    capsys.readouterr()
    assert main(["check", "--fixed", str(fixed)]) == 1
    captured = capsys.readouterr()
    row = next(line for line in captured.out.splitlines() if line.startswith(key) and " clean " in line)
    assert row.split()[-2:] == ["0", "CHANGED"] and row.split()[-3] == "3"
    assert "--update" in captured.err
    # Importing another cell adds it beside the recorded ones (whose verdicts are recorded afresh).
    other = key.replace("seed0", "seed1")
    shutil.copytree(tmp_path / "src" / key, tmp_path / "more" / other)
    record = json.loads((tmp_path / "more" / other / "config.json").read_text())
    record["cell"]["seed"] = 1
    (tmp_path / "more" / other / "config.json").write_text(json.dumps(record))
    assert main(["check", "--fixed", str(fixed), "--update", "--fixed-from", str(tmp_path / "more")]) == 0
    assert set(json.loads((fixed / "manifest.json").read_text())["cells"]) == {key, other}
    assert main(["check", "--fixed", str(fixed)]) == 0


def test_a_certifier_at_1_1_eps_fails_the_committed_fixed_checkpoints(
        tmp_path: Path, data_dir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]):
    """Mutation (a) on one committed fixed cell: IBP run at 1.1 ε loses certified points, and the
    point-by-point check sees every one of them."""
    monkeypatch.setenv("BENCH_DATA_DIR", str(data_dir))
    key = "smoke/mnist/mnist/eps_1-10/ibp/seed0"
    committed = COMMITTED.parent / "fixed"
    shutil.copytree(committed / key, tmp_path / key)
    entry = json.loads((committed / "manifest.json").read_text())["cells"][key]
    (tmp_path / "manifest.json").write_text(json.dumps({"schema": 1, "cells": {key: entry}}))
    assert main(["check", "--fixed", str(tmp_path)]) == 0
    cls = type(registry.get("ibp"))
    certify = cls.certify
    monkeypatch.setattr(cls, "certify", lambda self, model, x, y, eps, certifier=None:
                        certify(self, model, x, y, 1.1 * eps, certifier))
    capsys.readouterr()
    assert main(["check", "--fixed", str(tmp_path)]) == 1
    row = next(line for line in capsys.readouterr().out.splitlines() if line.startswith(key) and "certified" in line)
    recorded, now = int(row.split()[2]), int(row.split()[3])
    assert row.split()[-1] == "CHANGED" and recorded - now == int(row.split()[4]) > entry["tolerance"]


def test_the_kernel_isa_is_chosen_by_env_and_keys_the_build(monkeypatch: pytest.MonkeyPatch):
    """The gate's "different CPU" check builds the C++ extensions for AVX2 on an AVX-512 machine
    (BENCH_CPU_ISA); each ISA's flags differ, and the flags are hashed into each extension's name."""
    from methods.base import MethodError
    from methods import native

    if native.platform.machine().lower() not in ("x86_64", "amd64"):
        pytest.skip("ISA levels are x86-64 only")
    flags = {}
    for isa in ("native", "avx2", "avx512"):
        monkeypatch.setenv(native.ISA_ENV, isa)
        flags[isa] = native.compiler_flags()
    assert "-march=x86-64-v3" in flags["avx2"] and "-march=x86-64-v4" in flags["avx512"]
    assert len({" ".join(f) for f in flags.values()}) == 3
    monkeypatch.setenv(native.ISA_ENV, "avx9")
    with pytest.raises(MethodError, match="BENCH_CPU_ISA='avx9': choose one of native, avx2, avx512"):
        native.compiler_flags()
