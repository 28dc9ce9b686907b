"""One cell on several processes (torchrun, gloo on CPU) and evaluation in slices of the test range.

Tolerances of the one-process comparison after ``STEPS`` steps, and why. The two runs differ only in the
order of float32 sums: a batch mean becomes slice sums added across ranks. Per tensor (relative L2 norm):

* loss of every step, ``LOSS_RTOL`` = 1e-5: measured ≤ 1e-6;
* the first step's reduced gradient, ``GRAD_RTOL`` = 1e-3: measured ≤ 5e-4 for ℓ∞-dist (an ulp of change in
  a mean-shifted activation can flip a near-tie in the next layer's max, sending a sample's gradient to
  another weight) and ≤ 4e-5 for the CNNs;
* the parameters, ``PARAM_RTOL`` = 1e-2: Adam's step lr · m / (√v + ε) does not shrink with the gradient,
  so entries whose gradient is at rounding level move by up to lr either way in any run; measured ≤ 3e-5
  (ℓ∞-dist) and 7e-3 (the Linear before crown-ibp-fast's last BatchNorm);
* the deployed model's logits, ``LOGIT_RTOL`` = 1e-3 of their largest magnitude: measured 1.7e-4.

What the tolerances guard: with each rank's batch statistics taken over its own slice (the bug this code
exists to avoid) the same comparisons measured losses 6e-4 / 9e-2 apart (ℓ∞-dist / crown-ibp-fast),
gradients 8e-2 / 0.7, parameters 0.1 / 0.6 and ℓ∞-dist's logits 7e-3: every check fails.
A rank count that does not divide the batch (3 ranks, batch 128) checks uneven slices.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import pytest
import torch

from bench import data as datamod
from bench import distributed
from bench.attacks import pgd_robust, random_robust
from bench.config import load_suite
from bench.evaluate import AttackPlan, evaluate, merge
from bench.store import read_csv
from methods import base as registry

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]

ROOT = Path(__file__).resolve().parent.parent
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
STEPS = 5
LOSS_RTOL = 1e-5
GRAD_RTOL = 1e-3
PARAM_RTOL = 1e-2
LOGIT_RTOL = 1e-3
ATTACKED = 40


def _env(data_dir: Path) -> dict[str, str]:
    return {**os.environ, "BENCH_DATA_DIR": str(data_dir), "BENCH_OFFLINE": "1", "OMP_NUM_THREADS": "1",
            "PYTHONPATH": str(ROOT)}


def _steps(data_dir: Path, out: Path, method: str, epoch: int, nproc: int) -> dict:
    script = [str(ROOT / "tests" / "ddp_steps.py"), method, str(epoch), str(STEPS), str(out)]
    cmd = [sys.executable, *script] if nproc == 1 else [*TORCHRUN, f"--nproc_per_node={nproc}", *script]
    done = subprocess.run(cmd, env=_env(data_dir), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return torch.load(out)


def _worst(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], leave_out: set[str] = set()) -> float:
    """The largest per-tensor relative L2 distance."""
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).detach().norm() / a[k].detach().norm().clamp_min(1e-30))
               for k in a if k not in leave_out)


@pytest.mark.parametrize("method,epoch,nproc", [
    ("linf-dist", 0, 2),     # p = 8, clean phase
    ("linf-dist", 3, 3),     # p ramp with the hinge term; 3 ranks: slices of 43, 43 and 42
    ("crown-ibp", 3, 2),     # ε ramp: IBP + CROWN-IBP bounds
])
def test_steps_match_one_process(tmp_path: Path, data_dir: Path, method: str, epoch: int, nproc: int) -> None:
    one = _steps(data_dir, tmp_path / "one.pt", method, epoch, 1)
    many = _steps(data_dir, tmp_path / "many.pt", method, epoch, nproc)
    assert len(one["losses"]) == len(many["losses"]) == STEPS
    assert many["losses"] == pytest.approx(one["losses"], rel=LOSS_RTOL)
    assert _worst(one["grads"], many["grads"]) <= GRAD_RTOL
    assert _worst(one["params"], many["params"]) <= PARAM_RTOL
    assert (one["logits"] - many["logits"]).abs().max() <= LOGIT_RTOL * one["logits"].abs().max()


def test_global_batch_statistics_with_batchnorm(tmp_path: Path, data_dir: Path) -> None:
    """crown-ibp-fast: BatchNorm in every block and Shi et al.'s warm-up regularisers, both statistics of
    the whole batch. Biases right before a BatchNorm have an exact gradient of 0 (BatchNorm subtracts
    them again), so their computed gradients are rounding noise that Adam turns into steps of ±lr; they
    are left out, and so are the logits, which depend on them through the running means: one process on
    1 and on 2 threads differs as much (2e-3 of logits of size 0.2, measured)."""
    one = _steps(data_dir, tmp_path / "one.pt", "crown-ibp-fast", 1, 1)
    many = _steps(data_dir, tmp_path / "many.pt", "crown-ibp-fast", 1, 2)
    assert many["losses"] == pytest.approx(one["losses"], rel=LOSS_RTOL)
    model = registry.get("crown-ibp-fast").build(datamod.dataset_info("mnist"), load_suite("mnist").cells(
        "smoke", ["crown-ibp-fast"], [Fraction(1, 10)], [0], {})[0].config)
    names = [n for n, _ in model.named_modules()]
    before_bn = {f"{a}.bias" for a, b in zip(names[1:], names[2:])
                 if isinstance(model.get_submodule(b), torch.nn.modules.batchnorm._BatchNorm)}
    assert before_bn, "the model has no BatchNorm: the test would not test it"
    assert _worst(one["grads"], many["grads"], before_bn) <= GRAD_RTOL
    assert _worst(one["params"], many["params"], before_bn) <= PARAM_RTOL


@pytest.fixture(scope="module")
def torchrun_cell(tmp_path_factory: pytest.TempPathFactory, data_dir: Path) -> Path:
    """The MNIST smoke cell of linf-dist trained and evaluated by ``torchrun --nproc_per_node 2``."""
    out = tmp_path_factory.mktemp("torchrun")
    cmd = [*TORCHRUN, "--nproc_per_node=2", "-m", "bench", "run", "--suite", "mnist", "--scale", "smoke",
           "--methods", "linf-dist", "--eps", "0.1", "--out", str(out), "--no-progress"]
    done = subprocess.run(cmd, env=_env(data_dir), capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("| ours (linf-dist, seed 0)") == 1  # one table, from rank 0
    return out


def _one_pass(folder: Path, data_dir: Path) -> list[tuple[str, ...]]:
    """A one-process evaluation of a finished cell's model, as ``verdicts.csv`` rows."""
    import bench

    record = json.loads((folder / "config.json").read_text())["cell"]
    cell = load_suite("mnist").cells("smoke", [record["method"]], [Fraction(1, 10)], [0], {})[0]
    ev = evaluate(registry.get(cell.method), bench.load_model(folder, "cpu"), datamod.load_split("mnist", False, data_dir),
                  cell.scale.test_range, 0.1, AttackPlan.of(cell.scale), cell.scale.eval_batch_size,
                  torch.device("cpu"), 0, progress=False)
    return [tuple(str(v) for v in row) for row in ev.rows()]


