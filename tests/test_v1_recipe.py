"""The baselines as their authors' code runs them: the 2021 (v1) ℓ∞-dist recipe's lr schedule and ℓp weight
decay at their boundaries, CROWN-IBP's batch_multiplier, and the suite files' assumption markers."""

from __future__ import annotations

import math
from fractions import Fraction
from pathlib import Path

import pytest
import torch

from bench.config import assumptions, load_suite
from bench.data import dataset_info
from bench.errors import BenchError
from methods import base as registry
from methods.crown_ibp.config import TrainConfig
from methods.crown_ibp.recipe import BoundTrainingRecipe
from methods.cnn import architecture, build_cnn
from methods.linf_dist.layers import LpDist
from methods.linf_dist.method import LinfDistRecipe, _hinge, _worst_case_ce
from methods.linf_dist.models import linf_dist_mlp, linf_dist_net
from methods.linf_dist.optim import lp_decay_direction

MNIST = dataset_info("mnist")
CIFAR = dataset_info("cifar10")


def suite_config(suite: str, method: str, scale: str, eps: str) -> dict:
    return load_suite(suite).method_config(method, scale, Fraction(eps), {})


def frozen_adam_recipe(cfg: dict, batches: int = 10) -> tuple[LinfDistRecipe, torch.nn.Sequential]:
    """The recipe of ``cfg`` on a small net, with Adam's step removed so that a step applies the decay alone."""
    torch.manual_seed(0)
    model = linf_dist_net(CIFAR, depth=3, width=16, identity_val=10.0, learnable_scale=False)
    with torch.no_grad():
        model[-3].bias.copy_(torch.linspace(-1.0, 1.0, 10))
    recipe = LinfDistRecipe(model, cfg, 0.2009, batches, _hinge(float(cfg["hinge_mix"])))
    recipe.optimizer.step = lambda closure=None: None  # type: ignore[method-assign]
    return recipe, model


def test_v1_lr_is_held_until_the_p_ramp_then_cosine() -> None:
    """Paper scale, CIFAR hinge (v1 --epochs 0,100,0,750,800): lr 0.02 up to the ramp start, cosine after."""
    recipe, _ = frozen_adam_recipe(suite_config("cifar", "linf-dist-hinge", "paper", "8/255"))
    s = recipe.schedule
    assert s.lr_factor(0, 0) == 1.0 and s.lr_factor(99, 9) == 1.0
    assert s.lr_factor(100, 0) == 1.0 and s.lr_factor(100, 1) < 1.0
    assert s.lr_factor(450, 0) == pytest.approx(0.5)
    assert s.lr_factor(799, 9) == pytest.approx(0.5 * (1 + math.cos(math.pi * 6999 / 7000)))
    assert s.p(100, 0) == 8.0 and math.isinf(s.p(750, 0))


def test_smoke_keeps_the_v2_training() -> None:
    """The smoke scale (CI baselines) has no decay and a cosine from the first step, as before."""
    recipe, _ = frozen_adam_recipe(suite_config("cifar", "linf-dist-hinge", "smoke", "8/255"))
    assert recipe.decay is None
    assert recipe.schedule.lr_factor(0, 1) < 1.0
    method = registry.get("linf-dist-hinge")
    aug = method.augmentation(CIFAR, suite_config("cifar", "linf-dist-hinge", "smoke", "8/255"))
    assert (aug.crop_padding, aug.padding_mode, aug.hflip) == (3, "edge", True)


@pytest.mark.parametrize(("suite", "info", "expected"), [("cifar", CIFAR, (4, "zeros", True)),
                                                         ("mnist", MNIST, (1, "zeros", False))])
@pytest.mark.parametrize("scale", ["paper", "small"])
def test_v1_crops(suite: str, info, expected: tuple, scale: str) -> None:
    """v1 dataset.py: RandomCrop(32, padding=4) + flip on CIFAR-10, RandomCrop(28, padding=1) on MNIST (zero fill)."""
    for method in ("linf-dist-hinge", "linf-dist-mlp"):
        eps = "8/255" if suite == "cifar" else "3/10"
        aug = registry.get(method).augmentation(info, suite_config(suite, method, scale, eps))
        assert (aug.crop_padding, aug.padding_mode, aug.hflip) == expected


