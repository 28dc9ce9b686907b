"""The exact MILP verifier (methods/bounds/milp.py): its optimum is the true minimum margin, its
certificates survive attacks and its counterexamples are real.

Tiny random nets (seconds) and two points of the committed fixed MNIST ibp checkpoint.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from torch import nn

from bench.attacks import pgd_robust
from methods.bounds import input_box, margin_lower_bounds
from methods.bounds.milp import CERTIFIED, FALSIFIED, MilpVerifier, PointVerdict

pytest.importorskip("highspy")

ROOT = Path(__file__).resolve().parents[1]
FIXED_IBP = ROOT / "results/baselines/fixed/smoke/mnist/mnist/eps_1-10/ibp/seed0"


def tiny_cnn(seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(1, 3, 3, stride=2), nn.BatchNorm2d(3), nn.ReLU(), nn.Flatten(),
        nn.Linear(12, 10), nn.ReLU(), nn.Linear(10, 4),
    )
    bn = model[1]
    bn.running_mean.uniform_(-0.2, 0.2)
    bn.running_var.uniform_(0.5, 2.0)
    bn.weight.data.uniform_(0.5, 1.5)
    return model.eval()


def margins(model: nn.Module, x: torch.Tensor, y: int) -> torch.Tensor:
    """(N, K) logit_y − logit_j for every j (column y is 0)."""
    with torch.no_grad():
        logits = model(x)
    return logits[:, y : y + 1] - logits


def box_samples(x: torch.Tensor, eps: float, n: int, generator: torch.Generator) -> torch.Tensor:
    """Uniform samples and random corners of the clipped box around x (1, ...)."""
    lower, upper = input_box(x, eps)
    u = torch.rand(n, *x.shape[1:], generator=generator, dtype=x.dtype)
    corners = torch.randint(0, 2, (n, *x.shape[1:]), generator=generator).to(x.dtype)
    return torch.cat([lower + u * (upper - lower), lower + corners * (upper - lower)])


@pytest.mark.parametrize("seed", range(4))
def test_optimum_is_the_true_minimum_and_above_alpha_crown_and_crown(seed):
    model = tiny_cnn(seed)
    exact = copy.deepcopy(model).double()
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(1, 1, 6, 6, generator=gen)
    y = int(model(x).argmax())
    eps = 0.15
    verdict = MilpVerifier(model, time_limit_s=60).verify(x, y, eps, prune=False)
    x64 = x.double()
    crown = margin_lower_bounds(exact, x64, torch.tensor([y]), eps, "crown")[0]
    alpha = margin_lower_bounds(exact, x64, torch.tensor([y]), eps, "alpha-crown")[0]
    assert (alpha >= crown - 1e-9).all()
    lower, upper = (end.double() for end in input_box(x, eps))
    samples = box_samples(x64, eps, 2000, gen)
    sampled = margins(exact, samples, y).min(dim=0).values
    for row in verdict.rows:
        assert row.status == "optimal", row
        column = row.target - (row.target > y)
        # The optimum bounds every sampled margin from below and α-CROWN (hence CROWN) from above.
        assert row.lower <= float(sampled[row.target]) + 1e-6
        assert row.lower >= float(alpha[column]) - 1e-6
        # The solver's minimiser is in the box (the verifier's, from float32 x; up to HiGHS's feasibility
        # tolerances, 1e-7 before unscaling) and the network there has the margin it reports.
        point = torch.from_numpy(row.x).view_as(x64)
        assert ((point >= lower - 1e-6) & (point <= upper + 1e-6)).all()
        assert float(margins(exact, point, y)[0, row.target]) == pytest.approx(row.upper, abs=1e-5)
        assert row.upper - row.lower <= 1e-4 * (1 + abs(row.upper))


def test_two_input_net_against_a_grid():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3)).eval()
    exact = copy.deepcopy(model).double()
    x = torch.tensor([[0.5, 0.5]])
    y = int(model(x).argmax())
    eps = 0.3
    verdict = MilpVerifier(model, time_limit_s=60).verify(x, y, eps, prune=False)
    steps = 801
    axis = torch.linspace(0.2, 0.8, steps, dtype=torch.float64)
    grid = torch.cartesian_prod(axis, axis)
    grid_min = margins(exact, grid, y).min(dim=0).values
    # Every margin is Lipschitz in ℓ∞ with constant L ≤ ‖W3 row diff‖₁ ∏ ‖W‖_∞ (row sums of |W|), so the
    # true minimum is within L h / 2 of the grid's (h the spacing).
    w1, w2, w3 = (layer.weight.detach().double() for layer in (exact[0], exact[2], exact[4]))
    lipschitz = w1.abs().sum(1).max() * w2.abs().sum(1).max() * (w3[y] - w3).abs().sum(1).max()
    slack = float(lipschitz) * float(axis[1] - axis[0]) / 2
    for row in verdict.rows:
        assert float(grid_min[row.target]) - slack - 1e-6 <= row.lower <= float(grid_min[row.target]) + 1e-6


def check_answer(model: nn.Module, x: torch.Tensor, y: int, eps: float, verdict) -> None:
    """A certified point survives margin and CE PGD (50 steps, 5 restarts) and box samples; a
    counterexample lies in the box and the float32 model misclassifies it."""
    if verdict.verdict == CERTIFIED:
        gen = torch.Generator().manual_seed(0)
        for loss in ("margin", "cross-entropy"):
            assert pgd_robust(model, x, torch.tensor([y]), eps, 50, 5, generator=gen, loss=loss).all()
        with torch.no_grad():
            assert (model(box_samples(x, eps, 500, gen)).argmax(dim=1) == y).all()
    elif verdict.verdict == FALSIFIED:
        lower, upper = input_box(x, eps)
        point = verdict.counterexample
        assert point.dtype == torch.float32
        assert ((point >= lower) & (point <= upper)).all()
        with torch.no_grad():
            assert int(model(point).argmax()) != y


@pytest.mark.parametrize("seed", range(6))
def test_random_nets_answers_are_sound(seed):
    model = tiny_cnn(seed)
    gen = torch.Generator().manual_seed(100 + seed)
    x = torch.rand(1, 1, 6, 6, generator=gen)
    y = int(model(x).argmax())
    verifier = MilpVerifier(model, time_limit_s=30)
    answers = set()
    for eps in (0.02, 0.3):
        verdict = verifier.verify(x, y, eps)
        answers.add(verdict.verdict)
        check_answer(model, x, y, eps, verdict)
    assert answers <= {CERTIFIED, FALSIFIED}


def test_random_nets_give_both_answers():
    """The soundness checks above see both answers, not only one kind."""
    seen = set()
    for seed in range(6):
        model = tiny_cnn(seed)
        x = torch.rand(1, 1, 6, 6, generator=torch.Generator().manual_seed(100 + seed))
        y = int(model(x).argmax())
        seen |= {MilpVerifier(model, 30).verify(x, y, eps).verdict for eps in (0.02, 0.3)}
    assert seen == {CERTIFIED, FALSIFIED}


@pytest.mark.skipif(not FIXED_IBP.exists(), reason="fixed checkpoints not present")
def test_trained_model_points(data_dir, one_thread):
    from bench.data import load_split, to_pixels
    from bench.fixed import load

    _, method, model = load(FIXED_IBP)
    test = load_split("mnist", False, data_dir)
    eps = 0.1
    # Test point 18 is broken (row 8 reaches −0.42); 38 is certified although plain CROWN fails (through
    # the method, as the harness calls it).
    points = {i: (to_pixels(test.images[i : i + 1], torch.device("cpu")), int(test.labels[i])) for i in (18, 38)}
    x, y = points[18]
    verdict = MilpVerifier(model, time_limit_s=60).verify(x, y, eps)
    assert verdict.verdict == FALSIFIED
    check_answer(model, x, y, eps, verdict)
    x, y = points[38]
    cert = method.certify(model, x, torch.tensor([y]), eps, "milp")
    assert bool(cert.certified[0]) and cert.falsified is not None and not bool(cert.falsified[0])
    check_answer(model, x, y, eps, PointVerdict(CERTIFIED))


def test_refuses_layers_it_cannot_encode():
    from methods.base import MethodError

    with pytest.raises(MethodError, match="ReLU networks"):
        MilpVerifier(nn.Sequential(nn.Linear(2, 2), nn.Tanh(), nn.Linear(2, 2)).eval())
