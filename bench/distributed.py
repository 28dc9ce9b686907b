"""One cell on several processes: the rank from torchrun's or srun's environment, the process group
(NCCL on CUDA, gloo on CPU), contiguous slices of a batch or test range, and agreement between ranks.

``torchrun --nproc_per_node N -m bench run ...`` sets RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR /
MASTER_PORT. Under ``srun`` (one task per device, no torchrun) submitit's ``TorchDistributedEnvironment``
derives the same variables from Slurm's. Every rank loads the data and draws the same global batch from the
seed, so the data order does not depend on the number of ranks; rank r trains on its slice (``shard``),
and ``methods.parallel`` makes batch statistics and gradients those of the global batch. Rank 0 alone
writes checkpoints and result files; every rank resumes from the same checkpoint.
"""

from __future__ import annotations

import atexit
import os
import sys
from dataclasses import dataclass
from typing import Any, Mapping, TypeVar

import torch
import torch.distributed as dist
from torch import nn

from bench.errors import BenchError

T = TypeVar("T")


@dataclass(frozen=True)
class Ranks:
    rank: int
    world: int
    local_rank: int

    @property
    def main(self) -> bool:
        return self.rank == 0


SINGLE = Ranks(0, 1, 0)
_current = SINGLE
_errors: Any = None
"""Where a rank other than 0 reports its error (its stdout and stderr go to /dev/null)."""


def current() -> Ranks:
    return _current


def ranks_from_env(env: Mapping[str, str]) -> Ranks:
    """The ranks torchrun (or submitit's export in ``setup``) set; else one process."""
    if "RANK" in env and "WORLD_SIZE" in env:
        try:
            ranks = Ranks(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", "0")))
        except ValueError:
            raise BenchError("RANK, WORLD_SIZE and LOCAL_RANK must be integers") from None
        if not 0 <= ranks.rank < ranks.world:
            raise BenchError(f"RANK {ranks.rank} is outside WORLD_SIZE {ranks.world}")
        return ranks
    return SINGLE


def _job_tasks(env: Mapping[str, str]) -> int:
    """Tasks of this srun step, or of this submitit-local job (SLURM_NTASKS is also set in a batch
    script itself, where only one process runs, so it is not read)."""
    try:
        return max(int(env.get("SLURM_STEP_NUM_TASKS", "1")), int(env.get("SUBMITIT_LOCAL_NTASKS", "1")))
    except ValueError:
        return 1


def setup(device: torch.device) -> tuple[Ranks, torch.device]:
    """Join the process group when several processes run this cell; returns the ranks and this rank's
    device (``cuda:LOCAL_RANK`` on GPUs). One process: nothing happens."""
    global _current, _errors
    if "RANK" not in os.environ and _job_tasks(os.environ) > 1:
        try:
            from submitit.helpers import TorchDistributedEnvironment
        except ImportError:
            raise BenchError("several tasks of one job need submitit to find their ranks: pip install -e '.[slurm]'") from None
        TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
    ranks = ranks_from_env(os.environ)
    if ranks.world == 1:
        return ranks, device
    if device.type == "cuda":
        device = torch.device("cuda", ranks.local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=ranks.rank,
                                world_size=ranks.world)
        atexit.register(teardown)
    _current = ranks
    if not ranks.main:
        # One voice: rank 0 prints the progress and the table; the others' errors still reach the
        # original stderr through ``bench.cli``.
        _errors = sys.stderr
        sys.stdout = sys.stderr = open(os.devnull, "w")
    return ranks, device


def error_stream() -> Any:
    """The stream for a one-line error: stderr, also on a rank whose other output is silenced."""
    return _errors if _errors is not None else sys.stderr


def teardown() -> None:
    global _current, _errors
    if dist.is_initialized():
        dist.destroy_process_group()
    _current = SINGLE


def shard(start: int, stop: int, ranks: Ranks) -> tuple[int, int]:
    """Rank r's contiguous part of [start, stop): sizes differ by at most one, nothing is padded or repeated."""
    n = stop - start
    return start + n * ranks.rank // ranks.world, start + n * (ranks.rank + 1) // ranks.world


def agree(value: T) -> T:
    """Rank 0's ``value`` on every rank (decisions taken from files that rank 0 alone writes)."""
    if _current.world == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather(value: T) -> list[T]:
    """Every rank's ``value``, in rank order, on every rank."""
    if _current.world == 1:
        return [value]
    out: list[Any] = [None] * _current.world
    dist.all_gather_object(out, value)
    return out


def barrier() -> None:
    if _current.world > 1:
        dist.barrier()


def broadcast_module(module: nn.Module) -> None:
    """Rank 0's parameters and buffers on every rank (as DDP does at construction)."""
    if _current.world == 1:
        return
    with torch.no_grad():
        for t in [*module.parameters(), *module.buffers()]:
            dist.broadcast(t.data, src=0)


def mean_stats(rows: dict[str, float], local_batch: int) -> dict[str, float]:
    """A step's logged values (means over this rank's slice) as means over the global batch."""
    if _current.world == 1:
        return rows
    keys = sorted(rows)
    t = torch.tensor([rows[k] * local_batch for k in keys] + [float(local_batch)], dtype=torch.float64)
    dist.all_reduce(t)
    return {k: float(t[i] / t[-1]) for i, k in enumerate(keys)}
