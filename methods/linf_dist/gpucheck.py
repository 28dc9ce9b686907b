"""``python -m methods.linf_dist.gpucheck OUTDIR [--dry]``: the one prepared check of the GPU path.

GPU time comes rarely and in minutes, so everything a GPU must prove is one command that finishes within
``--budget-s`` (default 450 s: ≤ 8 min on an H100/H200-class card, start-up included) and can be rerun
once. Steps, in order, each timed and logged; a failed step is recorded and the next one runs:

- ``kernels`` (a): the Triton kernels (``kernels/cuda.py``) against the float64 brute force
  (``methods.linf_dist.exact``): values and both gradients at p ∈ {1, 2, 8, 8.5, 64, 1000, ∞} and the
  interval op, on shapes that are no multiple of the 16-wide tiles, ties and zero distances, magnitudes
  1e3 and 1e33 (the latter must take the reference path), and a paper-scale layer (B = 512, 5120 × 5120).
  Limits: those of ``tests/test_kernels.py`` (values 1e-5 relative, gradients 1e-5 of their largest
  entry; 1e-7 / 1e-6 and identical arg-max indices at p = ∞; the interval bitwise equal to the reference).
- ``perf`` (b): ``methods.linf_dist.perf``'s cases at the paper's CIFAR layer shapes, ours against the
  naive torch formulation in the same run, G pairs/s.
- ``smoke`` (c): ``python -m bench run --scale smoke --device cuda`` for every smoke cell of both suites
  that ``results/baselines/smoke.json`` gates (one process per suite and method, side by side), then
  ``python -m bench check`` against those baseline cells. Every clean-correct test point is attacked by PGD and a certified point that PGD breaks
  stops its cell (``bench/evaluate.py``), so a cell that finishes has had every certificate attacked.
- ``paper`` (d): a fixed number of training steps of every paper-scale (suite, method), timed at the middle
  of each phase of its schedule (for the ℓ∞-dist nets p = 8, the p ramp and p = ∞; otherwise the three
  thirds of the run), plus one evaluation batch (one PGD step, certify); from these the wall time of
  every paper cell and both full suites; then ``bench run --dry-run --estimate`` on the same GPU for the
  ℓ∞-dist and CROWN-IBP cells, side by side with our projection.
- (e) every step records its peak GPU memory: the allocator's peak in this process and the device's
  memory in use (all processes, sampled every 0.1 s), above what was in use when the step began.

Output: ``OUTDIR/gpucheck.json`` (rewritten after every step, so a run cut short keeps what finished) and
``OUTDIR/gpucheck.log``; scratch (smoke results, subprocess logs) under ``--work`` (default OUTDIR/work).
Exit status 0 when every step passed, 1 otherwise.

``--dry`` rehearses all of it on a CPU: the Triton kernels under Triton's interpreter (skipped, with the
reason recorded, when triton does not import), tiny shapes, one smoke cell, the smoke scale in place of
the paper scale. ``tests/test_gpucheck.py`` runs it in CI so that the script cannot rot.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import subprocess
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field
from datetime import datetime, timezone
from functools import partial
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from bench.cli import run_guarded
from bench.errors import BenchError
from bench.machine import device_name, resolve_device
from bench.store import atomic_write_json

STEPS = ("kernels", "perf", "smoke", "paper")
# Each step's share of the budget; what does not fit is recorded as skipped, never silently dropped.
SHARES = {"kernels": 0.15, "perf": 0.20, "smoke": 0.30, "paper": 0.35}
DEFAULT_BUDGET_S = 450.0
P_VALUES = (1.0, 2.0, 8.0, 8.5, 64.0, 1000.0, math.inf)
FINITE_LIMIT, INF_VALUE_LIMIT, INF_GRAD_LIMIT = 1e-5, 1e-7, 1e-6  # as tests/test_kernels.py
PAPER_LAYER = (512, 5120, 5120)  # (B, n_out, n_in), the width-5120 hidden layer
DRY_LAYER = (9, 20, 33)
DRY_SMOKE = ("mnist", "ibp")  # the rehearsal's one smoke cell: the cheapest (CI time), ε = the first
PRIORITY = ("linf-dist", "crown-ibp")  # timed first at paper scale, and compared with --estimate
ESTIMATED_SUITE = "cifar"  # --estimate times 10 steps a cell: at paper scale, one suite's two cells fit the budget
TIMED_STEPS, DRY_TIMED_STEPS = 2, 1
ROOT = Path(__file__).resolve().parents[2]  # the repository: `python -m bench` runs from here, installed or not
BASELINE = ROOT / "results" / "baselines" / "smoke.json"
NO_LOW_PRECISION = (
    "bf16 and tf32 not measured: the op has no matrix product (tf32 changes nothing) and bf16 keeps 8 bits "
    "of mantissa, so |x - w| would be off by up to 2^-9 relative before any rounding of the result, far "
    "above the 1e-5 the kernels are held to, and the interval bounds would no longer be sound")


# ------------------------------------------------------------------------------------------------------
# Context: where things go, how much time is left, the log.


class OutOfTime(Exception):
    """The step's share of the budget is spent; what did not run is recorded as skipped."""


