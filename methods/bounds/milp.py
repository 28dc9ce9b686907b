"""Exact verification of ReLU networks by mixed-integer linear programming, solved by HiGHS (``highspy``).

The encoding (Tjeng, Xiao & Tedrake, ICLR 2019): every affine stretch between ReLUs (Linear, Conv2d,
normalisation, eval-mode BatchNorm, Flatten) is lowered once per model to a sparse matrix by applying it to
the identity basis in float64; per point and margin row j the program minimises logit_y − logit_j over
the input box, with each ReLU input z in its pre-activation box [l, u] (full CROWN's ∩ IBP's, computed in
float64) encoded as

* stable off (u ≤ 0): the output is the constant 0; stable on (l ≥ 0): the output equals z;
* unstable: output a ∈ [0, u], a binary δ, a ≥ z, a ≤ z − l (1 − δ), a ≤ u δ (big-M with M = the box).

Only rows that CROWN's float64 bound leaves open are solved, the hardest (smallest clean margin) first; a
row whose minimiser the float32 model misclassifies ends the point.

Why a MILP answer is sound for the float32 model. The program is the exact real-arithmetic network of the
float32 weights (widened to float64 exactly). HiGHS's dual bound L on a row is a lower bound of the exact
minimum up to the solver's own floating-point tolerances, and the float32 forward pass at any point of the
box is within E_fwd = e_y + e_j of the exact margin (``methods.bounds.rounding``'s forward error bound,
the part of its slack that is about the model rather than about a bound computation). A row counts as
certified when L > E_fwd + ``MILP_SAFETY``, so the float32 margin is > 0 on the whole box whenever the
solver's bound is within ``MILP_SAFETY`` of the truth. Trusting that is
an assumption (as for every MILP verifier on a floating-point solver), not a proof. A counterexample needs
no such trust: the solver's minimiser, clipped to the box, is run through the float32 model itself, and
only a misclassification there makes the point falsified; otherwise the point stays unknown.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field
import numpy as np
import torch
from torch import nn

from methods.base import MethodError
from methods.bounds.engine import BoundNet
from methods.bounds.layers import Affine, Box, Flatten, ReLU
from methods.bounds.margins import DEFAULT_MEMORY_BYTES, input_box, margin_spec, require_eval
from methods.bounds.rounding import rounding_errors

MILP_TIME_LIMIT_S = 120.0
"""Solver time per point (all its margin rows together): our choice. Measured on the fixed MNIST ibp smoke
checkpoint (ε 0.1, one core shared with other jobs): test point 62 (250 unstable ReLUs), which APGD leaves
robust and α-CROWN does not certify, is falsified after 47 s, so 30 s left it unknown."""
MILP_SAFETY = 1e-4
"""Margin by which a row's dual bound must clear the rounding slack: our assumption about how far HiGHS's
floating-point bound may sit from the exact one (its feasibility tolerances are 1e-7 of values of order 1–100)."""
BOX_WIDENING = 1e-6
"""Absolute widening of the float64 pre-activation boxes before they become big-M constants (float64
rounding of a bound computation is ~1e-12 here): a slightly loose box only weakens the relaxation."""
_BASIS_CHUNK = 512

CERTIFIED, FALSIFIED, UNKNOWN = "certified", "falsified", "unknown"


@dataclass
class Segment:
    """z_out = A z_in + b for one affine stretch; A as CSR arrays over the flattened vectors."""

    indptr: np.ndarray
    indices: np.ndarray
    values: np.ndarray
    bias: np.ndarray

    def rows(self, keep: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(indptr, indices, values) of the rows in ``keep`` (increasing indices)."""
        starts, stops = self.indptr[keep], self.indptr[keep + 1]
        lengths = stops - starts
        take = np.concatenate([np.arange(a, b) for a, b in zip(starts, stops)]) if keep.size else np.zeros(0, int)
        return np.concatenate([[0], np.cumsum(lengths)]), self.indices[take], self.values[take]


@dataclass
class RowSolution:
    """One margin row's program: ``lower`` is a valid lower bound of min (logit_y − logit_j) over the box
    (the solver's dual bound, or CROWN's where the row was not solved); ``upper`` the best margin found."""

    target: int
    status: str
    lower: float
    upper: float = math.inf
    x: np.ndarray | None = None


@dataclass
class PointVerdict:
    verdict: str
    rows: list[RowSolution] = field(default_factory=list)
    counterexample: torch.Tensor | None = None
    seconds: float = 0.0


