"""Bounds on floating-point rounding error, so that a certificate computed in float32 is still sound.

A margin bound computed in floating point is not the bound of exact arithmetic, and the model that is
attacked and deployed is itself evaluated in floating point. A point is certified only when its computed
margin lower bound L̂ exceeds a *slack* τ that covers both (Jia & Rinard 2021 build inputs that fool
verifiers which ignore either): with m the exact margin and m̃ the float32-evaluated one at any x' of
the box, m̃(x') ≥ m(x') − E_fwd ≥ L̂ − E_bound − E_fwd, so L̂ > τ ≥ E_bound + E_fwd proves m̃(x') > 0.

Derivation (standard forward error analysis, Higham, "Accuracy and Stability of Numerical Algorithms",
2nd ed., §2.2 and Lemma 3.1/3.3). u is the unit roundoff: 2^-24 for float32, 2^-53 for float64, and 2^-11
where CUDA may use TF32 (products are then formed from 10-bit mantissas). Every elementary operation
returns op(a, b)(1 + δ) with |δ| ≤ u; a sum of n products, in ANY order and with or without FMA, has
|fl(Σ a_i b_i) − Σ a_i b_i| ≤ γ_n Σ |a_i b_i| with γ_n = n u / (1 − n u); and (1 + γ_a)(1 + γ_b) ≤ 1 + γ_{a+b}.
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
covered by the +6), so E_bound ≤ e_y + e_j at the logits, and E_fwd ≤ e_y + e_j: τ_IBP = 2 (e_y + e_j).

A CROWN backward pass (CROWN-IBP, CROWN) computes λ̂_k = fl(λ̂_{k+1} A_k) and constants λ̂_{k+1} b_k; writing
λ̂_{k+1} z_{k+1} = λ̂_k z_k + (λ̂_{k+1} A_k − λ̂_k) z_k + λ̂_{k+1} b_k, every rounding enters the final bound
as |λ̂_{k+1}| (γ (|A_k| M_k + |b_k|)), and |λ̂_{k+1}| ≤ (1 + γ)^L |e_y − e_j| ∏ |A| because relaxation slopes
lie in [0, 1]. A relaxation built on a computed box [l̃, ũ] that is off by e holds for the true values up
to e, and rounding its slope u/(u − l) and intercept costs 3u max(|l̃|, |ũ|). So E_bound ≤ f_y + f_j with
f the same recursion WITHOUT the ReLU masking (a CROWN coefficient can pass a neuron that IBP proves off),
plus e + 3u max(|l̃|, |ũ|) added at every ReLU, started from γ_{n_0+L+2} M_0 (the final sum over the input),
and multiplied by (1 + γ)^L; the boxes are IBP's for CROWN-IBP (off by e) and CROWN's own for CROWN (off
by f). τ_CROWN = (f_y + f_j) + (e_y + e_j).

Orders of magnitude: γ_n ≈ n · 6e-8 in float32, so a layer of fan-in 1000 costs ~1e-4 of |A| M_k; the
slack is a small fraction of a typical certified margin, and it vanishes in float64.
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
    """u for arithmetic on ``t``: its dtype's, or TF32's where CUDA may use TF32 for products."""
    if t.dtype == torch.float64:
        return 2.0**-53
    if t.dtype != torch.float32:
        raise MethodError(f"certificates need float32 or float64 arithmetic, got {t.dtype}")
    tf32 = torch.backends.cuda.matmul.allow_tf32 or torch.backends.cudnn.allow_tf32
    return 2.0**-11 if t.is_cuda and tf32 else 2.0**-24


def gamma(n: int, u: float) -> float:
    """γ_n = n u / (1 − n u): the relative error bound of a sum of n products."""
    if n * u >= 0.5:
        raise MethodError(f"rounding error bound undefined: {n} terms at unit roundoff {u:.1e}")
    return n * u / (1 - n * u)


@dataclass
class RoundingErrors:
    """Per-logit error bounds (B, K): ``interval`` (e: IBP boxes and the float32 forward pass) and
    ``linear`` (f: CROWN backward passes)."""

    interval: torch.Tensor
    linear: torch.Tensor

    def slack(self, spec: torch.Tensor, method: str) -> torch.Tensor:
        """τ (B, S) for the margins spec (B, S, K) @ logits bounded with ``method``."""
        weights = spec.abs()
        fwd = torch.einsum("bsk,bk->bs", weights, self.interval)
        if method == "ibp":
            return 2 * fwd
        return fwd + torch.einsum("bsk,bk->bs", weights, self.linear)


def rounding_errors(model: nn.Module, lower: torch.Tensor, upper: torch.Tensor,
                    relaxation_boxes: Mapping[int, Box] | None = None) -> RoundingErrors:
    """Error bounds at the logits of ``model`` (an eval-mode ``nn.Sequential``) over the box
    [lower, upper] (the box the certificate bounds, as computed). ``relaxation_boxes``: the ReLU input
    boxes of a full CROWN pass, keyed by layer position (None: the IBP boxes are the relaxations')."""
    u = unit_roundoff(lower)
    layers = bound_layers(model)
    steps = len(layers)
    magnitude = torch.maximum(lower.abs(), upper.abs())
    e = u * magnitude
    f = gamma(magnitude[0].numel() + steps + 2, u) * magnitude
    widest = 0.0
    with torch.no_grad():
        for i, layer in enumerate(layers):
            mag = torch.maximum(lower.abs(), upper.abs()) + e
            if isinstance(layer, Affine):
                g = gamma(_terms(layer) + _PARAMETER_AND_BOX_ROUNDINGS + steps, u)
                widest = max(widest, g)
                fresh = g * (layer.apply_abs(mag) + _offset_magnitude(layer, lower))
                e, f = layer.apply_abs(e) + fresh, layer.apply_abs(f) + fresh
            elif isinstance(layer, Flatten):
                e, f = e.flatten(1), f.flatten(1)
            elif isinstance(layer, ReLU):
                if relaxation_boxes is None:
                    box_lower, box_upper, box_error = lower, upper, e
                else:
                    (box_lower, box_upper), box_error = relaxation_boxes[i], f
                f = f + box_error + 3 * u * torch.maximum(box_lower.abs(), box_upper.abs())
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
    return RoundingErrors(interval=e.flatten(1), linear=f.flatten(1) * (1 + widest) ** steps)


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
