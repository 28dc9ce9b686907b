"""``python -m bench check``: the CI gate. Compares finished cells with a committed baseline.

What is gated, and why: one smoke cell (one ε, one seed, 2,000 training images) moves by several points
from one seed to the next, so a per-cell tolerance wide enough not to cry wolf is wider than the 3-point
regressions the gate must catch. The mean over a method's cells (both datasets, every smoke ε) moves much
less, because the cells' seed noise is largely independent. So each method is one *pool*: its certified and
clean accuracy, averaged over its baseline cells, may fall by at most the pool's tolerance. The check fails

- REGRESSED: a pool's mean fell by more than its tolerance;
- MISSING: a baseline cell has no usable result (a corrupt or partial result counts as missing);
- SUSPECT: a pool's certified mean rose by more than ``SUSPECT_FACTOR`` × its tolerance, what an unsound
  certificate looks like; a maintainer must check soundness before refreshing the baseline with ``--update``.
  (A cell certifying more points than PGD leaves robust is refused by the result reader and counts as
  MISSING, with the same advice.)

Failing pools are followed by a table of their cells, so the message names the method and the cells that moved.

Baseline file (JSON, ``schema`` 2; accuracies and tolerances are fractions in [0, 1])::

    {"schema": 2,
     "tolerance": 0.005,                       # the floor of every pool's tolerance
     "z": 3.0,                                 # a pool's tolerance: max(floor, z × √2 × its seed SD)
     "tolerance_rule": "...",                  # the rule, in words
     "spread": {"cells": {"<scale>/<suite>/<dataset>/eps_<a>-<b>/<method>":
                              {"seeds": [...], "certified": {"min", "max", "range", "sd"}, "clean": {...}}},
                "pools": {"<scale>/<method>": {"seeds": [...], "certified": {..., "values": [...]}, ...}}},
     "pools": {"<scale>/<method>": {"cells": [<cell key>, ...], "certified": 0.42, "clean": 0.61,
                                    "tolerance": {"certified": 0.02, "clean": 0.02}}},
     "cells": {"<scale>/<suite>/<dataset>/eps_<a>-<b>/<method>/seed<N>":
                   {"certified": 0.42, "clean": 0.61, "pgd": 0.5}}}    # pgd: for the record

Cell keys are the cell folders relative to the results root. ``--update`` rewrites the file from the
current results on purpose; the spread is measured over the seeds in ``--spread-from`` (default: the same
results): for every seed that has all of a pool's cells, the pool's mean; the tolerance is ``z`` standard
deviations of the difference of two such means (one seed's baseline, another seed's or CPU's CI run: √2 ×
the seed SD). A pool without measured spread gets the floor; ``check --tolerance`` overrides every pool's.

A cell that collapses in some seeds (its lowest certified accuracy over the measured seeds below
``COLLAPSE_RATIO`` × its highest) is recorded but left out of its pool (``left_out``, with its range): it
is bimodal, trains or does not, and in a pool its jumps would set a tolerance wider than every regression
the other cells could show. If every cell of a method collapses, the pool keeps them all.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from tabulate import tabulate

from bench import fixed, trajectory
from bench.errors import BenchError
from bench.report.records import Run, read_runs, report_problems
from bench.store import add_out_argument, atomic_write_json

BASELINE_SCHEMA = 2
GATED = ("certified", "clean")
DEFAULT_TOLERANCE = 0.005
DEFAULT_Z = 3.0
SUSPECT_FACTOR = 2.0
"""A certified mean this many tolerances above its baseline is not an improvement to wave through."""
SOUNDNESS_HINT = ("that is what an unsound certificate looks like: check soundness (run the slow soundness tests, "
                  "attack the certified points with more PGD steps and restarts) before refreshing the baseline "
                  "with --update")


@dataclass(frozen=True)
class Pool:
    """One method's baseline cells at one scale, gated as one mean."""

    key: str
    """``<scale>/<method>``."""
    cells: tuple[str, ...]
    baseline: dict[str, float]
    tolerance: dict[str, float]


@dataclass(frozen=True)
class Baseline:
    cells: dict[str, dict[str, float]]
    pools: dict[str, Pool]