def test_torchrun_smoke_cell_is_sound_and_evaluates_as_one_pass(torchrun_cell: Path, data_dir: Path) -> None:
    """The full smoke cell under torchrun: rank 0 writes one result, its certified points survive strong
    attacks, and the ranks' merged evaluation equals one process's pass over the same model."""
    import bench

    folder = _cell(torchrun_cell, "linf-dist")
    record = json.loads((folder / "result.json").read_text())
    start, stop = load_suite("mnist").scales["smoke"].test_range
    assert record["n_examples"] == stop - start and not (folder / "checkpoint.pt").exists()
    rows = read_csv(folder / "verdicts.csv")
    assert _one_pass(folder, data_dir) == [tuple(r.values()) for r in rows]

    certified = torch.tensor([r["certified"] == "1" for r in rows]).nonzero()[:, 0][:ATTACKED]
    assert len(certified) == ATTACKED, "too few certified points for the attack to test anything"
    test = datamod.load_split("mnist", False, data_dir)
    model = bench.load_model(folder, "cpu")
    x, y = datamod.to_pixels(test.images[certified], torch.device("cpu")), test.labels[certified]
    gen = torch.Generator().manual_seed(1)
    for loss in ("cross-entropy", "margin"):
        assert pgd_robust(model, x, y, 0.1, 50, 5, generator=gen, loss=loss).all()
    assert random_robust(model, x, y, 0.1, 400, generator=gen).all()


