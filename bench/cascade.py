"""``bench cascade``: every test point of a finished model as certified, falsified or unknown.

The cascade starts from the cell's recorded verdicts (misclassified clean, broken by PGD or by the APGD
ensemble: falsified), runs the APGD ensemble itself where the cell's evaluation did not, and then hands
the points that are still open to the method's verifiers in order, each stage seeing only what the stages
before left undecided. A verifier that falsifies (a complete one, such as a MILP) decides points both ways.
The verifier list is the method's own (``Method.certifiers``, loosest first) or ``--stages``.

Files (beside the cell's own, never replacing them; the regression gate reads only ``result.json`` and
``verdicts.csv``): ``cascade-verdicts.csv`` (index, label, verdict in {certified, falsified, unknown},
decided_by: clean, pgd, apgd-ce, apgd-t or a verifier's name) and ``cascade.json`` (per stage the points
tried, certified, falsified, the unknown points left and the seconds per point tried, with provenance).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bench.attacks import PointStreams, apgd_ensemble
from bench.data import data_dir, load_split, to_pixels
from bench.errors import BenchError
from bench.evaluate import APGD, APGD_TARGETS, AttackPlan, Evaluation, _guard
from bench.store import atomic_write_json, parse_eps, read_csv, write_csv
from methods import base as registry

CASCADE_FILE = "cascade.json"
CASCADE_VERDICTS = "cascade-verdicts.csv"
CASCADE_COLUMNS = ("index", "label", "verdict", "decided_by")
ATTACK_STAGE = "apgd"
CHUNK = 20
"""Points per verifier call: the verifiers here bound one small model per point; larger batches only cost
memory (full CROWN's coefficients grow with the batch)."""


@dataclass
class StageRecord:
    name: str
    tried: int
    certified: int
    falsified: int
    unknown_after: int
    seconds: float
    skipped: str | None = None
    """Why the verifier refused this model (e.g. full CROWN too costly for it), its points left as they were."""

    @property
    def decided(self) -> int:
        return self.certified + self.falsified

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "decided": self.decided, "seconds": round(self.seconds, 3),
                "seconds_per_point": round(self.seconds / self.tried, 4) if self.tried and not self.skipped else None}


@dataclass
class Cascade:
    index: list[int]
    label: list[int]
    verdict: list[str]
    decided_by: list[str]
    stages: list[StageRecord]

    def open(self) -> list[int]:
        """Positions of the points still unknown."""
        return [i for i, v in enumerate(self.verdict) if v == "unknown"]

    def counts(self) -> dict[str, int]:
        return {"n": len(self.index), **{v: self.verdict.count(v) for v in ("certified", "falsified", "unknown")}}


def cell_inputs(folder: Path) -> tuple[dict[str, Any], dict[str, Any], Evaluation, registry.Method, nn.Module]:
    """(cell, scale_config, recorded evaluation, method, deployed model) of a finished cell folder or of a
    fixed checkpoint (``model.safetensors``, ``bench.fixed``)."""
    from bench import load_model
    from bench.fixed import WEIGHTS, load

    try:
        record = json.loads((folder / "config.json").read_text())
        cell, scale = record["cell"], record["scale_config"]
        previous = Evaluation.from_rows(read_csv(folder / "verdicts.csv"), "")
    except FileNotFoundError as exc:
        raise BenchError(f"{folder}: not a finished cell ({Path(exc.filename).name} missing)") from None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise BenchError(f"{folder}: config.json or verdicts.csv is corrupt ({exc.__class__.__name__})") from None
    if (folder / WEIGHTS).exists():
        _, method, model = load(folder)
    else:
        method, model = registry.get(cell["method"]), load_model(folder)
    return cell, scale, previous, method, model


