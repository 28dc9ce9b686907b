"""The method protocol and registry: the only things the harness knows about a certified defence.

A method is a class registered with ``@register("name")``. The harness (``bench/``) lists methods from
the registry and never branches on a name. Everything particular to one defence (architecture, loss,
schedules, certifier) lives in its own package under ``methods/``.

Units: every model a method builds maps **pixel-space** inputs in [0, 1] of shape (B, C, H, W) to
logits (B, K); normalisation is a layer of the model. ε is always given in pixel units.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any, Callable, ClassVar, Iterator, Mapping

import torch
from torch import nn


class MethodError(ValueError):
    """A method was asked for something it cannot do (unknown name, wrong state, bad config)."""


@dataclass(frozen=True)
class DatasetInfo:
    """Shape and pixel statistics of a dataset; methods choose their own normalisation from these."""

    name: str
    num_classes: int
    input_shape: tuple[int, int, int]
    channel_mean: tuple[float, ...]
    train_size: int


@dataclass(frozen=True)
class Augmentation:
    """Training-set augmentation in pixel space: random crop after padding, optional horizontal flip.

    ``padding_mode`` is ``"edge"`` (replicate) or ``"zeros"``; ``crop_padding = 0`` disables the crop.
    """

    crop_padding: int = 0
    padding_mode: str = "zeros"
    hflip: bool = False


@dataclass(frozen=True)
class ReferenceRow:
    """One published row of a results table (accuracies as fractions in [0, 1], ``None`` if missing)."""

    dataset: str
    eps: Fraction
    label: str
    source: str
    clean: float | None
    pgd: float | None
    certified: float | None
    notes: str = ""


@dataclass(frozen=True)
class MethodCard:
    """Human-facing description of a method, RobustBench-style."""

    title: str
    paper: str
    venue: str
    architecture: str
    reference_label: str
    """The row label (``ReferenceRow.label``) plus source that this method reproduces."""
    reference_source: str


@dataclass
class Certificate:
    """Per-sample certification result: ``certified`` (B,) bool and the verifier that produced it.

    ``falsified`` (B,) bool, from a complete verifier only: points with a counterexample that the
    float32 model misclassifies (checked by a forward pass); ``None`` for verifiers that never falsify."""

    certified: torch.Tensor
    certifier: str
    falsified: torch.Tensor | None = None


@dataclass
class EpochReport:
    """What a recipe reports after each epoch; every value is a plain float for the per-epoch log."""

    values: dict[str, float] = field(default_factory=dict)


class Recipe(abc.ABC):
    """A training procedure bound to one model: optimiser, schedules and loss.

    The harness owns the epoch loop, checkpoints and resume; the recipe owns one optimisation step.
    Schedules are functions of (epoch, batch index), so a resumed run reproduces an uninterrupted one.
    """

    epochs: int

    @abc.abstractmethod
    def step(self, x: torch.Tensor, y: torch.Tensor, epoch: int, batch: int) -> dict[str, float]:
        """One optimisation step on a pixel-space batch; returns values for the progress bar / log."""

    @abc.abstractmethod
    def state_dict(self) -> dict[str, Any]:
        """Everything besides the model needed to resume (optimiser state)."""

    @abc.abstractmethod
    def load_state_dict(self, state: Mapping[str, Any]) -> None: ...


class Method(abc.ABC):
    """A certified defence. Subclasses are stateless; configs are plain dicts from the suite files."""

    name: ClassVar[str]
    card: ClassVar[MethodCard]
    certifiers: ClassVar[tuple[str, ...]]
    """Verifiers this method's models support; the first is the default."""

    @abc.abstractmethod
    def build(self, info: DatasetInfo, cfg: Mapping[str, Any]) -> nn.Module:
        """A fresh model mapping pixel inputs (B, C, H, W) in [0, 1] to logits (B, K)."""

    @abc.abstractmethod
    def augmentation(self, info: DatasetInfo, cfg: Mapping[str, Any]) -> Augmentation: ...

    @abc.abstractmethod
    def recipe(
        self, model: nn.Module, info: DatasetInfo, cfg: Mapping[str, Any], eps: Fraction, batches_per_epoch: int
    ) -> Recipe:
        """The training procedure for ``model`` at test radius ``eps`` (pixels)."""

    @abc.abstractmethod
    def deploy(self, model: nn.Module) -> nn.Module:
        """Put a trained model in the state that is evaluated and certified (eval mode, and for ℓ∞-dist
        nets p = ∞). Returns the same module."""

    @abc.abstractmethod
    def certify(
        self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, certifier: str | None = None
    ) -> Certificate:
        """Sound per-sample certificates at ℓ∞ radius ``eps`` (pixels), box clipped to [0, 1].

        Raises ``MethodError`` if the model is not deployed (wrong mode) or the certifier is unknown.
        """

    def validate_config(self, cfg: Mapping[str, Any]) -> None:
        """Raise ``MethodError`` naming the bad key; called before any training starts."""


_REGISTRY: dict[str, Callable[[], Method]] = {}


def register(name: str) -> Callable[[type[Method]], type[Method]]:
    def wrap(cls: type[Method]) -> type[Method]:
        if name in _REGISTRY:
            raise MethodError(f"method {name!r} registered twice")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return wrap


def list_methods() -> list[str]:
    _load_builtin()
    return sorted(_REGISTRY)


def get(name: str) -> Method:
    _load_builtin()
    try:
        return _REGISTRY[name]()
    except KeyError:
        raise MethodError(f"unknown method {name!r}; known: {', '.join(sorted(_REGISTRY))}") from None


def iter_methods() -> Iterator[Method]:
    for name in list_methods():
        yield get(name)


def _load_builtin() -> None:
    # Importing the package registers every built-in method exactly once.
    import methods  # noqa: F401
