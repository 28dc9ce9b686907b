"""Figures of a suite report, as PNG bytes plus the rows of data drawn in them.

Figures are built on ``matplotlib.figure.Figure`` directly (no pyplot), so making them touches no global
state and needs no display. PNGs carry no "Software" metadata and matplotlib writes no timestamp into
them, so the same data gives byte-identical files.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from fractions import Fraction
from typing import Mapping, Sequence

from matplotlib.figure import Figure

from bench.report.table import display_eps
from bench.store import format_eps

CURVES = {
    "loss": "training loss",
    "acc": "train accuracy",
    "train_certified": "train certified accuracy",
    "p": "p (ℓp-distance exponent)",
    "lam": "λ (loss mixture)",
    "eps": "training ε (recipe units)",
    "lr": "learning rate",
}
"""Per-epoch log columns drawn in training figures, in panel order; a cell's log may hold any subset."""
Rows = list[list[object]]
Plot = tuple[bytes, list[str], Rows]
"""A figure as PNG bytes, with the header and rows of the data drawn in it."""


@dataclass(frozen=True)
class Point:
    """Certified accuracy at one ε: ``value`` with the range ``low``–``high`` (fractions in [0, 1])."""

    eps: Fraction
    value: float
    low: float
    high: float


@dataclass(frozen=True)
class Series:
    """A curve of certified accuracy over ε. ``kind`` is "ours" or "paper"; series of one ``group`` (our
    method and the published row it reproduces) share a colour."""

    name: str
    kind: str
    group: str
    points: tuple[Point, ...]


def certified_vs_eps(series: Sequence[Series], title: str) -> Plot:
    """Our curves (median with min–max bars) over the paper's points; returns PNG bytes and the data."""
    fig = Figure(figsize=(9.6, 4.2), dpi=100)
    # The legend sits right of the axes: with every method and its papers' rows it would hide the curves.
    fig.subplots_adjust(left=0.08, right=0.6, bottom=0.13, top=0.92)
    ax = fig.add_subplot()
    colours = {g: f"C{i % 10}" for i, g in enumerate(sorted({s.group for s in series}))}
    for s in series:
        x = [float(p.eps) for p in s.points]
        y = [100 * p.value for p in s.points]
        if s.kind == "ours":
            err = [[100 * (p.value - p.low) for p in s.points], [100 * (p.high - p.value) for p in s.points]]
            ax.errorbar(x, y, yerr=err, color=colours[s.group], marker="o", capsize=3, label=s.name)
        else:
            ax.plot(x, y, color=colours[s.group], marker="s", markerfacecolor="none", linestyle="--", label=s.name)
    ticks = sorted({p.eps for s in series for p in s.points})
    ax.set_xticks([float(e) for e in ticks], [display_eps(e) for e in ticks])
    ax.set_xlabel("ε (ℓ∞, pixels in [0, 1])")
    ax.set_ylabel("certified accuracy (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0)
    header = ["series", "kind", "eps", "eps_value", "certified_pct", "certified_min_pct", "certified_max_pct"]
    rows: Rows = [[s.name, s.kind, format_eps(p.eps), float(p.eps), round(100 * p.value, 3), round(100 * p.low, 3),
                   round(100 * p.high, 3)] for s in series for p in s.points]
    return _png(fig), header, rows


def training_curves(logs: Mapping[int, Sequence[Mapping[str, float]]], title: str) -> Plot | None:
    """One panel per logged ``CURVES`` column over epochs, one line per seed; ``None`` when nothing is logged."""
    keys = [k for k in CURVES if any(k in row for log in logs.values() for row in log)]
    if not keys:
        return None
    cols = 2 if len(keys) > 1 else 1
    nrows = math.ceil(len(keys) / cols)
    fig = Figure(figsize=(4.0 * cols, 2.4 * nrows + 0.6), dpi=100)
    # Fixed margins: automatic layout engines cost more than the drawing itself, and the panels are alike.
    fig.subplots_adjust(left=0.1, right=0.97, bottom=0.6 / (2.4 * nrows + 0.6), top=1 - 0.75 / (2.4 * nrows + 0.6),
                        wspace=0.3, hspace=0.55)
    fig.suptitle(title)
    for i, key in enumerate(keys):
        ax = fig.add_subplot(nrows, cols, i + 1)
        for seed, log in sorted(logs.items()):
            points = [(row["epoch"], row[key]) for row in log if key in row and "epoch" in row]
            ax.plot([p[0] for p in points], [p[1] for p in points], label=f"seed {seed}")
        values = [row[key] for log in logs.values() for row in log if key in row]
        # p ramps over orders of magnitude (8 -> 1000 for ℓ∞-dist nets), λ decays likewise.
        if min(values) > 0 and max(values) / min(values) > 50:
            ax.set_yscale("log")
        ax.set_title(CURVES[key], fontsize="medium")
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        if len(logs) > 1 and i == 0:
            ax.legend(fontsize="small")
    header = ["seed", "epoch", *keys]
    rows: Rows = [[seed, row.get("epoch"), *(row.get(k) for k in keys)]
                  for seed, log in sorted(logs.items()) for row in log]
    return _png(fig), header, rows


def _png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", metadata={"Software": None})
    return buf.getvalue()
