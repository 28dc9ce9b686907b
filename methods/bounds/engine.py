"""Bound propagation through a sequential model: IBP forward, CROWN backward, full-CROWN intermediates.

Conventions: layer i maps the tensor "at position i" to the one at position i + 1; position 0 is the
model input (pixel space) and position n the logits. A *box* at position i bounds every neuron there over
the input box; IBP gives boxes at every position, full CROWN only where a ReLU needs them (its input).
"""

from __future__ import annotations

import math
from typing import Mapping

import torch

from methods.base import MethodError
from methods.bounds.functional import concretize
from methods.bounds.layers import Box, BoundLayer, Interval, Normalization, ReLU, bound_layers

CROWN_MAX_ELEMENTS = 4e9
"""Refuse full CROWN when its backward passes would touch more coefficient entries than this per
example: a proxy for time, ~0.5 s per 1e8 on one CPU core of a 2-vCPU Xeon (measured one point at a
time: DM-small MNIST, ~8e7, 0.48 s; CNN-7 MNIST, ~1.6e9, 7.6 s; CNN-7 CIFAR-10, ~3e9, 17 s). The limit
admits CNN-7 (Shi et al.'s model), so a cascade reaches its few open points, and refuses DM-large on
CIFAR-10 (~1e11, some ten minutes a point). Memory is bounded separately, by processing identity rows
in blocks (CNN-7 CIFAR-10: 1.8 GB peak)."""


COEFFICIENT_BLOCK_BYTES = 8 * 2**20
"""The largest coefficient tensor of one slice of a CROWN backward pass. A whole batch's (256 examples × 9
margin rows × a DM-small layer: 30–42 MiB) exceeds glibc's mmap threshold (at most 32 MiB), so every
temporary was a fresh mapping whose pages fault in on first touch, and no pass over it stayed in cache.
Chosen by interleaved A/B timings of the CROWN-IBP step (torch 1.13, one thread): 4 and 8 MiB were alike,
2 and 16 MiB slower; ``methods.bounds.perf`` measures the engine as a whole (README, Bound engine speed)."""
MIN_SLICE_EXAMPLES = 16
"""...but never fewer examples per slice than this: on DM-large (2.4 MiB of coefficients per example) 8 MiB
slices of 3 examples made the step slower than one piece in an A/B timing, as the convolutions then run on
a few dozen coefficient images per call, while slices of 13 made it faster."""


