"""Show that the CI gate catches real regressions: apply each mutation of ``mutations.toml`` to every cell
of a baseline, produce the cells as CI would, and run ``bench check`` on them.

    python results/baselines/mutate.py half-epochs --out /tmp/mut      # retrains every baseline cell
    python results/baselines/mutate.py wrong-loss --out /tmp/mut
    python results/baselines/mutate.py certify-eps --out /tmp/mut --models .ci-results   # no retraining

Each writes ``<out>/<mutation>/`` (a results root) and prints the gate's verdict on it; the exit status is
0 when the gate FAILED for every method the mutation applies to (the mutation was caught), 1 otherwise;
certify-eps also checks the fixed checkpoints (``fixed/``), which must fail for every method too.
The cells (suites, ε, methods, seeds) are the baseline's own, so this runs what ``.ci/run`` gates. Cells
resume, so an interrupted run continues where it stopped. The harness code is untouched: (b) and (c) are
config overrides (``bench run --set``), judged by both layers that see training (the pooled accuracies of
``smoke.json`` and the training logs of ``smoke-trajectories.json``); (a) certifies the finished models at
``factor`` × ε.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import tomllib
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from contextlib import redirect_stdout
from fractions import Fraction
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from bench import load_model  # noqa: E402
from bench.cli import main as bench_main  # noqa: E402
from bench.config import load_suite  # noqa: E402
from bench.data import data_dir, load_split, to_pixels  # noqa: E402
from bench.evaluate import VERDICT_COLUMNS, Evaluation  # noqa: E402
from bench.regress import load_baseline  # noqa: E402
from bench.store import atomic_write_json, parse_eps, read_csv, write_csv  # noqa: E402
from methods import base as registry  # noqa: E402

HERE = Path(__file__).resolve().parent
MUTATIONS = ("certify-eps", "half-epochs", "wrong-loss")


def _cells(baseline: Path) -> list[tuple[str, str, Fraction, str, int]]:
    """(scale, suite, ε, method, seed) of every baseline cell."""
    out = []
    for key in load_baseline(baseline).cells:
        scale, suite, _dataset, eps_dir, method, seed = key.split("/")
        a, b = eps_dir.removeprefix("eps_").split("-")
        out.append((scale, suite, Fraction(int(a), int(b)), method, int(seed.removeprefix("seed"))))
    return out


def _toml(value: Any) -> str:
    """A TOML literal for ``bench run --set``."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    return repr(value)


