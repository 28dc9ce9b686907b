"""Finished cells read back from result files: the numbers tables, plots and the CI gate are built from.

Only files that ``bench.store.load_result`` accepts become runs; every other ``result.json`` becomes a
one-line problem, so that a corrupt or partial cell is reported and never shown as a number.
"""

from __future__ import annotations

import functools
import math
import sys
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any, Iterable, Mapping

from bench.config import Suite, assumptions, load_suite
from bench.errors import BenchError
from bench.store import (
    RESULT_FILE,
    LoadedResult,
    dump_config,
    eps_slug,
    iter_results,
    parse_eps,
    read_csv,
    result_file,
)

TRAIN_LOG = "train_log.csv"


@dataclass(frozen=True)
class Run:
    """One finished cell (one seed). Accuracies are fractions in [0, 1]; ``wall_s`` is the cell's total
    time (train + clean + PGD + certify) in seconds."""

    key: str
    """``<scale>/<suite>/<dataset>/eps_<a>-<b>/<method>/seed<N>``: the cell folder relative to the results root."""
    scale: str
    suite: str
    dataset: str
    eps: Fraction
    method: str
    tag: str
    """The ``--set`` variant (``width=512``) of the method's recipe, ``""`` for the suite's own recipe."""
    seed: int
    clean: float
    pgd: float
    certified: float
    n_examples: int
    certifier: str
    wall_s: float
    versions: Mapping[str, str]
    device: str
    attack: str
    folder: Path
    variant: str = ""
    """"" for the cell's own record (``result.json``); ``@<certifier>`` for the same model under another
    verifier (``result-<certifier>.json``), which is a row of its own."""
    assumed: Mapping[str, str] = field(default_factory=dict)
    """Config keys whose value is our assumption (not a published one) -> the reason (``_assumed``)."""
    apgd: float | None = None
    """Accuracy under PGD and the APGD ensemble together; ``None`` where the ensemble did not run (results
    written before it existed, or with ``--attack pgd``)."""
    stale: bool = False
    """Finished under another config than the suite file gives its cell now (``_stale``)."""

    @property
    def cell(self) -> str:
        """The cell folder relative to the results root."""
        return self.key.removesuffix(self.variant)

    @property
    def group(self) -> str:
        """The key without the seed: the runs of one table row."""
        return self.cell.rsplit("/", 1)[0] + self.variant


def read_runs(root: Path, scale: str | None = None, suite: str | None = None) -> tuple[list[Run], list[str]]:
    """Finished runs below ``root`` (optionally only ``<root>/<scale>/<suite>``), sorted by key, and one
    problem line per result file that cannot be used."""
    folder = root / scale / suite if scale and suite else root
    runs: list[Run] = []
    problems: list[str] = []
    for path, loaded in iter_results(folder):
        if isinstance(loaded, BenchError):
            problems.append(str(loaded))
            continue
        try:
            run = _run(root, loaded)
        except (BenchError, KeyError, TypeError, ValueError) as exc:
            problems.append(f"{path}: unusable result file ({exc.__class__.__name__}: {exc})")
            continue
        if scale and run.scale != scale or suite and run.suite != suite:
            continue
        runs.append(run)
    return sorted(runs, key=lambda r: r.key), problems


def find_suites(root: Path) -> list[tuple[str, str]]:
    """Every (scale, suite) below ``root`` that holds at least one ``result.json``, usable or not."""
    found: set[tuple[str, str]] = set()
    for path in root.glob(f"*/*/*/*/*/*/{RESULT_FILE}"):  # scale/suite/dataset/eps/method/seed
        scale, suite = path.relative_to(root).parts[:2]
        found.add((scale, suite))
    return sorted(found)


def report_problems(problems: Iterable[str]) -> None:
    for line in problems:
        print(f"skipped: {line}", file=sys.stderr)


def read_train_log(folder: Path) -> list[dict[str, float]]:
    """The per-epoch log of a cell, every value a float; empty when the cell has no (readable) log."""
    try:
        rows = read_csv(folder / TRAIN_LOG)
    except (OSError, UnicodeDecodeError):
        return []
    out = []
    for row in rows:
        values = {k: _float(v) for k, v in row.items() if k is not None}
        out.append({k: v for k, v in values.items() if v is not None})
    return out


