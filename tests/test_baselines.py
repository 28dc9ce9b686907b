"""The IBP-family baselines: models, schedules, losses, configs, recipes, and (slow) smoke training on real
MNIST whose certificates must survive PGD with restarts and random sampling."""

from __future__ import annotations

import copy
import math
import tomllib
from fractions import Fraction
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bench.attacks import pgd_robust, random_robust
from bench.config import SUITES_DIR, Suite, _scale
from bench.data import dataset_info, load_split, to_pixels
from methods import base as registry
from methods.base import MethodError
from methods.cnn import ARCHITECTURES, architecture, build_cnn, ibp_init
from methods.crown_ibp.losses import robust_ce, warmup_regularisers
from methods.crown_ibp.schedule import EpsSchedule, mixing, step_lr

# These models are tiny: one intra-op thread avoids thread hand-off costs (large on a shared CPU).
pytestmark = pytest.mark.usefixtures("one_thread")

BASELINES = ("ibp", "crown-ibp", "crown-ibp-fast")
MNIST, CIFAR = dataset_info("mnist"), dataset_info("cifar10")


# --- models ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize(
    ("name", "mnist_flat", "cifar_flat"),
    [("dm-small", 3200, 4608), ("dm-medium", 1024, 1600), ("dm-large", 25088, 32768), ("cnn-7", 25088, 32768)],
)
def test_architectures_have_the_published_flatten_sizes(name: str, mnist_flat: int, cifar_flat: int) -> None:
    for info, flat in ((MNIST, mnist_flat), (CIFAR, cifar_flat)):
        model = build_cnn(architecture(name), info)
        first_fc = next(m for m in model if isinstance(m, nn.Linear))
        assert first_fc.in_features == flat
        assert model(torch.rand(2, *info.input_shape)).shape == (2, 10)


def test_layer_sequences_follow_the_spec() -> None:
    kinds = [type(m).__name__ for m in build_cnn(architecture("cnn-7"), CIFAR)]
    assert kinds == ["Normalize"] + ["Conv2d", "BatchNorm2d", "ReLU"] * 5 + ["Flatten", "Linear", "BatchNorm1d",
                                                                             "ReLU", "Linear"]
    kinds = [type(m).__name__ for m in build_cnn(architecture("dm-medium"), MNIST)]
    assert kinds == ["Conv2d", "ReLU"] * 4 + ["Flatten"] + ["Linear", "ReLU"] * 2 + ["Linear"]
    large = build_cnn(architecture("dm-large"), MNIST)
    convs = [(m.out_channels, m.kernel_size[0], m.stride[0], m.padding[0]) for m in large if isinstance(m, nn.Conv2d)]
    assert convs == [(64, 3, 1, 1), (64, 3, 1, 1), (128, 3, 2, 1), (128, 3, 1, 1), (128, 3, 1, 1)]
    assert set(ARCHITECTURES) == {"dm-small", "dm-medium", "dm-large", "cnn-7"}
    with pytest.raises(MethodError, match="cnn-7 only"):
        architecture("dm-small", width=8)


def test_ibp_init_draws_every_weight_but_the_last_from_the_scaled_normal() -> None:
    torch.manual_seed(0)
    model = build_cnn(architecture("cnn-7", width=16, linear_size=256), CIFAR)
    last = copy.deepcopy(model[-1].weight)
    ibp_init(model)
    for m in model:
        if isinstance(m, (nn.Conv2d, nn.Linear)) and m is not model[-1]:
            fan_in = m.weight[0].numel()
            # fan_in · E|w| = fan_in · σ·√(2/π) = 2 for σ = √(2π)/fan_in
            assert fan_in * m.weight.abs().mean().item() == pytest.approx(2.0, rel=0.05)
    assert torch.equal(model[-1].weight, last)


# --- schedules and losses -------------------------------------------------------------------------------

def test_linear_schedule() -> None:
    s = EpsSchedule(0.4, "linear", ramp_start=2, ramp_epochs=4, batches_per_epoch=10)
    assert s(0, 0) == s(2, 0) == 0.0
    assert s(4, 0) == pytest.approx(0.2)
    assert s(6, 0) == s(9, 3) == 0.4
    assert not s.ramp_done(5) and s.ramp_done(6)