class MilpVerifier:
    """The encoding of one eval-mode ReLU network; ``verify`` answers per point."""

    def __init__(self, model: nn.Module, time_limit_s: float = MILP_TIME_LIMIT_S):
        require_eval(model)
        self.model = model
        self.time_limit_s = time_limit_s
        self.exact = copy.deepcopy(model).double()
        self.net = BoundNet(self.exact)
        for layer in self.net.layers:
            if not isinstance(layer, (Affine, Flatten, ReLU)):
                raise MethodError(f"the MILP encodes ReLU networks of affine layers; {layer.kind} is not one")
        self.relus = self.net.relu_positions
        self._segments: list[Segment] | None = None

    def _lower(self, x: torch.Tensor) -> list[Segment]:
        """The affine stretches, lowered once: before the first ReLU, between ReLUs, after the last."""
        if self._segments is None:
            with torch.no_grad():
                self.net.forward(x[:1].double())
            bounds = [0, *[p + 1 for p in self.relus]]
            ends = [*self.relus, len(self.net.layers)]
            self._segments = [self._segment(start, stop) for start, stop in zip(bounds, ends)]
        return self._segments

    def _segment(self, start: int, stop: int) -> Segment:
        shape = self.net.layers[start].in_shape
        layers = [layer.module for layer in self.net.layers[start:stop]]

        def apply(z: torch.Tensor) -> torch.Tensor:
            for module in layers:
                z = module(z)
            return z.flatten(1)

        n = math.prod(shape)
        with torch.no_grad():
            bias = apply(torch.zeros(1, *shape, dtype=torch.float64))[0]
            rows, cols, vals = [], [], []
            for first in range(0, n, _BASIS_CHUNK):
                count = min(_BASIS_CHUNK, n - first)
                basis = torch.zeros(count, n, dtype=torch.float64)
                basis[torch.arange(count), torch.arange(first, first + count)] = 1
                columns = (apply(basis.view(count, *shape)) - bias).numpy()
                c, r = np.nonzero(columns)
                rows.append(r)
                cols.append(c + first)
                vals.append(columns[c, r])
        row, col, val = np.concatenate(rows), np.concatenate(cols), np.concatenate(vals)
        order = np.lexsort((col, row))
        indptr = np.concatenate([[0], np.cumsum(np.bincount(row, minlength=bias.numel()))])
        return Segment(indptr, col[order].astype(np.int32), val[order], bias.numpy())

    def boxes(self, x_box: Box) -> dict[int, Box]:
        """Pre-activation boxes of every ReLU for one float64 input box: CROWN's ∩ IBP's, widened."""
        with torch.no_grad():
            self.net.forward(x_box[0])
            ibp = self.net.interval_boxes(*x_box)
            crown = self.net.crown_relu_boxes(x_box, DEFAULT_MEMORY_BYTES)
        return {k: (torch.maximum(ibp[k][0], crown[k][0]) - BOX_WIDENING,
                    torch.minimum(ibp[k][1], crown[k][1]) + BOX_WIDENING) for k in self.relus}

    def verify(self, x: torch.Tensor, y: int, eps: float, lo: float = 0.0, hi: float = 1.0,
               prune: bool = True) -> PointVerdict:
        """The verdict for one point x (1, C, H, W) float32 with label y, over every margin row j ≠ y.

        ``prune``: skip rows whose CROWN bound already clears the threshold and stop at the first
        confirmed counterexample (off: every row is solved to its end, for tests that compare optima)."""
        start = time.perf_counter()
        deadline = start + self.time_limit_s
        segments = self._lower(x)
        box32 = input_box(x, eps, lo, hi)
        box = (box32[0].double(), box32[1].double())
        relu_boxes = self.boxes(box)
        num_classes = segments[-1].bias.shape[0]
        targets = [j for j in range(num_classes) if j != y]
        spec = margin_spec(torch.tensor([y]), num_classes)
        threshold = {j: slack + MILP_SAFETY for j, slack in self._slack(box32, spec, y, num_classes).items()}
        with torch.no_grad():
            crown = self.net.backward(spec.double(), len(self.net.layers), relu_boxes, box)[0]
            clean = self.exact(x.double())[0]
        crown_of = {j: float(crown[j - (j > y)]) for j in targets}
        order = sorted(targets, key=lambda j: float(clean[y] - clean[j]))
        solutions: list[RowSolution] = []
        counterexample = None
        for j in order:
            if prune and crown_of[j] > threshold[j]:
                solutions.append(RowSolution(j, "crown", crown_of[j]))
                continue
            remaining = deadline - time.perf_counter()
            if remaining <= 0:
                solutions.append(RowSolution(j, "time limit", crown_of[j]))
                continue
            row = self._solve(segments, relu_boxes, box, y, j, threshold[j] if prune else math.inf, remaining)
            row.lower = max(row.lower, crown_of[j])
            solutions.append(row)
            if row.x is not None and row.upper < threshold[j]:
                adversarial = self._check(row.x, box32, y)
                if adversarial is not None:
                    counterexample = adversarial
                    if prune:
                        break
        verdict = (FALSIFIED if counterexample is not None
                   else CERTIFIED if len(solutions) == len(targets) and all(s.lower > threshold[s.target] for s in solutions)
                   else UNKNOWN)
        return PointVerdict(verdict, solutions, counterexample, time.perf_counter() - start)

    def _slack(self, box32: Box, spec: torch.Tensor, y: int, num_classes: int) -> dict[int, float]:
        """τ per class j: e_y + e_j, the bound on how far the float32 forward pass at any point of the box
        is from the exact network (``methods.bounds.rounding``; the MILP has no bound computation of its
        own to cover, so CROWN's extra term for its backward pass does not apply)."""
        with torch.no_grad():
            slack = rounding_errors(self.model, *box32).forward_slack(spec)[0]
        return {j: float(slack[j - (j > y)]) for j in range(num_classes) if j != y}

    def _check(self, values: np.ndarray, box32: Box, y: int) -> torch.Tensor | None:
        """The solver's minimiser as a float32 input clipped to the box, if the float32 model misclassifies it."""
        lower, upper = box32
        candidate = torch.from_numpy(values).to(lower.dtype).view_as(lower)
        candidate = torch.minimum(torch.maximum(candidate, lower), upper)
        with torch.no_grad():
            wrong = int(self.model(candidate).argmax(dim=1)[0]) != y
        return candidate if wrong else None

    def _solve(self, segments: list[Segment], relu_boxes: dict[int, Box], box: Box, y: int, j: int,
               threshold: float, time_limit: float) -> RowSolution:
        highspy = _highspy()
        h = highspy.Highs()
        h.setOptionValue("output_flag", False)
        h.setOptionValue("threads", 1)
        h.setOptionValue("time_limit", float(time_limit))
        x_lower, x_upper = box[0].flatten().numpy(), box[1].flatten().numpy()
        # The previous layer's outputs: a column index per neuron, −1 for a neuron that is constant 0.
        prev = _add_columns(h, x_lower, x_upper)
        integers = False
        for segment, k in zip(segments[:-1], self.relus):
            lower, upper = (t.flatten().numpy() for t in relu_boxes[k])
            prev = _encode_relu(h, segment, prev, lower, upper)
            integers |= bool(((lower < 0) & (upper > 0)).any())
        last = segments[-1]
        weights = np.zeros(prev.shape[0])
        for c, sign in ((y, 1.0), (j, -1.0)):
            span = slice(last.indptr[c], last.indptr[c + 1])
            np.add.at(weights, last.indices[span], sign * last.values[span])
        used = (prev >= 0) & (weights != 0)
        h.changeColsCost(int(used.sum()), prev[used].astype(np.int32), weights[used])
        offset = float(last.bias[y] - last.bias[j])

        def decided(event) -> None:
            # The row is settled once the dual bound clears the threshold or a margin below −threshold is
            # found (the float32 check decides about that one); the rest of the search would only close the gap.
            out = event.data_out
            if out.mip_dual_bound + offset > threshold or out.mip_primal_bound + offset < -threshold:
                event.interrupt()

        h.cbMipInterrupt.subscribe(decided)
        h.run()
        status = h.getModelStatus()
        info = h.getInfo()
        optimal = status == highspy.HighsModelStatus.kOptimal
        stopped = status in (highspy.HighsModelStatus.kTimeLimit, highspy.HighsModelStatus.kInterrupt)
        if not (optimal or stopped):
            return RowSolution(j, f"solver: {h.modelStatusToString(status)}", -math.inf)
        # A MIP's dual bound holds at a time limit too; an LP (every ReLU stable) only at its optimum.
        dual = info.mip_dual_bound if integers else info.objective_function_value if optimal else -math.inf
        found = info.primal_solution_status == highspy.SolutionStatus.kSolutionStatusFeasible
        values = np.array(h.getSolution().col_value[: x_lower.size]) if found else None
        upper = float(info.objective_function_value) + offset if found else math.inf
        ending = "optimal" if optimal else "decided" if status == highspy.HighsModelStatus.kInterrupt else "time limit"
        return RowSolution(j, ending, float(dual) + offset, upper, values)


