"""Fixed checkpoints: committed small models whose per-point verdicts are known, so that a change in a
certifier, an attack or the evaluation shows up exactly, without the seed-to-seed noise of training.

A fixed cell is a folder ``<root>/<cell key>/`` holding the cell's ``config.json`` (as the runner wrote it),
``model.safetensors`` (the deployed weights, stored in float16 to keep the files small; they are widened
to float32 on load, so the checkpoint *is* the rounded model) and ``verdicts.csv`` (per test point: clean,
PGD-robust, certified, as recorded). ``manifest.json`` beside them holds each cell's tolerance: how many
points' verdicts may change per metric, the allowance for another CPU's float rounding (measured: see
``results/baselines/README.md``). The check evaluates every fixed model exactly as a cell's evaluation does
(the suite's current scale: test range, PGD settings, the method's default certifier, the soundness guard)
and fails when more points than that changed any verdict.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from tabulate import tabulate

from bench.config import load_suite
from bench.data import data_dir, dataset_info, load_split
from bench.errors import BenchError
from bench.evaluate import AttackPlan, evaluate
from bench.store import atomic_write_json, parse_eps, read_csv, write_csv
from methods import base as registry

MANIFEST = "manifest.json"
WEIGHTS = "model.safetensors"
VERDICTS = "verdicts.csv"
METRICS = ("clean", "pgd", "certified")
DEFAULT_TOLERANCE = 0
"""Changed verdicts allowed per metric and cell (points, not percent). Built for AVX2 instead of AVX-512 (the
fused kernels, torch's and oneDNN's), the committed fixed cells changed no verdict, so none is allowed;
``manifest.json`` can give a cell its own."""


def _cells(root: Path) -> dict[str, Any]:
    try:
        manifest = json.loads((root / MANIFEST).read_text())
        cells = manifest["cells"]
        if not isinstance(cells, dict) or not cells:
            raise ValueError("no cells")
        return cells
    except FileNotFoundError:
        raise BenchError(f"{root}: no {MANIFEST}; record fixed cells with `bench check --fixed {root} --update "
                         "--results <finished cells>`") from None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise BenchError(f"{root}/{MANIFEST} is corrupt ({exc.__class__.__name__}: {exc})") from None


def load(folder: Path) -> tuple[dict[str, Any], registry.Method, torch.nn.Module]:
    from safetensors.torch import load_file

    record = json.loads((folder / "config.json").read_text())
    cell = record["cell"]
    method = registry.get(cell["method"])
    model = method.build(dataset_info(cell["dataset"]), record["config"])
    model.load_state_dict({k: v.float() for k, v in load_file(folder / WEIGHTS).items()})
    return cell, method, method.deploy(model)


def _evaluate(folder: Path, splits: dict[str, Any]) -> dict[str, list[bool]]:
    """The per-point verdicts of the fixed model in ``folder`` under the current code."""
    cell, method, model = load(folder)
    scale = load_suite(cell["suite"]).scales[cell["scale"]]
    if cell["dataset"] not in splits:
        splits[cell["dataset"]] = load_split(cell["dataset"], False, data_dir(None))
    ev = evaluate(method, model, splits[cell["dataset"]], scale.test_range, float(parse_eps(cell["eps"])),
                  AttackPlan.of(scale), scale.eval_batch_size, torch.device("cpu"), int(cell["seed"]),
                  progress=False)
    return {"index": ev.index, "label": ev.label, "clean": ev.clean, "pgd": ev.pgd, "certified": ev.certified}


def _write_verdicts(folder: Path, verdicts: dict[str, list[Any]]) -> None:
    columns = ("index", "label", *METRICS)
    write_csv(folder / VERDICTS, columns, zip(*[[int(v) for v in verdicts[c]] for c in columns]))


def record(root: Path, source: Path | None, tolerance: int) -> int:
    """(Re)write the fixed cells' expected verdicts: of the cells already in ``root`` and, when given, of
    ``source``'s finished cells (their weights copied in as float16, replacing a cell of the same key).
    Tolerances already recorded are kept."""
    from safetensors.torch import save_file

    old = _cells(root) if (root / MANIFEST).exists() else {}
    keys = sorted(old)
    if source is not None:
        new = sorted(p.parent.relative_to(source).as_posix() for p in source.glob("*/*/*/*/*/*/model.pt"))
        if not new:
            raise BenchError(f"no finished cells (model.pt) under {source}")
        keys = sorted({*keys, *new})
        for key in new:
            (root / key).mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source / key / "config.json", root / key / "config.json")
            state = torch.load(source / key / "model.pt", map_location="cpu", weights_only=True)
            save_file({k: v.detach().to(torch.float16).contiguous() for k, v in state.items()}, root / key / WEIGHTS)
    if not keys:
        raise BenchError(f"{root}: no fixed cells to record")
    splits: dict[str, Any] = {}
    cells = {}
    for key in keys:
        verdicts = _evaluate(root / key, splits)
        _write_verdicts(root / key, verdicts)
        counts = {m: sum(map(bool, verdicts[m])) for m in METRICS}
        cells[key] = {"n": len(verdicts["index"]), "counts": counts,
                      "tolerance": old.get(key, {}).get("tolerance", tolerance)}
        print(f"{key}: {', '.join(f'{m} {counts[m]}' for m in METRICS)} of {len(verdicts['index'])}")
    atomic_write_json(root / MANIFEST, {"schema": 1, "cells": cells})
    return 0


def check(root: Path) -> bool:
    """Evaluate every fixed cell; print a table; True when every verdict count stayed within tolerance."""
    cells = _cells(root)
    splits: dict[str, Any] = {}
    rows, ok = [], True
    for key, entry in sorted(cells.items()):
        try:
            expected = read_csv(root / key / VERDICTS)
        except OSError as exc:
            raise BenchError(f"{root / key}: unreadable {VERDICTS} ({exc.__class__.__name__})") from None
        now = _evaluate(root / key, splits)
        if [int(r["index"]) for r in expected] != list(now["index"]):
            raise BenchError(f"{root / key}: the test range changed since the verdicts were recorded; "
                             f"re-record with `bench check --fixed {root} --update`")
        for metric in METRICS:
            before = [r[metric] == "1" for r in expected]
            changed = sum(a != bool(b) for a, b in zip(before, now[metric]))
            status = "ok" if changed <= entry["tolerance"] else "CHANGED"
            ok &= status == "ok"
            rows.append([key, metric, sum(before), sum(map(bool, now[metric])), changed, entry["tolerance"], status])
    print(tabulate(rows, headers=["fixed cell", "metric", "recorded", "now", "points changed", "tolerance",
                                  "status"], tablefmt="simple"))
    return ok
