"""``python -m bench run``: expand a suite into cells and run the missing ones (train → evaluate → record).

A cell is done when its ``result.json`` loads with status complete; it is then never redone. A cell that
stopped mid-training resumes from ``checkpoint.pt`` (written atomically after every epoch, holding the
model, the recipe's optimiser state and the per-epoch log), and because schedules and data order are
functions of (seed, epoch, batch), it ends exactly where an uninterrupted run would.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import re
import subprocess
import sys
import time
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import torch

from bench import data as datamod
from bench import distributed, slices
from bench.config import ATTACKS, Cell, Suite, load_suite, parse_overrides
from bench.errors import BenchError, NoResults
from bench.estimate import ESTIMATE_ACCURACY
from bench.evaluate import VERDICT_COLUMNS, AttackPlan, Evaluation, evaluate_cell, merge, recertify
from bench.lock import CellBusy, CellLock
from bench.lock import holder as lock_holder
from bench.machine import device_name, resolve_device
from bench.store import (
    RESULT_FILE,
    SCHEMA_VERSION,
    add_out_argument,
    atomic_write_bytes,
    atomic_write_json,
    cell_dir,
    dump_config,
    ensure_writable,
    format_eps,
    load_result,
    parse_eps,
    read_csv,
    remove_stale_temporaries,
    result_file,
    write_csv,
)
from methods import base as registry

CHECKPOINT = "checkpoint.pt"
MODEL = "model.pt"


def _git_commit() -> str:
    try:
        root = Path(__file__).resolve().parent.parent
        rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=5)
        # Result files are outputs, not code: a run that rewrites committed results is not "dirty".
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ".", ":!results"],
                               cwd=root, capture_output=True, text=True, timeout=5)
        if rev.returncode != 0:
            return "unknown"
        return rev.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def versions() -> dict[str, str]:
    import torchvision

    from importlib.metadata import PackageNotFoundError, version

    try:
        ours = version("certbench")
    except PackageNotFoundError:
        ours = "unknown"
    return {"python": platform.python_version(), "torch": torch.__version__, "torchvision": torchvision.__version__,
            "certbench": ours, "git": _git_commit()}


@dataclass
class RunOptions:
    out: Path
    data_dir: Path
    device: torch.device
    progress: bool
    versions: dict[str, str]
    """Taken when the run starts: the code that runs, even if the checkout changes while it does."""


def cell_folder(cell: Cell, out: Path) -> Path:
    return cell_dir(out, cell.scale.name, cell.suite, cell.dataset, cell.eps, cell.method_folder, cell.seed)


def cell_state(cell: Cell, out: Path) -> str:
    """running (another process holds the cell's lock), else ``result_state``."""
    return "running" if lock_holder(cell_folder(cell, out)) is not None else result_state(cell, out)


def result_state(cell: Cell, out: Path) -> str:
    """done / stale (finished under another config) / partial / corrupt / missing."""
    folder = cell_folder(cell, out)
    result = folder / RESULT_FILE
    if result.exists():
        try:
            record = load_result(result).record
        except BenchError:
            return "corrupt"
        return "done" if record["config"] == dump_config(cell.config) else "stale"
    return "partial" if (folder / CHECKPOINT).exists() else "missing"


def changed_keys(cell: Cell, out: Path) -> list[str]:
    """The config keys in which a stale cell's finished result differs from the cell's config now."""
    recorded = load_result(cell_folder(cell, out) / RESULT_FILE).record["config"]
    current = dump_config(cell.config)
    return sorted(k for k in set(recorded) | set(current) if recorded.get(k) != current.get(k))


def _load_checkpoint(path: Path, config: dict[str, Any]) -> dict[str, Any] | None:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # any unreadable checkpoint is restarted, never trusted
        print(f"warning: {path}: unreadable checkpoint ({exc.__class__.__name__}); training restarts", file=sys.stderr)
        return None
    if not isinstance(state, dict) or state.get("config") != config:
        print(f"warning: {path}: checkpoint from a different config; training restarts", file=sys.stderr)
        return None
    return state


def _epoch_means(rows: list[dict[str, float]]) -> dict[str, float]:
    keys = rows[0].keys()
    return {k: sum(r[k] for r in rows) / len(rows) for k in keys}


def train_cell(cell: Cell, folder: Path, opts: RunOptions, train_split: datamod.Split,
               config_record: dict[str, Any]) -> tuple[torch.nn.Module, float, list[dict[str, float]]]:
    from tqdm import tqdm

    method = registry.get(cell.method)
    info = datamod.dataset_info(cell.dataset)
    ranks = distributed.current()
    torch.manual_seed(cell.seed)
    model = method.build(info, cell.config).to(opts.device)
    batches = datamod.TrainBatches(train_split, int(cell.config["batch_size"]),
                                   method.augmentation(info, cell.config), cell.seed, opts.device)
    recipe = method.recipe(model, info, cell.config, cell.eps, len(batches))

    log: list[dict[str, float]] = []
    start_epoch, train_s = 0, 0.0
    ckpt_path = folder / CHECKPOINT
    if ckpt_path.exists():
        state = _load_checkpoint(ckpt_path, config_record)
        if state is not None:
            model.load_state_dict(state["model"])
            recipe.load_state_dict(state["recipe"])
            log, start_epoch, train_s = list(state["log"]), int(state["epoch"]) + 1, float(state["train_s"])
            print(f"  resuming {cell.label} after epoch {start_epoch}", file=sys.stderr)
    if distributed.agree(start_epoch) != start_epoch:
        raise BenchError(f"rank {ranks.rank} reads another checkpoint than rank 0: the output folder must be on a "
                         "filesystem that every rank shares")
    distributed.broadcast_module(model)

    for epoch in range(start_epoch, recipe.epochs):
        t0 = time.perf_counter()
        rows: list[dict[str, float]] = []
        bar = tqdm(batches.epoch(epoch), total=len(batches), desc=f"epoch {epoch + 1}/{recipe.epochs}",
                   unit="batch", leave=False, disable=not opts.progress)
        for k, (x, y) in enumerate(bar):
            # Every rank draws the same global batch and trains on its slice (methods.parallel).
            lo, hi = distributed.shard(0, len(y), ranks)
            rows.append(distributed.mean_stats(recipe.step(x[lo:hi], y[lo:hi], epoch, k), hi - lo))
            last = rows[-1]
            bar.set_postfix(loss=f"{last['loss']:.4f}", p=f"{last.get('p', math.nan):.4g}",
                            lam=f"{last.get('lam', math.nan):.2e}", lr=f"{last.get('lr', math.nan):.2e}")
        wall = time.perf_counter() - t0
        train_s += wall
        row = {"epoch": float(epoch), "wall_s": wall, "batches_per_s": len(batches) / wall, **_epoch_means(rows)}
        log.append(row)
        if ranks.main:
            # Checkpoint first: whenever train_log.csv shows an epoch, a checkpoint at least that far exists.
            _save(ckpt_path, {"config": config_record, "epoch": epoch, "model": model.state_dict(),
                              "recipe": recipe.state_dict(), "log": log, "train_s": train_s})
            write_csv(folder / "train_log.csv", row.keys(), [[r[k] for k in row] for r in log])
        print(f"  epoch {epoch + 1}/{recipe.epochs}: loss {row['loss']:.4f} acc {row.get('acc', math.nan):.3f} "
              f"p {row.get('p', math.nan):.4g} lr {row.get('lr', math.nan):.2e} ({wall:.1f}s)", file=sys.stderr)
    return model, train_s, log


def _save(path: Path, obj: Any) -> None:
    import io

    buf = io.BytesIO()
    torch.save(obj, buf)
    atomic_write_bytes(path, buf.getvalue())


def _provenance(opts: RunOptions, started: datetime, timings: dict[str, float]) -> dict[str, Any]:
    return {
        "versions": opts.versions,
        "device": opts.device.type,
        "device_name": device_name(opts.device),
        "threads": torch.get_num_threads(),
        "host": platform.node(),
        "started": started.isoformat(timespec="seconds"),
        "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "timings_s": {k: round(v, 3) for k, v in timings.items()},
    }


def _write_verdicts(folder: Path, name: str, ev: Evaluation) -> None:
    write_csv(folder / name, VERDICT_COLUMNS, ev.rows())


def _config_record(cell: Cell) -> dict[str, Any]:
    return {
        "cell": {"suite": cell.suite, "dataset": cell.dataset, "eps": format_eps(cell.eps), "method": cell.method,
                 "variant": cell.variant, "scale": cell.scale.name, "seed": cell.seed},
        "config": dump_config(cell.config),
        "scale_config": cell.scale.as_dict(),
    }


def run_cell(cell: Cell, opts: RunOptions, splits: dict[bool, datamod.Split]) -> dict[str, Any] | None:
    """Train (or resume) and evaluate one cell under its method's own verifier; write ``result.json``.
    Under several ranks rank 0 writes and returns the record, the others return None."""
    started = datetime.now(timezone.utc)
    model, train_s = train_model(cell, opts, splits)
    ranks = distributed.current()
    # Each rank evaluates its own contiguous slice; per-point random streams make the merged verdicts
    # those of one pass over the whole range.
    part = evaluate_cell(cell, model, splits[False], distributed.shard(*cell.scale.test_range, ranks), opts.device,
                         opts.progress)
    ev = merge(distributed.gather(part))
    if not ranks.main:
        return None
    return write_record(cell, opts, started, ev, train_s)


def train_model(cell: Cell, opts: RunOptions, splits: dict[bool, datamod.Split]) -> tuple[torch.nn.Module, float]:
    """Train (or resume) a cell and save its deployed model; returns it and the training seconds."""
    folder = cell_folder(cell, opts.out)
    ranks = distributed.current()
    config_record = _config_record(cell)
    if ranks.main:
        ensure_writable(folder)
        remove_stale_temporaries(folder)
        # What a previous model of this cell left: other verifiers' records, evaluation slices, and the
        # model itself, which would otherwise pass for this config's (config.json is rewritten below)
        # until training saves the new one.
        for old in [*folder.glob(result_file("*")), *folder.glob("verdicts-*.csv")]:
            old.unlink()
        slices.remove_parts(folder)
        (folder / MODEL).unlink(missing_ok=True)
        atomic_write_json(folder / "config.json", config_record)
    distributed.barrier()

    train = splits[True]
    if cell.scale.train_examples:
        train = datamod.Split(train.images[: cell.scale.train_examples], train.labels[: cell.scale.train_examples])
    model, train_s, _ = train_cell(cell, folder, opts, train, config_record)
    registry.get(cell.method).deploy(model)
    if ranks.main:
        _save(folder / MODEL, model.state_dict())
    return model, train_s


def write_record(cell: Cell, opts: RunOptions, started: datetime, ev: Evaluation, train_s: float,
                 trained: dict[str, Any] | None = None) -> dict[str, Any]:
    """The cell's ``verdicts.csv`` and ``result.json`` from its whole evaluation; ends the cell.
    ``trained``: the provenance of the run that trained the model, when this one only evaluates it."""
    folder = cell_folder(cell, opts.out)
    _write_verdicts(folder, "verdicts.csv", ev)
    timings = {"train": train_s, **ev.timings_s}
    timings["total"] = sum(timings.values())
    record = {
        "schema": SCHEMA_VERSION,
        "status": "complete",
        **_config_record(cell),
        "metrics": ev.metrics(),
        "counts": ev.counts(),
        "n_examples": ev.n,
        "index_range": list(cell.scale.test_range),
        "certifier": ev.certifier,
        "eps": {"test": format_eps(cell.eps), "train": str(cell.config.get("eps_train", format_eps(cell.eps)))},
        "assumed": dict(cell.assumed),
        "attack": AttackPlan.of(cell.scale).record(),
        "provenance": _provenance(opts, started, timings),
        "files": {"verdicts": "verdicts.csv", "train_log": "train_log.csv", "model": MODEL, "config": "config.json"},
    }
    if trained is not None:
        record["provenance"]["trained"] = trained
    atomic_write_json(folder / RESULT_FILE, record)
    (folder / CHECKPOINT).unlink(missing_ok=True)
    slices.remove_parts(folder)
    return record


def evaluate_in_slices(cell: Cell, opts: RunOptions, test: datamod.Split, n: int, only: int | None
                       ) -> dict[str, Any] | None:
    """Evaluate slice ``only`` (or every missing slice) of a trained cell; the call that completes the set
    merges the slices and writes the record, which it returns."""
    folder = cell_folder(cell, opts.out)
    for k in [only] if only is not None else range(n):
        slices.evaluate_slice(cell, folder, opts.device, test, k, n, opts.progress)
    try:
        with CellLock(folder):
            if result_state(cell, opts.out) == "done":
                return None
            done = slices.merged(folder, n)
            if done is None:
                print(f"  {slices.parts_done(folder, n)} of {n} slices evaluated; the job that evaluates the last "
                      "one writes the result", file=sys.stderr)
                return None
            ev, started = done
            train_s = sum(float(r["wall_s"]) for r in read_csv(folder / "train_log.csv"))
            return write_record(cell, opts, datetime.fromisoformat(started), ev, train_s)
    except CellBusy as busy:
        print(f"  another run holds the cell ({busy}); it writes the result", file=sys.stderr)
        return None


def certify_cell(cell: Cell, opts: RunOptions, test: datamod.Split, certifier: str) -> dict[str, Any]:
    """Certify a finished cell's model with another verifier; write ``result-<certifier>.json``.

    The trained model, clean and PGD verdicts are the cell's own (``result.json``); only the certificates
    are new, and they are checked against the PGD verdicts like any other.
    """
    from bench import load_model

    folder = cell_folder(cell, opts.out)
    started = datetime.now(timezone.utc)
    main = load_result(folder / RESULT_FILE).record
    try:
        previous = Evaluation.from_rows(read_csv(folder / "verdicts.csv"), main["certifier"])
    except (OSError, KeyError, ValueError) as exc:
        raise BenchError(f"{folder}/verdicts.csv is missing or corrupt ({exc.__class__.__name__}); "
                         "delete result.json to re-run the cell") from None
    method = registry.get(cell.method)
    model = load_model(folder, str(opts.device))
    ev = recertify(method, model, test, previous, float(cell.eps), AttackPlan.of(cell.scale),
                   cell.scale.eval_batch_size, opts.device, cell.seed, certifier)
    verdicts = f"verdicts-{certifier}.csv"
    _write_verdicts(folder, verdicts, ev)
    record = {**main, "metrics": ev.metrics(), "counts": ev.counts(), "certifier": ev.certifier,
              "provenance": _provenance(opts, started, {**ev.timings_s, "total": sum(ev.timings_s.values())}),
              "files": {**main["files"], "verdicts": verdicts}}
    atomic_write_json(folder / result_file(certifier), record)
    return record


def reevaluate_cell(cell: Cell, opts: RunOptions, test: datamod.Split) -> dict[str, Any]:
    """Evaluate a finished cell's stored model again under the code that runs now (clean, attacks, the
    method's own certificate) and replace its result; the training and its provenance are kept.

    A result is only as sound as the certificate that made it, and retraining to refresh one would change
    the model as well: this refreshes the verdicts of the same weights.
    """
    from bench import load_model

    folder = cell_folder(cell, opts.out)
    old = load_result(folder / RESULT_FILE).record["provenance"]
    started = datetime.now(timezone.utc)
    model = load_model(folder, str(opts.device))
    ev = evaluate_cell(cell, model, test, cell.scale.test_range, opts.device, opts.progress)
    # A model re-evaluated twice keeps the provenance of its training, not of the first re-evaluation.
    trained = old.get("trained", old)
    return write_record(cell, opts, started, ev, float(trained["timings_s"]["train"]), trained)


def _check_reevaluate(cells: list[Cell], states: dict[Cell, str], out: Path) -> None:
    """Every finished cell to re-evaluate must have its weights: refused before any work starts."""
    missing = [c for c in cells if states[c] == "done" and not (cell_folder(c, out) / MODEL).is_file()]
    if missing:
        raise BenchError(f"--reevaluate needs each finished cell's {MODEL}, and {len(missing)} lack it (first: "
                         f"{cell_folder(missing[0], out)}; results folders do not carry weights): retrain those "
                         "cells instead, or leave them out with --methods / --eps")


def extra_certifier_state(cell: Cell, out: Path, certifier: str) -> str:
    """done / missing for a cell's record under another verifier (corrupt ones are redone too)."""
    try:
        load_result(cell_folder(cell, out) / result_file(certifier))
    except BenchError:
        return "missing"
    return "done"


MAX_SEEDS = 1000
"""More seeds than this in one command is a typo (``0-100000000``), not a study."""


def parse_seeds(text: str) -> list[int]:
    """"0", "0-7" or "0,2,5" -> sorted unique non-negative seeds, at most ``MAX_SEEDS`` of them."""
    usage = f"--seeds expects N, A-B or a comma list of them (non-negative, A ≤ B), got {text!r}"
    seeds: set[int] = set()
    for part in text.split(","):
        match = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", part)
        if match is None:
            raise BenchError(usage)
        lo = int(match[1])
        hi = int(match[2]) if match[2] is not None else lo
        if hi < lo:
            raise BenchError(f"--seeds range {part.strip()} is empty: write A-B with A ≤ B")
        if hi - lo + 1 + len(seeds) > MAX_SEEDS:
            raise BenchError(f"--seeds {text} asks for more than {MAX_SEEDS} seeds")
        seeds.update(range(lo, hi + 1))
    return sorted(seeds)


def select_cells(args: argparse.Namespace) -> tuple[Suite, list[Cell]]:
    suite = load_suite(args.suite)
    eps = [parse_eps(e) for e in args.eps] if args.eps else None
    if eps:
        unknown = [format_eps(e) for e in eps if e not in suite.eps]
        if unknown:
            print(f"note: ε {', '.join(unknown)} is not one of the suite's published values; "
                  "method configs use their base (untuned) values there", file=sys.stderr)
    if args.seed < 0:
        raise BenchError(f"--seed must be non-negative, got {args.seed}")
    seeds = parse_seeds(args.seeds) if args.seeds is not None else [args.seed]
    return suite, suite.cells(args.scale, args.methods, eps, seeds, parse_overrides(args.set or []))


def _check_certifier(cells: list[Cell], certifier: str | None) -> None:
    if certifier is None:
        return
    known = sorted({c for m in registry.iter_methods() for c in m.certifiers})
    if certifier not in known:
        raise BenchError(f"unknown certifier {certifier!r}; known: {', '.join(known)}")
    unable = sorted({c.method for c in cells if certifier not in registry.get(c.method).certifiers})
    if unable:
        verifiers = "; ".join(f"{m}: {', '.join(registry.get(m).certifiers)}" for m in unable)
        raise BenchError(f"--certifier {certifier} does not apply to {', '.join(unable)} ({verifiers}); "
                         "choose the methods with --methods")


def _needs_recertify(cell: Cell, out: Path, certifier: str | None) -> bool:
    """Whether a finished cell still lacks a record under ``certifier`` (its own verifier needs none)."""
    if certifier is None:
        return False
    own = load_result(cell_folder(cell, out) / RESULT_FILE).record["certifier"]
    return own != certifier and extra_certifier_state(cell, out, certifier) != "done"


def _summary(record: dict[str, Any]) -> str:
    m = record["metrics"]
    return (f"  clean {m['clean']:.2%}  pgd {m['pgd']:.2%}  certified {m['certified']:.2%} "
            f"({record['certifier']}, {record['provenance']['timings_s']['total']:.0f}s)")


def run_command(args: argparse.Namespace) -> int:
    suite, cells = select_cells(args)
    slices.check_shards(args.eval_shards, args.eval_shard)
    cells = [replace(c, scale=c.scale.with_attack(args.attack)) for c in cells]
    _check_certifier(cells, args.certifier)
    out = Path(args.out)
    states = {cell: cell_state(cell, out) for cell in cells}
    if args.dry_run:
        return _dry_run(cells, states, out, resolve_device(args.device), args.estimate)
    # Jobs pick their device where they run: a login node without a GPU must not refuse --device cuda.
    device = resolve_device(args.device) if args.executor == "local" else None
    if device is not None:
        ranks, device = distributed.setup(device)
        if ranks.world > 1 and (args.certifier is not None or args.reevaluate):
            raise BenchError("--certifier and --reevaluate run in one process; start them without torchrun")
        if ranks.world > 1 and args.eval_shards is not None:
            raise BenchError("--eval-shards splits the evaluation into jobs; under torchrun the ranks already "
                             "evaluate a slice each")
    elif distributed.ranks_from_env(os.environ).world > 1:
        raise BenchError(f"--executor {args.executor} submits jobs; run it in one process, not under torchrun "
                         "(--gpus-per-cell N makes each job use N devices)")
    if args.reevaluate:
        if device is None or args.eval_shards is not None:
            raise BenchError("--reevaluate runs in this process: leave out --executor and --eval-shards")
        _check_reevaluate(cells, states, out)
    ensure_writable(out)
    kept = [c for c in cells if states[c] == "stale" and not args.replace_stale]
    todo = [c for c in cells if states[c] not in ("done", "running") and c not in kept]
    where = device_name(device) if device is not None else f"{args.executor} jobs"
    print(f"suite {suite.name} ({args.scale}): {len(cells)} cells, {sum(s == 'done' for s in states.values())} "
          f"done, {len(todo)} to run on {where} -> {out}", file=sys.stderr)
    for cell in cells:
        if states[cell] == "running":
            print(f"  {cell.label}: skipped, another run holds it ({_holder_text(cell, out)})", file=sys.stderr)
    for cell in kept:
        print(f"  {cell.label}: {_kept_text(cell, out)}", file=sys.stderr)
    if device is None:
        from bench.executors import submit_cells

        return submit_cells(args, suite, todo, out)
    if args.eval_shards is not None:
        return _run_sliced(args, suite.name, todo, out, device)
    finished = [c for c in cells if states[c] == "done"]
    if todo or (args.reevaluate and finished) or any(_needs_recertify(c, out, args.certifier) for c in finished):
        root = datamod.data_dir(args.data_dir)
        splits = _load_splits(suite.dataset, root)
        opts = RunOptions(out, root, device, not args.no_progress, versions())
        for i, cell in enumerate(todo, 1):
            print(f"[{i}/{len(todo)}] {cell.label}", file=sys.stderr)
            _locked(cell, out, lambda c=cell: _train_if_pending(c, opts, splits, args.replace_stale))
        for cell in finished if args.reevaluate else []:
            print(f"{cell.label}: re-evaluating its model", file=sys.stderr)
            _locked(cell, out, lambda c=cell: print(_summary(reevaluate_cell(c, opts, splits[False])),
                                                    file=sys.stderr))
        for cell in cells:
            if result_state(cell, out) == "done" and _needs_recertify(cell, out, args.certifier):
                print(f"{cell.label}: certifying with {args.certifier}", file=sys.stderr)
                _locked(cell, out, lambda c=cell: print(_summary(certify_cell(c, opts, splits[False], args.certifier)),
                                                        file=sys.stderr))
    print_table(out, args.scale, suite.name)
    return 0


def _run_sliced(args: argparse.Namespace, suite: str, todo: list[Cell], out: Path, device: torch.device) -> int:
    """``--eval-shards N [--eval-shard K]`` in this process: train what is untrained (not with K: a slice
    job never trains), then evaluate the slices and merge them when all are there."""
    root = datamod.data_dir(args.data_dir)
    splits = _load_splits(todo[0].dataset, root) if todo else {}
    opts = RunOptions(out, root, device, not args.no_progress, versions())
    untrained = 0
    for i, cell in enumerate(todo, 1):
        print(f"[{i}/{len(todo)}] {cell.label}", file=sys.stderr)
        folder = cell_folder(cell, out)
        if not slices.trained(folder, cell):
            if args.eval_shard is not None:
                print("  not trained yet: train it first (the same command without --eval-shard)", file=sys.stderr)
                untrained += 1
                continue
            _locked(cell, out, lambda c=cell: _train_if_pending(c, opts, splits, args.replace_stale, False))
            if not slices.trained(folder, cell):
                continue
        record = evaluate_in_slices(cell, opts, splits[False], args.eval_shards, args.eval_shard)
        if record is not None:
            print(_summary(record), file=sys.stderr)
    print_table(out, args.scale, suite)
    return 1 if todo and untrained == len(todo) else 0


def run_one_slice(cell: Cell, out: Path, data_dir: Path, device: str, k: int, n: int) -> str:
    """Slice ``k`` of ``n`` of a trained cell's evaluation, as an executor's job runs it."""
    print(f"{cell.label}: slice {k} of {n}", file=sys.stderr)
    opts = RunOptions(out, data_dir, resolve_device(device), False, versions())
    if not slices.trained(cell_folder(cell, out), cell):
        raise BenchError(f"{cell.label} is not trained: its evaluation slices cannot run")
    evaluate_in_slices(cell, opts, datamod.load_split(cell.dataset, False, data_dir), n, k)
    return cell_state(cell, out)


def run_one_cell(cell: Cell, out: Path, data_dir: Path, device: str, replace_stale: bool,
                 evaluate_too: bool = True) -> str:
    """One cell as an executor's job runs it: the loop's own code for that cell (lock, state check, train,
    evaluate, record); returns the cell's state afterwards."""
    print(cell.label, file=sys.stderr)
    splits = _load_splits(cell.dataset, data_dir)
    _, where = distributed.setup(resolve_device(device))  # several tasks per job: one cell on several devices
    opts = RunOptions(out, data_dir, where, False, versions())
    _locked(cell, out, lambda: _train_if_pending(cell, opts, splits, replace_stale, evaluate_too))
    return cell_state(cell, out)


def _load_splits(dataset: str, root: Path) -> dict[bool, datamod.Split]:
    return {flag: datamod.load_split(dataset, flag, root) for flag in (True, False)}


def _locked(cell: Cell, out: Path, work: Callable[[], None]) -> None:
    """Run ``work`` holding the cell's lock; a cell another live process holds is skipped with a message.
    Under several ranks rank 0 holds the lock for all of them, and they follow its decision."""
    if not distributed.current().main:
        if distributed.agree(False):
            work()
        return
    try:
        with CellLock(cell_folder(cell, out)) as lock:
            distributed.agree(True)
            if lock.stale is not None:
                print(f"  note: the run that held this cell ({lock.stale.describe()}) is gone; taking it over",
                      file=sys.stderr)
            work()
    except CellBusy as busy:
        distributed.agree(False)
        print(f"  skipped: another run holds this cell ({busy})", file=sys.stderr)


def _train_if_pending(cell: Cell, opts: RunOptions, splits: dict[bool, datamod.Split], replace_stale: bool,
                      evaluate_too: bool = True) -> None:
    """Under the cell's lock: its state again (another run may have finished it meanwhile), then train
    and (unless ``evaluate_too`` is False: its evaluation runs in slices) evaluate."""
    state = distributed.agree(result_state(cell, opts.out))
    if state == "done":
        print("  finished by another run meanwhile", file=sys.stderr)
        return
    if state == "stale" and not replace_stale:
        print(f"  {_kept_text(cell, opts.out)}", file=sys.stderr)
        return
    if state == "corrupt":
        print("  its result file is unreadable: re-running the cell", file=sys.stderr)
    if not evaluate_too:
        if not slices.trained(cell_folder(cell, opts.out), cell):
            train_model(cell, opts, splits)
        return
    record = run_cell(cell, opts, splits)
    if record is not None:
        print(_summary(record), file=sys.stderr)


def _kept_text(cell: Cell, out: Path) -> str:
    return (f"kept: finished under a different config ({', '.join(changed_keys(cell, out))} differ); "
            "pass --replace-stale to retrain it and replace that result")


def _holder_text(cell: Cell, out: Path) -> str:
    who = lock_holder(cell_folder(cell, out))
    return who.describe() if who else "released just now"


def _dry_run(cells: list[Cell], states: dict[Cell, str], out: Path, device: torch.device, estimate: bool) -> int:
    from bench.estimate import estimate_seconds

    total = 0.0
    pending = [c for c in cells if states[c] not in ("done", "running")]
    if estimate and pending:
        print(f"estimating {len(pending)} pending cells: a few timed training steps and one evaluation batch each",
              file=sys.stderr, flush=True)
    for cell in cells:
        state = states[cell]
        line = f"{state:8s} {cell.label}"
        if state == "running":
            line += f"  ({_holder_text(cell, out)})"
        if state == "partial":
            line += f"  ({epochs_done(cell_folder(cell, out))} epochs done)"
        if estimate and cell in pending:
            n_train = cell.scale.train_examples or datamod.dataset_info(cell.dataset).train_size
            # A stale cell's log is its old training's; --replace-stale retrains it from the start.
            done = 0 if state == "stale" else epochs_done(cell_folder(cell, out))
            seconds = estimate_seconds(cell, device, n_train, done)
            total += seconds
            line += f"  ~{seconds / 60:.1f} min"
        print(f"{line}  -> {cell_folder(cell, out)}", flush=True)
    if estimate:
        print(f"estimated time for the pending cells on {device_name(device)}: ~{total / 60:.0f} min "
              f"(measured seconds per step × remaining steps, plus evaluation; {ESTIMATE_ACCURACY})")
    return 0


def epochs_done(folder: Path) -> int:
    """Epochs a partial cell has finished: the rows of its log (written after each epoch's checkpoint)."""
    try:
        return len(read_csv(folder / "train_log.csv"))
    except (OSError, UnicodeDecodeError):
        return 0


def print_table(out: Path, scale: str, suite: str) -> None:
    from bench.report import suite_table_markdown

    try:
        print(suite_table_markdown(out, scale, suite))
    except NoResults as exc:  # every cell was skipped (held by another run, or kept as stale)
        print(f"note: {exc}", file=sys.stderr)


def add_cell_arguments(p: argparse.ArgumentParser) -> None:
    """The options that choose cells (``select_cells``), shared by ``run`` and ``status``."""
    p.add_argument("--suite", required=True, help="suite name (see `python -m bench list`) or a suite folder")
    p.add_argument("--scale", default="small", help="paper | small | smoke (default: small)")
    p.add_argument("--methods", nargs="+", help="subset of the suite's methods")
    p.add_argument("--eps", nargs="+", help="subset of ε values, e.g. 8/255 0.3")
    p.add_argument("--seed", type=int, default=0, help="seed of every cell (default 0)")
    p.add_argument("--seeds", help="several seeds: N, A-B or a comma list (overrides --seed)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override a method config value (a TOML literal); the cell becomes a variant of its own, "
                        "<method>+KEY=VALUE, and never replaces the suite recipe's result")


def register_verb(sub: argparse._SubParsersAction) -> None:
    from bench import executors

    p = sub.add_parser("run", help="train, attack and certify the cells of a suite (resumes finished work)")
    add_cell_arguments(p)
    p.add_argument("--device", default="auto", help="auto | cpu | cuda (default: auto)")
    p.add_argument("--data-dir", help="dataset folder (default: $BENCH_DATA_DIR or ~/.cache/certbench/data)")
    add_out_argument(p, "where the cells' folders are written and resumed from")
    p.add_argument("--certifier", help="also certify every cell's model with this verifier (ibp, crown-ibp, crown, "
                                       "alpha-crown, milp, linf-interval; default: only the method's own); written "
                                       "beside the cell as result-<certifier>.json")
    p.add_argument("--reevaluate", action="store_true",
                   help="evaluate the stored model of every finished cell again under this version's code (clean, "
                        "attacks, the method's own certificate) and replace its result, keeping the training and its "
                        "provenance: for after a certifier or attack changed. Needs each cell's model.pt")
    p.add_argument("--attack", choices=ATTACKS,
                   help="pgd: the scale's PGD only; apgd: also the APGD-CE + APGD-T ensemble in a column of its own "
                        "(default: the scale's setting); applies to cells that run now")
    p.add_argument("--dry-run", action="store_true", help="list the cells and their state, run nothing")
    p.add_argument("--estimate", action="store_true",
                   help="with --dry-run: time a few training steps per pending cell to estimate its remaining cost "
                        f"({ESTIMATE_ACCURACY})")
    p.add_argument("--replace-stale", action="store_true",
                   help="retrain cells finished under a different config and replace their results (default: keep "
                        "them and say which keys differ)")
    p.add_argument("--eval-shards", type=int, metavar="N",
                   help="evaluate each trained cell in N slices of its test range, each written as a part file "
                        "and merged into the same result as one pass; with --executor slurm, one job per slice")
    p.add_argument("--eval-shard", type=int, metavar="K",
                   help="with --eval-shards N: only slice K (0 … N−1), for cells already trained; the job that "
                        "completes the set writes the result")
    p.add_argument("--no-progress", action="store_true",
                   help="no progress bars (the one-line summary of each epoch is still printed)")
    executors.add_arguments(p)
    p.set_defaults(func=run_command)
