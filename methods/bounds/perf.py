"""``python -m methods.bounds.perf``: one certified-training step, this project's bound engine against
auto_LiRPA 0.3, side by side in one process (issue 14).

Runs where auto_LiRPA 0.3 runs unmodified: the tox ``lirpa-perf`` env (torch 1.13.1), e.g.
``tox -e lirpa-perf -- --json results/perf/bounds-cpu.json``.

For each model (DM-small on MNIST and CIFAR-10, DM-large on CIFAR-10; freshly initialised, seed 0, one
random batch of ``--batch`` inputs in [0, 1] with random labels) it first checks that both engines give
the same IBP and CROWN-IBP margin lower bounds, to 1e-5 relative, in float64 on the first
``--check-batch`` examples (exit 1 if not), then times float32 training steps, interleaved (ours and
theirs alternate, and which goes first alternates), medians over ``--repeat`` steps after one warm-up:

* ``ibp``: the clean pass, IBP margin bounds, loss κ·CE(logits) + (1 − κ)·robust CE(IBP), backward, Adam;
* ``crown-ibp``: the same with the CROWN-IBP training bound β·CROWN-IBP + (1 − β)·IBP (κ = β = 1/2) —
  what ``methods.crown_ibp.recipe`` does during the ε ramp. auto_LiRPA is called as its CIFAR training
  example calls it: one IBP pass with the margin specification, then a backward pass from the same
  specification that reuses the IBP bounds of the intermediate layers.

Phases (seconds): ``bounds`` (input to loss value), ``backward`` (``loss.backward()``), ``optimizer``
(``Adam.step`` + ``zero_grad``); ``step`` is the median of their sum. Each is recorded twice: ``wall``
(``perf_counter``) and ``cpu`` (``process_time``, this process's CPU seconds), which on a machine shared with
other jobs is the steadier of the two. ``speedup`` is, for both clocks, the median over rounds of auto_LiRPA's
step time over ours in the same round (the two steps run back to back), so that the machine's speed
drifting between rounds — it did, by up to 2× within minutes on this shared VM — cancels; a target counts
as ``met`` on the wall-clock speed-up. auto_LiRPA runs with ``conv_mode = "matrix"``, as in the
cross-check (its default "patches" mode cannot bound the normalisation layer before a convolution; a
CROWN-IBP pass from a margin specification uses dense coefficients in either mode).

Threads: ``torch.set_num_threads(--threads)`` (default 1). The load average before and after is recorded,
and ``loaded`` says whether other jobs competed (1-minute load above the threads used + 0.5): steps are
interleaved so that such load slows both engines alike. Exit status 1 when a target of issue 14 is not met.
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from bench.cli import run_guarded
from bench.data import dataset_info
from bench.errors import BenchError
from bench.machine import cpu_model
from bench.store import atomic_write_json
from methods.base import DatasetInfo
from methods.bounds import compute_margin_bounds, input_box, margin_spec
from methods.cnn import architecture, build_cnn
from methods.crown_ibp.losses import robust_ce

MODELS = {
    "dm-small-mnist": ("dm-small", "mnist"),
    "dm-small-cifar": ("dm-small", "cifar10"),
    "dm-large-cifar": ("dm-large", "cifar10"),
}
EPS = {"mnist": 0.1, "cifar10": 2 / 255}
"""ε of the smallest suite cells; the arithmetic of a step does not depend on it."""
KAPPA = BETA = 0.5
RTOL = 1e-5
TARGETS = {"crown-ibp": {"dm-small-mnist": 2.5, "dm-small-cifar": 2.5, "dm-large-cifar": 1.0}, "ibp": {}}
"""Issue 14's targets: speed-up (theirs / ours, step time) at least this; IBP at least 1 everywhere."""
PHASES = ("bounds", "backward", "optimizer")
CLOCKS = ("wall", "cpu")


def _now() -> tuple[float, float]:
    return time.perf_counter(), time.process_time()

Batch = tuple[torch.Tensor, torch.Tensor, float]


def lirpa_module() -> Any:
    try:
        import auto_LiRPA
    except ImportError:
        raise BenchError("auto_LiRPA is not installed: run this in the tox 'lirpa-perf' environment") from None
    return auto_LiRPA


