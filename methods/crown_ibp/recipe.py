"""One training step of IBP / CROWN-IBP / Shi et al. training (spec §3–4): clean CE while ε = 0, else
κ·CE_clean + (1 − κ)·CE_robust on the margin bounds β·CROWN-IBP + (1 − β)·IBP, plus the warm-up
regularisers while enabled."""

from __future__ import annotations

import math
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from methods import parallel
from methods.base import Recipe
from methods.bounds import certified, compute_margin_bounds, margin_spec
from methods.crown_ibp.config import TrainConfig
from methods.crown_ibp.losses import robust_ce, warmup_regularisers
from methods.crown_ibp.schedule import EpsSchedule, mixing, step_lr

BETA_SKIP = 1e-5
"""Below this β the CROWN-IBP pass is skipped, as in the CROWN-IBP and FAST codes."""


class BoundTrainingRecipe(Recipe):
    """With ``batch_multiplier`` m > 1 it does what CROWN-IBP's ``train.py`` does, not what the option's name
    suggests: the gradient is zeroed before every m-th loader batch (i % m == 0) and the optimizer steps
    after it and after the epoch's last batch, so each step uses one batch and the gradients of the other
    m − 1 are computed and then discarded, except that the last step of an epoch sums the gradients of
    the batches since the previous zeroing. ε advances once per m batches, on ⌈batches / m⌉ steps an epoch.
    """

    def __init__(self, model: nn.Module, cfg: TrainConfig, eps_train: float, batches_per_epoch: int):
        self.model = model
        self.cfg = cfg
        self.epochs = cfg.epochs
        self.batches_per_epoch = batches_per_epoch
        self.eps = EpsSchedule(eps_train, cfg.schedule, cfg.ramp_start, cfg.ramp_epochs,
                               math.ceil(batches_per_epoch / cfg.batch_multiplier))
        self.optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)

    def step(self, x: torch.Tensor, y: torch.Tensor, epoch: int, batch: int) -> dict[str, float]:
        cfg = self.cfg
        self.model.train()
        lr = step_lr(cfg.lr, cfg.lr_decay, cfg.lr_milestones, epoch)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        eps = self.eps(epoch, batch // cfg.batch_multiplier)
        kappa = mixing(cfg.kappa_start, cfg.kappa_end, eps, self.eps.eps_max)
        beta = mixing(cfg.beta_start, cfg.beta_end, eps, self.eps.eps_max)
        regularise = cfg.reg_lambda > 0 and not self.eps.ramp_done(epoch)
        # The same keys at every step (the harness averages them per epoch): at ε = 0 the certified
        # fraction is that of positive clean margins, and the regulariser term is 0 when off.
        stats = {"eps": eps, "lr": lr, "kappa": kappa, "beta": beta, "reg": 0.0}
        lower: torch.Tensor | None = None  # margin lower bounds at ε, when ε > 0

        if eps == 0 and not regularise:
            logits = self.model(x)
            loss = F.cross_entropy(logits, y)
        else:
            methods = ("ibp", "crown-ibp") if eps > 0 and beta >= BETA_SKIP else ("ibp",)
            # While ε = 0 the regularisers still need bounds: take them at a tiny radius (FAST's min_eps_reg).
            bounds = compute_margin_bounds(self.model, x, y, max(eps, cfg.reg_min_eps) if regularise else eps, methods)
            logits = bounds.logits
            loss = F.cross_entropy(logits, y)
            if eps > 0:
                lower = bounds.margins["ibp"]
                if "crown-ibp" in bounds.margins:
                    lower = beta * bounds.margins["crown-ibp"] + (1 - beta) * lower
                loss = kappa * loss + (1 - kappa) * robust_ce(lower)
            if regularise:
                assert bounds.normalised_input is not None
                reg = warmup_regularisers(bounds.normalised_input, bounds.relu_inputs, cfg.reg_tolerance)
                loss = loss + cfg.reg_lambda * (1 - eps / self.eps.eps_max) * reg
                stats["reg"] = reg.item()

        first_of_group = batch % cfg.batch_multiplier == 0
        if first_of_group:
            self.optimizer.zero_grad(set_to_none=True)
        parallel.backward(loss, len(y))
        if first_of_group or batch == self.batches_per_epoch - 1:
            parallel.reduce_gradients(self.model.parameters())
            if cfg.grad_clip > 0:
                nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
            self.optimizer.step()
        if lower is None:
            lower = torch.einsum("bsk,bk->bs", margin_spec(y, logits.shape[1], logits.dtype), logits.detach())
        stats["train_certified"] = certified(lower).float().mean().item()
        stats["loss"] = loss.item()
        stats["acc"] = (logits.argmax(dim=1) == y).float().mean().item()
        return stats

    def state_dict(self) -> dict[str, Any]:
        return {"optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
