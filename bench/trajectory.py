"""Training trajectories: each baseline cell's per-epoch training log, recorded and compared epoch by epoch.

Why a third layer: trained cells differ from seed to seed by several points of certified accuracy, so the
pooled gate (``bench/regress.py``) cannot see a 3-point drop; the fixed checkpoints (``bench/fixed.py``) see
every certifier, attack or evaluation change but no training change. What training leaves behind without
that noise is its log. On one CPU a cell's training is bitwise reproducible for its seed (measured: the same
cells run twice give identical logs), and a different CPU's float rounding makes it drift only slowly (built
for AVX2 instead of AVX-512, the per-epoch mean training loss of the smoke cells moved by at most 2e-6 to
6e-2 of itself, depending on the method). A change to a method's training (its loss, a hyper-parameter, its
schedule, the data it sees) moves the log by far more, from the epoch it takes effect.

So for every baseline cell and recorded seed the log is kept (``train_log.csv``), and a run of the same
cell and seed must reproduce it:

- *schedule* columns (ε, lr, κ, β, p, λ, ...: functions of the config and the epoch) to ``SCHEDULE_RTOL``;
- *measured* columns (``MEASURED``: the epoch's mean loss and regulariser) to a tolerance per method and
  column: ``MARGIN`` × the largest relative deviation, ``|now − base| / max(|base|, SCALE_FLOOR)``, over
  every epoch of every cell of the method in runs under another CPU build (``--calibrate-from``), at least
  ``FLOOR``. One tolerance per method, not per cell or epoch: when the drift becomes visible is chance
  (another seed's log drifted 100× more than the calibration run's at the same cell), while its size over a
  method's cells is stable;
- *counted* columns (``COUNTED``: train accuracy, train certified fraction) are not compared: one training
  example that rounding flips moves them by 1/n, so they say nothing at rounding scale the loss does not.

A run whose seed has no recorded log is listed as not compared (the pooled gate still judges it). The
check fails (DIVERGED) on the first epoch a column leaves its tolerance, and names cell, column and epoch.
A change that is meant to alter training is re-recorded with ``bench check --update`` after its effect on
accuracy has been looked at (the pooled gate's table, the ``small`` cells).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from tabulate import tabulate

from bench.errors import BenchError
from bench.report.records import Run
from bench.store import read_csv

SCHEMA = 1
TIMING = ("epoch", "wall_s", "batches_per_s")
"""Not compared: the epoch index is the row, and times depend on the machine's load."""
COUNTED = ("acc", "train_certified")
MEASURED = ("loss", "reg")
"""Averages over the epoch's batches: they carry float rounding, so they get a tolerance."""
SCALE_FLOOR = 0.01
SCHEDULE_RTOL = 1e-9
"""Schedules are float64 arithmetic on the config; only a libm's last bit may differ between machines."""
MARGIN = 10.0
"""Another CPU or BLAS can start from a larger rounding difference than AVX2 against AVX-512, and training
amplifies whatever it starts from: an order of magnitude of room (validated on runs the calibration did not
see: results/baselines/README.md)."""
FLOOR = 1e-5


def read_log(folder: Path) -> dict[str, list[float]]:
    """The compared columns of a cell's ``train_log.csv``."""
    path = folder / "train_log.csv"
    try:
        rows = read_csv(path)
    except FileNotFoundError:
        raise BenchError(f"{path} is missing: the cell has no training log to compare") from None
    if not rows:
        raise BenchError(f"{path} is empty")
    try:
        return {c: [float(r[c]) for r in rows] for c in rows[0] if c not in TIMING + COUNTED}
    except (TypeError, ValueError) as exc:
        raise BenchError(f"{path} is corrupt ({exc})") from None


def deviation(now: float, base: float) -> float:
    """Relative deviation; NaN against NaN (a column the recipe does not use) is none, NaN against a number
    (a loss that blew up) is infinite."""
    if math.isnan(now) or math.isnan(base):
        return 0.0 if math.isnan(now) and math.isnan(base) else math.inf
    return abs(now - base) / max(abs(base), SCALE_FLOOR)


def _group(key: str) -> str:
    """A cell key without its seed."""
    return key.rsplit("/", 1)[0]


def _method(key: str) -> str:
    """``<scale>/<method>`` of a cell key (``<scale>/<suite>/<dataset>/eps_<a>-<b>/<method>/seed<N>``)."""
    parts = key.split("/")
    return f"{parts[0]}/{parts[4]}"


def _round_up(value: float) -> float:
    """Two significant digits, rounded up, so that the stored tolerance is never below the rule's."""
    if value <= 0:
        return 0.0
    step = 10 ** (math.floor(math.log10(value)) - 1)
    return math.ceil(value / step - 1e-9) * step


def drift(base: dict[str, list[float]], other: dict[str, list[float]], where: str) -> dict[str, float]:
    """Per measured column, the largest deviation of a run under another CPU build from its base run."""
    if set(base) != set(other) or len(next(iter(base.values()))) != len(next(iter(other.values()))):
        raise BenchError(f"{where}: the calibration run logged other columns or epochs: not the same recipe")
    out: dict[str, float] = {}
    for column, values in base.items():
        devs = [deviation(b, a) for a, b in zip(values, other[column])]
        if column in MEASURED:
            out[column] = max(devs)
        elif max(devs) > SCHEDULE_RTOL:
            epoch = next(e for e, d in enumerate(devs) if d > SCHEDULE_RTOL)
            raise BenchError(f"{where}: schedule column {column} differs at epoch {epoch} in the calibration run: "
                             "not the same recipe")
    return out


