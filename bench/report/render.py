"""The suite table in each output format: Markdown (tabulate), CSV and LaTeX (pandas), and one
self-contained HTML page (inline CSS, figures embedded as data URIs and linked by relative path).

Every renderer is a pure function of its inputs, so unchanged results give byte-identical files.
"""

from __future__ import annotations

import base64
import html
from dataclasses import dataclass
from typing import Mapping, Sequence

from pathlib import Path

import pandas as pd
from tabulate import tabulate

from bench.report.table import COLUMNS, NUMERIC_COLUMNS, TableRow


@dataclass(frozen=True)
class FigureFile:
    """A figure written beside the report: paths relative to the report's folder."""

    title: str
    png: str
    data: str
    png_bytes: bytes


def legend_line(rows: Sequence[TableRow], note_marks: Mapping[str, str]) -> str:
    """The meaning of every footnote mark used in the table, on one line ("" if none is used)."""
    used = {n.strip() for r in rows for n in r.notes.split(";")}
    return "; ".join(f"{mark} {meaning}" for mark, meaning in note_marks.items() if mark in used)


def problems_line(problems: Sequence[str], root: Path) -> str:
    """"Not shown: ..." naming every result file that could not be used, or ``""``."""
    if not problems:
        return ""
    prefix = f"{root}/"
    named = "; ".join(p.removeprefix(prefix) for p in problems)
    return f"NOT SHOWN: {len(problems)} unusable result file{'s' if len(problems) > 1 else ''}: {named}"


def markdown_table(frame: pd.DataFrame) -> str:
    # "*" is the paper's IBP mark; unescaped, Markdown may read it as emphasis.
    cells = [[str(v).replace("*", "\\*") for v in row] for row in frame.itertuples(index=False)]
    align = ["right" if c in NUMERIC_COLUMNS else "left" for c in frame.columns]
    return tabulate(cells, headers=list(frame.columns), tablefmt="github", colalign=align, disable_numparse=True)


def markdown_block(header: str, frame: pd.DataFrame, legend: str) -> str:
    """Provenance line, table and footnote legend: what ``bench run`` prints and ``report.md`` embeds."""
    parts = [header, "", markdown_table(frame)]
    if legend:
        parts += ["", legend.replace("*", "\\*")]
    return "\n".join(parts) + "\n"


def markdown_page(title: str, block: str, figures: Sequence[FigureFile]) -> str:
    lines = [f"# {title}", "", block]
    if figures:
        lines += ["## Figures", ""]
        for fig in figures:
            lines += [f"### {fig.title}", "", f"![{fig.title}]({fig.png})", "", f"Data: [{fig.data}]({fig.data})", ""]
    return "\n".join(lines).rstrip("\n") + "\n"


def csv_text(frame: pd.DataFrame) -> str:
    return frame.to_csv(index=False, lineterminator="\n")


_LATEX_SPECIAL = {
    "\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_", "{": r"\{",
    "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}", "–": "--", "−": "$-$", "†": r"\dag{}",
    "‡": r"\ddag{}", "‖": r"$\|$", "ε": r"$\varepsilon$", "Δ": r"$\Delta$", "ℓ": r"$\ell$", "∞": r"$\infty$",
    "λ": r"$\lambda$", "·": r"$\cdot$",
}


def latex_escape(text: str) -> str:
    return "".join(_LATEX_SPECIAL.get(ch, ch) for ch in text)


def latex_table(header: str, frame: pd.DataFrame, legend: str) -> str:
    """A ``tabular`` (booktabs rules) to paste into a paper; provenance and legend as ``%`` comments."""
    escaped = frame.map(latex_escape)
    escaped.columns = [latex_escape(c) for c in frame.columns]
    align = "".join("r" if c in NUMERIC_COLUMNS else "l" for c in frame.columns)
    body = escaped.to_latex(index=False, escape=False, column_format=align)
    comments = [f"% {header}"] + ([f"% {legend}"] if legend else [])
    return "\n".join(comments) + "\n" + body


_CSS = """
body { font-family: system-ui, sans-serif; margin: 2em; color: #222; }
table { border-collapse: collapse; font-size: 0.9em; }
th, td { padding: 0.25em 0.6em; border-bottom: 1px solid #ddd; }
th { text-align: left; border-bottom: 2px solid #444; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
tr.ours { background: #eef5ff; font-weight: 600; }
p.provenance, p.legend, figcaption { color: #555; font-size: 0.85em; }
figure { margin: 1.5em 0; }
img { max-width: 100%; }
""".strip()


def html_page(title: str, header: str, rows: Sequence[TableRow], frame: pd.DataFrame, legend: str,
              figures: Sequence[FigureFile]) -> str:
    """One self-contained page: no external resources, figures embedded as base64 PNGs."""
    esc = html.escape
    head_cells = "".join(f"<th>{esc(c)}</th>" for c in COLUMNS)
    body_rows = []
    for row, values in zip(rows, frame.itertuples(index=False)):
        cells = "".join(f'<td class="num">{esc(str(v))}</td>' if c in NUMERIC_COLUMNS else f"<td>{esc(str(v))}</td>"
                        for c, v in zip(COLUMNS, values))
        body_rows.append(f'<tr class="{"ours" if row.ours else "paper"}">{cells}</tr>')
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en">',
        "<head>",
        '<meta charset="utf-8">',
        f"<title>{esc(title)}</title>",
        f"<style>\n{_CSS}\n</style>",
        "</head>",
        "<body>",
        f"<h1>{esc(title)}</h1>",
        f'<p class="provenance">{esc(header)}</p>',
        "<table>",
        f"<thead><tr>{head_cells}</tr></thead>",
        "<tbody>",
        *body_rows,
        "</tbody>",
        "</table>",
    ]
    if legend:
        parts.append(f'<p class="legend">{esc(legend)}</p>')
    if figures:
        parts.append("<h2>Figures</h2>")
    for fig in figures:
        data_uri = "data:image/png;base64," + base64.b64encode(fig.png_bytes).decode("ascii")
        parts += [
            "<figure>",
            f'<img src="{data_uri}" alt="{esc(fig.title)}">',
            f'<figcaption>{esc(fig.title)}: <a href="{esc(fig.png)}">{esc(fig.png)}</a>, '
            f'data <a href="{esc(fig.data)}">{esc(fig.data)}</a></figcaption>',
            "</figure>",
        ]
    parts += ["</body>", "</html>"]
    return "\n".join(parts) + "\n"
