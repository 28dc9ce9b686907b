"""Bounds on floating-point rounding error, so that a certificate computed in float32 is still sound.

A margin bound computed in floating point is not the bound of exact arithmetic, and the model that is
attacked and deployed is itself evaluated in floating point. A point is certified only when its computed
margin lower bound L̂ exceeds a *slack* τ that covers both (Jia & Rinard 2021 build inputs that fool
verifiers which ignore either): with m the exact margin and m̃ the float32-evaluated one at any x' of
the box, m̃(x') ≥ m(x') − E_fwd ≥ L̂ − E_bound − E_fwd, so L̂ > τ ≥ E_bound + E_fwd proves m̃(x') > 0.

Derivation (standard forward error analysis, Higham, "Accuracy and Stability of Numerical Algorithms",
2nd ed., §2.2 and Lemma 3.1/3.3). u is the unit roundoff: 2^-24 for float32, 2^-53 for float64. Every
elementary operation returns op(a, b)(1 + δ) with |δ| ≤ u; a sum of n products, in ANY order and with or
without FMA, has |fl(Σ a_i b_i) − Σ a_i b_i| ≤ γ_n Σ |a_i b_i| with γ_n = n u / (1 − n u); and
(1 + γ_a)(1 + γ_b) ≤ 1 + γ_{a+b}. Where CUDA may use TF32, each product also carries the rounding of its
factors to 11 significant bits, which adds ~2^-10 to the γ of every matrix product and convolution.
Convolutions are assumed to be computed as sums of products (direct or im2col + GEMM, what torch uses on
CPU), not by Winograd or FFT transforms, whose error is not of this form: our assumption.

We carry, per example and neuron at every position k, an error vector e_k with two properties: the exact
values z_k(x') for x' in the input box lie in the computed IBP box widened by e_k, and the float32 forward
pass at any such x' is within e_k of the exact value. M_k = max(|l̂_k|, |û_k|) + e_k then bounds every
value at position k that any of these computations meets. Per layer kind:

* affine z ↦ A z + b (Linear, Conv2d, normalisation, BatchNorm; n = the longer of fan-in and fan-out, so
  it also covers the transposed products of a backward pass): exact propagation of the widened box moves
  the result by |A| e_k; the computation adds at most γ_{n+6+L}(|A| M_k + |b|) (the product, the bias, the
  centre c = (l + u)/2, the radius, the end c ± r, two roundings in forming A and b from the stored
  parameters, and L more for sums over the L layers). For BatchNorm |b| is |a·mean| + |β|, as b = β − a·mean
  is formed with cancellation.
* ReLU is exact and 1-Lipschitz: e is unchanged, and becomes 0 where û + 2e ≤ 0 (the neuron is off for
  every x', in exact arithmetic and in float32).
* Tanh and sigmoid are 1-Lipschitz with values in [−1, 1]; torch computes them within 2 ulps (our
  assumption), which adds 4u.
* modules that state their own box rule (the ℓ∞-dist layers) state their error as well, through
  ``interval_rounding(lower, upper, error, u)``; a module without it is refused.

IBP merges the specification row e_y − e_j into the last affine layer (W_y − W_j, one more rounding
covered by the +6), so E_bound ≤ e_y + e_j at the logits, and E_fwd ≤ e_y + e_j: τ_IBP = 2 (e_y + e_j)
when the bounds are computed in the deployed arithmetic.

A CROWN backward pass (CROWN-IBP, CROWN) computes λ̂_k = fl(λ̂_{k+1} A_k) and constants λ̂_{k+1} b_k; writing
λ̂_{k+1} z_{k+1} = λ̂_k z_k + (λ̂_{k+1} A_k − λ̂_k) z_k + λ̂_{k+1} b_k, every rounding enters the final bound
as |λ̂_{k+1}| (γ (|A_k| M_k + |b_k|)), and |λ̂_{k+1}| ≤ (1 + γ)^L |e_y − e_j| ∏ |A| because relaxation slopes
lie in [0, 1]. A relaxation built on a computed box [l̃, ũ] that is off by e holds for the true values up
to e, and rounding its slope u/(u − l) and intercept costs 3u max(|l̃|, |ũ|); where the box is off for
sure (ũ + e ≤ 0) or on for sure (l̃ − e ≥ 0) the relaxation is exact. A neuron whose computed box has
ũ ≤ 0 gets slope 0 exactly, so no coefficient passes it. So E_bound ≤ f_y + f_j with f the same recursion
as e but masked at the ReLUs by the relaxation boxes (ũ ≤ 0), plus e + 3u max(|l̃|, |ũ|) added at every
ReLU whose sign the box leaves unsure, started from γ_{n_0+L+2} M_0 (the final sum over the input) and
multiplied by (1 + γ)^L; the boxes are IBP's for CROWN-IBP (off by e) and CROWN's own for CROWN (off by
f). τ_CROWN = (f_y + f_j) + (e_y + e_j).

Orders of magnitude: γ_n ≈ n · 6e-8 in float32, so a layer of fan-in 1000 costs ~1e-4 of |A| M_k. E_fwd
is inherent to a float32 model; E_bound is not. Its CROWN part, bounded through |spec| ∏|A| rather than
the coefficients actually met, is far above the real error of a float32 backward pass (on a CIFAR-10
DM-small CROWN-IBP model: f-share 0.13 median, real |L32 − L64| ≤ 8.4e-5 over 10,000 points). So the IBP family's certificates
(``methods.bounds.margins.certify_margins``) compute their bounds in float64 on an exact float64 copy of
the float32 model: τ = E_fwd (float32) + E_bound (float64, ~1e-10).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping

import torch
from torch import nn

from methods.base import MethodError
from methods.bounds.layers import (
    Affine,
    BatchNorm,
    Box,
    Conv2d,
    Flatten,
    IntervalOnly,
    Linear,
    Monotone,
    ReLU,
    bound_layers,
)

_PARAMETER_AND_BOX_ROUNDINGS = 6
_ACTIVATION_ULPS = 4


def unit_roundoff(t: torch.Tensor) -> float:
    """u of arithmetic on ``t``'s dtype."""
    if t.dtype == torch.float64:
        return 2.0**-53
    if t.dtype != torch.float32:
        raise MethodError(f"certificates need float32 or float64 arithmetic, got {t.dtype}")
    return 2.0**-24


