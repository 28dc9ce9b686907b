"""Published reference numbers (``results/reference/``) as typed rows.

The CSV files hold accuracies in percent exactly as published, so that a reviewer can diff them against
the paper; the rows returned here hold fractions in [0, 1] like every other accuracy in the harness
(``None`` where the paper has no number). See ``results/reference/README.md`` for the columns.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from bench.errors import BenchError
from bench.store import parse_eps, read_csv
from methods.base import MethodCard, ReferenceRow

REFERENCE_DIR = Path(__file__).resolve().parent.parent / "results" / "reference"
TABLE2_FILE = "table2.csv"
BASELINES_FILE = "baselines.csv"
NOTES_FILE = "notes.csv"


def load_table2(folder: Path = REFERENCE_DIR) -> list[ReferenceRow]:
    """Every row of the ℓ∞-dist paper's Table 2, in the paper's order.

    ``label`` is the paper's method label, ``source`` its Reference column ("This paper",
    "(Gowal et al. 2018)"), ``notes`` its footnote marks separated by ``;``.
    """
    path = folder / TABLE2_FILE
    return [
        _row(path, line, raw, label=raw["method"], source=raw["reference"], notes=raw["notes"])
        for line, raw in _read(path, ("dataset", "eps", "method", "reference", "clean", "pgd", "certified", "notes"))
    ]


def load_baselines(folder: Path = REFERENCE_DIR) -> list[ReferenceRow]:
    """The baselines' own published numbers; ``source`` says where each was traced, and ``notes`` names the
    model and, for rows with an open question, starts the question with ``VERIFY:``."""
    path = folder / BASELINES_FILE
    columns = ("dataset", "eps", "method", "model", "clean", "pgd", "certified", "source", "verify")
    rows = []
    for line, raw in _read(path, columns):
        notes = f"model: {raw['model']}" + (f"; VERIFY: {raw['verify']}" if raw["verify"] else "")
        rows.append(_row(path, line, raw, label=raw["method"], source=raw["source"], notes=notes))
    return rows


def load_note_marks(folder: Path = REFERENCE_DIR) -> dict[str, str]:
    """Footnote mark ("*", "†", "‡") -> its meaning in Table 2."""
    return {raw["mark"]: raw["meaning"] for _, raw in _read(folder / NOTES_FILE, ("mark", "meaning"))}


def card_rows(card: MethodCard, rows: Sequence[ReferenceRow]) -> list[ReferenceRow]:
    """The published rows a method card says its method reproduces (one per dataset and ε)."""
    return [r for r in rows if r.label == card.reference_label and r.source == card.reference_source]


def _read(path: Path, columns: tuple[str, ...]) -> list[tuple[int, dict[str, str]]]:
    try:
        raw = read_csv(path)
    except FileNotFoundError:
        raise BenchError(f"reference file {path} is missing") from None
    if raw and tuple(raw[0]) != columns:
        raise BenchError(f"{path}: columns are {', '.join(raw[0])}, expected {', '.join(columns)}")
    # Line 1 is the header, so data row i sits on line i + 2: messages point at the line to fix.
    return [(i + 2, r) for i, r in enumerate(raw)]


def _row(path: Path, line: int, raw: dict[str, str], *, label: str, source: str, notes: str) -> ReferenceRow:
    try:
        eps = parse_eps(raw["eps"])
    except BenchError as exc:
        raise BenchError(f"{path}:{line}: {exc}") from None
    return ReferenceRow(
        dataset=raw["dataset"],
        eps=eps,
        label=label,
        source=source,
        clean=_percent(path, line, raw["clean"]),
        pgd=_percent(path, line, raw["pgd"]),
        certified=_percent(path, line, raw["certified"]),
        notes=notes,
    )


def _percent(path: Path, line: int, text: str) -> float | None:
    if not text.strip():
        return None
    try:
        value = float(text)
    except ValueError:
        raise BenchError(f"{path}:{line}: accuracy {text!r} is not a number") from None
    if not 0.0 <= value <= 100.0:
        raise BenchError(f"{path}:{line}: accuracy {text} is not a percentage")
    # Published values have two decimals; rounding keeps 97.95 -> 0.9795 exact rather than 0.9795000000000001.
    return round(value / 100.0, 6)
