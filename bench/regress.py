"""``python -m bench check``: the CI gate. Compares finished cells with a committed baseline and fails when
any cell's certified or clean accuracy falls more than the tolerance below it, or a baseline cell is
missing (a corrupt or partial result counts as missing).

Baseline file (JSON, ``schema`` 1; accuracies and tolerances are fractions in [0, 1])::

    {"schema": 1,
     "tolerance": 0.02,                       # the floor: least allowed drop of any cell and metric
     "spread_factor": 2.0,                    # a cell's allowed drop: max(floor, factor × its seed range)
     "tolerance_rule": "...",                 # the rule, in words
     "spread": {"<scale>/<suite>/<dataset>/eps_<a>-<b>/<method>":
                    {"seeds": [0, 1, ...], "certified": {"min", "max", "range"}, "clean": {...}}},
     "cells": {"<scale>/<suite>/<dataset>/eps_<a>-<b>/<method>/seed<N>":
                   {"certified": 0.42, "clean": 0.61, "tolerance": {"certified": 0.08, "clean": 0.04}}}}

Cell keys are the cell folders relative to the results root. ``--update`` rewrites the file from the
current results on purpose. The spread is measured over the seeds of each cell (from ``--spread-from``, by
default the same results). Each cell gets its own tolerance from its own spread: smoke-scale cells differ a
lot in how stable they are (a 2-point range for one, a collapse in one seed of three for another), and one
tolerance for all would have to be the widest range, which gates nothing. Three seeds under-estimate the
spread, hence the factor. A cell without measured spread gets the floor; ``check --tolerance`` overrides
every cell's tolerance.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from tabulate import tabulate

from bench.errors import BenchError
from bench.report.records import DEFAULT_RESULTS, Run, read_runs, report_problems
from bench.store import atomic_write_json

BASELINE_SCHEMA = 1
GATED = ("certified", "clean")
DEFAULT_TOLERANCE = 0.02
DEFAULT_SPREAD_FACTOR = 2.0


@dataclass(frozen=True)
class Baseline:
    tolerance: float
    """The floor, used for cells without a tolerance of their own."""
    cells: dict[str, dict[str, float]]
    cell_tolerances: dict[str, dict[str, float]]

    def tolerance_of(self, cell: str, metric: str) -> float:
        return self.cell_tolerances.get(cell, {}).get(metric, self.tolerance)


@dataclass(frozen=True)
class Comparison:
    """One gated metric of one baseline cell; ``now`` is ``None`` when the cell has no usable result."""

    cell: str
    metric: str
    baseline: float
    now: float | None

    @property
    def delta(self) -> float | None:
        return None if self.now is None else self.now - self.baseline

    def status(self, tolerance: float) -> str:
        """MISSING and REGRESSED fail the check; "improved" (beyond the tolerance) hints at ``--update``."""
        if self.now is None:
            return "MISSING"
        # The small slack keeps a change of exactly the tolerance from counting, whatever the float rounding.
        if self.now < self.baseline - tolerance - 1e-9:
            return "REGRESSED"
        return "improved" if self.now > self.baseline + tolerance + 1e-9 else "ok"


def load_baseline(path: Path) -> Baseline:
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        raise BenchError(f"baseline {path} not found; create it with `python -m bench check --baseline {path} "
                         "--update`") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BenchError(f"baseline {path} is unreadable ({exc.__class__.__name__})") from None
    if not isinstance(raw, dict) or raw.get("schema") != BASELINE_SCHEMA:
        raise BenchError(f"baseline {path}: not a schema-{BASELINE_SCHEMA} baseline file")
    cells = raw.get("cells")
    if not isinstance(cells, dict) or not cells:
        raise BenchError(f"baseline {path}: no cells")
    for key, metrics in cells.items():
        if not isinstance(metrics, dict) or not any(m in metrics for m in GATED) or not all(
                isinstance(v, (int, float)) and 0 <= v <= 1 for m, v in metrics.items() if m in GATED):
            raise BenchError(f"baseline {path}: cell {key} needs accuracies ({', '.join(GATED)}) in [0, 1]")
        own = metrics.get("tolerance", {})
        if not isinstance(own, dict):
            raise BenchError(f"baseline {path}: cell {key}: tolerance must map metrics to fractions")
        for metric, value in own.items():
            _tolerance(value, f"baseline {path}: cell {key} {metric}")
    return Baseline(_tolerance(raw.get("tolerance", DEFAULT_TOLERANCE), f"baseline {path}"),
                    {k: {m: float(v[m]) for m in GATED if m in v} for k, v in cells.items()},
                    {k: {m: float(t) for m, t in v.get("tolerance", {}).items()} for k, v in cells.items()})


def compare(baseline: Baseline, runs: Sequence[Run]) -> list[Comparison]:
    """Every gated metric of every baseline cell against the current runs, sorted by cell."""
    now = {r.key: r for r in runs}
    return [Comparison(key, metric, value, getattr(now[key], metric) if key in now else None)
            for key, metrics in sorted(baseline.cells.items()) for metric, value in metrics.items()]


def measure_spread(runs: Sequence[Run]) -> dict[str, dict[str, Any]]:
    """Seed-to-seed spread of each cell that was run with several seeds."""
    groups: dict[str, list[Run]] = defaultdict(list)
    for run in runs:
        groups[run.group].append(run)
    spread: dict[str, dict[str, Any]] = {}
    for group, members in sorted(groups.items()):
        if len(members) < 2:
            continue
        entry: dict[str, Any] = {"seeds": sorted(r.seed for r in members)}
        for metric in GATED:
            values = [getattr(r, metric) for r in members]
            entry[metric] = {"min": round(min(values), 6), "max": round(max(values), 6),
                             "range": round(max(values) - min(values), 6)}
        spread[group] = entry
    return spread


def baseline_record(runs: Sequence[Run], spread: dict[str, dict[str, Any]], floor: float,
                    factor: float) -> dict[str, Any]:
    """The baseline file's content: every run's gated metrics, each with the tolerance its seed spread earns."""
    cells: dict[str, dict[str, Any]] = {}
    for run in runs:
        entry: dict[str, Any] = {m: getattr(run, m) for m in GATED}
        measured = spread.get(run.group)
        if measured is not None:
            # Rounded up to 0.001 so that the recorded number never sits below factor × range.
            entry["tolerance"] = {m: min(1.0, max(floor, math.ceil(factor * measured[m]["range"] * 1000 - 1e-6)
                                                  / 1000)) for m in GATED}
        cells[run.key] = entry
    rule = (f"per cell: max({floor}, {factor} × the cell's seed-to-seed range) over the seeds in spread; "
            f"{floor} for cells without measured spread")
    return {
        "schema": BASELINE_SCHEMA,
        "tolerance": floor,
        "spread_factor": factor,
        "tolerance_rule": rule,
        "spread": spread,
        "cells": cells,
    }


def _tolerance(value: Any, where: str) -> float:
    if not isinstance(value, (int, float)) or not 0 <= value <= 1:
        raise BenchError(f"{where}: tolerance {value!r} must be a fraction in [0, 1], e.g. 0.01 for one point")
    return float(value)


def _selected(runs: list[Run], scales: list[str] | None, suites: list[str] | None) -> list[Run]:
    return [r for r in runs if (not scales or r.scale in scales) and (not suites or r.suite in suites)]


def _read(root: Path) -> list[Run]:
    runs, problems = read_runs(root)
    report_problems(problems)
    return runs


def _pct(value: float | None, signed: bool = False) -> str:
    if value is None:
        return "-"
    return f"{100 * value:+.2f}" if signed else f"{100 * value:.2f}"


def update_command(args: argparse.Namespace) -> int:
    path = Path(args.baseline)
    runs = _selected(_read(Path(args.results)), args.scale, args.suite)
    if not runs:
        raise BenchError(f"no finished results under {args.results} for the chosen scale/suite; nothing to record")
    spread_runs = runs if args.spread_from is None else _selected(_read(Path(args.spread_from)), args.scale,
                                                                    args.suite)
    floor = DEFAULT_TOLERANCE if args.tolerance is None else _tolerance(args.tolerance, "--tolerance")
    if args.spread_factor <= 0:
        raise BenchError(f"--spread-factor must be positive, got {args.spread_factor}")
    record = baseline_record(runs, measure_spread(spread_runs), floor, args.spread_factor)
    atomic_write_json(path, record)
    print(f"wrote {path}: {len(record['cells'])} cells, tolerance {record['tolerance_rule']}")
    return 0


def check_command(args: argparse.Namespace) -> int:
    if args.update:
        return update_command(args)
    if args.spread_from is not None or args.scale or args.suite or args.spread_factor != DEFAULT_SPREAD_FACTOR:
        raise BenchError("--scale, --suite, --spread-from and --spread-factor choose what --update records; the check itself "
                         "covers every cell of the baseline")
    path = Path(args.baseline)
    baseline = load_baseline(path)
    forced = None if args.tolerance is None else _tolerance(args.tolerance, "--tolerance")
    runs = _read(Path(args.results))
    rows = compare(baseline, runs)

    def tolerance(c: Comparison) -> float:
        return baseline.tolerance_of(c.cell, c.metric) if forced is None else forced

    table = [[c.cell, c.metric, _pct(c.baseline), _pct(c.now), _pct(c.delta, signed=True), _pct(tolerance(c)),
              c.status(tolerance(c))] for c in rows]
    print(tabulate(table, headers=["cell", "metric", "baseline %", "now %", "Δ points", "tolerance", "status"],
                   tablefmt="simple", disable_numparse=True,
                   colalign=("left", "left", "right", "right", "right", "right", "left")))
    gated_suites = {tuple(key.split("/")[:2]) for key in baseline.cells}
    new = [r.key for r in runs if (r.scale, r.suite) in gated_suites and r.key not in baseline.cells]
    if new:
        print(f"not in the baseline (add with --update): {', '.join(new)}", file=sys.stderr)
    failed = [c for c in rows if c.status(tolerance(c)) in ("MISSING", "REGRESSED")]
    if failed:
        missing = len({c.cell for c in failed if c.now is None})
        lower = len({c.cell for c in failed if c.now is not None})
        print(f"check FAILED against {path}: {lower} cells fell by more than their tolerance, {missing} missing",
              file=sys.stderr)
        return 1
    print(f"check passed: {len(baseline.cells)} cells within their tolerances of {path}")
    return 0


def register_verb(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("check", help="fail when certified/clean accuracy drops below a committed baseline")
    p.add_argument("--baseline", required=True, help="baseline JSON, e.g. results/baselines/smoke.json")
    p.add_argument("--results", default=str(DEFAULT_RESULTS), help="results root (default: results)")
    p.add_argument("--tolerance", type=float,
                   help="allowed drop as a fraction, e.g. 0.01 = one point, for every cell (default: each cell's "
                        "own from the baseline file); with --update: the floor of every cell's tolerance")
    p.add_argument("--spread-factor", type=float, default=DEFAULT_SPREAD_FACTOR,
                   help=f"with --update: a cell's tolerance is this many times its seed range (default "
                        f"{DEFAULT_SPREAD_FACTOR})")
    p.add_argument("--update", action="store_true", help="rewrite the baseline from the current results")
    p.add_argument("--scale", nargs="+", help="with --update: record only these scales (default: all)")
    p.add_argument("--suite", nargs="+", help="with --update: record only these suites (default: all)")
    p.add_argument("--spread-from", help="with --update: results root with several seeds per cell to measure "
                                         "the run-to-run spread (default: --results)")
    p.set_defaults(func=check_command)
