"""Nothing lost, nothing confusing: every bad input through ``python -m bench`` gets one line, a non-zero
exit and no traceback, and leaves every finished file byte-identical; overrides, locks, data checks and
reports behave as a user needs them to.

The finished cells here are written by ``finished_cell`` (a consistent record of the suite's own config),
so the tests need no training: what is under test is what the harness does with finished work.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bench.config import load_suite
from bench.lock import CellBusy, CellLock, holder
from bench.store import SCHEMA_VERSION, atomic_write_json, dump_config, format_eps, write_csv

from conftest import require_dataset

REPO = Path(__file__).resolve().parents[1]
CELL = ("mnist", "smoke", "linf-dist", "1/10")


def bench_cli(*args: str, cwd: Path | None = None, env: dict[str, str] | None = None
              ) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "bench", *args], cwd=cwd or REPO, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})})


def one_line_error(proc: subprocess.CompletedProcess[str]) -> str:
    """The single ``error:`` line a refused command prints last, after asserting it exited non-zero."""
    assert proc.returncode != 0, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = proc.stderr.strip().splitlines()
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0], proc.stderr
    return errors[0]


def cell_folder(out: Path, suite: str = "mnist", scale: str = "smoke", method: str = "linf-dist",
                eps: str = "1/10", seed: int = 0) -> Path:
    num, _, den = eps.partition("/")
    return out / scale / suite / suite / f"eps_{num}-{den or 1}" / method / f"seed{seed}"


def finished_cell(out: Path, suite: str = "mnist", scale: str = "smoke", method: str = "linf-dist",
                  eps: str = "1/10", n: int = 4, counts: tuple[int, int, int] = (3, 2, 1)) -> Path:
    """A consistent finished cell of the suite's own config: ``result.json``, ``verdicts.csv``, ``config.json``."""
    (cell,) = [c for c in load_suite(suite).cells(scale, [method], None, [0]) if format_eps(c.eps) == eps]
    folder = cell_folder(out, suite, scale, method, eps)
    clean, pgd, certified = counts
    rows = [[i, 0, int(i < clean), int(i < pgd), int(i < certified),
             "certified" if i < certified else "unknown" if i < pgd else "attacked"] for i in range(n)]
    write_csv(folder / "verdicts.csv", ["index", "label", "clean", "pgd", "certified", "verdict"], rows)
    config = {"cell": {"suite": suite, "dataset": cell.dataset, "eps": eps, "method": method, "variant": "",
                       "scale": scale, "seed": 0},
              "config": dump_config(cell.config), "scale_config": cell.scale.as_dict()}
    atomic_write_json(folder / "config.json", config)
    atomic_write_json(folder / "result.json", {
        "schema": SCHEMA_VERSION, "status": "complete", **config,
        "metrics": {"clean": clean / n, "pgd": pgd / n, "certified": certified / n},
        "counts": {"n": n, "clean": clean, "pgd": pgd, "certified": certified},
        "n_examples": n, "index_range": [0, n], "certifier": "linf-interval",
        "eps": {"test": eps, "train": str(cell.config["eps_train"])},
        "attack": {"name": "pgd", "steps": 10, "restarts": 1},
        "provenance": {"versions": {}, "device": "cpu", "device_name": "test", "threads": 1, "host": "test",
                       "started": "2026-01-01T00:00:00+00:00", "finished": "2026-01-01T00:00:00+00:00",
                       "timings_s": {"total": 1.0}},
        "files": {"verdicts": "verdicts.csv", "train_log": "train_log.csv", "config": "config.json"}})
    return folder


def snapshot(root: Path) -> dict[str, str]:
    """Every file below ``root`` and its hash (a cell's released, empty ``.lock`` is no finished file)."""
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and p.name != ".lock"}


@pytest.fixture()
def finished(tmp_path: Path) -> Path:
    out = tmp_path / "out"
    finished_cell(out)
    return out


# --- 2. --set never touches the suite recipe's result, and bad overrides are refused before any work ---

@pytest.mark.parametrize(("override", "needle"), [
    ("nosuchkey=3", "unknown config key 'nosuchkey'"),
    ("widht=8", "unknown config key 'widht' (did you mean 'width'?)"),
    ("width=1.5", "config key width must be an integer, got 1.5"),
    ("width=abc", "config key width must be an integer, got 'abc'"),
    ('lr="x"', "config key lr must be a number, got 'x'"),
    ("width=true", "config key width must be an integer, got True"),
    ("p_start_epoch=99", "p_start_epoch ≤ p_stop_epoch ≤ epochs"),
    ("eps_end_epoch=2", "no ε ramp for this loss: it divides the margins by 2ε"),
    ("=3", "--set expects key=value"),
])
def test_bad_overrides_are_refused_before_any_work(override: str, needle: str, finished: Path) -> None:
    before = snapshot(finished)
    proc = bench_cli("run", "--suite", "mnist", "--scale", "smoke", "--methods", "linf-dist", "--eps", "0.1",
                     "--set", override, "--out", str(finished))
    assert needle in one_line_error(proc)
    assert snapshot(finished) == before


