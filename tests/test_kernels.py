"""The fused ℓp-distance kernels (``methods.linf_dist.kernels``) against the float64 brute force of
``methods.linf_dist.exact``.

Every backend function is checked on float32 inputs against that independent computation: values
within 1e-5 relative per element; gradients within 1e-5 of the largest entry of the same gradient tensor
(a per-element criterion is meaningless for entries made only of coefficients below 2^-48 of the largest,
which the kernels, like the reference, flush to zero). Also: p = 1000 with large inputs, zero distances,
ties, odd shapes, the double-precision path for extreme magnitudes, bitwise identity for 1 and 2 threads
and across calls, the fallbacks, and ``CERTBENCH_KERNELS``.

The first test in a fresh environment builds the C++ extension (about 30 s; cached afterwards).
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch

from methods import native
from methods.linf_dist import kernels, reference
from methods.linf_dist.exact import (
    bf_interval,
    bf_linf,
    bf_linf_grads,
    bf_lp,
    bf_lp_grads,
    grad_error,
    make,
    ties,
    value_error,
)
from methods.linf_dist.kernels import cpu
from methods.linf_dist.ops import linf_dist_interval, lp_dist

FINITE_P = [1.0, 2.0, 3.0, 8.0, 8.5, 1.5, 16.0, 17.0, 64.0, 100.0, 1000.0]
RTOL = 1e-5


@pytest.fixture(scope="module", autouse=True)
def fast_cpu_backend():
    """The tests are about the fast path: it must build here (CI has a compiler)."""
    assert cpu.available(strict=True)
    yield


def assert_values(got: torch.Tensor, want: torch.Tensor, rtol: float = RTOL) -> None:
    assert got.dtype == torch.float32 and got.shape == want.shape
    err = value_error(got, want)
    assert err <= rtol, f"max rel err {err:.3e}"


def assert_grad(got: torch.Tensor, want: torch.Tensor, rtol: float = RTOL) -> None:
    assert got.dtype == torch.float32 and got.shape == want.shape
    err = grad_error(got, want)
    assert err <= rtol, f"max err {err:.3e} of the largest entry (limit {rtol:.0e})"


def check_lp(x: torch.Tensor, w: torch.Tensor, g: torch.Tensor, p: float) -> torch.Tensor:
    """Forward values, then gradients both from the forward's saved state and recomputed without it."""
    y, state = cpu.lp_dist_forward(x, w, p)
    assert_values(y, bf_lp(x, w, p))
    wx, ww = bf_lp_grads(x, w, g, p)
    for kept in (state, None):
        gx, gw = cpu.lp_dist_backward(x, w, y, kept, g, p, True, True)
        assert_grad(gx, wx)
        assert_grad(gw, ww)
    return y


SHAPES = [(5, 7, 67), (1, 1, 1), (1, 9, 8), (6, 1, 130), (3, 4, 1000)]


# ------------------------------------------------------------------------------------------------------
# finite p


@pytest.mark.parametrize("p", FINITE_P)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_lp_matches_brute_force(p: float, shape: tuple[int, int, int]) -> None:
    x, w, g = make(*shape, seed=int(p * 10) % 97)
    x[0, : min(3, x.shape[1])] = w[0, : min(3, x.shape[1])]  # some zero coordinates
    check_lp(x, w, g, p)


@pytest.mark.parametrize("p", [8.0, 8.5, 64.0, 1000.0])
@pytest.mark.parametrize("scale", [1e3, 1e-3])
def test_lp_large_and_small_inputs(p: float, scale: float) -> None:
    x, w, g = make(6, 5, 50, scale=scale, seed=3)
    check_lp(x, w, g, p)


@pytest.mark.parametrize("p", [1.0, 2.0, 8.0, 8.5, 1000.0])
@pytest.mark.parametrize("scale", [1e33, 1e-33])
def test_lp_extreme_magnitudes_take_the_double_path(p: float, scale: float) -> None:
    """Distances outside [2^-100, 2^100] (or integer-p sums out of range) use the exact double path."""
    x, w, g = make(4, 3, 20, scale=scale, seed=4)
    check_lp(x, w, g, p)