def _encode_relu(h, segment: Segment, prev: np.ndarray, lower: np.ndarray, upper: np.ndarray) -> np.ndarray:
    """Adds z = A·prev + b and a = relu(z) for one ReLU layer with input box [lower, upper]; returns the
    column of each output (−1 where the neuron is off for sure)."""
    highspy = _highspy()

    inf = highspy.kHighsInf
    on, unstable = lower >= 0, (lower < 0) & (upper > 0)
    keep = np.nonzero(on | unstable)[0]
    out = np.full(lower.shape, -1, dtype=np.int64)
    if not keep.size:
        return out
    indptr, indices, values = segment.rows(keep)
    alive = prev[indices] >= 0
    kept = np.concatenate([[0], np.cumsum(alive)])
    indptr, indices, values = kept[indptr], prev[indices[alive]], values[alive]
    a = _add_columns(h, np.maximum(lower[keep], 0), np.maximum(upper[keep], 0))
    out[keep] = a
    b = segment.bias[keep]
    # Row r: a_r − A_r·prev, with = b for a stable-on neuron and ≥ b (a ≥ z) for an unstable one.
    lengths = np.diff(indptr) + 1
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    row_index = np.empty(lengths.sum(), dtype=np.int64)
    row_value = np.empty(lengths.sum())
    row_index[starts], row_value[starts] = a, 1.0
    body = np.ones(lengths.sum(), dtype=bool)
    body[starts] = False
    row_index[body], row_value[body] = indices, -values
    h.addRows(keep.size, b, np.where(on[keep], b, inf), row_index.size, starts.astype(np.int32),
              row_index.astype(np.int32), row_value)
    open_rows = np.nonzero(unstable[keep])[0]
    if open_rows.size:
        l, u = lower[keep][open_rows], upper[keep][open_rows]
        delta = _add_columns(h, np.zeros(open_rows.size), np.ones(open_rows.size))
        h.changeColsIntegrality(delta.size, delta.astype(np.int32),
                                np.full(delta.size, highspy.HighsVarType.kInteger))
        # a − A·prev − l δ ≤ b − l (a ≤ z − l (1 − δ)): row r of the block above plus the δ term.
        spans = [np.arange(starts[r], starts[r] + lengths[r]) for r in open_rows]
        idx = np.concatenate([np.concatenate([row_index[s], [d]]) for s, d in zip(spans, delta)])
        val = np.concatenate([np.concatenate([row_value[s], [-lr]]) for s, lr in zip(spans, l)])
        big_starts = np.concatenate([[0], np.cumsum(lengths[open_rows] + 1)[:-1]])
        h.addRows(open_rows.size, np.full(open_rows.size, -inf), b[open_rows] - l, idx.size,
                  big_starts.astype(np.int32), idx.astype(np.int32), val)
        # a − u δ ≤ 0.
        pairs = np.stack([a[open_rows], delta], axis=1).ravel()
        coefficients = np.stack([np.ones(open_rows.size), -u], axis=1).ravel()
        h.addRows(open_rows.size, np.full(open_rows.size, -inf), np.zeros(open_rows.size), pairs.size,
                  np.arange(0, pairs.size, 2, dtype=np.int32), pairs.astype(np.int32), coefficients)
    return out


def _highspy():
    try:
        import highspy
    except ImportError:
        raise MethodError("the MILP verifier needs HiGHS: pip install 'certbench[milp]' (highspy)") from None
    return highspy


def _add_columns(h, lower: np.ndarray, upper: np.ndarray) -> np.ndarray:
    """New continuous columns with these bounds (cost 0); their indices."""
    first = h.getNumCol()
    h.addVars(lower.size, np.ascontiguousarray(lower, dtype=np.float64), np.ascontiguousarray(upper, dtype=np.float64))
    return np.arange(first, first + lower.size, dtype=np.int64)


def milp_certify(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, lo: float = 0.0, hi: float = 1.0,
                 time_limit_s: float = MILP_TIME_LIMIT_S) -> tuple[torch.Tensor, torch.Tensor]:
    """(certified, falsified), each (B,) bool, for a batch; a point that is neither is unknown."""
    verifier = MilpVerifier(model, time_limit_s)
    verdicts = [verifier.verify(x[i : i + 1], int(y[i]), eps, lo, hi).verdict for i in range(x.shape[0])]
    return (torch.tensor([v == CERTIFIED for v in verdicts], dtype=torch.bool),
            torch.tensor([v == FALSIFIED for v in verdicts], dtype=torch.bool))