@pytest.mark.parametrize("bounds", [[0, 100, 200], [0, 77, 200], [0, 13, 150, 200], [0, 0, 90, 200]])
def test_sliced_evaluation_equals_one_pass(data_dir: Path, bounds: list[int]) -> None:
    """Uneven slices (and an empty one), evaluated in batches that do not line up with one pass's."""
    from bench.fixed import load

    _, method, model = load(ROOT / "results" / "baselines" / "fixed" / "smoke" / "mnist" / "mnist" / "eps_1-10"
                              / "ibp" / "seed0")
    cell = load_suite("mnist").cells("smoke", ["ibp"], [Fraction(1, 10)], [0], {})[0]
    plan = AttackPlan(cell.scale.pgd_steps, cell.scale.pgd_restarts, apgd_steps=10)
    test = datamod.load_split("mnist", False, data_dir)
    one = evaluate(method, model, test, (0, 200), 0.1, plan, 64, torch.device("cpu"), 3, progress=False)
    parts = [evaluate(method, model, test, (a, b), 0.1, plan, 50, torch.device("cpu"), 3, progress=False)
             for a, b in zip(bounds, bounds[1:])]
    assert merge(parts).rows() == one.rows()
    assert sum(one.pgd) < sum(one.clean), "PGD breaks nothing: its random starts would not be tested"


@pytest.mark.parametrize("n,world", [(200, 2), (200, 3), (7, 3), (2, 3), (128, 3)])
def test_shards_are_contiguous_and_cover_the_range(n: int, world: int) -> None:
    spans = [distributed.shard(10, 10 + n, distributed.Ranks(r, world, r)) for r in range(world)]
    assert spans[0][0] == 10 and spans[-1][1] == 10 + n
    assert all(a[1] == b[0] for a, b in zip(spans, spans[1:]))
    sizes = [b - a for a, b in spans]
    assert max(sizes) - min(sizes) <= 1


def test_ranks_come_from_torchrun_variables() -> None:
    assert distributed.ranks_from_env({}) == distributed.SINGLE
    assert distributed.ranks_from_env({"RANK": "1", "WORLD_SIZE": "4", "LOCAL_RANK": "1"}) == \
        distributed.Ranks(1, 4, 1)
    with pytest.raises(Exception, match="outside WORLD_SIZE"):
        distributed.ranks_from_env({"RANK": "4", "WORLD_SIZE": "4"})


def _run(args: list[str], data_dir: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "bench", "run", "--suite", "mnist", "--scale", "smoke", "--eps", "0.1",
                           "--no-progress", *args], env=_env(data_dir), capture_output=True, text=True, timeout=900,
                          cwd=ROOT)


def _cell(out: Path, method: str) -> Path:
    return out / "smoke" / "mnist" / "mnist" / "eps_1-10" / method / "seed0"