@pytest.mark.parametrize(("epoch", "batch", "factor", "p"), [
    (0, 0, 1.0, 8.0),                                              # first step
    (100, 0, 1.0, 8.0),                                            # the p ramp starts
    (799, 9, 0.5 * (1 + math.cos(math.pi * 6999 / 7000)), math.inf),  # last step
])
def test_v1_weight_decay_at_the_schedule_boundaries(epoch: int, batch: int, factor: float, p: float) -> None:
    """One step of the paper-scale recipe decays by η_t·5e-3: ℓp rows at the step's p, the bias plainly."""
    cfg = suite_config("cifar", "linf-dist-hinge", "paper", "8/255")
    recipe, model = frozen_adam_recipe(cfg)
    rate = 0.02 * factor * 5e-3
    layers = [m for m in model.modules() if isinstance(m, LpDist)]
    weights = [layer.weight.detach().clone() for layer in layers]
    bias = model[-3].bias.detach().clone()
    x, y = torch.rand(8, *CIFAR.input_shape), torch.arange(8) % 10
    stats = recipe.step(x, y, epoch, batch)
    assert stats["lr"] == pytest.approx(0.02 * factor, rel=1e-12) and stats["p"] == p
    for layer, before in zip(layers, weights):
        expected = before - rate * lp_decay_direction(before, p, 1e-10)
        torch.testing.assert_close(layer.weight.detach(), expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(model[-3].bias.detach(), bias * (1 - rate), rtol=1e-6, atol=0)


def test_lp_decay_direction_is_the_gradient_of_half_the_squared_norm() -> None:
    torch.manual_seed(1)
    w = torch.randn(5, 7, dtype=torch.float64)
    for p in (2.0, 8.0, 37.5):
        w_ = w.clone().requires_grad_()
        (0.5 * torch.linalg.vector_norm(w_, ord=p, dim=1).pow(2)).sum().backward()
        torch.testing.assert_close(lp_decay_direction(w, p, 0.0), w_.grad, rtol=1e-10, atol=1e-12)
    inf = lp_decay_direction(w, math.inf, 0.0)
    rows, cols = torch.arange(5), w.abs().argmax(dim=1)
    assert torch.equal(inf[rows, cols], w[rows, cols])
    assert (inf != 0).sum() == 5


def test_mlp_head_decays_plainly() -> None:
    """v1 decays the Predictor's Linear layers by (1 − ηλ) (adamw.py: modules without a p)."""
    torch.manual_seed(0)
    model = linf_dist_mlp(MNIST, depth=4, width=16, identity_val=10.0, hidden=8)
    cfg = suite_config("mnist", "linf-dist-mlp", "paper", "3/10")
    recipe = LinfDistRecipe(model, cfg, 0.3081, 10, _worst_case_ce(float(cfg["clean_ce_mix"])))
    recipe.optimizer.step = lambda closure=None: None  # type: ignore[method-assign]
    head = [p.detach().clone() for p in model[-3:].parameters()]
    recipe.step(torch.rand(8, *MNIST.input_shape), torch.arange(8) % 10, 0, 0)
    for before, after in zip(head, model[-3:].parameters()):
        torch.testing.assert_close(after.detach(), before * (1 - 0.02 * 5e-3), rtol=1e-6, atol=0)


def bound_recipe(multiplier: int, batches: int) -> tuple[BoundTrainingRecipe, list[int]]:
    cfg = TrainConfig.from_dict({"architecture": "dm-small", "batch_size": 4, "epochs": 2, "lr": 1e-3,
                                 "schedule": "linear", "ramp_start": 0, "ramp_epochs": 1,
                                 "batch_multiplier": multiplier}, "test")
    torch.manual_seed(0)
    model = build_cnn(architecture("dm-small", None, None), MNIST)
    recipe = BoundTrainingRecipe(model, cfg, 0.3, batches)
    stepped: list[int] = []
    original = recipe.optimizer.step

    def step(closure=None):
        stepped.append(len(stepped))
        return original(closure)

    recipe.optimizer.step = step  # type: ignore[method-assign]
    return recipe, stepped


def test_batch_multiplier_steps_as_crown_ibp_train_py() -> None:
    """batch_multiplier 2 over 5 batches: zero before 0, 2, 4; step after 0, 2, 4 (and the last, 4)."""
    recipe, stepped = bound_recipe(2, 5)
    x, y = torch.rand(4, *MNIST.input_shape), torch.arange(4)
    seen = []
    for batch in range(5):
        before = len(stepped)
        stats = recipe.step(x, y, 0, batch)
        seen.append((len(stepped) > before, stats["eps"]))
    assert [s for s, _ in seen] == [True, False, True, False, True]
    # ε moves once per two batches over ⌈5 / 2⌉ = 3 steps an epoch.
    assert seen[0][1] == seen[1][1] and seen[2][1] == seen[3][1] and seen[1][1] < seen[2][1] < seen[4][1]
    recipe, stepped = bound_recipe(2, 4)
    for batch in range(4):
        recipe.step(x, y, 0, batch)
    assert len(stepped) == 3  # batches 0, 2 and the epoch's last (3), which sums the gradients of 2 and 3


def test_batch_multiplier_one_is_a_step_per_batch() -> None:
    recipe, stepped = bound_recipe(1, 3)
    x, y = torch.rand(4, *MNIST.input_shape), torch.arange(4)
    eps = [recipe.step(x, y, 0, b)["eps"] for b in range(3)]
    assert len(stepped) == 3 and eps[0] < eps[1] < eps[2]


def test_paper_scale_crown_ibp_cifar_uses_the_multiplier_small_does_not() -> None:
    for method in ("crown-ibp", "ibp"):
        paper = suite_config("cifar", method, "paper", "8/255")
        assert (paper["batch_size"], paper["batch_multiplier"]) == (512, 2)
        assert "batch_multiplier" not in suite_config("cifar", method, "small", "8/255")


def test_shi_mnist_trains_at_0_4_for_0_3() -> None:
    for scale in ("paper", "small"):
        assert suite_config("mnist", "crown-ibp-fast", scale, "3/10")["eps_train"] == "2/5"
        assert "eps_train" not in suite_config("mnist", "crown-ibp-fast", scale, "1/10")


def test_assumption_markers_follow_the_layer_that_sets_the_value(tmp_path: Path) -> None:
    raw = {
        "eps_train": "1/2", "lr": 0.1,
        "eps": {"1/10": {"eps_train": "3/10"}},
        "scales": {"small": {"lr": 0.2, "eps": {"3/10": {"eps_train": "2/5"}}}},
        "assumed": {"lr": "base lr guessed", "eps": {"1/10": {"eps_train": "3ε guessed"}}},
    }
    path = tmp_path / "m.toml"
    assert assumptions(raw, "paper", Fraction(1, 10), {}, path) == {"lr": "base lr guessed",
                                                                   "eps_train": "3ε guessed"}
    assert assumptions(raw, "small", Fraction(1, 10), {}, path) == {"eps_train": "3ε guessed"}
    assert assumptions(raw, "small", Fraction(3, 10), {}, path) == {}
    assert assumptions(raw, "paper", Fraction(1, 10), {"eps_train": "1/5"}, path) == {"lr": "base lr guessed"}


def test_suite_cells_carry_their_assumptions() -> None:
    cells = {(c.method, c.eps): c for c in load_suite("cifar").cells("small")}
    assert set(cells[("crown-ibp", Fraction(16, 255))].assumed) == {"eps_train"}
    assert cells[("crown-ibp", Fraction(8, 255))].assumed == {}
    assert "Table 4" in cells[("linf-dist-hinge", Fraction(2, 255))].assumed["eps_train"]


def test_a_marker_on_an_inherited_value_is_refused(tmp_path: Path, monkeypatch) -> None:
    from bench import config

    suite = tmp_path / "s"
    suite.mkdir()
    (suite / "suite.toml").write_text(
        'dataset = "mnist"\neps = ["1/10"]\nmethods = ["ibp"]\n[scales.smoke]\ndescription = "x"\n'
        'train_examples = 10\ntest_range = [0, 10]\npgd_steps = 1\npgd_restarts = 1\neval_batch_size = 10\n')
    (suite / "ibp.toml").write_text('lr = 0.1\n[assumed.eps."1/10"]\nlr = "why"\n')
    monkeypatch.setattr(config, "SUITES_DIR", tmp_path)
    with pytest.raises(BenchError, match="does not set"):
        config.load_suite("s")
    (suite / "ibp.toml").write_text('lr = 0.1\n[assumed]\nlr = ""\n')
    with pytest.raises(BenchError, match="non-empty reason"):
        config.load_suite("s")



def test_records_without_markers_take_them_from_the_suite_file_while_the_value_is_unchanged() -> None:
    from bench.report.records import _assumed
    from bench.store import dump_config

    eps = Fraction(16, 255)
    cfg = dump_config(load_suite("cifar").method_config("crown-ibp", "small", eps, {}))
    rec = {"cell": {"suite": "cifar", "method": "crown-ibp", "scale": "small"}, "config": cfg}
    assert set(_assumed(rec, eps)) == {"eps_train"}
    assert _assumed({**rec, "config": {**cfg, "eps_train": "1/10"}}, eps) == {}
    assert _assumed({**rec, "assumed": {"lr": "why"}}, eps) == {"lr": "why"}
