"""The public ℓp-distance op: ``lp_dist(x, w, p)[b, o] = ‖x[b] − w[o]‖_p``, and its interval version at p = ∞.

Shapes: x (B, n_in), w (n_out, n_in) -> (B, n_out); float32 for training, float64 accepted (tests).
The arithmetic lives in a *backend*: ``methods.linf_dist.backend_for(x).backend_for(tensor)`` returns the fast
fused kernels for the tensor's device when they are available, else ``methods.linf_dist.reference``
(plain torch, chunked, the ground truth). Both expose the same five functions; numerics are documented
in ``reference``. A backend's finite-p forward may return per-pair state (saved for the backward, which
then need not recompute it); the op hands it back unchanged.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from methods.linf_dist.kernels import backend_for


def _check(x: torch.Tensor, w: torch.Tensor) -> None:
    if x.dim() != 2 or w.dim() != 2 or x.shape[1] != w.shape[1]:
        raise ValueError(f"lp_dist expects x (B, n) and w (m, n), got {tuple(x.shape)} and {tuple(w.shape)}")


class _LpDist(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, w: torch.Tensor, p: float) -> torch.Tensor:
        y, state = backend_for(x).lp_dist_forward(x, w, p)
        ctx.save_for_backward(x, w, y, state)
        ctx.p = p
        return y

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None, None]:
        x, w, y, state = ctx.saved_tensors
        gx, gw = backend_for(x).lp_dist_backward(
            x, w, y, state, g.contiguous(), ctx.p, ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        )
        return gx, gw, None


class _LinfDist(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        y, idx = backend_for(x).linf_dist_forward(x, w)
        ctx.save_for_backward(x, w, idx)
        ctx.mark_non_differentiable(idx)
        return y

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        x, w, idx = ctx.saved_tensors
        need_x, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        return backend_for(x).linf_dist_backward(x, w, idx, g.contiguous(), need_x, need_w)


def lp_dist(x: torch.Tensor, w: torch.Tensor, p: float) -> torch.Tensor:
    """‖x[b] − w[o]‖_p for x (B, n_in), w (n_out, n_in) -> (B, n_out); p ≥ 1 or ``math.inf``."""
    _check(x, w)
    if not p >= 1.0:
        raise ValueError(f"lp_dist needs p >= 1, got {p}")
    x, w = x.contiguous(), w.contiguous()
    if math.isinf(p):
        if not (x.requires_grad or w.requires_grad):
            return backend_for(x).linf_dist_forward(x, w)[0]
        return _LinfDist.apply(x, w)
    return _LpDist.apply(x, w, float(p))


def linf_dist_interval(
    lower: torch.Tensor, upper: torch.Tensor, w: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact [L, U] of ‖x − w[o]‖_∞ over a box, (B, n_in) ends -> two (B, n_out). No gradient."""
    _check(lower, w)
    if lower.shape != upper.shape:
        raise ValueError("interval ends must have the same shape")
    return backend_for(lower).linf_dist_interval(lower.contiguous(), upper.contiguous(), w.contiguous())
