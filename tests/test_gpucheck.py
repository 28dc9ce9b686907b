"""The GPU check (``methods.linf_dist.gpucheck``) rehearsed on the CPU, so that it cannot rot between the rare
occasions a GPU is lent; plus the pieces of issue 17 around it: the device resolver's warning, the
projection arithmetic, the budget guard, and the perf tool's Ctrl-C message.

The end-to-end dry run is the expensive test (Triton interpreter, one smoke cell, smoke-scale timings).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from bench.machine import CUDA_UNVERIFIED, resolve_device
from methods.linf_dist import gpucheck, perf

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_dry_run_passes_every_step(tmp_path: Path) -> None:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    done = subprocess.run([sys.executable, "-m", "methods.linf_dist.gpucheck", str(tmp_path), "--dry"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    log = (tmp_path / "gpucheck.log").read_text()
    assert done.returncode == 0, log[-4000:]
    report = json.loads((tmp_path / "gpucheck.json").read_text())
    steps = report["steps"]
    assert report["dry"] and sorted(steps) == sorted(gpucheck.STEPS)
    assert all(s["status"] == "ok" and s["seconds"] > 0 for s in steps.values())

    kernels = steps["kernels"]["data"]
    if "skipped" not in kernels:  # triton imports here: every p and the interval, on every input set
        ops = {r["op"] for r in kernels["rows"]}
        assert ops == {"p=1", "p=2", "p=8", "p=8.5", "p=64", "p=1000", "p=inf", "interval"}
        assert len({r["inputs"] for r in kernels["rows"]}) == 6 and all(r["ok"] for r in kernels["rows"])

    rows = steps["perf"]["data"]["rows"]
    assert [r["case"] for r in rows] == [c.name for c in perf.CASES]
    assert all(r["ours_gpairs_s"] > 0 and r["naive_gpairs_s"] > 0 for r in rows)

    smoke = steps["smoke"]["data"]
    assert smoke["check_exit"] == 0 and smoke["runs_exit"] == {"mnist/ibp": 0}
    assert [c["key"] for c in smoke["cells"]] == smoke["baseline_cells_checked"] == ["smoke/mnist/mnist/eps_1-10/ibp/seed0"]

    paper = steps["paper"]["data"]
    assert paper["scale"] == "smoke" and paper["suites_hours"]["mnist"]["complete"]
    assert {c["label"] for c in paper["cells"]} == {f"mnist ε={e} {m} seed 0" for e in ("1/10", "3/10")
                                                    for m in ("linf-dist", "crown-ibp")}
    linf = paper["groups"]["mnist/linf-dist/128"]["phases"]
    assert [ph["p"] for ph in linf][0] == 8.0 and linf[-1]["p"] == "inf" and 8 < linf[1]["p"] < 1000
    compared = paper["estimate_comparison"]
    assert compared["exit"] == 0 and len(compared["rows"]) == 2
    assert all(r["estimate_min"] >= 0 and r["projected_min"] is not None for r in compared["rows"])


def test_projection_weights_each_phase_by_its_epochs() -> None:
    linf = {"p_start_epoch": 100, "p_stop_epoch": 1250, "epochs": 1300}
    assert gpucheck._phases(linf, 1300) == [(0, 100), (100, 1250), (1250, 1300)]
    assert gpucheck._phases({"epochs": 10}, 10) == [(0, 3), (3, 7), (7, 10)]
    assert gpucheck._phases({"p_start_epoch": 0, "p_stop_epoch": 0}, 4) == [(0, 4)]  # empty phases dropped

    scale = SimpleNamespace(test_range=(0, 1000), pgd_steps=10, pgd_restarts=2)
    cell = SimpleNamespace(config=linf, scale=scale)
    timing = {"batches_per_epoch": 3, "epochs": 1300, "eval_batch": 300, "pgd_step_s": 0.5, "certify_batch_s": 1.0,
              "phases": [{"seconds_per_step": 1.0}, {"seconds_per_step": 2.0}, {"seconds_per_step": 4.0}]}
    train = 3 * (100 * 1.0 + 1150 * 2.0 + 50 * 4.0)
    evaluation = 4 * (0.5 * 10 * 2 + 1.0)  # ceil(1000 / 300) batches
    assert gpucheck._project(cell, timing) == pytest.approx(train + evaluation)


def test_every_paper_cell_has_what_the_timing_step_reads() -> None:
    """The paper step runs only on a GPU: its reading of the paper-scale configs is checked here."""
    from bench.config import load_suite

    for name in ("mnist", "cifar"):
        for cell in load_suite(name).cells("paper", None, None, [0]):
            phases = gpucheck._phases(cell.config, int(cell.config["epochs"]))
            assert phases[0][0] == 0 and phases[-1][1] == int(cell.config["epochs"]), cell.label
            assert int(cell.config["batch_size"]) > 0, cell.label
    linf = load_suite("cifar").cells("paper", ["linf-dist"], None, [0])[0].config
    assert gpucheck._phases(linf, 1300) == [(0, 100), (100, 1250), (1250, 1300)]  # paper Table 3


def test_a_spent_budget_records_the_step_as_incomplete(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(perf, "fast_backend_name", lambda device: "not built: the budget stops the step first")
    ctx = gpucheck.Context(tmp_path, tmp_path / "work", torch.device("cpu"), True, None)
    report = gpucheck.run_check(ctx, ["perf"], budget_s=1e-9)
    entry = report["steps"]["perf"]
    assert entry["status"] == "incomplete" and entry["error"].startswith("out of time at perf from")
    assert json.loads((tmp_path / "gpucheck.json").read_text())["steps"]["perf"]["status"] == "incomplete"
    assert "== perf: incomplete" in (tmp_path / "gpucheck.log").read_text()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
def test_without_a_gpu_it_asks_for_the_dry_run(tmp_path: Path, capsys) -> None:
    assert gpucheck.main([str(tmp_path)]) == 2
    assert capsys.readouterr().err.strip() == "error: no CUDA device here; run with --dry for the CPU rehearsal"
    assert not (tmp_path / "gpucheck.json").exists()


def test_cuda_prints_the_unverified_warning_once_per_resolution(monkeypatch, capsys) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("cuda") == torch.device("cuda")
    assert capsys.readouterr().err == CUDA_UNVERIFIED + "\n"
    assert resolve_device("cpu") == torch.device("cpu")
    assert capsys.readouterr().err == ""


def test_perf_ctrl_c_says_nothing_was_written(monkeypatch, tmp_path: Path, capsys) -> None:
    def interrupted(args: object) -> int:
        raise KeyboardInterrupt

    monkeypatch.setattr(perf, "perf_command", interrupted)
    assert perf.main(["--json", str(tmp_path / "rows.json")]) == 130
    assert "nothing was written" in capsys.readouterr().err
    assert not (tmp_path / "rows.json").exists()


def test_json_numbers_stay_finite() -> None:
    assert gpucheck._num(math.inf) == "inf" and gpucheck._num(1.23456e-7) == 1.235e-07