class CheckFailed(Exception):
    """A step ran but what it measured fails its limits; ``data`` is still recorded."""

    def __init__(self, message: str, data: dict[str, Any]) -> None:
        super().__init__(message)
        self.data = data


@dataclass
class Context:
    out: Path
    work: Path
    device: torch.device
    dry: bool
    data_dir: str | None
    deadline: float = math.inf
    started: float = field(default_factory=time.monotonic)

    def log(self, message: str) -> None:
        line = f"[{time.monotonic() - self.started:7.1f}s] {message}"
        print(line, flush=True)
        with open(self.out / "gpucheck.log", "a", encoding="utf-8") as f:
            f.write(line + "\n")

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def check_time(self, what: str) -> None:
        if self.left() <= 0:
            raise OutOfTime(what)

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def _release(ctx: Context) -> None:
    """Return cached GPU memory, so that the next item's peak is its own and a failed one's does not linger."""
    if ctx.device.type == "cuda":
        torch.cuda.empty_cache()


def _num(value: float) -> float | str:
    """A JSON-safe number with 4 significant digits (errors can be infinite)."""
    return float(f"{value:.4g}") if math.isfinite(value) else str(value)


# ------------------------------------------------------------------------------------------------------
# (e) Peak GPU memory of a step.


class MemoryWatch:
    """Peak memory during a ``with`` block: the allocator's peak in this process, and the device's memory in
    use by all processes (the smoke and estimate steps run in subprocesses), sampled every 0.1 s."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.cuda = device.type == "cuda"
        self.peak_used = 0
        self._stop = threading.Event()

    def _used(self) -> int:
        free, total = torch.cuda.mem_get_info(self.device)
        return total - free

    def _sample(self) -> None:
        while not self._stop.wait(0.1):
            self.peak_used = max(self.peak_used, self._used())

    def __enter__(self) -> MemoryWatch:
        if self.cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base_alloc = torch.cuda.memory_allocated(self.device)
            self.base_used = self.peak_used = self._used()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.cuda:
            self._stop.set()
            self._thread.join()
            self.peak_used = max(self.peak_used, self._used())

    def record(self) -> dict[str, Any]:
        if not self.cuda:
            return {"note": "no GPU (dry run)"}
        return {"torch_peak_allocated_bytes": torch.cuda.max_memory_allocated(self.device) - self.base_alloc,
                "device_used_peak_bytes": self.peak_used - self.base_used,
                "device_total_bytes": torch.cuda.mem_get_info(self.device)[1]}


# ------------------------------------------------------------------------------------------------------
# Subprocesses (the CLI as a user runs it).


def _env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", BENCH_OFFLINE="1", PYTHONUNBUFFERED="1")
    env.pop("TRITON_INTERPRET", None)  # the CLI runs as a user runs it: real kernels on the device
    return env


def _launch(args: list[str], ctx: Context, log: Path) -> subprocess.Popen[bytes]:
    ctx.log("$ python " + " ".join(args))
    with open(log, "wb") as f:
        return subprocess.Popen([sys.executable, *args], cwd=ROOT, stdout=f, stderr=subprocess.STDOUT,
                                env=_env(), start_new_session=True)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, 9)  # its own session: the command and everything it started
        proc.wait()


def _finish(proc: subprocess.Popen[bytes], ctx: Context, log: Path) -> int | None:
    """Wait for ``proc`` until the step's deadline; None when it had to be stopped. Its output goes to the log."""
    left = ctx.left()
    try:
        rc: int | None = proc.wait(timeout=max(1.0, left) if math.isfinite(left) else None)
    except subprocess.TimeoutExpired:
        _stop(proc)
        rc = None
    except KeyboardInterrupt:
        _stop(proc)
        raise
    text = log.read_text(encoding="utf-8", errors="replace")
    ctx.log(f"  exit {rc if rc is not None else 'stopped: out of time'}; output:\n" + text.rstrip())
    return rc


