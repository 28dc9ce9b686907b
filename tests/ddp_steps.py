"""A few training steps of one MNIST smoke cell exactly as ``bench.runner.train_cell`` takes them, in one
process or under ``torchrun``; rank 0 saves what ``tests/test_distributed.py`` compares.

Usage: [torchrun --nproc_per_node N] tests/ddp_steps.py METHOD EPOCH STEPS OUT.pt
Saved: the loss of every step, the gradient the optimizer saw at the first step (after the reduction over
ranks), the parameters after the last step, and the deployed model's logits on 100 test images.
"""

from __future__ import annotations

import os
import sys
from fractions import Fraction
from pathlib import Path

import torch

from bench import data as datamod
from bench import distributed
from bench.config import load_suite
from methods import base as registry


def main(method_name: str, epoch: int, steps: int, out: str) -> None:
    ranks, device = distributed.setup(torch.device("cpu"))
    cell = load_suite("mnist").cells("smoke", [method_name], [Fraction(1, 10)], [0], {})[0]
    method = registry.get(method_name)
    info = datamod.dataset_info("mnist")
    root = Path(os.environ["BENCH_DATA_DIR"])
    train = datamod.load_split("mnist", True, root)
    train = datamod.Split(train.images[: cell.scale.train_examples], train.labels[: cell.scale.train_examples])
    torch.manual_seed(cell.seed)
    model = method.build(info, cell.config)
    batches = datamod.TrainBatches(train, int(cell.config["batch_size"]), method.augmentation(info, cell.config),
                                   cell.seed, device)
    recipe = method.recipe(model, info, cell.config, cell.eps, len(batches))
    first_grads: dict[str, torch.Tensor] = {}

    def record(optimizer: torch.optim.Optimizer, *_: object) -> None:
        if not first_grads:
            first_grads.update({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})

    recipe.optimizer.register_step_pre_hook(record)  # type: ignore[attr-defined]
    losses = []
    for k, (x, y) in enumerate(batches.epoch(epoch)):
        if k == steps:
            break
        lo, hi = distributed.shard(0, len(y), ranks)
        losses.append(distributed.mean_stats(recipe.step(x[lo:hi], y[lo:hi], epoch, k), hi - lo)["loss"])
    method.deploy(model)
    test = datamod.load_split("mnist", False, root)
    with torch.no_grad():
        logits = model(datamod.to_pixels(test.images[:100], device))
    if ranks.main:
        torch.save({"losses": losses, "grads": first_grads, "params": dict(model.named_parameters()),
                    "logits": logits}, out)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