def test_smoothed_schedule_is_polynomial_then_linear_with_matching_slope() -> None:
    s = EpsSchedule(1.0, "smoothed", ramp_start=1, ramp_epochs=8, batches_per_epoch=100)
    s0, s1 = 100, 900
    mid = s0 + (s1 - s0) // 4
    values = [s(0, k) for k in range(1000)]
    assert values[s0] == 0.0 and values[s1] == 1.0 and values[-1] == 1.0
    assert all(b >= a for a, b in zip(values, values[1:]))
    assert values[s0 + 50] == pytest.approx(values[s0 + 100] / 16)  # quartic start
    # Slopes just below and above the switch agree (the linear part continues the quartic's tangent).
    assert values[mid] - values[mid - 1] == pytest.approx(values[mid + 1] - values[mid], rel=0.02)
    assert values[mid + 100] - values[mid] == pytest.approx(values[mid + 200] - values[mid + 100])


def test_mixing_follows_the_current_eps_and_lr_steps_at_milestones() -> None:
    assert mixing(1.0, 0.5, 0.0, 0.4) == 1.0 and mixing(1.0, 0.5, 0.2, 0.4) == 0.75 and mixing(1.0, 0.0, 0.4, 0.4) == 0
    assert [step_lr(1.0, 0.1, [2, 4], e) for e in (0, 1, 2, 3, 4)] == pytest.approx([1, 1, 0.1, 0.1, 0.01])


def test_robust_ce_is_cross_entropy_of_the_worst_case_logits() -> None:
    lower = torch.tensor([[0.5, -1.0, 2.0], [3.0, 0.1, -0.2]])
    y = torch.tensor([2, 0])
    worst = torch.zeros(2, 4)  # logit 0 for the true class, −m̲_j for the others, in class order
    worst[0, [0, 1, 3]] = -lower[0]
    worst[1, [1, 2, 3]] = -lower[1]
    assert robust_ce(lower).item() == pytest.approx(F.cross_entropy(worst, y).item())
    assert robust_ce(lower).item() == pytest.approx(torch.log1p(torch.exp(-lower).sum(1)).mean().item())


def test_warmup_regularisers_penalise_loose_and_unbalanced_layers() -> None:
    inputs = (torch.zeros(4, 3), torch.full((4, 3), 0.2))  # mean input radius 0.1

    def layer(lower: list[float], upper: list[float]) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.tensor([lower]).repeat(4, 1), torch.tensor([upper]).repeat(4, 1)

    # Radius 0.1 (≤ input radius / τ) and active / inactive centres ±0.6 (mean and variance ratios 1): 0.
    assert warmup_regularisers(inputs, [layer([0.5, -0.7], [0.7, -0.5])], 0.5).item() == pytest.approx(0.0)
    # Radius 1 > 0.1 / τ: L_tight = (τ − 0.1/1)/τ = 0.8, L_relu still 0.
    assert warmup_regularisers(inputs, [layer([0.5, -2.5], [2.5, -0.5])], 0.5).item() == pytest.approx(0.8)
    # Centres 0.6 and −0.2: mean ratio 0.2/0.6 = 1/3, variance ratio 1: L_relu = (τ − 1/3)/τ = 1/3.
    assert warmup_regularisers(inputs, [layer([0.5, -0.3], [0.7, -0.1])], 0.5).item() == pytest.approx(1 / 3)
    # All neurons active: no inactive mean to compare with, the non-finite L_relu term is skipped (FAST).
    assert warmup_regularisers(inputs, [layer([1.0, 1.0], [1.2, 1.2])], 0.5).item() == pytest.approx(0.0)


# --- configs --------------------------------------------------------------------------------------------

def suite_with_baselines(name: str) -> Suite:
    """The suite's own scales with this package's method files (independent of the suite's method list)."""
    folder = SUITES_DIR / name
    raw = tomllib.loads((folder / "suite.toml").read_text())
    files = {m: tomllib.loads((folder / f"{m}.toml").read_text()) for m in BASELINES}
    scales = {k: _scale(k, v, folder / "suite.toml") for k, v in raw["scales"].items()}
    return Suite(name, raw["dataset"], tuple(Fraction(e) for e in raw["eps"]), BASELINES, scales, files, folder)


@pytest.mark.parametrize("suite", ["mnist", "cifar"])
def test_every_suite_file_gives_a_valid_config_at_every_scale_and_eps(suite: str) -> None:
    s = suite_with_baselines(suite)
    for method in BASELINES:
        for scale in s.scales:
            for eps in s.eps:
                cfg = s.method_config(method, scale, eps, {})
                registry.get(method).validate_config(cfg)
                assert isinstance(cfg["batch_size"], int)


