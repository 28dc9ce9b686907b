"""The steps of a CROWN backward pass over coefficients of shape (B, S, ...), as autograd functions with
hand-written backward passes: the transposed convolution, the ReLU relaxation, the per-channel affine
map (normalisation, BatchNorm) and the final concretisation over the input box; and the interval (IBP)
step through a ReLU in centre–radius form (fused where ``methods.bounds.fused`` applies).

Why not plain torch ops (torch.profiler on DM-small, batch 256, 9 margin rows, one thread, torch 1.13):
``F.conv_transpose2d`` runs torch 1.13's per-image reference kernel (``slow_conv_transpose2d``) forward and
backward, and autograd through the relaxation written with clamps, ``where`` and broadcasting keeps about
six coefficient-sized temporaries per ReLU and passes over them again in the backward pass; together they
were about 85 % of a CROWN-IBP training step. The functions compute the same values as the plain
formulation: a relaxed or rescaled coefficient is one rounded product as before, and every sum is a sum
of products, in another order (what ``methods.bounds.rounding`` assumes); ``tests/test_bound_functions.py``
checks them against it, and their gradients with ``gradcheck``.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType
from typing import Any

import torch
import torch.nn.functional as F

from methods.bounds import fused

IMAGE_CHANNELS = 4
"""A transposed convolution onto at most this many channels (the first layer, on the image) runs torch's
direct kernel, elsewhere oneDNN's data-gradient kernel. Measured per call at the DM models' shapes (batch
× 9 rows, one thread, loaded machine): onto 1 or 3 channels oneDNN took 3–7× the direct kernel's time on
torch 1.13 and 1.1–2.3× on torch 2.14; on DM-small's second layer it took about half of it on torch 1.13;
on DM-large's layers the two were within about ±40 % of each other, either way."""


@dataclass(frozen=True)
class ConvGeometry:
    """A Conv2d's hyper-parameters and the input size it was applied to (which fixes the transpose's size)."""

    in_shape: tuple[int, int, int]
    stride: tuple[int, int]
    padding: tuple[int, int]
    dilation: tuple[int, int]
    groups: int

    def output_padding(self, out_hw: tuple[int, int], kernel_hw: tuple[int, int]) -> tuple[int, int]:
        """The extra rows/columns that make the transpose produce the forward input's size."""
        return tuple(  # type: ignore[return-value]
            size - ((out - 1) * stride - 2 * pad + dil * (k - 1) + 1)
            for size, out, stride, pad, dil, k in zip(
                self.in_shape[1:], out_hw, self.stride, self.padding, self.dilation, kernel_hw
            )
        )


def _transpose(lam: torch.Tensor, weight: torch.Tensor, g: ConvGeometry) -> torch.Tensor:
    """The convolution's transposed map applied to lam (N, C_out, H', W') -> (N, C_in, H, W)."""
    if g.in_shape[0] <= IMAGE_CHANNELS and g.groups == 1:
        extra = g.output_padding(lam.shape[-2:], weight.shape[-2:])
        return torch.ops.aten.slow_conv_transpose2d(
            lam, weight, weight.shape[-2:], None, g.stride, g.padding, extra, g.dilation
        )
    # The data gradient of the convolution is its transpose; the expanded scalar only carries the size.
    shape_only = lam.new_empty(1).expand(lam.shape[0], *g.in_shape)
    return torch.ops.aten.convolution_backward(
        lam, shape_only, weight, None, g.stride, g.padding, g.dilation, False, (0, 0), g.groups,
        (True, False, False),
    )[0]


class _TransposedConv2d(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any, lam: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, geometry: ConvGeometry
    ) -> tuple[torch.Tensor, torch.Tensor]:
        ctx.geometry = geometry
        lam_in = _transpose(lam, weight, geometry)
        if bias is None:
            ctx.save_for_backward(lam, weight)
            return lam_in, lam.new_zeros(lam.shape[0])
        sums = lam.sum(dim=(2, 3))  # (N, C_out): all the bias term and its gradient need
        ctx.save_for_backward(lam, weight, bias, sums)
        return lam_in, sums @ bias

    @staticmethod
    def backward(
        ctx: Any, grad: torch.Tensor, grad_offset: torch.Tensor
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None, None]:
        lam, weight, *bias_and_sums = ctx.saved_tensors
        g: ConvGeometry = ctx.geometry
        grad = grad.contiguous()
        grad_lam = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            # <grad, Wᵀ lam> = <W grad, lam>: the forward convolution of the incoming gradient.
            grad_lam = F.conv2d(grad, weight, None, g.stride, g.padding, g.dilation, g.groups)
            if bias_and_sums:
                grad_lam.add_((grad_offset.view(-1, 1) * bias_and_sums[0].view(1, -1))[:, :, None, None])
        if ctx.needs_input_grad[1]:
            # ... and its weight gradient is that of a convolution with input grad and output gradient lam.
            grad_weight = torch.ops.aten.convolution_backward(
                lam, grad, weight, None, g.stride, g.padding, g.dilation, False, (0, 0), g.groups,
                (False, True, False),
            )[1]
        if ctx.needs_input_grad[2]:
            grad_bias = grad_offset @ bias_and_sums[1]
        return grad_lam, grad_weight, grad_bias, None