def product_rounding(t: torch.Tensor) -> float:
    """Extra relative error of each product in a matrix product or convolution on ``t``: TF32 (allowed on
    CUDA for convolutions by default) rounds both factors to 11 significant bits, 2·2^-11 + 2^-22 in all,
    and accumulates in float32. Zero elsewhere."""
    tf32 = torch.backends.cuda.matmul.allow_tf32 or torch.backends.cudnn.allow_tf32
    return 2 * 2.0**-11 + 2.0**-22 if t.is_cuda and t.dtype == torch.float32 and tf32 else 0.0


def gamma(n: int, u: float) -> float:
    """γ_n = n u / (1 − n u): the relative error bound of a sum of n products."""
    if n * u >= 0.5:
        raise MethodError(f"rounding error bound undefined: {n} terms at unit roundoff {u:.1e}")
    return n * u / (1 - n * u)


@dataclass
class RoundingErrors:
    """Per-logit error bounds (B, K) of one arithmetic: ``interval`` (e: IBP boxes and the forward pass) and
    ``linear`` (f: CROWN backward passes)."""

    interval: torch.Tensor
    linear: torch.Tensor

    def forward_slack(self, spec: torch.Tensor) -> torch.Tensor:
        """(B, S): how far the forward pass's margins spec (B, S, K) @ logits can be from the exact
        network's, anywhere in the box."""
        return torch.einsum("bsk,bk->bs", spec.abs(), self.interval)

    def bound_slack(self, spec: torch.Tensor, method: str) -> torch.Tensor:
        """(B, S): how far margin bounds spec (B, S, K) @ logits computed with ``method`` can be from the
        exact network's bounds (e_y + e_j for IBP, f_y + f_j for the CROWN passes)."""
        return torch.einsum("bsk,bk->bs", spec.abs(), self.interval if method == "ibp" else self.linear)