def _float(text: str | None) -> float | None:
    """A logged number, or ``None`` for blanks and non-finite values (p = ∞ cannot be drawn)."""
    try:
        value = float(text)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def _run(root: Path, loaded: LoadedResult) -> Run:
    rec: dict[str, Any] = loaded.record
    cell, metrics, prov = rec["cell"], rec["metrics"], rec["provenance"]
    eps = parse_eps(cell["eps"])
    tag = str(cell.get("variant", ""))
    method_folder = f"{cell['method']}+{tag}" if tag else cell["method"]
    cell_key = "/".join([cell["scale"], cell["suite"], cell["dataset"], eps_slug(eps), method_folder,
                         f"seed{int(cell['seed'])}"])
    where = loaded.folder.relative_to(root).as_posix()
    if where != cell_key:
        raise ValueError(f"its cell fields say {cell_key} but it lies in {where}")
    _check_verdicts(loaded)
    certifier = str(rec["certifier"])
    variant = "" if loaded.path.name == RESULT_FILE else f"@{certifier}"
    if variant and loaded.path.name != result_file(certifier):
        raise ValueError(f"it holds {certifier} certificates but is named {loaded.path.name}")
    attack = rec.get("attack", {})
    return Run(
        key=cell_key + variant,
        scale=cell["scale"],
        suite=cell["suite"],
        dataset=cell["dataset"],
        eps=eps,
        method=cell["method"],
        tag=tag,
        seed=int(cell["seed"]),
        clean=float(metrics["clean"]),
        pgd=float(metrics["pgd"]),
        certified=float(metrics["certified"]),
        n_examples=int(rec["n_examples"]),
        certifier=certifier,
        wall_s=float(prov["timings_s"]["total"]),
        versions={str(k): str(v) for k, v in prov.get("versions", {}).items()},
        device=str(prov.get("device_name") or prov["device"]),
        attack=_attack_text(attack),
        folder=loaded.folder,
        variant=variant,
        assumed=_assumed(rec, eps),
        stale=not tag and _stale(rec, eps),
        apgd=None if "apgd" not in metrics else float(metrics["apgd"]),
    )


def _assumed(rec: Mapping[str, Any], eps: Fraction) -> dict[str, str]:
    """The record's own ``assumed`` table; records written before the markers existed get the markers of
    the current suite file for their cell, limited to the keys whose recorded value is still the marked
    one (a value since changed is not what the marker speaks about)."""
    if "assumed" in rec:
        return {str(k): str(v) for k, v in rec["assumed"].items()}
    found = _suite_recipe(rec)
    if found is None:
        return {}
    suite, method, scale = found
    marks = assumptions(suite.method_files[method], scale, eps, {}, suite.folder / f"{method}.toml")
    current = dump_config(suite.method_config(method, scale, eps, {}))
    recorded = rec.get("config", {})
    return {k: why for k, why in marks.items() if recorded.get(k) == current.get(k)}


def _stale(rec: Mapping[str, Any], eps: Fraction) -> bool:
    """Whether a suite recipe's record was made under another config than its suite file gives now (what
    ``bench status`` calls stale); False where the suite or method is not known here. ``--set`` variants are
    not judged: their config is the recipe's with overrides the tag only names."""
    found = _suite_recipe(rec)
    if found is None:
        return False
    suite, method, scale = found
    return rec.get("config") != dump_config(suite.method_config(method, scale, eps, {}))


def _suite_recipe(rec: Mapping[str, Any]) -> tuple[Suite, str, str] | None:
    """(suite, method, scale) of a record whose suite and method are known here, else ``None``."""
    cell = rec["cell"]
    suite = _suite(str(cell["suite"]))
    if suite is None or cell["method"] not in suite.method_files:
        return None
    return suite, str(cell["method"]), str(cell["scale"])


@functools.cache
def _suite(name: str) -> Suite | None:
    try:
        return load_suite(name)
    except BenchError:
        return None


def _check_verdicts(loaded: LoadedResult) -> None:
    """The per-sample verdict file behind the record holds exactly its test points and counts."""
    rec = loaded.record
    name = rec.get("files", {}).get("verdicts", "verdicts.csv")
    try:
        rows = read_csv(loaded.folder / name)
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"its verdict file {name} is unreadable ({exc.__class__.__name__})") from None
    start, stop = rec["index_range"]
    try:
        indices = [int(r["index"]) for r in rows]
        counts = {k: sum(int(r[k]) for r in rows) for k in ("clean", "pgd", "certified")}
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"its verdict file {name} is corrupt ({exc.__class__.__name__})") from None
    if indices != list(range(start, stop)):
        raise ValueError(f"its verdict file {name} does not hold test points [{start}, {stop}) in order")
    recorded = {k: rec["counts"][k] for k in counts}
    if counts != recorded:
        raise ValueError(f"its verdict file {name} counts {counts}, the record says {recorded}")


def _attack_text(attack: Mapping[str, Any]) -> str:
    if not attack:
        return "PGD (settings not recorded)"
    restarts = int(attack["restarts"])
    text = f"PGD-{int(attack['steps'])}, {restarts} restart{'' if restarts == 1 else 's'}"
    if "apgd" in attack:
        text += f"; APGD-CE + APGD-T ({int(attack['apgd']['targets'])} targets), {int(attack['apgd']['steps'])} steps"
    return text