def test_paper_configs_match_the_published_recipes() -> None:
    mnist, cifar = suite_with_baselines("mnist"), suite_with_baselines("cifar")
    cfg = mnist.method_config("crown-ibp", "paper", Fraction(3, 10), {})
    assert (cfg["architecture"], cfg["epochs"], cfg["eps_train"], cfg["kappa_end"]) == ("dm-large", 200, "2/5", 0.5)
    cfg = cifar.method_config("crown-ibp", "paper", Fraction(2, 255), {})
    assert (cfg["beta_end"], cfg["certifier"], cfg["epochs"]) == (1.0, "crown-ibp", 3200)
    assert float(Fraction(cfg["eps_train"])) == pytest.approx(1.1 * 2 / 255)
    cfg = cifar.method_config("crown-ibp-fast", "paper", Fraction(8, 255), {})
    assert (cfg["architecture"], cfg["epochs"], cfg["ramp_start"], cfg["ramp_epochs"]) == ("cnn-7", 160, 1, 80)


def test_config_errors_name_the_key() -> None:
    cfg = dict(architecture="dm-small", batch_size=10, epochs=1, lr=1e-3, schedule="linear", ramp_start=0,
               ramp_epochs=1)
    registry.get("crown-ibp-fast").validate_config(cfg)
    with pytest.raises(MethodError, match="unknown config key 'lrr' \\(did you mean 'lr'\\?\\)"):
        registry.get("ibp").validate_config({**cfg, "lrr": 1})
    with pytest.raises(MethodError, match="config lacks epochs"):
        registry.get("ibp").validate_config({k: v for k, v in cfg.items() if k != "epochs"})
    with pytest.raises(MethodError, match="ibp fixes beta_end"):
        registry.get("ibp").validate_config({**cfg, "beta_end": 1.0})
    with pytest.raises(MethodError, match="schedule"):
        registry.get("crown-ibp").validate_config({**cfg, "schedule": "cosine"})
    with pytest.raises(MethodError, match="batch_size"):
        registry.get("crown-ibp").validate_config({**cfg, "batch_size": 0.5})


def test_cards_name_rows_of_the_reference_table() -> None:
    labels = {m: (registry.get(m).card.reference_label, registry.get(m).card.reference_source) for m in BASELINES}
    assert labels == {"ibp": ("IBP", "(Gowal et al. 2018)"), "crown-ibp": ("CROWN-IBP", "(Zhang et al. 2020)"),
                      "crown-ibp-fast": ("CROWN-IBP", "(Shi et al. 2021)")}
    assert all(registry.get(m).certifiers[0] == "ibp" for m in BASELINES)


# --- recipes --------------------------------------------------------------------------------------------

def tiny_config(**overrides: object) -> dict[str, object]:
    cfg: dict[str, object] = dict(architecture="cnn-7", width=2, linear_size=8, batch_size=8, epochs=3, lr=1e-3,
                                  schedule="linear", ramp_start=1, ramp_epochs=1, kappa_start=1.0, kappa_end=0.5)
    cfg.update(overrides)
    return cfg


def test_recipe_steps_report_the_schedules_and_skip_unneeded_bounds(monkeypatch: pytest.MonkeyPatch) -> None:
    import methods.crown_ibp.recipe as recipe_module

    calls: list[tuple[str, ...]] = []
    real = recipe_module.compute_margin_bounds

    def recording(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, methods: tuple[str, ...]):  # noqa: ANN202
        calls.append(tuple(methods))
        return real(model, x, y, eps, methods)

    monkeypatch.setattr(recipe_module, "compute_margin_bounds", recording)
    method = registry.get("crown-ibp")
    cfg = tiny_config(beta_end=0.0)
    torch.manual_seed(0)
    model = method.build(MNIST, cfg)
    recipe = method.recipe(model, MNIST, cfg, Fraction(1, 10), batches_per_epoch=4)
    x, y = torch.rand(8, 1, 28, 28), torch.randint(0, 10, (8,))
    clean = recipe.step(x, y, epoch=0, batch=0)
    assert calls == [] and clean["eps"] == 0
    mid = recipe.step(x, y, epoch=1, batch=2)
    assert calls == [("ibp", "crown-ibp")]
    assert (mid["eps"], mid["beta"], mid["kappa"]) == pytest.approx((0.05, 0.5, 0.75))
    end = recipe.step(x, y, epoch=2, batch=0)
    assert calls[-1] == ("ibp",) and (end["eps"], end["beta"], end["kappa"]) == pytest.approx((0.1, 0.0, 0.5))
    assert set(clean) == set(mid) == set(end) == {"eps", "lr", "kappa", "beta", "reg", "loss", "acc", "train_certified"}


