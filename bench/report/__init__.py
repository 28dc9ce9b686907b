"""``python -m bench report``: Table-2-style reports and figures rebuilt from the result files alone.

For every (scale, suite) it writes, under ``<results>/<scale>/<suite>/``, ``report.md`` / ``.csv`` /
``.tex`` / ``.html`` and ``figures/`` (PNG plus the CSV drawn in it): certified accuracy over ε, and
the training curves of every cell. Inputs are read in sorted order and nothing depends on the clock, so
re-running on unchanged results rewrites byte-identical files.
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Mapping, Sequence

import pandas as pd

from bench.data import DISPLAY_NAMES
from bench.errors import BenchError, NoResults
from bench.reference import card_rows, load_note_marks, load_table2
from bench.report import plots, render
from bench.report.records import Run, find_suites, read_runs, read_train_log, report_problems
from bench.report.table import Stat, TableRow, build_rows, display_eps, display_frame, header_line, numeric_frame
from bench.store import add_out_argument, atomic_write_bytes, atomic_write_text, ensure_writable, eps_slug, write_csv
from methods.base import MethodCard, ReferenceRow

FORMATS = ("md", "csv", "tex", "html")
FIGURES_DIR = "figures"


@dataclass(frozen=True)
class SuiteReport:
    """Everything one suite's outputs are rendered from."""

    scale: str
    suite: str
    runs: list[Run]
    rows: list[TableRow]
    header: str
    legend: str
    frame: pd.DataFrame
    cards: Mapping[str, MethodCard]
    reference: Sequence[ReferenceRow]

    @property
    def title(self) -> str:
        return f"certbench: suite {self.suite}, scale {self.scale}"

    @property
    def markdown(self) -> str:
        return render.markdown_block(self.header, self.frame, self.legend)


def registered_cards() -> dict[str, MethodCard]:
    from methods import base as registry

    return {name: registry.get(name).card for name in registry.list_methods()}


def build_suite_report(results_root: Path, scale: str, suite: str, cards: Mapping[str, MethodCard] | None = None,
                       reference: Sequence[ReferenceRow] | None = None) -> SuiteReport:
    """Read the suite's result files (reporting unusable ones on stderr) and lay out its table.

    ``cards`` default to the registered methods' cards and ``reference`` to the paper's Table 2; methods in
    the results without a card are shown under their own name, without Δ.
    """
    runs, problems = read_runs(results_root, scale, suite)
    report_problems(problems)
    if not runs:
        raise NoResults(f"no finished results under {results_root / scale / suite}")
    cards = registered_cards() if cards is None else cards
    reference = load_table2() if reference is None else reference
    note_marks = load_note_marks()
    rows = build_rows(runs, reference, cards)
    # An unusable result file is named in every output, so that a row missing from a table is never silent.
    legend = "\n\n".join(part for part in (render.legend_line(rows, note_marks),
                                            render.problems_line(problems, results_root)) if part)
    return SuiteReport(scale, suite, runs, rows, header_line(runs, scale, suite), legend,
                       display_frame(rows, note_marks), cards, reference)


def suite_table_markdown(results_root: Path, scale: str, suite: str) -> str:
    """The Markdown table of one suite, our rows beside the paper's, with its provenance line and legend."""
    return build_suite_report(results_root, scale, suite).markdown


def write_suite_report(results_root: Path, scale: str, suite: str, formats: Sequence[str] = FORMATS,
                       cards: Mapping[str, MethodCard] | None = None,
                       reference: Sequence[ReferenceRow] | None = None) -> tuple[SuiteReport, list[Path]]:
    """Build the suite's report and write the requested formats and all figures; returns the files written."""
    report = build_suite_report(results_root, scale, suite, cards, reference)
    out = results_root / scale / suite
    ensure_writable(out / FIGURES_DIR)
    figures = _write_figures(report, out)
    texts = {
        "md": lambda: render.markdown_page(report.title, report.markdown, figures),
        "csv": lambda: render.csv_text(numeric_frame(report.rows, scale, suite)),
        "tex": lambda: render.latex_table(report.header, report.frame, report.legend),
        "html": lambda: render.html_page(report.title, report.header, report.rows, report.frame, report.legend,
                                         figures),
    }
    written = [out / f.png for f in figures] + [out / f.data for f in figures]
    for fmt in formats:
        path = out / f"report.{fmt}"
        atomic_write_text(path, texts[fmt]())
        written.append(path)
    return report, written


