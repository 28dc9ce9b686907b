"""Triton kernels for the ℓp-distance op on CUDA tensors (float32).

UNTESTED ON A GPU: no GPU was available while this was written. The kernels' logic is exercised on CPU
by Triton's interpreter (``TRITON_INTERPRET=1``, ``tests/test_kernels.py``), which checks indexing,
masking, tie-breaking and the formulas but not the GPU's approximate ``log2``/``exp2`` nor speed.

Same contract as ``methods.linf_dist.reference``; the numerics follow the CPU kernels (``kernels.cpu``):

- p = ∞ forward: tiles of (B, n_out) pairs, running max over column blocks with the block's first
  arg-max (strict ``>`` across blocks, left tie-break within one): the first maximiser.
- Interval forward: the reference's formula, bit for bit.
- Finite p forward: m = max |x − w| (the p = ∞ kernel), then S = Σ 2^(p log2(|x − w| / m)) with terms below
  2^-48 flushed, y = m S^(1/p).
- Finite p backward: grad_x (threads over batch × columns, summing over outputs) and grad_w (outputs ×
  columns, summing over the batch) as two kernels: no atomics, deterministic. For p > 16 the coefficients
  use the same precise scheme as the CPU (TwoSum error of x − w, product residual, a polynomial log2 and a
  renormalising pre-pass), so they do not inherit (p − 1) × float32 rounding.
- p = ∞ backward: the reference's gather / scatter-add (O(B · n_out), not worth a kernel).
- Pairs whose distance leaves [2^-100, 2^100]: the reference in float64 (as the CPU kernels' double path).
- Non-finite inputs and other dtypes: the reference.
"""

from __future__ import annotations

import math
import os
import warnings

import torch

from methods.linf_dist import reference

try:  # triton ships with the CUDA builds of torch
    import triton
    import triton.language as tl

    _TRITON_ERROR: str | None = None
except Exception as exc:  # noqa: BLE001
    triton = None  # type: ignore[assignment]
    tl = None  # type: ignore[assignment]
    _TRITON_ERROR = f"{type(exc).__name__}: {exc}"

FLUSH_LOG2 = -48.0  # as the CPU kernels: terms / coefficients below 2^-48 of the largest are 0
PRECISE_P = 16.0
_LO, _HI = 2.0**-100, 2.0**100
_warned = False


def available(strict: bool = False) -> bool:
    global _warned
    ok = triton is not None and torch.cuda.is_available()
    if not ok:
        why = _TRITON_ERROR or "no CUDA device"
        if strict:
            raise RuntimeError(f"CERTBENCH_KERNELS=fast but the CUDA kernels are unavailable: {why}")
        if not _warned and triton is None:
            _warned = True
            warnings.warn(
                f"Triton is unavailable ({why}); using the reference ℓp-distance op on CUDA", RuntimeWarning
            )
    return ok


def _tmin(e: float) -> float:
    return max(2.0 ** (FLUSH_LOG2 / e), 1.1754943508222875e-38)