def test_override_is_a_cell_of_its_own(finished: Path) -> None:
    before = snapshot(finished)
    proc = bench_cli("run", "--suite", "mnist", "--scale", "smoke", "--methods", "linf-dist", "--eps", "0.1",
                     "--set", "width=64", "--dry-run", "--out", str(finished))
    assert proc.returncode == 0, proc.stderr
    assert "missing  mnist ε=1/10 linf-dist+width=64 seed 0" in proc.stdout
    assert str(cell_folder(finished, method="linf-dist+width=64")) in proc.stdout
    same = bench_cli("run", "--suite", "mnist", "--scale", "smoke", "--methods", "linf-dist", "--eps", "0.1",
                     "--set", "width=128", "--dry-run", "--out", str(finished))
    assert "done     mnist ε=1/10 linf-dist seed 0" in same.stdout, "an override equal to the recipe is the recipe"
    assert snapshot(finished) == before


def test_stale_cell_is_kept_unless_asked(finished: Path) -> None:
    result = cell_folder(finished) / "result.json"
    record = json.loads(result.read_text())
    record["config"]["width"] = 999  # finished under another config (an older suite file)
    atomic_write_json(result, record)
    before = snapshot(finished)
    proc = bench_cli("run", "--suite", "mnist", "--scale", "smoke", "--methods", "linf-dist", "--eps", "0.1",
                     "--out", str(finished), "--data-dir", str(require_dataset("mnist")))
    assert proc.returncode == 0, proc.stderr
    assert "kept: finished under a different config (width differ); pass --replace-stale" in proc.stderr
    assert snapshot(finished) == before


# --- 3. one process per cell ---

def test_second_run_skips_a_cell_another_run_holds(finished: Path) -> None:
    folder = cell_folder(finished, eps="3/10")
    with CellLock(folder):
        assert holder(folder) is not None and holder(folder).pid == os.getpid()
        with pytest.raises(CellBusy, match=f"pid {os.getpid()}"):
            CellLock(folder).__enter__()
        proc = bench_cli("run", "--suite", "mnist", "--scale", "smoke", "--methods", "linf-dist",
                         "--out", str(finished))
        assert proc.returncode == 0, proc.stderr
        assert f"mnist ε=3/10 linf-dist seed 0: skipped, another run holds it (pid {os.getpid()}" in proc.stderr
        dry = bench_cli("run", "--suite", "mnist", "--scale", "smoke", "--methods", "linf-dist", "--dry-run",
                        "--out", str(finished))
        assert f"running  mnist ε=3/10 linf-dist seed 0  (pid {os.getpid()}" in dry.stdout
    assert holder(folder) is None


def test_lock_of_a_killed_run_is_recognised_as_stale(tmp_path: Path) -> None:
    folder = tmp_path / "cell"
    script = (f"import sys, time; sys.path.insert(0, {str(REPO)!r}); from bench.lock import CellLock; "
              f"lock = CellLock(__import__('pathlib').Path({str(folder)!r})).__enter__(); print('held', flush=True); "
              "time.sleep(60)")
    child = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == "held"
        assert holder(folder) is not None and holder(folder).pid == child.pid
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
    finally:
        child.kill()
    assert holder(folder) is None
    with CellLock(folder) as lock:
        assert lock.stale is not None and lock.stale.pid == child.pid
    with CellLock(folder) as lock:
        assert lock.stale is None, "a clean release is not stale"


# --- 4. data: corrupt files are called corrupt, caches are tied to their sources ---

def _mnist_copy(tmp_path: Path) -> Path:
    root = tmp_path / "data"
    shutil.copytree(require_dataset("mnist") / "MNIST", root / "MNIST")
    return root