@dataclass(frozen=True)
class PoolResult:
    """One gated metric of one pool; ``now`` is ``None`` when any of its cells has no usable result."""

    pool: str
    metric: str
    baseline: float
    now: float | None
    tolerance: float
    missing: tuple[str, ...]

    @property
    def delta(self) -> float | None:
        return None if self.now is None else self.now - self.baseline

    @property
    def status(self) -> str:
        """MISSING, REGRESSED and SUSPECT fail the check; "improved" (beyond the tolerance) hints at ``--update``."""
        if self.now is None:
            return "MISSING"
        # The small slack keeps a change of exactly the tolerance from counting, whatever the float rounding.
        if self.now < self.baseline - self.tolerance - 1e-9:
            return "REGRESSED"
        if self.metric == "certified" and self.now > self.baseline + SUSPECT_FACTOR * self.tolerance + 1e-9:
            return "SUSPECT"
        return "improved" if self.now > self.baseline + self.tolerance + 1e-9 else "ok"

    @property
    def failed(self) -> bool:
        return self.status in ("MISSING", "REGRESSED", "SUSPECT")


def pool_key(run: Run) -> str:
    return f"{run.scale}/{run.method}"


def _fraction(value: Any, where: str) -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 <= value <= 1:
        raise BenchError(f"{where}: {value!r} must be a fraction in [0, 1], e.g. 0.01 for one point")
    return float(value)


def load_baseline(path: Path) -> Baseline:
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        raise BenchError(f"baseline {path} not found; create it with `python -m bench check --baseline {path} "
                         "--update`") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BenchError(f"baseline {path} is unreadable ({exc.__class__.__name__})") from None
    if not isinstance(raw, dict) or raw.get("schema") != BASELINE_SCHEMA:
        raise BenchError(f"baseline {path}: not a schema-{BASELINE_SCHEMA} baseline file (regenerate it with "
                         "--update, see results/baselines/README.md)")
    cells, pools = raw.get("cells"), raw.get("pools")
    if not isinstance(cells, dict) or not cells or not isinstance(pools, dict) or not pools:
        raise BenchError(f"baseline {path}: no cells or no pools")
    parsed_cells: dict[str, dict[str, float]] = {}
    for key, metrics in cells.items():
        if not isinstance(metrics, dict) or not all(m in metrics for m in GATED):
            raise BenchError(f"baseline {path}: cell {key} needs certified and clean accuracies")
        parsed_cells[key] = {m: _fraction(metrics[m], f"baseline {path}: cell {key} {m}")
                             for m in (*GATED, "pgd") if m in metrics}
    parsed_pools: dict[str, Pool] = {}
    for key, entry in pools.items():
        where = f"baseline {path}: pool {key}"
        if not isinstance(entry, dict) or not isinstance(entry.get("cells"), list) or not entry["cells"]:
            raise BenchError(f"{where} needs a list of cells")
        unknown = [c for c in entry["cells"] if c not in parsed_cells]
        if unknown:
            raise BenchError(f"{where} names cells the file does not hold: {', '.join(map(str, unknown))}")
        tolerance = entry.get("tolerance")
        if not isinstance(tolerance, dict) or any(m not in tolerance or m not in entry for m in GATED):
            raise BenchError(f"{where} needs certified and clean values and tolerances")
        parsed_pools[key] = Pool(key, tuple(entry["cells"]),
                                 {m: _fraction(entry[m], f"{where} {m}") for m in GATED},
                                 {m: _fraction(tolerance[m], f"{where} tolerance {m}") for m in GATED})
    return Baseline(parsed_cells, parsed_pools)


def _mean(values: Sequence[float]) -> float:
    return math.fsum(values) / len(values)


def compare(baseline: Baseline, runs: Sequence[Run], forced: float | None = None) -> list[PoolResult]:
    """Every gated metric of every pool against the current runs, sorted by pool."""
    now = {r.key: r for r in runs}
    rows = []
    for key, pool in sorted(baseline.pools.items()):
        missing = tuple(c for c in pool.cells if c not in now)
        for metric in GATED:
            value = None if missing else _mean([getattr(now[c], metric) for c in pool.cells])
            rows.append(PoolResult(key, metric, pool.baseline[metric], value,
                                   pool.tolerance[metric] if forced is None else forced, missing))
    return rows


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
            entry[metric] = _stats([getattr(r, metric) for r in members])
        spread[group] = entry
    return spread


def _stats(values: Sequence[float]) -> dict[str, float]:
    return {"min": round(min(values), 6), "max": round(max(values), 6), "range": round(max(values) - min(values), 6),
            "sd": round(statistics.stdev(values), 6)}