def _write_figures(report: SuiteReport, out: Path) -> list[render.FigureFile]:
    """Write every figure of the suite and remove figures of cells that no longer have results."""
    made: list[tuple[str, str, plots.Plot]] = []
    by_dataset: dict[str, list[Run]] = defaultdict(list)
    for run in report.runs:
        by_dataset[run.dataset].append(run)
    for dataset, runs in sorted(by_dataset.items()):
        name = DISPLAY_NAMES.get(dataset, dataset)
        made.append((f"certified_vs_eps_{dataset}", f"Certified accuracy vs ε, {name} ({report.scale})",
                     plots.certified_vs_eps(_eps_series(dataset, runs, report), f"{name}, {report.scale}")))
    cells: dict[str, list[Run]] = defaultdict(list)
    for run in report.runs:
        if not run.variant:  # a re-certified model has the training log of its cell
            cells[run.group].append(run)
    for group, runs in sorted(cells.items()):
        first = runs[0]
        title = (f"Training: {first.method}, {DISPLAY_NAMES.get(first.dataset, first.dataset)} "
                 f"ε={display_eps(first.eps)} ({report.scale})")
        curves = plots.training_curves({r.seed: read_train_log(r.folder) for r in runs}, title)
        if curves is not None:
            made.append((f"train_{first.dataset}_{eps_slug(first.eps)}_{first.method}", title, curves))

    folder = out / FIGURES_DIR
    figures = []
    for stem, title, (png, header, rows) in made:
        atomic_write_bytes(folder / f"{stem}.png", png)
        write_csv(folder / f"{stem}.csv", header, rows)
        figures.append(render.FigureFile(title, f"{FIGURES_DIR}/{stem}.png", f"{FIGURES_DIR}/{stem}.csv", png))
    keep = {f"{stem}.{ext}" for stem, _, _ in made for ext in ("png", "csv")}
    for stale in sorted(folder.glob("*")):
        if stale.is_file() and stale.suffix in (".png", ".csv") and stale.name not in keep:
            stale.unlink()
    return figures


def _eps_series(dataset: str, runs: Sequence[Run], report: SuiteReport) -> list[plots.Series]:
    """Our certified accuracy per method over ε, and the published points of the row each method reproduces."""
    by_method: dict[tuple[str, str], dict[Fraction, list[float]]] = defaultdict(lambda: defaultdict(list))
    for run in runs:
        by_method[(run.method, run.variant)][run.eps].append(run.certified)
    series = []
    for (method, variant), per_eps in sorted(by_method.items()):
        points = []
        for eps, values in sorted(per_eps.items()):
            stat = Stat.of(values)
            points.append(plots.Point(eps, stat.median, stat.low, stat.high))
        label = f"ours: {method}" + (f" ({variant[1:]} verifier)" if variant else "")
        series.append(plots.Series(label, "ours", method, tuple(points)))
        if method in report.cards and not variant:
            published = sorted((r for r in card_rows(report.cards[method], report.reference)
                                if r.dataset == dataset and r.certified is not None), key=lambda r: r.eps)
            if published:
                paper_points = tuple(plots.Point(r.eps, r.certified, r.certified, r.certified) for r in published)
                series.append(plots.Series(f"paper: {published[0].label}, {published[0].source}", "paper", method,
                                           paper_points))
    return series


def parse_formats(text: str) -> list[str]:
    formats = [f.strip() for f in text.split(",") if f.strip()]
    unknown = [f for f in formats if f not in FORMATS]
    if unknown or not formats:
        raise BenchError(f"--format takes a comma list of {', '.join(FORMATS)}; got {text!r}")
    return formats


def report_command(args: argparse.Namespace) -> int:
    root = Path(args.out)
    formats = parse_formats(args.format)
    available = find_suites(root)
    if not available:
        raise BenchError(f"no result files under {root}")
    chosen = [(scale, suite) for scale, suite in available
              if (not args.scale or scale in args.scale) and (not args.suite or suite in args.suite)]
    if not chosen:
        have = ", ".join(f"{scale}/{suite}" for scale, suite in available)
        raise BenchError(f"no results for the chosen suite/scale under {root} (have: {have})")
    found = {name for pair in chosen for name in pair}
    for name in sorted(set(args.scale or []) | set(args.suite or [])):
        if name not in found:
            print(f"note: no results for {name} under {root}", file=sys.stderr)
    for scale, suite in chosen:
        report, written = write_suite_report(root, scale, suite, formats)
        print(f"## {report.title}\n\n{report.markdown}")
        print(f"wrote {len(written)} files under {root / scale / suite}", file=sys.stderr)
    return 0


def register_verb(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("report", help="rebuild Table-2-style reports and figures from the result files")
    add_out_argument(p, "where the result files are read and the reports written")
    p.add_argument("--suite", nargs="+", help="only these suites (default: every suite with results)")
    p.add_argument("--scale", nargs="+", help="only these scales (default: every scale with results)")
    p.add_argument("--format", default=",".join(FORMATS),
                   help=f"comma list of {', '.join(FORMATS)} (default: all); figures are always written")
    p.set_defaults(func=report_command)