class Engine:
    """One engine's bound computation and training step on its own copy of the model."""

    name: str

    def __init__(self, model: nn.Module):
        self.model = model
        self.optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)

    def margins(self, batch: Batch, crown: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Clean logits and the margin lower bounds ("ibp" and, if ``crown``, "crown-ibp")."""
        raise NotImplementedError

    def step(self, batch: Batch, crown: bool) -> dict[str, dict[str, float]]:
        """Wall-clock and CPU seconds of each phase of one training step."""
        x, y, _ = batch
        marks = [_now()]
        logits, margins = self.margins(batch, crown)
        lower = margins["ibp"] if not crown else BETA * margins["crown-ibp"] + (1 - BETA) * margins["ibp"]
        loss = KAPPA * F.cross_entropy(logits, y) + (1 - KAPPA) * robust_ce(lower)
        marks.append(_now())
        loss.backward()
        marks.append(_now())
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        marks.append(_now())
        return {
            clock: {phase: end[k] - start[k] for phase, start, end in zip(PHASES, marks, marks[1:])}
            for k, clock in enumerate(CLOCKS)
        }


class Ours(Engine):
    name = "ours"

    def margins(self, batch: Batch, crown: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        x, y, eps = batch
        result = compute_margin_bounds(self.model, x, y, eps, ("ibp", "crown-ibp") if crown else ("ibp",))
        return result.logits, result.margins


class AutoLirpa(Engine):
    name = "auto_LiRPA"

    def __init__(self, model: nn.Module, example: torch.Tensor):
        lirpa = lirpa_module()
        bounded = lirpa.BoundedModule(model, torch.zeros_like(example[:1]), device="cpu",
                                      bound_opts={"conv_mode": "matrix"})
        bounded.train(model.training)
        super().__init__(bounded)
        self.lirpa = lirpa

    def margins(self, batch: Batch, crown: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        x, y, eps = batch
        lower, upper = input_box(x, eps)
        box = self.lirpa.BoundedTensor(x, self.lirpa.PerturbationLpNorm(norm=math.inf, x_L=lower, x_U=upper))
        logits = self.model(box)
        spec = margin_spec(y, logits.shape[1], x.dtype)
        margins = {"ibp": self.model.compute_bounds(IBP=True, C=spec, method=None, bound_upper=False)[0]}
        if crown:
            margins["crown-ibp"] = self.model.compute_bounds(IBP=False, C=spec, method="backward",
                                                             bound_upper=False)[0]
        return logits, margins


def make_batch(info: DatasetInfo, size: int, dtype: torch.dtype) -> Batch:
    gen = torch.Generator().manual_seed(1)
    x = torch.rand(size, *info.input_shape, generator=gen).to(dtype)
    y = torch.randint(0, info.num_classes, (size,), generator=gen)
    return x, y, EPS[info.name]


def check_agreement(model: nn.Module, info: DatasetInfo, size: int) -> float:
    """Max relative difference of both engines' float64 margin bounds (IBP and CROWN-IBP)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)  # auto_LiRPA 0.3 builds its specifications in the default dtype
    try:
        batch = make_batch(info, size, torch.float64)
        _, ours = Ours(copy.deepcopy(model).double()).margins(batch, crown=True)
        _, theirs = AutoLirpa(copy.deepcopy(model).double(), batch[0]).margins(batch, crown=True)
    finally:
        torch.set_default_dtype(previous)
    return max(
        ((ours[k] - theirs[k]).abs() / theirs[k].abs().clamp(min=1.0)).max().item() for k in ("ibp", "crown-ibp")
    )


def time_steps(engines: list[Engine], batch: Batch, crown: bool, repeat: int) -> dict[str, dict[str, Any]]:
    """Per engine and clock, the median of each phase and of the step over ``repeat`` interleaved steps
    (after one warm-up step each)."""
    for engine in engines:
        engine.step(batch, crown)
    samples: dict[str, list[dict[str, dict[str, float]]]] = {e.name: [] for e in engines}
    for r in range(repeat):
        for engine in engines if r % 2 == 0 else engines[::-1]:
            samples[engine.name].append(engine.step(batch, crown))
    out: dict[str, dict[str, Any]] = {}
    for name, rows in samples.items():
        out[name] = {}
        for clock in CLOCKS:
            phases = [row[clock] for row in rows]
            medians = {phase: statistics.median(p[phase] for p in phases) for phase in PHASES}
            medians["step"] = statistics.median(sum(p.values()) for p in phases)
            out[name][clock] = {k: round(v, 5) for k, v in medians.items()}
            out[name][clock]["steps"] = [round(sum(p.values()), 5) for p in phases]
    return out


def paired_speedup(times: dict[str, dict[str, Any]], clock: str) -> float:
    """Median over rounds of auto_LiRPA's step time over ours in the same round."""
    pairs = zip(times["auto_LiRPA"][clock]["steps"], times["ours"][clock]["steps"])
    return round(statistics.median(theirs / ours for theirs, ours in pairs), 3)


def measure(name: str, batch_size: int, check_size: int, repeat: int) -> dict[str, Any]:
    arch, dataset = MODELS[name]
    info = dataset_info(dataset)
    torch.manual_seed(0)
    model = build_cnn(architecture(arch), info).train()
    agreement = check_agreement(model, info, check_size)
    print(f"{name}: float64 margin bounds agree to {agreement:.1e} relative", file=sys.stderr)
    if agreement > RTOL:
        raise BenchError(f"{name}: the engines' margin bounds differ by {agreement:.1e} relative (> {RTOL:.0e})")
    batch = make_batch(info, batch_size, torch.float32)
    engines: list[Engine] = [Ours(copy.deepcopy(model)), AutoLirpa(copy.deepcopy(model), batch[0])]
    row: dict[str, Any] = {"model": name, "architecture": arch, "dataset": info.name, "batch": batch_size,
                           "eps": batch[2], "check_batch": check_size, "max_relative_difference": agreement,
                           "repeat": repeat}
    for kind in ("ibp", "crown-ibp"):
        times = time_steps(engines, batch, kind == "crown-ibp", repeat)
        speedup = {clock: paired_speedup(times, clock) for clock in CLOCKS}
        target = TARGETS[kind].get(name, 1.0)
        row[kind] = {**times, "speedup": speedup, "target": target, "met": speedup["wall"] >= target}
        print(f"{name} {kind}: ours {times['ours']['wall']['step'] * 1e3:.0f} ms, auto_LiRPA "
              f"{times['auto_LiRPA']['wall']['step'] * 1e3:.0f} ms per step: {speedup['wall']:.2f}× "
              f"(CPU time {speedup['cpu']:.2f}×; target {target}×)", file=sys.stderr)
    return row


def run(args: argparse.Namespace) -> int:
    for option in ("batch", "check_batch", "repeat", "repeat_large", "threads"):
        if getattr(args, option) < 1:
            raise BenchError(f"--{option.replace('_', '-')} must be at least 1")
    lirpa = lirpa_module()
    torch.set_num_threads(args.threads)
    started, load_before = time.perf_counter(), os.getloadavg()
    rows = []
    for name in args.models:
        repeat = args.repeat_large if name.startswith("dm-large") else args.repeat
        rows.append(measure(name, args.batch, args.check_batch, repeat))
    load_after = os.getloadavg()
    report = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {"cpu": cpu_model(), "cores": os.cpu_count(), "platform": platform.platform(),
                    "load_average_before": [round(v, 2) for v in load_before],
                    "load_average_after": [round(v, 2) for v in load_after],
                    "loaded": max(load_before[0], load_after[0]) > args.threads + 0.5},
        "threads": torch.get_num_threads(),
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "auto_LiRPA": getattr(lirpa, "__version__", "unknown")},
        "seconds": round(time.perf_counter() - started, 1),
        "rows": rows,
    }
    if args.json:
        atomic_write_json(Path(args.json), report)
    return 0 if all(row[k]["met"] for row in rows for k in ("ibp", "crown-ibp")) else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m methods.bounds.perf", description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--check-batch", type=int, default=32, help="examples in the float64 agreement check")
    parser.add_argument("--repeat", type=int, default=15, help="timed steps per engine and kind (DM-small)")
    parser.add_argument("--repeat-large", type=int, default=3, help="the same for DM-large")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", help="write the measurements here")
    parser.set_defaults(func=run)
    return parser


def main(argv: list[str] | None = None) -> int:
    return run_guarded(build_parser().parse_args(argv), "interrupted: nothing written")


if __name__ == "__main__":
    sys.exit(main())
