"""Attacks in pixel space: PGD (ℓ∞), APGD with cross-entropy and targeted DLR losses, and a random-sampling
falsifier.

All work on any model mapping pixels in [0, 1] (B, C, H, W) to logits, and only ever evaluate points of
the ε box intersected with [0, 1]. A point counts as broken when ANY evaluated point is misclassified:
that is at least as strong as the usual final-iterate protocol, so attack accuracy is never flattered.

APGD is implemented here rather than taken from ``torchattacks``: torchattacks 3.5.1 pins
``requests~=2.25.1`` (a 2020 release) and pulls in scipy, and it reports only final iterates.
``tests/test_attacks.py`` compares ours with torchattacks' APGD where that package is installed.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

Loss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""(logits (B, K), labels (B,)) -> (B,) per-sample loss that an attack maximises."""


def project(x: torch.Tensor, x0: torch.Tensor, eps: float) -> torch.Tensor:
    """``x`` clipped onto the ε box around ``x0`` intersected with [0, 1]."""
    return torch.minimum(torch.maximum(x, x0 - eps), x0 + eps).clamp_(0.0, 1.0)


def cross_entropy(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits, y, reduction="none")


def margin(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """max_{i≠y} z_i − z_y: positive exactly where the point is misclassified. Unlike cross-entropy it does
    not saturate on confident points, which is where a wrongly certified point would hide."""
    true = logits.gather(1, y[:, None])
    others = logits.scatter(1, y[:, None], -torch.inf)
    return others.amax(dim=1) - true[:, 0]


def dlr_targeted(target: torch.Tensor) -> Loss:
    """The targeted difference-of-logits-ratio loss of Croce & Hein (ICML 2020) towards ``target`` (B,):
    −(z_y − z_t) / (z_π1 − (z_π3 + z_π4) / 2), invariant to shifts and scalings of the logits."""
    def loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        ranked = logits.sort(dim=1, descending=True).values
        scale = ranked[:, 0] - 0.5 * (ranked[:, 2] + ranked[:, 3]) + 1e-12
        return -(logits.gather(1, y[:, None]) - logits.gather(1, target[:, None]))[:, 0] / scale
    return loss


LOSSES: dict[str, Loss] = {"cross-entropy": cross_entropy, "margin": margin}


@contextmanager
def _inputs_only(model: nn.Module) -> Iterator[None]:
    """Gradients flow to the input only: the model's parameters are frozen for the attack's duration."""
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)


