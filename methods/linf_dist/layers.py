"""ℓp-distance layers: distance neurons, mean shift, and the bounded linear head of the hybrid model.

Every layer here works in *normalised* input units (see ``models``) and answers two calls: ``forward``
(a point) and ``interval(lower, upper)`` (a box, sound and exact for the distance layer at p = ∞ in eval
mode). The interval rules are what certification and the bound engine use.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from methods.base import MethodError
from methods.parallel import batch_mean
from methods.linf_dist.ops import linf_dist_interval, lp_dist


class MeanShift(nn.Module):
    """Subtract a per-channel mean: the batch mean in training (gradient flows through it, like BN), the
    running mean (momentum 0.1, starts at 0) in eval. No variance and no scale: subtracting a constant
    leaves output differences unchanged, so the ℓ∞ Lipschitz constant stays 1 (spec §2.2)."""

    def __init__(self, channels: int, momentum: float = 0.1):
        super().__init__()
        self.momentum = momentum
        self.register_buffer("running_mean", torch.zeros(channels))

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return y - self.running_mean
        mu = batch_mean(y)
        with torch.no_grad():
            self.running_mean.mul_(1 - self.momentum).add_(mu.detach(), alpha=self.momentum)
        return y - mu

    def interval(self, lower: torch.Tensor, upper: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return lower - self.running_mean, upper - self.running_mean


class LpDist(nn.Module):
    """y[b, o] = ‖x[b] − W[o]‖_p (then mean shift and/or bias), for x (B, n_in) in normalised units.

    Initialisation (spec §2.3): W ~ N(0, 1) without fan-in scaling; if ``n_in ≤ n_out``, the identity
    init sets W[o, o mod n_in] = −identity_val, so that for moderate inputs neuron o ≈ x[o mod n_in] +
    identity_val and the next mean shift removes the offset: each layer starts near a copy map.
    """

    def __init__(self, n_in: int, n_out: int, mean_shift: bool, bias: bool, identity_val: float = 10.0):
        super().__init__()
        self.n_in, self.n_out = n_in, n_out
        self.p: float = 8.0
        self.weight = nn.Parameter(torch.randn(n_out, n_in))
        if n_in <= n_out and identity_val:
            with torch.no_grad():
                rows = torch.arange(n_out)
                self.weight[rows, rows % n_in] = -identity_val
        self.mean_shift = MeanShift(n_out) if mean_shift else None
        self.bias = nn.Parameter(torch.zeros(n_out)) if bias else None

    def extra_repr(self) -> str:
        return f"{self.n_in}, {self.n_out}, p={self.p}, bias={self.bias is not None}"

    def _shift(self, y: torch.Tensor) -> torch.Tensor:
        if self.mean_shift is not None:
            y = self.mean_shift(y)
        if self.bias is not None:
            y = y + self.bias
        return y

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._shift(lp_dist(x, self.weight, self.p))

    def interval(self, lower: torch.Tensor, upper: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Exact box image at p = ∞ in eval mode; anything else would not be a sound certificate."""
        if not math.isinf(self.p) or self.training:
            raise MethodError(
                f"interval bounds of an ℓp-dist layer need p = ∞ and eval mode (got p = {self.p}, "
                f"{'training' if self.training else 'eval'})"
            )
        lo, hi = linf_dist_interval(lower, upper, self.weight)
        if self.mean_shift is not None:
            lo, hi = self.mean_shift.interval(lo, hi)
        if self.bias is not None:
            lo, hi = lo + self.bias, hi + self.bias
        return lo, hi

    def interval_rounding(self, lower: torch.Tensor, upper: torch.Tensor, error: torch.Tensor, u: float
                          ) -> torch.Tensor:
        """Rounding error bound at the output (``methods.bounds.rounding``) given ``error`` at the input.

        The layer is 1-Lipschitz in ℓ∞, so input errors pass as their max; each distance term is one
        rounded subtraction (relative u) and the max is exact, so a distance d gains at most u·d in the
        box end and u·d in the forward pass; the mean shift and the bias add one rounding each."""
        spread = error.amax(dim=1, keepdim=True)
        magnitude = linf_dist_interval(lower, upper, self.weight)[1] + spread
        error = spread + 2 * u * magnitude
        for shift in (None if self.mean_shift is None else self.mean_shift.running_mean, self.bias):
            if shift is not None:
                magnitude = magnitude + shift.abs()
                error = error + u * magnitude
        return error


class ScaledLinear(nn.Module):
    """Linear layer whose N(0, 1) weight is multiplied by 1/√fan_in in the forward pass (spec §2.3), as in
    the reference hybrid head; storing the unscaled weight changes Adam's effective step size."""

    def __init__(self, n_in: int, n_out: int):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n_out, n_in))
        self.bias = nn.Parameter(torch.zeros(n_out))
        self.scale = 1.0 / math.sqrt(n_in)

    def effective_weight(self) -> torch.Tensor:
        return self.weight * self.scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x, self.effective_weight(), self.bias)

    def interval(self, lower: torch.Tensor, upper: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        w = self.effective_weight()
        centre = nn.functional.linear((upper + lower) / 2, w, self.bias)
        radius = nn.functional.linear((upper - lower) / 2, w.abs())
        return centre - radius, centre + radius


def set_p(model: nn.Module, p: float) -> None:
    """Set p on every distance layer of ``model`` (the schedule changes it every batch)."""
    for module in model.modules():
        if isinstance(module, LpDist):
            module.p = p


def dist_layers(model: nn.Module) -> list[LpDist]:
    return [m for m in model.modules() if isinstance(m, LpDist)]
