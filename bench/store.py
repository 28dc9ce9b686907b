"""Result files: one folder per cell, written atomically, read back with validation.

Layout: ``<out>/<scale>/<suite>/<dataset>/eps_<a>-<b>/<method>/seed<N>/`` holding

- ``result.json``  the record below (written last: its presence with ``status == "complete"`` is what
  makes a cell *done*);
- ``verdicts.csv`` per-sample verdicts: ``index,label,clean,pgd,certified,verdict`` with 0/1 flags and
  ``verdict`` in {certified, attacked, unknown} (attacked = misclassified clean or by PGD);
- ``train_log.csv`` one row per epoch (epoch, wall_s, and the recipe's values: loss, p, lam, lr, ...);
- ``config.json``  the effective configuration of the cell (written before training starts);
- ``model.pt``     final weights (``state_dict``; loaded with ``weights_only=True``);
- ``checkpoint.pt`` the last finished epoch (model, recipe and RNG state) while the cell is partial;
- ``result-<certifier>.json`` and ``verdicts-<certifier>.csv`` (optional): the same model certified by
  another verifier (``run --certifier``), one pair per verifier.

``result.json`` (``SCHEMA_VERSION`` 1)::

    {"schema": 1, "status": "complete",
     "cell": {"suite", "dataset", "eps" (fraction string "8/255"), "method", "scale", "seed"},
     "metrics": {"clean", "pgd", "certified"}            # fractions in [0, 1]
     "counts": {"n", "clean", "pgd", "certified"},
     "n_examples": int, "index_range": [start, stop],     # test-set indices [start, stop)
     "certifier": str,                                    # verifier behind metrics.certified
     "eps": {"test": "8/255", "train": "24/255"},
     "attack": {"name": "pgd", "steps", "restarts", "step_size_over_eps", "loss"},
     "config": {...},                                     # effective method config
     "scale_config": {...},                               # the harness settings of the scale
     "provenance": {"versions": {...}, "device": str, "device_name": str, "threads": int,
                    "started": iso8601, "finished": iso8601, "host": str,
                    "timings_s": {"train", "clean", "pgd", "certify", "total"}},
     "files": {"verdicts": "verdicts.csv", "train_log": "train_log.csv", "model": "model.pt"}}

Every number is stored as a number and ε as an exact fraction string; readers must treat anything
that fails ``load_result`` as missing (it is reported and re-run, never shown as a number).
"""

from __future__ import annotations

import csv
import io
import json
import os
import tempfile
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

from bench.errors import BenchError

SCHEMA_VERSION = 1
RESULT_FILE = "result.json"
"""The record of a cell under its method's own verifier: its presence (complete) makes the cell done."""


def result_file(certifier: str | None = None) -> str:
    """``result.json``, or ``result-<certifier>.json`` for the same trained model under another verifier
    (``run --certifier``): same schema, clean and PGD copied from the main record, ``certified`` re-measured."""
    return RESULT_FILE if certifier is None else f"result-{certifier}.json"

REQUIRED_KEYS = ("schema", "status", "cell", "metrics", "n_examples", "index_range", "certifier", "config",
                 "provenance")


def eps_slug(eps: Fraction) -> str:
    return f"eps_{eps.numerator}-{eps.denominator}"


def format_eps(eps: Fraction) -> str:
    return f"{eps.numerator}/{eps.denominator}" if eps.denominator != 1 else str(eps.numerator)


def parse_eps(text: str | int | float) -> Fraction:
    """ε from a suite file or the command line: "8/255", "0.3", 0.3 -> exact Fraction in (0, 1]."""
    try:
        value = Fraction(str(text).strip())
    except (ValueError, ZeroDivisionError):
        raise BenchError(f"ε {text!r} is not a number or fraction such as 8/255") from None
    if not 0 < value <= 1:
        raise BenchError(f"ε {text} is out of range: it must lie in (0, 1] (pixel units)")
    return value


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write via a temporary file in the same folder and ``os.replace``: readers see old or new, never half."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def remove_stale_temporaries(folder: Path) -> list[Path]:
    """Delete the temporaries a killed writer left in ``folder`` (SIGKILL skips the cleanup above).

    Only called for a cell folder about to be (re)run by the one process that owns it.
    """
    stale = sorted(folder.glob(".*.tmp")) if folder.is_dir() else []
    for tmp in stale:
        tmp.unlink(missing_ok=True)
    return stale


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def write_csv(path: Path, header: Iterable[str], rows: Iterable[Iterable[Any]]) -> None:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(list(header))
    writer.writerows(rows)
    atomic_write_text(path, buf.getvalue())


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as fh:
        return list(csv.DictReader(fh))


@dataclass(frozen=True)
class LoadedResult:
    path: Path
    record: dict[str, Any]

    @property
    def folder(self) -> Path:
        return self.path.parent


def load_result(path: Path) -> LoadedResult:
    """Read and validate one ``result.json``; raise ``BenchError`` describing what is wrong."""
    try:
        record = json.loads(path.read_text())
    except FileNotFoundError:
        raise BenchError(f"{path}: missing") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BenchError(f"{path}: corrupt result file ({exc.__class__.__name__})") from None
    if not isinstance(record, dict):
        raise BenchError(f"{path}: corrupt result file (not an object)")
    missing = [k for k in REQUIRED_KEYS if k not in record]
    if missing:
        raise BenchError(f"{path}: incomplete result file, missing {', '.join(missing)}")
    if record["schema"] != SCHEMA_VERSION:
        raise BenchError(f"{path}: result schema {record['schema']} is not {SCHEMA_VERSION}")
    if record["status"] != "complete":
        raise BenchError(f"{path}: status is {record['status']!r}, not complete")
    metrics = record["metrics"]
    for key in ("clean", "pgd", "certified"):
        value = metrics.get(key) if isinstance(metrics, dict) else None
        if not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
            raise BenchError(f"{path}: metrics.{key} is not a fraction in [0, 1]")
    return LoadedResult(path, record)


def iter_results(root: Path) -> Iterator[tuple[Path, LoadedResult | BenchError]]:
    """Every result file (``result.json`` and ``result-<certifier>.json``) below ``root`` in sorted order,
    loaded or with the reason it is unusable."""
    for path in sorted(root.rglob("result*.json")):
        try:
            yield path, load_result(path)
        except BenchError as exc:
            yield path, exc


def cell_dir(out: Path, scale: str, suite: str, dataset: str, eps: Fraction, method: str, seed: int) -> Path:
    return out / scale / suite / dataset / eps_slug(eps) / method / f"seed{seed}"


def ensure_writable(folder: Path) -> None:
    """Fail early, with one line, when results could not be written."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = tempfile.NamedTemporaryFile(dir=folder, prefix=".write-probe-", delete=True)
        probe.close()
    except OSError as exc:
        raise BenchError(f"output folder {folder} is not writable ({exc.strerror or exc})") from None


def dump_config(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """Config values as JSON-ready data (fractions become exact strings)."""
    def conv(v: Any) -> Any:
        if isinstance(v, Fraction):
            return format_eps(v)
        if isinstance(v, Mapping):
            return {str(k): conv(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [conv(x) for x in v]
        return v

    return conv(dict(cfg))
