"""Losses of the ℓ∞-dist recipes (spec §4.7-4.8), on class scores z (B, K) = negated distances.

Training treats the net as 1-Lipschitz in normalised ℓ∞ (even at p = ∞, no bound propagation): under a
perturbation of size ε every score moves by at most ε, so the worst-case score difference is
``M_j = z_j − z_y + 2ε`` (j ≠ y). The v2 code divides by 2ε: ``M̃_j = 1 − (z_y − z_j)/(2ε)``, so the hinge
threshold on the margin is θ = 2·ε_train. (Paper eq. 7 writes ℓ(g/(2θ)), a factor-2 slip; the code wins.)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def normalised_worst_margins(z: torch.Tensor, y: torch.Tensor, eps: float) -> torch.Tensor:
    """M̃ (B, K) with the target column exactly 0; ``eps`` in normalised units, > 0."""
    zy = z.gather(1, y[:, None])
    m = (z - zy + 2.0 * eps) / (2.0 * eps)
    return m.scatter(1, y[:, None], 0.0)


def worst_violation(m: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """max_{j≠y} m_j per sample, for worst-case score differences m (B, K): negative ⇔ the training bound
    certifies the sample (the v2 logs' "certified (fake)": current p, batch-mean shift, ε_train)."""
    return m.scatter(1, y[:, None], float("-inf")).amax(dim=1)


def clipped_hinge(z: torch.Tensor, y: torch.Tensor, eps: float) -> torch.Tensor:
    """mean_b clip(max_j M̃_j, 0, 1) = mean_b min(max(0, 1 − margin/θ), 1): only samples with
    0 < margin < θ get a gradient; misclassified ones count 1 (spec §4.8 ``mixture``)."""
    return normalised_worst_margins(z, y, eps).amax(dim=1).clamp(0.0, 1.0).mean()


def hybrid_loss(z: torch.Tensor, logits: torch.Tensor, y: torch.Tensor, eps: float, lam: float) -> torch.Tensor:
    """The 2022 objective: clipped hinge + λ · CE(s·z). The temperature s only enters the CE term."""
    return clipped_hinge(z, y, eps) + lam * F.cross_entropy(logits, y)


def hinge_loss(z: torch.Tensor, y: torch.Tensor, eps: float, mix: float) -> torch.Tensor:
    """The 2021 objective in v2 form: (1 − mix)·mean max_j relu(M̃_j) + mix·mean mean_j relu(M̃_j), the
    average running over all K columns including the zero target one. v2's mix = 0.25 equals v1's 0.75
    (the name's meaning is reversed between the codes, spec §4.8). v1 (``main.py``, ``hinge``) takes the
    hinge of the margins before the division by 2ε, i.e. 2ε times this loss: with ε_train constant, as in
    v1's hinge scripts, that scales every gradient alike, which Adam's step ignores (up to its ε = 1e-10)
    and v1's decoupled weight decay never sees."""
    h = normalised_worst_margins(z, y, eps).clamp_min(0.0)
    return (1.0 - mix) * h.amax(dim=1).mean() + mix * h.mean()


def worst_case_cross_entropy(r: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """CE on R (B, K), R_j an upper bound of z_j − z_y with R_y = 0: log(1 + Σ_{j≠y} exp R_j)."""
    return F.cross_entropy(r, y)
