"""Losses of bound-based certified training: the robust cross-entropy and Shi et al.'s warm-up regularisers."""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from methods.bounds.layers import Box
from methods.parallel import global_mean, global_sum


def robust_ce(margin_lower: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of log(1 + Σ_j exp(−m̲_j)) for margin lower bounds m̲ (B, K−1).

    Equals the cross-entropy of the worst-case logits (0 for the true class, −m̲_j for the others) with
    the true label (spec §3), written as FAST does: a 0 column in front and label 0.
    """
    padded = torch.cat([margin_lower.new_zeros(margin_lower.shape[0], 1), -margin_lower], dim=1)
    return torch.logsumexp(padded, dim=1).mean()


def warmup_regularisers(input_box: Box, relu_inputs: Sequence[Box], tolerance: float) -> torch.Tensor:
    """Shi et al. 2021's L_tight + L_relu (current FAST code; the camera-ready's L_std is left out).

    ``input_box``: the IBP box of the (normalised) input; ``relu_inputs``: IBP boxes of every ReLU input
    (after BatchNorm). L_tight penalises layers whose mean radius exceeds the input's by more than 1/τ;
    L_relu penalises imbalance between active and inactive neurons (mean and variance ratios of the box
    centres), each term skipped when not finite, both averaged over ReLU layers. Returns a scalar.
    """
    lower0, upper0 = input_box
    radius0 = global_mean((upper0 - lower0) / 2)
    tight = radius0.new_zeros(())
    relu = radius0.new_zeros(())
    for lower, upper in relu_inputs:
        centre, radius = (upper + lower) / 2, (upper - lower) / 2
        tight = tight + F.relu(tolerance - radius0 / global_mean(radius).clamp(min=1e-12)) / tolerance
        active, inactive = (lower > 0).to(centre.dtype), (upper < 0).to(centre.dtype)
        mean_ratio = global_mean(centre * active) / -global_mean(centre * inactive)
        spread = (centre - global_mean(centre)) ** 2
        var_ratio = global_sum(spread * active) / global_sum(spread * inactive)
        mean_ratio = torch.min(mean_ratio, 1 / mean_ratio.clamp(min=1e-12))
        var_ratio = torch.min(var_ratio, 1 / var_ratio.clamp(min=1e-12))
        term = (F.relu(tolerance - mean_ratio) + F.relu(tolerance - var_ratio)) / tolerance
        if torch.isfinite(term):
            relu = relu + term
    count = max(1, len(relu_inputs))
    return (tight + relu) / count
