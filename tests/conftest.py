"""Shared fixtures: the offline data mirror and small trained models reused across test modules."""

from __future__ import annotations

import os
from pathlib import Path
from types import ModuleType

import pytest
import torch

_MIRROR = Path(__file__).resolve().parents[2] / "shared" / "data"
_DATASET_FOLDERS = {"mnist": Path("MNIST") / "raw", "cifar10": Path("cifar-10-batches-py")}


def data_root() -> Path:
    """The data folder for tests: $BENCH_DATA_DIR (CI prepares it) or the offline mirror beside the repo."""
    env = os.environ.get("BENCH_DATA_DIR")
    return Path(env) if env else _MIRROR


def in_ci() -> bool:
    """CI services set CI=true; there a missing dataset is a broken setup, not a reason to skip."""
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


def import_lirpa() -> ModuleType:
    """auto_LiRPA, or skip the calling module: it runs in its own environment (``tox -e lirpa``), which sets
    CERTBENCH_LIRPA so that a missing install fails there instead of skipping."""
    try:
        import auto_LiRPA
    except ImportError:
        if os.environ.get("CERTBENCH_LIRPA"):
            raise
        pytest.skip("auto_LiRPA runs in its own environment: tox -e lirpa", allow_module_level=True)
    return auto_LiRPA


def require_dataset(name: str) -> Path:
    """The data root if it holds ``name``; otherwise skip the test, or fail it under CI."""
    root = data_root()
    if not (root / _DATASET_FOLDERS[name]).is_dir():
        message = f"no {name} data under {root}; set BENCH_DATA_DIR"
        if in_ci():
            pytest.fail(f"{message} (CI=true: data tests may not be skipped)", pytrace=False)
        pytest.skip(message)
    return root


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """The data root holding MNIST."""
    return require_dataset("mnist")


@pytest.fixture(scope="session")
def cifar_data_dir() -> Path:
    """The data root holding CIFAR-10 (python batches)."""
    return require_dataset("cifar10")


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module of tiny models (thread hand-off would cost more than the work)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def float64():
    """float64 as the default dtype: auto_LiRPA 0.3 builds its identity specifications in the default dtype."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)
