"""ℓ∞-dist nets as ``nn.Sequential`` stacks whose every module answers ``forward`` and ``interval``.

Pure net (v2 ``MLPModel``, spec §2.4):
    Normalize → Flatten → LpDist(n_in→w) → (depth−2) × LpDist(w→w) → LpDist(w→K, bias) → Negate → Temperature
Hybrid (v2 ``HybridModel``, spec §2.5): ``depth − 2`` distance layers, then
    ScaledLinear(w→hidden) → Tanh → ScaledLinear(hidden→K)

Normalisation uses the per-channel mean and ONE scalar std (spec §3), so the pixel ℓ∞ ball of radius ε
is the normalised ℓ∞ ball of radius ε/std on which the distance layers are 1-Lipschitz.
"""

from __future__ import annotations

import torch
from torch import nn

from methods.base import DatasetInfo
from methods.linf_dist.layers import LpDist, ScaledLinear
from methods.normalize import Normalize

SCALAR_STD = {"mnist": 0.3081, "cifar10": 0.2009}


class Negate(nn.Module):
    """Class scores are negated distances (spec pitfall 1): a class scores high when its distance is small."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return -x

    def interval(self, lower: torch.Tensor, upper: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return -upper, -lower

    def interval_rounding(self, lower: torch.Tensor, upper: torch.Tensor, error: torch.Tensor, u: float
                          ) -> torch.Tensor:
        """Negation is exact (``methods.bounds.rounding``)."""
        return error


class Temperature(nn.Module):
    """Logits = s · scores with a learnable s (init 1) that only the cross-entropy term and PGD see;
    the hinge margins are taken before it (spec §2.7). ``learnable=False`` fixes s = 1."""

    def __init__(self, learnable: bool):
        super().__init__()
        if learnable:
            self.scale = nn.Parameter(torch.ones(()))
        else:
            self.register_buffer("scale", torch.ones(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale * x

    def interval(self, lower: torch.Tensor, upper: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        a, b = self.scale * lower, self.scale * upper
        return torch.minimum(a, b), torch.maximum(a, b)

    def interval_rounding(self, lower: torch.Tensor, upper: torch.Tensor, error: torch.Tensor, u: float
                          ) -> torch.Tensor:
        """One rounded product (``methods.bounds.rounding``)."""
        scale = self.scale.detach().abs()
        return scale * (error + u * (torch.maximum(lower.abs(), upper.abs()) + error))


class Tanh(nn.Tanh):
    def interval(self, lower: torch.Tensor, upper: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.tanh(lower), torch.tanh(upper)


class Flatten(nn.Flatten):
    def interval(self, lower: torch.Tensor, upper: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self(lower), self(upper)


def _stem(info: DatasetInfo) -> list[nn.Module]:
    return [Normalize(info.channel_mean, SCALAR_STD[info.name]), Flatten()]


def _dist_stack(n_in: int, width: int, layers: int, identity_val: float) -> list[nn.Module]:
    sizes = [n_in] + [width] * layers
    return [LpDist(a, b, mean_shift=True, bias=False, identity_val=identity_val) for a, b in zip(sizes, sizes[1:])]


def linf_dist_net(info: DatasetInfo, depth: int, width: int, identity_val: float, learnable_scale: bool
                  ) -> nn.Sequential:
    """``depth`` distance layers; the last (no mean shift, bias) gives the K class distances."""
    if depth < 2:
        raise ValueError("an ℓ∞-dist net needs depth ≥ 2")
    n_in = info.input_shape[0] * info.input_shape[1] * info.input_shape[2]
    head = LpDist(width, info.num_classes, mean_shift=False, bias=True, identity_val=identity_val)
    return nn.Sequential(*_stem(info), *_dist_stack(n_in, width, depth - 1, identity_val), head, Negate(),
                         Temperature(learnable_scale))


def linf_dist_mlp(info: DatasetInfo, depth: int, width: int, identity_val: float, hidden: int) -> nn.Sequential:
    """``depth − 2`` distance layers (all mean-shifted) and a two-layer tanh MLP head (spec §2.5)."""
    if depth < 3:
        raise ValueError("the hybrid ℓ∞-dist+MLP net needs depth ≥ 3")
    n_in = info.input_shape[0] * info.input_shape[1] * info.input_shape[2]
    return nn.Sequential(*_stem(info), *_dist_stack(n_in, width, depth - 2, identity_val),
                         ScaledLinear(width, hidden), Tanh(), ScaledLinear(hidden, info.num_classes))


def propagate_interval(modules: nn.Sequential, lower: torch.Tensor, upper: torch.Tensor
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    for module in modules:
        lower, upper = module.interval(lower, upper)
    return lower, upper


def head_worst_differences(head: nn.Sequential, lower: torch.Tensor, upper: torch.Tensor, y: torch.Tensor
                           ) -> torch.Tensor:
    """R (B, K): R_j ≥ max over the feature box of z_j − z_y, R_y = 0, for the hybrid's MLP head.

    Interval arithmetic through ``head[:-1]``, then the last layer is merged with the difference
    e_j − e_y (elision): R_j = ΔW_j·c + |ΔW_j|·r + Δb_j, tighter than subtracting logit intervals.
    """
    lower, upper = propagate_interval(head[:-1], lower, upper)
    last = head[-1]
    w = last.effective_weight()
    dw = w[None, :, :] - w[y][:, None, :]
    db = last.bias[None, :] - last.bias[y][:, None]
    centre, radius = (upper + lower) / 2, (upper - lower) / 2
    r = torch.einsum("bkh,bh->bk", dw, centre) + torch.einsum("bkh,bh->bk", dw.abs(), radius) + db
    return r.scatter(1, y[:, None], 0.0)
