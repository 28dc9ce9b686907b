"""pytest-benchmark timings of the ℓp-distance op: the same cases, inputs and naive formulation as
``python -m methods.linf_dist.perf``. Not part of CI (pytest skips benchmarks by default); run with
``tox -e bench`` or ``pytest tests/benchmarks -o addopts="" --benchmark-only``.

Each benchmark's ``extra_info`` carries G pairs/s (from the fastest round) and the shape. Set
``CERTBENCH_BENCH_SHAPE=B,n_in,n_out`` to measure another shape (default 512,1024,1024; on a GPU the
paper's CIFAR layer shapes are added).
"""

from __future__ import annotations

import math
import os

import pytest
import torch

from methods.linf_dist import perf

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _shapes() -> list[tuple[int, int, int]]:
    env = os.environ.get("CERTBENCH_BENCH_SHAPE")
    if env:
        return [tuple(int(v) for v in env.split(","))]  # type: ignore[list-item]
    return [perf.CPU_SHAPE] + (list(perf.CIFAR_SHAPES) if DEVICE.type == "cuda" else [])


def _id(case: perf.Case) -> str:
    p = "inf" if math.isinf(case.p) else f"{case.p:g}"
    return f"{case.kind}-p{p}-{case.mode}"


@pytest.fixture(scope="module", params=_shapes(), ids=lambda s: "x".join(map(str, s)))
def inputs(request) -> perf.Inputs:
    return perf.make_inputs(request.param, DEVICE)


@pytest.fixture(scope="module", params=_shapes(), ids=lambda s: "x".join(map(str, s)))
def dense_inputs(request) -> perf.Inputs:
    return perf.make_inputs(request.param, DEVICE, dense=True)


def _record(benchmark, inp: perf.Inputs) -> None:
    benchmark.extra_info["shape"] = [inp.x.shape[0], inp.x.shape[1], inp.w.shape[0]]
    benchmark.extra_info["device"] = DEVICE.type
    benchmark.extra_info["gpairs_s"] = inp.pairs / benchmark.stats.stats.min / 1e9


def _sync() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def _pick(case: perf.Case, request) -> perf.Inputs:
    return request.getfixturevalue("dense_inputs" if case.kind.endswith("_dense") else "inputs")


@pytest.mark.parametrize("case", perf.CASES, ids=_id)
def test_ours(benchmark, case: perf.Case, request) -> None:
    inputs = _pick(case, request)
    fn = perf.ours(case, inputs)
    benchmark.group = _id(case)

    def call():
        fn()
        _sync()

    benchmark.pedantic(call, rounds=5, iterations=1, warmup_rounds=1)
    _record(benchmark, inputs)


@pytest.mark.parametrize("case", perf.CASES, ids=_id)
def test_naive(benchmark, case: perf.Case, request) -> None:
    inputs = _pick(case, request)
    fn = perf.naive(case, inputs)
    benchmark.group = _id(case)

    def call():
        with perf._FlushDenormal():
            fn()
        _sync()

    benchmark.pedantic(call, rounds=1, iterations=1)
    _record(benchmark, inputs)
