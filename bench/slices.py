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
from bench.evaluate import VERDICT_COLUMNS, Evaluation, evaluate_cell, merge
from bench.lock import CellBusy, CellLock
from bench.store import atomic_write_json, dump_config


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
                   progress: bool) -> None:
    """Evaluate slice ``k`` of ``n`` unless its part exists or another job holds it."""
    from bench import load_model

    part = folder / part_file(k, n)
    if part.exists():
        return
    span = slice_range(cell, k, n)
    try:
        with CellLock(folder, f".lock-part-{k}-of-{n}"):
            if part.exists():
                return
            started = datetime.now(timezone.utc).isoformat(timespec="seconds")
            ev = evaluate_cell(cell, load_model(folder, str(device)), test, span, device, progress)
            rows = [dict(zip(VERDICT_COLUMNS, (str(v) for v in row))) for row in ev.rows()]
            atomic_write_json(part, {"slice": [k, n], "range": list(span), "started": started,
                                     "certifier": ev.certifier, "timings_s": ev.timings_s, "rows": rows})
    except CellBusy as busy:
        print(f"  slice {k} of {n}: another job holds it ({busy})", file=sys.stderr)
        return
    print(f"  slice {k} of {n} (test points [{span[0]}, {span[1]})): clean {sum(ev.clean)}, certified "
          f"{sum(ev.certified)} of {ev.n}", file=sys.stderr)


def merged(folder: Path, n: int) -> tuple[Evaluation, str] | None:
    """The slices' merged evaluation and the earliest start, once every part of ``n`` is there."""
    evaluations, starts = [], []
    for k in range(n):
        path = folder / part_file(k, n)
        try:
            part = json.loads(path.read_text())
            ev = Evaluation.from_rows(part["rows"], part["certifier"])
            ev.timings_s = dict(part["timings_s"])
            starts.append(str(part["started"]))
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise BenchError(f"{path} is corrupt ({exc.__class__.__name__}): delete it and run the slice again") \
                from None
        evaluations.append(ev)
    return merge(evaluations), min(starts)


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


