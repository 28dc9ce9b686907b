"""``python -m bench status``: where every cell of a suite stands, one line per cell, then totals.

done / stale / corrupt come from the result file; running from the cell's lock (a live process holds it,
whether a job's or a local run's); queued / failed from the job marker a ``--executor`` driver wrote and
what the scheduler says of that job now; partial (epoch k of n) from the epoch log, or (k of n evaluation
slices) from the part files of a sliced evaluation; else missing. Reading
the state changes nothing.
"""

from __future__ import annotations

import argparse
from collections import Counter
from pathlib import Path

from bench import slices
from bench.config import Cell
from bench.executors import JobMarker, job_states, last_log_line
from bench.lock import holder
from bench.runner import add_cell_arguments, cell_folder, epochs_done, result_state, select_cells
from bench.store import add_out_argument

ORDER = ("done", "running", "queued", "partial", "failed", "missing", "stale", "corrupt")


def cell_lines(cells: list[Cell], out: Path) -> list[tuple[str, Cell, str]]:
    """(state, cell, detail) for every cell."""
    results = {c: result_state(c, out) for c in cells}
    open_cells = [c for c in cells if results[c] not in ("done", "stale", "corrupt")]
    markers = {c: m for c in open_cells if (m := JobMarker.read(cell_folder(c, out))) is not None}
    jobs = job_states(markers)
    lines = []
    for cell in cells:
        folder = cell_folder(cell, out)
        state, marker = results[cell], markers.get(cell)
        progress = slices.progress(folder) or f"epoch {epochs_done(folder)} of {cell.config.get('epochs', '?')}"
        started = f"; {progress}" if state == "partial" else ""
        detail = progress if state == "partial" else ""
        if state in ("done", "stale", "corrupt"):
            pass
        elif (who := holder(folder)) is not None:
            state, detail = "running", f"{who.describe()}; {progress}"
        elif marker is not None and jobs[cell] == "unknown":
            state, detail = "queued?", f"job {marker.job}, the scheduler could not be asked{started}"
        elif marker is not None and jobs[cell] != "ended":
            state, detail = jobs[cell], f"job {marker.job}{started}"
        elif marker is not None:
            state, detail = "failed", f"job {marker.job}: {last_log_line(marker.log)}{started}"
        lines.append((state, cell, detail))
    return lines


def status_command(args: argparse.Namespace) -> int:
    suite, cells = select_cells(args)
    out = Path(args.out)
    lines = cell_lines(cells, out)
    for state, cell, detail in lines:
        print(f"{state:8s} {cell.label}" + (f"  ({detail})" if detail else ""))
    counts = Counter(state for state, _, _ in lines)
    shown = [s for s in ORDER if counts[s]] + sorted(s for s in counts if s not in ORDER)
    print(f"{suite.name} ({args.scale}) in {out}: {len(cells)} cells: " + ", ".join(f"{counts[s]} {s}" for s in shown))
    return 0


def register_verb(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("status", help="one line per cell: done / running / queued / partial / failed / missing")
    add_cell_arguments(p)
    add_out_argument(p, "where the cells' folders are")
    p.set_defaults(func=status_command)
