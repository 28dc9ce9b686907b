"""The CNN zoo of the IBP / CROWN-IBP literature (spec §1): DM-small, DM-medium, DM-large and CNN-7.

Every model is a plain ``nn.Sequential`` mapping pixel inputs (B, C, H, W) in [0, 1] to logits (B, K):
an optional ``Normalize`` layer, convolutions and fully connected layers each followed by ReLU (CNN-7:
by BatchNorm then ReLU), and a last ``Linear`` without ReLU. No pooling, no dropout, biases everywhere,
PyTorch default initialisation (as the CROWN-IBP reference code).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from methods.base import DatasetInfo, MethodError
from methods.normalize import Normalize
from methods.parallel import BatchNorm1d, BatchNorm2d

NORMALISATION: dict[str, tuple[tuple[float, ...], tuple[float, ...]] | None] = {
    "mnist": None,
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)),
}
"""Per-dataset (mean, std) of the input normalisation layer, as in all three reference codes (spec §2);
MNIST is not normalised."""


@dataclass(frozen=True)
class Conv:
    channels: int
    kernel: int
    stride: int
    padding: int


@dataclass(frozen=True)
class CnnSpec:
    """Hidden layers of one architecture; the final ``Linear(·, K)`` is implied."""

    convs: tuple[Conv, ...]
    hidden: tuple[int, ...]
    batchnorm: bool = False


def _dm_large(width: int = 64, linear_size: int = 512, batchnorm: bool = False) -> CnnSpec:
    # CROWN-IBP's PyTorch DM-large: symmetric padding 1 everywhere (spec §1.1); CNN-7 adds BatchNorm.
    return CnnSpec(
        convs=(
            Conv(width, 3, 1, 1),
            Conv(width, 3, 1, 1),
            Conv(2 * width, 3, 2, 1),
            Conv(2 * width, 3, 1, 1),
            Conv(2 * width, 3, 1, 1),
        ),
        hidden=(linear_size,),
        batchnorm=batchnorm,
    )


ARCHITECTURES: dict[str, CnnSpec] = {
    "dm-small": CnnSpec(convs=(Conv(16, 4, 2, 0), Conv(32, 4, 1, 0)), hidden=(100,)),
    "dm-medium": CnnSpec(
        convs=(Conv(32, 3, 1, 0), Conv(32, 4, 2, 0), Conv(64, 3, 1, 0), Conv(64, 4, 2, 0)),
        hidden=(512, 512),
    ),
    "dm-large": _dm_large(),
    "cnn-7": _dm_large(batchnorm=True),
}


def architecture(name: str, width: int | None = None, linear_size: int | None = None) -> CnnSpec:
    """The named spec; CNN-7 also takes FAST's ``width`` (first conv channels, 64) and ``linear_size``
    (512) options, which the smaller scales of this benchmark use."""
    if name not in ARCHITECTURES:
        raise MethodError(f"unknown architecture {name!r}; known: {', '.join(ARCHITECTURES)}")
    if name != "cnn-7":
        if width is not None or linear_size is not None:
            raise MethodError(f"{name} has a fixed size; width and linear_size apply to cnn-7 only")
        return ARCHITECTURES[name]
    return _dm_large(width or 64, linear_size or 512, batchnorm=True)


def build_cnn(spec: CnnSpec, info: DatasetInfo) -> nn.Sequential:
    channels, height, width = info.input_shape
    layers: list[nn.Module] = []
    norm = NORMALISATION.get(info.name)
    if norm is not None:
        layers.append(Normalize(*norm))
    for conv in spec.convs:
        layers.append(nn.Conv2d(channels, conv.channels, conv.kernel, conv.stride, conv.padding))
        if spec.batchnorm:
            layers.append(BatchNorm2d(conv.channels))
        layers.append(nn.ReLU())
        channels = conv.channels
        height = (height + 2 * conv.padding - conv.kernel) // conv.stride + 1
        width = (width + 2 * conv.padding - conv.kernel) // conv.stride + 1
    layers.append(nn.Flatten())
    features = channels * height * width
    for size in spec.hidden:
        layers.append(nn.Linear(features, size))
        if spec.batchnorm:
            layers.append(BatchNorm1d(size))
        layers.append(nn.ReLU())
        features = size
    layers.append(nn.Linear(features, info.num_classes))
    return nn.Sequential(*layers)


def ibp_init(model: nn.Module) -> None:
    """Shi et al.'s IBP initialisation: every Conv/Linear weight except the last layer's is redrawn from
    N(0, σ²) with σ = √(2π)/fan_in, so fan_in·E|w| = 2 and, as a ReLU keeps about half of an interval, the
    expected interval width is preserved layer to layer at initialisation. Biases, BatchNorm and the last
    layer keep PyTorch defaults."""
    weighted = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    with torch.no_grad():
        for module in weighted[:-1]:
            fan_in = module.weight[0].numel()
            module.weight.normal_(0.0, math.sqrt(2 * math.pi) / fan_in)
