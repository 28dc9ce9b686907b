"""The bound engine (methods.bounds): hand-computed cases per layer rule, exact agreement of the CROWN
backward step with the layer's transposed Jacobian, soundness on random models, BatchNorm modes, API."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from methods.base import MethodError
from methods.bounds import certified, compute_margin_bounds, margin_lower_bounds, margin_spec, require_eval
from methods.bounds import engine
from methods.bounds.engine import BoundNet
from methods.bounds.layers import Affine, bound_layer
from methods.normalize import Normalize

# These models are tiny: one intra-op thread avoids thread hand-off costs (large on a shared CPU).
pytestmark = pytest.mark.usefixtures("one_thread")

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
    # Box x ∈ [0, 1]²: h1 ∈ [0, 2] (active), h2 ∈ [−1, 1] (unstable, u = −l: the tie gives lower slope 0).
    # Margin z0 − z1 = relu(h1) − relu(h2), true minimum 0. IBP: 0 − 1 = −1. CROWN(-IBP): relu(h2) ≤
    # (h2 + 1)/2, so the margin ≥ h1 − (h2 + 1)/2 = x1/2 + 3·x2/2 − 1/2 ≥ −1/2 (the first layer's bounds
    # are exact for both, so they agree).
    net = two_neuron_net([[1, 0], [0, 1]])
    x, y = torch.full((1, 2), 0.5, dtype=D), torch.tensor([0])
    assert margin_lower_bounds(net, x, y, 0.5, "ibp").item() == pytest.approx(-1.0)
    assert margin_lower_bounds(net, x, y, 0.5, "crown-ibp").item() == pytest.approx(-0.5)
    assert margin_lower_bounds(net, x, y, 0.5, "crown").item() == pytest.approx(-0.5)


def test_adaptive_lower_slope_is_one_when_upper_dominates() -> None:
    # x = (0.5, 0.25), ε = 0.25: x1 ∈ [0.25, 0.75], x2 ∈ [0, 0.5]; h1 ∈ [0.25, 1.25] (active),
    # h2 ∈ [−0.25, 0.75] (unstable, u > −l so relu(h2) ≥ h2). Margin for y = 1: relu(h2) − relu(h1)
    # ≥ h2 − h1 = −2·x2 ≥ −1 (CROWN-IBP; exact here); IBP: 0 − 1.25.
    net = two_neuron_net([[1, 0], [0, 1]])
    x, y = torch.tensor([[0.5, 0.25]], dtype=D), torch.tensor([1])
    assert margin_lower_bounds(net, x, y, 0.25, "crown-ibp").item() == pytest.approx(-1.0)
    assert margin_lower_bounds(net, x, y, 0.25, "ibp").item() == pytest.approx(-1.25)


def test_last_layer_elision_is_tighter_than_subtracting_logit_intervals() -> None:
    # Head (r1 + r2, r1 − r2): margin z0 − z1 = 2·r2 ≥ 0 exactly, while the logit intervals z0 ∈ [0, 3],
    # z1 ∈ [−1, 2] would only give 0 − 2 = −2 (spec §3.6).
    net = two_neuron_net([[1, 1], [1, -1]])
    x, y = torch.full((1, 2), 0.5, dtype=D), torch.tensor([0])
    assert margin_lower_bounds(net, x, y, 0.5, "ibp").item() == pytest.approx(0.0)


def interval(module: nn.Module, lower: list, upper: list) -> tuple[list, list]:
    layer = bound_layer(module)
    lo, hi = layer.propagate_interval(torch.tensor(lower, dtype=D), torch.tensor(upper, dtype=D))
    return lo.tolist(), hi.tolist()


def test_linear_interval_by_hand() -> None:
    # z = x1 − 2·x2 + 0.5 over [−1, 1] × [0, 1]: centre −0.5, radius 1 + 1 = 2.
    assert interval(linear([[1, -2]], [0.5]), [[-1, 0]], [[1, 1]]) == ([[-2.5]], [[1.5]])


def test_relu_interval_by_hand() -> None:
    assert interval(nn.ReLU(), [[-1.0, 0.5]], [[2.0, 3.0]]) == ([[0.0, 0.5]], [[2.0, 3.0]])


def test_conv_interval_by_hand() -> None:
    # One 2×2 kernel [[1, −1], [2, 0]] with bias 1 on a 2×2 image in [0, 1]: z = x00 − x01 + 2·x10 + 1.
    conv = nn.Conv2d(1, 1, 2).to(D)
    with torch.no_grad():
        conv.weight.copy_(torch.tensor([[[[1, -1], [2, 0]]]], dtype=D))
        conv.bias.fill_(1)
    assert interval(conv, [[[[0, 0], [0, 0]]]], [[[[1, 1], [1, 1]]]]) == ([[[[0.0]]]], [[[[4.0]]]])


def test_normalize_interval_by_hand() -> None:
    assert interval(Normalize([0.5], [0.25]).to(D), [[[[0.0]]]], [[[[1.0]]]]) == ([[[[-2.0]]]], [[[[2.0]]]])


def test_batchnorm_eval_interval_by_hand() -> None:
    # a = γ/√(σ² + eps) = −2/2 = −1, d = β − μ·a = 3 + 1 = 4: z -> 4 − z, so [0, 1] -> [3, 4] (ends swap).
    bn = nn.BatchNorm1d(1, eps=0.0).to(D).eval()
    with torch.no_grad():
        bn.running_mean.fill_(1)
        bn.running_var.fill_(4)
        bn.weight.fill_(-2)
        bn.bias.fill_(3)
    assert interval(bn, [[0.0]], [[1.0]]) == ([[3.0]], [[4.0]])


def test_batchnorm_training_interval_by_hand() -> None:
    # Clean batch (0, 2): mean 1, biased variance 1, so with γ = 1, β = 0, eps = 3: z -> (z − 1)/2.
    bn = nn.BatchNorm1d(1, eps=3.0).to(D).train()
    layer = bound_layer(bn)
    layer.forward(torch.tensor([[0.0], [2.0]], dtype=D))
    lo, hi = layer.propagate_interval(torch.tensor([[0.5], [1.0]], dtype=D), torch.tensor([[1.5], [3.0]], dtype=D))
    assert (lo.tolist(), hi.tolist()) == ([[-0.25], [0.0]], [[0.25], [1.0]])


def test_flatten_interval_keeps_values() -> None:
    assert interval(nn.Flatten(), [[[1.0, 2.0]]], [[[3.0, 4.0]]]) == ([[1.0, 2.0]], [[3.0, 4.0]])


def test_relu_backward_by_hand() -> None:
    # l = (−1, 1, −3), u = (1, 2, −1): unstable with a_u = 1/2 (tie: a_l = 0), active, inactive.
    # lam = (−2, 3, 5): the negative coefficient takes the upper line (slope 1/2, intercept 1/2).
    relu = bound_layer(nn.ReLU())
    lower, upper = torch.tensor([[-1.0, 1.0, -3.0]]), torch.tensor([[1.0, 2.0, -1.0]])
    lam, offset = relu.backward(torch.tensor([[[-2.0, 3.0, 5.0]]]), lower, upper)
    assert lam.tolist() == [[[-1.0, 3.0, 0.0]]] and offset.tolist() == [[-1.0]]
    # A positive coefficient on the same neuron takes the lower line relu(z) ≥ 0·z.
    lam, offset = relu.backward(torch.tensor([[[2.0, 0.0, 0.0]]]), lower, upper)
    assert lam.tolist() == [[[0.0, 0.0, 0.0]]] and offset.tolist() == [[0.0]]


# --- the CROWN step of every affine layer is its transposed Jacobian ------------------------------------

AFFINE_CASES = {
    "linear": (lambda: nn.Linear(6, 4), (6,)),
    "conv-stride2-pad1": (lambda: nn.Conv2d(2, 3, 3, stride=2, padding=1), (2, 8, 8)),
    "conv-odd-size": (lambda: nn.Conv2d(2, 3, 4, stride=2, padding=0), (2, 9, 9)),
    "conv-dilation": (lambda: nn.Conv2d(2, 2, 3, stride=1, padding=2, dilation=2), (2, 5, 5)),
    "batchnorm2d": (lambda: nn.BatchNorm2d(2), (2, 3, 3)),
    "batchnorm1d": (lambda: nn.BatchNorm1d(5), (5,)),
    "normalize": (lambda: Normalize([0.1, 0.2], [0.3, 0.4]), (2, 3, 3)),
}


def randomised(module: nn.Module) -> nn.Module:
    module = module.to(D).eval()
    with torch.no_grad():
        for p in module.parameters():
            p.uniform_(-1, 1)
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.running_mean.uniform_(-1, 1)
            module.running_var.uniform_(0.5, 2)
    return module


@pytest.mark.parametrize("case", AFFINE_CASES)
def test_affine_backward_is_transposed_jacobian(case: str) -> None:
    make, shape = AFFINE_CASES[case]
    torch.manual_seed(0)
    module = randomised(make())
    layer = bound_layer(module)
    assert isinstance(layer, Affine)
    x = torch.randn(2, *shape, dtype=D, requires_grad=True)
    out = layer.forward(x)
    lam = torch.randn(2, 3, *out.shape[1:], dtype=D)
    lam_in, offset = layer.backward(lam, None, None)
    # f is affine: lam·f(x) = (lam A)·x + lam·b at every x.
    lhs = (lam * out.unsqueeze(1)).flatten(2).sum(2)
    rhs = (lam_in * x.unsqueeze(1)).flatten(2).sum(2) + offset
    assert torch.allclose(lhs, rhs, atol=1e-12)
    (vjp,) = torch.autograd.grad(out, x, lam[:, 0])
    assert torch.allclose(lam_in[:, 0], vjp, atol=1e-12)


# --- soundness on random models -------------------------------------------------------------------------

def random_cnn(seed: int) -> nn.Sequential:
    """Every supported layer kind: normalisation, strided/padded convs, BatchNorm 2d/1d, ReLU, Flatten."""
    torch.manual_seed(seed)
    model = nn.Sequential(
        Normalize([0.4, 0.5], [0.2, 0.3]),
        nn.Conv2d(2, 4, 3, stride=2, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
        nn.Conv2d(4, 4, 3), nn.ReLU(),
        nn.Flatten(), nn.Linear(16, 12), nn.BatchNorm1d(12), nn.ReLU(),
        nn.Linear(12, 5),
    )
    for m in model:
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            randomised(m)
    return model.to(D).eval()


def batchnorms(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def margins(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return torch.einsum("bsk,bk->bs", margin_spec(y, 5, D), model(x))


def sampled_min_margins(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float) -> torch.Tensor:
    """Smallest margins (B, K−1) seen at random points, box corners and per-margin PGD iterates."""
    lo, hi = (x - eps).clamp(min=0), (x + eps).clamp(max=1)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        best = margins(model, x, y)
        for k in range(64):
            u = torch.rand(x.shape, generator=gen, dtype=D)
            best = torch.minimum(best, margins(model, lo + (hi - lo) * (u.round() if k % 2 else u), y))
    for j in range(best.shape[1]):
        point = lo + (hi - lo) * torch.rand(x.shape, generator=gen, dtype=D)
        for _ in range(10):
            point.requires_grad_(True)
            m = margins(model, point, y)
            (grad,) = torch.autograd.grad(m[:, j].sum(), point)
            with torch.no_grad():
                best = torch.minimum(best, m)
                point = torch.minimum(torch.maximum(point - eps / 4 * grad.sign(), lo), hi)
    return best


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_bounds_are_sound_on_random_models(seed: int) -> None:
    model = random_cnn(seed)
    x, y, eps = torch.rand(4, 2, 8, 8, dtype=D), torch.tensor([0, 1, 3, 4]), 0.05
    observed = sampled_min_margins(model, x, y, eps)
    for method in METHODS:
        lower = margin_lower_bounds(model, x, y, eps, method)
        assert lower.shape == (4, 4)
        assert (lower <= observed + 1e-9).all(), method
    # At ε = 0 the box is a point and every method returns the exact margins.
    for method in METHODS:
        assert torch.allclose(margin_lower_bounds(model, x, y, 0.0, method), margins(model, x, y), atol=1e-10)


def test_full_crown_matches_a_dense_reference() -> None:
    """Full CROWN on an MLP written densely with explicit matrices (spec §6.2), for comparison."""
    torch.manual_seed(3)
    model = nn.Sequential(nn.Flatten(), nn.Linear(6, 7), nn.ReLU(), nn.Linear(7, 5), nn.ReLU(), nn.Linear(5, 3)).to(D)
    x, y, eps = torch.rand(2, 1, 6, dtype=D), torch.tensor([2, 0]), 0.2
    lo, hi = (x - eps).clamp(min=0).flatten(1), (x + eps).clamp(max=1).flatten(1)
    weights = [model[i].weight for i in (1, 3, 5)]
    biases = [model[i].bias for i in (1, 3, 5)]
    expected = []
    for b in range(2):
        relax: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []

        def lower_bound(a: torch.Tensor, depth: int) -> torch.Tensor:
            """min of a · (pre-activations of layer `depth`) over the box, via the relaxations below."""
            c = torch.zeros(a.shape[0], dtype=D)
            for k in range(depth - 1, -1, -1):
                c, a = c + a @ biases[k], a @ weights[k]
                if k > 0:
                    slope_l, slope_u, intercept = relax[k - 1]
                    c = c + a.clamp(max=0) @ intercept
                    a = a.clamp(min=0) * slope_l + a.clamp(max=0) * slope_u
            return a.clamp(min=0) @ lo[b] + a.clamp(max=0) @ hi[b] + c

        for depth in (1, 2):
            eye = torch.eye(weights[depth - 1].shape[0], dtype=D)
            l, u = lower_bound(eye, depth), -lower_bound(-eye, depth)
            unstable = (l < 0) & (u > 0)
            slope_u = torch.where(unstable, u / (u - l), (l >= 0).to(D))
            slope_l = torch.where(unstable, (u > -l).to(D), (l >= 0).to(D))
            relax.append((slope_l, slope_u, torch.where(unstable, -slope_u * l, torch.zeros_like(l))))
        expected.append(lower_bound(margin_spec(y[b : b + 1], 3, D)[0], 3))
    assert torch.allclose(margin_lower_bounds(model, x, y, eps, "crown"), torch.stack(expected), atol=1e-12)


# --- BatchNorm: training mode uses the clean batch, certification refuses it -----------------------------

def test_training_batchnorm_bounds_use_the_clean_batch_statistics() -> None:
    model, reference = random_cnn(4).train(), random_cnn(4).train()
    x, y = torch.rand(6, 2, 8, 8, dtype=D), torch.randint(0, 5, (6,))
    before = [m.running_mean.clone() for m in batchnorms(model)]
    expected_logits = reference(x)  # one ordinary forward pass: batch statistics, one running-stat update
    result = compute_margin_bounds(model, x, y, 0.03, METHODS)
    assert torch.allclose(result.logits, expected_logits, atol=1e-12)
    for bn, ref, old in zip(batchnorms(model), batchnorms(reference), before):
        assert torch.allclose(bn.running_mean, ref.running_mean) and not torch.allclose(bn.running_mean, old)
    # The bounds equal those of an eval-mode copy whose running statistics are this batch's (biased variance).
    frozen = random_cnn(4)
    h = x
    stats = []
    for m in random_cnn(4):
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            dims = [0] + list(range(2, h.dim()))
            stats.append((h.mean(dims), h.var(dims, unbiased=False)))
        h = m.train()(h)
    with torch.no_grad():
        for bn, (mean, var) in zip(batchnorms(frozen), stats):
            bn.running_mean.copy_(mean)
            bn.running_var.copy_(var)
    for method in METHODS:
        assert torch.allclose(result.margins[method], margin_lower_bounds(frozen, x, y, 0.03, method), atol=1e-10)


def test_eval_batchnorm_bounds_do_not_depend_on_the_batch() -> None:
    model = random_cnn(5)
    x, y = torch.rand(6, 2, 8, 8, dtype=D), torch.randint(0, 5, (6,))
    for method in METHODS:
        whole = margin_lower_bounds(model, x, y, 0.03, method)
        assert torch.allclose(whole[:1], margin_lower_bounds(model, x[:1], y[:1], 0.03, method), atol=1e-12)


def test_certification_refuses_training_mode() -> None:
    model = random_cnn(6).train()
    with pytest.raises(MethodError, match="training mode"):
        require_eval(model)
    require_eval(model.eval())


# --- API ------------------------------------------------------------------------------------------------

def test_margin_columns_are_in_increasing_class_order() -> None:
    model = random_cnn(7)
    x, y = torch.rand(3, 2, 8, 8, dtype=D), torch.tensor([0, 2, 4])
    logits = model(x)
    expected = torch.stack([logits[b, y[b]] - logits[b, [j for j in range(5) if j != y[b]]] for b in range(3)])
    assert torch.allclose(margin_lower_bounds(model, x, y, 0.0, "ibp"), expected, atol=1e-12)


def test_chunked_bounds_equal_whole_batch_bounds() -> None:
    model = random_cnn(8)
    x, y = torch.rand(5, 2, 8, 8, dtype=D), torch.randint(0, 5, (5,))
    for method in METHODS:
        whole = margin_lower_bounds(model, x, y, 0.04, method)
        assert torch.allclose(whole, margin_lower_bounds(model, x, y, 0.04, method, memory_bytes=50_000), atol=1e-12)


@pytest.mark.parametrize("train", [False, True], ids=["eval", "training-batchnorm"])
def test_backward_in_batch_slices_equals_one_pass(monkeypatch: pytest.MonkeyPatch, train: bool) -> None:
    # Slices of 1 and 2 examples (7 = 3 × 2 + 1: a short last slice); with training-mode BatchNorm the
    # statistics stay the whole batch's, and the gradients reach the weights through every slice.
    # One example's widest coefficients: 4 margin rows × the 2 × 8 × 8 input, in float64.
    example_bytes = 4 * 128 * 8
    results = {}
    for block in (engine.COEFFICIENT_BLOCK_BYTES, example_bytes, 2 * example_bytes):
        monkeypatch.setattr(engine, "COEFFICIENT_BLOCK_BYTES", block)
        monkeypatch.setattr(engine, "MIN_SLICE_EXAMPLES", 1)
        model = random_cnn(9).train(train)
        gen = torch.Generator().manual_seed(1)
        x, y = torch.rand(7, 2, 8, 8, dtype=D, generator=gen), torch.randint(0, 5, (7,), generator=gen)
        bounds = compute_margin_bounds(model, x, y, 0.03, ("crown-ibp", "crown"))
        grads = torch.autograd.grad(sum(b.sum() for b in bounds.margins.values()), list(model.parameters()))
        results[block] = (bounds.margins, grads)
    (whole, whole_grads), *sliced = results.values()
    for margins_, grads in sliced:
        for method in ("crown-ibp", "crown"):
            torch.testing.assert_close(margins_[method], whole[method], rtol=1e-12, atol=1e-12)
        for grad, reference in zip(grads, whole_grads):
            torch.testing.assert_close(grad, reference, rtol=1e-12, atol=1e-12)


def test_certified_needs_every_bound_strictly_positive() -> None:
    assert certified(torch.tensor([[0.1, 0.2], [0.1, 0.0], [-1.0, 2.0]])).tolist() == [True, False, False]


def test_plain_and_nested_torch_sequentials_are_accepted() -> None:
    torch.manual_seed(9)
    flat = nn.Sequential(nn.Flatten(), nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    nested = nn.Sequential(nn.Sequential(flat[0], flat[1]), nn.Sequential(flat[2], flat[3]))
    x, y = torch.rand(2, 1, 2, 2), torch.tensor([0, 1])
    for method in METHODS:
        assert torch.equal(margin_lower_bounds(flat, x, y, 0.1, method), margin_lower_bounds(nested, x, y, 0.1, method))


def test_unsupported_models_are_refused_clearly() -> None:
    x, y = torch.rand(1, 1, 4, 4), torch.tensor([0])
    with pytest.raises(MethodError, match="MaxPool2d"):
        margin_lower_bounds(nn.Sequential(nn.MaxPool2d(2), nn.Flatten(), nn.Linear(4, 2)), x, y, 0.1)
    with pytest.raises(MethodError, match="Sequential"):
        margin_lower_bounds(nn.Linear(16, 2), x.flatten(1), y, 0.1)
    with pytest.raises(MethodError, match="unknown bound method"):
        margin_lower_bounds(nn.Sequential(nn.Flatten(), nn.Linear(16, 2)), x, y, 0.1, "beta-crown")


class Shift(nn.Module):
    """A project layer that only states a box rule (like the ℓ∞-dist layers)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + 1

    def interval(self, lower: torch.Tensor, upper: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return lower + 1, upper + 1


def test_interval_only_layers_delegate_ibp_and_refuse_crown() -> None:
    model = nn.Sequential(nn.Flatten(), Shift(), nn.Tanh(), linear([[1, 0], [0, 1]], [0, 0]))
    x, y = torch.tensor([[[0.2, 0.6]]], dtype=D), torch.tensor([1])
    # z = tanh(x + 1) with x1 ∈ [0.1, 0.3], x2 ∈ [0.5, 0.7]: margin z1 − z0 ≥ tanh(1.5) − tanh(1.3).
    lower = margin_lower_bounds(model, x, y, 0.1, "ibp")
    assert lower.item() == pytest.approx(math.tanh(1.5) - math.tanh(1.3))
    for method in ("crown-ibp", "crown"):
        with pytest.raises(MethodError, match="interval bounds only"):
            margin_lower_bounds(model, x, y, 0.1, method)


def test_full_crown_is_refused_where_it_would_not_fit() -> None:
    wide = nn.Sequential(nn.Conv2d(3, 64, 3, padding=1), nn.ReLU(), nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(),
                         nn.Flatten(), nn.Linear(64 * 32 * 32, 10)).eval()
    x, y = torch.rand(1, 3, 32, 32), torch.tensor([3])
    with pytest.raises(MethodError, match="full CROWN"):
        margin_lower_bounds(wide, x, y, 0.01, "crown")
    assert margin_lower_bounds(wide, x, y, 0.01, "crown-ibp").shape == (1, 9)


def test_relu_positions_and_normalised_input() -> None:
    net = BoundNet(random_cnn(0))
    assert net.relu_positions == [3, 5, 9] and net.normalised_position == 1
