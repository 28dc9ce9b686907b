"""Cross-check of the project's bound engine against auto_LiRPA 0.3 (an independent implementation).

Runs only in the ``lirpa`` tox env (torch 1.13.1 + auto-LiRPA 0.3; skipped elsewhere): IBP, CROWN-IBP and
CROWN margin lower bounds of random models of every supported layer kind, and of a trained smoke model of
each baseline, must agree to 1e-5 relative in float64.

auto_LiRPA is configured with ``conv_mode = "matrix"`` (its default "patches" mode cannot bound a
division by the normalisation constants before a convolution) and ``sparse_intermediate_bounds = False``:
by default it keeps IBP bounds for intermediate neurons that IBP proves stable *across the whole batch*,
which makes its "CROWN" both a different algorithm from CROWN (spec §6.2) and batch-dependent.
"""

from __future__ import annotations

import copy
import gzip
import math
import tomllib
from fractions import Fraction
from pathlib import Path

import pytest
import torch
from torch import nn

lirpa = pytest.importorskip("auto_LiRPA")

from bench.config import SUITES_DIR, Suite  # noqa: E402
from bench.data import dataset_info  # noqa: E402
from methods import base as registry  # noqa: E402
from methods.bounds import input_box, margin_lower_bounds, margin_spec  # noqa: E402
from methods.normalize import Normalize  # noqa: E402

LIRPA_NAMES = {"ibp": "IBP", "crown-ibp": "CROWN-IBP", "crown": "CROWN"}
RTOL = 1e-5


@pytest.fixture(autouse=True)
def float64():
    # auto_LiRPA 0.3 builds its identity specifications in the default dtype.
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


def lirpa_margins(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, method: str) -> torch.Tensor:
    bounded = lirpa.BoundedModule(copy.deepcopy(model), torch.zeros_like(x), device="cpu",
                                  bound_opts={"conv_mode": "matrix", "sparse_intermediate_bounds": False})
    bounded.train(model.training)
    lower, upper = input_box(x, eps)
    box = lirpa.BoundedTensor(x, lirpa.PerturbationLpNorm(norm=math.inf, x_L=lower, x_U=upper))
    logits = bounded(box)  # the clean pass, which training-mode BatchNorm takes its statistics from
    spec = margin_spec(y, logits.shape[1], x.dtype)
    lower_bound, _ = bounded.compute_bounds(x=(box,), method=LIRPA_NAMES[method], C=spec, bound_upper=False)
    return lower_bound.detach()


def assert_agree(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, method: str) -> float:
    ours = margin_lower_bounds(copy.deepcopy(model), x, y, eps, method).detach()
    theirs = lirpa_margins(model, x, y, eps, method)
    relative = ((ours - theirs).abs() / theirs.abs().clamp(min=1.0)).max().item()
    print(f"{method}: max relative difference {relative:.2e}")
    assert relative <= RTOL
    return relative


def with_random_batchnorm(model: nn.Sequential) -> nn.Sequential:
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.weight.uniform_(-1, 1)
                m.bias.uniform_(-1, 1)
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    return model


