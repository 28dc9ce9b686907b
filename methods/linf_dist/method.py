"""The three ℓ∞-dist defences: ``linf-dist`` (2022 hybrid loss), ``linf-dist-hinge`` (2021 hinge recipe)
and ``linf-dist-mlp`` (ℓ∞-dist + MLP head). They share the net, the schedules and the certifier; they
differ in loss, head and hyper-parameters (all from the suite files).

Config keys: the typed schemas in ``methods/linf_dist/config.py`` (one per recipe).
"""

from __future__ import annotations

import abc
import math
from fractions import Fraction
from typing import Any, Callable, ClassVar, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from methods import parallel
from methods.base import (
    Augmentation,
    Certificate,
    DatasetInfo,
    Method,
    MethodCard,
    MethodError,
    Recipe,
    register,
)
from methods.linf_dist.config import HingeConfig, HybridConfig, LinfDistConfig, MLPConfig
from methods.bounds.margins import certified, input_box
from methods.bounds.rounding import rounding_errors
from methods.linf_dist.layers import dist_layers, set_p
from methods.linf_dist.losses import (
    hinge_loss,
    hybrid_loss,
    normalised_worst_margins,
    worst_case_cross_entropy,
    worst_violation,
)
from methods.linf_dist.models import (
    SCALAR_STD,
    head_worst_differences,
    linf_dist_mlp,
    linf_dist_net,
    propagate_interval,
)
from methods.linf_dist.optim import DecoupledDecay
from methods.linf_dist.schedule import Schedule
from methods.schema import parse_config

CERTIFIER = "linf-interval"
_AUGMENT = {
    # v2 code: edge padding 1 (MNIST), 3 + flip (CIFAR). A config's crop_padding / padding_mode / hflip
    # replace these (the 2021 recipe's suite files give v1's zero padding 1 and 4 + flip).
    "mnist": Augmentation(crop_padding=1, padding_mode="edge", hflip=False),
    "cifar10": Augmentation(crop_padding=3, padding_mode="edge", hflip=True),
}

