"""ℓ∞-dist net: Lipschitz property, schedules at their boundaries, losses, certification rules."""

from __future__ import annotations

import math

import pytest
import torch

from bench.data import dataset_info
from methods import base as registry
from methods.base import MethodError
from methods.linf_dist.layers import set_p
from methods.linf_dist.losses import clipped_hinge, hinge_loss, normalised_worst_margins
from methods.linf_dist.models import SCALAR_STD, linf_dist_mlp, linf_dist_net
from methods.linf_dist.schedule import Schedule

MNIST = dataset_info("mnist")
CIFAR = dataset_info("cifar10")


def trained_like(model: torch.nn.Module, batches: int = 3) -> torch.nn.Module:
    """Move the running means away from zero with a few train-mode passes, then deploy at p = ∞."""
    model.train()
    with torch.no_grad():
        for _ in range(batches):
            model(torch.rand(16, *MNIST.input_shape))
    set_p(model, math.inf)
    return model.eval()


@pytest.mark.parametrize("info", [MNIST, CIFAR], ids=["mnist", "cifar10"])
def test_net_is_one_lipschitz_at_p_infinity(info) -> None:
    torch.manual_seed(0)
    model = linf_dist_net(info, depth=4, width=64, identity_val=10.0, learnable_scale=True)
    if info is MNIST:
        trained_like(model)
    else:
        set_p(model, math.inf)
        model.eval()
    scores = model[:-1]
    x = torch.rand(64, *info.input_shape)
    for radius in (1e-3, 0.05, 0.5):
        x2 = (x + radius * (2 * torch.rand_like(x) - 1)).clamp(0, 1)
        with torch.no_grad():
            lhs = (scores(x) - scores(x2)).abs().amax(dim=1)
        rhs = (x - x2).flatten(1).abs().amax(dim=1) / SCALAR_STD[info.name]
        assert (lhs <= rhs * (1 + 1e-5) + 1e-6).all()


def test_schedules_at_boundaries_match_the_spec() -> None:
    s = Schedule(batches_per_epoch=10, total_epochs=450, p_start_epoch=25, p_stop_epoch=400)
    assert s.p(0, 0) == 8.0 and s.p(24, 9) == 8.0
    assert s.p(25, 0) == 8.0 and s.p(25, 1) > 8.0
    assert s.p(399, 9) == pytest.approx(1000.0 * (8 / 1000) ** (1 / 3750), rel=1e-12)
    assert math.isinf(s.p(400, 0)) and math.isinf(s.p(449, 9))
    assert s.lam(0, 0, 0.05, 2e-4) == pytest.approx(0.05)
    assert s.lam(212, 5, 0.05, 2e-4) == pytest.approx(math.sqrt(0.05 * 2e-4))
    assert s.lam(400, 0, 0.05, 2e-4) == pytest.approx(2e-4) and s.lam(449, 9, 0.05, 2e-4) == pytest.approx(2e-4)
    assert s.lr_factor(0, 0) == 1.0
    assert s.lr_factor(225, 0) == pytest.approx(0.5)
    assert s.lr_factor(449, 9) == pytest.approx(0.5 * (1 + math.cos(math.pi * 4499 / 4500)))
    assert s.eps_factor(0, 0) == 1.0
    ramp = Schedule(batches_per_epoch=10, total_epochs=800, p_start_epoch=100, p_stop_epoch=750,
                    eps_start_epoch=0, eps_end_epoch=100)
    assert ramp.eps_factor(0, 0) == 0.0 and ramp.eps_factor(50, 0) == 0.5 and ramp.eps_factor(100, 0) == 1.0


def test_losses_follow_the_reference_formulas() -> None:
    z = torch.tensor([[0.0, -1.0, -3.0], [0.0, -0.2, 1.0]])
    y = torch.tensor([0, 0])
    eps = 0.5  # θ = 2ε = 1: margins 1 (zero loss) and -1 (misclassified, capped at 1)
    m = normalised_worst_margins(z, y, eps)
    assert m[:, 0].tolist() == [0.0, 0.0]
    assert m[0, 1].item() == pytest.approx(0.0) and m[1, 2].item() == pytest.approx(2.0)
    assert clipped_hinge(z, y, eps).item() == pytest.approx(0.5)
    # hinge(mix=0.25) = 0.75·mean max + 0.25·mean over all K columns
    h = m.clamp_min(0)
    expected = 0.75 * h.amax(dim=1).mean() + 0.25 * h.mean()
    assert hinge_loss(z, y, eps, 0.25).item() == pytest.approx(expected.item())


@pytest.mark.parametrize("name", ["linf-dist", "linf-dist-hinge"])
def test_certification_refuses_finite_p_and_training_mode(name: str) -> None:
    method = registry.get(name)
    model = linf_dist_net(MNIST, depth=3, width=32, identity_val=10.0, learnable_scale=False)
    x, y = torch.rand(4, *MNIST.input_shape), torch.zeros(4, dtype=torch.long)
    model.eval()
    with pytest.raises(MethodError, match="p = ∞"):
        method.certify(model, x, y, 0.1)
    set_p(model, math.inf)
    model.train()
    with pytest.raises(MethodError, match="eval mode"):
        method.certify(model, x, y, 0.1)
    method.deploy(model)
    assert method.certify(model, x, y, 0.1).certified.shape == (4,)


def test_interval_certificate_contains_margin_certificate() -> None:
    """Every point with margin/2 > ε (normalised) is also certified by interval propagation."""
    torch.manual_seed(1)
    method = registry.get("linf-dist")
    model = trained_like(linf_dist_net(MNIST, depth=4, width=64, identity_val=10.0, learnable_scale=True))
    x = torch.rand(256, *MNIST.input_shape)
    with torch.no_grad():
        z = model[:-1](x)
    y = z.argmax(dim=1)
    top2 = z.topk(2, dim=1).values
    margin = top2[:, 0] - top2[:, 1]
    eps_px = float(margin.median()) / 2 * SCALAR_STD["mnist"]
    by_margin = margin / 2 > eps_px / SCALAR_STD["mnist"]
    by_interval = method.certify(model, x, y, eps_px).certified
    assert by_margin.any()
    assert (by_interval | ~by_margin).all()
    assert by_interval.sum() >= by_margin.sum()


def test_hybrid_bounds_contain_sampled_differences() -> None:
    torch.manual_seed(2)
    method = registry.get("linf-dist-mlp")
    model = trained_like(linf_dist_mlp(MNIST, depth=4, width=48, identity_val=10.0, hidden=16))
    x = torch.rand(8, *MNIST.input_shape)
    y = torch.randint(0, 10, (8,))
    eps = 0.05
    lower, upper = (x - eps).clamp(0, 1), (x + eps).clamp(0, 1)
    with torch.no_grad():
        bounds = method.margin_lower_bounds(model, lower, upper, y)
        for _ in range(200):
            pt = lower + torch.rand_like(x) * (upper - lower)
            logits = model(pt)
            margins = logits.gather(1, y[:, None]) - logits
            margins = margins.scatter(1, y[:, None], math.inf)
            assert (margins >= bounds - 1e-5).all()
