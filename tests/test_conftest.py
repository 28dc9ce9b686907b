"""The data fixtures skip where a dataset is missing, except under CI (CI=true), where they fail."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

CONFTEST = Path(__file__).with_name("conftest.py")


@pytest.mark.parametrize(("ci", "outcome"), [("", "1 skipped"), ("true", "1 error")])
def test_missing_dataset_skips_locally_and_fails_in_ci(tmp_path: Path, ci: str, outcome: str) -> None:
    shutil.copyfile(CONFTEST, tmp_path / "conftest.py")
    (tmp_path / "test_needs_data.py").write_text("def test_needs_data(data_dir):\n    pass\n")
    env = {**os.environ, "CI": ci, "BENCH_DATA_DIR": str(tmp_path / "no-data")}
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-o", "addopts=",
                          str(tmp_path)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert outcome in run.stdout, run.stdout
    assert (run.returncode == 0) == (ci == ""), run.stdout
