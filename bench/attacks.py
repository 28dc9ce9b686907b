"""Attacks in pixel space: PGD (ℓ∞) and a random-sampling falsifier.

Both work on any model mapping pixels in [0, 1] (B, C, H, W) to logits, and only ever evaluate points of
the ε box intersected with [0, 1]. A point counts as broken when ANY evaluated point is misclassified:
that is at least as strong as the usual final-iterate protocol, so PGD accuracy is never flattered.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _project(x: torch.Tensor, x0: torch.Tensor, eps: float) -> torch.Tensor:
    return torch.minimum(torch.maximum(x, x0 - eps), x0 + eps).clamp_(0.0, 1.0)


def pgd_robust(model: nn.Module, x0: torch.Tensor, y: torch.Tensor, eps: float, steps: int,
               restarts: int = 1, step_size: float | None = None, generator: torch.Generator | None = None
               ) -> torch.Tensor:
    """(B,) bool: still correctly classified after every restart of untargeted cross-entropy PGD.

    Protocol of the ℓ∞-dist v2 code (spec §5.4): step ε/4, random start δ ~ N(0, (ε/4)²) clipped to ±ε/2,
    sign-gradient steps, projection onto the ε box and [0, 1]. The model's parameters get no gradient.
    """
    alpha = eps / 4 if step_size is None else step_size
    robust = torch.ones_like(y, dtype=torch.bool)
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        for _ in range(restarts):
            noise = torch.randn(x0.shape, generator=generator, device=x0.device if generator is None else "cpu")
            delta = (noise.to(x0.device) * (eps / 4)).clamp_(-eps / 2, eps / 2)
            x = _project(x0 + delta, x0, eps)
            for _ in range(steps):
                x.requires_grad_(True)
                logits = model(x)
                robust &= logits.argmax(dim=1) == y
                loss = F.cross_entropy(logits, y, reduction="sum")
                (grad,) = torch.autograd.grad(loss, x)
                x = _project(x.detach() + alpha * grad.sign(), x0, eps)
            with torch.no_grad():
                robust &= model(x).argmax(dim=1) == y
    finally:
        for p in params:
            p.requires_grad_(True)
    return robust


@torch.no_grad()
def random_robust(model: nn.Module, x0: torch.Tensor, y: torch.Tensor, eps: float, samples: int,
                  generator: torch.Generator | None = None, chunk: int = 100) -> torch.Tensor:
    """(B,) bool: correctly classified at ``samples`` uniform points of the clipped ε box (half of them at
    box corners, where piecewise-linear and max-based models attain their extremes)."""
    robust = torch.ones_like(y, dtype=torch.bool)
    for start in range(0, samples, chunk):
        n = min(chunk, samples - start)
        shape = (n,) + tuple(x0.shape)
        u = torch.rand(shape, generator=generator)
        if start % (2 * chunk) == chunk:
            u = u.round()
        x = _project(x0[None] + (2 * u.to(x0.device) - 1) * eps, x0[None], eps)
        preds = model(x.reshape(-1, *x0.shape[1:])).argmax(dim=1).reshape(n, -1)
        robust &= (preds == y[None]).all(dim=0)
    return robust
