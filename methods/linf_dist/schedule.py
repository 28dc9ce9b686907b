"""Per-batch schedules of the ℓ∞-dist recipes (spec §4.1-4.5), as pure functions of (epoch, batch).

All schedules are evaluated at every batch before the forward pass. With ``nb`` batches per epoch,
``ratio(e, k; a, c) = clip(((e − a)·nb + k) / ((c − a)·nb), 0, 1)`` (1 when c ≤ a).

Phases (v2 code, paper Table 3): p = 8 for epochs [0, p_start), exponential growth 8 → p_end over
[p_start, p_stop), then p = ∞ from the first batch of epoch p_stop. λ decays on the same ratio from λ0
to λ_end and **stays at λ_end** in the p = ∞ phase (the paper says 0; the code and logs say λ_end).
The lr follows a cosine from ``lr_start_epoch`` to the end of the run for every parameter group and is
constant before it: 0 in v2 (cosine over the whole run), ``p_start_epoch`` in v1 (``main.py`` there
holds the lr until the p ramp begins).
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Schedule:
    """Epoch boundaries of one run (spec's 5-tuple ``eps_start, eps_end, p_start, p_stop, total``)."""

    batches_per_epoch: int
    total_epochs: int
    p_start_epoch: int
    p_stop_epoch: int
    eps_start_epoch: int = 0
    eps_end_epoch: int = 0
    p_begin: float = 8.0
    p_end: float = 1000.0
    lr_start_epoch: int = 0

    def ratio(self, epoch: int, batch: int, start: int, stop: int) -> float:
        if stop <= start:
            return 1.0
        done = (epoch - start) * self.batches_per_epoch + batch
        return min(max(done / ((stop - start) * self.batches_per_epoch), 0.0), 1.0)

    def p(self, epoch: int, batch: int) -> float:
        r = self.ratio(epoch, batch, self.p_start_epoch, self.p_stop_epoch)
        if r >= 1.0:
            return math.inf
        return self.p_begin * math.exp(r * math.log(self.p_end / self.p_begin))

    def lam(self, epoch: int, batch: int, lam0: float, lam_end: float) -> float:
        r = self.ratio(epoch, batch, self.p_start_epoch, self.p_stop_epoch)
        return lam0 * math.exp(r * math.log(lam_end / lam0))

    def lr_factor(self, epoch: int, batch: int) -> float:
        r = self.ratio(epoch, batch, self.lr_start_epoch, self.total_epochs)
        return 0.5 * (1.0 + math.cos(math.pi * r))

    def eps_factor(self, epoch: int, batch: int) -> float:
        """Linear ε ramp (v2 ``eps_smooth = 0``); 1 from the start when eps_end_epoch ≤ eps_start_epoch."""
        return self.ratio(epoch, batch, self.eps_start_epoch, self.eps_end_epoch)