MODELS = {
    "linear": lambda: nn.Sequential(nn.Flatten(), nn.Linear(128, 16), nn.ReLU(), nn.Linear(16, 12), nn.ReLU(),
                                    nn.Linear(12, 5)),
    "conv": lambda: nn.Sequential(nn.Conv2d(2, 4, 3, stride=2, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.ReLU(),
                                  nn.Flatten(), nn.Linear(16, 5)),
    "conv-odd": lambda: nn.Sequential(nn.Conv2d(2, 3, 4, stride=2), nn.ReLU(), nn.Conv2d(3, 3, 2, padding=1),
                                      nn.ReLU(), nn.Flatten(), nn.Linear(48, 5)),
    "normalize": lambda: nn.Sequential(Normalize([0.4, 0.5], [0.2, 0.3]), nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(),
                                       nn.Flatten(), nn.Linear(256, 5)),
    "batchnorm": lambda: nn.Sequential(Normalize([0.4, 0.5], [0.2, 0.3]), nn.Conv2d(2, 4, 3, stride=2, padding=1),
                                       nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.ReLU(), nn.Flatten(),
                                       nn.Linear(16, 12), nn.BatchNorm1d(12), nn.ReLU(), nn.Linear(12, 5)),
}


# Every kind in eval mode, and BatchNorm also in training mode (clean-batch statistics).
CASES = [(kind, False) for kind in MODELS] + [("batchnorm", True)]


@pytest.mark.parametrize(("kind", "training"), CASES, ids=[k + ("-train" if t else "") for k, t in CASES])
@pytest.mark.parametrize("method", LIRPA_NAMES)
def test_random_models_agree_with_auto_lirpa(kind: str, method: str, training: bool) -> None:
    torch.manual_seed(0)
    model = with_random_batchnorm(MODELS[kind]().double()).train(training)
    for seed, eps in ((0, 0.02), (1, 0.1)):
        gen = torch.Generator().manual_seed(seed)
        x = torch.rand(6, 2, 8, 8, generator=gen)
        y = torch.randint(0, 5, (6,), generator=gen)
        assert_agree(model, x, y, eps, method)


# --- trained smoke models of every baseline ---------------------------------------------------------------

EPS = Fraction(1, 10)


def mnist(root: Path, train: bool, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first n MNIST images (pixels in [0, 1]) and labels, read from the raw idx files (torchvision has
    no build for torch 1.13 on Python 3.11)."""
    prefix = "train" if train else "t10k"
    with gzip.open(root / "MNIST" / "raw" / f"{prefix}-images-idx3-ubyte.gz") as fh:
        images = torch.frombuffer(bytearray(fh.read()[16:]), dtype=torch.uint8)
    with gzip.open(root / "MNIST" / "raw" / f"{prefix}-labels-idx1-ubyte.gz") as fh:
        labels = torch.frombuffer(bytearray(fh.read()[8:]), dtype=torch.uint8)
    return images.view(-1, 1, 28, 28)[:n].double() / 255, labels[:n].long()


def smoke_config(method: str) -> dict:
    folder = SUITES_DIR / "mnist"
    files = {method: tomllib.loads((folder / f"{method}.toml").read_text())}
    return Suite("mnist", "mnist", (EPS,), (method,), {}, files, folder).method_config(method, "smoke", EPS, {})


@pytest.mark.slow
@pytest.mark.parametrize("method_name", ["ibp", "crown-ibp", "crown-ibp-fast"])
def test_trained_smoke_models_agree_with_auto_lirpa(method_name: str, data_dir: Path) -> None:
    """Train the MNIST smoke config (float32, as in the benchmark), then compare in float64."""
    method, info = registry.get(method_name), dataset_info("mnist")
    # Four epochs of the smoke recipe with a 2-epoch ramp: trained weights and BN statistics
    # are what matters here, not accuracy, and this environment has a slow torch build.
    cfg = {**smoke_config(method_name), "epochs": 4, "ramp_epochs": 2, "lr_milestones": []}
    torch.manual_seed(0)
    torch.set_default_dtype(torch.float32)
    model = method.build(info, cfg)
    x_train, y_train = mnist(data_dir, True, 2000)
    batch = cfg["batch_size"]
    recipe = method.recipe(model, info, cfg, EPS, batches_per_epoch=math.ceil(2000 / batch))
    for epoch in range(recipe.epochs):
        for k, start in enumerate(range(0, 2000, batch)):
            recipe.step(x_train[start : start + batch].float(), y_train[start : start + batch], epoch, k)
    torch.set_default_dtype(torch.float64)
    model = method.deploy(model).double()
    x, y = mnist(data_dir, False, 20)
    for bound in ("ibp", "crown-ibp"):
        assert_agree(model, x, y, float(EPS), bound)
    assert_agree(model, x[:2], y[:2], float(EPS), "crown")
