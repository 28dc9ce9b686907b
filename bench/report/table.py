"""The Table-2-style rows of one suite: the paper's rows with ours interleaved, as numbers and as text.

Per (dataset, ε) the paper's rows come in the paper's order, and each of our rows follows the paper row
its method card says it reproduces (our rows without one close the group). Our accuracies are the median
over seeds with min and max, because the paper reports the median of 8 runs.
"""

from __future__ import annotations

import statistics
from collections import defaultdict
from dataclasses import dataclass
from fractions import Fraction
from typing import Iterable, Mapping, Sequence

import pandas as pd

from bench.data import DISPLAY_NAMES
from bench.reference import card_rows
from bench.report.records import Run
from bench.store import format_eps
from methods.base import MethodCard, ReferenceRow

METRICS = ("clean", "pgd", "apgd", "certified")
"""``apgd``: accuracy under PGD and the APGD ensemble, the strongest attack; "-" where it did not run."""
COLUMNS = ("Dataset", "ε", "Method", "Reference", "Clean", "PGD", "APGD", "Certified", "Unknown", "Δ Cert.",
           "Certifier", "n", "Wall")
NUMERIC_COLUMNS = ("Clean", "PGD", "APGD", "Certified", "Unknown", "Δ Cert.", "n", "Wall")
"""``Unknown``: the unknown band, accuracy under the strongest attack that ran (APGD, else PGD) minus
certified accuracy, in points: test points that neither a verifier certified nor an attack broke."""
ASSUMED_MARK = "§"
"""The footnote (``results/reference/notes.csv``) of our rows whose config holds a value we assumed."""
STALE_MARK = "‖"
"""The footnote of our rows whose runs finished under an earlier recipe than the suite file's."""


@dataclass(frozen=True)
class Stat:
    """An accuracy (fraction in [0, 1]) over ``count`` runs: median, min and max."""

    median: float
    low: float
    high: float
    count: int

    @classmethod
    def of(cls, values: Sequence[float]) -> Stat:
        return cls(statistics.median(values), min(values), max(values), len(values))


@dataclass(frozen=True)
class TableRow:
    """One line of the table: a published row (``ours`` False) or the runs of one of our cells."""

    ours: bool
    dataset: str
    eps: Fraction
    method: str
    reference: str
    notes: str
    clean: Stat | None
    pgd: Stat | None
    apgd: Stat | None
    certified: Stat | None
    delta: float | None
    """Our median certified accuracy minus that of the paper row our method reproduces (fraction)."""
    method_id: str = ""
    """The registered method behind our row (empty for published rows)."""
    seeds: tuple[int, ...] = ()
    certifier: str = ""
    n_examples: str = ""
    wall_s: float | None = None
    """Median wall time of one run in seconds (train + evaluate)."""

    @property
    def unknown_band(self) -> float | None:
        """Median accuracy under the strongest attack that ran minus median certified accuracy (fraction)."""
        attack = self.apgd or self.pgd
        if not self.ours or attack is None or self.certified is None:
            return None
        return attack.median - self.certified.median


def build_rows(runs: Sequence[Run], reference: Sequence[ReferenceRow],
               cards: Mapping[str, MethodCard]) -> list[TableRow]:
    """The table of the runs' (dataset, ε) groups, sorted by dataset id and ε."""
    cells: dict[tuple[str, Fraction, str, str], list[Run]] = defaultdict(list)
    for run in runs:
        cells[(run.dataset, run.eps, run.method, run.tag + run.variant)].append(run)
    reproduced = {name: card_rows(card, reference) for name, card in cards.items()}

    rows: list[TableRow] = []
    for dataset, eps in sorted({(d, e) for d, e, _, _ in cells}):
        published = [r for r in reference if r.dataset == dataset and r.eps == eps]
        ours = sorted((method, variant, group) for (d, e, method, variant), group in cells.items()
                      if (d, e) == (dataset, eps))
        placed: dict[int | None, list[TableRow]] = defaultdict(list)
        for method, _, group in ours:
            target = next((i for i, r in enumerate(published) if r in reproduced.get(method, [])), None)
            label = cards[method].reference_label if method in cards else method
            # A --set variant sits under the row of the recipe it varies, but its Δ to that row means nothing.
            paper = None if target is None or group[0].tag else published[target]
            placed[target].append(_our_row(label, method, group, paper))
        for i, paper in enumerate(published):
            rows.append(_paper_row(paper))
            rows.extend(placed[i])
        rows.extend(placed[None])
    return rows


def _paper_row(row: ReferenceRow) -> TableRow:
    def stat(value: float | None) -> Stat | None:
        return None if value is None else Stat(value, value, value, 1)

    return TableRow(False, row.dataset, row.eps, row.label, row.source, row.notes,
                    stat(row.clean), stat(row.pgd), None, stat(row.certified), None)


