"""Clean, PGD and certified accuracy over a fixed index range of the test set, kept per sample.

Verdicts stay distinct: ``certified`` (sound certificate), ``attacked`` (misclassified clean or by PGD),
``unknown`` (neither). A certified point that PGD breaks is a soundness bug in a certifier: evaluation
then raises instead of writing a number.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from enum import Enum

import torch
from torch import nn

from bench.attacks import pgd_robust
from bench.data import Split, test_batches
from bench.errors import BenchError
from methods.base import Method


class Verdict(str, Enum):
    CERTIFIED = "certified"
    ATTACKED = "attacked"
    UNKNOWN = "unknown"


class UnsoundCertificate(BenchError):
    """A certified point was broken by an attack: the certifier is wrong, no number may be reported."""


@dataclass
class Evaluation:
    index: list[int] = field(default_factory=list)
    label: list[int] = field(default_factory=list)
    clean: list[bool] = field(default_factory=list)
    pgd: list[bool] = field(default_factory=list)
    certified: list[bool] = field(default_factory=list)
    certifier: str = ""
    timings_s: dict[str, float] = field(default_factory=lambda: {"clean": 0.0, "pgd": 0.0, "certify": 0.0})

    @property
    def n(self) -> int:
        return len(self.index)

    def verdicts(self) -> list[Verdict]:
        return [Verdict.CERTIFIED if c else Verdict.ATTACKED if not p else Verdict.UNKNOWN
                for p, c in zip(self.pgd, self.certified)]

    def rows(self) -> list[tuple[int, int, int, int, int, str]]:
        return [(i, lab, int(c), int(p), int(cert), v.value)
                for i, lab, c, p, cert, v in zip(self.index, self.label, self.clean, self.pgd, self.certified,
                                                 self.verdicts())]

    def counts(self) -> dict[str, int]:
        return {"n": self.n, "clean": sum(self.clean), "pgd": sum(self.pgd), "certified": sum(self.certified)}

    def metrics(self) -> dict[str, float]:
        c = self.counts()
        return {k: c[k] / c["n"] for k in ("clean", "pgd", "certified")}

    @classmethod
    def from_rows(cls, rows: list[dict[str, str]], certifier: str) -> Evaluation:
        """Read back ``verdicts.csv`` rows (as written by ``rows``)."""
        return cls([int(r["index"]) for r in rows], [int(r["label"]) for r in rows],
                   [r["clean"] == "1" for r in rows], [r["pgd"] == "1" for r in rows],
                   [r["certified"] == "1" for r in rows], certifier)


def _timed(timings: dict[str, float], key: str, start: float) -> None:
    timings[key] += time.perf_counter() - start


def _check_sound(idx: torch.Tensor, certified: torch.Tensor, pgd: torch.Tensor, certifier: str) -> None:
    broken = (certified.cpu() & ~pgd.cpu()).bool()
    if broken.any():
        bad = idx[broken].tolist()
        raise UnsoundCertificate(f"certifier {certifier} certified test points {bad[:5]} that PGD breaks")


def evaluate(method: Method, model: nn.Module, split: Split, index_range: tuple[int, int], eps: float,
             pgd_steps: int, pgd_restarts: int, batch_size: int, device: torch.device, seed: int,
             certifier: str | None = None, progress: bool = True) -> Evaluation:
    """Evaluate a deployed model; ``eps`` in pixels. Points misclassified clean are not attacked."""
    from tqdm import tqdm

    result = Evaluation()
    gen = torch.Generator().manual_seed(seed)
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
            pgd[clean] = pgd_robust(model, x[clean], y[clean], eps, pgd_steps, pgd_restarts, generator=gen)
        _timed(result.timings_s, "pgd", t)

        t = time.perf_counter()
        cert = method.certify(model, x, y, eps, certifier)
        _timed(result.timings_s, "certify", t)
        result.certifier = cert.certifier

        _check_sound(idx, cert.certified, pgd, cert.certifier)
        result.index += idx.tolist()
        result.label += y.cpu().tolist()
        result.clean += clean.cpu().tolist()
        result.pgd += pgd.cpu().tolist()
        result.certified += cert.certified.cpu().tolist()
    return result


def recertify(method: Method, model: nn.Module, split: Split, previous: Evaluation, eps: float, batch_size: int,
              device: torch.device, certifier: str) -> Evaluation:
    """The test points of ``previous`` (a finished evaluation of the same model) under another verifier.

    Clean and PGD verdicts do not depend on the verifier and are taken from ``previous``; the new
    certificates are checked against its PGD verdicts exactly as in ``evaluate``.
    """
    result = Evaluation(previous.index, previous.label, previous.clean, previous.pgd, [], certifier)
    start, stop = previous.index[0], previous.index[-1] + 1
    if previous.index != list(range(start, stop)):
        raise BenchError("the finished evaluation does not cover one contiguous test range")
    pgd = torch.tensor(previous.pgd)
    for idx, x, y in test_batches(split, start, stop, batch_size, device):
        t = time.perf_counter()
        cert = method.certify(model, x, y, eps, certifier)
        _timed(result.timings_s, "certify", t)
        _check_sound(idx, cert.certified, pgd[idx - start], cert.certifier)
        result.certifier = cert.certifier
        result.certified += cert.certified.cpu().tolist()
    result.timings_s = {"certify": result.timings_s["certify"]}
    return result