def run_cascade(method: registry.Method, model: nn.Module, images: torch.Tensor, previous: Evaluation, eps: float,
                plan: AttackPlan, seed: int, stages: list[str], progress: bool = True) -> Cascade:
    """The cascade over the points of ``previous`` (``images`` uint8 (N, C, H, W), one per point)."""
    verdict = ["falsified" if not c else "unknown" for c in previous.clean]
    decided_by = ["clean" if not c else "" for c in previous.clean]
    robust = previous.strongest()
    for i, (r, by) in enumerate(zip(robust, previous.broken_by)):
        if verdict[i] == "unknown" and not r:
            verdict[i], decided_by[i] = "falsified", by or "pgd"
    out = Cascade(previous.index, previous.label, verdict, decided_by, [])
    labels = torch.tensor(previous.label)
    index = torch.tensor(previous.index)
    if previous.apgd is None and plan.apgd_steps:
        _stage(out, ATTACK_STAGE, lambda pos: _attack(model, images, labels, index, pos, eps, plan, seed, out))
    for name in stages:
        _stage(out, name, lambda pos, n=name: _verify(method, model, images, labels, index, pos, eps, plan, seed,
                                                     n, out))
        if progress:
            s = out.stages[-1]
            print(f"  {name}: skipped ({s.skipped})" if s.skipped else
                  f"  {name}: {s.tried} tried, {s.certified} certified, {s.falsified} falsified, "
                  f"{s.seconds / max(1, s.tried):.2f} s/point", file=sys.stderr)
    return out


def _stage(out: Cascade, name: str, work) -> None:
    """Run one stage on the open points. A verifier that refuses the model (``MethodError``: e.g. full CROWN on
    a CNN too large for it) does not end the cascade: the stage is recorded as skipped, with the reason,
    and the later stages see the same points (decisions it made before refusing stand: each is sound)."""
    tried = out.open()
    before = out.counts()
    start = time.perf_counter()
    skipped = None
    if tried:
        try:
            work(tried)
        except registry.MethodError as exc:
            skipped = str(exc)
    after = out.counts()
    out.stages.append(StageRecord(name, len(tried), after["certified"] - before["certified"],
                                  after["falsified"] - before["falsified"], after["unknown"],
                                  time.perf_counter() - start, skipped))


def _attack(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, index: torch.Tensor, positions: list[int],
            eps: float, plan: AttackPlan, seed: int, out: Cascade) -> None:
    pos = torch.tensor(positions)
    outcome = apgd_ensemble(model, to_pixels(images[pos], torch.device("cpu")), labels[pos], eps, plan.apgd_steps,
                            APGD_TARGETS, PointStreams.of(seed, APGD, index[pos]))
    for p, r, by in zip(positions, outcome.robust.tolist(), outcome.broken_by):
        if not r:
            out.verdict[p], out.decided_by[p] = "falsified", by


def _verify(method: registry.Method, model: nn.Module, images: torch.Tensor, labels: torch.Tensor,
            index: torch.Tensor, positions: list[int], eps: float, plan: AttackPlan, seed: int, name: str,
            out: Cascade) -> None:
    for start in range(0, len(positions), CHUNK):
        pos = torch.tensor(positions[start : start + CHUNK])
        x, y = to_pixels(images[pos], torch.device("cpu")), labels[pos]
        cert = method.certify(model, x, y, eps, name)
        falsified = cert.falsified if cert.falsified is not None else torch.zeros_like(cert.certified)
        if (cert.certified & falsified).any():
            raise BenchError(f"verifier {name} both certified and falsified test points {index[pos][cert.certified & falsified].tolist()}")
        # Points the attacks left robust, so only the margin-loss guard can contradict a certificate here.
        _guard(model, index[pos], x, y, cert.certified, eps, plan, seed, name)
        for p, c, f in zip(pos.tolist(), cert.certified.tolist(), falsified.tolist()):
            if c or f:
                out.verdict[p], out.decided_by[p] = ("certified" if c else "falsified"), name


