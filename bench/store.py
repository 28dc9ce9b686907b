"""Result files: one folder per cell, written atomically, read back with validation.

Layout: ``<out>/<scale>/<suite>/<dataset>/eps_<a>-<b>/<method>/seed<N>/`` holding

- ``result.json``  the record below (written last: its presence with ``status == "complete"`` is what
  makes a cell *done*);
- ``verdicts.csv`` per-sample verdicts: ``index,label,clean,pgd,certified,verdict,apgd,broken_by`` with
  0/1 flags, ``verdict`` in {certified, attacked, unknown} (attacked = misclassified clean or by an
  attack), ``apgd`` blank where the APGD ensemble did not run, and ``broken_by`` the first thing that
  broke the point (clean, pgd, apgd-ce, apgd-t) or blank (older files lack the last two columns);
- ``train_log.csv`` one row per epoch (epoch, wall_s, and the recipe's values: loss, p, lam, lr, ...);
- ``config.json``  the effective configuration of the cell (written before training starts);
- ``model.pt``     final weights (``state_dict``; loaded with ``weights_only=True``);
- ``checkpoint.pt`` the last finished epoch (model, recipe and RNG state) while the cell is partial;
- ``result-<certifier>.json`` and ``verdicts-<certifier>.csv`` (optional): the same model certified by
  another verifier (``run --certifier``), one pair per verifier;
- ``cascade.json`` and ``cascade-verdicts.csv`` (optional): every point certified / falsified / unknown
  after attacks and the method's verifiers in turn (``bench cascade``, ``bench/cascade.py``).

``result.json`` (``SCHEMA_VERSION`` 1)::

    {"schema": 1, "status": "complete",
     "cell": {"suite", "dataset", "eps" (fraction string "8/255"), "method", "scale", "seed"},
     "metrics": {"clean", "pgd", "certified", "apgd"?}    # fractions in [0, 1]; apgd where it ran
     "counts": {"n", "clean", "pgd", "certified", "apgd"?},
     "n_examples": int, "index_range": [start, stop],     # test-set indices [start, stop)
     "certifier": str,                                    # verifier behind metrics.certified
     "eps": {"test": "8/255", "train": "24/255"},
     "attack": {"name": "pgd", "steps", "restarts", "step_size_over_eps", "loss",   # the pgd column
                "guard": {...},                           # margin-loss PGD on the certified points
                "apgd": {"steps", "targets", ...}?},      # the apgd column, where it ran
     "config": {...},                                     # effective method config
     "scale_config": {...},                               # the harness settings of the scale
     "provenance": {"versions": {...}, "device": str, "device_name": str, "threads": int,
                    "started": iso8601, "finished": iso8601, "host": str,
                    "timings_s": {"train", "clean", "pgd", "apgd"?, "certify", "guard", "total"}},
     "files": {"verdicts": "verdicts.csv", "train_log": "train_log.csv", "model": "model.pt"}}

Every number is stored as a number and ε as an exact fraction string; readers must treat anything
that fails ``load_result`` as missing (it is reported and re-run, never shown as a number).
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import stat
import tempfile
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

from bench.errors import BenchError

SCHEMA_VERSION = 1
DEFAULT_OUT = Path("runs")
"""Where a user's own runs go by default. The project's published results (``results/``) are only
read or written when ``--out results`` is given explicitly."""
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


def _file_mode() -> int:
    """The mode ``open()`` would give a new file under this process's umask (mkstemp's is always 0600,
    which would keep results from the other users of a shared results folder)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def add_out_argument(parser: argparse.ArgumentParser, what: str) -> None:
    """``--out DIR`` (alias ``--results``), the same results root for every verb."""
    parser.add_argument("--out", "--results", dest="out", metavar="DIR", default=str(DEFAULT_OUT),
                        help=f"results root: {what} (default: {DEFAULT_OUT}/, your own runs; the project's "
                             "published results are --out results)")


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write via a temporary file in the same folder and ``os.replace``: readers see old or new, never half."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, _file_mode())
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
    problem = _inconsistency(record)
    if problem:
        raise BenchError(f"{path}: inconsistent result file ({problem})")
    return LoadedResult(path, record)


def _inconsistency(record: Mapping[str, Any]) -> str:
    """What contradicts itself in a record, or ``""``: the counts must add up to the metrics over ``n``
    test points of ``index_range``, and certified ≤ PGD ≤ clean (a certified point survives every attack,
    and an attack starts from points that are classified correctly)."""
    counts, metrics, n = record.get("counts"), record["metrics"], record["n_examples"]
    if not isinstance(n, int) or isinstance(n, bool) or n <= 0:
        return f"n_examples = {n!r}"
    bounds = record["index_range"]
    if not (isinstance(bounds, list) and len(bounds) == 2 and all(isinstance(b, int) for b in bounds)
            and bounds[1] - bounds[0] == n):
        return f"index_range {bounds!r} does not hold n_examples = {n} points"
    if not isinstance(counts, dict) or counts.get("n") != n:
        return f"counts {counts!r} do not match n_examples = {n}"
    for key in ("clean", "pgd", "certified"):
        count = counts.get(key)
        if not isinstance(count, int) or not 0 <= count <= n or abs(count / n - metrics[key]) > 1e-9:
            return f"metrics.{key} = {metrics[key]!r} is not counts.{key} = {count!r} over n = {n}"
    if not counts["certified"] <= counts["pgd"] <= counts["clean"]:
        return (f"certified {counts['certified']} ≤ PGD {counts['pgd']} ≤ clean {counts['clean']} does not hold "
                "(an unsound certificate or an edited file)")
    if "apgd" in counts and not (isinstance(counts["apgd"], int)
                                 and counts["certified"] <= counts["apgd"] <= counts["pgd"]):
        return f"certified {counts['certified']} ≤ APGD {counts['apgd']!r} ≤ PGD {counts['pgd']} does not hold"
    return ""


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


def writable(path: Path) -> bool:
    """Whether we may write into ``path`` (or, if it does not exist yet, into its nearest existing parent).

    ``os.access`` alone is not enough: for root it ignores permission bits, so a folder made read-only
    with ``chmod`` (as on CI, where tests run as root) would look writable. A folder counts as read-only
    when its owner has no write bit, or when the OS refuses writes (a read-only mount).
    """
    probe = path
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    return os.access(probe, os.W_OK) and bool(probe.stat().st_mode & stat.S_IWUSR)


def ensure_writable(folder: Path) -> None:
    """Fail early, with one line, when results could not be written (nothing is created in a read-only tree)."""
    if not writable(folder):
        raise BenchError(f"output folder {folder} is read-only")
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