def _half(value: Any) -> Any:
    if isinstance(value, list):
        return [_half(v) for v in value]
    return -(-int(value) // 2)


def _scaled(value: Any, factor: float) -> Any:
    if isinstance(value, str):
        return str(Fraction(value) * Fraction(factor).limit_denominator(1000))
    return value * factor


def overrides(mutation: str, spec: dict[str, Any], method: str, config: dict[str, Any]) -> dict[str, Any] | None:
    """The config overrides of ``mutation`` for one cell, or None when it does not apply to the method."""
    if mutation == "half-epochs":
        keys = spec["half_epochs"].get(method)
        return None if keys is None else {k: _half(config[k]) for k in keys if k in config}
    entry = spec["wrong_loss"].get(method)
    if entry is None:
        return None
    out: dict[str, Any] = {k: _scaled(config[k], f) for k, f in entry.get("scale", {}).items()}
    if "swap" in entry:
        a, b = entry["swap"]
        out.update({a: config[b], b: config[a]})
    out.update(entry.get("set", {}))
    if all(config.get(k) == v for k, v in out.items()):
        raise SystemExit(f"mutation {mutation} leaves {method}'s config unchanged: fix mutations.toml")
    return out


def retrain(mutation: str, spec: dict[str, Any], baseline: Path, out: Path, jobs: int) -> None:
    """Run every baseline cell under the mutation's overrides, ``jobs`` processes side by side."""
    commands = []
    for scale, suite, eps, method, seed in _cells(baseline):
        config = load_suite(suite).method_config(method, scale, eps, {})
        sets = overrides(mutation, spec, method, config)
        if sets is None:
            continue
        commands.append([sys.executable, "-m", "bench", "run", "--suite", suite, "--scale", scale, "--methods",
                         method, "--eps", str(eps), "--seed", str(seed), "--out", str(out), "--no-progress",
                         *[a for k, v in sets.items() for a in ("--set", f"{k}={_toml(v)}")]])
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def run(cmd: list[str]) -> int:
        print(" ".join(cmd[2:]), flush=True)
        return subprocess.run(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL).returncode

    with ThreadPoolExecutor(jobs) as pool:
        failed = [c for c, rc in zip(commands, pool.map(run, commands)) if rc != 0]
    if failed:
        raise SystemExit(f"{len(failed)} mutated cells failed to run, e.g. {' '.join(failed[0][2:])}")


def certify_at(factor: float) -> None:
    """Make every registered method's ``certify`` certify at ``factor`` × the ε it is asked for (in this process)."""
    depth = [0]  # a method whose certify calls its parent's must scale ε once

    def wrap(fn: Any) -> Any:
        def certify(self: Any, model: Any, x: Any, y: Any, eps: float, certifier: str | None = None) -> Any:
            depth[0] += 1
            try:
                return fn(self, model, x, y, eps * factor if depth[0] == 1 else eps, certifier)
            finally:
                depth[0] -= 1
        return certify

    for name in registry.list_methods():
        cls = type(registry.get(name))
        cls.certify = wrap(cls.certify)  # type: ignore[method-assign]


def certify_eps(baseline: Path, models: Path, out: Path) -> None:
    """Copy each finished baseline cell from ``models`` and replace its certified accuracy by its method's own
    certifier's, run in this (mutated) process (clean and PGD verdicts stay the model's)."""
    import shutil

    import torch

    torch.set_num_threads(1)
    root = data_dir(None)
    splits: dict[str, Any] = {}
    for key in load_baseline(baseline).cells:
        src, dst = models / key, out / key
        if (dst / "result.json").exists():
            continue
        record = json.loads((src / "result.json").read_text())
        dataset, method = record["cell"]["dataset"], registry.get(record["cell"]["method"])
        if dataset not in splits:
            splits[dataset] = load_split(dataset, False, root)
        start, stop = record["index_range"]
        x = to_pixels(splits[dataset].images[start:stop], torch.device("cpu"))
        y = splits[dataset].labels[start:stop]
        eps = float(parse_eps(record["eps"]["test"]))
        model = load_model(src)
        batch = int(record["scale_config"]["eval_batch_size"])
        certified = torch.cat([method.certify(model, x[i:i + batch], y[i:i + batch], eps, record["certifier"]).certified
                               for i in range(0, len(y), batch)])
        shutil.copytree(src, dst, dirs_exist_ok=True)
        # The verdict file is rewritten too: the result reader refuses a record whose counts disagree with it.
        evaluation = Evaluation.from_rows(read_csv(dst / "verdicts.csv"), record["certifier"])
        evaluation.certified = [bool(c) for c in certified.tolist()]
        write_csv(dst / "verdicts.csv", VERDICT_COLUMNS, evaluation.rows())
        record["counts"]["certified"] = evaluation.counts()["certified"]
        record["metrics"]["certified"] = evaluation.metrics()["certified"]
        atomic_write_json(dst / "result.json", record)
        print(f"{key}: certified {100 * record['metrics']['certified']:.2f} %", flush=True)


def judge(args: list[str], methods: set[str], what: str) -> set[str]:
    """Run ``bench check`` with ``args``; the methods of ``methods`` it failed for (caught)."""
    buf = io.StringIO()
    with redirect_stdout(buf):
        rc = bench_main(["check", *args])
    print(buf.getvalue())
    failed = set()
    for line in buf.getvalue().splitlines():
        words = line.split()
        if words and words[-1] in ("REGRESSED", "MISSING", "SUSPECT", "CHANGED", "DIVERGED") and words[0].count("/") in (1, 5):
            failed.add(words[0].split("/")[1 if words[0].count("/") == 1 else 4])
    missed = sorted(methods - failed)
    print(f"{what}: gate exit {rc}; caught: {', '.join(sorted(failed & methods)) or 'none'}; "
          f"missed: {', '.join(missed) or 'none'}")
    return failed & methods if rc == 1 else set()


def judge_variants(baseline: Path, trajectories: Path, root: Path, methods: set[str]) -> bool:
    """The gate on retrained cells. ``bench run --set`` files them as variants (``<method>+key=value``), which
    ``bench check`` rightly never takes for the recipe's own cells; here the mutated recipe stands in for the
    recipe, so each variant is compared as the cell it mutates, by both layers that judge trained cells: the
    pooled accuracies (REGRESSED or SUSPECT) and the recorded training logs (DIVERGED). A MISSING cell means
    the mutation did not run, and counts as not caught."""
    from dataclasses import replace

    from bench import trajectory
    from bench.regress import compare, load_baseline, pool_table
    from bench.report.records import read_runs

    runs, problems = read_runs(root)
    for line in problems:
        print(line)
    as_recipe = [replace(r, key=r.key.replace(f"+{r.tag}/", "/"), tag="") for r in runs if r.tag]
    rows = compare(load_baseline(baseline), as_recipe)
    print(pool_table(rows))
    pooled = {r.pool.split("/")[1] for r in rows if r.status in ("REGRESSED", "SUSPECT")}
    missing = sorted({r.pool.split("/")[1] for r in rows if r.status == "MISSING"} & methods)
    divergences, compared, _ = trajectory.compare(trajectory.load(trajectories), as_recipe)
    print(trajectory.table(divergences))
    diverged = {d.cell.split("/")[4] for d in divergences}
    for name, caught in (("pooled accuracies", pooled), ("training logs", diverged)):
        print(f"{name}: caught: {', '.join(sorted(caught & methods)) or 'none'}; "
              f"missed: {', '.join(sorted(methods - caught)) or 'none'}")
    missed = sorted(methods - pooled - diverged)
    print(f"trained cells ({len(compared)} logs compared): missed by both layers: {', '.join(missed) or 'none'}"
          + (f"; not run (MISSING): {', '.join(missing)}" if missing else ""))
    return not missed and not missing


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("mutation", choices=MUTATIONS)
    p.add_argument("--out", required=True, help="folder for the mutated results (<out>/<mutation>/)")
    p.add_argument("--baseline", default=str(HERE / "smoke.json"))
    p.add_argument("--trajectories", default=str(HERE / "smoke-trajectories.json"))
    p.add_argument("--models", help="certify-eps: results root holding the finished baseline cells (CI's run), "
                                    "to certify them again as well")
    p.add_argument("--fixed", default=str(HERE / "fixed"), help="certify-eps: fixed checkpoints to check as well")
    p.add_argument("--jobs", type=int, default=2, help="cells run side by side, one thread each (default 2)")
    args = p.parse_args()
    spec = tomllib.loads((HERE / "mutations.toml").read_text())
    baseline = Path(args.baseline)
    out = Path(args.out) / args.mutation
    methods = {c[3] for c in _cells(baseline)}
    if args.mutation != "certify-eps":
        methods &= set(spec["half_epochs" if args.mutation == "half-epochs" else "wrong_loss"])
        retrain(args.mutation, spec, baseline, out, args.jobs)
        return 0 if judge_variants(baseline, Path(args.trajectories), out, methods) else 1
    # The gate as CI runs it fails when any layer does: the fixed checkpoints, or the trained cells' layers.
    certify_at(float(spec["certify_eps"]["factor"]))
    caught = judge(["--fixed", args.fixed], methods, "fixed checkpoints")
    if args.models:
        certify_eps(baseline, Path(args.models), out)
        caught |= judge(["--baseline", str(baseline), "--trajectories", args.trajectories, "--results", str(out)],
                        methods, "trained cells")
    else:
        print("trained cells: not checked (no --models)")
    missed = sorted(methods - caught)
    print(f"gate as a whole: missed: {', '.join(missed) or 'none'}")
    return 0 if not missed else 1


if __name__ == "__main__":
    sys.exit(main())
