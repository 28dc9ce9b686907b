"""A trained cell's evaluation in slices of its test range (``bench run --eval-shards N``), as separate
jobs or one after another: each slice is written as a part file; the job that completes the set merges
them into ``verdicts.csv`` and ``result.json``, exactly those of one pass (per-point random streams in
``bench.evaluate``), and removes the parts.

A part is written atomically, after its slice is fully evaluated, so a killed job loses only its own
slice and a rerun evaluates just the missing ones. Slices of one cell run side by side, each under its
own lock; the merge takes the cell's lock.
"""

from __future__ import annotations

import json
import sys
from datetime import datetime, timezone
from pathlib import Path

import torch

from bench import data as datamod
from bench import distributed
from bench.config import Cell
from bench.errors import BenchError
from bench.evaluate import VERDICT_COLUMNS, AttackPlan, Evaluation, evaluate, merge
from bench.lock import CellBusy, CellLock
from bench.store import atomic_write_json, dump_config
from methods import base as registry

MAX_SHARDS = 10_000


def part_file(k: int, n: int) -> str:
    return f"eval-part-{k}-of-{n}.json"


def check_shards(n: int | None, k: int | None) -> None:
    if n is None:
        if k is not None:
            raise BenchError("--eval-shard K needs --eval-shards N")
        return
    if not 1 <= n <= MAX_SHARDS:
        raise BenchError(f"--eval-shards must be between 1 and {MAX_SHARDS}, got {n}")
    if k is not None and not 0 <= k < n:
        raise BenchError(f"--eval-shard must be between 0 and {n - 1} (--eval-shards {n}), got {k}")


def trained(folder: Path, cell: Cell) -> bool:
    """Training finished under the cell's config: its deployed model is saved."""
    from bench.runner import MODEL

    try:
        config = json.loads((folder / "config.json").read_text())["config"]
    except (OSError, ValueError, KeyError):
        return False
    return (folder / MODEL).exists() and config == dump_config(cell.config)


def slice_range(cell: Cell, k: int, n: int) -> tuple[int, int]:
    return distributed.shard(*cell.scale.test_range, distributed.Ranks(k, n, 0))


def evaluate_slice(cell: Cell, folder: Path, device: torch.device, test: datamod.Split, k: int, n: int,
                   progress: bool) -> bool:
    """Evaluate slice ``k`` of ``n`` unless its part exists or another job holds it; True if it ran."""
    from bench import load_model

    part = folder / part_file(k, n)
    if part.exists():
        return False
    try:
        with CellLock(folder, f".lock-part-{k}-of-{n}"):
            if part.exists():
                return False
            started = datetime.now(timezone.utc).isoformat(timespec="seconds")
            ev = evaluate(registry.get(cell.method), load_model(folder, str(device)), test, slice_range(cell, k, n),
                          float(cell.eps), AttackPlan.of(cell.scale), cell.scale.eval_batch_size, device, cell.seed,
                          None, progress=progress)
            rows = [dict(zip(VERDICT_COLUMNS, (str(v) for v in row))) for row in ev.rows()]
            atomic_write_json(part, {"slice": [k, n], "range": list(slice_range(cell, k, n)), "started": started,
                                     "certifier": ev.certifier, "timings_s": ev.timings_s, "rows": rows})
    except CellBusy as busy:
        print(f"  slice {k} of {n}: another job holds it ({busy})", file=sys.stderr)
        return False
    print(f"  slice {k} of {n} (test points {ev.index[0] if ev.n else '-'}..{ev.index[-1] if ev.n else '-'}): "
          f"clean {sum(ev.clean)}, certified {sum(ev.certified)} of {ev.n}", file=sys.stderr)
    return True


def merged(folder: Path, n: int) -> tuple[Evaluation, str] | None:
    """The slices' merged evaluation and the earliest start, once every part of ``n`` is there."""
    parts = []
    for k in range(n):
        try:
            parts.append(json.loads((folder / part_file(k, n)).read_text()))
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            raise BenchError(f"{folder / part_file(k, n)} is corrupt ({exc.__class__.__name__}): delete it "
                             "and run the slice again") from None
    evaluations = []
    for p in parts:
        ev = Evaluation.from_rows(p["rows"], p["certifier"])
        ev.timings_s = dict(p["timings_s"])
        evaluations.append(ev)
    return merge(evaluations), min(p["started"] for p in parts)


def remove_parts(folder: Path) -> None:
    for path in folder.glob("eval-part-*-of-*.json"):
        path.unlink()


def parts_done(folder: Path, n: int) -> int:
    return sum((folder / part_file(k, n)).exists() for k in range(n))


def progress(folder: Path) -> str | None:
    """"k of n evaluation slices" while a sliced evaluation is under way, else None."""
    counts: dict[int, int] = {}
    for path in folder.glob("eval-part-*-of-*.json"):
        n = int(path.stem.rsplit("-of-", 1)[1])
        counts[n] = counts.get(n, 0) + 1
    return "; ".join(f"trained; {k} of {n} evaluation slices" for n, k in sorted(counts.items())) or None