@pytest.mark.parametrize("p", [1.0, 2.0, 8.0, 8.5, 64.0, 1000.0])
def test_lp_zero_distances(p: float) -> None:
    w = torch.randn(4, 19)
    x = torch.cat([w[:2].clone(), torch.randn(1, 19)])
    x[2, 5:] = w[3, 5:]  # partly equal
    g = torch.randn(3, 4)
    y = check_lp(x, w, g, p)
    assert y[0, 0].item() == 0.0 and y[1, 1].item() == 0.0
    if p > 1.0:  # zero distance: zero subgradient (as the reference)
        only = torch.zeros(3, 4)
        only[0, 0] = 1.0
        state = cpu.lp_dist_forward(x, w, p)[1]
        for kept in (state, None):
            gx0, gw0 = cpu.lp_dist_backward(x, w, y, kept, only, p, True, True)
            assert gx0.abs().max().item() == 0.0 and gw0.abs().max().item() == 0.0


@pytest.mark.parametrize("p", [17.0, 64.0, 1000.0])
@pytest.mark.parametrize("spread", [0.02, 0.3])
def test_lp_many_terms_near_the_maximum(p: float, spread: float) -> None:
    """Every |x - w| within `spread` of the others: large p keeps many non-negligible terms, mixing the
    precise and the plain arithmetic within a pair (and nothing can be skipped)."""
    gen = torch.Generator().manual_seed(int(p))
    x = 0.01 * torch.randn(6, 300, generator=gen)
    sign = torch.where(torch.randn(7, 300, generator=gen) > 0, 1.0, -1.0)
    w = sign * (1 + spread * torch.rand(7, 300, generator=gen))
    g = torch.randn(6, 7, generator=gen)
    check_lp(x, w, g, p)


def test_lp_identical_distances_are_exact_ties() -> None:
    """All |x - w| equal: y = m n^(1/p), every coefficient n^(1/p - 1)."""
    n, p = 40, 1000.0
    x = torch.zeros(2, n)
    w = torch.full((3, n), 0.75)
    w[1] = -0.75
    g = torch.ones(2, 3)
    y = check_lp(x, w, g, p)
    assert_values(y, torch.full((2, 3), 0.75 * n ** (1.0 / p), dtype=torch.float64))


@pytest.mark.parametrize("p", [8.5, 64.0])
def test_lp_need_flags(p: float) -> None:
    x, w, g = make(3, 4, 21)
    y, state = cpu.lp_dist_forward(x, w, p)
    gx, gw = cpu.lp_dist_backward(x, w, y, state, g, p, True, True)
    gx_only, none_w = cpu.lp_dist_backward(x, w, y, state, g, p, True, False)
    none_x, gw_only = cpu.lp_dist_backward(x, w, y, state, g, p, False, True)
    assert none_w is None and none_x is None
    assert torch.equal(gx, gx_only) and torch.equal(gw, gw_only)


# ------------------------------------------------------------------------------------------------------
# p = inf and the interval


@pytest.mark.parametrize("shape", SHAPES + [(9, 11, 300)], ids=lambda s: "x".join(map(str, s)))
def test_linf_matches_brute_force(shape: tuple[int, int, int]) -> None:
    x, w, g = make(*shape, seed=5)
    y, idx = cpu.linf_dist_forward(x, w)
    want_y, want_idx = bf_linf(x, w)
    assert_values(y, want_y, rtol=1e-7)
    assert torch.equal(idx, want_idx)
    assert idx.dtype == torch.long
    gx, gw = cpu.linf_dist_backward(x, w, idx, g, True, True)
    wx, ww = bf_linf_grads(x, w, idx, g)
    assert_grad(gx, wx, rtol=1e-6)
    assert_grad(gw, ww, rtol=1e-6)


