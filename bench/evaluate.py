"""Clean, attack and certified accuracy over a fixed index range of the test set, kept per sample.

Verdicts stay distinct: ``certified`` (sound certificate), ``attacked`` (misclassified clean or by an
attack), ``unknown`` (neither). Two attack columns: the scale's cross-entropy PGD (the number printed
beside the papers' PGD) and, where the scale or ``--attack`` asks for it, the stronger APGD ensemble run
on the points PGD leaves robust. A certified point that any attack breaks, including a margin-loss PGD run
on the certified points alone, is a soundness bug in a certifier: evaluation then raises instead of
writing a number.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import torch
from torch import nn

from bench.attacks import PointStreams, apgd_ensemble, pgd_robust
from bench.config import Cell, ScaleConfig
from bench.data import Split, test_batches
from bench.errors import BenchError
from methods import base as registry
from methods.base import Method

VERDICT_COLUMNS = ("index", "label", "clean", "pgd", "certified", "verdict", "apgd", "broken_by")
"""``apgd`` is blank where the stronger attack did not run; ``broken_by`` names what first broke a point:
``clean`` (misclassified unperturbed), ``pgd``, ``apgd-ce``, ``apgd-t``, or blank. Files written before
these two columns existed lack them and still read back."""

PGD, APGD, GUARD = 0, 1, 2
"""Purposes of the per-point random streams: one stream per attack, so that adding the guard or APGD leaves
the PGD column as it was."""

APGD_TARGETS = 9
"""AutoAttack's standard APGD-T target count (every other class of a 10-class dataset)."""


class Verdict(str, Enum):
    CERTIFIED = "certified"
    ATTACKED = "attacked"
    UNKNOWN = "unknown"


class UnsoundCertificate(BenchError):
    """A certified point was broken by an attack: the certifier is wrong, no number may be reported."""


@dataclass(frozen=True)
class AttackPlan:
    """The attacks of one evaluation: the scale's PGD (also the guard's margin-loss PGD) and, when
    ``apgd_steps`` > 0, the APGD-CE + APGD-T ensemble."""

    pgd_steps: int
    pgd_restarts: int
    apgd_steps: int = 0

    @classmethod
    def of(cls, scale: ScaleConfig) -> AttackPlan:
        return cls(scale.pgd_steps, scale.pgd_restarts, scale.apgd_steps if scale.attack == "apgd" else 0)

    def record(self) -> dict[str, Any]:
        """The result file's ``attack`` block: which attack produced each number."""
        block: dict[str, Any] = {
            "name": "pgd", "steps": self.pgd_steps, "restarts": self.pgd_restarts, "step_size_over_eps": 0.25,
            "loss": "cross-entropy", "counted_broken": "any iterate",
            "guard": {"name": "pgd", "loss": "margin", "steps": self.pgd_steps, "restarts": self.pgd_restarts,
                      "runs_on": "certified points; a break stops the run"},
        }
        if self.apgd_steps:
            block["apgd"] = {"name": "apgd-ce + apgd-t", "steps": self.apgd_steps, "targets": APGD_TARGETS,
                             "restarts": 1, "losses": ["cross-entropy", "targeted DLR"],
                             "runs_on": "points PGD leaves robust", "counted_broken": "any iterate"}
        return block


