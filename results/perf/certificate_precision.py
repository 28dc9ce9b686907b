"""Certificates of one finished cell's model, computed three ways (the README's Certified column and the
float64 change of methods/bounds/margins.py were measured with this):

  no slack     every margin bound of the float32 computation above 0 (not a certificate: rounding ignored)
  float32      float32 bounds above their own rounding slack (forward pass + bound computation)
  float64      what the method certifies today: float64 bounds of an exact copy, float32 forward slack

plus the largest |float32 bound − float64 bound| and the seconds each certification took.

    python results/perf/certificate_precision.py CELL [--method crown-ibp] [--points 10000] [--batch 500]

CELL is a finished cell folder with its weights (``model.pt``) or a fixed checkpoint folder.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch

from bench.cascade import cell_inputs
from bench.data import data_dir, load_split, to_pixels
from bench.errors import BenchError
from bench.store import parse_eps
from methods.bounds import certified, input_box, margin_lower_bounds, margin_spec
from methods.bounds.rounding import rounding_errors


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("cell", type=Path)
    parser.add_argument("--method", default="crown-ibp")
    parser.add_argument("--points", type=int, default=10000)
    parser.add_argument("--batch", type=int, default=500)
    args = parser.parse_args(argv)
    try:
        cell, _, _, method, model = cell_inputs(args.cell)
        split = load_split(cell["dataset"], False, data_dir(None))
    except BenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    eps = float(parse_eps(cell["eps"]))
    wide = None
    counts = {"no slack": 0, "float32": 0, "float64": 0}
    seconds = {"float32": 0.0, "float64": 0.0}
    worst = 0.0
    n = min(args.points, len(split.labels))
    for start in range(0, n, args.batch):
        stop = min(start + args.batch, n)
        x = to_pixels(split.images[start:stop], torch.device("cpu"))
        y = split.labels[start:stop].long()
        began = time.perf_counter()
        with torch.no_grad():
            lower = margin_lower_bounds(model, x, y, eps, args.method)
            errors = rounding_errors(model, *input_box(x, eps))
            spec = margin_spec(y, lower.shape[1] + 1)
            in_float32 = certified(lower, errors.forward_slack(spec) + errors.bound_slack(spec, args.method))
        seconds["float32"] += time.perf_counter() - began
        began = time.perf_counter()
        today = method.certify(model, x, y, eps, args.method).certified
        seconds["float64"] += time.perf_counter() - began
        if wide is None:
            wide = copy.deepcopy(model).double()
        with torch.no_grad():
            exact = margin_lower_bounds(wide, x.double(), y, eps, args.method)
        worst = max(worst, float((lower.double() - exact).abs().max()))
        counts["no slack"] += int((lower > 0).all(dim=1).sum())
        counts["float32"] += int(in_float32.sum())
        counts["float64"] += int(today.sum())
    print(f"{args.cell} {args.method}, {n} points, {torch.get_num_threads()} thread(s)")
    for name, count in counts.items():
        print(f"  {name:9s} {count:6d} certified ({100 * count / n:.2f} %)")
    print(f"  seconds: float32 {seconds['float32']:.1f}, float64 {seconds['float64']:.1f}; "
          f"max |float32 bound − float64 bound| {worst:.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