def measure_pool_spread(pools: dict[str, list[str]], runs: Sequence[Run]) -> dict[str, dict[str, Any]]:
    """For every pool, its mean over each seed that has all of the pool's cell groups, and their spread."""
    by_group_seed = {(r.group, r.seed): r for r in runs}
    seeds = sorted({r.seed for r in runs})
    spread: dict[str, dict[str, Any]] = {}
    for key, cells in sorted(pools.items()):
        groups = sorted({c.rsplit("/", 1)[0] for c in cells})
        complete = [s for s in seeds if all((g, s) in by_group_seed for g in groups)]
        if len(complete) < 2:
            continue
        entry: dict[str, Any] = {"seeds": complete}
        for metric in GATED:
            values = [_mean([getattr(by_group_seed[g, s], metric) for g in groups]) for s in complete]
            entry[metric] = {**_stats(values), "values": [round(v, 6) for v in values]}
        spread[key] = entry
    return spread


def _round_up(value: float) -> float:
    """Up to 0.001, so that the recorded number never sits below the rule's."""
    return math.ceil(value * 1000 - 1e-6) / 1000


COLLAPSE_RATIO = 0.5


def _collapsing(spread: dict[str, dict[str, Any]], run: Run) -> str | None:
    """Why a cell is left out of its pool (its certified seed range), or None."""
    measured = spread.get(run.group)
    if measured is None or measured["certified"]["min"] >= COLLAPSE_RATIO * measured["certified"]["max"]:
        return None
    c = measured["certified"]
    return (f"certified {100 * c['min']:.1f}–{100 * c['max']:.1f} % over seeds "
            f"{', '.join(map(str, measured['seeds']))}: collapses in some")


def baseline_record(runs: Sequence[Run], spread_runs: Sequence[Run], floor: float, z: float) -> dict[str, Any]:
    """The baseline file's content: every run's accuracies, and per method its pool with the tolerance its
    measured seed spread earns."""
    cell_spread = measure_spread(spread_runs)
    members: dict[str, list[Run]] = defaultdict(list)
    for run in runs:
        members[pool_key(run)].append(run)
    pool_cells: dict[str, list[str]] = {}
    left_out: dict[str, dict[str, str]] = {}
    for key, group in members.items():
        stable = [r for r in group if _collapsing(cell_spread, r) is None] or group
        pool_cells[key] = [r.key for r in stable]
        left_out[key] = {r.key: str(_collapsing(cell_spread, r)) for r in group if r not in stable}
    pool_spread = measure_pool_spread(pool_cells, spread_runs)
    by_key = {r.key: r for r in runs}
    pools: dict[str, dict[str, Any]] = {}
    for key, cells in sorted(pool_cells.items()):
        measured = pool_spread.get(key)
        entry: dict[str, Any] = {"cells": cells}
        if left_out[key]:
            entry["left_out"] = left_out[key]
        entry.update({m: round(_mean([getattr(by_key[c], m) for c in cells]), 6) for m in GATED})
        entry["tolerance"] = {m: min(1.0, max(floor, _round_up(z * math.sqrt(2) * measured[m]["sd"])))
                              if measured else floor for m in GATED}
        pools[key] = entry
    rule = (f"per method pool (its mean over its cells): max({floor}, {z} × √2 × the seed SD of that mean) over "
            f"the seeds in spread.pools; {floor} for pools without measured spread; cells whose certified accuracy "
            f"falls below {COLLAPSE_RATIO} × its best in some seed are left out of their pool")
    return {
        "schema": BASELINE_SCHEMA,
        "tolerance": floor,
        "z": z,
        "tolerance_rule": rule,
        "spread": {"cells": cell_spread, "pools": pool_spread},
        "pools": pools,
        "cells": {r.key: {"certified": r.certified, "clean": r.clean, "pgd": r.pgd} for r in runs},
    }


def _selected(runs: list[Run], scales: list[str] | None, suites: list[str] | None) -> list[Run]:
    """The cells' own records (not re-certifications under another verifier) of the chosen scales/suites."""
    return [r for r in runs if not r.variant and (not scales or r.scale in scales) and (not suites or r.suite in suites)]


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
    runs = _selected(_read(Path(args.out)), args.scale, args.suite)
    if not runs:
        raise BenchError(f"no finished results under {args.out} for the chosen scale/suite; nothing to record")
    spread_runs = runs if args.spread_from is None else _selected(_read(Path(args.spread_from)), args.scale,
                                                                    args.suite)
    floor = DEFAULT_TOLERANCE if args.tolerance is None else _fraction(args.tolerance, "--tolerance")
    if not args.z > 0:
        raise BenchError(f"--z must be positive, got {args.z}")
    record = baseline_record(runs, spread_runs, floor, args.z)
    loose = [k for k, p in record["pools"].items() if any(p["tolerance"][m] >= p[m] for m in GATED)]
    if loose:
        raise BenchError(f"pools {', '.join(loose)}: tolerance at or above the value, so the gate could not see "
                         "a collapse; make those cells learn (or measure more seeds) before recording them")
    traj = None
    if args.trajectories is not None:
        traj = trajectory.record(spread_runs, _selected(_read(Path(args.calibrate_from)), args.scale, args.suite))
    atomic_write_json(path, record)
    print(f"wrote {path}: {len(record['cells'])} cells in {len(record['pools'])} pools, tolerance "
          f"{record['tolerance_rule']}")
    if traj is not None:
        atomic_write_json(Path(args.trajectories), traj)
        print(f"wrote {args.trajectories}: training logs of {len(traj['cells'])} runs, tolerance {traj['rule']}")
    return 0