def _run(args: list[str], ctx: Context, name: str) -> tuple[int | None, str]:
    log = ctx.work / f"{name}.log"
    rc = _finish(_launch(args, ctx, log), ctx, log)
    return rc, log.read_text(encoding="utf-8", errors="replace")


# ------------------------------------------------------------------------------------------------------
# (a) Kernel correctness.


def _kernel_inputs(ctx: Context) -> Iterator[tuple[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]]:
    from methods.linf_dist.exact import make, ties

    layer = DRY_LAYER if ctx.dry else PAPER_LAYER
    yield "shape 5x7x67 (no tile multiple)", make(5, 7, 67, seed=13)
    yield "shape 1x1x1", make(1, 1, 1, seed=14)
    if not ctx.dry:
        yield "shape 17x33x130 (no tile multiple)", make(17, 33, 130, seed=15)
    yield "ties and a zero distance (n = 65)", ties(65)
    yield "magnitude 1e3", make(6, 5, 50, scale=1e3, seed=3)
    yield "magnitude 1e33 (float64 reference path)", make(4, 3, 20, scale=1e33, seed=4)
    yield f"layer {'x'.join(map(str, layer))}", make(*layer, seed=16)


def _check_p(backend: Any, x: torch.Tensor, w: torch.Tensor, g: torch.Tensor, p: float) -> dict[str, Any]:
    from methods.linf_dist import exact

    if math.isinf(p):
        y, idx = backend.linf_dist_forward(x, w)
        want_y, want_idx = exact.bf_linf(x, w)
        gx, gw = backend.linf_dist_backward(x, w, idx, g, True, True)
        wx, ww = exact.bf_linf_grads(x, w, want_idx, g)
        errors = (exact.value_error(y, want_y), exact.grad_error(gx, wx), exact.grad_error(gw, ww))
        mismatches = int((idx != want_idx).sum())
        ok = errors[0] <= INF_VALUE_LIMIT and max(errors[1:]) <= INF_GRAD_LIMIT and mismatches == 0
        extra: dict[str, Any] = {"argmax_mismatches": mismatches}
    else:
        y, state = backend.lp_dist_forward(x, w, p)
        gx, gw = backend.lp_dist_backward(x, w, y, state, g, p, True, True)
        wx, ww = exact.bf_lp_grads(x, w, g, p)
        errors = (exact.value_error(y, exact.bf_lp(x, w, p)), exact.grad_error(gx, wx), exact.grad_error(gw, ww))
        ok = max(errors) <= FINITE_LIMIT
        extra = {}
    return {"value_err": _num(errors[0]), "grad_x_err": _num(errors[1]), "grad_w_err": _num(errors[2]), **extra,
            "ok": ok}


def _p_label(p: float) -> str:
    return f"p={'inf' if math.isinf(p) else f'{p:g}'}"


def _check_interval(backend: Any, x: torch.Tensor, w: torch.Tensor) -> dict[str, Any]:
    from methods.linf_dist import exact, reference

    gen = torch.Generator().manual_seed(7)
    lower = x - torch.rand(x.shape, generator=gen).to(x.device)
    upper = x + torch.rand(x.shape, generator=gen).to(x.device)
    lo, hi = backend.linf_dist_interval(lower, upper, w)
    want_lo, want_hi = exact.bf_interval(lower, upper, w)
    ref_lo, ref_hi = reference.linf_dist_interval(lower, upper, w)
    positive = want_lo > 0
    errors = (exact.value_error(hi, want_hi), exact.value_error(lo[positive], want_lo[positive]))
    zero_ok = bool((lo[~positive] == 0).all())
    bitwise = bool(torch.equal(lo, ref_lo) and torch.equal(hi, ref_hi))
    return {"upper_err": _num(errors[0]), "lower_err": _num(errors[1]),
            "zero_lower_exact": zero_ok, "bitwise_equal_reference": bitwise,
            "ok": max(errors) <= INF_VALUE_LIMIT and zero_ok and bitwise}