class BoundNet:
    """A model as a list of bound rules, for one bound computation (rules hold per-batch state)."""

    def __init__(self, model: torch.nn.Module):
        self.layers: list[BoundLayer] = bound_layers(model)

    @property
    def relu_positions(self) -> list[int]:
        """Positions of ReLU inputs (the layer index of each ReLU)."""
        return [i for i, layer in enumerate(self.layers) if isinstance(layer, ReLU)]

    @property
    def normalised_position(self) -> int:
        """First position after the leading normalisation layers (where the reference codes' inputs live)."""
        i = 0
        while i < len(self.layers) and isinstance(self.layers[i], Normalization):
            i += 1
        return i

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The clean pass; records every layer's input shape and training-mode BatchNorm statistics."""
        for layer in self.layers:
            x = layer.forward(x)
        return x

    def intervals(self, lower: torch.Tensor, upper: torch.Tensor) -> list[Interval]:
        """IBP boxes at positions 0 .. n−1 (the last layer is left to ``ibp_spec``), each in the form its
        layer left it: ask for ``ends()`` only where they are needed (see ``Interval``)."""
        boxes = [Interval(ends=(lower, upper))]
        for layer in self.layers[:-1]:
            boxes.append(layer.propagate(boxes[-1]))
        return boxes

    def interval_boxes(self, lower: torch.Tensor, upper: torch.Tensor) -> list[Box]:
        """The ends of every box of ``intervals``."""
        return [box.ends() for box in self.intervals(lower, upper)]

    def ibp_spec(self, boxes: list[Interval], spec: torch.Tensor) -> torch.Tensor:
        """IBP lower bounds (B, S) of spec (B, S, K) @ logits, the spec merged into the last layer."""
        return self.layers[-1].interval_spec(boxes[-1], spec)

    def backward(self, lam: torch.Tensor, position: int, relu_boxes: Mapping[int, Box], x_box: Box,
                 lower_slopes: Mapping[int, torch.Tensor] | None = None) -> torch.Tensor:
        """CROWN lower bounds (B, S) of lam (B, S, *shape at ``position``) · z over the input box.

        ``relu_boxes[i]`` must bound the input of every ReLU at a position i < ``position``.
        ``lower_slopes[i]`` (B, S, N), if given, replaces the adaptive lower slopes of the unstable
        neurons of the ReLU at position i (α-CROWN; each must lie in [0, 1]).

        Examples are propagated in slices of the batch whose widest coefficient tensor stays within
        ``COEFFICIENT_BLOCK_BYTES``: given the boxes, every example's pass is independent of the others
        (training-mode BatchNorm's batch statistics were fixed by the clean pass), so the bounds are the
        same, each computed by the same operations.
        """
        slopes = lower_slopes or {}
        widest = max([math.prod(lam.shape[1:])] + [math.prod(layer.in_shape) * lam.shape[1]
                                          for layer in self.layers[:position] if layer.in_shape is not None])
        chunk = max(MIN_SLICE_EXAMPLES, COEFFICIENT_BLOCK_BYTES // max(1, widest * lam.element_size()))
        if chunk >= lam.shape[0]:
            return self._backward(lam, position, relu_boxes, x_box, slopes)

        # split(), not one slice per piece: autograd then joins the pieces' gradients in one concatenation,
        # where slices would each scatter into a zero tensor of the whole batch's size.
        lams = lam.split(chunk)
        boxes = {i: (lower.split(chunk), upper.split(chunk)) for i, (lower, upper) in relu_boxes.items()}
        x_lower, x_upper = x_box[0].split(chunk), x_box[1].split(chunk)
        pieces = {i: a.split(chunk) for i, a in slopes.items()}
        return torch.cat([
            self._backward(lams[k], position, {i: (ls[k], us[k]) for i, (ls, us) in boxes.items()},
                           (x_lower[k], x_upper[k]), {i: a[k] for i, a in pieces.items()})
            for k in range(len(lams))
        ])

    def _backward(self, lam: torch.Tensor, position: int, relu_boxes: Mapping[int, Box], x_box: Box,
                  slopes: Mapping[int, torch.Tensor]) -> torch.Tensor:
        offset = lam.new_zeros(lam.shape[:2])
        for i in range(position - 1, -1, -1):
            box = relu_boxes.get(i, (None, None))
            layer = self.layers[i]
            if i in slopes and isinstance(layer, ReLU):
                lam, step = layer.backward_with_lower_slope(lam, *box, slopes[i])
            else:
                lam, step = layer.backward(lam, *box)
            offset = offset + step
        x_lower, x_upper = x_box
        centre, radius = ((x_upper + x_lower) / 2).flatten(1), ((x_upper - x_lower) / 2).flatten(1)
        return concretize(lam.flatten(2), centre, radius) + offset

    def crown_relu_boxes(self, x_box: Box, memory_bytes: int) -> dict[int, Box]:
        """Full CROWN: the box of every ReLU input from a backward pass over ±identity rows, in order,
        each pass using the relaxations of the ReLUs below. Rows are processed in blocks so the
        coefficients of one block stay within ``memory_bytes``; needs a prior ``forward`` (shapes)."""
        self._check_crown_cost()
        batch = x_box[0].shape[0]
        itemsize = x_box[0].element_size()
        boxes: dict[int, Box] = {}
        for k in self.relu_positions:
            shape = self._shape(k)
            n = math.prod(shape)
            widest = max(math.prod(self._shape(i)) for i in range(k + 1))
            # ~4 live tensors of the coefficients' size during a backward step (lam, its two parts, result).
            rows = max(1, min(n, memory_bytes // max(1, 4 * 2 * batch * widest * itemsize)))
            lowers, uppers = [], []
            for start in range(0, n, rows):
                stop = min(n, start + rows)
                eye = _identity_rows(n, start, stop, x_box[0])
                lam = torch.cat([eye, -eye]).unsqueeze(0).expand(batch, -1, -1).reshape(batch, 2 * (stop - start), *shape)
                bound = self.backward(lam, k, boxes, x_box)
                lowers.append(bound[:, : stop - start])
                uppers.append(-bound[:, stop - start :])
            boxes[k] = (torch.cat(lowers, dim=1).reshape(batch, *shape), torch.cat(uppers, dim=1).reshape(batch, *shape))
        return boxes

    def _shape(self, position: int) -> torch.Size:
        shape = self.layers[position].in_shape
        if shape is None:
            raise MethodError("layer shapes are unknown: run a forward pass first")
        return shape

    def _check_crown_cost(self) -> None:
        widths = [math.prod(self._shape(i)) for i in range(len(self.layers))]
        cost = sum(2 * widths[k] * sum(widths[: k + 1]) for k in self.relu_positions)
        if cost > CROWN_MAX_ELEMENTS:
            raise MethodError(
                f"full CROWN on this model would touch ~{cost:.1e} coefficients per example "
                f"(limit {CROWN_MAX_ELEMENTS:.0e}); use 'crown-ibp' or 'ibp'"
            )


def _identity_rows(n: int, start: int, stop: int, like: torch.Tensor) -> torch.Tensor:
    """Rows start..stop−1 of the n×n identity, without building the whole matrix."""
    rows = like.new_zeros(stop - start, n)
    index = torch.arange(stop - start, device=like.device)
    rows[index, index + start] = 1
    return rows
