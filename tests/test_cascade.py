"""``bench cascade`` on the committed fixed MNIST ibp checkpoint: each stage sees only the points the
stages before left open, every point ends certified, falsified or unknown with what decided it, and the
cell's own files are left as they were."""

from __future__ import annotations

import csv
import hashlib
import json
from pathlib import Path

import pytest

from bench.cli import main

pytest.importorskip("highspy")

ROOT = Path(__file__).resolve().parents[1]
FIXED_IBP = ROOT / "results/baselines/fixed/smoke/mnist/mnist/eps_1-10/ibp/seed0"
KEY = Path("smoke/mnist/mnist/eps_1-10/ibp/seed0")


def digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.iterdir()}


@pytest.mark.skipif(not FIXED_IBP.exists(), reason="fixed checkpoints not present")
def test_cascade_on_a_fixed_checkpoint(tmp_path, data_dir, one_thread):
    before = digests(FIXED_IBP)
    assert main(["cascade", str(FIXED_IBP), "--points", "40", "--stages", "ibp,crown,milp", "--into", str(tmp_path),
                 "--data-dir", str(data_dir), "--no-progress"]) == 0
    assert digests(FIXED_IBP) == before
    record = json.loads((tmp_path / KEY / "cascade.json").read_text())
    with open(tmp_path / KEY / "cascade-verdicts.csv") as fh:
        rows = list(csv.DictReader(fh))
    with open(FIXED_IBP / "verdicts.csv") as fh:
        recorded = list(csv.DictReader(fh))[:40]
    assert [int(r["index"]) for r in rows] == list(range(40))
    assert record["counts"] == {"n": 40, **{v: sum(r["verdict"] == v for r in rows)
                                            for v in ("certified", "falsified", "unknown")}}
    for row, old in zip(rows, recorded):
        if old["clean"] == "0":
            assert (row["verdict"], row["decided_by"]) == ("falsified", "clean")
        elif old["pgd"] == "0":
            assert (row["verdict"], row["decided_by"]) == ("falsified", "pgd")
        if row["verdict"] == "certified":
            assert row["decided_by"] in ("ibp", "crown", "milp")
    stages = record["stages"]
    assert [s["name"] for s in stages] == ["apgd", "ibp", "crown", "milp"]
    open_points = 40 - sum(r["clean"] == "0" or r["pgd"] == "0" for r in recorded)
    for stage in stages:
        # Each stage tries exactly what the stages before left unknown.
        assert stage["tried"] == open_points
        open_points -= stage["certified"] + stage["falsified"]
        assert stage["unknown_after"] == open_points
    assert sum(s["certified"] for s in stages) == record["counts"]["certified"]
    # The summary tabulates each stage and draws the band.
    assert main(["cascade", "--summary", str(tmp_path)]) == 0
    table = (tmp_path / "cascade.md").read_text().splitlines()
    assert len(table) == 2 + len(stages) + 1
    assert table[2].startswith(f"| {KEY.as_posix()} | 40 | apgd | {stages[0]['tried']} |")
    assert (tmp_path / "cascade.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.skipif(not FIXED_IBP.exists(), reason="fixed checkpoints not present")
def test_a_verifier_that_refuses_the_model_is_skipped_with_its_reason(tmp_path, data_dir, one_thread, monkeypatch):
    """Full CROWN (and the MILP, which needs its boxes) refuse models above a cost limit, as DM-large on
    CIFAR-10: the cascade records those stages as skipped, with the reason, and goes on."""
    from methods.bounds import engine

    monkeypatch.setattr(engine, "CROWN_MAX_ELEMENTS", 1.0)
    assert main(["cascade", str(FIXED_IBP), "--points", "40", "--stages", "crown,milp,ibp", "--into", str(tmp_path),
                 "--data-dir", str(data_dir), "--no-progress"]) == 0
    record = json.loads((tmp_path / KEY / "cascade.json").read_text())
    crown, milp, ibp = record["stages"][1:]
    for stage in (crown, milp):
        assert "full CROWN" in stage["skipped"]
        assert (stage["certified"], stage["falsified"], stage["seconds_per_point"]) == (0, 0, None)
        assert stage["tried"] == stage["unknown_after"] == ibp["tried"] > 0
    assert ibp["skipped"] is None and ibp["certified"] > 0
    assert main(["cascade", "--summary", str(tmp_path)]) == 0
    assert "skipped: full CROWN" in (tmp_path / "cascade.md").read_text()


def test_cascade_refuses_a_verifier_the_method_lacks(tmp_path, capsys):
    if not FIXED_IBP.exists():
        pytest.skip("fixed checkpoints not present")
    assert main(["cascade", str(FIXED_IBP), "--stages", "linf-interval", "--into", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1:] == ["error: ibp has no verifier linf-interval; its verifiers: ibp, crown-ibp, crown, alpha-crown, milp"]
    assert not any(tmp_path.iterdir())


def test_cascade_refuses_a_folder_that_is_no_cell(tmp_path, capsys):
    assert main(["cascade", str(tmp_path)]) == 2
    assert "not a finished cell" in capsys.readouterr().err