def _loss_and_grad(model: nn.Module, x: torch.Tensor, y: torch.Tensor, loss: Loss
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(correct (B,) bool, per-sample loss (B,), input gradient) at ``x``."""
    x = x.detach().requires_grad_(True)
    logits = model(x)
    values = loss(logits, y)
    (grad,) = torch.autograd.grad(values.sum(), x)
    return logits.argmax(dim=1) == y, values.detach(), grad


class PointStreams:
    """One random stream per test point, seeded by (seed, purpose, test index): a point's random starts do not
    depend on which other points share its batch, so a test range evaluated in slices (several ranks, or
    ``--eval-shards``) gets exactly the verdicts of one pass. Indexing selects the streams of a subset."""

    def __init__(self, generators: list[torch.Generator]):
        self.generators = generators

    @classmethod
    def of(cls, seed: int, purpose: int, index: torch.Tensor) -> PointStreams:
        return cls([torch.Generator().manual_seed(((seed * 1_000_003 + i) * 8 + purpose) % 2**63)
                    for i in index.tolist()])

    def __getitem__(self, select: torch.Tensor) -> PointStreams:
        rows = select.nonzero()[:, 0] if select.dtype == torch.bool else select
        return PointStreams([self.generators[i] for i in rows.tolist()])

    def draw(self, shape: torch.Size, normal: bool) -> torch.Tensor:
        if len(self.generators) != shape[0]:
            raise ValueError(f"{len(self.generators)} streams for a batch of {shape[0]}")
        fn = torch.randn if normal else torch.rand
        return torch.stack([fn(shape[1:], generator=g) for g in self.generators]) if self.generators \
            else torch.empty(shape)


Rng = torch.Generator | PointStreams | None


def _rand(shape: torch.Size, generator: Rng, device: torch.device, normal: bool) -> torch.Tensor:
    # Draw on the CPU so that a seed gives the same start on any device.
    if isinstance(generator, PointStreams):
        return generator.draw(shape, normal).to(device)
    where = "cpu" if generator is None else generator.device
    draw = torch.randn if normal else torch.rand
    return draw(shape, generator=generator, device=where).to(device)


def _subset(generator: Rng, select: torch.Tensor) -> Rng:
    return generator[select] if isinstance(generator, PointStreams) else generator


def pgd_robust(model: nn.Module, x0: torch.Tensor, y: torch.Tensor, eps: float, steps: int,
               restarts: int = 1, step_size: float | None = None, generator: Rng = None,
               loss: str = "cross-entropy") -> torch.Tensor:
    """(B,) bool: still correctly classified at every iterate of every restart of untargeted PGD.

    Protocol of the ℓ∞-dist v2 code (spec §5.4): step ε/4, random start δ ~ N(0, (ε/4)²) clipped to ±ε/2,
    sign-gradient steps, projection onto the ε box and [0, 1]. ``loss`` names an entry of ``LOSSES``.
    """
    alpha = eps / 4 if step_size is None else step_size
    loss_fn = LOSSES[loss]
    robust = torch.ones_like(y, dtype=torch.bool)
    with _inputs_only(model):
        for _ in range(restarts):
            noise = _rand(x0.shape, generator, x0.device, normal=True)
            x = project(x0 + (noise * (eps / 4)).clamp_(-eps / 2, eps / 2), x0, eps)
            for _ in range(steps):
                correct, _, grad = _loss_and_grad(model, x, y, loss_fn)
                robust &= correct
                x = project(x + alpha * grad.sign(), x0, eps)
            with torch.no_grad():
                robust &= model(x).argmax(dim=1) == y
    return robust


def _apgd_checkpoints(steps: int) -> list[int]:
    """Iterations after which APGD may halve its step: p₀ = 0, p₁ = 0.22, p_{j+1} = p_j + max(p_j − p_{j−1}
    − 0.03, 0.06), as fractions of ``steps`` (Croce & Hein 2020, §3.2)."""
    fractions = [0.0, 0.22]
    while fractions[-1] < 1.0:
        fractions.append(fractions[-1] + max(fractions[-1] - fractions[-2] - 0.03, 0.06))
    marks = sorted({max(1, round(f * steps)) for f in fractions[1:] if f < 1.0})
    return [m for m in marks if m < steps]


def apgd_robust(model: nn.Module, x0: torch.Tensor, y: torch.Tensor, eps: float, steps: int, loss: Loss,
                generator: Rng = None, rho: float = 0.75) -> torch.Tensor:
    """(B,) bool: correctly classified at every iterate of one run of ℓ∞ APGD (Croce & Hein 2020).

    Step size 2ε halved per sample at each checkpoint where the loss rose in at most a fraction ``rho`` of the
    steps since the last one, or where neither the step nor the best loss changed since; a halving restarts
    from the best point. Steps use momentum 0.75 and start from a random point on the ε box's surface.
    """
    b = x0.shape[0]
    view = (b,) + (1,) * (x0.dim() - 1)
    t = 2 * _rand(x0.shape, generator, x0.device, normal=False) - 1
    x = project(x0 + eps * t / t.reshape(b, -1).abs().amax(dim=1).clamp_min(1e-12).reshape(view), x0, eps)
    step = torch.full(view, 2.0 * eps, device=x0.device)
    with _inputs_only(model):
        robust, value, grad = _loss_and_grad(model, x, y, loss)
        best_x, best_value, best_grad = x.clone(), value.clone(), grad.clone()
        history = [value]
        checkpoints, last_check = _apgd_checkpoints(steps), 0
        best_at_check, halved_at_check = best_value.clone(), torch.ones(b, dtype=torch.bool, device=x0.device)
        x_prev = x
        for i in range(steps):
            with torch.no_grad():
                z = project(x + step * grad.sign(), x0, eps)
                a = 1.0 if i == 0 else 0.75
                x, x_prev = project(x + a * (z - x) + (1 - a) * (x - x_prev), x0, eps), x
            correct, value, grad = _loss_and_grad(model, x, y, loss)
            robust &= correct
            history.append(value)
            better = value > best_value
            best_x[better], best_value[better], best_grad[better] = x[better], value[better], grad[better]
            if i + 1 in checkpoints:
                since = torch.stack(history[last_check:])
                rises = (since[1:] > since[:-1]).sum(dim=0)
                halve = (rises <= rho * (i + 1 - last_check)) | (~halved_at_check & (best_value <= best_at_check))
                step[halve] /= 2
                back = halve.reshape(view)
                x, grad = torch.where(back, best_x, x), torch.where(back, best_grad, grad)
                x_prev = torch.where(back, x, x_prev)
                halved_at_check, best_at_check, last_check = halve, best_value.clone(), i + 1
    return robust


APGD_CE = "apgd-ce"
APGD_T = "apgd-t"


@dataclass(frozen=True)
class EnsembleOutcome:
    robust: torch.Tensor
    """(B,) bool: survived every attack of the ensemble."""
    broken_by: list[str]
    """Per sample, the first attack that broke it (``APGD_CE`` or ``APGD_T``), "" where none did."""


def apgd_ensemble(model: nn.Module, x0: torch.Tensor, y: torch.Tensor, eps: float, steps: int = 100,
                  targets: int = 9, generator: Rng = None) -> EnsembleOutcome:
    """AutoAttack's standard gradient pair: APGD-CE, then APGD-T with the targeted DLR loss towards each of
    the ``targets`` classes the clean point ranks highest after its label, each on the points still robust.

    Targets beyond K − 1 are dropped; the targeted DLR loss needs K ≥ 4 classes.
    """
    broken_by = [""] * x0.shape[0]
    robust = apgd_robust(model, x0, y, eps, steps, cross_entropy, generator)
    for i in (~robust).nonzero()[:, 0].tolist():
        broken_by[i] = APGD_CE
    with torch.no_grad():
        ranked = model(x0).argsort(dim=1, descending=True)
    for rank in range(1, min(targets, ranked.shape[1] - 1) + 1):
        alive = robust.nonzero()[:, 0]
        if alive.numel() == 0:
            break
        survived = apgd_robust(model, x0[alive], y[alive], eps, steps, dlr_targeted(ranked[alive, rank]),
                               _subset(generator, alive))
        for i in alive[~survived].tolist():
            broken_by[i] = APGD_T
        robust[alive] = survived
    return EnsembleOutcome(robust, broken_by)


@torch.no_grad()
def random_robust(model: nn.Module, x0: torch.Tensor, y: torch.Tensor, eps: float, samples: int,
                  generator: torch.Generator | None = None, chunk: int = 100) -> torch.Tensor:
    """(B,) bool: correctly classified at ``samples`` uniform points of the clipped ε box (half of them at
    box corners, where piecewise-linear and max-based models attain their extremes)."""
    robust = torch.ones_like(y, dtype=torch.bool)
    for start in range(0, samples, chunk):
        n = min(chunk, samples - start)
        shape = (n,) + tuple(x0.shape)
        u = _rand(torch.Size(shape), generator, x0.device, normal=False)
        if start % (2 * chunk) == chunk:
            u = u.round()
        x = project(x0[None] + (2 * u - 1) * eps, x0[None], eps)
        preds = model(x.reshape(-1, *x0.shape[1:])).argmax(dim=1).reshape(n, -1)
        robust &= (preds == y[None]).all(dim=0)
    return robust
