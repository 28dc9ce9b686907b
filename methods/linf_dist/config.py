"""The config schemas of the three ℓ∞-dist recipes (keys of ``bench/suites/<suite>/linf-dist*.toml``).

Epochs are 0-indexed boundaries of the p ramp (``p_start_epoch`` ≤ ``p_stop_epoch`` ≤ ``epochs``) and of
the ε ramp; ``eps_train`` is in pixels, a number or an exact fraction string such as "24/255".
"""

from __future__ import annotations

from dataclasses import dataclass, field
from fractions import Fraction
from typing import ClassVar, Literal

from methods.schema import require


@dataclass(frozen=True)
class LinfDistConfig:
    margin_loss: ClassVar[bool] = False
    """True where the loss divides the margins by 2ε (θ = 2ε): then ε must be positive from the first step."""

    depth: int
    width: int
    identity_val: float
    batch_size: int
    lr: float
    betas: tuple[float, ...]
    adam_eps: float
    epochs: int
    p_start_epoch: int
    p_stop_epoch: int
    p_begin: float
    p_end: float
    eps_start_epoch: int
    eps_end_epoch: int
    eps_train: str | float
    # The 2021 (v1) training; the defaults are v2's. Keyword-only so that recipes may add required keys.
    weight_decay: float = field(default=0.0, kw_only=True)
    """v1's decoupled ℓp weight decay (``methods.linf_dist.optim``); 0 = none."""
    lr_schedule: Literal["cosine", "constant-then-cosine"] = field(default="cosine", kw_only=True)
    """Cosine over the whole run (v2), or constant until ``p_start_epoch`` and cosine after it (v1)."""
    crop_padding: int | None = field(default=None, kw_only=True)
    padding_mode: Literal["zeros", "edge"] | None = field(default=None, kw_only=True)
    hflip: bool | None = field(default=None, kw_only=True)
    """Random-crop padding, its fill and the flip; each ``None`` keeps the v2 code's choice for the dataset."""

    def check(self, owner: str) -> None:
        require(self.weight_decay >= 0, owner, "weight_decay must be ≥ 0")
        require(self.crop_padding is None or self.crop_padding >= 0, owner, "crop_padding must be ≥ 0")
        require(self.depth > 0 and self.width > 0 and self.batch_size > 0 and self.epochs > 0, owner,
                "depth, width, batch_size and epochs must be positive")
        require(0 <= self.p_start_epoch <= self.p_stop_epoch <= self.epochs, owner,
                "need 0 ≤ p_start_epoch ≤ p_stop_epoch ≤ epochs")
        require(0 <= self.eps_start_epoch <= self.eps_end_epoch <= self.epochs, owner,
                "need 0 ≤ eps_start_epoch ≤ eps_end_epoch ≤ epochs")
        require(not self.margin_loss or self.eps_end_epoch == self.eps_start_epoch, owner,
                "no ε ramp for this loss: it divides the margins by 2ε, which a ramp starts at 0 "
                "(set eps_end_epoch = eps_start_epoch)")
        require(1 <= self.p_begin <= self.p_end, owner, "need 1 ≤ p_begin ≤ p_end")
        require(self.lr > 0 and self.adam_eps > 0, owner, "lr and adam_eps must be positive")
        require(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), owner,
                "betas must be two numbers in [0, 1)")
        try:
            eps_train = Fraction(str(self.eps_train))
        except (ValueError, ZeroDivisionError):
            eps_train = Fraction(-1)
        require(eps_train > 0, owner, f"eps_train must be a positive number or fraction, got {self.eps_train!r}")


@dataclass(frozen=True)
class HybridConfig(LinfDistConfig):
    """The 2022 clipped hinge + scaled cross-entropy: λ decays from ``lam0`` to ``lam_end``."""

    margin_loss: ClassVar[bool] = True

    learnable_scale: bool
    scalar_lr: float
    lam0: float
    lam_end: float


@dataclass(frozen=True)
class HingeConfig(LinfDistConfig):
    """The 2021 hinge loss, mixed with cross-entropy by ``hinge_mix``."""

    margin_loss: ClassVar[bool] = True

    hinge_mix: float
    learnable_scale: bool = False


@dataclass(frozen=True)
class MLPConfig(LinfDistConfig):
    """ℓ∞-dist features + a ``hidden``-wide tanh MLP head; ``clean_ce_mix`` weights the clean CE."""

    hidden: int
    clean_ce_mix: float

    def check(self, owner: str) -> None:
        super().check(owner)
        require(self.hidden > 0, owner, "hidden must be positive")
        require(0 <= self.clean_ce_mix <= 1, owner, "clean_ce_mix must lie in [0, 1]")