def transposed_conv2d(
    lam: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, geometry: ConvGeometry
) -> tuple[torch.Tensor, torch.Tensor]:
    """(lam A, lam·b) of the convolution z ↦ A z + b for lam (N, C_out, H', W'): (N, C_in, H, W) and (N,)."""
    return _TransposedConv2d.apply(lam.contiguous(), weight, bias, geometry)


class _ChannelAffineTranspose(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any, lam: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        ctx.save_for_backward(lam, scale, shift)
        rows, channels = lam.shape[0], scale.shape[0]
        per_channel = lam.view(rows, channels, -1)
        return (per_channel * scale.view(1, -1, 1)).view(lam.shape), per_channel.sum(dim=2) @ shift

    @staticmethod
    def backward(
        ctx: Any, grad: torch.Tensor, grad_offset: torch.Tensor
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
        lam, scale, shift = ctx.saved_tensors
        rows, channels = lam.shape[0], scale.shape[0]
        grad_lam = grad_scale = grad_shift = None
        if ctx.needs_input_grad[0]:
            grad_lam = grad.reshape(rows, channels, -1) * scale.view(1, -1, 1)
            grad_lam.add_((grad_offset.view(-1, 1) * shift.view(1, -1)).unsqueeze(2))
            grad_lam = grad_lam.view(lam.shape)
        if ctx.needs_input_grad[1]:
            grad_scale = (grad.reshape(rows, channels, -1) * lam.view(rows, channels, -1)).sum(dim=(0, 2))
        if ctx.needs_input_grad[2]:
            grad_shift = grad_offset @ lam.view(rows, channels, -1).sum(dim=2)
        return grad_lam, grad_scale, grad_shift


def channel_affine_transpose(
    lam: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(lam A, lam·b) of z_c ↦ a_c z_c + d_c for lam (N, C, ...): the same shape and (N,)."""
    return _ChannelAffineTranspose.apply(lam.contiguous(), scale, shift)


class _Concretize(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, lam: torch.Tensor, centre: torch.Tensor, radius: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(lam, centre, radius)
        ctx.fused = fused.extension_for(lam, centre, radius)
        if ctx.fused is not None:
            return fused.concretize_forward(ctx.fused, lam, centre, radius)
        return (torch.bmm(lam, centre.unsqueeze(2)) - torch.bmm(lam.abs(), radius.unsqueeze(2))).squeeze(2)

    @staticmethod
    def backward(
        ctx: Any, grad: torch.Tensor
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
        lam, centre, radius = ctx.saved_tensors
        grad_lam = grad_centre = grad_radius = None
        rows = grad.unsqueeze(1)
        if ctx.needs_input_grad[0] and ctx.fused is not None:
            grad_lam = fused.concretize_backward(ctx.fused, lam, centre, radius, grad.contiguous())
        elif ctx.needs_input_grad[0]:
            # g·(c − r·sign(lam)), built in place in one buffer.
            grad_lam = lam.sign().mul_(-radius.unsqueeze(1)).add_(centre.unsqueeze(1)).mul_(grad.unsqueeze(2))
        if ctx.needs_input_grad[1]:
            grad_centre = torch.bmm(rows, lam).squeeze(1)
        if ctx.needs_input_grad[2]:
            grad_radius = -torch.bmm(rows, lam.abs()).squeeze(1)
        return grad_lam, grad_centre, grad_radius


def concretize(lam: torch.Tensor, centre: torch.Tensor, radius: torch.Tensor) -> torch.Tensor:
    """min over the box with centre c and radius r (B, N) of lam (B, S, N) · x: lam·c − |lam|·r, (B, S)."""
    return _Concretize.apply(lam.contiguous(), centre, radius)


class _ReluRelaxation(torch.autograd.Function):
    """lam (B, S, N) -> (lam_in, offset): each coefficient takes the lower line of its neuron where it is
    non-negative and the upper line (slope and intercept) where it is negative."""

    @staticmethod
    def forward(
        ctx: Any, lam: torch.Tensor, lower_slope: torch.Tensor, upper_slope: torch.Tensor, intercept: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        ctx.fused = fused.extension_for(lam, lower_slope, upper_slope, intercept)
        if ctx.fused is not None:
            ctx.save_for_backward(lam, lower_slope, upper_slope, intercept)
            return fused.relu_forward(ctx.fused, lam, lower_slope, upper_slope, intercept)
        # One of the two parts is exactly 0, so every coefficient is one rounded product, as in the plain
        # formulation (the rounding analysis in methods.bounds.rounding relies on that).
        lam_in = lam.clamp(min=0).mul_(lower_slope.unsqueeze(1))
        negative = lam.clamp(max=0)
        lam_in.addcmul_(negative, upper_slope.unsqueeze(1))
        offset = torch.bmm(negative, intercept.unsqueeze(2)).squeeze(2)
        ctx.save_for_backward(negative, lower_slope, upper_slope, intercept)
        return lam_in, offset

    @staticmethod
    def backward(
        ctx: Any, grad_in: torch.Tensor, grad_offset: torch.Tensor
    ) -> tuple[torch.Tensor | None, None, torch.Tensor | None, torch.Tensor | None]:
        if ctx.fused is not None:
            needs = (ctx.needs_input_grad[0], ctx.needs_input_grad[2], ctx.needs_input_grad[3])
            grad_lam, grad_upper, grad_intercept = fused.relu_backward(
                ctx.fused, *ctx.saved_tensors, grad_in.contiguous(), grad_offset.contiguous(), needs
            )
            return grad_lam, None, grad_upper, grad_intercept
        negative, lower_slope, upper_slope, intercept = ctx.saved_tensors
        grad_in = grad_in.contiguous()
        grad_lam = grad_upper = grad_intercept = None
        if ctx.needs_input_grad[0]:
            # Where lam ≥ 0: g·a_l; where lam < 0: g·a_u + g_off·b. As g·a_u + g_off·b plus, where lam ≥ 0,
            # g·(a_l − a_u) − g_off·b: in-place updates instead of a select (4× slower on these shapes), and
            # 1 + sign(min(lam, 0)) for the indicator of lam ≥ 0 (torch 1.13's heaviside is slower still).
            rows, cols = grad_offset.unsqueeze(2), intercept.unsqueeze(1)
            grad_lam = (grad_in * upper_slope.unsqueeze(1)).baddbmm_(rows, cols)
            step = (grad_in * (lower_slope - upper_slope).unsqueeze(1)).baddbmm_(rows, cols, alpha=-1)
            grad_lam.addcmul_(step, negative.sign().add_(1))
        if ctx.needs_input_grad[2]:
            grad_upper = (grad_in * negative).sum(dim=1)
        if ctx.needs_input_grad[3]:
            grad_intercept = torch.bmm(grad_offset.unsqueeze(1), negative).squeeze(1)
        return grad_lam, None, grad_upper, grad_intercept


def relu_relaxation(
    lam: torch.Tensor, lower_slope: torch.Tensor, upper_slope: torch.Tensor, intercept: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(lam_in, offset) for lam (B, S, N) and per-neuron lines (B, N): lam_in = lam·a_l where lam ≥ 0 and
    lam·a_u where lam < 0; offset (B, S) = Σ_n min(lam, 0)·b. The lower slope a_l is piecewise constant in
    the bounds it comes from, so it gets no gradient (and must not require one)."""
    if lower_slope.requires_grad:
        raise ValueError("the lower slope of a ReLU relaxation is piecewise constant: pass it detached")
    return _ReluRelaxation.apply(lam.contiguous(), lower_slope, upper_slope, intercept)


def centred(lower: torch.Tensor, upper: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(centre, radius) of the box [lower, upper]."""
    # Halved in place (× 0.5 is exact, as / 2 is): one allocation less per end, a cheaper gradient.
    return torch.add(upper, lower).mul_(0.5), torch.sub(upper, lower).mul_(0.5)


class _IntervalRelu(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any, centre: torch.Tensor, radius: torch.Tensor, ext: ModuleType
    ) -> tuple[torch.Tensor, torch.Tensor]:
        ctx.ext = ext
        ctx.save_for_backward(centre, radius)
        return fused.interval_relu_forward(ext, centre, radius)

    @staticmethod
    def backward(
        ctx: Any, grad_centre: torch.Tensor, grad_radius: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, None]:
        grads = fused.interval_relu_backward(ctx.ext, *ctx.saved_tensors, grad_centre.contiguous(),
                                             grad_radius.contiguous())
        return (*grads, None)


def interval_relu(centre: torch.Tensor, radius: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """IBP through a ReLU whose input box has this centre and radius: the centre and radius of its output box,
    [relu(c − r), relu(c + r)]. Fused (one pass each way) for contiguous float32 CPU tensors; the same
    values and gradients, bit for bit, as the torch formulation that runs otherwise."""
    ext = fused.extension_for(centre, radius)
    if ext is not None:
        return _IntervalRelu.apply(centre, radius, ext)
    return centred(torch.relu(centre - radius), torch.relu(centre + radius))
