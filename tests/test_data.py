"""Data loading from a read-only mirror: never written to, corrupt files named, extraction cached."""

from __future__ import annotations

import gzip
import os
import shutil
import stat
from pathlib import Path
from typing import Iterator

import pytest

from bench.data import EXPECTED_FILES, load_split
from bench.errors import BenchError


def _read_only_copy(src: Path, dst: Path) -> Path:
    """A copy of the MNIST .gz files in a folder tree with every write bit cleared (as the CI mirror)."""
    for rel in EXPECTED_FILES["mnist"]:
        (dst / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src / rel, dst / rel)
    for folder in (dst / "MNIST" / "raw", dst / "MNIST", dst):
        for child in folder.iterdir():
            if child.is_file():
                child.chmod(stat.S_IRUSR | stat.S_IRGRP | stat.S_IROTH)
        folder.chmod(stat.S_IRUSR | stat.S_IXUSR | stat.S_IRGRP | stat.S_IXGRP)
    return dst


def _listing(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


@pytest.fixture()
def mirror(tmp_path: Path, data_dir: Path) -> Iterator[Path]:
    root = _read_only_copy(data_dir, tmp_path / "mirror")
    yield root
    for folder in (root, root / "MNIST", root / "MNIST" / "raw"):
        folder.chmod(stat.S_IRWXU)


def test_read_only_mirror_is_never_written_even_as_root(mirror: Path, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BENCH_OFFLINE", "1")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    before = _listing(mirror)
    test = load_split("mnist", train=False, root=mirror)
    assert len(test) == 10000 and test.images.shape == (10000, 1, 28, 28)
    assert _listing(mirror) == before
    assert (tmp_path / "cache" / "certbench" / "mnist-extracted" / "MNIST" / "raw" / "t10k-images-idx3-ubyte").is_file()


def test_corrupt_archive_is_a_clear_error(tmp_path: Path, data_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BENCH_OFFLINE", "1")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    root = tmp_path / "data"
    for rel in EXPECTED_FILES["mnist"]:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(data_dir / rel, root / rel)
    with gzip.open(root / EXPECTED_FILES["mnist"][2], "wb") as f:
        f.write(os.urandom(64))
    with pytest.raises(BenchError, match="t10k-images-idx3-ubyte.gz is corrupt"):
        load_split("mnist", train=False, root=root)
