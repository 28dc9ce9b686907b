"""Killing `bench run` at any moment loses nothing: the resumed cell ends exactly where an uninterrupted
run with the same seed ends, and no file is ever left half-written."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bench.store import load_result

pytestmark = pytest.mark.slow
# Enough epochs that, however fast the machine, the kill after the first one lands mid-training.
EPOCHS = 12
TINY = ["--set", "width=48", "--set", "depth=3", "--set", f"epochs={EPOCHS}", "--set", "p_start_epoch=2",
        "--set", "p_stop_epoch=10"]


def command(out: Path, data_dir: Path) -> list[str]:
    return [sys.executable, "-m", "bench", "run", "--suite", "mnist", "--scale", "smoke", "--methods", "linf-dist",
            "--eps", "0.1", "--data-dir", str(data_dir), "--out", str(out), "--no-progress", *TINY]


def folder(out: Path) -> Path:
    # The --set overrides make a variant cell: a folder of its own beside the suite recipe's.
    variant = "linf-dist+depth=3,epochs=12,p_start_epoch=2,p_stop_epoch=10,width=48"
    return out / "smoke" / "mnist" / "mnist" / "eps_1-10" / variant / "seed0"


def _default_sigint() -> None:
    # A job started in the background of a non-interactive shell (nohup ... &) inherits SIGINT ignored, and
    # Python then never raises KeyboardInterrupt; a user's Ctrl-C is what this test stands for.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def start(out: Path, data_dir: Path) -> subprocess.Popen[bytes]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(command(out, data_dir), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            preexec_fn=_default_sigint)


def wait_for_epochs(out: Path, proc: subprocess.Popen[bytes], epochs: int, timeout: float = 300) -> None:
    log = folder(out) / "train_log.csv"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if log.exists() and len(log.read_text().splitlines()) > epochs:
            return
        if proc.poll() is not None:
            pytest.fail(f"run ended early: {proc.stderr.read().decode() if proc.stderr else ''}")
        time.sleep(0.05)
    pytest.fail("training did not reach the epoch in time")


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT], ids=["SIGKILL", "SIGINT"])
def test_interrupted_cell_resumes_to_identical_metrics(sig: signal.Signals, tmp_path: Path, data_dir: Path) -> None:
    reference = tmp_path / "uninterrupted"
    proc = start(reference, data_dir)
    assert proc.wait(timeout=600) == 0

    resumed = tmp_path / "resumed"
    proc = start(resumed, data_dir)
    wait_for_epochs(resumed, proc, 1)
    proc.send_signal(sig)
    code = proc.wait(timeout=120)
    assert code != 0
    cell = folder(resumed)
    assert (cell / "checkpoint.pt").exists() and not (cell / "result.json").exists()
    interrupted_epochs = len((cell / "train_log.csv").read_text().splitlines()) - 1
    assert 1 <= interrupted_epochs < EPOCHS

    proc = start(resumed, data_dir)
    assert proc.wait(timeout=600) == 0
    stderr = proc.stderr.read().decode() if proc.stderr else ""
    assert "resuming" in stderr
    assert not list(cell.glob(".*.tmp")), "a temporary file was left behind"
    a = load_result(folder(reference) / "result.json").record
    b = load_result(cell / "result.json").record
    assert a["metrics"] == b["metrics"] and a["counts"] == b["counts"]
    assert (folder(reference) / "verdicts.csv").read_text() == (cell / "verdicts.csv").read_text()
    log_a = (folder(reference) / "train_log.csv").read_text().splitlines()
    log_b = (cell / "train_log.csv").read_text().splitlines()
    assert len(log_a) == len(log_b) == EPOCHS + 1
    # Losses per epoch agree exactly (wall times differ).
    loss = log_a[0].split(",").index("loss")
    assert [r.split(",")[loss] for r in log_a[1:]] == [r.split(",")[loss] for r in log_b[1:]]
    assert json.loads((cell / "config.json").read_text())["config"]["epochs"] == EPOCHS