def step_kernels(ctx: Context) -> dict[str, Any]:
    from methods.linf_dist.kernels import cuda

    if cuda.triton is None:
        if ctx.dry:
            return {"skipped": f"triton does not import ({cuda._TRITON_ERROR}); kernel checks not run"}
        raise BenchError(f"triton does not import on this GPU machine: {cuda._TRITON_ERROR}")
    if not ctx.dry:
        cuda.available(strict=True)
    rows: list[dict[str, Any]] = []
    data: dict[str, Any] = {"triton": cuda.triton.__version__, "interpreter": ctx.dry, "rows": rows}
    for name, tensors in _kernel_inputs(ctx):
        x, w, g = (t.to(ctx.device) for t in tensors)
        checks = [(_p_label(p), partial(_check_p, cuda, x, w, g, p)) for p in P_VALUES]
        for op, check in [*checks, ("interval", partial(_check_interval, cuda, x, w))]:
            ctx.check_time(f"kernel checks from {name} {op}")
            start = time.perf_counter()
            row: dict[str, Any] = {"inputs": name, "shape": [x.shape[0], x.shape[1], w.shape[0]], "op": op}
            try:
                row |= check()
                ctx.sync()
            except Exception as exc:  # noqa: BLE001 - one failing kernel must not hide the others' results
                row |= {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
            row["seconds"] = round(time.perf_counter() - start, 3)
            rows.append(row)
            ctx.log(f"  {name} {op}: {'ok' if row['ok'] else 'FAILED'} " + " ".join(
                f"{k}={v}" for k, v in row.items() if k.endswith(("err", "mismatches", "error"))))
    failed = [f"{r['inputs']} {r['op']}" for r in rows if not r["ok"]]
    if failed:
        raise CheckFailed(f"{len(failed)} kernel checks out of their limits: {', '.join(failed)}", data)
    return data


# ------------------------------------------------------------------------------------------------------
# (b) Throughput.


def step_perf(ctx: Context) -> dict[str, Any]:
    from methods.linf_dist import perf

    shapes = [(8, 24, 16)] if ctx.dry else list(perf.CIFAR_SHAPES)
    repeat = 1 if ctx.dry else 3
    rows: list[dict[str, Any]] = []
    errors: list[str] = []
    data = {"backend": perf.fast_backend_name(ctx.device), "repeat_ours": repeat, "repeat_naive": 1,
            "low_precision": NO_LOW_PRECISION, "rows": rows, "errors": errors}
    for shape in shapes:
        for case in perf.CASES:
            ctx.check_time(f"perf from {case.name} at {shape}")
            try:
                row = perf.measure(case, shape, ctx.device, repeat, 1)
            except Exception as exc:  # noqa: BLE001 - recorded; the next case runs
                errors.append(f"{case.name} p={case.p:g} at {shape}: {type(exc).__name__}: {exc}")
                ctx.log("  " + errors[-1])
                _release(ctx)
                continue
            rows.append(row)
            ctx.log(f"  {row['case']:<24} p={row['p']:<6} {'x'.join(map(str, shape)):>15}  ours {row['ours_gpairs_s']:.3f}  "
                    f"naive {row['naive_gpairs_s']:.4f} G pairs/s  ({row['speedup']}x)")
    if errors:
        raise CheckFailed(f"{len(errors)} perf cases failed", data)
    return data


# ------------------------------------------------------------------------------------------------------
# (c) Smoke suites and the CI gate.


def _suites(ctx: Context) -> list[Any]:
    from bench.config import load_suite

    return [load_suite(name) for name in ((DRY_SMOKE[0],) if ctx.dry else ("mnist", "cifar"))]


def _data_missing(dataset: str, data_dir: str | None) -> str | None:
    from bench import data as datamod

    root = datamod.data_dir(data_dir)
    missing = [rel for rel in datamod.EXPECTED_FILES[dataset] if not (root / rel).is_file()]
    return f"{', '.join(missing)} not in {root}" if missing else None


def step_smoke(ctx: Context) -> dict[str, Any]:
    from bench.report.records import read_runs
    from bench.runner import cell_folder

    results = ctx.work / "smoke-results"
    baseline = json.loads(BASELINE.read_text())
    jobs: list[tuple[str, str, subprocess.Popen[bytes], Path]] = []
    skipped: dict[str, str] = {}
    expected: set[str] = set()
    for suite in _suites(ctx):
        why = _data_missing(suite.dataset, ctx.data_dir)
        if why:
            skipped[suite.name] = f"data missing: {why}"
            ctx.log(f"  {suite.name}: skipped ({skipped[suite.name]})")
            continue
        methods = [DRY_SMOKE[1]] if ctx.dry else list(suite.methods)
        chosen = suite.cells("smoke", methods, [suite.eps[0]] if ctx.dry else None, [0])
        # The cells the CI gate has a baseline for, as CI runs them: one process per method, side by side.
        gated = {c: str(cell_folder(c, results).relative_to(results)) for c in chosen}
        gated = {c: key for c, key in gated.items() if key in baseline["cells"]}
        expected |= set(gated.values())
        for method in methods:
            eps = [str(c.eps) for c in gated if c.method == method]
            if not eps:
                continue
            args = ["-m", "bench", "run", "--suite", suite.name, "--scale", "smoke", "--methods", method,
                    "--eps", *eps, "--device", ctx.device.type, "--out", str(results), "--no-progress"]
            args += ["--data-dir", ctx.data_dir] if ctx.data_dir else []
            log = ctx.work / f"smoke-{suite.name}-{method}.log"
            jobs.append((suite.name, method, _launch(args, ctx, log), log))
    try:
        runs = {f"{s}/{m}": _finish(proc, ctx, log) for s, m, proc, log in jobs}
    finally:
        for _, _, proc, _ in jobs:  # interrupted: none of them may outlive the check
            _stop(proc)
    gate = ctx.work / "smoke-baseline.json"
    atomic_write_json(gate, _baseline_subset(baseline, expected))
    check_rc, check_out = _run(["-m", "bench", "check", "--baseline", str(gate), "--results", str(results)],
                               ctx, "smoke-check") if expected else (None, "no cell was run")
    finished, problems = read_runs(results)
    data = {
        "runs_exit": runs, "skipped_suites": skipped, "check_exit": check_rc, "check_output": check_out[-4000:],
        "baseline_cells_checked": sorted(expected),
        "problems": problems,
        "cells": [{"key": r.key, "clean": r.clean, "pgd": r.pgd, "certified": r.certified,
                   "certifier": r.certifier, "wall_s": round(r.wall_s, 1), "device": r.device} for r in finished],
        "soundness": "every clean-correct point attacked by PGD; a certified point that PGD breaks stops the cell",
    }
    bad = [k for k, rc in runs.items() if rc != 0]
    if bad or check_rc != 0 or skipped:
        raise CheckFailed(f"runs failed or stopped: {bad or 'none'}; check exit {check_rc}; "
                          f"suites skipped: {sorted(skipped) or 'none'}", data)
    return data


# ------------------------------------------------------------------------------------------------------
# (d) Paper-scale timing and projection.


def _phases(cfg: Any, epochs: int) -> list[tuple[int, int]]:
    """Epoch ranges of equal cost per step: the p phases of the ℓ∞-dist schedule (p = 8, ramp, p = ∞)
    where the config has them, else the run's three thirds."""
    if "p_start_epoch" in cfg and "p_stop_epoch" in cfg:
        cuts = [0, int(cfg["p_start_epoch"]), int(cfg["p_stop_epoch"]), epochs]
    else:
        cuts = [round(i * epochs / 3) for i in range(4)]
    return [(a, b) for a, b in zip(cuts, cuts[1:]) if b > a]


def _timed(fn: Callable[[], Any], ctx: Context) -> float:
    ctx.sync()
    start = time.perf_counter()
    fn()
    ctx.sync()
    return time.perf_counter() - start


def _time_group(cell: Any, ctx: Context) -> dict[str, Any]:
    """Seconds per training step in each phase of ``cell``'s schedule, and per evaluation batch."""
    from bench import data as datamod
    from bench.attacks import pgd_robust
    from methods import base as registry

    method = registry.get(cell.method)
    info = datamod.dataset_info(cell.dataset)
    torch.manual_seed(0)
    model = method.build(info, cell.config).to(ctx.device)
    n_train = cell.scale.train_examples or info.train_size
    batch = min(int(cell.config["batch_size"]), n_train)
    per_epoch = -(-n_train // batch)
    recipe = method.recipe(model, info, cell.config, cell.eps, per_epoch)
    x = torch.rand(batch, *info.input_shape, device=ctx.device)
    y = torch.randint(0, info.num_classes, (batch,), device=ctx.device)
    phases = []
    for start, stop in _phases(cell.config, recipe.epochs):
        ctx.check_time(f"{cell.label} epochs {start}-{stop}")
        epoch = (start + stop) // 2
        shown = recipe.step(x, y, epoch, 0)  # warm-up: kernel compilation, allocator growth
        n = DRY_TIMED_STEPS if ctx.dry else TIMED_STEPS
        seconds = _timed(lambda: [recipe.step(x, y, epoch, k) for k in range(1, n + 1)], ctx) / n
        phases.append({"epochs": [start, stop], "timed_epoch": epoch, "p": _num(shown["p"]) if "p" in shown else None,
                       "seconds_per_step": round(seconds, 4), "steps_timed": n})
    method.deploy(model)
    n_eval = cell.scale.test_range[1] - cell.scale.test_range[0]
    eb = min(cell.scale.eval_batch_size, n_eval)
    xe = torch.rand(eb, *info.input_shape, device=ctx.device)
    ye = torch.randint(0, info.num_classes, (eb,), device=ctx.device)
    eps = float(cell.eps)
    pgd_step = _timed(lambda: pgd_robust(model, xe, ye, eps, steps=1), ctx)
    certify = _timed(lambda: method.certify(model, xe, ye, eps), ctx)
    return {"batch": batch, "batches_per_epoch": per_epoch, "phases": phases, "eval_batch": eb,
            "pgd_step_s": round(pgd_step, 4), "certify_batch_s": round(certify, 4), "epochs": recipe.epochs}


def _project(cell: Any, timing: dict[str, Any]) -> float:
    """Seconds for ``cell``: each phase's steps at its measured rate, plus the evaluation."""
    per_epoch = timing["batches_per_epoch"]
    phases = _phases(cell.config, int(cell.config.get("epochs", timing["epochs"])))
    train = sum((b - a) * per_epoch * ph["seconds_per_step"] for (a, b), ph in zip(phases, timing["phases"]))
    n_eval = cell.scale.test_range[1] - cell.scale.test_range[0]
    batches = -(-n_eval // timing["eval_batch"])
    per_batch = timing["pgd_step_s"] * cell.scale.pgd_steps * cell.scale.pgd_restarts + timing["certify_batch_s"]
    return train + batches * per_batch


_ESTIMATE_LINE = re.compile(r"^\S+\s+(?P<label>.+?)  ~(?P<minutes>[0-9.]+) min  -> ")


def _baseline_subset(baseline: dict[str, Any], keep: set[str] | list[str]) -> dict[str, Any]:
    """The baseline restricted to the cells this check ran: each method's pool keeps its cells among them,
    its means taken over those cells' baseline values, and its tolerance (a mean of fewer cells spreads
    more, so this gate is, if anything, stricter than CI's)."""
    cells = {k: v for k, v in baseline["cells"].items() if k in keep}
    pools = {}
    for key, pool in baseline["pools"].items():
        mine = [c for c in pool["cells"] if c in cells]
        if mine:
            means = {m: round(sum(cells[c][m] for c in mine) / len(mine), 6) for m in ("certified", "clean")}
            pools[key] = {**pool, "cells": mine, **means}
    return {**baseline, "cells": cells, "pools": pools}


def _compare_estimates(ctx: Context, scale: str, cells: list[dict[str, Any]]) -> dict[str, Any]:
    """``bench run --dry-run --estimate`` minutes for the ``PRIORITY`` cells of the first ε, beside ours."""
    suite = next(s for s in _suites(ctx) if s.name == ESTIMATED_SUITE or ctx.dry)
    args = ["-m", "bench", "run", "--suite", suite.name, "--scale", scale, "--methods", *PRIORITY,
            "--eps", str(suite.eps[0]), "--device", ctx.device.type, "--dry-run", "--estimate",
            "--out", str(ctx.work / "estimate-results")]
    rc, text = _run(args, ctx, f"estimate-{suite.name}")
    projected = {c["label"]: float(c["projected_hours"]) * 60 for c in cells}
    rows = []
    for m in filter(None, map(_ESTIMATE_LINE.match, text.splitlines())):
        minutes, ours = float(m["minutes"]), projected.get(m["label"])
        rows.append({"label": m["label"], "estimate_min": minutes, "projected_min": None if ours is None else _num(ours),
                     "estimate_over_projected": _num(minutes / ours) if ours else None})
        ctx.log(f"  {m['label']}: --estimate {minutes:.1f} min, projected "
                + ("-" if ours is None else f"{ours:.1f}") + " min")
    return {"exit": rc, "rows": rows}


def step_paper(ctx: Context) -> dict[str, Any]:
    scale = "smoke" if ctx.dry else "paper"
    groups: dict[tuple[str, str, int], list[Any]] = {}
    for suite in _suites(ctx):
        methods = list(PRIORITY) if ctx.dry else list(suite.methods)
        for cell in suite.cells(scale, methods, None, [0]):
            groups.setdefault((suite.name, cell.method, int(cell.config["batch_size"])), []).append(cell)
    data: dict[str, Any] = {"scale": scale, "groups": {}, "cells": [], "skipped": [],
                            "assumption": "a step costs the same at every ε of a (suite, method, batch size); "
                                          "the cost within a phase is that at its middle epoch"}
    first = sorted((k for k in groups if k[1] in PRIORITY), key=lambda k: PRIORITY.index(k[1]))
    _time_groups(first, groups, ctx, data)
    data["estimate_comparison"] = _compare_estimates(ctx, scale, data["cells"])
    _time_groups([k for k in groups if k[1] not in PRIORITY], groups, ctx, data)
    data["suites_hours"] = {s.name: _suite_total(s.name, groups, data["cells"]) for s in _suites(ctx)}
    estimate_exit = data["estimate_comparison"]["exit"]
    if data["skipped"] or estimate_exit != 0:
        raise CheckFailed(f"{len(data['skipped'])} (suite, method) groups not timed (budget or error); "
                          f"--estimate exit {estimate_exit}", data)
    return data


def _time_groups(keys: list[tuple[str, str, int]], groups: dict[tuple[str, str, int], list[Any]], ctx: Context,
                 data: dict[str, Any]) -> None:
    """Time each group on its first cell and project every cell of it; a group out of time is skipped."""
    for key in keys:
        name = "/".join(map(str, key))
        try:
            timing = _time_group(groups[key][0], ctx)
        except OutOfTime as exc:
            data["skipped"].append(f"{name}: out of time at {exc}")
            ctx.log(f"  {name}: skipped, out of time")
            continue
        except Exception as exc:  # noqa: BLE001 - e.g. out of memory for one model: recorded, the next runs
            data["skipped"].append(f"{name}: {type(exc).__name__}: {exc}")
            ctx.log(f"  {name}: failed: {type(exc).__name__}: {exc}")
            continue
        finally:
            _release(ctx)
        data["groups"][name] = timing
        for cell in groups[key]:
            seconds = _project(cell, timing)
            data["cells"].append({"suite": key[0], "label": cell.label, "projected_hours": _num(seconds / 3600)})
            ctx.log(f"  {cell.label}: projected {seconds / 3600:.2f} h")


def _suite_total(suite: str, groups: dict[tuple[str, str, int], list[Any]], cells: list[dict[str, Any]]
                 ) -> dict[str, Any]:
    hours = [c["projected_hours"] for c in cells if c["suite"] == suite]
    expected = sum(len(v) for k, v in groups.items() if k[0] == suite)
    return {"hours": _num(sum(float(h) for h in hours)), "cells_projected": len(hours), "cells": expected,
            "complete": len(hours) == expected}


# ------------------------------------------------------------------------------------------------------
# Driver.


STEP_FUNCTIONS: dict[str, Callable[[Context], dict[str, Any]]] = {
    "kernels": step_kernels, "perf": step_perf, "smoke": step_smoke, "paper": step_paper}


def _machine(device: torch.device) -> dict[str, Any]:
    from bench.runner import versions

    info: dict[str, Any] = {"device": device_name(device), "platform": platform.platform(),
                            "cpus": os.cpu_count(), **versions()}
    try:
        import triton

        info["triton"] = triton.__version__
    except Exception as exc:  # noqa: BLE001 - any import failure is a fact to record
        info["triton"] = f"unavailable: {type(exc).__name__}"
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info |= {"cuda": torch.version.cuda, "capability": list(torch.cuda.get_device_capability(device)),
                 "gpu_memory_bytes": props.total_memory, "multiprocessors": props.multi_processor_count}
    return info


def run_check(ctx: Context, steps: list[str], budget_s: float | None) -> dict[str, Any]:
    report: dict[str, Any] = {"schema": 1, "dry": ctx.dry, "budget_s": budget_s,
                              "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                              "machine": _machine(ctx.device), "steps": {}}
    end = math.inf if budget_s is None else time.monotonic() + budget_s
    for name in steps:
        share = math.inf if budget_s is None else SHARES[name] * budget_s
        ctx.deadline = min(time.monotonic() + share, end)  # an earlier step's overrun comes out of the later ones
        ctx.log(f"== {name} (share of the budget: {share:.0f} s)")
        entry: dict[str, Any] = {"status": "ok", "error": None}
        start = time.perf_counter()
        with MemoryWatch(ctx.device) as memory:
            try:
                entry["data"] = STEP_FUNCTIONS[name](ctx)
            except OutOfTime as exc:
                entry |= {"status": "incomplete", "error": f"out of time at {exc}"}
            except CheckFailed as exc:
                entry |= {"status": "failed", "error": str(exc), "data": exc.data}
            except Exception as exc:  # noqa: BLE001 - a failed step is recorded and the next one runs
                entry |= {"status": "failed", "error": f"{type(exc).__name__}: {exc}"}
                ctx.log(traceback.format_exc().rstrip())
        entry["seconds"] = round(time.perf_counter() - start, 2)
        entry["memory"] = memory.record()
        report["steps"][name] = entry
        ctx.log(f"== {name}: {entry['status']} in {entry['seconds']:.1f} s" + (f": {entry['error']}" if entry["error"] else ""))
        report["total_s"] = round(time.monotonic() - ctx.started, 1)
        atomic_write_json(ctx.out / "gpucheck.json", report)
    return report


def check_command(args: argparse.Namespace) -> int:
    if args.dry:
        # Triton reads this when its own modules are first imported; nothing has imported triton yet.
        os.environ["TRITON_INTERPRET"] = "1"
    if not args.dry and not torch.cuda.is_available():
        raise BenchError("no CUDA device here; run with --dry for the CPU rehearsal")
    device = torch.device("cpu") if args.dry else resolve_device("cuda")
    if args.budget_s is not None and args.budget_s <= 0:
        raise BenchError(f"--budget-s must be positive, got {args.budget_s}")
    budget = args.budget_s if args.budget_s is not None else (None if args.dry else DEFAULT_BUDGET_S)
    out = Path(args.outdir).resolve()  # absolute: the subprocesses run from the repository root
    work = Path(args.work).resolve() if args.work else out / "work"
    for folder in (out, work):
        folder.mkdir(parents=True, exist_ok=True)
    (out / "gpucheck.log").write_text("")
    data_dir = str(Path(args.data_dir).resolve()) if args.data_dir else None
    ctx = Context(out, work, device, args.dry, data_dir)
    report = run_check(ctx, args.steps, budget)
    failed = [n for n, e in report["steps"].items() if e["status"] != "ok"]
    ctx.log(f"wrote {out / 'gpucheck.json'}; " + (f"not passed: {', '.join(failed)}" if failed else "every step passed"))
    return 1 if failed else 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m methods.linf_dist.gpucheck", description=__doc__.splitlines()[0])
    p.add_argument("outdir", help="folder for gpucheck.json and gpucheck.log")
    p.add_argument("--dry", action="store_true", help="rehearse on the CPU: Triton interpreter, tiny shapes")
    p.add_argument("--data-dir", help="dataset folder for the smoke suites (default: $BENCH_DATA_DIR or the cache)")
    p.add_argument("--work", help="scratch folder: smoke results, subprocess logs (default: OUTDIR/work)")
    p.add_argument("--budget-s", type=float,
                   help=f"seconds for all steps together (default {DEFAULT_BUDGET_S:.0f}; none with --dry)")
    p.add_argument("--steps", nargs="+", choices=STEPS, default=list(STEPS), help="run only these steps")
    p.set_defaults(func=check_command)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_guarded(args, "interrupted: gpucheck.json holds the steps that finished")


if __name__ == "__main__":
    raise SystemExit(main())