def record(runs: Sequence[Run], calibration: Sequence[Run]) -> dict[str, Any]:
    """The trajectories file: every run's log, each calibration run's drift, and per method the tolerances."""
    logs = {r.key: read_log(r.folder) for r in runs}
    drifts: dict[str, dict[str, float]] = {}
    for other in calibration:
        if other.key not in logs:
            raise BenchError(f"{other.key}: a calibration run of a cell or seed that --spread-from lacks")
        drifts[other.key] = drift(logs[other.key], read_log(other.folder), other.key)
    uncalibrated = sorted({_group(k) for k in logs} - {_group(k) for k in drifts})
    if uncalibrated:
        raise BenchError(f"no run under another CPU build in --calibrate-from for {', '.join(uncalibrated)}; every "
                         "cell needs one (see results/baselines/README.md)")
    tolerance: dict[str, dict[str, float]] = {}
    for key, measured in sorted(drifts.items()):
        method = tolerance.setdefault(_method(key), {})
        for column, value in measured.items():
            method[column] = max(method.get(column, FLOOR), _round_up(MARGIN * value))
    return {
        "schema": SCHEMA,
        "rule": (f"schedule columns to {SCHEDULE_RTOL} relative; measured columns {', '.join(MEASURED)}: "
                 f"|now - base| / max(|base|, {SCALE_FLOOR}) at most max({FLOOR}, {MARGIN} x the largest such "
                 "deviation over every epoch of the method's cells in the calibration runs under another CPU "
                 f"build); {', '.join(COUNTED)} not compared"),
        "calibrated_with": sorted({f"{r.device}, git {r.versions.get('git', '?')}" for r in calibration}),
        "drift": drifts,
        "tolerance": tolerance,
        "cells": logs,
    }


@dataclass(frozen=True)
class Trajectories:
    cells: dict[str, dict[str, list[float]]]
    tolerance: dict[str, dict[str, float]]
    """``<scale>/<method>`` -> measured column -> allowed deviation."""


def load(path: Path) -> Trajectories:
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        raise BenchError(f"trajectories {path} not found; record them with `python -m bench check --baseline ... "
                         f"--trajectories {path} --update --calibrate-from DIR`") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BenchError(f"trajectories {path} are unreadable ({exc.__class__.__name__})") from None
    if not isinstance(raw, dict) or raw.get("schema") != SCHEMA or not isinstance(raw.get("cells"), dict) \
            or not isinstance(raw.get("tolerance"), dict):
        raise BenchError(f"trajectories {path}: not a schema-{SCHEMA} trajectories file")
    missing = sorted({_method(k) for k in raw["cells"]} - set(raw["tolerance"]))
    if missing:
        raise BenchError(f"trajectories {path}: no tolerance for {', '.join(missing)}")
    return Trajectories(raw["cells"], raw["tolerance"])


@dataclass(frozen=True)
class Divergence:
    """The first epoch at which one column of one cell left its tolerance."""

    cell: str
    column: str
    epoch: int | None
    baseline: float | None
    now: float | None
    deviation: float | None
    tolerance: float | None


def compare_log(cell: str, base: dict[str, list[float]], now: dict[str, list[float]],
                tolerance: dict[str, float]) -> list[Divergence]:
    epochs = len(next(iter(base.values())))
    got = len(next(iter(now.values()))) if now else 0
    out = []
    if got != epochs:
        out.append(Divergence(cell, "epochs", None, epochs, got, None, None))
    for column in sorted(set(base) | set(now)):
        if column not in base or column not in now:
            out.append(Divergence(cell, f"{column} (logged {'now' if column in now else 'before'} only)",
                                  None, None, None, None, None))
            continue
        for e, (b, n) in enumerate(zip(base[column], now[column])):
            allowed = tolerance.get(column, FLOOR) if column in MEASURED else SCHEDULE_RTOL
            d = deviation(n, b)
            if d > allowed:
                out.append(Divergence(cell, column, e, b, n, d, allowed))
                break
    return out


def compare(trajectories: Trajectories, runs: Sequence[Run]) -> tuple[list[Divergence], list[str], list[str]]:
    """(divergences, cells compared, runs of baseline cells whose seed has no recorded log)."""
    divergences, compared, unrecorded = [], [], []
    groups = {_group(k) for k in trajectories.cells}
    for run in sorted(runs, key=lambda r: r.key):
        base = trajectories.cells.get(run.key)
        if base is None:
            if _group(run.key) in groups:
                unrecorded.append(run.key)
            continue
        compared.append(run.key)
        divergences += compare_log(run.key, base, read_log(run.folder), trajectories.tolerance[_method(run.key)])
    return divergences, compared, unrecorded


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:.6g}"


def table(divergences: Sequence[Divergence]) -> str:
    """One row per cell: its earliest divergence (a count mismatch first), and the other columns that left."""
    by_cell: dict[str, list[Divergence]] = {}
    for d in divergences:
        by_cell.setdefault(d.cell, []).append(d)
    rows = []
    for cell, found in sorted(by_cell.items()):
        found = sorted(found, key=lambda d: (-1 if d.epoch is None else d.epoch, d.column))
        d = found[0]
        rows.append([cell, d.column, "-" if d.epoch is None else d.epoch, _num(d.baseline), _num(d.now),
                     _num(d.deviation), _num(d.tolerance), ", ".join(x.column for x in found[1:]) or "-", "DIVERGED"])
    return tabulate(rows, headers=["cell", "column", "epoch", "baseline", "now", "deviation", "tolerance",
                                   "also diverged", ""], tablefmt="simple", disable_numparse=True)
