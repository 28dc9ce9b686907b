"""The bound engine (methods.bounds): hand-computed cases per layer rule, exact agreement of the CROWN
backward step with the layer's transposed Jacobian, soundness on random models, BatchNorm modes, API."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from methods.base import MethodError
from methods.bounds import certified, compute_margin_bounds, margin_lower_bounds, margin_spec, require_eval
from methods.bounds.engine import BoundNet
from methods.bounds.layers import Affine, bound_layer
from methods.normalize import Normalize

METHODS = ("ibp", "crown-ibp", "crown")
D = torch.float64


def linear(weight: list[list[float]], bias: list[float]) -> nn.Linear:
    layer = nn.Linear(len(weight[0]), len(weight)).to(D)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor(weight, dtype=D))
        layer.bias.copy_(torch.tensor(bias, dtype=D))
    return layer


def two_neuron_net(head: list[list[float]]) -> nn.Sequential:
    """h = (x1 + x2, x1 − x2), ReLU, logits = head @ relu(h)."""
    return nn.Sequential(linear([[1, 1], [1, -1]], [0, 0]), nn.ReLU(), linear(head, [0, 0]))


# --- tiny hand-computed cases ---------------------------------------------------------------------------

def test_two_neuron_net_by_hand() -> None:
    # Box x ∈ [0, 1]²: h1 ∈ [0, 2] (active), h2 ∈ [−1, 1] (unstable, u = −l so the adaptive slope is 0).
    # Margin z0 − z1 = relu(h1) − relu(h2); true minimum 0.
    # IBP: 0 − 1 = −1. CROWN(-IBP): relu(h2) ≤ (h2 + 1)/2, so the margin ≥ h1 − (h2 + 1)/2
    # = x1/2 + 3x2/2 − 1/2 ≥ −1/2 (both bound the first layer exactly, so they agree).
    net = two_neuron_net([[1, 0], [0, 1]])
    x, y = torch.full((1, 2), 0.5, dtype=D), torch.tensor([0])
    assert margin_lower_bounds(net, x, y, 0.5, "ibp").item() == pytest.approx(-1.0)
    assert margin_lower_bounds(net, x, y, 0.5, "crown-ibp").item() == pytest.approx(-0.5)
    assert margin_lower_bounds(net, x, y, 0.5, "crown").item() == pytest.approx(-0.5)


def test_adaptive_lower_slope_is_one_when_upper_dominates() -> None:
    # Box x1 ∈ [0, 1], x2 ∈ [0, 0.5]: h2 = x1 − x2 ∈ [−0.5, 1], u > −l so relu(h2) ≥ h2.
    # Margin z1 − z0 = relu(h2) − relu(h1) with y = 1 ≥ h2 − h1 = −2 x2 ≥ −1 (CROWN);
    # IBP: 0 − 2 = −2 ... wait h1 ∈ [0, 1.5]: IBP gives 0 − 1.5 = −1.5.
    net = two_neuron_net([[1, 0], [0, 1]])
    x, y = torch.tensor([[0.5, 0.25]], dtype=D), torch.tensor([1])
    assert margin_lower_bounds(net, x, y, 0.5, "crown-ibp", lo=-1.0, hi=2.0).item() == pytest.approx(-1.5)
    x_box = torch.tensor([[0.5, 0.25]], dtype=D)
    lower = margin_lower_bounds(net, x_box, y, 0.25, "crown-ibp", lo=0.0, hi=1.0)
    # ε = 0.25: x1 ∈ [0.25, 0.75], x2 ∈ [0, 0.5] -> h2 ∈ [−0.25, 0.75] (slope 1), h1 ∈ [0.25, 1.25]:
    # margin ≥ h2 − h1 = −2 x2 ≥ −1; IBP: 0 − 1.25.
    assert lower.item() == pytest.approx(-1.0)
    assert margin_lower_bounds(net, x_box, y, 0.25, "ibp").item() == pytest.approx(-1.25)