def test_truncated_gz_in_a_read_only_folder_is_corrupt_not_a_stale_cache(tmp_path: Path) -> None:
    env = {"XDG_CACHE_HOME": str(tmp_path / "cache"), "BENCH_OFFLINE": "1"}
    folders = []
    for name in ("good", "bad"):
        root = _mnist_copy(tmp_path / name)
        if name == "bad":
            gz = root / "MNIST" / "raw" / "train-images-idx3-ubyte.gz"
            gz.write_bytes(gz.read_bytes()[:1000])
        for path in [root, *root.rglob("*")]:
            path.chmod(path.stat().st_mode & ~0o222)
        folders.append(root)
    good, bad = folders
    load = [sys.executable, "-c", "from bench.data import load_split; from pathlib import Path; "
            f"load_split('mnist', False, Path({str(good)!r}))"]
    assert subprocess.run(load, env={**os.environ, **env}, cwd=REPO, capture_output=True).returncode == 0
    assert (tmp_path / "cache" / "certbench" / "mnist-extracted" / "MNIST" / "raw" / "source.json").is_file()
    proc = bench_cli("run", "--suite", "mnist", "--scale", "smoke", "--methods", "linf-dist", "--eps", "0.1",
                     "--data-dir", str(bad), "--out", str(tmp_path / "o"), env=env)
    assert f"MNIST file {bad / 'MNIST' / 'raw' / 'train-images-idx3-ubyte.gz'} is corrupt" in one_line_error(proc)


def test_truncated_extracted_mnist_is_corrupt(tmp_path: Path) -> None:
    root = tmp_path / "data"
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    (raw / "t10k-labels-idx1-ubyte").write_bytes(b"\0" * 100)
    proc = bench_cli("run", "--suite", "mnist", "--scale", "smoke", "--methods", "linf-dist", "--eps", "0.1",
                     "--data-dir", str(root), "--out", str(tmp_path / "o"), env={"BENCH_OFFLINE": "1"})
    assert "t10k-labels-idx1-ubyte is corrupt (100 bytes, expected 10008)" in one_line_error(proc)


def test_truncated_cifar_batch_is_corrupt(tmp_path: Path) -> None:
    source = require_dataset("cifar10") / "cifar-10-batches-py"
    folder = tmp_path / "data" / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    for path in source.iterdir():
        (folder / path.name).symlink_to(path)
    (folder / "data_batch_3").unlink()
    (folder / "data_batch_3").write_bytes((source / "data_batch_3").read_bytes()[:5000])
    proc = bench_cli("run", "--suite", "cifar", "--scale", "smoke", "--methods", "linf-dist", "--eps", "2/255",
                     "--data-dir", str(tmp_path / "data"), "--out", str(tmp_path / "o"), env={"BENCH_OFFLINE": "1"})
    assert "data_batch_3 is corrupt (size 5000 bytes, md5 mismatch)" in one_line_error(proc)


# --- 5. reports name what they cannot show and refuse impossible numbers ---

def test_report_marks_corrupt_and_impossible_results(finished: Path) -> None:
    other = finished_cell(finished, eps="3/10")
    ok = bench_cli("report", "--out", str(finished), "--format", "md")
    assert ok.returncode == 0, ok.stderr
    assert "NOT SHOWN" not in ok.stdout
    (other / "result.json").write_text("{ truncated")
    edited = cell_folder(finished) / "result.json"
    record = json.loads(edited.read_text())
    record["metrics"]["certified"] = 0.9  # above clean 0.75: what an unsound certifier or a hand edit gives
    atomic_write_json(edited, record)
    proc = bench_cli("report", "--out", str(finished), "--format", "md,html")
    assert proc.returncode != 0 and "Traceback" not in proc.stderr  # nothing usable is left to show
    assert "eps_3-10/linf-dist/seed0/result.json: corrupt result file" in proc.stderr
    assert "metrics.certified = 0.9 is not counts.certified = 1 over n = 4" in proc.stderr
    finished_cell(finished)
    proc = bench_cli("report", "--out", str(finished), "--format", "md,html")
    assert proc.returncode == 0, proc.stderr
    page = (finished / "smoke" / "mnist" / "report.md").read_text()
    assert "NOT SHOWN: 1 unusable result file: smoke/mnist/mnist/eps_3-10/linf-dist/seed0/result.json" in page
    assert "NOT SHOWN" in (finished / "smoke" / "mnist" / "report.html").read_text()


def test_verdict_file_must_match_its_record(finished: Path) -> None:
    verdicts = cell_folder(finished) / "verdicts.csv"
    verdicts.write_text(verdicts.read_text().replace("0,0,1,1,1,certified", "0,0,1,1,0,unknown"))
    proc = bench_cli("report", "--out", str(finished), "--format", "md")
    assert "counts {'clean': 3, 'pgd': 2, 'certified': 0}, the record says" in proc.stderr


