"""The 2021 (v1) recipe's weight decay: decoupled, and on distance neurons an ℓp-norm decay at the layers'
current p (``adamw.py`` of zbh2047/L_inf-dist-net).

Each step, before the Adam update and with that step's learning rate η and decay λ, v1 moves every
parameter against the gradient of a norm penalty without passing it through Adam's moments:

- a distance layer's weight, row by row (one row per neuron): ``w ← w − ηλ·∇(½‖w‖_p²)``, with p the
  layer's p that step (the ratio form below is that gradient, computed with every |w_i| scaled by the
  row's largest, and ``w_i² + adam_eps`` for w_i², as v1 does); at p = ∞ only the largest |w_i| of the
  row shrinks, by the factor 1 − ηλ;
- everything else (the last distance layer's bias, the MLP head's weights and biases): ``x ← (1 − ηλ)·x``.
  (v1 sends the bias through the ℓp formula too, on rows of one element, where it reduces to this.)

The penalty uses the norm the neuron itself computes at that step, so at p = ∞ it acts on the one weight
per row that decides the distance.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from methods.linf_dist.layers import LpDist


def lp_decay_direction(weight: torch.Tensor, p: float, eps: float) -> torch.Tensor:
    """∇(½‖row‖_p²) for every row of ``weight`` (n_out, n_in), the decay direction of one distance layer."""
    if math.isinf(p):
        rows = weight.abs().argmax(dim=1, keepdim=True)
        return torch.zeros_like(weight).scatter_(1, rows, weight.gather(1, rows))
    square = weight * weight + eps
    scaled = square / square.amax(dim=1, keepdim=True)
    power = scaled.pow(p / 2 - 1)
    total = (scaled * power).sum(dim=1, keepdim=True)
    return total.pow(2 / p - 1) * power * weight


class DecoupledDecay:
    """v1's decay for one model and optimizer; ``apply`` runs after ``backward`` and before ``step``."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, weight_decay: float, eps: float):
        self.optimizer = optimizer
        self.weight_decay = weight_decay
        self.eps = eps
        self.dist_layer_of = {id(layer.weight): layer for layer in model.modules() if isinstance(layer, LpDist)}

    @torch.no_grad()
    def apply(self) -> None:
        for group in self.optimizer.param_groups:
            rate = group["lr"] * self.weight_decay
            for param in group["params"]:
                if param.grad is None:  # as v1: only parameters this step trains decay
                    continue
                layer = self.dist_layer_of.get(id(param))
                if layer is None:
                    param.mul_(1.0 - rate)
                else:
                    param.sub_(rate * lp_decay_direction(param, layer.p, self.eps))