@pytest.mark.parametrize("n", [1, 7, 64, 65, 200])
def test_linf_ties_pick_the_first_maximiser(n: int) -> None:
    x, w, g = ties(n)  # x[3] = w[2]: y = 0, index 0
    y, idx = cpu.linf_dist_forward(x, w)
    want_y, want_idx = bf_linf(x, w)
    assert torch.equal(idx, want_idx)
    assert y[3, 2].item() == 0.0 and idx[3, 2].item() == 0
    assert torch.equal(y, reference.linf_dist_forward(x, w)[0])
    gx, gw = cpu.linf_dist_backward(x, w, idx, g, True, True)
    wx, ww = bf_linf_grads(x, w, idx, g)
    assert_grad(gx, wx, rtol=1e-6)
    assert_grad(gw, ww, rtol=1e-6)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_interval_is_exact(shape: tuple[int, int, int]) -> None:
    x, w, _ = make(*shape, seed=6)
    gen = torch.Generator().manual_seed(7)
    lower = x - torch.rand(x.shape, generator=gen)
    upper = x + torch.rand(x.shape, generator=gen)
    lo, hi = cpu.linf_dist_interval(lower, upper, w)
    want_lo, want_hi = bf_interval(lower, upper, w)
    assert_values(hi, want_hi, rtol=1e-7)
    assert_values(lo[want_lo > 0], want_lo[want_lo > 0], rtol=1e-7)
    assert (lo[want_lo == 0] == 0).all()
    ref_lo, ref_hi = reference.linf_dist_interval(lower, upper, w)
    assert torch.equal(lo, ref_lo) and torch.equal(hi, ref_hi)  # the same float32 operations


def test_interval_contains_the_point_and_degenerates_to_it() -> None:
    x, w, _ = make(5, 6, 33, seed=8)
    lo, hi = cpu.linf_dist_interval(x, x, w)
    y, _ = cpu.linf_dist_forward(x, w)
    assert torch.equal(lo, y) and torch.equal(hi, y)
    lo, hi = cpu.linf_dist_interval(x - 0.5, x + 0.5, w)
    assert (lo <= y).all() and (y <= hi).all()


# ------------------------------------------------------------------------------------------------------
# determinism, threads, the public op


def _all_outputs(x, w, g, lower, upper):
    outs = []
    for p in (1.0, 8.0, 8.5, 64.0, 1000.0):
        y, state = cpu.lp_dist_forward(x, w, p)
        outs += [y, *cpu.lp_dist_backward(x, w, y, state, g, p, True, True)]
    y, idx = cpu.linf_dist_forward(x, w)
    outs += [y, idx, *cpu.linf_dist_backward(x, w, idx, g, True, True)]
    outs += list(cpu.linf_dist_interval(lower, upper, w))
    return outs


def test_bitwise_identical_for_1_and_2_threads_and_across_calls() -> None:
    x, w, g = make(37, 29, 300, seed=9)
    lower, upper = x - 0.3, x + 0.2
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = _all_outputs(x, w, g, lower, upper)
        torch.set_num_threads(2)
        two = _all_outputs(x, w, g, lower, upper)
        again = _all_outputs(x, w, g, lower, upper)
    finally:
        torch.set_num_threads(before)
    for a, b, c in zip(one, two, again):
        assert torch.equal(a, b) and torch.equal(b, c)


@pytest.mark.parametrize("p", [8.0, 8.5, 1000.0, math.inf])
def test_public_op_uses_the_fast_path_and_autograd(p: float, monkeypatch) -> None:
    monkeypatch.delenv(kernels.ENV_VAR, raising=False)
    x, w, g = make(4, 6, 45, seed=10)
    x.requires_grad_(True)
    w.requires_grad_(True)
    assert kernels.backend_for(x) is cpu
    y = lp_dist(x, w, p)
    gx, gw = torch.autograd.grad(y, (x, w), g)
    if math.isinf(p):
        want_y, idx = bf_linf(x.detach(), w.detach())
        wx, ww = bf_linf_grads(x.detach(), w.detach(), idx, g)
    else:
        want_y = bf_lp(x.detach(), w.detach(), p)
        wx, ww = bf_lp_grads(x.detach(), w.detach(), g, p)
    assert_values(y.detach(), want_y)
    assert_grad(gx, wx)
    assert_grad(gw, ww)
    lo, hi = linf_dist_interval(x.detach() - 0.1, x.detach() + 0.1, w.detach())
    assert torch.equal(hi, reference.linf_dist_interval(x.detach() - 0.1, x.detach() + 0.1, w.detach())[1])


