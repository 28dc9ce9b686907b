"""Margin specifications and the entry points: lower bounds of logit_y − logit_j over an ℓ∞ box.

Inputs are in pixel space (normalisation is a layer of the model), ε in pixels, and the box
[x − ε, x + ε] is clipped to [lo, hi] before it enters the model; a per-channel normalisation layer then
maps it to the normalised-space box of spec §2 exactly (the map is monotone).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Sequence

import torch
from torch import nn

from methods.base import MethodError
from methods.bounds.alpha import alpha_crown_margins
from methods.bounds.engine import BoundNet
from methods.bounds.layers import Box, Interval
from methods.bounds.rounding import rounding_errors

BOUND_METHODS = ("ibp", "crown-ibp", "crown", "alpha-crown")
DEFAULT_MEMORY_BYTES = 512 * 2**20


def margin_spec(y: torch.Tensor, num_classes: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(B, K−1, K): for each example the rows e_y − e_j for every j ≠ y, in increasing j."""
    eye = torch.eye(num_classes, dtype=dtype, device=y.device)
    others = torch.arange(num_classes, device=y.device).expand(y.shape[0], -1)
    others = others[others != y.unsqueeze(1)].view(y.shape[0], num_classes - 1)
    return eye[y].unsqueeze(1) - eye[others]


def input_box(x: torch.Tensor, eps: float, lo: float = 0.0, hi: float = 1.0) -> Box:
    """The ℓ∞ ball of radius ``eps`` (pixels) around x, clipped to [lo, hi]."""
    return (x - eps).clamp(min=lo), (x + eps).clamp(max=hi)


@dataclass
class MarginBounds:
    """One bound computation on a batch.

    ``logits`` (B, K) come from the clean pass that the bounds share (with training-mode BatchNorm, the
    same batch statistics), so a training step needs no separate forward pass. ``margins[method]`` is
    (B, K−1). ``relu_inputs`` are the IBP boxes of every ReLU input and ``normalised_input`` the IBP box
    after the leading normalisation layers (both only when an IBP pass ran, their ends formed on first
    use): Shi et al.'s regularisers read them. ``crown_relu_boxes``: the ReLU input boxes of full CROWN by
    layer position (when it ran), which the rounding error bound of its relaxations needs.
    """

    logits: torch.Tensor
    margins: dict[str, torch.Tensor]
    relu_intervals: list[Interval] = field(default_factory=list)
    normalised_interval: Interval | None = None
    crown_relu_boxes: dict[int, Box] | None = None

    @property
    def relu_inputs(self) -> list[Box]:
        return [box.ends() for box in self.relu_intervals]

    @property
    def normalised_input(self) -> Box | None:
        return None if self.normalised_interval is None else self.normalised_interval.ends()


def compute_margin_bounds(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    eps: float,
    methods: Sequence[str],
    lo: float = 0.0,
    hi: float = 1.0,
    memory_bytes: int = DEFAULT_MEMORY_BYTES,
) -> MarginBounds:
    """Several bounds of one batch sharing one clean pass and one IBP pass (differentiable, except
    "alpha-crown", whose slopes are optimised here).

    Training uses this directly (CROWN-IBP training needs IBP and CROWN-IBP bounds of the same batch).
    No batch splitting happens here: with training-mode BatchNorm the statistics are the whole batch's.
    """
    for method in methods:
        _check_method(method)
    _check_inputs(x, y, eps, lo, hi)
    net = BoundNet(model)
    logits = net.forward(x)
    if logits.dim() != 2:
        raise MethodError(f"the model must output logits (B, K), got shape {tuple(logits.shape)}")
    num_classes = logits.shape[1]
    if y.numel() and int(y.max()) >= num_classes:
        raise MethodError(f"label {int(y.max())} out of range for {num_classes} classes")
    spec = margin_spec(y, num_classes, x.dtype)
    x_box = input_box(x, eps, lo, hi)
    out = MarginBounds(logits=logits, margins={})
    if "ibp" in methods or "crown-ibp" in methods:
        boxes = net.intervals(*x_box)
        out.relu_intervals = [boxes[i] for i in net.relu_positions]
        out.normalised_interval = boxes[net.normalised_position] if net.normalised_position < len(boxes) else None
        if "ibp" in methods:
            out.margins["ibp"] = net.ibp_spec(boxes, spec)
        if "crown-ibp" in methods:
            relu_boxes = {i: boxes[i].ends() for i in net.relu_positions}
            out.margins["crown-ibp"] = net.backward(spec, len(net.layers), relu_boxes, x_box)
    if "crown" in methods or "alpha-crown" in methods:
        out.crown_relu_boxes = net.crown_relu_boxes(x_box, memory_bytes)
        if "crown" in methods:
            out.margins["crown"] = net.backward(spec, len(net.layers), out.crown_relu_boxes, x_box)
        if "alpha-crown" in methods:
            out.margins["alpha-crown"] = alpha_crown_margins(net, spec, out.crown_relu_boxes, x_box)
    return out


def margin_lower_bounds(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    eps: float,
    method: str = "ibp",
    lo: float = 0.0,
    hi: float = 1.0,
    memory_bytes: int = DEFAULT_MEMORY_BYTES,
) -> torch.Tensor:
    """(B, K−1) lower bounds of logit_y − logit_j for every j ≠ y (columns in increasing j) over the box
    [x − eps, x + eps] ∩ [lo, hi] (pixel units); certified means every bound > 0.

    ``method``: "ibp" (interval bound propagation, last layer merged with the spec), "crown-ibp" (IBP boxes
    for the ReLUs, one CROWN pass from the spec), "crown" (CROWN boxes for every ReLU; refused with a
    MethodError where too costly) or "alpha-crown" (CROWN's boxes, the last pass's lower ReLU slopes
    optimised, ``methods.bounds.alpha``; no gradient). A model with no module in training mode is bounded
    in chunks of the batch sized to ``memory_bytes``; otherwise (e.g. training-mode BatchNorm, whose statistics are the
    whole batch's) in one piece.
    """
    _check_method(method)
    _check_inputs(x, y, eps, lo, hi)
    parts = _chunked(model, x, y, eps, method, lo, hi, memory_bytes)
    return torch.cat([bounds.margins[method] for _, bounds in parts])


