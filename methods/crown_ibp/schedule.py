"""Schedules of bound-based certified training, as pure functions of the global step or the epoch.

The harness resumes a run at any (epoch, batch), so nothing here has state: ε is a function of the global
step s = epoch · batches_per_epoch + batch (0-indexed), the learning rate a function of the epoch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence


@dataclass(frozen=True)
class EpsSchedule:
    """ε(s): 0 for s ≤ s0, ramp to ``eps_max`` over (s0, s1], ``eps_max`` after (spec §4.1).

    ``kind`` "linear" ramps linearly; "smoothed" (DeepMind's IBP code, CROWN-IBP's CIFAR configs, Shi et
    al. via auto_LiRPA) grows as α(s − s0)^4 up to s0 + ⌊(s1 − s0)/4⌋ and then linearly with matching slope.
    s0 = ramp_start · E and s1 = (ramp_start + ramp_epochs) · E for E batches per epoch and 0-indexed
    epochs: CROWN-IBP's ``schedule_start = a, schedule_length = b`` is ramp_start a, ramp_epochs b − 1;
    auto_LiRPA's ``start = a, length = b`` (1-indexed epochs) is ramp_start a − 1, ramp_epochs b.
    """

    eps_max: float
    kind: str
    ramp_start: int
    ramp_epochs: int
    batches_per_epoch: int

    def __call__(self, epoch: int, batch: int) -> float:
        s = epoch * self.batches_per_epoch + batch
        s0 = self.ramp_start * self.batches_per_epoch
        s1 = (self.ramp_start + self.ramp_epochs) * self.batches_per_epoch
        if s <= s0:
            return 0.0
        if s >= s1:
            return self.eps_max
        mid = s0 + int(0.25 * (s1 - s0))
        if self.kind == "linear" or mid == s0:
            return self.eps_max * (s - s0) / (s1 - s0)
        alpha = self.eps_max / ((s1 - mid) * 4 * (mid - s0) ** 3 + (mid - s0) ** 4)
        if s < mid:
            return alpha * (s - s0) ** 4
        at_mid = alpha * (mid - s0) ** 4
        return min(self.eps_max, at_mid + (self.eps_max - at_mid) * (s - mid) / (s1 - mid))

    def ramp_done(self, epoch: int) -> bool:
        """True from the first epoch after the ramp (ε = eps_max for the whole epoch)."""
        return epoch >= self.ramp_start + self.ramp_epochs


def mixing(start: float, end: float, eps: float, eps_max: float) -> float:
    """CROWN-IBP's κ and β follow the *current ε*, not the step: start + (end − start)·ε/ε_max (spec §4.1)."""
    return start + (end - start) * (eps / eps_max if eps_max > 0 else 1.0)


def step_lr(lr: float, decay: float, milestones: Sequence[int], epoch: int) -> float:
    """Multi-step decay: epochs ≥ m (0-indexed) use lr · decay^(number of such milestones m)."""
    return lr * decay ** sum(epoch >= m for m in milestones)
