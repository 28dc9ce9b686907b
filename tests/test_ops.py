"""The ℓp-distance op against a float64 brute force: values, gradients, stability, interval soundness."""

from __future__ import annotations

import math

import pytest
import torch

from methods.linf_dist.ops import linf_dist_interval, lp_dist

P_VALUES = [1.0, 2.0, 8.0, 8.5, 100.0, 1000.0, math.inf]


def brute_force(x: torch.Tensor, w: torch.Tensor, p: float) -> torch.Tensor:
    """float64, via log-sum-exp so that p = 1000 with magnitudes 1e3 cannot overflow."""
    d = (x.double()[:, None, :] - w.double()[None, :, :]).abs()
    if math.isinf(p):
        return d.amax(dim=2)
    return torch.exp(torch.logsumexp(p * torch.log(d), dim=2) / p)


def inputs(b: int, o: int, n: int, scale: float = 1.0, dtype: torch.dtype = torch.float32, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(b, n, generator=g) * scale).to(dtype).requires_grad_(True)
    w = (torch.randn(o, n, generator=g) * scale).to(dtype).requires_grad_(True)
    return x, w


@pytest.mark.parametrize("p", P_VALUES)
def test_values_match_brute_force(p: float) -> None:
    x, w = inputs(7, 5, 33)
    assert torch.allclose(lp_dist(x, w, p).double(), brute_force(x, w, p), rtol=1e-5, atol=0)


@pytest.mark.parametrize("p", P_VALUES)
def test_gradients_match_brute_force(p: float) -> None:
    x, w = inputs(4, 3, 9, dtype=torch.float64, seed=1)
    g = torch.randn(4, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    gx, gw = torch.autograd.grad((lp_dist(x, w, p) * g).sum(), (x, w))
    xr, wr = x.detach().clone().requires_grad_(True), w.detach().clone().requires_grad_(True)
    rx, rw = torch.autograd.grad((brute_force(xr, wr, p) * g).sum(), (xr, wr))
    assert torch.allclose(gx, rx, rtol=1e-5, atol=1e-12)
    assert torch.allclose(gw, rw, rtol=1e-5, atol=1e-12)


def test_large_p_and_large_inputs_stay_finite() -> None:
    x, w = inputs(6, 4, 50, scale=1e3)
    y = lp_dist(x, w, 1000.0)
    gx, gw = torch.autograd.grad(y.sum(), (x, w))
    assert torch.isfinite(y).all() and torch.isfinite(gx).all() and torch.isfinite(gw).all()
    assert torch.allclose(y.double(), brute_force(x, w, 1000.0), rtol=1e-5, atol=0)


def test_zero_distance_has_zero_value_and_finite_gradient() -> None:
    w = torch.randn(3, 8, requires_grad=True)
    x = w.detach()[:2].clone().requires_grad_(True)
    for p in (8.0, 8.5, 1000.0):
        y = lp_dist(x, w, p)
        assert y[0, 0].item() == 0.0 and y[1, 1].item() == 0.0
        gx, gw = torch.autograd.grad(y.sum(), (x, w))
        assert torch.isfinite(gx).all() and torch.isfinite(gw).all()


def test_infinity_ties_send_gradient_to_first_maximiser() -> None:
    x = torch.tensor([[1.0, -1.0, 1.0, 0.5]], requires_grad=True)
    w = torch.zeros(1, 4, requires_grad=True)
    gx, gw = torch.autograd.grad(lp_dist(x, w, math.inf).sum(), (x, w))
    assert gx.tolist() == [[1.0, 0.0, 0.0, 0.0]]
    assert gw.tolist() == [[-1.0, 0.0, 0.0, 0.0]]


def test_interval_contains_sampled_values_and_is_attained() -> None:
    g = torch.Generator().manual_seed(3)
    centre, w = torch.randn(5, 12, generator=g), torch.randn(6, 12, generator=g)
    radius = torch.rand(5, 12, generator=g) * 0.7
    lo, hi = linf_dist_interval(centre - radius, centre + radius, w)
    samples = centre + (2 * torch.rand(200, 5, 12, generator=g) - 1) * radius
    values = torch.stack([lp_dist(s, w, math.inf) for s in samples])
    assert (values >= lo - 1e-6).all() and (values <= hi + 1e-6).all()
    # Exactness: the bounds are attained by per-coordinate choices inside the box.
    far = torch.where(w[None] > centre[:, None], centre[:, None] - radius[:, None], centre[:, None] + radius[:, None])
    assert torch.allclose((far - w[None]).abs().amax(dim=2), hi)
    near = torch.minimum(torch.maximum(w[None], centre[:, None] - radius[:, None]), centre[:, None] + radius[:, None])
    assert torch.allclose((near - w[None]).abs().amax(dim=2), lo)


def test_bad_shapes_and_p_are_refused() -> None:
    with pytest.raises(ValueError):
        lp_dist(torch.zeros(2, 3), torch.zeros(4, 5), 2.0)
    with pytest.raises(ValueError):
        lp_dist(torch.zeros(2, 3), torch.zeros(4, 3), 0.5)
