"""Cells as jobs through submitit, and `bench status`.

``--executor submitit-local`` runs each cell as a real subprocess job: the submitted pickle, the job process,
submitit's signal handling and requeue are the Slurm path's, only ``sbatch``/``scontrol`` are not. A fake
``sbatch``/``srun``/``sacct`` on PATH covers the Slurm driver up to the scheduler (the sbatch script, array
ids, markers, what status reads from sacct). What only a real cluster can show is listed in the README
("Beyond one machine").
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from bench.cli import main
from bench.lock import holder
from bench.store import load_result

submitit = pytest.importorskip("submitit")

pytestmark = pytest.mark.slow
EPOCHS = 4
# Three clean epochs, then one ε ramp epoch: cheap, the model learns (about 80 % clean, 7 % certified at
# ε = 1/20), and the signals sent after the first epoch land mid-training however fast the machine is.
TINY = ["--set", f"epochs={EPOCHS}", "--set", "ramp_start=3", "--set", "ramp_epochs=1", "--set", "eps_train=0.05"]
METHODS = ("ibp", "crown-ibp")
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def run_args(out: Path, data_dir: Path, *extra: str) -> list[str]:
    return ["run", "--suite", "mnist", "--scale", "smoke", "--methods", *METHODS, "--eps", "1/20", "--data-dir",
            str(data_dir), "--out", str(out), "--no-progress", *TINY, *extra]


def bench(*args: str) -> list[str]:
    return [sys.executable, "-m", "bench", *args]


def folder(out: Path, method: str) -> Path:
    return (out / "smoke" / "mnist" / "mnist" / "eps_1-20" / f"{method}+epochs={EPOCHS},eps_train=0.05,ramp_epochs=1,"
            "ramp_start=3" / "seed0")


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory, data_dir: Path) -> Path:
    """Both cells run by the in-process loop (`--executor local`), one thread as the jobs have."""
    out = tmp_path_factory.mktemp("in-process")
    subprocess.run(bench(*run_args(out, data_dir)), env=ENV, check=True, stdout=subprocess.DEVNULL)
    return out


def logged(cell: Path) -> list[list[str]]:
    """Every value of every epoch in the cell's log but its timings (epoch, wall_s, batches_per_s first)."""
    return [row.split(",")[3:] for row in (cell / "train_log.csv").read_text().splitlines()]


def assert_same_cell(a: Path, b: Path) -> None:
    ra, rb = load_result(a / "result.json").record, load_result(b / "result.json").record
    assert ra["metrics"] == rb["metrics"] and ra["counts"] == rb["counts"]
    assert (a / "verdicts.csv").read_text() == (b / "verdicts.csv").read_text()
    assert logged(a) == logged(b)
    ma = torch.load(a / "model.pt", weights_only=True)
    mb = torch.load(b / "model.pt", weights_only=True)
    assert ma.keys() == mb.keys() and all(torch.equal(ma[k], mb[k]) for k in ma)


def status_lines(out: Path, capsys: pytest.CaptureFixture[str]) -> list[str]:
    assert main(["status", "--suite", "mnist", "--scale", "smoke", "--methods", *METHODS, "--eps", "1/20",
                 "--out", str(out), *TINY]) == 0
    return capsys.readouterr().out.splitlines()


def test_jobs_give_the_in_process_results(reference: Path, tmp_path: Path, data_dir: Path,
                                          monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the jobs' environment is this process's
    out = tmp_path / "jobs"
    assert main(run_args(out, data_dir, "--executor", "submitit-local", "--gpus-per-cell", "0", "--wait")) == 0
    printed = capsys.readouterr().out
    job_lines = [line.split("\t") for line in printed.splitlines() if "\t" in line]
    assert len(job_lines) == 2 and all(job.isdigit() for job, _ in job_lines)
    assert "| MNIST" in printed  # --wait prints the table
    for method in METHODS:
        assert_same_cell(folder(reference, method), folder(out, method))
    assert status_lines(out, capsys)[-1].endswith("2 cells: 2 done")

    # Finished cells are never resubmitted.
    assert main(run_args(out, data_dir, "--executor", "submitit-local")) == 0
    captured = capsys.readouterr()
    assert "nothing to submit" in captured.err and "\t" not in captured.out


def job_logs(out: Path) -> list[str]:
    return [p.read_text() for p in (out / ".submitit").glob("*_log.err")]


def _signal_after_first_epoch(cells: dict[str, Path], send: dict[str, list[signal.Signals]],
                              driver: subprocess.Popen[str], timeout: float = 600) -> None:
    """Signal each cell's job process (the cell lock's holder) once its first epoch is logged."""
    pending = dict(cells)
    deadline = time.monotonic() + timeout
    while pending and time.monotonic() < deadline:
        for method, cell in list(pending.items()):
            log, who = cell / "train_log.csv", holder(cell)
            if who is not None and log.exists() and len(log.read_text().splitlines()) > 1:
                for sig in send[method]:
                    os.kill(who.pid, sig)
                    time.sleep(0.5)
                del pending[method]
        assert driver.poll() is None, "the jobs ended before they could be signalled"
        time.sleep(0.05)
    assert not pending, f"no first epoch in time for {', '.join(pending)}"


def test_killed_and_preempted_jobs_resume_to_identical_results(reference: Path, tmp_path: Path, data_dir: Path,
                                                               monkeypatch: pytest.MonkeyPatch,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "jobs"
    cells = {m: folder(out, m) for m in METHODS}
    jobs = run_args(out, data_dir, "--executor", "submitit-local", "--gpus-per-cell", "0", "--wait")
    driver = subprocess.Popen(bench(*jobs), env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    # ibp's job is killed outright (a lost node); crown-ibp's gets what Slurm sends before a preemption or the
    # time limit: SIGTERM, which submitit ignores, then its checkpoint signal (USR2 unless configured).
    preempt = signal.Signals(getattr(signal, "SIG" + os.environ.get("SUBMITIT_PREEMPT_SIGNAL", "USR2")))
    _signal_after_first_epoch(cells, {"ibp": [signal.SIGKILL], "crown-ibp": [signal.SIGTERM, preempt]}, driver)
    _, stderr = driver.communicate(timeout=900)
    assert driver.returncode == 1, stderr
    assert "failed" in stderr and "ibp+" in stderr

    killed = cells["ibp"]
    assert (killed / "checkpoint.pt").exists() and not (killed / "result.json").exists()
    epochs = len((killed / "train_log.csv").read_text().splitlines()) - 1
    assert 1 <= epochs < EPOCHS
    crown_log = next(text for text in job_logs(out) if "crown-ibp+" in text)
    for line in ("Bypassing signal SIGTERM", f"Caught signal {preempt.name}", "requeued by submitit",
                 "resuming mnist ε=1/20 crown-ibp+"):
        assert line in crown_log, line
    assert_same_cell(folder(reference, "crown-ibp"), cells["crown-ibp"])

    status = status_lines(out, capsys)
    assert status[0].startswith("failed") and f"epoch {epochs} of {EPOCHS}" in status[0]
    assert status[1].startswith("done")

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert main(jobs) == 0
    assert len([line for line in capsys.readouterr().out.splitlines() if "\t" in line]) == 1  # not crown-ibp
    assert any("resuming mnist ε=1/20 ibp+" in text for text in job_logs(out))
    assert_same_cell(folder(reference, "ibp"), killed)
