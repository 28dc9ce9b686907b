"""float64 brute force of the ℓp-distance op and its gradients: the yardstick for every fast kernel.

Independent of the kernels' and the reference's formulations (no flushing of small terms, no arg-max
gather / scatter), and evaluated in float64 on the inputs' device, chunk by chunk over outputs so that a
paper-scale layer (B = 512, 5120 × 5120) fits in memory. Used by ``tests/test_kernels.py`` on the CPU and by
the GPU check (``methods.linf_dist.gpucheck``). Shapes: x (B, n_in), w (n_out, n_in) -> (B, n_out).

The two error measures are the ones the kernel tests bound by 1e-5: values per element relative to the
exact value; a gradient tensor against its own largest entry (a per-element criterion is meaningless for
entries made only of coefficients below 2^-48 of the largest, which the kernels flush to zero).
"""

from __future__ import annotations

import math
from typing import Iterator

import torch

_CHUNK_ELEMENTS = 1 << 25  # float64 elements per (B, chunk, n_in) temporary: 256 MiB


def _chunks(x: torch.Tensor, n_out: int) -> Iterator[slice]:
    step = max(1, _CHUNK_ELEMENTS // max(1, x.shape[0] * x.shape[1]))
    for o in range(0, n_out, step):
        yield slice(o, min(o + step, n_out))


def _diff(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return x.double()[:, None, :] - w.double()[None, :, :]


def _lp_chunk(d: torch.Tensor, p: float) -> torch.Tensor:
    """‖d‖_p over the last axis, max-normalised (1e3^1000 overflows even float64); keeps that axis."""
    a = d.abs()
    m = a.amax(dim=2, keepdim=True)
    safe = torch.where(m > 0, m, torch.ones_like(m))
    return m * ((a / safe) ** p).sum(dim=2, keepdim=True) ** (1.0 / p)


def bf_lp(x: torch.Tensor, w: torch.Tensor, p: float) -> torch.Tensor:
    """‖x[b] − w[o]‖_p in float64, finite p ≥ 1."""
    out = torch.empty(x.shape[0], w.shape[0], dtype=torch.float64, device=x.device)
    for c in _chunks(x, w.shape[0]):
        out[:, c] = _lp_chunk(_diff(x, w[c]), p).squeeze(2)
    return out


def bf_lp_grads(x: torch.Tensor, w: torch.Tensor, g: torch.Tensor, p: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Analytic (sub)gradient, float64: sign(d) (|d|/y)^(p-1), sign(0) = +1, zero where y = 0 (p > 1)."""
    gx = torch.zeros(x.shape, dtype=torch.float64, device=x.device)
    gw = torch.zeros(w.shape, dtype=torch.float64, device=x.device)
    for c in _chunks(x, w.shape[0]):
        d = _diff(x, w[c])
        sign = torch.where(d >= 0, 1.0, -1.0).double()
        if p == 1.0:
            coef = sign
        else:
            y = _lp_chunk(d, p)
            ratio = torch.where(y > 0, d.abs() / torch.where(y > 0, y, torch.ones_like(y)), torch.zeros_like(d))
            coef = sign * ratio ** (p - 1.0)
        contrib = coef * g[:, c].double()[:, :, None]
        gx += contrib.sum(dim=1)
        gw[c] = -contrib.sum(dim=0)
    return gx, gw


def bf_linf(x: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Values in float64; arg-max of the float32 |x - w| (the op's semantics), first maximiser on ties."""
    y = torch.empty(x.shape[0], w.shape[0], dtype=torch.float64, device=x.device)
    idx = torch.empty(x.shape[0], w.shape[0], dtype=torch.long, device=x.device)
    pos = torch.arange(x.shape[1], device=x.device)
    for c in _chunks(x, w.shape[0]):
        y[:, c] = _diff(x, w[c]).abs().amax(dim=2)
        a32 = (x[:, None, :] - w[None, c, :]).abs()
        first = a32 == a32.amax(dim=2, keepdim=True)
        idx[:, c] = torch.where(first, pos, torch.full_like(pos, x.shape[1])).amin(dim=2)
    return y, idx


def bf_linf_grads(x: torch.Tensor, w: torch.Tensor, idx: torch.Tensor, g: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """The p = ∞ gradient, sign(x − w) at the arg-max ``idx``, as a one-hot sum (no gather / scatter)."""
    gx = torch.zeros(x.shape, dtype=torch.float64, device=x.device)
    gw = torch.zeros(w.shape, dtype=torch.float64, device=x.device)
    pos = torch.arange(x.shape[1], device=x.device)
    for c in _chunks(x, w.shape[0]):
        d = _diff(x, w[c])
        hot = (pos == idx[:, c, None]).double()
        contrib = hot * torch.where(d >= 0, 1.0, -1.0).double() * g[:, c].double()[:, :, None]
        gx += contrib.sum(dim=1)
        gw[c] = -contrib.sum(dim=0)
    return gx, gw


def bf_interval(lower: torch.Tensor, upper: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact [L, U] of ‖x − w[o]‖_∞ over the box, in float64."""
    low = torch.empty(lower.shape[0], w.shape[0], dtype=torch.float64, device=lower.device)
    high = torch.empty_like(low)
    lo64, up64 = lower.double()[:, None, :], upper.double()[:, None, :]
    for c in _chunks(lower, w.shape[0]):
        w64 = w[c].double()[None]
        low[:, c] = torch.maximum(w64 - up64, lo64 - w64).amax(dim=2).clamp_min(0.0)
        high[:, c] = torch.maximum(w64 - lo64, up64 - w64).amax(dim=2)
    return low, high


def value_error(got: torch.Tensor, want: torch.Tensor) -> float:
    """Largest |got − want| / |want| over the elements (0 where both are 0, ∞ where only want is)."""
    err = (got.double() - want).abs()
    ratio = torch.where(want != 0, err / want.abs().clamp_min(1e-300), torch.where(err > 0, math.inf, 0.0))
    return float(ratio.max()) if ratio.numel() else 0.0


def grad_error(got: torch.Tensor, want: torch.Tensor) -> float:
    """Largest |got − want| over the tensor, relative to the largest |want| (0 for two zero tensors)."""
    err = float((got.double() - want).abs().max()) if want.numel() else 0.0
    scale = float(want.abs().max()) if want.numel() else 0.0
    if scale == 0.0:
        return 0.0 if err == 0.0 else math.inf
    return err / scale


def make(b: int, o: int, n: int, scale: float = 1.0, seed: int = 0, device: torch.device | str = "cpu"
         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x (b, n), w (o, n) ~ N(0, scale²) and an upstream gradient g (b, o) ~ N(0, 1), float32, drawn on the CPU."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(b, n, generator=gen) * scale
    w = torch.randn(o, n, generator=gen) * scale
    g = torch.randn(b, o, generator=gen)
    return x.to(device), w.to(device), g.to(device)


def ties(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x (4, n), w (5, n), g (4, 5) with several coordinates of each pair at the same (largest) distance,
    of both signs, and one zero-distance pair (x[3] = w[2]): where the first maximiser must be chosen."""
    gen = torch.Generator().manual_seed(n + seed)
    w = torch.randn(5, n, generator=gen) * 0.1
    x = torch.zeros(4, n)
    for o in range(5):
        cols = torch.randperm(n, generator=gen)[: max(1, n // 5)]
        w[o, cols] = torch.where(torch.rand(len(cols), generator=gen) > 0.5, 1.0, -1.0)
    x[3] = w[2]
    return x, w, torch.randn(4, 5, generator=gen)