def test_report_on_a_read_only_folder(finished: Path) -> None:
    for path in [finished, *finished.rglob("*")]:
        if path.is_dir():
            path.chmod(0o555)
    try:
        before = snapshot(finished)
        proc = bench_cli("report", "--out", str(finished))
        assert "is read-only" in one_line_error(proc)
        assert snapshot(finished) == before
    finally:
        for path in [finished, *finished.rglob("*")]:
            if path.is_dir():
                path.chmod(0o755)


# --- 6. suite files given as a path ---

SUITE_TOP = {"dataset": '"mnist"', "eps": '["1/10"]', "methods": '["linf-dist"]'}
SMOKE_SCALE = """
[scales.smoke]
description = "tiny"
train_examples = 100
test_range = [0, 10]
pgd_steps = 1
pgd_restarts = 1
eval_batch_size = 10
"""


def write_suite(folder: Path, top: dict[str, str], scales: str = SMOKE_SCALE) -> Path:
    folder.mkdir(parents=True)
    shutil.copy(REPO / "bench" / "suites" / "mnist" / "linf-dist.toml", folder)
    (folder / "suite.toml").write_text("".join(f"{k} = {v}\n" for k, v in top.items()) + scales)
    return folder


@pytest.mark.parametrize(("top", "scales", "needle"), [
    ({"scales": "3"}, "", "scales must be a table of scales, got 3"),
    ({"methods": '"linf-dist"'}, SMOKE_SCALE, "methods must be a non-empty list, got 'linf-dist'"),
    ({"methods": "[]"}, SMOKE_SCALE, "methods must be a non-empty list, got []"),
    ({"methods": "[3]"}, SMOKE_SCALE, "methods must be a list of method names, got [3]"),
    ({"dataset": '"svhn"'}, SMOKE_SCALE, "unknown dataset 'svhn'"),
    ({"colour": "1"}, SMOKE_SCALE, "unknown key 'colour'"),
    ({}, SMOKE_SCALE.replace("[0, 10]", "[0]"), "scales.smoke.test_range must be [start, stop] (two integers), got [0]"),
    ({}, SMOKE_SCALE.replace("pgd_steps = 1", "pgd_steps = true"), "scales.smoke.pgd_steps must be int, got True"),
])
def test_bad_suite_files(top: dict[str, str], scales: str, needle: str, tmp_path: Path) -> None:
    suite = write_suite(tmp_path / "mysuite", {**SUITE_TOP, **top}, scales)
    proc = bench_cli("run", "--suite", str(suite), "--scale", "smoke", "--dry-run", "--out", str(tmp_path / "o"))
    assert needle in one_line_error(proc)


def test_a_suite_path_keeps_the_results_layout(tmp_path: Path) -> None:
    suite = write_suite(tmp_path / "mysuite", SUITE_TOP)
    proc = bench_cli("run", "--suite", str(suite), "--scale", "smoke", "--dry-run", "--out", str(tmp_path / "o"))
    assert proc.returncode == 0, proc.stderr
    assert f"-> {tmp_path / 'o' / 'smoke' / 'mysuite' / 'mnist'}" in proc.stdout
    relative = bench_cli("run", "--suite", "../bench/suites/mnist", "--scale", "smoke", "--methods", "linf-dist",
                         "--dry-run", "--out", str(tmp_path / "o"), cwd=REPO / "tests")
    assert relative.returncode == 0, relative.stderr
    assert f"-> {tmp_path / 'o' / 'smoke' / 'mnist' / 'mnist'}" in relative.stdout
    assert "no suite.toml there" in one_line_error(bench_cli("run", "--suite", str(tmp_path), "--dry-run"))


# --- 7 and 8. seeds, names, certifiers, estimates, progress, modes ---

@pytest.mark.parametrize(("seeds", "needle"), [
    ("0-100000000", "asks for more than 1000 seeds"),
    ("", "--seeds expects N, A-B or a comma list"),
    ("5-2", "--seeds range 5-2 is empty: write A-B with A ≤ B"),
    ("-1", "--seeds expects N, A-B or a comma list"),
    ("1,,2", "--seeds expects N, A-B or a comma list"),
])
def test_bad_seeds_fail_at_once(seeds: str, needle: str, tmp_path: Path) -> None:
    start = time.monotonic()
    proc = bench_cli("run", "--suite", "mnist", "--seeds", seeds, "--dry-run", "--out", str(tmp_path))
    assert needle in one_line_error(proc)
    assert time.monotonic() - start < 60