def certify_margins(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    eps: float,
    method: str = "ibp",
    lo: float = 0.0,
    hi: float = 1.0,
    memory_bytes: int = DEFAULT_MEMORY_BYTES,
) -> torch.Tensor:
    """(B,) bool, the certificate of an eval-mode model: every margin lower bound of ``method`` over the box
    exceeds its rounding slack, so the float32 model itself keeps its class on the whole box
    (``methods.bounds.rounding`` derives the slack).

    A float32 model's bounds are computed in float64, on an exact copy of it and over the exact ball: the
    slack is then the float32 forward pass's error bound plus a float64 bound error of ~1e-10, where a
    float32 computation's own error bound cost CROWN-IBP ~6 points of certified accuracy on CIFAR-10 2/255
    (``methods.bounds.rounding``, orders of magnitude). It makes certification 2–8× slower on CPU (float64
    runs without the fused kernels; README, Certified column)."""
    _check_method(method)
    _check_inputs(x, y, eps, lo, hi)
    deployed = x.dtype
    if deployed == torch.float32:
        model, x = copy.deepcopy(model).double(), x.double()
    decisions = []
    for start, bounds in _chunked(model, x, y, eps, method, lo, hi, memory_bytes):
        xs, ys = x[start : start + bounds.logits.shape[0]], y[start : start + bounds.logits.shape[0]]
        box = input_box(xs, eps, lo, hi)
        spec = margin_spec(ys, bounds.logits.shape[1], xs.dtype)
        computed = rounding_errors(model, *box, bounds.crown_relu_boxes)
        forward = computed if deployed == xs.dtype else rounding_errors(model, *box, arithmetic=deployed)
        slack = forward.forward_slack(spec) + computed.bound_slack(spec, method)
        decisions.append(certified(bounds.margins[method], slack))
    return torch.cat(decisions)


def certified(lower: torch.Tensor, slack: torch.Tensor | float = 0.0) -> torch.Tensor:
    """(B,) bool: every margin bound strictly above its ``slack`` (a zero bound allows a tie, spec §3.5).

    ``slack`` is the rounding error bound of the computation (``methods.bounds.rounding``); a certificate
    passes one, the default 0 suits only exact arithmetic and training statistics."""
    return (lower > slack).all(dim=1)


def require_eval(model: nn.Module) -> None:
    """Certificates are about the deployed model: refuse any module in training mode (training-mode
    BatchNorm makes an example's output depend on the rest of its batch)."""
    training = sorted({type(m).__name__ for m in model.modules() if m.training})
    if training:
        raise MethodError(f"cannot certify a model in training mode ({', '.join(training)}); deploy it first")


def _chunked(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, method: str, lo: float, hi: float,
    memory_bytes: int,
) -> list[tuple[int, MarginBounds]]:
    """(first index, bounds) of each chunk of the batch: one piece for a model with a module in training
    mode (BatchNorm statistics are the whole batch's), else chunks sized to ``memory_bytes``."""
    batch = x.shape[0]
    if any(m.training for m in model.modules()) or batch <= 1:
        chunk = max(1, batch)
    else:
        chunk = _chunk_size(model, x, method, memory_bytes)
    return [
        (s, compute_margin_bounds(model, x[s : s + chunk], y[s : s + chunk], eps, (method,), lo, hi, memory_bytes))
        for s in range(0, max(1, batch), chunk)
    ]


def _chunk_size(model: nn.Module, x: torch.Tensor, method: str, memory_bytes: int) -> int:
    """Examples per chunk so one chunk's tensors fit ``memory_bytes`` (eval-mode model: the probe pass on
    one example has no side effects)."""
    net = BoundNet(model)
    with torch.no_grad():
        logits = net.forward(x[:1])
    widths = [math.prod(layer.in_shape) for layer in net.layers if layer.in_shape is not None]
    specs = logits.shape[1] - 1
    # IBP keeps ~4 tensors per position (box ends, centre, radius); a CROWN step ~4 coefficient tensors.
    per_example = 4 * sum(widths) if method == "ibp" else 4 * specs * max(widths) + 4 * sum(widths)
    if method == "alpha-crown":
        # The optimiser's graph keeps every step's coefficients (and α with Adam's two moments).
        per_example += 4 * specs * sum(widths)
    return max(1, memory_bytes // (per_example * x.element_size()))


def _check_method(method: str) -> None:
    if method not in BOUND_METHODS:
        raise MethodError(f"unknown bound method {method!r}; known: {', '.join(BOUND_METHODS)}")


def _check_inputs(x: torch.Tensor, y: torch.Tensor, eps: float, lo: float, hi: float) -> None:
    if x.dim() < 2 or y.dim() != 1 or y.shape[0] != x.shape[0]:
        raise MethodError(f"need x (B, ...) and labels y (B,), got {tuple(x.shape)} and {tuple(y.shape)}")
    if not (math.isfinite(eps) and eps >= 0):
        raise MethodError(f"eps must be finite and ≥ 0, got {eps}")
    if not lo < hi:
        raise MethodError(f"need lo < hi, got [{lo}, {hi}]")
    if y.numel() and int(y.min()) < 0:
        raise MethodError("labels must be non-negative")
