"""The typed configuration shared by the IBP-family methods, read from a flat suite-file dict."""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction
from typing import Any, Literal, Mapping

from methods.base import MethodError
from methods.bounds import BOUND_METHODS
from methods.cnn import architecture
from methods.schema import parse_config, require


@dataclass(frozen=True)
class TrainConfig:
    """Hyper-parameters of one run; epochs are 0-indexed throughout.

    ε_train is ``eps_train`` (pixels; a number or an exact fraction string such as "2/5", the key the
    harness records) if given, else ε_test. κ weights the clean loss and β the CROWN-IBP bound, each
    moving from its start to its end value as ε ramps (``mixing``). ``reg_lambda`` > 0 turns on Shi et al.'s
    warm-up regularisers until the ramp ends; ``grad_clip`` > 0 clips the gradient norm. ``batch_multiplier``
    m > 1 is CROWN-IBP's large-batch option as its ``train.py`` runs it (see ``BoundTrainingRecipe``).
    """

    architecture: str
    batch_size: int
    epochs: int
    lr: float
    schedule: Literal["linear", "smoothed"]
    ramp_start: int
    ramp_epochs: int
    width: int | None = None
    linear_size: int | None = None
    batch_multiplier: int = 1
    lr_decay: float = 0.1
    lr_milestones: tuple[int, ...] = ()
    weight_decay: float = 0.0
    eps_train: str | float | None = None
    kappa_start: float = 0.0
    kappa_end: float = 0.0
    beta_start: float = 0.0
    beta_end: float = 0.0
    grad_clip: float = 0.0
    ibp_init: bool = False
    reg_lambda: float = 0.0
    reg_tolerance: float = 0.5
    reg_min_eps: float = 1e-6
    crop_padding: int = 0
    padding_mode: Literal["zeros", "edge"] = "zeros"
    hflip: bool = False
    certifier: str | None = None

    @classmethod
    def from_dict(cls, cfg: Mapping[str, Any], owner: str) -> TrainConfig:
        out = parse_config(cls, cfg, owner)
        out._check(owner)
        return out

    def _check(self, owner: str) -> None:
        require(self.batch_size > 0 and self.epochs > 0, owner, "batch_size and epochs must be positive")
        require(self.batch_multiplier >= 1, owner, "batch_multiplier must be ≥ 1")
        require(self.ramp_start >= 0 and self.ramp_epochs >= 0, owner, "ramp_start and ramp_epochs must be ≥ 0")
        for key in ("kappa_start", "kappa_end", "beta_start", "beta_end"):
            require(0.0 <= getattr(self, key) <= 1.0, owner, f"{key} must lie in [0, 1]")
        require(all(m >= 0 for m in self.lr_milestones), owner, "lr_milestones must be epoch indices ≥ 0")
        require(self.certifier is None or self.certifier in BOUND_METHODS, owner,
                f"certifier must be one of {', '.join(BOUND_METHODS)}, got {self.certifier!r}")
        architecture(self.architecture, self.width, self.linear_size)
        if self.eps_train is not None:
            self.eps_train_value(0.0)

    def eps_train_value(self, eps_test: float) -> float:
        """ε_train in pixels for test radius ``eps_test``."""
        if self.eps_train is None:
            return eps_test
        try:
            value = float(Fraction(str(self.eps_train)))
        except (ValueError, ZeroDivisionError):
            raise MethodError(f"eps_train must be a number or a fraction like '2/5', got {self.eps_train!r}") from None
        if value <= 0:
            raise MethodError("eps_train must be positive")
        return value