def pool_table(rows: list[PoolResult]) -> str:
    table = [[r.pool, r.metric, _pct(r.baseline), _pct(r.now), _pct(r.delta, signed=True), _pct(r.tolerance),
              r.status] for r in rows]
    return tabulate(table, headers=["method pool", "metric", "baseline %", "now %", "Δ points", "tolerance",
                                    "status"], tablefmt="simple", disable_numparse=True,
                    colalign=("left", "left", "right", "right", "right", "right", "left"))


def _cell_table(baseline: Baseline, cells: list[str], now: dict[str, Run]) -> str:
    table = []
    for cell in cells:
        run = now.get(cell)
        row = [cell]
        for metric in GATED:
            value = None if run is None else getattr(run, metric)
            delta = None if value is None else value - baseline.cells[cell][metric]
            row += [_pct(baseline.cells[cell][metric]), _pct(value), _pct(delta, signed=True)]
        row.append(_pct(None if run is None else run.pgd))
        row.append("MISSING" if run is None else "")
        table.append(row)
    return tabulate(table, headers=["cell", "cert. base", "cert. now", "Δ", "clean base", "clean now", "Δ",
                                    "pgd now", ""], tablefmt="simple", disable_numparse=True)


def check_command(args: argparse.Namespace) -> int:
    if args.baseline is None and args.fixed is None:
        raise BenchError("check needs --baseline FILE, --fixed DIR or both")
    if args.trajectories is not None and args.baseline is None:
        raise BenchError("--trajectories belongs to the baseline's cells: give --baseline too")
    if args.calibrate_from is not None and not (args.update and args.trajectories):
        raise BenchError("--calibrate-from sets the tolerances of --trajectories FILE with --update")
    if args.update and args.trajectories is not None and args.calibrate_from is None:
        raise BenchError("--trajectories with --update needs --calibrate-from DIR: the same cells run under "
                         "another CPU build, whose drift sets the tolerances")
    if args.fixed_from is not None and not (args.update and args.fixed):
        raise BenchError("--fixed-from imports cells into --fixed DIR with --update")
    if args.update:
        if args.fixed is not None:
            fixed.record(Path(args.fixed), None if args.fixed_from is None else Path(args.fixed_from),
                         fixed.DEFAULT_TOLERANCE)
        return 0 if args.baseline is None else update_command(args)
    if args.spread_from is not None or args.scale or args.suite or args.z != DEFAULT_Z:
        raise BenchError("--scale, --suite, --spread-from and --z choose what --update records; the check itself "
                         "covers every pool of the baseline")
    rc = 0
    if args.baseline is not None:
        # Read once: both layers judge the same runs (and the reader's problems are reported once).
        runs = _selected(_read(Path(args.out)), None, None)
        rc = baseline_check(args, runs)
        if args.trajectories is not None and not trajectory_check(args, runs):
            rc = 1
    if args.fixed is not None and not fixed.check(Path(args.fixed)):
        print(f"check FAILED: fixed checkpoints in {args.fixed} changed verdicts beyond their tolerance: a "
              f"certifier, attack or evaluation change. If it is meant (and sound), re-record them with "
              f"`python -m bench check --fixed {args.fixed} --update`", file=sys.stderr)
        rc = 1
    return rc