def test_regularisers_run_during_the_clean_warmup_at_a_tiny_radius() -> None:
    method = registry.get("crown-ibp-fast")
    cfg = tiny_config(ibp_init=True, reg_lambda=0.5, grad_clip=10.0)
    torch.manual_seed(0)
    model = method.build(MNIST, cfg)
    recipe = method.recipe(model, MNIST, cfg, Fraction(1, 10), batches_per_epoch=4)
    stats = recipe.step(torch.rand(8, 1, 28, 28), torch.randint(0, 10, (8,)), epoch=0, batch=0)
    assert stats["eps"] == 0 and stats["reg"] > 0 and math.isfinite(stats["loss"])
    after = recipe.step(torch.rand(8, 1, 28, 28), torch.randint(0, 10, (8,)), epoch=2, batch=0)
    assert after["reg"] == 0 and set(after) == set(stats)


def test_resumed_recipe_takes_the_same_step() -> None:
    method = registry.get("ibp")
    cfg = tiny_config()
    torch.manual_seed(0)
    model = method.build(MNIST, cfg)
    recipe = method.recipe(model, MNIST, cfg, Fraction(1, 10), batches_per_epoch=4)
    x, y = torch.rand(8, 1, 28, 28), torch.randint(0, 10, (8,))
    recipe.step(x, y, 1, 0)
    resumed_model = copy.deepcopy(model)
    resumed = method.recipe(resumed_model, MNIST, cfg, Fraction(1, 10), batches_per_epoch=4)
    resumed.load_state_dict(copy.deepcopy(recipe.state_dict()))
    a, b = recipe.step(x, y, 1, 1), resumed.step(x, y, 1, 1)
    assert a == b
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), resumed_model.parameters()))


def test_certify_uses_the_configured_default_and_refuses_training_mode() -> None:
    method = registry.get("crown-ibp")
    model = method.build(CIFAR, tiny_config(certifier="crown-ibp"))
    x, y = torch.rand(3, 3, 32, 32), torch.tensor([0, 1, 2])
    with pytest.raises(MethodError, match="training mode"):
        method.certify(model, x, y, 2 / 255)
    method.deploy(model)
    assert method.certify(model, x, y, 2 / 255).certifier == "crown-ibp"
    assert method.certify(model, x, y, 2 / 255, "ibp").certifier == "ibp"
    with pytest.raises(MethodError, match="unknown certifier"):
        method.certify(model, x, y, 2 / 255, "lp")


# --- slow: trained smoke models on real MNIST ----------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("method_name", BASELINES)
def test_certified_points_of_a_trained_smoke_model_survive_attacks(method_name: str, data_dir: Path) -> None:
    """Train the MNIST smoke config at ε = 0.1 (2,000 images, as the harness does), then attack every point
    certified by any certifier with PGD (5 restarts) and 200 random / corner samples: none may break.
    Full CROWN costs seconds per point on these models, so it certifies the first 3 test points only."""
    eps = Fraction(1, 10)
    method = registry.get(method_name)
    cfg = suite_with_baselines("mnist").method_config(method_name, "smoke", eps, {})
    train, test = load_split("mnist", True, data_dir), load_split("mnist", False, data_dir)
    torch.manual_seed(0)
    model = method.build(MNIST, cfg)
    x_train, y_train = to_pixels(train.images[:2000], torch.device("cpu")), train.labels[:2000]
    batch = cfg["batch_size"]
    recipe = method.recipe(model, MNIST, cfg, eps, batches_per_epoch=math.ceil(2000 / batch))
    for epoch in range(recipe.epochs):
        for k, start in enumerate(range(0, 2000, batch)):
            recipe.step(x_train[start : start + batch], y_train[start : start + batch], epoch, k)
    method.deploy(model)
    x, y = to_pixels(test.images[:200], torch.device("cpu")), test.labels[:200]
    gen = torch.Generator().manual_seed(0)
    robust = pgd_robust(model, x, y, float(eps), steps=20, restarts=5, generator=gen)
    robust &= random_robust(model, x, y, float(eps), samples=200, generator=gen)
    counts = {}
    for certifier in method.certifiers:
        n = 3 if certifier in ("crown", "alpha-crown", "milp") else 200
        cert = method.certify(model, x[:n], y[:n], float(eps), certifier).certified
        assert not (cert & ~robust[:n]).any(), f"{certifier} certified points that an attack breaks"
        counts[certifier] = int(cert.sum())
    # Trained for this ε, the default certifier must certify a real share (a collapsed, constant
    # classifier would certify only its one class, ~10 %), so the attacks above had something to break.
    assert counts[method.certifiers[0]] >= 40, counts
