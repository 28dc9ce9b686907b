"""The typed configuration shared by the IBP-family methods, read from a flat suite-file dict."""

from __future__ import annotations

from dataclasses import MISSING, dataclass, fields
from fractions import Fraction
from typing import Any, Mapping

from methods.base import MethodError
from methods.bounds import BOUND_METHODS
from methods.cnn import architecture


@dataclass(frozen=True)
class TrainConfig:
    """Hyper-parameters of one run; epochs are 0-indexed throughout.

    ε_train is ``eps_train`` (pixels; a number or an exact fraction string such as "2/5", the key the
    harness records) if given, else ε_test. κ weights the clean loss and β the CROWN-IBP bound, each
    moving from its start to its end value as ε ramps (``mixing``). ``reg_lambda`` > 0 turns on Shi et al.'s
    warm-up regularisers until the ramp ends; ``grad_clip`` > 0 clips the gradient norm.
    """

    architecture: str
    batch_size: int
    epochs: int
    lr: float
    schedule: str
    ramp_start: int
    ramp_epochs: int
    width: int | None = None
    linear_size: int | None = None
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
    padding_mode: str = "zeros"
    hflip: bool = False
    certifier: str | None = None

    @classmethod
    def from_dict(cls, cfg: Mapping[str, Any]) -> TrainConfig:
        known = {f.name: f for f in fields(cls)}
        unknown = sorted(set(cfg) - set(known))
        if unknown:
            raise MethodError(f"unknown config keys: {', '.join(unknown)}")
        missing = sorted(k for k, f in known.items() if f.default is MISSING and k not in cfg)
        if missing:
            raise MethodError(f"missing config keys: {', '.join(missing)}")
        values = dict(cfg)
        if "lr_milestones" in values:
            values["lr_milestones"] = tuple(values["lr_milestones"])
        out = cls(**values)
        out._check()
        return out

    def _check(self) -> None:
        _typed(self, "batch_size", int, positive=True)
        _typed(self, "epochs", int, positive=True)
        _typed(self, "ramp_start", int)
        _typed(self, "ramp_epochs", int)
        for key in ("lr", "lr_decay", "weight_decay", "kappa_start", "kappa_end",
                    "beta_start", "beta_end", "grad_clip", "reg_lambda", "reg_tolerance", "reg_min_eps"):
            _typed(self, key, (int, float))
        if self.ramp_start < 0 or self.ramp_epochs < 0:
            raise MethodError("ramp_start and ramp_epochs must be ≥ 0")
        if self.schedule not in ("linear", "smoothed"):
            raise MethodError(f"schedule must be 'linear' or 'smoothed', got {self.schedule!r}")
        for key in ("kappa_start", "kappa_end", "beta_start", "beta_end"):
            if not 0.0 <= getattr(self, key) <= 1.0:
                raise MethodError(f"{key} must lie in [0, 1]")
        if not all(isinstance(m, int) and m >= 0 for m in self.lr_milestones):
            raise MethodError("lr_milestones must be a list of epoch indices ≥ 0")
        if self.padding_mode not in ("zeros", "edge"):
            raise MethodError(f"padding_mode must be 'zeros' or 'edge', got {self.padding_mode!r}")
        if self.certifier is not None and self.certifier not in BOUND_METHODS:
            raise MethodError(f"certifier must be one of {', '.join(BOUND_METHODS)}, got {self.certifier!r}")
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


def _typed(cfg: TrainConfig, key: str, kind: type | tuple[type, ...], positive: bool = False) -> None:
    value = getattr(cfg, key)
    if isinstance(value, bool) or not isinstance(value, kind) or (positive and value <= 0):
        raise MethodError(f"config key {key} must be {'a positive ' if positive else ''}number, got {value!r}")
