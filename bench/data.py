"""MNIST and CIFAR-10 as in-memory uint8 tensors, with batched augmentation on the training device.

Where the data lives: ``--data-dir``, else ``$BENCH_DATA_DIR``, else ``$XDG_CACHE_HOME/certbench/data``
(``~/.cache/certbench/data``). torchvision reads the official files from there, downloading them when
they are missing and the machine is online. A read-only data dir is never written to: MNIST's ``.gz``
files (which torchvision must extract) are then copied to a writable cache and extracted there.

Everything the harness hands to a method is in **pixel space**: float32 in [0, 1], (B, C, H, W).
Normalisation belongs to each method's model. Augmentation (random crop after padding, horizontal flip)
is done per batch with tensor ops, so it runs on the GPU when training does; its randomness comes from a
generator seeded by (seed, epoch), so a resumed run sees exactly the batches an uninterrupted one would.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
import torch.nn.functional as F

from bench.errors import BenchError
from bench.store import writable
from methods.base import Augmentation, DatasetInfo

DATASETS: dict[str, DatasetInfo] = {
    "mnist": DatasetInfo("mnist", 10, (1, 28, 28), (0.1307,), 60000),
    "cifar10": DatasetInfo("cifar10", 10, (3, 32, 32), (0.4914, 0.4822, 0.4465), 50000),
}
DISPLAY_NAMES = {"mnist": "MNIST", "cifar10": "CIFAR-10"}
EXPECTED_FILES = {
    "mnist": [f"MNIST/raw/{n}.gz" for n in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
                                             "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")],
    "cifar10": [f"cifar-10-batches-py/{n}" for n in ("data_batch_1", "data_batch_2", "data_batch_3",
                                                      "data_batch_4", "data_batch_5", "test_batch",
                                                      "batches.meta")],
}


# The md5 sums torchvision checks when it downloads (the same as in ../shared/data/README.md).
SOURCE_MD5 = {
    "MNIST/raw/train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
    "MNIST/raw/train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
    "MNIST/raw/t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
    "MNIST/raw/t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
    "cifar-10-batches-py/data_batch_1": "c99cafc152244af753f735de768cd75f",
    "cifar-10-batches-py/data_batch_2": "d4bba439e000b95fd0a9bffe97cbabec",
    "cifar-10-batches-py/data_batch_3": "54ebc095f3ab1f0389bbae665268c751",
    "cifar-10-batches-py/data_batch_4": "634d18415352ddfa80567beed471001a",
    "cifar-10-batches-py/data_batch_5": "482c414d41f54cd18b22e5b47cb7c3cb",
    "cifar-10-batches-py/test_batch": "40351d587109b95175f43aff81a1287e",
    "cifar-10-batches-py/batches.meta": "5ff9c542aee3614f3951f8cda6e48888",
}
MNIST_EXTRACTED_SIZE = {
    # idx headers + payload: 16 + n·28·28 bytes for images, 8 + n for labels.
    "train-images-idx3-ubyte": 16 + 60000 * 784,
    "train-labels-idx1-ubyte": 8 + 60000,
    "t10k-images-idx3-ubyte": 16 + 10000 * 784,
    "t10k-labels-idx1-ubyte": 8 + 10000,
}
SOURCE_RECORD = "source.json"
"""Written beside an extraction: the md5 and size of the ``.gz`` files it was made from."""


def dataset_info(name: str) -> DatasetInfo:
    try:
        return DATASETS[name]
    except KeyError:
        raise BenchError(f"unknown dataset {name!r}; known: {', '.join(DATASETS)}") from None


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "certbench"


def data_dir(explicit: str | os.PathLike[str] | None = None) -> Path:
    if explicit:
        return Path(explicit).expanduser()
    env = os.environ.get("BENCH_DATA_DIR")
    return Path(env).expanduser() if env else cache_dir() / "data"


@dataclass(frozen=True)
class Split:
    """Images (N, C, H, W) uint8 and labels (N,) int64, on CPU."""

    images: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return int(self.labels.shape[0])


def _may_download(path: Path) -> bool:
    """Download only into a writable folder, and never when ``BENCH_OFFLINE=1`` (tests, air-gapped CI)."""
    if os.environ.get("BENCH_OFFLINE") == "1":
        return False
    return writable(path)


def _missing(name: str, root: Path, why: str) -> BenchError:
    files = ", ".join(EXPECTED_FILES[name])
    return BenchError(
        f"{DISPLAY_NAMES[name]} not available in {root} ({why}); expected {files} there — "
        "pass --data-dir or set BENCH_DATA_DIR to a folder holding them, or go online to download"
    )


def _torchvision_dataset(name: str, root: Path, train: bool):  # type: ignore[no-untyped-def]
    from torchvision import datasets

    present = _check_sources(name, root)
    if name == "cifar10":
        download = not present and _may_download(root)
        build = lambda: datasets.CIFAR10(str(root), train=train, download=download)  # noqa: E731
    else:
        root = _mnist_extracted(root) if present else root
        download = not present and _may_download(root)
        build = lambda: datasets.MNIST(str(root), train=train, download=download)  # noqa: E731
    try:
        return build()
    except Exception as exc:  # torchvision raises RuntimeError / URLError / OSError variants
        if not download:
            raise _missing(name, root, "files not found; downloading is off for a read-only folder or "
                                       "with BENCH_OFFLINE=1") from None
        lines = str(exc).strip().splitlines()
        raise _missing(name, root, f"download failed: {lines[-1][:100] if lines else type(exc).__name__}") from None


def _check_sources(name: str, root: Path) -> bool:
    """Whether all of the dataset's official files are in ``root``, each verified by its md5; a file that
    exists but fails the check (truncated, edited) is reported as corrupt, never as missing or re-used."""
    files = [root / rel for rel in EXPECTED_FILES[name]]
    if not any(f.is_file() for f in files):
        if name == "mnist":
            _check_extracted_sizes(root / "MNIST" / "raw")
        return False
    for path, rel in zip(files, EXPECTED_FILES[name]):
        if not path.is_file():
            raise _missing(name, root, f"{rel} is missing while other files are there")
        stat = path.stat()
        if _md5_of(str(path), stat.st_size, stat.st_mtime_ns) != SOURCE_MD5[rel]:
            raise BenchError(f"{DISPLAY_NAMES[name]} file {path} is corrupt (size {path.stat().st_size} bytes, "
                             "md5 mismatch); replace it with the official release")
    return True


def _mnist_extracted(root: Path) -> Path:
    """A folder where MNIST's four verified ``.gz`` files are extracted, which torchvision then reads.

    torchvision only extracts as part of a download, which ``BENCH_OFFLINE=1`` forbids, so we extract
    ourselves: in place when the folder is writable, else into the user cache (the mirror stays untouched).
    An extraction is used only when its ``source.json`` names exactly these ``.gz`` files (md5 and size)
    and every extracted file has its exact size; otherwise it is made again, so a cache made from another
    folder, or one cut short, is never read.
    """
    target = root if writable(root / "MNIST" / "raw") else cache_dir() / "mnist-extracted"
    raw = target / "MNIST" / "raw"
    sources = {rel: {"md5": SOURCE_MD5[rel], "size": (root / rel).stat().st_size} for rel in EXPECTED_FILES["mnist"]}
    if _extraction_matches(raw, sources):
        return target
    raw.mkdir(parents=True, exist_ok=True)
    (raw / SOURCE_RECORD).unlink(missing_ok=True)
    for rel in EXPECTED_FILES["mnist"]:
        dest = raw / Path(rel).stem
        tmp = dest.with_name(f".{dest.name}.{os.getpid()}.tmp")
        with gzip.open(root / rel, "rb") as src, open(tmp, "wb") as out:
            shutil.copyfileobj(src, out)
        os.replace(tmp, dest)
    tmp = raw / f".{SOURCE_RECORD}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(sources, sort_keys=True))
    os.replace(tmp, raw / SOURCE_RECORD)
    return target


def _check_extracted_sizes(raw: Path) -> None:
    """Extracted MNIST files without their ``.gz`` (as a torchvision download may leave them) can only be
    checked by size: a truncated one is corrupt, not missing."""
    for name, size in MNIST_EXTRACTED_SIZE.items():
        path = raw / name
        if path.is_file() and path.stat().st_size != size:
            raise BenchError(f"MNIST file {path} is corrupt ({path.stat().st_size} bytes, expected {size}); "
                             "replace it with the official release")


def _extraction_matches(raw: Path, sources: dict[str, dict[str, object]]) -> bool:
    try:
        recorded = json.loads((raw / SOURCE_RECORD).read_text())
    except (OSError, ValueError):
        return False
    return recorded == sources and all(
        (raw / name).is_file() and (raw / name).stat().st_size == size for name, size in MNIST_EXTRACTED_SIZE.items())


@functools.cache
def _md5_of(path: str, size: int, mtime_ns: int) -> str:
    """``_md5`` once per file version in a process: a run loads the train and the test split, and each
    load checks every source file (350 MB for CIFAR-10)."""
    return _md5(Path(path))


def _md5(path: Path) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def load_split(name: str, train: bool, root: Path) -> Split:
    dataset_info(name)
    ds = _torchvision_dataset(name, root, train)
    if name == "cifar10":
        images = torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous()
        labels = torch.tensor(ds.targets, dtype=torch.int64)
    else:
        images = ds.data.unsqueeze(1).contiguous()
        labels = ds.targets.to(torch.int64)
    return Split(images, labels)


def to_pixels(images: torch.Tensor, device: torch.device) -> torch.Tensor:
    return images.to(device, non_blocking=True).float().div_(255.0)


def augment(x: torch.Tensor, aug: Augmentation, gen: torch.Generator) -> torch.Tensor:
    """Random crop after padding (edge or zeros) and random horizontal flip, per sample, batched."""
    b, _, h, w = x.shape
    if aug.crop_padding > 0:
        pad = aug.crop_padding
        mode = "replicate" if aug.padding_mode == "edge" else "constant"
        padded = F.pad(x, (pad, pad, pad, pad), mode=mode)
        dy = torch.randint(0, 2 * pad + 1, (b,), generator=gen, device=gen.device).to(x.device)
        dx = torch.randint(0, 2 * pad + 1, (b,), generator=gen, device=gen.device).to(x.device)
        rows = (dy[:, None] + torch.arange(h, device=x.device))[:, None, :, None]
        cols = (dx[:, None] + torch.arange(w, device=x.device))[:, None, None, :]
        batch = torch.arange(b, device=x.device)[:, None, None, None]
        chan = torch.arange(x.shape[1], device=x.device)[None, :, None, None]
        x = padded[batch, chan, rows, cols]
    if aug.hflip:
        flip = (torch.rand(b, generator=gen, device=gen.device) < 0.5).to(x.device)
        x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    return x


class TrainBatches:
    """Shuffled, augmented pixel batches; the last partial batch is kept (as the reference code does)."""

    def __init__(self, split: Split, batch_size: int, aug: Augmentation, seed: int, device: torch.device):
        if batch_size <= 0:
            raise BenchError(f"batch_size must be positive, got {batch_size}")
        self.split = split
        self.batch_size = batch_size
        self.aug = aug
        self.seed = seed
        self.device = device
        self._images = split.images.to(device)
        self._labels = split.labels.to(device)

    def __len__(self) -> int:
        return (len(self.split) + self.batch_size - 1) // self.batch_size

    def epoch(self, epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        gen = torch.Generator(device="cpu")
        gen.manual_seed(self.seed * 1_000_003 + epoch)
        order = torch.randperm(len(self.split), generator=gen).to(self.device)
        for start in range(0, len(order), self.batch_size):
            idx = order[start : start + self.batch_size]
            x = self._images[idx].float().div_(255.0)
            yield augment(x, self.aug, gen), self._labels[idx]


def test_batches(split: Split, start: int, stop: int, batch_size: int, device: torch.device
                 ) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """(indices, pixels, labels) over test indices [start, stop), in order, no augmentation."""
    if stop > len(split):
        raise BenchError(f"test range [{start}, {stop}) exceeds the {len(split)} test images")
    for s in range(start, stop, batch_size):
        e = min(stop, s + batch_size)
        yield torch.arange(s, e), to_pixels(split.images[s:e], device), split.labels[s:e].to(device)