def cascade_cell(folder: Path, stages: list[str] | None, points: int | None, data_root: Path | None,
                 progress: bool = True, into: Path | None = None) -> dict[str, Any]:
    """Run the cascade on one cell folder and write its two files there, or under ``into`` in the store's
    layout (``<scale>/<suite>/<dataset>/eps_<a>-<b>/<method>/seed<N>/``)."""
    from bench.runner import versions

    started = datetime.now(timezone.utc)
    cell, scale, previous, method, model = cell_inputs(folder)
    chosen = list(method.certifiers) if stages is None else stages
    unknown = [s for s in chosen if s not in method.certifiers]
    if unknown:
        raise BenchError(f"{cell['method']} has no verifier {', '.join(unknown)}; its verifiers: "
                         f"{', '.join(method.certifiers)}")
    if points is not None:
        previous = _first(previous, points)
    split = load_split(cell["dataset"], False, data_dir(data_root))
    images = split.images[torch.tensor(previous.index)]
    plan = AttackPlan(int(scale["pgd_steps"]), int(scale["pgd_restarts"]), int(scale.get("apgd_steps", 100)))
    result = run_cascade(method, model, images, previous, float(parse_eps(cell["eps"])), plan, int(cell["seed"]),
                         chosen, progress)
    target = folder if into is None else into / _cell_key(cell)
    write_csv(target / CASCADE_VERDICTS, CASCADE_COLUMNS,
              zip(result.index, result.label, result.verdict, result.decided_by))
    record = {
        "schema": 1, "cell": cell, "index_range": [previous.index[0], previous.index[-1] + 1],
        "counts": result.counts(), "stages": [s.as_dict() for s in result.stages],
        "attack": {"recorded": "verdicts.csv (clean, pgd, apgd where it ran)",
                   "apgd": None if previous.apgd is not None else
                   {"steps": plan.apgd_steps, "targets": APGD_TARGETS, "runs_on": "points the recorded attacks left robust"},
                   "guard": {"name": "pgd", "loss": "margin", "steps": plan.pgd_steps, "restarts": plan.pgd_restarts,
                             "runs_on": "every point a verifier certifies"}},
        "provenance": {"versions": versions(), "host": platform.node(), "device": "cpu",
                       "threads": torch.get_num_threads(), "started": started.isoformat(timespec="seconds"),
                       "finished": datetime.now(timezone.utc).isoformat(timespec="seconds")},
        "files": {"verdicts": CASCADE_VERDICTS},
    }
    atomic_write_json(target / CASCADE_FILE, record)
    return record


def _cell_key(cell: dict[str, Any]) -> Path:
    from bench.store import eps_slug

    return (Path(cell["scale"]) / cell["suite"] / cell["dataset"] / eps_slug(parse_eps(cell["eps"]))
            / (cell.get("variant") or cell["method"]) / f"seed{cell['seed']}")


def _first(previous: Evaluation, points: int) -> Evaluation:
    if points < 1:
        raise BenchError(f"--points must be ≥ 1, got {points}")
    k = min(points, previous.n)
    return Evaluation(previous.index[:k], previous.label[:k], previous.clean[:k], previous.pgd[:k],
                      previous.certified[:k], previous.certifier,
                      None if previous.apgd is None else previous.apgd[:k], previous.broken_by[:k])