def baseline_check(args: argparse.Namespace, runs: list[Run]) -> int:
    path = Path(args.baseline)
    baseline = load_baseline(path)
    forced = None if args.tolerance is None else _fraction(args.tolerance, "--tolerance")
    rows = compare(baseline, runs, forced)
    print(pool_table(rows))
    now = {r.key: r for r in runs}
    failed_pools = sorted({r.pool for r in rows if r.failed})
    for key in failed_pools:
        print(f"\ncells of {key}:")
        print(_cell_table(baseline, list(baseline.pools[key].cells), now))
    gated_suites = {tuple(key.split("/")[:2]) for key in baseline.cells}
    new = [r.key for r in runs if (r.scale, r.suite) in gated_suites and r.key not in baseline.cells]
    if new:
        print(f"not in the baseline (add with --update): {', '.join(new)}", file=sys.stderr)
    if not failed_pools:
        print(f"check passed: {len(baseline.pools)} method pools ({len(baseline.cells)} cells) within their "
              f"tolerances of {path}")
        return 0
    by_status: dict[str, set[str]] = defaultdict(set)
    for r in rows:
        if r.failed:
            by_status[r.status].add(r.pool)
    parts = [f"{status}: {', '.join(sorted(pools))}" for status, pools in sorted(by_status.items())]
    print(f"check FAILED against {path}: {'; '.join(parts)}", file=sys.stderr)
    if by_status.get("SUSPECT"):
        print(f"SUSPECT: certified accuracy far above its baseline: {SOUNDNESS_HINT}", file=sys.stderr)
    if by_status.get("MISSING"):
        print("MISSING: a cell without a usable result; an inconsistent one (the 'skipped:' lines), such as "
              f"certified above PGD accuracy, counts as missing. If certified exceeds PGD, {SOUNDNESS_HINT}",
              file=sys.stderr)
    return 1


def trajectory_check(args: argparse.Namespace, runs: list[Run]) -> bool:
    """The training logs of the runs against the recorded ones; True when none diverged."""
    recorded = trajectory.load(Path(args.trajectories))
    divergences, compared, unrecorded = trajectory.compare(recorded, runs)
    if unrecorded:
        print(f"training logs not compared (no recorded log for their seed; the pooled gate still judges them): "
              f"{', '.join(unrecorded)}", file=sys.stderr)
    if not divergences:
        print(f"trajectories passed: {len(compared)} training logs reproduce {args.trajectories} within tolerance")
        return True
    print("\ntraining logs that left their recorded trajectory (earliest epoch per cell):")
    print(trajectory.table(divergences))
    cells = sorted({d.cell for d in divergences})
    print(f"check FAILED: {len(cells)} of {len(compared)} training logs diverged from {args.trajectories}: the "
          f"training of these cells changed beyond float rounding. If that is meant, look at its effect on accuracy "
          f"(the pool table above, the small cells) before re-recording with --update", file=sys.stderr)
    return False


def register_verb(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("check", help="fail when a method's certified/clean accuracy drops below a committed baseline")
    p.add_argument("--baseline", help="baseline JSON, e.g. results/baselines/smoke.json")
    p.add_argument("--fixed", metavar="DIR", help="fixed checkpoints to evaluate and compare point by point, e.g. "
                                                  "results/baselines/fixed; with --update: re-record their verdicts")
    p.add_argument("--fixed-from", metavar="DIR", help="with --fixed and --update: import every finished cell "
                                                       "under DIR as a fixed checkpoint")
    add_out_argument(p, "where the result files are read")
    p.add_argument("--tolerance", type=float,
                   help="allowed drop of a method's mean as a fraction, e.g. 0.01 = one point, for every pool "
                        "(default: each pool's own from the baseline file); with --update: the floor")
    p.add_argument("--z", type=float, default=DEFAULT_Z,
                   help=f"with --update: a pool's tolerance is this many standard deviations of the seed-to-seed "
                        f"difference of its mean (default {DEFAULT_Z})")
    p.add_argument("--update", action="store_true", help="rewrite the baseline from the current results")
    p.add_argument("--scale", nargs="+", help="with --update: record only these scales (default: all)")
    p.add_argument("--suite", nargs="+", help="with --update: record only these suites (default: all)")
    p.add_argument("--trajectories", metavar="FILE",
                   help="recorded training logs of the baseline's cells, e.g. results/baselines/smoke-trajectories."
                        "json: every run of a recorded cell and seed must reproduce its log within tolerance; with "
                        "--update: re-record them from --spread-from")
    p.add_argument("--calibrate-from", metavar="DIR",
                   help="with --update and --trajectories: results root of the same cells run under another CPU "
                        "build (e.g. BENCH_CPU_ISA=avx2), whose drift sets each log's tolerance")
    p.add_argument("--spread-from", help="with --update: results root with several seeds per cell to measure "
                                         "the run-to-run spread (default: --out)")
    p.set_defaults(func=check_command)
