"""Training throughput of one cell on 1 process and on N ranks (torchrun, gloo on CPU / NCCL on CUDA),
measured side by side in one run. Informative, not a target: on a 2-core CPU two ranks share the cores
that one process would use with two threads.

    python -m bench.ddp_perf [--suite mnist] [--scale smoke] [--methods linf-dist crown-ibp] [--ranks 2]
                             [--steps 30] [--out results/perf/ddp-cpu.json]

Each configuration runs ``--steps`` training steps of the cell's own recipe on the global batch of its
config, after ``WARMUP`` untimed steps: one process on one thread, one process on all ``--threads``, and N
ranks on threads/N each (a rank with its own cores is what a cluster node gives it).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from fractions import Fraction
from pathlib import Path

import torch

WARMUP = 3


def _worker(suite: str, scale: str, method: str, eps: str, steps: int, out: str) -> None:
    from bench import data as datamod
    from bench import distributed
    from bench.config import load_suite
    from bench.store import parse_eps
    from methods import base as registry

    ranks, device = distributed.setup(torch.device("cpu"))
    loaded = load_suite(suite)
    cell = loaded.cells(scale, [method], [parse_eps(eps)], [0], {})[0]
    info = datamod.dataset_info(loaded.dataset)
    train = datamod.load_split(loaded.dataset, True, datamod.data_dir(None))
    if cell.scale.train_examples:
        train = datamod.Split(train.images[: cell.scale.train_examples], train.labels[: cell.scale.train_examples])
    m = registry.get(method)
    torch.manual_seed(0)
    model = m.build(info, cell.config)
    batches = datamod.TrainBatches(train, int(cell.config["batch_size"]), m.augmentation(info, cell.config), 0, device)
    recipe = m.recipe(model, info, cell.config, cell.eps, len(batches))
    # The last epoch: every recipe at its full training loss (bounds at ε_train, p at its final value),
    # known from the recipe rather than from any one method's config keys.
    epoch = recipe.epochs - 1
    examples, start = 0, 0.0
    for k, (x, y) in enumerate(batches.epoch(epoch)):
        if k == WARMUP:
            distributed.barrier()
            start = time.perf_counter()
        if k == WARMUP + steps:
            break
        lo, hi = distributed.shard(0, len(y), ranks)
        recipe.step(x[lo:hi], y[lo:hi], epoch, k)
        examples += len(y) if k >= WARMUP else 0
    distributed.barrier()
    wall = time.perf_counter() - start
    if ranks.main:
        Path(out).write_text(json.dumps({"examples": examples, "wall_s": wall, "steps": min(steps, k - WARMUP)}))


def _measure(args: argparse.Namespace, method: str, ranks: int, threads: int, tmp: Path) -> dict[str, float]:
    out = tmp / f"{method}-{ranks}-{threads}.json"
    worker = ["-m", "bench.ddp_perf", "--worker", args.suite, args.scale, method, args.eps, str(args.steps), str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    cmd = [sys.executable, *worker] if ranks == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}", *worker]
    subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL)
    done = json.loads(out.read_text())
    return {"ranks": ranks, "threads_per_rank": threads, "steps": done["steps"],
            "wall_s": round(done["wall_s"], 3), "examples_per_s": round(done["examples"] / done["wall_s"], 1)}


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        _worker(*sys.argv[2:6], int(sys.argv[6]), sys.argv[7])
        return 0
    import tempfile

    from bench.machine import cpu_model

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--suite", default="mnist")
    p.add_argument("--scale", default="smoke")
    p.add_argument("--eps", default="1/10")
    p.add_argument("--methods", nargs="+", default=["linf-dist", "crown-ibp"])
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--out", help="write the measurements as JSON here")
    args = p.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for method in args.methods:
            single = _measure(args, method, 1, 1, Path(tmp))
            one = _measure(args, method, 1, args.threads, Path(tmp))
            many = _measure(args, method, args.ranks, max(1, args.threads // args.ranks), Path(tmp))
            best = max(single["examples_per_s"], one["examples_per_s"])
            rows.append({"method": method, "one_process_one_thread": single, "one_process": one, "ranks": many,
                         "speedup_over_best_one_process": round(many["examples_per_s"] / best, 2)})
            print(f"{method}: 1 process {single['examples_per_s']} ex/s (1 thread), {one['examples_per_s']} ex/s "
                  f"({one['threads_per_rank']} threads); {args.ranks} ranks {many['examples_per_s']} ex/s "
                  f"({many['threads_per_rank']} thread each): ×{rows[-1]['speedup_over_best_one_process']} over "
                  "the better one-process run")
    record = {"machine": f"{cpu_model()} ({os.cpu_count()} cores)", "torch": torch.__version__, "backend": "gloo",
              "suite": args.suite, "scale": args.scale, "eps": str(Fraction(args.eps)), "rows": rows,
              "load_average_1min_after": round(os.getloadavg()[0], 2),
              "measured": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    if args.out:
        Path(args.out).write_text(json.dumps(record, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