@dataclass
class Evaluation:
    index: list[int] = field(default_factory=list)
    label: list[int] = field(default_factory=list)
    clean: list[bool] = field(default_factory=list)
    pgd: list[bool] = field(default_factory=list)
    certified: list[bool] = field(default_factory=list)
    certifier: str = ""
    apgd: list[bool] | None = None
    """Robust to PGD and to the APGD ensemble; ``None`` where the ensemble did not run."""
    broken_by: list[str] = field(default_factory=list)
    timings_s: dict[str, float] = field(default_factory=dict)

    @property
    def n(self) -> int:
        return len(self.index)

    def strongest(self) -> list[bool]:
        """Robust to every attack that ran."""
        return self.pgd if self.apgd is None else self.apgd

    def verdicts(self) -> list[Verdict]:
        return [Verdict.CERTIFIED if c else Verdict.UNKNOWN if r else Verdict.ATTACKED
                for r, c in zip(self.strongest(), self.certified)]

    def rows(self) -> list[tuple[Any, ...]]:
        apgd = [""] * self.n if self.apgd is None else [int(a) for a in self.apgd]
        return [(i, lab, int(c), int(p), int(cert), v.value, a, b)
                for i, lab, c, p, cert, v, a, b in zip(self.index, self.label, self.clean, self.pgd,
                                                       self.certified, self.verdicts(), apgd, self.broken_by)]

    def counts(self) -> dict[str, int]:
        out = {"n": self.n, "clean": sum(self.clean), "pgd": sum(self.pgd), "certified": sum(self.certified)}
        if self.apgd is not None:
            out["apgd"] = sum(self.apgd)
        return out

    def metrics(self) -> dict[str, float]:
        c = self.counts()
        return {k: v / c["n"] for k, v in c.items() if k != "n"}

    @classmethod
    def from_rows(cls, rows: list[dict[str, str]], certifier: str) -> Evaluation:
        """Read back ``verdicts.csv`` rows (as written by ``rows``, or by versions without attack columns)."""
        clean = [r["clean"] == "1" for r in rows]
        pgd = [r["pgd"] == "1" for r in rows]
        apgd = None if not rows or not rows[0].get("apgd") else [r["apgd"] == "1" for r in rows]
        broken_by = [r.get("broken_by") or _first_break(c, p, None) for r, c, p in zip(rows, clean, pgd)]
        return cls([int(r["index"]) for r in rows], [int(r["label"]) for r in rows], clean, pgd,
                   [r["certified"] == "1" for r in rows], certifier, apgd, broken_by)


def merge(parts: list[Evaluation]) -> Evaluation:
    """Evaluations of consecutive slices of one test range as the evaluation of the whole range (empty
    slices allowed); timings are the slowest slice's, the wall time of slices run side by side."""
    parts = [p for p in parts if p.n]
    if not parts:
        raise BenchError("no evaluated points to merge")
    for a, b in zip(parts, parts[1:]):
        if b.index[0] != a.index[-1] + 1 or a.certifier != b.certifier or (a.apgd is None) != (b.apgd is None):
            raise BenchError(f"evaluation slices do not fit together at test index {a.index[-1]} / {b.index[0]}")
    whole = Evaluation(certifier=parts[0].certifier, apgd=None if parts[0].apgd is None else [])
    for p in parts:
        whole.index += p.index
        whole.label += p.label
        whole.clean += p.clean
        whole.pgd += p.pgd
        whole.certified += p.certified
        whole.broken_by += p.broken_by
        if whole.apgd is not None and p.apgd is not None:
            whole.apgd += p.apgd
        for key, seconds in p.timings_s.items():
            whole.timings_s[key] = max(whole.timings_s.get(key, 0.0), seconds)
    return whole


def _first_break(clean: bool, pgd: bool, by_apgd: str | None) -> str:
    return "clean" if not clean else "pgd" if not pgd else by_apgd or ""


def _timed(timings: dict[str, float], key: str, start: float) -> None:
    timings[key] = timings.get(key, 0.0) + time.perf_counter() - start


def _check_sound(idx: torch.Tensor, certified: torch.Tensor, robust: torch.Tensor, certifier: str,
                 attack: str) -> None:
    broken = (certified.cpu() & ~robust.cpu()).bool()
    if broken.any():
        bad = idx[broken].tolist()
        raise UnsoundCertificate(f"certifier {certifier} certified test points {bad[:5]} that {attack} breaks")


def _guard(model: nn.Module, idx: torch.Tensor, x: torch.Tensor, y: torch.Tensor, certified: torch.Tensor,
           eps: float, plan: AttackPlan, seed: int, certifier: str) -> None:
    """Margin-loss PGD on the certified points: cross-entropy saturates on confident points, the margin
    does not, so a wrong certificate on a confidently classified point is found here."""
    if not certified.any():
        return
    robust = torch.ones_like(certified)
    robust[certified] = pgd_robust(model, x[certified], y[certified], eps, plan.pgd_steps, plan.pgd_restarts,
                                   generator=PointStreams.of(seed, GUARD, idx)[certified], loss="margin")
    _check_sound(idx, certified, robust, certifier, "margin-loss PGD")


