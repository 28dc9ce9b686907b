"""The bound engine's hand-written autograd functions (methods.bounds.functional): values equal the plain
torch formulation, gradients pass ``gradcheck``, and whole CROWN-IBP bounds and their parameter
gradients equal a plain layer-by-layer backward pass written here, on random and trained models."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from methods.bounds import compute_margin_bounds, input_box, margin_spec
from methods.bounds.engine import BoundNet
from methods.bounds.functional import (
    ConvGeometry,
    channel_affine_transpose,
    concretize,
    interval_relu,
    relu_relaxation,
    transposed_conv2d,
)
from methods.bounds.layers import BatchNorm, Conv2d, Flatten, Interval, Linear, Normalization, ReLU
from methods.crown_ibp.losses import robust_ce
from methods.normalize import Normalize

pytestmark = pytest.mark.usefixtures("one_thread")

D = torch.float64

# (in channels, out channels, kernel, stride, padding, dilation, input size): the first two take torch's
# direct kernel (few input channels), the others oneDNN's; odd sizes need an output padding.
CONVS = [
    (1, 3, 4, 2, 0, 1, 9),
    (3, 4, 3, 2, 1, 1, 8),
    (5, 4, 3, 1, 0, 2, 7),
    (6, 3, 4, 2, 1, 1, 9),
]


@pytest.mark.parametrize("case", CONVS, ids=[f"conv{i}" for i in range(len(CONVS))])
@pytest.mark.parametrize("bias", [True, False])
def test_transposed_conv_is_the_transpose_and_differentiable(case: tuple[int, ...], bias: bool) -> None:
    cin, cout, k, stride, pad, dil, size = case
    torch.manual_seed(0)
    conv = nn.Conv2d(cin, cout, k, stride, pad, dil, bias=bias).to(D)
    x = torch.randn(1, cin, size, size, dtype=D)
    out = conv(x)
    geometry = ConvGeometry((cin, size, size), conv.stride, conv.padding, conv.dilation, 1)
    lam = torch.randn(out.shape, dtype=D, requires_grad=True)
    back, offset = transposed_conv2d(lam, conv.weight, conv.bias, geometry)
    # lam·(A x + b) = (lam A)·x + lam·b
    assert torch.allclose((lam * out).sum(dim=(1, 2, 3)), (back * x).sum(dim=(1, 2, 3)) + offset, atol=1e-12)
    params = (conv.weight,) if conv.bias is None else (conv.weight, conv.bias)
    assert torch.autograd.gradcheck(
        lambda lam, *p: transposed_conv2d(lam, p[0], p[1] if bias else None, geometry), (lam, *params),
        fast_mode=True,
    )


def relaxation(seed: int, batch: int = 3, neurons: int = 7) -> tuple[torch.Tensor, ...]:
    """Slopes and intercepts of random boxes with active, inactive and unstable neurons."""
    gen = torch.Generator().manual_seed(seed)
    lower = torch.randn(batch, neurons, generator=gen, dtype=D)
    upper = lower + 2 * torch.rand(batch, neurons, generator=gen, dtype=D)
    layer = ReLU(nn.ReLU())
    return layer.relaxation(lower, upper)


def test_relu_relaxation_equals_the_select_and_is_differentiable() -> None:
    lower_slope, upper_slope, intercept = relaxation(1)
    lam = torch.randn(3, 4, 7, dtype=D)
    lam_in, offset = relu_relaxation(lam, lower_slope, upper_slope, intercept)
    assert torch.equal(lam_in, torch.where(lam >= 0, lam * lower_slope[:, None], lam * upper_slope[:, None]))
    assert torch.allclose(offset, (lam.clamp(max=0) * intercept[:, None]).sum(2), atol=1e-14)
    upper_slope.requires_grad_(True)
    intercept.requires_grad_(True)
    lam.requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda *a: relu_relaxation(a[0], lower_slope, *a[1:]), (lam, upper_slope, intercept), fast_mode=True
    )


def test_relu_relaxation_refuses_a_differentiable_lower_slope() -> None:
    lower_slope, upper_slope, intercept = relaxation(2)
    with pytest.raises(ValueError, match="piecewise constant"):
        relu_relaxation(torch.randn(3, 2, 7, dtype=D), lower_slope.requires_grad_(True), upper_slope, intercept)


def test_channel_affine_transpose_and_concretize_are_differentiable() -> None:
    gen = torch.Generator().manual_seed(3)
    lam = torch.randn(4, 3, 2, 2, generator=gen, dtype=D, requires_grad=True)
    scale, shift = (torch.randn(3, generator=gen, dtype=D, requires_grad=True) for _ in range(2))
    back, offset = channel_affine_transpose(lam, scale, shift)
    assert torch.allclose(back, lam * scale[:, None, None]) and torch.allclose(offset, (lam.sum((2, 3)) * shift).sum(1))
    assert torch.autograd.gradcheck(channel_affine_transpose, (lam, scale, shift), fast_mode=True)
    flat = torch.randn(2, 3, 5, generator=gen, dtype=D, requires_grad=True)
    centre = torch.randn(2, 5, generator=gen, dtype=D, requires_grad=True)
    radius = torch.rand(2, 5, generator=gen, dtype=D, requires_grad=True)
    expected = (flat * centre[:, None]).sum(2) - (flat.abs() * radius[:, None]).sum(2)
    assert torch.allclose(concretize(flat, centre, radius), expected, atol=1e-14)
    assert torch.autograd.gradcheck(concretize, (flat, centre, radius), fast_mode=True)


# --- the fused C++ steps (float32 CPU) -----------------------------------------------------------------

F32 = torch.float32


def summation_bound(terms: torch.Tensor, dim: int) -> torch.Tensor:
    """γ_n · Σ|terms|: how far a float32 sum of n float32 terms, in any order, may be from the exact sum."""
    n = terms.shape[dim]
    unit = 2.0**-24
    return n * unit / (1 - n * unit) * terms.abs().sum(dim)


@pytest.mark.parametrize("neurons", [37, 48], ids=["tail", "whole-lanes"])
def test_fused_relu_relaxation_equals_the_torch_products(monkeypatch: pytest.MonkeyPatch, neurons: int) -> None:
    monkeypatch.setenv("CERTBENCH_KERNELS", "fast")  # an error, not a silent fallback, if it cannot be built
    lower_slope, upper_slope, intercept = (t.to(F32) for t in relaxation(4, batch=5, neurons=neurons))
    gen = torch.Generator().manual_seed(5)
    lam = torch.randn(5, 9, neurons, generator=gen)
    lam[lam.abs() < 0.2] = 0  # ties: lam = 0 takes the lower line
    grad, grad_offset = torch.randn(5, 9, neurons, generator=gen), torch.randn(5, 9, generator=gen)
    lam.requires_grad_(True)
    upper_slope.requires_grad_(True)
    intercept.requires_grad_(True)
    lam_in, offset = relu_relaxation(lam, lower_slope, upper_slope, intercept)
    grads = torch.autograd.grad((lam_in, offset), (lam, upper_slope, intercept), (grad, grad_offset))
    lam, upper_slope, intercept = lam.detach(), upper_slope.detach(), intercept.detach()
    positive = lam >= 0
    # Every relaxed coefficient and every entry of the coefficient gradient: the same rounded products.
    assert torch.equal(lam_in, torch.where(positive, lam * lower_slope[:, None], lam * upper_slope[:, None]))
    expected_grad = torch.where(positive, grad * lower_slope[:, None],
                                grad * upper_slope[:, None] + grad_offset[:, :, None] * intercept[:, None])
    assert torch.equal(grads[0], expected_grad)
    # Sums: within float32 summation error of the exact sums of the same float32 products.
    negative = lam.clamp(max=0)
    for got, terms, dim in ((offset, negative * intercept[:, None], 2), (grads[1], grad * negative, 1),
                            (grads[2], grad_offset[:, :, None] * negative, 1)):
        exact = terms.double().sum(dim)
        assert ((got.double() - exact).abs() <= summation_bound(terms.double(), dim)).all()


def test_fused_concretize_equals_the_torch_products(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CERTBENCH_KERNELS", "fast")
    gen = torch.Generator().manual_seed(6)
    lam = torch.randn(4, 9, 53, generator=gen)
    lam[lam.abs() < 0.2] = 0
    centre, radius = torch.rand(4, 53, generator=gen), torch.rand(4, 53, generator=gen) / 10
    grad = torch.randn(4, 9, generator=gen)
    lam.requires_grad_(True)
    bound = concretize(lam, centre, radius)
    (grad_lam,) = torch.autograd.grad(bound, lam, grad)
    lam = lam.detach()
    assert torch.equal(grad_lam, (centre[:, None] - radius[:, None] * lam.sign()) * grad[:, :, None])
    linear, spread = lam * centre[:, None], lam.abs() * radius[:, None]
    exact = linear.double().sum(2) - spread.double().sum(2)
    slack = summation_bound(linear.double(), 2) + summation_bound(spread.double(), 2)
    # The two sums' errors, then one rounding of their difference.
    assert ((bound.double() - exact).abs() <= slack + 2.0**-24 * exact.abs() * 2).all()


def test_crown_ibp_uses_the_fused_steps_in_float32_with_the_same_bounds(monkeypatch: pytest.MonkeyPatch) -> None:
    from methods.bounds import fused

    model = cnn(7, batchnorm=True).float().train()
    gen = torch.Generator().manual_seed(8)
    x, y = torch.rand(6, 3, 12, 12, generator=gen), torch.randint(0, 10, (6,), generator=gen)
    calls = []
    original = fused.relu_forward
    monkeypatch.setattr(fused, "relu_forward", lambda *a: calls.append(1) or original(*a))
    results = {}
    for mode in ("reference", "fast"):
        monkeypatch.setenv("CERTBENCH_KERNELS", mode)
        bound = compute_margin_bounds(model, x, y, 0.02, ("crown-ibp",)).margins["crown-ibp"]
        results[mode] = (bound, torch.autograd.grad(bound.sum(), list(model.parameters())))
    assert calls, "the float32 CPU pass did not take the fused ReLU step"
    (reference, reference_grads), (fast, fast_grads) = results.values()
    # Only the order of float32 sums differs (here at most 2e-7 of the largest entry), while a wrong index,
    # sign or line changes entries by the order of the largest one. Gradients are compared as one vector:
    # the biases before BatchNorm have an exact gradient of 0, so theirs is rounding noise on both sides.
    assert (fast - reference).abs().max() <= 1e-5 * reference.abs().max()
    fast_vector, reference_vector = (torch.cat([g.flatten() for g in gs]) for gs in (fast_grads, reference_grads))
    assert (fast_vector - reference_vector).abs().max() <= 1e-5 * reference_vector.abs().max()



# --- IBP in centre-radius form -------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(3, 5, 7, 7), (2, 4099)], ids=["image", "over-one-grain"])
def test_fused_interval_relu_equals_the_torch_formulation_bit_for_bit(
    monkeypatch: pytest.MonkeyPatch, shape: tuple[int, ...]
) -> None:
    gen = torch.Generator().manual_seed(9)
    centre, radius = torch.randn(*shape, generator=gen), torch.rand(*shape, generator=gen)
    # Ends at exactly 0 and −0 (the relu's and its gradient's ties), and a NaN, which both keep.
    centre.view(-1)[:4] = torch.tensor([0.5, -0.5, 0.0, float("nan")])
    radius.view(-1)[:4] = torch.tensor([0.5, 0.5, 0.0, 1.0])
    grads = torch.randn(*shape, generator=gen), torch.randn(*shape, generator=gen)
    results = {}
    for mode in ("reference", "fast"):
        monkeypatch.setenv("CERTBENCH_KERNELS", mode)
        inputs = (centre.clone().requires_grad_(True), radius.clone().requires_grad_(True))
        outputs = interval_relu(*inputs)
        results[mode] = (*outputs, *torch.autograd.grad(outputs, inputs, grads))
    for reference, fast in zip(results["reference"], results["fast"]):
        assert torch.equal(reference.isnan(), fast.isnan())
        assert torch.equal(reference.nan_to_num().view(torch.int32), fast.nan_to_num().view(torch.int32))


@pytest.mark.parametrize("batchnorm", [False, True], ids=["plain", "batchnorm"])
@pytest.mark.parametrize("mode", ["reference", "fast"])
def test_ibp_margins_and_gradients_equal_the_box_form_pass_bit_for_bit(
    monkeypatch: pytest.MonkeyPatch, batchnorm: bool, mode: str
) -> None:
    """The engine hands a ReLU its affine layer's centre and radius (``layers.Interval``); the box-form rules
    (every layer from and to the ends) must give the very same float32 bounds and parameter gradients."""
    monkeypatch.setenv("CERTBENCH_KERNELS", mode)
    model = cnn(11, batchnorm).float().train()
    gen = torch.Generator().manual_seed(12)
    x, y = torch.rand(6, 3, 12, 12, generator=gen), torch.randint(0, 10, (6,), generator=gen)
    params = list(model.parameters())

    def box_form() -> torch.Tensor:
        net = BoundNet(model)
        net.forward(x)
        lower, upper = input_box(x, 0.03)
        for layer in net.layers[:-1]:
            lower, upper = layer.propagate_interval(lower, upper)
        return net.layers[-1].interval_spec(Interval(ends=(lower, upper)), margin_spec(y, 10))

    ours = compute_margin_bounds(model, x, y, 0.03, ("ibp",)).margins["ibp"]
    ours_grads = torch.autograd.grad(robust_ce(ours), params)
    plain = box_form()
    plain_grads = torch.autograd.grad(robust_ce(plain), params)
    assert torch.equal(ours, plain)
    for ours_grad, plain_grad in zip(ours_grads, plain_grads):
        assert torch.equal(ours_grad, plain_grad)


def test_interval_forms_agree() -> None:
    gen = torch.Generator().manual_seed(13)
    image = torch.randn(4, 6, generator=gen), torch.rand(4, 6, generator=gen)
    affine_out = Interval(image=image)
    assert torch.equal(affine_out.ends()[0], image[0] - image[1])
    # The centre of an image's box is that of its ends (which differ from C and R by rounding).
    assert torch.equal(affine_out.centred()[0], Interval(ends=affine_out.ends()).centred()[0])
    relu_out = ReLU(nn.ReLU()).propagate(affine_out)
    assert torch.equal(relu_out.ends()[1], torch.relu(image[0] + image[1]))
    assert torch.equal(relu_out.centred()[1], Interval(ends=relu_out.ends()).centred()[1])
    with pytest.raises(ValueError):
        Interval()

# --- whole CROWN-IBP bounds against a plain layer-by-layer backward pass --------------------------------

def plain_crown_ibp(model: nn.Sequential, x: torch.Tensor, y: torch.Tensor, eps: float) -> torch.Tensor:
    """CROWN-IBP margin lower bounds with every step written with plain torch ops (and autograd)."""
    net = BoundNet(model)
    logits = net.forward(x)
    x_box = input_box(x, eps)
    boxes = net.interval_boxes(*x_box)
    lam = margin_spec(y, logits.shape[1], x.dtype)
    offset = lam.new_zeros(lam.shape[:2])
    for i in range(len(net.layers) - 1, -1, -1):
        layer, batch, specs = net.layers[i], lam.shape[0], lam.shape[1]
        if isinstance(layer, Linear):
            offset = offset + lam @ layer.bias
            lam = lam @ layer.weight
        elif isinstance(layer, Conv2d):
            m = layer.module
            offset = offset + lam.sum(dim=(3, 4)) @ m.bias
            in_size = layer.in_shape[-1]
            extra = in_size - ((lam.shape[-1] - 1) * m.stride[0] - 2 * m.padding[0] + m.kernel_size[0])
            lam = F.conv_transpose2d(lam.flatten(0, 1), m.weight, None, m.stride, m.padding, extra)
            lam = lam.view(batch, specs, *lam.shape[1:])
        elif isinstance(layer, (Normalization, BatchNorm)):
            a, d = layer.scale_shift()
            view = (1, 1, -1) + (1,) * (lam.dim() - 3)
            offset = offset + (lam * d.view(view)).flatten(2).sum(2)
            lam = lam * a.view(view)
        elif isinstance(layer, Flatten):
            lam = lam.view(batch, specs, *layer.in_shape)
        elif isinstance(layer, ReLU):
            lower_slope, upper_slope, intercept = (t.unsqueeze(1) for t in layer.relaxation(*boxes[i]))
            offset = offset + (lam.clamp(max=0) * intercept).flatten(2).sum(2)
            lam = torch.where(lam >= 0, lam * lower_slope, lam * upper_slope)
        else:
            raise AssertionError(type(layer))
    centre, radius = (x_box[1] + x_box[0]) / 2, (x_box[1] - x_box[0]) / 2
    flat = lam.flatten(2)
    return (flat * centre.flatten(1)[:, None]).sum(2) - (flat.abs() * radius.flatten(1)[:, None]).sum(2) + offset


def cnn(seed: int, batchnorm: bool) -> nn.Sequential:
    torch.manual_seed(seed)
    layers: list[nn.Module] = [Normalize([0.4, 0.5, 0.3], [0.2, 0.3, 0.25]), nn.Conv2d(3, 6, 4, stride=2)]
    layers += [nn.BatchNorm2d(6)] if batchnorm else []
    layers += [nn.ReLU(), nn.Conv2d(6, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 5 * 5, 20)]
    layers += [nn.BatchNorm1d(20)] if batchnorm else []
    layers += [nn.ReLU(), nn.Linear(20, 10)]
    return nn.Sequential(*layers).to(D)


def train_briefly(model: nn.Sequential, x: torch.Tensor, y: torch.Tensor, eps: float) -> None:
    """A few IBP-trained steps, so that many neurons are stable (the regime of a trained model)."""
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(10):
        loss = robust_ce(compute_margin_bounds(model, x, y, eps, ("ibp",)).margins["ibp"])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


@pytest.mark.parametrize("batchnorm", [False, True], ids=["plain", "batchnorm"])
@pytest.mark.parametrize("trained", [False, True], ids=["random", "trained"])
def test_crown_ibp_bounds_and_gradients_equal_the_plain_backward_pass(batchnorm: bool, trained: bool) -> None:
    model = cnn(4, batchnorm).train()
    gen = torch.Generator().manual_seed(5)
    x, y, eps = torch.rand(8, 3, 12, 12, generator=gen, dtype=D), torch.randint(0, 10, (8,), generator=gen), 0.03
    if trained:
        train_briefly(model, x, y, eps)
    params = list(model.parameters())
    ours = compute_margin_bounds(model, x, y, eps, ("crown-ibp",)).margins["crown-ibp"]
    grads = torch.autograd.grad(robust_ce(ours), params)
    plain = plain_crown_ibp(model, x, y, eps)
    plain_grads = torch.autograd.grad(robust_ce(plain), params)
    assert torch.allclose(ours, plain, rtol=1e-10, atol=1e-12)
    for g, p in zip(grads, plain_grads):
        assert torch.allclose(g, p, rtol=1e-9, atol=1e-12)
