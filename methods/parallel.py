"""What a method's code needs to train the same function when one batch is split across processes.

Under data parallelism (``torchrun`` / ``srun``, set up by ``bench.distributed``) every process holds a
contiguous slice of the global batch. Three things must then behave as in a one-process run:

* batch statistics (the ℓ∞-dist net's mean shift, BatchNorm in training mode, Shi et al.'s warm-up
  regularisers) are taken over the global batch, through a differentiable all-reduce, so that their
  values and their gradients are those of the whole batch;
* ``backward`` weights a process's loss (a mean over its slice) by its share n_r / N of the global batch;
* ``reduce_gradients`` sums the weighted gradients over processes before clipping or stepping.

With the sum in ``reduce_gradients`` the gradient is Σ_r (n_r/N) ∇mean_r = ∇ of the global mean, and a
term computed from global statistics gets its gradient summed from every process (the all-reduce's
backward), so it comes out once, in full. Outside a process group (one process, the default) every
function here is the plain one-process computation, bit for bit.

``torch.nn.parallel.DistributedDataParallel`` is not used to wrap models: the bound-based recipes
propagate bounds through the layers outside the model's ``forward``, which DDP's reducer does not see, and
gradient accumulation (CROWN-IBP's ``batch_multiplier``) needs the reduction at the step, not at every
backward. The reduction itself is one ``torch.distributed.all_reduce`` per step over a flat buffer, as
DDP's buckets do.
"""

from __future__ import annotations

from typing import Iterable, Sequence

import torch
import torch.distributed as dist
from torch import nn


def active() -> bool:
    """Whether this process is one of several in a process group."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _all_reduce(x: torch.Tensor) -> torch.Tensor:
    """Sum over processes, differentiable (its backward sums the incoming gradients over processes)."""
    from torch.distributed._functional_collectives import all_reduce

    return all_reduce(x, "sum", dist.group.WORLD)


def _count(x: torch.Tensor, dims: Sequence[int]) -> torch.Tensor:
    n = 1
    for d in dims:
        n *= x.shape[d]
    return torch.tensor(float(n), dtype=x.dtype, device=x.device)


def batch_mean(x: torch.Tensor, dims: Sequence[int] = (0,)) -> torch.Tensor:
    """``x.mean(dim=dims)`` over the global batch (``dims`` must include the batch dimension 0)."""
    if not active():
        return x.mean(dim=list(dims))
    local = x.sum(dim=list(dims))
    total = _all_reduce(torch.cat([local.flatten(), _count(x, dims).view(1)]))
    return (total[:-1] / total[-1]).view(local.shape)


def batch_moments(x: torch.Tensor, dims: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and biased variance over ``dims`` of the global batch."""
    if not active():
        return x.mean(dim=list(dims)), x.var(dim=list(dims), unbiased=False)
    mean = batch_mean(x, dims)
    keep = [1 if d in dims else s for d, s in enumerate(x.shape)]
    return mean, batch_mean((x - mean.view(keep)) ** 2, dims)


def global_sum(x: torch.Tensor) -> torch.Tensor:
    """``x.sum()`` over the global batch (every element of every process's ``x``)."""
    return _all_reduce(x.sum()) if active() else x.sum()


def global_mean(x: torch.Tensor) -> torch.Tensor:
    """``x.mean()`` over the global batch."""
    if not active():
        return x.mean()
    total = _all_reduce(torch.stack([x.sum(), torch.tensor(float(x.numel()), dtype=x.dtype, device=x.device)]))
    return total[0] / total[1]


def backward(loss: torch.Tensor, local_batch: int) -> None:
    """``loss.backward()`` for a loss that is a mean over this process's ``local_batch`` examples."""
    if not active():
        loss.backward()
        return
    n = torch.tensor([float(local_batch)], device=loss.device)
    dist.all_reduce(n)
    (loss * (local_batch / n.item())).backward()


def reduce_gradients(params: Iterable[nn.Parameter]) -> None:
    """Sum the parameters' gradients over processes (one flat all-reduce); a no-op in one process.

    A parameter without a gradient on this process takes part as zeros, so every process reduces the same
    buffer; it gets a gradient afterwards only if some process had one (an unused head stays unused).
    """
    if not active():
        return
    params = [p for p in params if p.requires_grad]
    had = torch.tensor([float(p.grad is not None) for p in params])
    dist.all_reduce(had)
    flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten() for p in params])
    dist.all_reduce(flat)
    offset = 0
    for p, used in zip(params, had.tolist()):
        size = p.numel()
        if used:
            p.grad = flat[offset:offset + size].view_as(p).clone()
        offset += size


class _GlobalBatchNorm:
    """BatchNorm whose training-mode statistics are those of the global batch when processes share one;
    in one process (and in eval mode) it is torch's own BatchNorm. The state dict is BatchNorm's."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bn: nn.modules.batchnorm._BatchNorm = self  # type: ignore[assignment]
        if not (bn.training and active()):
            return super().forward(x)  # type: ignore[misc]
        dims = [0, *range(2, x.dim())]
        mean, var = batch_moments(x, dims)
        with torch.no_grad():
            if bn.track_running_stats and bn.running_mean is not None and bn.running_var is not None:
                n = _all_reduce(_count(x, dims).view(1)).item()
                bn.num_batches_tracked.add_(1)  # type: ignore[union-attr]
                m = bn.momentum if bn.momentum is not None else 1.0 / float(bn.num_batches_tracked)
                bn.running_mean.mul_(1 - m).add_(mean.detach(), alpha=m)
                bn.running_var.mul_(1 - m).add_(var.detach() * n / max(n - 1, 1), alpha=m)
        shape = [1, -1, *([1] * (x.dim() - 2))]
        return (x - mean.view(shape)) * torch.rsqrt(var + bn.eps).view(shape) * _or_one(bn.weight, shape) \
            + _or_zero(bn.bias, shape)


def _or_one(w: torch.Tensor | None, shape: list[int]) -> torch.Tensor | float:
    return 1.0 if w is None else w.view(shape)


def _or_zero(b: torch.Tensor | None, shape: list[int]) -> torch.Tensor | float:
    return 0.0 if b is None else b.view(shape)


class BatchNorm1d(_GlobalBatchNorm, nn.BatchNorm1d):
    pass


class BatchNorm2d(_GlobalBatchNorm, nn.BatchNorm2d):
    pass
