"""Certificates attacked everywhere: every registered method, both datasets, every smoke ε.

The models are the smoke cells that ``.ci/run`` trains anyway, read from the results root named by
``CERTBENCH_SMOKE_RESULTS``; training 30 cells here again would cost CI half an hour. CI trains CIFAR-10
at 2/255 only, so a smoke ε that root lacks is taken from the committed fixed checkpoints
(``results/baselines/fixed``: seed-0 smoke models of CIFAR 8/255 and 16/255 among them). Every cell
found is attacked, and every registered method must have a cell at every smoke ε of both datasets.
Without that variable (a plain ``pytest``) the module is skipped; ``.ci/run`` sets it after the smoke
suites.

Per cell, the points that the cell's own verifier (the one behind its certified number) certifies among
the first ``TEST`` test images face a cross-entropy and a margin-loss PGD (``STEPS`` steps, ``RESTARTS``
random restarts each) and uniform and corner samples of the ε box: one broken certified point fails.
Attacks cost up to a second per point on an ℓ∞-dist net on 2 loaded cores, so at most ``ATTACKED``
certified points per cell face them (CROWN, never a cell's own verifier here, takes minutes on 20 CIFAR
points and is left to tests/test_bounds.py and the auto_LiRPA cross-check). A test that
certifies nothing asserts nothing: each dataset and method must certify at least ``MIN_CERTIFIED`` points
over its ε, and the same attacks must break some uncertified point of the same models.
"""

from __future__ import annotations

import os
from fractions import Fraction
from pathlib import Path

import pytest
import torch

import bench
from bench import data as datamod
from bench import fixed
from bench.attacks import pgd_robust, random_robust
from bench.config import load_suite
from bench.store import cell_dir, load_result
from methods import base as registry

pytestmark = pytest.mark.slow

SUITES = ("mnist", "cifar")
TEST = 100
ATTACKED = 20
STEPS, RESTARTS, SAMPLES = 50, 5, 400
MIN_CERTIFIED = 10
CELLS = [(suite, eps) for suite in SUITES for eps in load_suite(suite).eps]


@pytest.fixture(scope="module")
def smoke_root() -> Path:
    root = os.environ.get("CERTBENCH_SMOKE_RESULTS")
    if not root:
        pytest.skip("CERTBENCH_SMOKE_RESULTS is not set: .ci/run runs this module on its smoke suites' models")
    return Path(root)


@pytest.fixture(scope="module")
def test_points(data_dir: Path) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    out = {}
    for suite in SUITES:
        split = datamod.load_split(load_suite(suite).dataset, False, data_dir)
        out[suite] = (datamod.to_pixels(split.images[:TEST], torch.device("cpu")), split.labels[:TEST])
    return out


FIXED = Path(__file__).parent.parent / "results" / "baselines" / "fixed"


def _model(root: Path, suite: str, eps: Fraction, method: str) -> tuple[torch.nn.Module, str | None] | None:
    """The cell's deployed model and the verifier behind its certified number: the smoke run's, else the
    fixed checkpoint's (``None``: the method's default, which its recorded verdicts used); ``None`` if neither."""
    s = load_suite(suite)
    folder = cell_dir(root, "smoke", suite, s.dataset, eps, method, 0)
    if (folder / "result.json").is_file():
        return bench.load_model(folder), str(load_result(folder / "result.json").record["certifier"])
    folder = cell_dir(FIXED, "smoke", suite, s.dataset, eps, method, 0)
    if (folder / fixed.WEIGHTS).is_file():
        return fixed.load(folder)[2], None
    return None


@pytest.mark.parametrize("method", registry.list_methods())
def test_no_certified_point_is_broken(method: str, smoke_root: Path, test_points, one_thread: None) -> None:
    certified_total = {suite: 0 for suite in SUITES}
    not_found = []
    uncertified_broken = 0
    gen = torch.Generator().manual_seed(0)
    for suite, eps in CELLS:
        if method not in load_suite(suite).methods:
            continue
        found = _model(smoke_root, suite, eps, method)
        if found is None:
            not_found.append(f"{suite} ε={eps}")
            continue
        model, certifier = found
        x, y = test_points[suite]
        e = float(eps)
        certificate = registry.get(method).certify(model, x, y, e, certifier)
        certified = certificate.certified
        certified_total[suite] += int(certified.sum())
        where = f"{suite} ε={eps} {method} ({certificate.certifier})"
        chosen = certified.nonzero()[:ATTACKED, 0]
        if chosen.numel():
            xc, yc = x[chosen], y[chosen]
            for loss in ("cross-entropy", "margin"):
                broken = chosen[~pgd_robust(model, xc, yc, e, STEPS, RESTARTS, generator=gen, loss=loss)]
                assert broken.numel() == 0, f"{loss} PGD broke certified test points {broken.tolist()} at {where}"
            broken = chosen[~random_robust(model, xc, yc, e, SAMPLES, generator=gen)]
            assert broken.numel() == 0, f"box sampling broke certified test points {broken.tolist()} at {where}"
        with torch.no_grad():
            open_points = ((model(x).argmax(dim=1) == y) & ~certified).nonzero()[:ATTACKED, 0]
        if open_points.numel():
            robust = pgd_robust(model, x[open_points], y[open_points], e, STEPS, 1, generator=gen, loss="margin")
            uncertified_broken += int((~robust).sum())
    assert not not_found, f"no model of {method} at {', '.join(not_found)} under {smoke_root} or {FIXED}"
    for suite, count in certified_total.items():
        if method in load_suite(suite).methods:
            assert count >= MIN_CERTIFIED, f"{method} certified only {count} {suite} points: nothing was tested"
    assert uncertified_broken > 0, f"the attacks broke no uncertified point of {method}: they have no teeth"
