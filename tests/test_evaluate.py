"""bench/evaluate.py on a linear model with a stand-in certifier: attack columns, which attack broke each
point, the result's attack block, old verdict files, and the guard that refuses unsound certificates."""

from __future__ import annotations

from typing import Any, Mapping

import pytest
import torch
from torch import nn

from bench.data import Split
from bench.evaluate import VERDICT_COLUMNS, AttackPlan, Evaluation, UnsoundCertificate, evaluate, recertify
from methods.base import Certificate, Method

EPS = 0.1


class Stub(Method):
    """Certifies what ``certify_fn`` says; nothing else of a method is used by evaluation."""

    name = "stub"
    certifiers = ("stub",)

    def __init__(self, certify_fn) -> None:
        self.certify_fn = certify_fn

    def build(self, info, cfg: Mapping[str, Any]) -> nn.Module:
        raise NotImplementedError

    def augmentation(self, info, cfg):
        raise NotImplementedError

    def recipe(self, model, info, cfg, eps, batches_per_epoch):
        raise NotImplementedError

    def deploy(self, model: nn.Module) -> nn.Module:
        return model

    def certify(self, model, x, y, eps, certifier=None) -> Certificate:
        return Certificate(self.certify_fn(model, x, y, eps), "stub")


def _exact(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float) -> torch.Tensor:
    """The exact certificate of a linear model: the worst logit gap over the clipped box."""
    w = model.weight  # (K, D)
    lo, hi = (x - eps).clamp(0, 1).flatten(1), (x + eps).clamp(0, 1).flatten(1)
    diff = w[y][:, None, :] - w[None, :, :][0]  # (B, K, D): w_y − w_j
    worst = (torch.where(diff > 0, lo[:, None, :], hi[:, None, :]) * diff).sum(-1)
    worst = worst + (model.bias[y][:, None] - model.bias[None, :])
    worst.scatter_(1, y[:, None], torch.inf)
    return worst.amin(dim=1) > 0


@pytest.fixture(scope="module")
def setup() -> tuple[nn.Module, Split]:
    gen = torch.Generator().manual_seed(0)
    images = (torch.rand(60, 1, 4, 4, generator=gen) * 255).to(torch.uint8)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 10))
    with torch.no_grad():
        labels = model(images.float() / 255).argmax(dim=1)  # every point clean-correct
    return model, Split(images, labels)


def _linear(model: nn.Module) -> nn.Linear:
    return model[1]


def test_apgd_column_and_the_attack_that_broke_each_point(setup) -> None:
    model, split = setup
    method = Stub(lambda m, x, y, e: _exact(_linear(m), x, y, e))
    plan = AttackPlan(pgd_steps=2, pgd_restarts=1, apgd_steps=20)
    ev = evaluate(method, model, split, (0, 60), EPS, plan, 25, torch.device("cpu"), 0, progress=False)
    assert ev.apgd is not None and ev.n == 60
    rows = ev.rows()
    assert len(rows[0]) == len(VERDICT_COLUMNS)
    for (_, _, clean, pgd, cert, verdict, apgd, by) in rows:
        assert apgd <= pgd <= clean and cert <= apgd
        assert bool(apgd) == (by == "") and (by == "pgd") == (clean and not pgd)
        assert verdict == ("certified" if cert else "unknown" if apgd else "attacked")
    assert {r[7] for r in rows} >= {"pgd", "apgd-ce"}, "PGD-2 should leave points that APGD breaks"
    assert ev.counts()["apgd"] < ev.counts()["pgd"]
    assert set(ev.timings_s) == {"clean", "pgd", "apgd", "certify", "guard"}
    block = plan.record()
    assert block["steps"] == 2 and block["apgd"]["steps"] == 20 and block["guard"]["loss"] == "margin"
    assert "apgd" not in AttackPlan(10, 1).record()


def test_verdict_files_read_back_with_and_without_attack_columns(setup) -> None:
    model, split = setup
    method = Stub(lambda m, x, y, e: _exact(_linear(m), x, y, e))
    ev = evaluate(method, model, split, (0, 60), EPS, AttackPlan(2, 1, 20), 60, torch.device("cpu"), 0,
                  progress=False)
    as_read = [dict(zip(VERDICT_COLUMNS, map(str, r))) for r in ev.rows()]
    back = Evaluation.from_rows(as_read, "stub")
    assert (back.pgd, back.apgd, back.broken_by, back.certified) == (ev.pgd, ev.apgd, ev.broken_by, ev.certified)
    old = [{k: v for k, v in r.items() if k not in ("apgd", "broken_by")} for r in as_read]
    back = Evaluation.from_rows(old, "stub")
    assert back.apgd is None and back.strongest() == ev.pgd
    assert back.broken_by == ["pgd" if not p else "" for p in ev.pgd]
    # Another verifier keeps the attack columns and is checked against the strongest attack that ran.
    again = recertify(method, model, split, ev, EPS, AttackPlan(2, 1, 20), 60, torch.device("cpu"), 0, "stub")
    assert again.apgd == ev.apgd and again.certified == ev.certified


def test_an_unsound_certificate_stops_the_evaluation(setup) -> None:
    model, split = setup
    everything = Stub(lambda m, x, y, e: torch.ones_like(y, dtype=torch.bool))
    with pytest.raises(UnsoundCertificate, match="certified test points"):
        evaluate(everything, model, split, (0, 60), EPS, AttackPlan(2, 1), 60, torch.device("cpu"), 0,
                 progress=False)


def test_the_guard_attacks_certified_points_with_a_margin_loss(setup, monkeypatch: pytest.MonkeyPatch) -> None:
    """Even when the scale's PGD misses (here: it is made to report every point robust), the margin-loss
    guard on the certified points catches a wrong certificate."""
    import bench.evaluate as evaluation
    from bench import attacks

    def blind_cross_entropy(model, x0, y, eps, steps, restarts=1, step_size=None, generator=None,
                            loss="cross-entropy"):
        if loss == "cross-entropy":
            return torch.ones_like(y, dtype=torch.bool)
        return attacks.pgd_robust(model, x0, y, eps, steps, restarts, step_size, generator, loss)

    monkeypatch.setattr(evaluation, "pgd_robust", blind_cross_entropy)
    model, split = setup
    everything = Stub(lambda m, x, y, e: torch.ones_like(y, dtype=torch.bool))
    with pytest.raises(UnsoundCertificate, match="margin-loss PGD"):
        evaluate(everything, model, split, (0, 60), EPS, AttackPlan(5, 1), 60, torch.device("cpu"), 0,
                 progress=False)


def test_scales_choose_their_attack() -> None:
    from pathlib import Path

    from bench.config import _scale, load_suite
    from bench.errors import BenchError

    scales = load_suite("mnist").scales
    assert AttackPlan.of(scales["paper"]).apgd_steps == 100 and AttackPlan.of(scales["smoke"]).apgd_steps == 0
    assert AttackPlan.of(scales["smoke"].with_attack("apgd")).apgd_steps == 100
    table = {"description": "", "train_examples": 0, "test_range": [0, 10], "pgd_steps": 1, "pgd_restarts": 1,
             "eval_batch_size": 10}
    assert _scale("x", table, Path("suite.toml")).attack == "pgd"  # suite files written before the key
    with pytest.raises(BenchError, match="attack must be one of pgd, apgd"):
        _scale("x", {**table, "attack": "fgsm"}, Path("suite.toml"))