def _our_row(label: str, method: str, runs: list[Run], paper: ReferenceRow | None) -> TableRow:
    runs = sorted(runs, key=lambda r: r.seed)
    seeds = tuple(r.seed for r in runs)
    stats = {m: Stat.of([getattr(r, m) for r in runs]) for m in ("clean", "pgd", "certified")}
    delta = None
    if paper is not None and paper.certified is not None:
        delta = stats["certified"].median - paper.certified
    who = f"seed {seeds[0]}" if len(seeds) == 1 else f"{len(seeds)} seeds"
    assumed = {k: why for r in runs for k, why in r.assumed.items()}
    notes = "; ".join(([STALE_MARK] if any(r.stale for r in runs) else [])
                      + ([ASSUMED_MARK, *(f"assumed {k}: {why}" for k, why in sorted(assumed.items()))]
                         if assumed else []))
    if runs[0].variant:
        who += f", re-certified with {runs[0].certifier}"
    return TableRow(
        ours=True, dataset=runs[0].dataset, eps=runs[0].eps, method=label,
        reference=f"ours ({method}{'+' + runs[0].tag if runs[0].tag else ''}, {who})",
        notes=notes, clean=stats["clean"], pgd=stats["pgd"], apgd=_stat([r.apgd for r in runs]),
        certified=stats["certified"], delta=delta,
        method_id=method, seeds=seeds, certifier=_joined(r.certifier for r in runs),
        n_examples=_joined(str(r.n_examples) for r in runs),
        wall_s=statistics.median(r.wall_s for r in runs),
    )


def _stat(values: Sequence[float | None]) -> Stat | None:
    """A Stat over runs, or ``None`` unless every run has the value (a median over some seeds would
    describe other runs than the row's other columns do)."""
    present = [v for v in values if v is not None]
    return Stat.of(present) if len(present) == len(values) else None


def _joined(values: Iterable[str]) -> str:
    return ", ".join(sorted(set(values)))


def display_eps(eps: Fraction) -> str:
    """ε as the paper writes it: decimals where exact and short (0.1, 0.3), else a fraction (8/255)."""
    if 100 % eps.denominator == 0:
        return f"{float(eps):g}"
    return format_eps(eps)


def percent(value: float) -> str:
    return f"{100 * value:.2f}"


def stat_text(stat: Stat | None) -> str:
    if stat is None:
        return "-"
    if stat.count == 1:
        return percent(stat.median)
    return f"{percent(stat.median)} ({percent(stat.low)}–{percent(stat.high)})"


def delta_text(delta: float | None) -> str:
    # A true minus sign, as typeset in papers (LaTeX output turns it into $-$).
    return "" if delta is None else f"{100 * delta:+.2f}".replace("-", "−")


def band_text(band: float | None) -> str:
    return "" if band is None else f"{100 * band:.2f}"


def duration_text(seconds: float | None) -> str:
    if seconds is None:
        return ""
    if seconds < 100:
        return f"{seconds:.1f} s"
    if seconds < 6000:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def marks(notes: str, known: Mapping[str, str]) -> str:
    """The footnote marks among a row's ``;``-separated notes (remarks that are not marks stay in the CSV)."""
    return "".join(n.strip() for n in notes.split(";") if n.strip() in known)


def display_frame(rows: Sequence[TableRow], note_marks: Mapping[str, str]) -> pd.DataFrame:
    """The table as text, one column per ``COLUMNS`` entry: what markdown, LaTeX and HTML show."""
    records = []
    for row in rows:
        mark = marks(row.notes, note_marks)
        records.append([
            DISPLAY_NAMES.get(row.dataset, row.dataset),
            display_eps(row.eps),
            row.method,
            f"{row.reference} {mark}" if mark else row.reference,
            stat_text(row.clean),
            stat_text(row.pgd),
            stat_text(row.apgd),
            stat_text(row.certified),
            band_text(row.unknown_band),
            delta_text(row.delta),
            row.certifier,
            row.n_examples,
            duration_text(row.wall_s),
        ])
    return pd.DataFrame(records, columns=list(COLUMNS))


def numeric_frame(rows: Sequence[TableRow], scale: str, suite: str) -> pd.DataFrame:
    """The table as data for the CSV file: accuracies and Δ in percent (3 decimals, enough for a median of
    two runs on up to 10 000 examples), ε as an exact fraction, wall time in seconds."""
    def pct(value: float | None) -> float | None:
        return None if value is None else round(100 * value, 3)

    records = []
    for row in rows:
        record: dict[str, object] = {
            "scale": scale, "suite": suite, "row": "ours" if row.ours else "paper", "dataset": row.dataset,
            "eps": format_eps(row.eps), "method": row.method, "method_id": row.method_id, "reference": row.reference,
            "notes": row.notes,
        }
        for metric in METRICS:
            stat: Stat | None = getattr(row, metric)
            record[f"{metric}_pct"] = pct(stat.median if stat else None)
            record[f"{metric}_min_pct"] = pct(stat.low if stat and row.ours else None)
            record[f"{metric}_max_pct"] = pct(stat.high if stat and row.ours else None)
        record["unknown_band_pct"] = pct(row.unknown_band)
        record["delta_certified_pct"] = pct(row.delta)
        record["seeds"] = " ".join(str(s) for s in row.seeds)
        record["certifier"] = row.certifier
        record["n_examples"] = row.n_examples
        record["wall_s"] = None if row.wall_s is None else round(row.wall_s, 3)
        records.append(record)
    return pd.DataFrame(records)


def header_line(runs: Sequence[Run], scale: str, suite: str) -> str:
    """Provenance of the whole table: suite, scale, versions, device and attack of every run behind it."""
    versions: dict[str, set[str]] = defaultdict(set)
    for run in runs:
        for name, version in run.versions.items():
            versions[name].add(version)
    parts = [
        f"suite {suite}",
        f"scale {scale}",
        f"{len({r.group for r in runs})} cells / {len(runs)} runs",
        ", ".join(f"{name} {' / '.join(sorted(v))}" for name, v in sorted(versions.items())),
        f"device: {_joined(r.device for r in runs)}",
        f"attack: {_joined(r.attack for r in runs)}",
        "ours: median (min–max) over seeds; Δ Cert. = ours − the paper row reproduced, in points",
    ]
    return " · ".join(p for p in parts if p)