def summary(root: Path) -> tuple[str, bytes]:
    """The cascade records under ``root`` as a markdown table (per cell and stage: points tried, decided,
    unknown left, seconds per point) and a PNG of the unknown band after each verifier, in % of the points."""
    import io

    from matplotlib.figure import Figure

    records = []
    for path in sorted(root.rglob(CASCADE_FILE)):
        try:
            records.append((path.parent.relative_to(root).as_posix(), json.loads(path.read_text())))
        except (OSError, ValueError) as exc:
            raise BenchError(f"{path} is unreadable ({exc.__class__.__name__})") from None
    if not records:
        raise BenchError(f"no {CASCADE_FILE} under {root}")
    lines = ["| Cell | n | Stage | Tried | Certified | Falsified | Unknown left | s / point |",
             "|---|---|---|---|---|---|---|---|"]
    figure = Figure(figsize=(7, 4.2))
    axes = figure.add_subplot()
    for key, record in records:
        n = record["counts"]["n"]
        attacked = n - record["stages"][0]["tried"] if record["stages"] else n
        band, names = [], []
        for stage in record["stages"]:
            per_point = stage["seconds_per_point"]
            timing = "" if per_point is None else f"{per_point:.3f}"
            if stage.get("skipped"):
                timing = f"skipped: {stage['skipped']}"
            lines.append(f"| {key} | {n} | {stage['name']} | {stage['tried']} | {stage['certified']} | "
                         f"{stage['falsified']} | {stage['unknown_after']} | {timing} |")
            if stage["name"] != ATTACK_STAGE:
                # A skipped stage decided nothing because it did not run: a gap in the line, not a flat step.
                band.append(float("nan") if stage.get("skipped") else 100 * stage["unknown_after"] / n)
                names.append(stage["name"])
        lines.append(f"| {key} | {n} | final | | {record['counts']['certified']} | {record['counts']['falsified']} "
                     f"(clean or recorded attacks: {attacked}) | {record['counts']['unknown']} | |")
        axes.plot(range(len(band)), band, marker="o", label=key)
        axes.set_xticks(range(len(names)), names)
    axes.set_ylabel("unknown band (% of points)")
    axes.set_xlabel("after verifier (each on the points the attacks and verifiers before left open)")
    axes.legend(fontsize=6)
    axes.grid(alpha=0.3)
    figure.tight_layout()
    buf = io.BytesIO()
    figure.savefig(buf, format="png", dpi=120, metadata={"Software": None})
    return "\n".join(lines) + "\n", buf.getvalue()


def cascade_command(args: argparse.Namespace) -> int:
    if args.summary is not None:
        from bench.store import atomic_write_bytes

        root = Path(args.summary)
        table, png = summary(root)
        atomic_write_bytes(root / "cascade.md", table.encode())
        atomic_write_bytes(root / "cascade.png", png)
        print(table, end="")
        return 0
    if not args.cells:
        raise BenchError("name finished cell folders, or --summary DIR")
    stages = None if args.stages is None else [s.strip() for s in args.stages.split(",") if s.strip()]
    for folder in args.cells:
        print(f"{folder}:", file=sys.stderr)
        record = cascade_cell(Path(folder), stages, args.points, None if args.data_dir is None else Path(args.data_dir),
                              not args.no_progress, None if args.into is None else Path(args.into))
        c = record["counts"]
        print(f"{folder}: {c['certified']} certified, {c['falsified']} falsified, {c['unknown']} unknown of {c['n']}")
    return 0


def register_verb(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("cascade", help="certified / falsified / unknown per test point of finished cells: "
                                       "attacks, then the method's verifiers in order, each on what is left")
    p.add_argument("cells", nargs="*", metavar="CELL", help="finished cell folders (or fixed-checkpoint folders)")
    p.add_argument("--summary", metavar="DIR", help="instead: tabulate every cascade.json under DIR into DIR/cascade.md "
                                                    "and draw the unknown band per stage into DIR/cascade.png")
    p.add_argument("--stages", help="comma-separated verifiers in order (default: the method's own, loosest first)")
    p.add_argument("--points", type=int, help="only the first N points of the cell's test range")
    p.add_argument("--into", metavar="DIR", help="write the files under DIR in the store's layout instead of "
                                                 "into the cell folder (e.g. for the committed fixed checkpoints)")
    p.add_argument("--data-dir", help="dataset root (default: BENCH_DATA_DIR or the cache)")
    p.add_argument("--no-progress", action="store_true", help="no per-stage lines")
    p.set_defaults(func=cascade_command)
