"""Input normalisation as the first layer of every model, so models take pixel-space inputs."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn


class Normalize(nn.Module):
    """(x − mean_c) / std_c for x (B, C, H, W) in pixel space; ``std`` may be one scalar for all channels.

    A scalar std keeps a pixel ℓ∞ ball an ℓ∞ ball (radius ε/std) in normalised space, which the
    ℓ∞-dist net's Lipschitz argument needs; per-channel std turns it into a box with per-channel radii.
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float] | float):
        super().__init__()
        channels = len(mean)
        stds = [float(std)] * channels if isinstance(std, (int, float)) else [float(s) for s in std]
        if len(stds) != channels or min(stds) <= 0:
            raise ValueError("std must be positive, one per channel or a scalar")
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, channels, 1, 1))
        self.register_buffer("std", torch.tensor(stds, dtype=torch.float32).view(1, channels, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std

    def interval(self, lower: torch.Tensor, upper: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Exact: the map is increasing in every coordinate because std > 0."""
        return self(lower), self(upper)
