"""A known answer: the two-layer ℓ∞-dist net of Theorem 3.2 / A.1 (Zhang et al., ICLR 2022) on real data.

For a dataset whose classes are 2r apart in ℓ∞ (r-separation, Definition 3.1), the net with first-layer
weights w^(1,i) = x_i and second-layer weights w^(2,j)_i = C·[y_i = j], bias −C (C = 4 max ‖x_i‖∞)
outputs g_j(x) = −min_{i: y_i = j} ‖x − x_i‖∞ (Eq. 12) and certifies every training point at ε = r.
Built with this project's op, model and certifier, it must certify every point at ε just below r
(completeness: exact interval propagation loses nothing on this net), while an attack must break the
two images that define r at ε just above it (no certifier could certify them: their midpoint is r from
both). The paper's g has no final negation; our net negates the distances, so the fixed temperature is
set to −1 to give the same logits.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from bench.attacks import project
from bench.data import dataset_info, load_split
from methods import base as registry
from methods.linf_dist.models import SCALAR_STD, linf_dist_net

N = 300
BELOW, ABOVE = 1 - 1e-3, 1 + 1e-2


@pytest.fixture(scope="module")
def separated(data_dir: Path, one_thread: None):
    """The first N MNIST training images, the Theorem A.1 net on them, r and the pair that defines it."""
    split = load_split("mnist", True, data_dir)
    x, y = split.images[:N].float() / 255, split.labels[:N]
    flat = x.flatten(1).double()
    dist = torch.cdist(flat, flat, p=math.inf)
    between = torch.where(y[:, None] != y[None, :], dist, torch.full_like(dist, math.inf))
    two_r = between.min().item()
    a, b = divmod(int(between.argmin()), N)
    info = dataset_info("mnist")
    std = SCALAR_STD["mnist"]
    model = linf_dist_net(info, depth=2, width=N, identity_val=0.0, learnable_scale=False)
    first, second, temperature = model[2], model[3], model[5]
    with torch.no_grad():
        centres = model[:2](x)  # the training images in the net's normalised units
        first.weight.copy_(centres)
        first.mean_shift.running_mean.zero_()
        c = 4 * centres.abs().max()
        second.weight.copy_(c * (y[None, :] == torch.arange(10)[:, None]).float())
        second.bias.fill_(-c)
        temperature.scale.fill_(-1.0)
    method = registry.get("linf-dist")
    return method.deploy(model), method, x, y, dist, two_r / 2, (a, b), std


def test_the_net_is_the_nearest_neighbour_classifier(separated) -> None:
    model, _, x, y, dist, _, _, std = separated
    with torch.no_grad():
        logits = model(x).double()
    same_class = y[None, :] == torch.arange(10)[:, None, None]  # (K, 1, N) vs training labels
    expected = -torch.where(same_class.squeeze(1)[:, None, :], dist[None], torch.full_like(dist, math.inf)[None])
    expected = expected.amax(dim=2).t() / std  # −min over class-j samples, in normalised units
    assert torch.allclose(logits, expected, atol=1e-5)
    assert torch.equal(logits.argmax(dim=1), y)


def test_every_point_is_certified_just_below_r(separated) -> None:
    model, method, x, y, dist, r, _, std = separated
    eps = r * BELOW
    certificate = method.certify(model, x, y, eps)
    assert certificate.certified.all(), f"{int((~certificate.certified).sum())} of {N} not certified at {eps:.4f}"
    # The theorem's margin: (distance to the nearest other-class image − 2ε), in normalised units.
    with torch.no_grad():
        bounds = method.margin_lower_bounds(model, *[(x + s * eps).clamp(0, 1) for s in (-1, 1)], y)
    nearest = torch.stack([torch.where(y == j, dist, torch.full_like(dist, math.inf)).amin(dim=1) for j in range(10)], 1)
    theorem = (nearest - 2 * eps) / std
    others = y[:, None] != torch.arange(10)[None, :]
    assert (bounds.double()[others] >= theorem[others] - 1e-5).all()


def toward_each_other(pair: torch.Tensor, eps: float) -> torch.Tensor:
    """The attack: each image of the pair moved by ε (ℓ∞) straight toward the other, projected onto its
    ε-box as every attack here is."""
    return project(pair + (pair.flip(0) - pair).clamp(-eps, eps), pair, eps)


def test_the_pair_that_defines_r_is_broken_just_above_r(separated) -> None:
    """Past r, each of the two images moved toward the other is nearer to it (2r − ε < r) than to any image
    of its own class (≥ 2r − (2r − ε) = ε > r away), so the nearest-neighbour net misclassifies it. PGD
    does not find this (its sign steps follow one pixel per distance neuron; cross-entropy PGD with 2,000
    steps left both images unbroken when this test was written), hence the direct attack."""
    model, method, x, y, _, r, (a, b), _ = separated
    pair, labels = x[[a, b]], y[[a, b]]
    for eps, broken in ((r * ABOVE, True), (r * BELOW, False)):
        adversarial = toward_each_other(pair, eps)
        with torch.no_grad():
            assert ((model(adversarial).argmax(dim=1) != labels) == broken).all()
        assert method.certify(model, pair, labels, eps).certified.all() != broken