# ------------------------------------------------------------------------------------------------------
# fallbacks and the environment switch


def test_float64_and_non_finite_inputs_go_to_the_reference() -> None:
    x, w, g = make(3, 4, 10, seed=11)
    x64, w64, g64 = x.double(), w.double(), g.double()
    y, state = cpu.lp_dist_forward(x64, w64, 8.5)
    assert state is None
    assert y.dtype == torch.float64 and torch.equal(y, reference.lp_dist_forward(x64, w64, 8.5)[0])
    assert torch.equal(cpu.linf_dist_forward(x64, w64)[0], reference.linf_dist_forward(x64, w64)[0])
    gx, gw = cpu.lp_dist_backward(x64, w64, y, None, g64, 8.5, True, True)
    rx, rw = reference.lp_dist_backward(x64, w64, y, None, g64, 8.5, True, True)
    assert torch.equal(gx, rx) and torch.equal(gw, rw)
    xi = x.clone()
    xi[1, 2] = math.inf
    xi[2, 3] = math.nan
    same = dict(rtol=0.0, atol=0.0, equal_nan=True)
    for p in (2.0, 8.5):
        torch.testing.assert_close(cpu.lp_dist_forward(xi, w, p)[0], reference.lp_dist_forward(xi, w, p)[0], **same)
    torch.testing.assert_close(cpu.linf_dist_forward(xi, w)[0], reference.linf_dist_forward(xi, w)[0], **same)
    unbounded = torch.full_like(x, math.inf)
    lo, hi = cpu.linf_dist_interval(x - 1, unbounded, w)
    rlo, rhi = reference.linf_dist_interval(x - 1, unbounded, w)
    torch.testing.assert_close(lo, rlo, **same)
    torch.testing.assert_close(hi, rhi, **same)


def test_non_contiguous_inputs() -> None:
    x, w, g = make(6, 5, 40, seed=12)
    xt = x.t().contiguous().t()  # same values, column-major
    assert not xt.is_contiguous()
    assert torch.equal(cpu.lp_dist_forward(xt, w, 8.5)[0], cpu.lp_dist_forward(x, w, 8.5)[0])
    assert torch.equal(cpu.linf_dist_forward(xt, w)[1], cpu.linf_dist_forward(x, w)[1])


def test_environment_variable_selects_the_backend(monkeypatch) -> None:
    x = torch.zeros(1, 1)
    monkeypatch.setenv(kernels.ENV_VAR, "reference")
    assert kernels.backend_for(x) is reference
    monkeypatch.setenv(kernels.ENV_VAR, "fast")
    assert kernels.backend_for(x) is cpu
    monkeypatch.setenv(kernels.ENV_VAR, "auto")
    assert kernels.backend_for(x) is cpu
    assert kernels.backend_for(x.double()) is cpu  # which hands float64 on to the reference
    monkeypatch.setenv(kernels.ENV_VAR, "fastest")
    with pytest.raises(ValueError, match="CERTBENCH_KERNELS"):
        kernels.backend_for(x)


def test_build_failure_warns_once_and_falls_back(monkeypatch) -> None:
    def broken(*args: object) -> None:
        raise OSError("no compiler")

    monkeypatch.setattr(native, "_build", broken)
    monkeypatch.setattr(cpu._EXTENSION, "_module", None)
    monkeypatch.setattr(cpu._EXTENSION, "error", None)
    monkeypatch.delenv(kernels.ENV_VAR, raising=False)
    x = torch.zeros(2, 3)
    with pytest.warns(RuntimeWarning, match="could not be built"):
        assert kernels.backend_for(x) is reference
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert kernels.backend_for(x) is reference  # no second warning
    monkeypatch.setenv(kernels.ENV_VAR, "fast")
    with pytest.raises(RuntimeError, match="could not be built"):
        kernels.backend_for(x)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("p", [1.0, 8.0, 8.5, 1000.0])
