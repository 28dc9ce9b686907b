"""`bench status` over local cell states, and the `--executor slurm` driver against a fake Slurm (sbatch, srun
and sacct on PATH as scripts): the sbatch script submitit writes from our options, the array's job ids, the
markers, and what status makes of sacct's answers. Nothing here trains."""

from __future__ import annotations

import os
import stat
import sys
from pathlib import Path

import pytest

from bench.cli import main
from bench.executors import JobMarker
from bench.lock import CellLock

CELLS = ["--suite", "mnist", "--scale", "smoke", "--methods", "ibp", "crown-ibp", "--eps", "0.1"]


def cell(out: Path, method: str) -> Path:
    return out / "smoke" / "mnist" / "mnist" / "eps_1-10" / method / "seed0"


def status(out: Path, capsys: pytest.CaptureFixture[str]) -> list[str]:
    assert main(["status", *CELLS, "--out", str(out)]) == 0
    return capsys.readouterr().out.splitlines()


def test_status_of_local_runs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "runs"
    partial = cell(out, "crown-ibp")
    partial.mkdir(parents=True)
    (partial / "checkpoint.pt").write_bytes(b"")
    (partial / "train_log.csv").write_text("epoch,loss\n0,1.0\n1,0.5\n")
    lines = status(out, capsys)
    assert lines[0].startswith("missing ") and "ibp seed 0" in lines[0]
    assert lines[1].startswith("partial ") and lines[1].endswith("(epoch 2 of 12)")
    assert lines[2].endswith("2 cells: 1 partial, 1 missing")
    assert not cell(out, "ibp").exists(), "status created a folder"

    with CellLock(partial):
        lines = status(out, capsys)
    assert lines[1].startswith("running ") and f"pid {os.getpid()}" in lines[1] and "epoch 2 of 12" in lines[1]


def _fake_slurm(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """sbatch records each submission and answers like Slurm; sacct prints ``sacct.txt``."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    scripts = {
        "sbatch": 'cp "$1" "$FAKE_SLURM/job.sh"; echo x >> "$FAKE_SLURM/calls"; echo "Submitted batch job 4242"',
        "srun": "exit 0",
        "sacct": 'cat "$FAKE_SLURM/sacct.txt"',
    }
    for name, body in scripts.items():
        path = bin_dir / name
        path.write_text(f"#!/bin/sh\n{body}\n")
        path.chmod(path.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_SLURM", str(tmp_path))
    return tmp_path


def test_slurm_driver_submits_one_array_and_status_asks_sacct(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    submitit = pytest.importorskip("submitit")
    fake = _fake_slurm(tmp_path, monkeypatch)
    out = tmp_path / "runs"
    run = ["run", *CELLS, "--out", str(out), "--data-dir", str(tmp_path), "--executor", "slurm",
           "--partition", "gpu", "--gpus-per-cell", "2", "--cpus-per-cell", "3", "--timeout-min", "30",
           "--array-parallelism", "1", "--slurm-arg", "account=proj"]
    assert main(run) == 0
    printed = capsys.readouterr().out.splitlines()
    assert [line.split("\t")[0] for line in printed] == ["4242_0", "4242_1"]
    script = (fake / "job.sh").read_text().splitlines()
    # Two GPUs per cell: two tasks, one per GPU, that train the cell together (bench.distributed).
    for flag in ("--array=0-1%1", "--partition=gpu", "--gpus-per-node=2", "--cpus-per-task=3", "--time=30",
                 "--account=proj", "--signal=USR2@90", "--nodes=1", "--ntasks-per-node=2"):
        assert f"#SBATCH {flag}" in script, flag
    markers = [JobMarker.read(cell(out, m)) for m in ("ibp", "crown-ibp")]
    assert [m.job for m in markers if m] == ["4242_0", "4242_1"]

    (fake / "sacct.txt").write_text("JobID|State|NodeList\n4242_0|PENDING|None assigned\n4242_1|RUNNING|n1\n")
    lines = status(out, capsys)
    assert lines[0].startswith("queued ") and lines[0].endswith("(job 4242_0)")
    assert lines[1].startswith("running ") and lines[1].endswith("(job 4242_1)")

    # A cell whose job is queued or running is not submitted twice.
    assert main(run) == 0
    assert "nothing to submit" in capsys.readouterr().err
    assert (fake / "calls").read_text().count("x") == 1

    submitit.SlurmJob.watcher.clear()
    (fake / "sacct.txt").write_text("JobID|State|NodeList\n4242_0|FAILED|n1\n4242_1|RUNNING|n1\n")
    Path(markers[0].log).parent.mkdir(parents=True, exist_ok=True)
    Path(markers[0].log).write_text("Traceback (most recent call last):\nRuntimeError: out of memory\n\n")
    lines = status(out, capsys)
    assert lines[0].startswith("failed ") and lines[0].endswith("(job 4242_0: RuntimeError: out of memory)")
    assert lines[2].endswith("2 cells: 1 running, 1 failed")


def test_slurm_executor_without_submitit_or_slurm(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    run = ["run", *CELLS, "--out", str(tmp_path / "runs"), "--executor", "slurm"]
    with monkeypatch.context() as m:
        m.setitem(sys.modules, "submitit", None)  # as if it were not installed
        assert main(run) == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        "error: --executor slurm/submitit-local needs submitit: pip install -e '.[slurm]'")

    pytest.importorskip("submitit")
    monkeypatch.setenv("PATH", str(tmp_path))  # no sbatch anywhere
    assert main(run) == 2
    assert capsys.readouterr().err.splitlines()[-1].startswith("error: --executor slurm needs Slurm on this machine")
