"""The shared protocol implementation of the IBP-family defences: CNNs from ``methods.cnn`` trained on
bound-based losses and certified by the project's bound engine (``methods.bounds``).

The three registered methods differ only in their configs and cards; ``fixed`` pins the settings that
define a method (IBP never uses CROWN-IBP bounds in training, CROWN-IBP always starts from them).
"""

from __future__ import annotations

from fractions import Fraction
from typing import Any, ClassVar, Mapping

import torch
from torch import nn

from methods.base import Augmentation, Certificate, DatasetInfo, Method, MethodError, Recipe
from methods.bounds import BOUND_METHODS, certify_margins, require_eval
from methods.bounds.milp import milp_certify
from methods.cnn import architecture, build_cnn, ibp_init
from methods.crown_ibp.config import TrainConfig
from methods.crown_ibp.recipe import BoundTrainingRecipe


class BoundTrainedCNN(Method):
    certifiers: ClassVar[tuple[str, ...]] = (*BOUND_METHODS, "milp")
    """The bound engine's verifiers, from the loosest, then the exact MILP (``methods.bounds.milp``)."""
    fixed: ClassVar[Mapping[str, Any]] = {}

    def config(self, cfg: Mapping[str, Any]) -> TrainConfig:
        for key, value in self.fixed.items():
            if key in cfg and cfg[key] != value:
                raise MethodError(f"{self.name} fixes {key} = {value!r}, config has {cfg[key]!r}")
        return TrainConfig.from_dict({**cfg, **self.fixed}, self.name)

    def validate_config(self, cfg: Mapping[str, Any]) -> None:
        self.config(cfg)

    def build(self, info: DatasetInfo, cfg: Mapping[str, Any]) -> nn.Module:
        """The CNN; ``default_certifier`` (an attribute, restored whenever the harness rebuilds the model
        from its config) names the verifier the literature uses for this cell, e.g. CROWN-IBP for the
        β ≡ 1 CIFAR 2/255 model (spec §4.3)."""
        tc = self.config(cfg)
        model = build_cnn(architecture(tc.architecture, tc.width, tc.linear_size), info)
        if tc.ibp_init:
            ibp_init(model)
        model.default_certifier = tc.certifier or self.certifiers[0]
        return model

    def augmentation(self, info: DatasetInfo, cfg: Mapping[str, Any]) -> Augmentation:
        tc = self.config(cfg)
        return Augmentation(crop_padding=tc.crop_padding, padding_mode=tc.padding_mode, hflip=tc.hflip)

    def recipe(
        self, model: nn.Module, info: DatasetInfo, cfg: Mapping[str, Any], eps: Fraction, batches_per_epoch: int
    ) -> Recipe:
        tc = self.config(cfg)
        return BoundTrainingRecipe(model, tc, tc.eps_train_value(float(eps)), batches_per_epoch)

    def deploy(self, model: nn.Module) -> nn.Module:
        return model.eval()

    def certify(
        self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, certifier: str | None = None
    ) -> Certificate:
        name = certifier or getattr(model, "default_certifier", self.certifiers[0])
        if name not in self.certifiers:
            raise MethodError(f"unknown certifier {name!r} for {self.name}; known: {', '.join(self.certifiers)}")
        require_eval(model)
        if name == "milp":
            certified, falsified = milp_certify(model, x, y, float(eps))
            return Certificate(certified=certified, certifier=name, falsified=falsified)
        with torch.no_grad():
            decision = certify_margins(model, x, y, float(eps), name)
        return Certificate(certified=decision, certifier=name)
