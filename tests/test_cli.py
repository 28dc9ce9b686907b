"""Bad input gets one clear line on stderr and a non-zero exit, and never touches finished results."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

import bench
from bench.cli import main
from bench.errors import BenchError

SMOKE = ["--scale", "smoke", "--no-progress"]


def one_line_error(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and err.splitlines()[-1] == errors[0], err
    return errors[0]


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--suite", "nope"], "unknown suite 'nope'"),
        (["--suite", "mnist", "--methods", "nope"], "unknown method 'nope'"),
        (["--suite", "mnist", "--scale", "huge"], "unknown scale 'huge'"),
        (["--suite", "mnist", "--eps", "0"], "out of range"),
        (["--suite", "mnist", "--eps", "1.5"], "out of range"),
        (["--suite", "mnist", "--eps", "abc"], "not a number"),
        (["--suite", "mnist", "--seeds", "x"], "--seeds"),
        (["--suite", "mnist", "--device", "tpu"], "unknown device"),
    ],
)
def test_bad_arguments(args: list[str], needle: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", *args, "--out", str(tmp_path), "--no-progress"]) == 2
    assert needle in one_line_error(capsys)


def test_missing_data_offline_names_files_and_variable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("BENCH_OFFLINE", "1")
    empty = tmp_path / "empty"
    empty.mkdir()
    code = main(["run", "--suite", "mnist", *SMOKE, "--methods", "linf-dist", "--eps", "0.1",
                 "--data-dir", str(empty), "--out", str(tmp_path / "out")])
    assert code == 2
    err = one_line_error(capsys)
    assert "train-images-idx3-ubyte.gz" in err and "BENCH_DATA_DIR" in err


def test_unwritable_output(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    assert main(["run", "--suite", "mnist", *SMOKE, "--methods", "linf-dist", "--out", str(blocker / "x")]) == 2
    assert "not writable" in one_line_error(capsys)


@pytest.mark.slow
def test_corrupt_files_never_lose_finished_results(tmp_path: Path, data_dir: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    base = ["run", "--suite", "mnist", *SMOKE, "--methods", "linf-dist", "--data-dir", str(data_dir),
            "--out", str(out)]
    assert main([*base, "--eps", "0.1"]) == 0
    assert re.search(r"  epoch (\d+)/\1: loss", capsys.readouterr().err), "--no-progress hides bars, not epoch lines"
    done = out / "smoke" / "mnist" / "mnist" / "eps_1-10" / "linf-dist" / "seed0"
    finished = done / "result.json"
    snapshot = finished.read_bytes()

    # A corrupt model file is a one-line error when loaded, and the finished record stays as it was.
    shutil.copy(done / "model.pt", tmp_path / "model.bak")
    (done / "model.pt").write_bytes(b"\x00garbage")
    with pytest.raises(BenchError, match="corrupt"):
        bench.load_model(done)
    shutil.copy(tmp_path / "model.bak", done / "model.pt")

    # A corrupt checkpoint of another cell is reported and that cell retrains; the finished one is untouched.
    partial = out / "smoke" / "mnist" / "mnist" / "eps_3-10" / "linf-dist" / "seed0"
    partial.mkdir(parents=True)
    (partial / "checkpoint.pt").write_bytes(b"truncated")
    capsys.readouterr()
    assert main([*base, "--eps", "0.1", "0.3"]) == 0
    err = capsys.readouterr().err
    assert "unreadable checkpoint" in err
    assert (partial / "result.json").is_file() and not (partial / "checkpoint.pt").exists()
    assert finished.read_bytes() == snapshot

    # A corrupt result file is reported and its cell re-run, never shown as a number.
    finished.write_text("{ not json")
    assert main([*base, "--eps", "0.1"]) == 0
    assert "its result file is unreadable: re-running the cell" in capsys.readouterr().err
    assert bench.store.load_result(finished).record["status"] == "complete"
