"""Reference ℓp-distance computations in plain torch: chunked, numerically stable, device-agnostic.

These are the ground truth that every fast kernel is tested against, and the fallback where no fast
kernel builds. Shapes: x (B, n_in), w (n_out, n_in) -> (B, n_out). Outputs are computed chunk by chunk
over n_out so that no B × n_out × n_in tensor is ever materialised (each temporary stays under
``_CHUNK_ELEMENTS``).

Numerics (spec §1.2-1.4):
- finite p: with m = max_i |x_i − w_i|, ‖x − w‖_p = m · (Σ (|x_i − w_i| / m)^p)^(1/p); every term is ≤ 1
  and the sum lies in [1, n_in], so nothing overflows at p = 1000 and beyond. The backward pass uses
  (|x_i − w_i| / y)^(p−1) ≤ 1 for the same reason. A zero distance (y = 0) gets the zero subgradient.
- p = ∞: exact max with the arg-max remembered; the gradient goes to the first (lowest-index) maximiser,
  with sign(x − w) and sign(0) = +1, as in the reference CUDA code.
- Large p drives the normalised powers into the denormal range, which costs ~3× on x86 CPUs; terms below
  ``_TINY`` are irrelevant next to the max term (which is exactly 1), so they are flushed to zero
  explicitly rather than relying on the thread-local FTZ flag (which torch's worker threads don't share).
"""

from __future__ import annotations

import torch

_CHUNK_ELEMENTS = 1 << 22
# Relative to the max term (= 1), a term below 2^-60 changes the fp32 sum by nothing.
_TINY = 2.0**-60


def _chunk(batch: int, n_in: int) -> int:
    """Outputs per chunk so that one (B, chunk, n_in) temporary stays under ``_CHUNK_ELEMENTS``."""
    return max(1, _CHUNK_ELEMENTS // max(1, batch * n_in))


def _normalised_powers(t: torch.Tensor, p: float) -> torch.Tensor:
    """t ** p for t in [0, 1], with results below ``_TINY`` flushed to 0 (no denormals)."""
    floor = _TINY ** (1.0 / p)
    return torch.where(t > floor, t, torch.zeros((), dtype=t.dtype, device=t.device)).pow_(p)


def lp_dist_forward(x: torch.Tensor, w: torch.Tensor, p: float) -> tuple[torch.Tensor, None]:
    """(y, state): the reference keeps no state for its backward (backends may; see ``kernels``)."""
    return _lp_values(x, w, p), None


def _lp_values(x: torch.Tensor, w: torch.Tensor, p: float) -> torch.Tensor:
    out = x.new_empty(x.shape[0], w.shape[0])
    step = _chunk(x.shape[0], x.shape[1])
    for o in range(0, w.shape[0], step):
        d = (x[:, None, :] - w[None, o : o + step, :]).abs_()
        m = d.amax(dim=2, keepdim=True)
        t = d.div_(m.clamp_min(torch.finfo(d.dtype).tiny))
        s = _normalised_powers(t, p).sum(dim=2)
        out[:, o : o + step] = s.pow_(1.0 / p).mul_(m.squeeze(2))
    return out


def lp_dist_backward(
    x: torch.Tensor, w: torch.Tensor, y: torch.Tensor, state: None, g: torch.Tensor, p: float, need_x: bool,
    need_w: bool
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    gx = torch.zeros_like(x) if need_x else None
    gw = torch.zeros_like(w) if need_w else None
    step = _chunk(x.shape[0], x.shape[1])
    for o in range(0, w.shape[0], step):
        diff = x[:, None, :] - w[None, o : o + step, :]
        yc = y[:, o : o + step, None]
        # y = 0 only when x == w exactly; the zero subgradient is then the natural choice.
        inv = torch.where(yc > 0, 1.0 / yc, torch.zeros((), dtype=yc.dtype, device=yc.device))
        t = diff.abs().mul_(inv)
        coef = _normalised_powers(t, p - 1.0) if p != 1.0 else torch.ones_like(t)
        sign = torch.where(diff >= 0, 1.0, -1.0).to(diff.dtype)
        contrib = coef.mul_(sign).mul_(g[:, o : o + step, None])
        if gx is not None:
            gx += contrib.sum(dim=1)
        if gw is not None:
            gw[o : o + step] = -contrib.sum(dim=0)
    return gx, gw


def linf_dist_forward(x: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Values (B, n_out) and arg-max indices (B, n_out), first maximiser on ties."""
    out = x.new_empty(x.shape[0], w.shape[0])
    idx = torch.empty(x.shape[0], w.shape[0], dtype=torch.long, device=x.device)
    step = _chunk(x.shape[0], x.shape[1])
    for o in range(0, w.shape[0], step):
        d = (x[:, None, :] - w[None, o : o + step, :]).abs_()
        # torch.max documents that the first maximal index is returned on ties.
        out[:, o : o + step], idx[:, o : o + step] = d.max(dim=2)
    return out, idx


def linf_dist_backward(
    x: torch.Tensor, w: torch.Tensor, idx: torch.Tensor, g: torch.Tensor, need_x: bool, need_w: bool
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    xi = x.gather(1, idx.reshape(x.shape[0], -1)).reshape(idx.shape)
    wi = w.gather(1, idx.t().contiguous()).t()
    sign = torch.where(xi - wi >= 0, 1.0, -1.0).to(x.dtype)
    sg = sign * g
    gx = torch.zeros_like(x).scatter_add_(1, idx, sg) if need_x else None
    gw = torch.zeros_like(w).scatter_add_(1, idx.t().contiguous(), -sg.t().contiguous()) if need_w else None
    return gx, gw


def linf_dist_interval(
    lower: torch.Tensor, upper: torch.Tensor, w: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact range [L, U] of ‖x − w[o]‖_∞ over the box lower ≤ x ≤ upper (spec §1.5, floors at 0)."""
    lo = lower.new_empty(lower.shape[0], w.shape[0])
    hi = lower.new_empty(lower.shape[0], w.shape[0])
    step = _chunk(lower.shape[0], lower.shape[1])
    for o in range(0, w.shape[0], step):
        wc = w[None, o : o + step, :]
        below = wc - upper[:, None, :]  # > 0 when the whole interval lies below w
        above = lower[:, None, :] - wc  # > 0 when the whole interval lies above w
        lo[:, o : o + step] = torch.maximum(below, above).amax(dim=2).clamp_min_(0.0)
        hi[:, o : o + step] = torch.maximum(wc - lower[:, None, :], upper[:, None, :] - wc).amax(dim=2)
    return lo, hi