def rounding_errors(model: nn.Module, lower: torch.Tensor, upper: torch.Tensor,
                    relaxation_boxes: Mapping[int, Box] | None = None,
                    arithmetic: torch.dtype | None = None) -> RoundingErrors:
    """Error bounds at the logits of ``model`` (an eval-mode ``nn.Sequential``) over the box
    [lower, upper] (the box the certificate bounds, as computed). ``relaxation_boxes``: the ReLU input
    boxes of a full CROWN pass, keyed by layer position (None: the IBP boxes are the relaxations').

    ``arithmetic``: the dtype whose rounding is bounded, where it is not the box's. A float64 copy of a
    float32 model with ``arithmetic=torch.float32`` bounds the float32 model's forward pass (the recursion
    also covers the float64 boxes, whose error is smaller, as every γ grows with u)."""
    like = lower if arithmetic is None else lower.new_zeros((), dtype=arithmetic)
    u, tf32 = unit_roundoff(like), product_rounding(like)
    layers = bound_layers(model)
    steps = len(layers)
    relative = {i: gamma(_terms(layer) + _PARAMETER_AND_BOX_ROUNDINGS + steps, u) + tf32
                for i, layer in enumerate(layers) if isinstance(layer, Affine)}
    # |λ̂| ≤ (1 + γ)^L |spec| ∏|A|: the rounding of the coefficients themselves.
    growth = (1 + max(relative.values(), default=0.0)) ** steps
    magnitude = torch.maximum(lower.abs(), upper.abs())
    e = u * magnitude
    f = (gamma(magnitude[0].numel() + steps + 2, u) + tf32) * magnitude
    with torch.no_grad():
        for i, layer in enumerate(layers):
            mag = torch.maximum(lower.abs(), upper.abs()) + e
            if isinstance(layer, Affine):
                fresh = relative[i] * (layer.apply_abs(mag) + _offset_magnitude(layer, lower))
                e, f = layer.apply_abs(e) + fresh, layer.apply_abs(f) + fresh
            elif isinstance(layer, Flatten):
                e, f = e.flatten(1), f.flatten(1)
            elif isinstance(layer, ReLU):
                if relaxation_boxes is None:
                    box_lower, box_upper, box_error = lower, upper, e
                else:
                    (box_lower, box_upper), box_error = relaxation_boxes[i], f * growth
                unsure = (box_upper + box_error > 0) & (box_lower - box_error < 0)
                violation = box_error + 3 * u * torch.maximum(box_lower.abs(), box_upper.abs())
                f = torch.where(box_upper > 0, f, torch.zeros_like(f)) + torch.where(unsure, violation, 0 * f)
                e = torch.where(upper + 2 * e <= 0, torch.zeros_like(e), e)
            elif isinstance(layer, Monotone):
                e, f = e + _ACTIVATION_ULPS * u, f + _ACTIVATION_ULPS * u
            elif isinstance(layer, IntervalOnly):
                rule = getattr(layer.module, "interval_rounding", None)
                if rule is None:
                    raise MethodError(f"{type(layer.module).__name__} states no rounding error bound")
                e = rule(lower, upper, e, u)
                f = e
            else:
                raise MethodError(f"no rounding error rule for the {layer.kind} layer")
            lower, upper = layer.propagate_interval(lower, upper)
    return RoundingErrors(interval=e.flatten(1), linear=f.flatten(1) * growth)


def _terms(layer: Affine) -> int:
    """Products per output of the layer or of its transpose, whichever is longer."""
    if isinstance(layer, Linear):
        return max(layer.weight.shape)
    if isinstance(layer, Conv2d):
        w = layer.module.weight
        return max(w.shape[0], w.shape[1]) * math.prod(w.shape[2:])
    return 1


def _offset_magnitude(layer: Affine, like: torch.Tensor) -> torch.Tensor:
    """|b| of z ↦ A z + b, as a tensor broadcasting over the layer's output."""
    if isinstance(layer, BatchNorm):
        a, _ = layer.scale_shift()
        m = layer.module
        b = (a * m.running_mean).abs() + (m.bias.abs() if m.bias is not None else 0.0)
        return b.view(1, -1, *([1] * (like.dim() - 2)))
    return layer.apply(torch.zeros_like(like[:1])).abs()