def test_eval_shard_jobs_merge_into_the_one_pass_result(tmp_path: Path, data_dir: Path) -> None:
    """Training as one submitit job and slice 1 of 3 after it; status counts the slice; then the two missing
    slices as jobs side by side, the last of which merges into exactly the one-pass verdicts."""
    first = _run(["--methods", "ibp", "--out", str(tmp_path), "--executor", "submitit-local", "--eval-shards", "3",
                  "--eval-shard", "1", "--wait"], data_dir)
    assert first.returncode == 0, first.stderr[-2000:]
    assert "training" in first.stdout and first.stdout.count("slice") == 1
    folder = _cell(tmp_path, "ibp")
    assert not (folder / "result.json").exists()
    status = subprocess.run([sys.executable, "-m", "bench", "status", "--suite", "mnist", "--scale", "smoke",
                             "--methods", "ibp", "--eps", "0.1", "--out", str(tmp_path)], env=_env(data_dir),
                            capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert "partial  mnist ε=1/10 ibp seed 0  (trained; 1 of 3 evaluation slices)" in status.stdout
    rest = _run(["--methods", "ibp", "--out", str(tmp_path), "--executor", "submitit-local", "--eval-shards", "3",
                 "--wait"], data_dir)
    assert rest.returncode == 0, rest.stderr[-2000:]
    assert rest.stdout.count("slice") == 2 and "training" not in rest.stdout
    assert _one_pass(folder, data_dir) == [tuple(r.values()) for r in read_csv(folder / "verdicts.csv")]
    assert not list(folder.glob("eval-part-*")) and not (folder / "checkpoint.pt").exists()


def test_two_tasks_of_one_job_train_like_torchrun(tmp_path: Path, data_dir: Path, torchrun_cell: Path) -> None:
    """--gpus-per-cell 2 starts two tasks per job (srun's way, here submitit-local's); they form the same
    2-rank run as torchrun, so the results are identical."""
    tasks = _run(["--methods", "linf-dist", "--out", str(tmp_path), "--executor", "submitit-local",
                  "--gpus-per-cell", "2", "--device", "cpu", "--wait"], data_dir)
    assert tasks.returncode == 0, tasks.stderr[-2000:]
    assert (_cell(tmp_path, "linf-dist") / "verdicts.csv").read_text() == \
        (_cell(torchrun_cell, "linf-dist") / "verdicts.csv").read_text()


@pytest.mark.parametrize("args,message", [
    (["--eval-shard", "0"], "--eval-shard K needs --eval-shards N"),
    (["--eval-shards", "0"], "--eval-shards must be between 1 and"),
    (["--eval-shards", "3", "--eval-shard", "3"], "--eval-shard must be between 0 and 2"),
])
def test_bad_slice_options_are_refused(tmp_path: Path, args: list[str], message: str,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    from bench.cli import main

    rc = main(["run", "--suite", "mnist", "--scale", "smoke", "--out", str(tmp_path), *args])
    assert rc == 2 and message in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


def test_a_slice_job_never_trains(tmp_path: Path, data_dir: Path) -> None:
    done = _run(["--methods", "ibp", "--out", str(tmp_path), "--eval-shards", "2", "--eval-shard", "1"], data_dir)
    assert done.returncode == 1 and "not trained yet" in done.stderr
    assert not (_cell(tmp_path, "ibp") / "checkpoint.pt").exists()


def test_retraining_never_lets_the_previous_model_pass_for_the_new_config(tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """A stale cell retrained with --replace-stale and killed mid-training: its config.json is already the
    new config's, so the previous model.pt must be gone, or a slice job would evaluate it as this config's."""
    from dataclasses import replace

    from bench import runner, slices
    from bench.store import dump_config

    (cell,) = load_suite("mnist").cells("smoke", ["ibp"], [Fraction(1, 10)], [0], {})
    folder = runner.cell_folder(cell, tmp_path)
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"config": dump_config(cell.config)}))
    (folder / runner.MODEL).write_bytes(b"the previous model")
    assert slices.trained(folder, cell)
    retrained = replace(cell, config={**cell.config, "epochs": int(cell.config["epochs"]) + 1})

    def killed(*_: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(runner, "train_cell", killed)
    opts = runner.RunOptions(tmp_path, tmp_path, torch.device("cpu"), False, {})
    empty = datamod.Split(torch.zeros(0, 1, 28, 28, dtype=torch.uint8), torch.zeros(0, dtype=torch.int64))
    with pytest.raises(KeyboardInterrupt):
        runner.train_model(retrained, opts, {True: empty, False: empty})
    assert not (folder / runner.MODEL).exists() and not slices.trained(folder, retrained)
