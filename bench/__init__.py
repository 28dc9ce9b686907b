"""certbench: train, attack and certify ℓ∞ defences under one protocol (``python -m bench``)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn

from bench.errors import BenchError


def load_model(path: str | os.PathLike[str], device: str = "cpu") -> nn.Module:
    """The deployed model of a finished cell: pixel inputs in [0, 1], (B, C, H, W) -> logits, eval mode
    (and p = ∞ for ℓ∞-dist nets). ``path`` is the cell folder or any file in it.

    The architecture is rebuilt from ``config.json`` through the method registry and the weights are
    read with ``weights_only=True``: checkpoints and configs are data, never code.
    """
    from bench.data import dataset_info
    from methods import base as registry

    folder = Path(path)
    folder = folder.parent if folder.is_file() else folder
    try:
        record = json.loads((folder / "config.json").read_text())
        cell, cfg = record["cell"], record["config"]
    except FileNotFoundError:
        raise BenchError(f"{folder}: no config.json, not a cell folder") from None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise BenchError(f"{folder}/config.json is corrupt ({exc.__class__.__name__})") from None
    method = registry.get(cell["method"])
    model = method.build(dataset_info(cell["dataset"]), cfg)
    try:
        state = torch.load(folder / "model.pt", map_location=device, weights_only=True)
        model.load_state_dict(state)
    except FileNotFoundError:
        raise BenchError(f"{folder}: no model.pt (the cell has not finished, or its weights were not kept)") from None
    except Exception as exc:  # torch raises many types for truncated or foreign files
        raise BenchError(f"{folder}/model.pt is corrupt or not a {cell['method']} checkpoint "
                         f"({exc.__class__.__name__})") from None
    return method.deploy(model.to(device))