LossFn = Callable[[nn.Sequential, torch.Tensor, torch.Tensor, float, float],
                  tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
"""(model, x, y, ε, λ) -> (loss, logits, per-sample worst violation: < 0 where the training bound certifies)."""


def _fraction(cfg: Mapping[str, Any], key: str) -> Fraction:
    try:
        value = Fraction(str(cfg[key]))
    except (ValueError, ZeroDivisionError):
        raise MethodError(f"config {key} = {cfg[key]!r} is not a number") from None
    if value <= 0:
        raise MethodError(f"config {key} must be positive")
    return value


class LinfDistRecipe(Recipe):
    """Adam(β, eps) with per-batch cosine lr for every group, p and λ schedules, and the method's loss.

    ``lr_schedule = "constant-then-cosine"`` holds the lr until the p ramp starts (v1), and
    ``weight_decay`` > 0 adds v1's decoupled ℓp weight decay (``methods.linf_dist.optim``)."""

    def __init__(self, model: nn.Sequential, cfg: Mapping[str, Any], std: float, batches_per_epoch: int,
                 loss: LossFn):
        self.model = model
        self.cfg = cfg
        self.loss = loss
        self.epochs = int(cfg["epochs"])
        self.eps_train = float(_fraction(cfg, "eps_train")) / std
        self.schedule = Schedule(
            batches_per_epoch=batches_per_epoch,
            total_epochs=self.epochs,
            p_start_epoch=int(cfg["p_start_epoch"]),
            p_stop_epoch=int(cfg["p_stop_epoch"]),
            eps_start_epoch=int(cfg["eps_start_epoch"]),
            eps_end_epoch=int(cfg["eps_end_epoch"]),
            p_begin=float(cfg["p_begin"]),
            p_end=float(cfg["p_end"]),
            lr_start_epoch=int(cfg["p_start_epoch"]) if cfg.get("lr_schedule") == "constant-then-cosine" else 0,
        )
        scale = [p for n, p in model.named_parameters() if n.endswith("scale")]
        rest = [p for n, p in model.named_parameters() if not n.endswith("scale")]
        groups: list[dict[str, Any]] = [{"params": rest, "lr": float(cfg["lr"]), "base_lr": float(cfg["lr"])}]
        if scale:
            # The temperature gets a fifth of the base lr "to make training stable" (paper App. B).
            groups.append({"params": scale, "lr": float(cfg["scalar_lr"]), "base_lr": float(cfg["scalar_lr"])})
        betas = tuple(float(b) for b in cfg["betas"])
        self.optimizer = torch.optim.Adam(groups, betas=betas, eps=float(cfg["adam_eps"]), weight_decay=0.0)
        weight_decay = float(cfg.get("weight_decay", 0.0))
        self.decay = (DecoupledDecay(model, self.optimizer, weight_decay, float(cfg["adam_eps"]))
                      if weight_decay > 0 else None)

    def lam(self, epoch: int, batch: int) -> float:
        if "lam0" not in self.cfg:
            return 0.0
        return self.schedule.lam(epoch, batch, float(self.cfg["lam0"]), float(self.cfg["lam_end"]))

    def step(self, x: torch.Tensor, y: torch.Tensor, epoch: int, batch: int) -> dict[str, float]:
        p = self.schedule.p(epoch, batch)
        set_p(self.model, p)
        factor = self.schedule.lr_factor(epoch, batch)
        for group in self.optimizer.param_groups:
            group["lr"] = group["base_lr"] * factor
        eps = self.eps_train * self.schedule.eps_factor(epoch, batch)
        lam = self.lam(epoch, batch)
        self.model.train()
        loss, logits, violation = self.loss(self.model, x, y, eps, lam)
        self.optimizer.zero_grad(set_to_none=True)
        parallel.backward(loss, len(y))
        parallel.reduce_gradients(self.model.parameters())
        if self.decay is not None:
            self.decay.apply()
        self.optimizer.step()
        acc = (logits.argmax(dim=1) == y).float().mean().item()
        certified = (violation < 0).float().mean().item()
        return {"loss": loss.item(), "acc": acc, "train_certified": certified, "p": p, "lam": lam,
                "lr": self.optimizer.param_groups[0]["lr"], "eps": eps}

    def state_dict(self) -> dict[str, Any]:
        return {"optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.optimizer.load_state_dict(state["optimizer"])


def _mixture(model: nn.Sequential, x: torch.Tensor, y: torch.Tensor, eps: float, lam: float
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    z = model[:-1](x)
    logits = model[-1](z)
    return hybrid_loss(z, logits, y, eps, lam), logits, worst_violation(normalised_worst_margins(z, y, eps), y)


def _hinge(mix: float) -> LossFn:
    def loss(model: nn.Sequential, x: torch.Tensor, y: torch.Tensor, eps: float, lam: float
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        z = model[:-1](x)
        violation = worst_violation(normalised_worst_margins(z, y, eps), y)
        return hinge_loss(z, y, eps, mix), model[-1](z), violation

    return loss


def _worst_case_ce(clean_mix: float) -> LossFn:
    """v2 ``crossentropy(mix)``: (1 − mix)·CE(R) + mix·CE(clean), R from the Lipschitz box h ± ε of the
    dist features through the MLP head (spec §4.7; IBP only at certification)."""

    def loss(model: nn.Sequential, x: torch.Tensor, y: torch.Tensor, eps: float, lam: float
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        h = model[:-3](x)
        head = model[-3:]
        logits = head(h)
        r = head_worst_differences(head, h - eps, h + eps, y)
        ce = worst_case_cross_entropy(r, y)
        loss = (1.0 - clean_mix) * ce + clean_mix * F.cross_entropy(logits, y)
        return loss, logits, worst_violation(r, y)

    return loss


class _LinfDistBase(Method):
    certifiers: ClassVar[tuple[str, ...]] = (CERTIFIER,)
    schema: ClassVar[type[LinfDistConfig]]

    def validate_config(self, cfg: Mapping[str, Any]) -> None:
        parse_config(self.schema, cfg, self.name).check(self.name)

    def augmentation(self, info: DatasetInfo, cfg: Mapping[str, Any]) -> Augmentation:
        default = _AUGMENT[info.name]
        return Augmentation(crop_padding=int(cfg.get("crop_padding", default.crop_padding)),
                            padding_mode=str(cfg.get("padding_mode", default.padding_mode)),
                            hflip=bool(cfg.get("hflip", default.hflip)))

    @abc.abstractmethod
    def loss(self, cfg: Mapping[str, Any]) -> LossFn: ...

    def recipe(self, model: nn.Module, info: DatasetInfo, cfg: Mapping[str, Any], eps: Fraction,
               batches_per_epoch: int) -> Recipe:
        assert isinstance(model, nn.Sequential)
        return LinfDistRecipe(model, cfg, SCALAR_STD[info.name], batches_per_epoch, self.loss(cfg))

    def deploy(self, model: nn.Module) -> nn.Module:
        set_p(model, math.inf)
        return model.eval()

    def _check_deployed(self, model: nn.Module) -> None:
        if model.training or any(m.training for m in model.modules()):
            raise MethodError("certification needs the model in eval mode (running means), call deploy() first")
        bad = [layer.p for layer in dist_layers(model) if not math.isinf(layer.p)]
        if bad:
            raise MethodError(f"certification needs p = ∞ on every distance layer (found p = {bad[0]})")

    def certify(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float,
                certifier: str | None = None) -> Certificate:
        if certifier not in (None, CERTIFIER):
            raise MethodError(f"{self.name} models certify with {CERTIFIER!r}, not {certifier!r}")
        self._check_deployed(model)
        with torch.no_grad():
            lower, upper = input_box(x, eps)
            margins = self.margin_lower_bounds(model, lower, upper, y)
            errors = rounding_errors(model, lower, upper).interval
            # Interval propagation (with the head's elided last layer) errs like IBP: slack 2 (e_y + e_j).
            slack = 2 * (errors + errors.gather(1, y[:, None]))
        return Certificate(certified=certified(margins, slack), certifier=CERTIFIER)

    @abc.abstractmethod
    def margin_lower_bounds(self, model: nn.Module, lower: torch.Tensor, upper: torch.Tensor, y: torch.Tensor
                            ) -> torch.Tensor:
        """(B, K) lower bounds of logit_y − logit_j over the pixel box, +inf in the target column."""


class _PureNet(_LinfDistBase):
    def build(self, info: DatasetInfo, cfg: Mapping[str, Any]) -> nn.Module:
        return linf_dist_net(info, int(cfg["depth"]), int(cfg["width"]), float(cfg["identity_val"]),
                             bool(cfg.get("learnable_scale", False)))

    def margin_lower_bounds(self, model: nn.Module, lower: torch.Tensor, upper: torch.Tensor, y: torch.Tensor
                            ) -> torch.Tensor:
        assert isinstance(model, nn.Sequential)
        lo, hi = propagate_interval(model, lower, upper)
        margins = lo.gather(1, y[:, None]) - hi
        return margins.scatter(1, y[:, None], math.inf)


@register("linf-dist")
class LinfDistHybridLoss(_PureNet):
    card = MethodCard(
        title="ℓ∞-distance net, clipped hinge + scaled cross-entropy",
        paper="Boosting the Certified Robustness of L-infinity Distance Nets (Zhang et al.)",
        venue="ICLR 2022",
        architecture="ℓ∞-dist net (MLP of distance neurons, mean shift, learnable temperature)",
        reference_label="l_inf-distance Net",
        reference_source="This paper",
    )
    schema = HybridConfig

    def loss(self, cfg: Mapping[str, Any]) -> LossFn:
        return _mixture


@register("linf-dist-hinge")
class LinfDistHinge(_PureNet):
    """The 2021 recipe: hinge loss with θ = 2·ε_train and a fixed temperature 1. Its suite files give v1's
    training (ℓp weight decay, lr held until the p ramp, v1 crops) at ``paper`` and ``small`` scale."""

    card = MethodCard(
        title="ℓ∞-distance net, hinge loss (2021 recipe)",
        paper="Towards Certifying L-infinity Robustness using Neural Networks with L-inf-dist Neurons (Zhang et al.)",
        venue="ICML 2021",
        architecture="ℓ∞-dist net (MLP of distance neurons, mean shift)",
        reference_label="l_inf-distance Net",
        reference_source="(Zhang et al. 2021)",
    )
    schema = HingeConfig

    def loss(self, cfg: Mapping[str, Any]) -> LossFn:
        return _hinge(float(cfg["hinge_mix"]))


@register("linf-dist-mlp")
class LinfDistMLP(_LinfDistBase):
    """ℓ∞-dist features + tanh MLP head, trained on worst-case CE of the Lipschitz feature box; certified by
    exact interval propagation through the distance layers and interval arithmetic through the head."""

    card = MethodCard(
        title="ℓ∞-distance net + MLP head",
        paper="Towards Certifying L-infinity Robustness using Neural Networks with L-inf-dist Neurons (Zhang et al.)",
        venue="ICML 2021",
        architecture="ℓ∞-dist feature layers + 2-layer tanh MLP",
        reference_label="l_inf-distance Net+MLP",
        reference_source="(Zhang et al. 2021)",
    )
    schema = MLPConfig

    def build(self, info: DatasetInfo, cfg: Mapping[str, Any]) -> nn.Module:
        return linf_dist_mlp(info, int(cfg["depth"]), int(cfg["width"]), float(cfg["identity_val"]),
                             int(cfg["hidden"]))

    def loss(self, cfg: Mapping[str, Any]) -> LossFn:
        return _worst_case_ce(float(cfg["clean_ce_mix"]))

    def margin_lower_bounds(self, model: nn.Module, lower: torch.Tensor, upper: torch.Tensor, y: torch.Tensor
                            ) -> torch.Tensor:
        assert isinstance(model, nn.Sequential)
        lo, hi = propagate_interval(model[:-3], lower, upper)
        r = head_worst_differences(model[-3:], lo, hi, y)
        return (-r).scatter(1, y[:, None], math.inf)