def evaluate(method: Method, model: nn.Module, split: Split, index_range: tuple[int, int], eps: float,
             plan: AttackPlan, batch_size: int, device: torch.device, seed: int, certifier: str | None = None,
             progress: bool = True) -> Evaluation:
    """Evaluate a deployed model; ``eps`` in pixels. Points misclassified clean are not attacked."""
    from tqdm import tqdm

    result = Evaluation(apgd=[] if plan.apgd_steps else None)
    start, stop = index_range
    batches = test_batches(split, start, stop, batch_size, device)
    bar = tqdm(batches, total=(stop - start + batch_size - 1) // batch_size, desc="evaluate", unit="batch",
               disable=not progress, leave=False)
    for idx, x, y in bar:
        t = time.perf_counter()
        with torch.no_grad():
            clean = model(x).argmax(dim=1) == y
        _timed(result.timings_s, "clean", t)

        t = time.perf_counter()
        pgd = clean.clone()
        if clean.any():
            pgd[clean] = pgd_robust(model, x[clean], y[clean], eps, plan.pgd_steps, plan.pgd_restarts,
                                    generator=PointStreams.of(seed, PGD, idx)[clean])
        _timed(result.timings_s, "pgd", t)

        by_apgd = [""] * len(idx)
        strongest = pgd
        if plan.apgd_steps:
            t = time.perf_counter()
            strongest = pgd.clone()
            if pgd.any():
                outcome = apgd_ensemble(model, x[pgd], y[pgd], eps, plan.apgd_steps, APGD_TARGETS,
                                        PointStreams.of(seed, APGD, idx)[pgd])
                strongest[pgd] = outcome.robust
                for i, name in zip(pgd.nonzero()[:, 0].tolist(), outcome.broken_by):
                    by_apgd[i] = name
            _timed(result.timings_s, "apgd", t)

        t = time.perf_counter()
        cert = method.certify(model, x, y, eps, certifier)
        _timed(result.timings_s, "certify", t)
        result.certifier = cert.certifier

        _check_sound(idx, cert.certified, strongest, cert.certifier, "APGD or PGD" if plan.apgd_steps else "PGD")
        t = time.perf_counter()
        _guard(model, idx, x, y, cert.certified, eps, plan, seed, cert.certifier)
        _timed(result.timings_s, "guard", t)

        result.index += idx.tolist()
        result.label += y.cpu().tolist()
        result.clean += clean.cpu().tolist()
        result.pgd += pgd.cpu().tolist()
        if result.apgd is not None:
            result.apgd += strongest.cpu().tolist()
        result.certified += cert.certified.cpu().tolist()
        result.broken_by += [_first_break(c, p, b) for c, p, b in zip(clean.tolist(), pgd.tolist(), by_apgd)]
    return result


def evaluate_cell(cell: Cell, model: nn.Module, split: Split, index_range: tuple[int, int], device: torch.device,
                  progress: bool) -> Evaluation:
    """``evaluate`` with everything the cell fixes: its method's certificate, ε, attacks, batch size and seed."""
    return evaluate(registry.get(cell.method), model, split, index_range, float(cell.eps), AttackPlan.of(cell.scale),
                    cell.scale.eval_batch_size, device, cell.seed, None, progress=progress)


def recertify(method: Method, model: nn.Module, split: Split, previous: Evaluation, eps: float, plan: AttackPlan,
              batch_size: int, device: torch.device, seed: int, certifier: str) -> Evaluation:
    """The test points of ``previous`` (a finished evaluation of the same model) under another verifier.

    Clean and attack verdicts do not depend on the verifier and are taken from ``previous``; the new
    certificates are checked against them and against the margin-loss guard exactly as in ``evaluate``.
    """
    result = Evaluation(previous.index, previous.label, previous.clean, previous.pgd, [], certifier,
                        previous.apgd, previous.broken_by)
    start, stop = previous.index[0], previous.index[-1] + 1
    if previous.index != list(range(start, stop)):
        raise BenchError("the finished evaluation does not cover one contiguous test range")
    strongest = torch.tensor(previous.strongest())
    for idx, x, y in test_batches(split, start, stop, batch_size, device):
        t = time.perf_counter()
        cert = method.certify(model, x, y, eps, certifier)
        _timed(result.timings_s, "certify", t)
        _check_sound(idx, cert.certified, strongest[idx - start], cert.certifier, "an attack")
        t = time.perf_counter()
        _guard(model, idx, x, y, cert.certified, eps, plan, seed, cert.certifier)
        _timed(result.timings_s, "guard", t)
        result.certifier = cert.certifier
        result.certified += cert.certified.cpu().tolist()
    return result