def test_unknown_certifier_lists_the_known(tmp_path: Path) -> None:
    proc = bench_cli("run", "--suite", "mnist", "--certifier", "nope", "--dry-run", "--out", str(tmp_path))
    assert "unknown certifier 'nope'; known: alpha-crown, crown, crown-ibp, ibp, linf-interval, milp" in one_line_error(proc)


def test_every_verb_takes_out_and_results(finished: Path) -> None:
    for flag in ("--out", "--results"):
        assert bench_cli("report", flag, str(finished), "--format", "md").returncode == 0
        assert bench_cli("run", "--suite", "mnist", "--scale", "smoke", "--methods", "linf-dist", "--eps", "0.1",
                         flag, str(finished)).returncode == 0
        check = bench_cli("check", "--baseline", str(finished / "none.json"), flag, str(finished))
        assert "none.json" in one_line_error(check)


def test_default_out_is_the_users_own_folder(tmp_path: Path) -> None:
    proc = bench_cli("run", "--suite", "mnist", "--scale", "smoke", "--methods", "linf-dist", "--dry-run",
                     cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "missing  mnist ε=1/10 linf-dist seed 0  -> runs/smoke/mnist/mnist/eps_1-10/linf-dist/seed0" in proc.stdout


def test_result_files_follow_the_umask(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        atomic_write_json(tmp_path / "r.json", {})
    finally:
        os.umask(old)
    assert (tmp_path / "r.json").stat().st_mode & 0o777 == 0o644


def test_dry_run_counts_the_epochs_a_partial_cell_has_done(tmp_path: Path) -> None:
    folder = cell_folder(tmp_path)
    write_csv(folder / "train_log.csv", ["epoch", "loss"], [[e, 1.0] for e in range(7)])
    (folder / "checkpoint.pt").write_bytes(b"")
    proc = bench_cli("run", "--suite", "mnist", "--scale", "smoke", "--methods", "linf-dist", "--eps", "0.1",
                     "--dry-run", "--out", str(tmp_path))
    assert "partial  mnist ε=1/10 linf-dist seed 0  (7 epochs done)" in proc.stdout


def test_estimate_leaves_out_finished_epochs(monkeypatch: pytest.MonkeyPatch) -> None:
    """Seconds per step × the steps left, plus the evaluation: with every timing fixed at 1 s, each finished
    epoch takes exactly its steps off (real timings, three measurements apart, are too noisy to order)."""
    import torch

    from bench import estimate

    monkeypatch.setattr(estimate, "_timed", lambda fn: (fn(), 1.0)[1])
    (cell,) = load_suite("mnist").cells("smoke", ["linf-dist"], [load_suite("mnist").eps[0]], [0],
                                        {"width": 16, "depth": 2})
    epochs, n_train = int(cell.config["epochs"]), 256
    steps = -(-n_train // min(int(cell.config["batch_size"]), n_train))
    fresh = estimate.estimate_seconds(cell, torch.device("cpu"), n_train)
    nearly_done = estimate.estimate_seconds(cell, torch.device("cpu"), n_train, epochs - 1)
    finished = estimate.estimate_seconds(cell, torch.device("cpu"), n_train, epochs)
    assert fresh - nearly_done == pytest.approx(steps * (epochs - 1), abs=1e-9)
    assert nearly_done - finished == pytest.approx(steps, abs=1e-9)
    assert finished > 0  # the evaluation still has to run


def test_estimate_of_a_stale_cell_counts_its_whole_retraining(tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """A stale cell's train_log.csv is its old training's: --replace-stale retrains it from epoch 0."""
    import torch

    import bench.estimate
    from bench import runner

    (cell,) = load_suite("mnist").cells("smoke", ["linf-dist"], [load_suite("mnist").eps[0]], [0], {})
    write_csv(runner.cell_folder(cell, tmp_path) / "train_log.csv", ["epoch", "loss"], [[e, 1.0] for e in range(30)])
    asked: list[int] = []
    monkeypatch.setattr(bench.estimate, "estimate_seconds", lambda c, d, n, done=0: asked.append(done) or 1.0)
    for state, done in (("stale", 0), ("partial", 30)):
        runner._dry_run([cell], {cell: state}, tmp_path, torch.device("cpu"), True)
        assert asked.pop() == done


def test_a_closed_pipe_is_no_traceback() -> None:
    proc = subprocess.Popen([sys.executable, "-m", "bench", "list"], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.stdout is not None
    proc.stdout.close()  # the reader is gone before the first line is written, as `| head` may be
    _, err = proc.communicate(timeout=120)
    assert "Traceback" not in err.decode() and "BrokenPipeError" not in err.decode()
    assert proc.returncode == 141
