"""Cross-check of the project's bound engine against auto_LiRPA 0.3 (an independent implementation).

Runs in the ``lirpa`` tox env (torch 1.13.1 + auto-LiRPA 0.3), which sets CERTBENCH_LIRPA=1: there a
failed auto_LiRPA import fails the run; elsewhere the module is skipped. IBP, CROWN-IBP and CROWN margin
lower bounds must agree to 1e-5 relative in float64, for random models of every supported layer kind and
for small CNNs trained here on MNIST and on CIFAR-10 (whose models start with the Normalize layer), each
at two ε, every bound on 20 test images.

auto_LiRPA is configured with ``conv_mode = "matrix"`` (its default "patches" mode cannot bound a
division by the normalisation constants before a convolution) and ``sparse_intermediate_bounds = False``:
by default it keeps IBP bounds for intermediate neurons that IBP proves stable *across the whole batch*,
which makes its "CROWN" both a different algorithm from CROWN (spec §6.2) and batch-dependent.
"""

from __future__ import annotations

import copy
import gzip
import math
import pickle
from fractions import Fraction
from pathlib import Path

import pytest
import torch
from torch import nn

from conftest import import_lirpa

lirpa = import_lirpa()
# The fixture lives in tests/conftest.py: a conftest.py here would shadow it for `from conftest import ...`.
pytestmark = pytest.mark.usefixtures("float64")

from bench.config import load_suite  # noqa: E402
from bench.data import dataset_info  # noqa: E402
from methods import base as registry  # noqa: E402
from methods.bounds import input_box, margin_lower_bounds, margin_spec  # noqa: E402
from methods.cnn import CnnSpec, Conv, build_cnn  # noqa: E402
from methods.normalize import Normalize  # noqa: E402

LIRPA_NAMES = {"ibp": "IBP", "crown-ibp": "CROWN-IBP", "crown": "CROWN"}
RTOL = 1e-5


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


# --- small CNNs trained here on each dataset -------------------------------------------------------------

TRAIN_IMAGES, TEST_IMAGES = 300, 20
TRAINED = {
    # dataset: (recipe, ε_train, the two ε compared). CROWN-IBP training with the smoke recipe of each
    # suite, shortened; CIFAR's model starts with the per-channel Normalize layer.
    "mnist": ("crown-ibp", Fraction(3, 10), (Fraction(1, 10), Fraction(3, 10))),
    "cifar10": ("crown-ibp", Fraction(8, 255), (Fraction(2, 255), Fraction(8, 255))),
}
# Small enough that auto_LiRPA's dense "matrix" CROWN on 20 images takes seconds; BatchNorm included.
SMALL_CNN = CnnSpec(convs=(Conv(4, 4, 4, 0), Conv(8, 3, 2, 1)), hidden=(32,), batchnorm=True)


def mnist(root: Path, train: bool, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first n MNIST images (pixels in [0, 1]) and labels, read from the raw idx files (torchvision has
    no build for torch 1.13 on Python 3.11)."""
    prefix = "train" if train else "t10k"
    with gzip.open(root / "MNIST" / "raw" / f"{prefix}-images-idx3-ubyte.gz") as fh:
        images = torch.frombuffer(bytearray(fh.read()[16:]), dtype=torch.uint8)
    with gzip.open(root / "MNIST" / "raw" / f"{prefix}-labels-idx1-ubyte.gz") as fh:
        labels = torch.frombuffer(bytearray(fh.read()[8:]), dtype=torch.uint8)
    return images.view(-1, 1, 28, 28)[:n].double() / 255, labels[:n].long()


def cifar10(root: Path, train: bool, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first n CIFAR-10 images of the python batches (pixels in [0, 1]) and labels."""
    with open(root / "cifar-10-batches-py" / ("data_batch_1" if train else "test_batch"), "rb") as fh:
        batch = pickle.load(fh, encoding="bytes")
    images = torch.tensor(batch[b"data"][:n]).view(-1, 3, 32, 32)
    return images.double() / 255, torch.tensor(batch[b"labels"][:n]).long()


LOADERS = {"mnist": mnist, "cifar10": cifar10}


@pytest.mark.slow
@pytest.mark.parametrize("dataset", TRAINED)
def test_trained_models_agree_with_auto_lirpa(dataset: str, data_dir: Path, cifar_data_dir: Path) -> None:
    """Train (float32, as in the benchmark) for a few epochs, then compare in float64 at two ε."""
    method_name, eps_train, eps_values = TRAINED[dataset]
    method, info = registry.get(method_name), dataset_info(dataset)
    suite = {"mnist": "mnist", "cifar10": "cifar"}[dataset]
    # Two epochs with a 1-epoch ramp: trained weights and BatchNorm statistics matter here, not accuracy.
    cfg = load_suite(suite).method_config(method_name, "smoke", eps_train,
                                          {"epochs": 2, "ramp_start": 0, "ramp_epochs": 1, "lr_milestones": []})
    torch.manual_seed(0)
    torch.set_default_dtype(torch.float32)
    model = build_cnn(SMALL_CNN, info)
    assert dataset == "mnist" or isinstance(model[0], Normalize)
    x_train, y_train = LOADERS[dataset](data_dir, True, TRAIN_IMAGES)
    batch = cfg["batch_size"]
    recipe = method.recipe(model, info, cfg, eps_train, batches_per_epoch=math.ceil(TRAIN_IMAGES / batch))
    for epoch in range(recipe.epochs):
        for k, start in enumerate(range(0, TRAIN_IMAGES, batch)):
            recipe.step(x_train[start : start + batch].float(), y_train[start : start + batch], epoch, k)
    torch.set_default_dtype(torch.float64)
    model = method.deploy(model).double()
    x, y = LOADERS[dataset](data_dir, False, TEST_IMAGES)
    for eps in eps_values:
        for bound in LIRPA_NAMES:
            assert_agree(model, x, y, float(eps), bound)