def test_cuda_backend_matches_brute_force(p: float) -> None:
    from methods.linf_dist.kernels import cuda

    assert cuda.available(strict=True)
    x, w, g = make(5, 7, 67, seed=13)
    y, state = cuda.lp_dist_forward(x.cuda(), w.cuda(), p)
    assert_values(y.cpu(), bf_lp(x, w, p))
    gx, gw = cuda.lp_dist_backward(x.cuda(), w.cuda(), y, state, g.cuda(), p, True, True)
    wx, ww = bf_lp_grads(x, w, g, p)
    assert_grad(gx.cpu(), wx)
    assert_grad(gw.cpu(), ww)
    yi, idx = cuda.linf_dist_forward(x.cuda(), w.cuda())
    want_y, want_idx = bf_linf(x, w)
    assert torch.equal(idx.cpu(), want_idx)
    assert_values(yi.cpu(), want_y, rtol=1e-7)
    gx, gw = cuda.linf_dist_backward(x.cuda(), w.cuda(), idx, g.cuda(), True, True)
    wx, ww = bf_linf_grads(x, w, idx.cpu(), g)
    assert_grad(gx.cpu(), wx, rtol=1e-6)
    assert_grad(gw.cpu(), ww, rtol=1e-6)
    lower, upper = x - 0.2, x + 0.3
    lo, hi = cuda.linf_dist_interval(lower.cuda(), upper.cuda(), w.cuda())
    rlo, rhi = reference.linf_dist_interval(lower, upper, w)
    assert torch.equal(lo.cpu(), rlo) and torch.equal(hi.cpu(), rhi)


_INTERPRETER_CHECK = """
import sys, torch
sys.path.insert(0, {tests!r})
import test_kernels as T
from methods.linf_dist.kernels import cuda
x, w, g = T.make(5, 7, 37, seed=1)
x[0, :2] = w[0, :2]
y, idx = cuda.linf_dist_forward(x, w)
want_y, want_idx = T.bf_linf(x, w)
assert torch.equal(idx, want_idx)
T.assert_values(y, want_y, 1e-7)
lower, upper = x - 0.3, x + 0.2
lo, hi = cuda.linf_dist_interval(lower, upper, w)
rlo, rhi = T.reference.linf_dist_interval(lower, upper, w)
assert torch.equal(lo, rlo) and torch.equal(hi, rhi)
for p in (1.0, 8.0, 8.5, 1000.0):
    xs, ws = x * 1e3, w * 1e3
    y, state = cuda.lp_dist_forward(xs, ws, p)
    T.assert_values(y, T.bf_lp(xs, ws, p))
    gx, gw = cuda.lp_dist_backward(xs, ws, y, state, g, p, True, True)
    wx, ww = T.bf_lp_grads(xs, ws, g, p)
    T.assert_grad(gx, wx)
    T.assert_grad(gw, ww)
print("ok")
"""


def test_triton_kernels_under_the_interpreter() -> None:
    """The GPU kernels' logic (indexing, masks, ties, formulas) on CPU via TRITON_INTERPRET=1.

    The interpreter evaluates log2/exp2 exactly, so this says nothing about the GPU's approximate ones
    nor about speed; the CUDA test above does, where a GPU exists.
    """
    import os
    import subprocess
    import sys
    from pathlib import Path

    pytest.importorskip("triton")
    tests = str(Path(__file__).resolve().parent)
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONWARNINGS="ignore")
    done = subprocess.run(
        [sys.executable, "-c", _INTERPRETER_CHECK.format(tests=tests)],
        env=env,
        cwd=str(Path(tests).parent),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-3000:]
