"""Shared fixtures: the offline data mirror and small trained models reused across test modules."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

_MIRROR = Path(__file__).resolve().parents[2] / "shared" / "data"


def data_root() -> Path:
    """The data folder for tests: $BENCH_DATA_DIR (CI prepares it) or the offline mirror beside the repo."""
    env = os.environ.get("BENCH_DATA_DIR")
    return Path(env) if env else _MIRROR


@pytest.fixture(scope="session")
def data_dir() -> Path:
    root = data_root()
    if not (root / "MNIST" / "raw").is_dir():
        pytest.skip(f"no MNIST data under {root}; set BENCH_DATA_DIR")
    return root


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module of tiny models (thread hand-off would cost more than the work)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
