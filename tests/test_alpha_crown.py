"""α-CROWN (methods.bounds.alpha): never looser than CROWN, tighter somewhere, and sound.

Soundness is checked against the true margins: at uniform samples and corners of the ε box and at a
margin-minimising PGD per margin row, every α-CROWN lower bound must lie at or below the margin there.
Bounds are compared with margins in float64 (the fixed checkpoint widened), where rounding is ~1e-13 of
the values and the comparison takes no tolerance; the float32 certificate of the fixed checkpoint (with
its rounding slack) is checked by attack: its certified points must survive a margin PGD (50 steps, 5
restarts) and 200 box samples.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from torch import nn

from bench.attacks import pgd_robust, random_robust
from bench.cli import main
from bench.data import load_split, to_pixels
from bench.fixed import load
from methods.bounds import margin_lower_bounds, margin_spec

FIXED = Path(__file__).resolve().parents[1] / "results/baselines/fixed/smoke/mnist/mnist/eps_1-10/ibp/seed0"
FIXED_POINTS = 6


def random_nets() -> list[nn.Sequential]:
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Flatten(), nn.Linear(12, 20), nn.ReLU(), nn.Linear(20, 16), nn.ReLU(), nn.Linear(16, 5))
    cnn = nn.Sequential(nn.Conv2d(3, 4, 3, stride=2), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 3 * 3, 10), nn.ReLU(),
                        nn.Linear(10, 4))
    return [mlp.double().eval(), cnn.double().eval()]


def inputs(net: nn.Sequential, batch: int) -> torch.Tensor:
    shape = (batch, 1, 3, 4) if isinstance(net[0], nn.Flatten) else (batch, 3, 7, 7)
    return torch.rand(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))


def row_margins(net: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """(B, S) the true margins logit_y − logit_j at x, in the column order of margin_spec."""
    logits = net(x)
    return torch.einsum("bsk,bk->bs", margin_spec(y, logits.shape[1], x.dtype), logits)


def sampled_minima(net: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float) -> torch.Tensor:
    """(B, S) the least margin per row found by 300 uniform samples, the box's sign corners and a 50-step
    sign-gradient descent on each row's own margin (each row attacked separately)."""
    gen = torch.Generator().manual_seed(2)
    lower, upper = (x - eps).clamp(min=0), (x + eps).clamp(max=1)
    with torch.no_grad():
        least = row_margins(net, x, y)
        for _ in range(300):
            u = torch.rand(x.shape, dtype=x.dtype, generator=gen)
            corner = torch.where(torch.rand(x.shape, generator=gen) < 0.5, lower, upper).to(x.dtype)
            least = torch.minimum(least, row_margins(net, lower + u * (upper - lower), y))
            least = torch.minimum(least, row_margins(net, corner, y))
    specs = least.shape[1]
    for row in range(specs):
        z = (lower + upper) / 2
        for _ in range(50):
            z.requires_grad_(True)
            value = row_margins(net, z, y)[:, row]
            (grad,) = torch.autograd.grad(value.sum(), z)
            with torch.no_grad():
                z = torch.minimum(torch.maximum(z - eps / 10 * grad.sign(), lower), upper)
                least[:, row] = torch.minimum(least[:, row], row_margins(net, z, y)[:, row])
    return least


@pytest.mark.parametrize("index", [0, 1])
def test_random_nets_tighter_than_crown_and_below_sampled_margins(index: int) -> None:
    net = random_nets()[index]
    x = inputs(net, 8)
    with torch.no_grad():
        y = net(x).argmax(dim=1)
    eps = 0.1
    with torch.no_grad():
        crown = margin_lower_bounds(net, x, y, eps, "crown")
        alpha = margin_lower_bounds(net, x, y, eps, "alpha-crown")
    assert (alpha >= crown).all()
    assert (alpha > crown + 1e-6).any(), "α-CROWN never improved on CROWN: the optimisation does nothing"
    assert (alpha <= sampled_minima(net, x, y, eps)).all()


@pytest.fixture(scope="module")
def fixed_model(data_dir: Path) -> tuple[nn.Module, torch.Tensor, torch.Tensor, float, object]:
    cell, method, model = load(FIXED)
    test = load_split("mnist", False, data_dir)
    x, y = to_pixels(test.images[:FIXED_POINTS], torch.device("cpu")), test.labels[:FIXED_POINTS].long()
    return model, x, y, 0.1, method


def test_fixed_checkpoint_tighter_than_crown_and_sound(fixed_model) -> None:
    model, x, y, eps, _ = fixed_model
    model, x = copy.deepcopy(model).double(), x.double()
    with torch.no_grad():
        crown = margin_lower_bounds(model, x, y, eps, "crown")
        alpha = margin_lower_bounds(model, x, y, eps, "alpha-crown")
    assert (alpha >= crown).all()
    assert (alpha > crown + 1e-4).any()
    assert (alpha <= sampled_minima(model, x, y, eps)).all()


def test_alpha_crown_certified_points_survive_attacks(fixed_model) -> None:
    model, x, y, eps, method = fixed_model
    certificate = method.certify(model, x, y, eps, "alpha-crown")
    certified = certificate.certified
    assert certificate.certifier == "alpha-crown"
    assert certified.any(), "nothing certified: the attack below would check nothing"
    gen = torch.Generator().manual_seed(0)
    xs, ys = x[certified], y[certified]
    assert pgd_robust(model, xs, ys, eps, steps=50, restarts=5, generator=gen, loss="margin").all()
    assert random_robust(model, xs, ys, eps, samples=200, generator=gen).all()


def test_cli_accepts_alpha_crown_for_the_ibp_family_only(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The certifier comes from the methods' own lists: the bound-trained CNNs take it, ℓ∞-dist nets refuse it
    in one line. Re-certifying a finished smoke cell (200 points) takes minutes, so it is not run here."""
    common = ["run", "--suite", "mnist", "--scale", "smoke", "--eps", "1/10", "--certifier", "alpha-crown",
              "--dry-run", "--out", str(tmp_path), "--no-progress"]
    assert main([*common, "--methods", "ibp", "crown-ibp", "crown-ibp-fast"]) == 0
    capsys.readouterr()
    assert main([*common, "--methods", "linf-dist"]) == 2
    err = capsys.readouterr().err.strip()
    assert "alpha-crown does not apply to linf-dist" in err and "Traceback" not in err
