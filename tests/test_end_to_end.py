"""End to end on real MNIST: every registered method trains a smoke cell and writes a sound result.

One smoke cell per method is run once per session (the registry is the list, so a new method is tested
by being registered). The ℓ∞-dist cell then serves the soundness and resume checks.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

import bench
from bench.attacks import pgd_robust, random_robust
from bench.cli import main
from bench.config import load_suite
from bench.data import load_split, to_pixels
from bench.store import load_result, read_csv
from methods import base as registry

EPS = "1/10"
pytestmark = pytest.mark.slow


@pytest.fixture(scope="session")
def smoke_results(tmp_path_factory: pytest.TempPathFactory, data_dir: Path) -> Path:
    out = tmp_path_factory.mktemp("results")
    code = main(["run", "--suite", "mnist", "--scale", "smoke", "--eps", EPS, "--data-dir", str(data_dir),
                 "--out", str(out), "--no-progress", "--methods", *registry.list_methods()])
    assert code == 0
    return out


def cell(out: Path, method: str) -> Path:
    return out / "smoke" / "mnist" / "mnist" / "eps_1-10" / method / "seed0"


@pytest.mark.parametrize("method", registry.list_methods())
def test_smoke_cell_writes_a_consistent_result(smoke_results: Path, method: str) -> None:
    folder = cell(smoke_results, method)
    record = load_result(folder / "result.json").record
    m = record["metrics"]
    assert m["clean"] >= m["pgd"] >= m["certified"]
    start, stop = load_suite("mnist").scales["smoke"].test_range
    assert record["n_examples"] == stop - start and record["index_range"] == [start, stop]
    assert record["certifier"] in registry.get(method).certifiers
    assert record["eps"]["test"] == EPS
    assert {"train", "clean", "pgd", "certify"} <= set(record["provenance"]["timings_s"])
    assert record["provenance"]["versions"]["torch"] == torch.__version__
    verdicts = (folder / "verdicts.csv").read_text().splitlines()
    assert verdicts[0] == "index,label,clean,pgd,certified,verdict,apgd,broken_by" and len(verdicts) == 1 + stop - start
    certified = sum(line.split(",")[4] == "1" for line in verdicts[1:])
    assert certified == record["counts"]["certified"]
    assert json.loads((folder / "config.json").read_text())["cell"]["method"] == method
    # Every recipe logs, per epoch, the fraction of training points its training bound certifies.
    log = read_csv(folder / "train_log.csv")
    assert len(log) == record["config"]["epochs"]
    assert all(0.0 <= float(row["train_certified"]) <= 1.0 for row in log)


def test_rerun_skips_finished_cells(smoke_results: Path, data_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    result = cell(smoke_results, "linf-dist") / "result.json"
    before = result.read_bytes()
    assert main(["run", "--suite", "mnist", "--scale", "smoke", "--eps", EPS, "--methods", "linf-dist",
                 "--data-dir", str(data_dir), "--out", str(smoke_results), "--no-progress"]) == 0
    assert "0 to run" in capsys.readouterr().err
    assert result.read_bytes() == before


def test_another_verifier_adds_a_record_for_the_same_model(smoke_results: Path, data_dir: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    """`run --certifier` re-certifies finished models (no retraining) and the report shows both rows."""
    folder = cell(smoke_results, "ibp")
    own = load_result(folder / "result.json").record
    args = ["run", "--suite", "mnist", "--scale", "smoke", "--eps", EPS, "--methods", "ibp", "--certifier", "crown",
            "--data-dir", str(data_dir), "--out", str(smoke_results), "--no-progress"]
    assert main(args) == 0
    err = capsys.readouterr().err
    assert "0 to run" in err and "certifying with crown" in err
    extra = load_result(folder / "result-crown.json").record
    assert extra["certifier"] == "crown" and own["certifier"] == "ibp"
    assert (extra["metrics"]["clean"], extra["metrics"]["pgd"]) == (own["metrics"]["clean"], own["metrics"]["pgd"])
    assert extra["metrics"]["pgd"] >= extra["metrics"]["certified"]
    assert (folder / "verdicts-crown.csv").is_file()
    assert load_result(folder / "result.json").record == own
    # Done once: a second run neither retrains nor re-certifies.
    assert main(args) == 0
    assert "certifying" not in capsys.readouterr().err
    from bench.report import build_suite_report

    rows = [r for r in build_suite_report(smoke_results, "smoke", "mnist").rows if r.ours and r.method_id == "ibp"]
    assert sorted(r.certifier for r in rows) == ["crown", "ibp"]


def test_reevaluate_recomputes_the_verdicts_of_the_same_weights(smoke_results: Path, data_dir: Path,
                                                                tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    """`run --reevaluate` replaces a finished result by today's evaluation of its stored model: a certified
    count that an older certificate left lower comes back to what this code certifies, the attacks' verdicts
    (per-point seeds) reproduce, and the training and its provenance are kept."""
    import shutil

    out = tmp_path / "results"
    shutil.copytree(smoke_results, out)
    folder = cell(out, "ibp")
    own = load_result(folder / "result.json").record
    verdicts = (folder / "verdicts.csv").read_bytes()
    assert own["counts"]["certified"] > 0, "the smoke ibp model must certify something for this test to mean anything"
    older = json.loads(json.dumps(own))
    older["counts"]["certified"], older["metrics"]["certified"] = 0, 0.0
    (folder / "result.json").write_text(json.dumps(older))
    args = ["run", "--suite", "mnist", "--scale", "smoke", "--eps", EPS, "--methods", "ibp", "--reevaluate",
            "--data-dir", str(data_dir), "--out", str(out), "--no-progress"]
    assert main(args) == 0
    assert "re-evaluating its model" in capsys.readouterr().err
    new = load_result(folder / "result.json").record
    assert new["counts"] == own["counts"]
    assert (folder / "verdicts.csv").read_bytes() == verdicts
    assert new["provenance"]["trained"] == own["provenance"]
    assert new["provenance"]["timings_s"]["train"] == own["provenance"]["timings_s"]["train"]
    # A second re-evaluation still names the run that trained the model.
    assert main(args) == 0
    assert load_result(folder / "result.json").record["provenance"]["trained"] == own["provenance"]
    capsys.readouterr()

    (folder / "model.pt").unlink()
    before = (folder / "result.json").read_bytes()
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --reevaluate needs each finished cell's model.pt") and "Traceback" not in err
    assert (folder / "result.json").read_bytes() == before


def test_a_verifier_a_method_cannot_use_is_a_clear_error(smoke_results: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", "--suite", "mnist", "--scale", "smoke", "--eps", EPS, "--methods", "linf-dist",
                 "--certifier", "crown", "--out", str(smoke_results), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --certifier crown does not apply to linf-dist") and "Traceback" not in err


@pytest.fixture(scope="session")
def deployed(smoke_results: Path, data_dir: Path):
    folder = cell(smoke_results, "linf-dist")
    model = bench.load_model(folder)
    split = load_split("mnist", False, data_dir)
    start, stop = load_suite("mnist").scales["smoke"].test_range
    x, y = to_pixels(split.images[start:stop], torch.device("cpu")), split.labels[start:stop]
    return model, x, y


def test_loaded_model_is_deployed_and_reproduces_the_record(deployed, smoke_results: Path) -> None:
    model, x, y = deployed
    assert not model.training
    assert all(math.isinf(m.p) for m in model.modules() if hasattr(m, "p"))
    record = load_result(cell(smoke_results, "linf-dist") / "result.json").record
    with torch.no_grad():
        clean = (model(x).argmax(dim=1) == y).float().mean().item()
    assert clean == pytest.approx(record["metrics"]["clean"])


def test_certified_points_survive_pgd_restarts_and_random_sampling(deployed) -> None:
    model, x, y = deployed
    method = registry.get("linf-dist")
    eps = 0.1
    certified = method.certify(model, x, y, eps).certified
    assert certified.sum() >= 5, "the smoke model should certify some points for this test to mean anything"
    xc, yc = x[certified], y[certified]
    gen = torch.Generator().manual_seed(0)
    assert pgd_robust(model, xc, yc, eps, steps=50, restarts=5, generator=gen).all()
    assert random_robust(model, xc, yc, eps, samples=1000, generator=gen).all()
    # The attacks are not toothless: they do break uncertified points at a larger radius.
    assert not pgd_robust(model, x, y, 0.3, steps=50, restarts=2, generator=gen).all()


def test_interval_bounds_contain_sampled_margins(deployed) -> None:
    model, x, y = deployed
    method = registry.get("linf-dist")
    eps = 0.1
    xs, ys = x[:20], y[:20]
    lower, upper = (xs - eps).clamp(0, 1), (xs + eps).clamp(0, 1)
    with torch.no_grad():
        bounds = method.margin_lower_bounds(model, lower, upper, ys)
        for _ in range(100):
            logits = model(lower + torch.rand_like(xs) * (upper - lower))
            margins = (logits.gather(1, ys[:, None]) - logits).scatter(1, ys[:, None], math.inf)
            assert (margins >= bounds - 1e-5).all()