if triton is not None:

    @triton.jit
    def _log2_precise(t):
        # Same decomposition and degree-8 polynomial as csrc/vec.h: t = 2^k (1 + f), f exact.
        i = t.to(tl.int32, bitcast=True)
        k = (i - 0x3F3504F3) >> 23
        f = (i - (k << 23)).to(tl.float32, bitcast=True) - 1.0
        f2 = f * f
        f4 = f2 * f2
        p01 = tl.fma(f, -0.7213473320007324, 1.4426950216293335)
        p23 = tl.fma(f, -0.3607036769390106, 0.48091062903404236)
        p45 = tl.fma(f, -0.23894493281841278, 0.28791624307632446)
        p67 = tl.fma(f, -0.2072690725326538, 0.21571587026119232)
        p47 = tl.fma(p67, f2, p45)
        p48 = tl.fma(f4, 0.12583546340465546, p47)
        poly = tl.fma(p48, f4, tl.fma(p23, f2, p01))
        return tl.fma(f, poly, k.to(tl.float32))

    @triton.jit
    def _log2_dz(xv, wv, z, PRECISE: tl.constexpr):
        """(log2(|x - w| z), |x - w| z, x - w); precise: with the TwoSum error and the product residual."""
        s = xv - wv
        a = tl.abs(s)
        t = a * z
        if PRECISE:
            ap = s + wv
            bp = s - ap
            da = xv - ap
            db = wv + bp
            e = da - db
            es = tl.where(s < 0.0, -e, e)
            rho = tl.fma(a, z, -t)
            corr = tl.fma(es, z, rho)
            lg = tl.fma(corr, 1.4426950408889634, _log2_precise(t))
        else:
            lg = tl.log2(t)
        return lg, t, s

    @triton.jit
    def _linf_fwd_kernel(x_ptr, w_ptr, y_ptr, idx_ptr, B, N, K,
                         WITH_IDX: tl.constexpr, BB: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
        rb = tl.program_id(0) * BB + tl.arange(0, BB)
        rn = tl.program_id(1) * BN + tl.arange(0, BN)
        rk = tl.arange(0, BK)
        best = tl.full((BB, BN), -1.0, tl.float32)
        besti = tl.zeros((BB, BN), tl.int32)
        for k0 in range(0, K, BK):
            kk = k0 + rk
            kin = kk < K
            xv = tl.load(x_ptr + rb[:, None] * K + kk[None, :], mask=(rb[:, None] < B) & kin[None, :], other=0.0)
            wv = tl.load(w_ptr + rn[:, None] * K + kk[None, :], mask=(rn[:, None] < N) & kin[None, :], other=0.0)
            d = tl.abs(xv[:, None, :] - wv[None, :, :])
            d = tl.where(kin[None, None, :], d, -1.0)  # padding never wins
            if WITH_IDX:
                m, j = tl.max(d, axis=2, return_indices=True, return_indices_tie_break_left=True)
                upd = m > best
                besti = tl.where(upd, k0 + j, besti)
                best = tl.where(upd, m, best)
            else:
                best = tl.maximum(best, tl.max(d, axis=2))
        out = rb[:, None] * N + rn[None, :]
        ok = (rb[:, None] < B) & (rn[None, :] < N)
        tl.store(y_ptr + out, best, mask=ok)
        if WITH_IDX:
            tl.store(idx_ptr + out, besti.to(tl.int64), mask=ok)

    @triton.jit
    def _interval_kernel(l_ptr, u_ptr, w_ptr, lo_ptr, hi_ptr, B, N, K,
                         BB: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
        rb = tl.program_id(0) * BB + tl.arange(0, BB)
        rn = tl.program_id(1) * BN + tl.arange(0, BN)
        rk = tl.arange(0, BK)
        hi = tl.full((BB, BN), float("-inf"), tl.float32)
        lo = tl.full((BB, BN), float("inf"), tl.float32)
        for k0 in range(0, K, BK):
            kk = k0 + rk
            kin = kk < K
            xm = (rb[:, None] < B) & kin[None, :]
            lv = tl.load(l_ptr + rb[:, None] * K + kk[None, :], mask=xm, other=0.0)
            uv = tl.load(u_ptr + rb[:, None] * K + kk[None, :], mask=xm, other=0.0)
            wv = tl.load(w_ptr + rn[:, None] * K + kk[None, :], mask=(rn[:, None] < N) & kin[None, :], other=0.0)
            a = uv[:, None, :] - wv[None, :, :]  # u - w
            b = wv[None, :, :] - lv[:, None, :]  # w - l
            valid = kin[None, None, :]
            hi = tl.maximum(hi, tl.max(tl.where(valid, tl.maximum(a, b), float("-inf")), axis=2))
            lo = tl.minimum(lo, tl.min(tl.where(valid, tl.minimum(a, b), float("inf")), axis=2))
        out = rb[:, None] * N + rn[None, :]
        ok = (rb[:, None] < B) & (rn[None, :] < N)
        tl.store(hi_ptr + out, hi, mask=ok)
        tl.store(lo_ptr + out, tl.maximum(-lo, 0.0), mask=ok)

    @triton.jit
    def _pow_sum_kernel(x_ptr, w_ptr, z_ptr, s_ptr, B, N, K, p, tmin,
                        PRECISE: tl.constexpr, BB: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
        """s[b, o] = sum_i 2^(p log2(|x_i - w_i| z[b, o])), terms with t <= tmin flushed."""
        rb = tl.program_id(0) * BB + tl.arange(0, BB)
        rn = tl.program_id(1) * BN + tl.arange(0, BN)
        rk = tl.arange(0, BK)
        ok = (rb[:, None] < B) & (rn[None, :] < N)
        z = tl.load(z_ptr + rb[:, None] * N + rn[None, :], mask=ok, other=0.0)
        acc = tl.zeros((BB, BN), tl.float32)
        for k0 in range(0, K, BK):
            kk = k0 + rk
            kin = kk < K
            xv = tl.load(x_ptr + rb[:, None] * K + kk[None, :], mask=(rb[:, None] < B) & kin[None, :], other=0.0)
            wv = tl.load(w_ptr + rn[:, None] * K + kk[None, :], mask=(rn[:, None] < N) & kin[None, :], other=0.0)
            lg, t, s = _log2_dz(xv[:, None, :], wv[None, :, :], z[:, :, None], PRECISE)
            term = tl.where(t > tmin, tl.exp2(lg * p), 0.0)
            acc += tl.sum(term, axis=2)
        tl.store(s_ptr + rb[:, None] * N + rn[None, :], acc, mask=ok)

    @triton.jit
    def _coef(xv, wv, z, a, pm1, tmin, P1: tl.constexpr, PRECISE: tl.constexpr):
        lg, t, s = _log2_dz(xv, wv, z, PRECISE)
        if P1:
            c = tl.full(t.shape, 1.0, tl.float32)
        else:
            if PRECISE:
                u = tl.fma(lg, pm1, a)
            else:
                u = lg * pm1
            c = tl.where(t > tmin, tl.exp2(u), 0.0)
        return tl.where(s >= 0.0, c, -c)

    @triton.jit
    def _pair_state(z_ptr, a_ptr, g_ptr, rb, rn, B, N, PRECISE: tl.constexpr):
        """The forward's per-pair state (z, offset a) and the output gradient g for a (rb, rn) tile."""
        pair = (rb[:, None] < B) & (rn[None, :] < N)
        po = rb[:, None] * N + rn[None, :]
        z = tl.load(z_ptr + po, mask=pair, other=0.0)
        g = tl.load(g_ptr + po, mask=pair, other=0.0)
        if PRECISE:
            a = tl.load(a_ptr + po, mask=pair, other=0.0)
        else:
            a = z
        return z, a, g

    @triton.jit
    def _grad_x_kernel(x_ptr, w_ptr, z_ptr, a_ptr, g_ptr, gx_ptr, B, N, K, pm1, tmin,
                       P1: tl.constexpr, PRECISE: tl.constexpr,
                       BB: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
        rb = tl.program_id(0) * BB + tl.arange(0, BB)
        rk = tl.program_id(1) * BK + tl.arange(0, BK)
        kin = rk < K
        xv = tl.load(x_ptr + rb[:, None] * K + rk[None, :], mask=(rb[:, None] < B) & kin[None, :], other=0.0)
        acc = tl.zeros((BB, BK), tl.float32)
        for n0 in range(0, N, BN):
            rn = n0 + tl.arange(0, BN)
            z, a, g = _pair_state(z_ptr, a_ptr, g_ptr, rb, rn, B, N, PRECISE)
            wv = tl.load(w_ptr + rn[:, None] * K + rk[None, :], mask=(rn[:, None] < N) & kin[None, :], other=0.0)
            c = _coef(xv[:, None, :], wv[None, :, :], z[:, :, None], a[:, :, None], pm1, tmin, P1, PRECISE)
            acc += tl.sum(c * g[:, :, None], axis=1)
        tl.store(gx_ptr + rb[:, None] * K + rk[None, :], acc, mask=(rb[:, None] < B) & kin[None, :])

    @triton.jit
    def _grad_w_kernel(x_ptr, w_ptr, z_ptr, a_ptr, g_ptr, gw_ptr, B, N, K, pm1, tmin,
                       P1: tl.constexpr, PRECISE: tl.constexpr,
                       BB: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
        rn = tl.program_id(0) * BN + tl.arange(0, BN)
        rk = tl.program_id(1) * BK + tl.arange(0, BK)
        kin = rk < K
        wv = tl.load(w_ptr + rn[:, None] * K + rk[None, :], mask=(rn[:, None] < N) & kin[None, :], other=0.0)
        acc = tl.zeros((BN, BK), tl.float32)
        for b0 in range(0, B, BB):
            rb = b0 + tl.arange(0, BB)
            z, a, g = _pair_state(z_ptr, a_ptr, g_ptr, rb, rn, B, N, PRECISE)
            xv = tl.load(x_ptr + rb[:, None] * K + rk[None, :], mask=(rb[:, None] < B) & kin[None, :], other=0.0)
            c = _coef(xv[:, None, :], wv[None, :, :], z[:, :, None], a[:, :, None], pm1, tmin, P1, PRECISE)
            acc -= tl.sum(c * g[:, :, None], axis=0)
        tl.store(gw_ptr + rn[:, None] * K + rk[None, :], acc, mask=(rn[:, None] < N) & kin[None, :])


_BB, _BN, _BK = 16, 16, 16


def _grid2(a: int, ba: int, b: int, bb: int) -> tuple[int, int]:
    return (triton.cdiv(a, ba), triton.cdiv(b, bb))


# ------------------------------------------------------------------------------------------------------
# Launchers: any device Triton can run on (CUDA; CPU tensors under TRITON_INTERPRET=1).


def launch_linf_forward(x: torch.Tensor, w: torch.Tensor, with_idx: bool = True):
    B, K = x.shape
    N = w.shape[0]
    y = torch.empty(B, N, dtype=torch.float32, device=x.device)
    idx = torch.empty(B, N, dtype=torch.long, device=x.device) if with_idx else y
    _linf_fwd_kernel[_grid2(B, _BB, N, _BN)](x, w, y, idx, B, N, K, with_idx, _BB, _BN, _BK)
    return y, (idx if with_idx else None)


def launch_interval(lower: torch.Tensor, upper: torch.Tensor, w: torch.Tensor):
    B, K = lower.shape
    N = w.shape[0]
    lo = torch.empty(B, N, dtype=torch.float32, device=lower.device)
    hi = torch.empty(B, N, dtype=torch.float32, device=lower.device)
    _interval_kernel[_grid2(B, _BB, N, _BN)](lower, upper, w, lo, hi, B, N, K, _BB, _BN, _BK)
    return lo, hi


def launch_lp_forward(x: torch.Tensor, w: torch.Tensor, p: float) -> torch.Tensor | None:
    """None when some pair is out of the fast path's range (the caller uses the reference)."""
    B, K = x.shape
    N = w.shape[0]
    m, _ = launch_linf_forward(x, w, with_idx=False)
    nonzero = m > 0
    if bool(((m < _LO) & nonzero).any()) or bool((m > _HI).any()):
        return None
    z = torch.where(nonzero, 1.0 / torch.where(nonzero, m, torch.ones_like(m)), torch.zeros_like(m))
    s = torch.empty_like(m)
    _pow_sum_kernel[_grid2(B, _BB, N, _BN)](x, w, z, s, B, N, K, float(p), _tmin(p), False, _BB, _BN, _BK)
    y = m.double() * torch.exp2(torch.log2(s.double()) / p)
    return torch.where(nonzero, y, torch.zeros_like(y)).to(torch.float32)


def launch_lp_backward(x, w, y, g, p: float, need_x: bool, need_w: bool):
    """(gx, gw), or None when some pair is out of range (the caller uses the reference)."""
    B, K = x.shape
    N = w.shape[0]
    p1 = p == 1.0
    nonzero = y > 0
    if not p1 and (bool(((y < _LO) & nonzero).any()) or bool((y > _HI).any())):
        return None
    if p1:
        z = torch.ones_like(y)
    else:
        z = torch.where(nonzero & (g != 0), 1.0 / torch.where(nonzero, y, torch.ones_like(y)), torch.zeros_like(y))
    precise = (not p1) and p > PRECISE_P
    a = z
    if precise:
        s = torch.empty_like(y)
        _pow_sum_kernel[_grid2(B, _BB, N, _BN)](x, w, z, s, B, N, K, float(p), _tmin(p), True, _BB, _BN, _BK)
        a = torch.where(s > 0, -(p - 1.0) / p * torch.log2(s.double()), torch.zeros_like(s, dtype=torch.float64))
        a = a.to(torch.float32)
    pm1, tmin = float(p - 1.0), (_tmin(p - 1.0) if not p1 else 0.0)
    gx = gw = None
    if need_x:
        gx = torch.empty_like(x)
        _grad_x_kernel[_grid2(B, _BB, K, _BK)](x, w, z, a, g, gx, B, N, K, pm1, tmin, p1, precise, _BB, _BN, _BK)
    if need_w:
        gw = torch.empty_like(w)
        _grad_w_kernel[_grid2(N, _BN, K, _BK)](x, w, z, a, g, gw, B, N, K, pm1, tmin, p1, precise, _BB, _BN, _BK)
    return gx, gw


# ------------------------------------------------------------------------------------------------------
# The backend interface.


def _eligible(*ts: torch.Tensor) -> bool:
    if triton is None:
        return False
    for t in ts:
        if t.dtype != torch.float32 or t.dim() != 2 or t.numel() == 0:
            return False
        if t.device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            return False
    return all(bool(torch.isfinite(t).all()) for t in ts)


def lp_dist_forward(x: torch.Tensor, w: torch.Tensor, p: float) -> tuple[torch.Tensor, None]:
    """(y, None): the CUDA backward recomputes its per-pair offsets (no state is kept)."""
    p = float(p)
    if p >= 1.0 and math.isfinite(p) and _eligible(x, w):
        y = launch_lp_forward(x.contiguous(), w.contiguous(), p)
        if y is not None:
            return y, None
        return reference.lp_dist_forward(x.double(), w.double(), p)[0].float(), None
    return reference.lp_dist_forward(x, w, p)


def lp_dist_backward(x, w, y, state: None, g, p: float, need_x: bool, need_w: bool):
    p = float(p)
    if not (need_x or need_w):
        return None, None
    if p >= 1.0 and math.isfinite(p) and _eligible(x, w, y) and g.dtype == torch.float32:
        out = launch_lp_backward(x.contiguous(), w.contiguous(), y.contiguous(), g.contiguous(), p, need_x, need_w)
        if out is not None:
            return out
        return _double_backward(x, w, g, p, need_x, need_w)
    return reference.lp_dist_backward(x, w, y, None, g, p, need_x, need_w)


def _double_backward(x, w, g, p: float, need_x: bool, need_w: bool):
    """Distances out of the fast range (as the CPU kernels' double path): the reference in float64, with y
    recomputed there, since the float32 y's rounding would be raised to the power p − 1 (4.5e-5 of the
    largest gradient entry at p = 1000 and magnitude 1e33, against the 1e-5 the kernels are held to)."""
    x64, w64 = x.double(), w.double()
    y64 = reference.lp_dist_forward(x64, w64, p)[0]
    gx, gw = reference.lp_dist_backward(x64, w64, y64, None, g.double(), p, need_x, need_w)
    return (None if gx is None else gx.float()), (None if gw is None else gw.float())


def linf_dist_forward(x: torch.Tensor, w: torch.Tensor):
    if _eligible(x, w):
        return launch_linf_forward(x.contiguous(), w.contiguous(), with_idx=True)
    return reference.linf_dist_forward(x, w)


def linf_dist_backward(x, w, idx, g, need_x: bool, need_w: bool):
    return reference.linf_dist_backward(x, w, idx, g, need_x, need_w)


def linf_dist_interval(lower: torch.Tensor, upper: torch.Tensor, w: torch.Tensor):
    if lower.shape == upper.shape and _eligible(lower, upper, w):
        return launch_interval(lower.contiguous(), upper.contiguous(), w.contiguous())
    return reference.linf_dist_interval(lower, upper, w)
