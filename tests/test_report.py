"""Reports rebuilt from fixture result files: golden tables, byte-identical regeneration, valid HTML.

Golden files are rewritten only on purpose: ``CERTBENCH_UPDATE_GOLDEN=1 pytest tests/test_report.py``.
"""

from __future__ import annotations

import json
import os
import shutil
from fractions import Fraction
from html.parser import HTMLParser
from pathlib import Path

import pytest

from bench.cli import main
from bench.config import load_suite
from bench.report import records
from bench.report import build_suite_report, suite_table_markdown, write_suite_report
from bench.report.table import Stat, display_eps, stat_text
from bench.store import dump_config
from methods.base import MethodCard

FIXTURES = Path(__file__).parent / "fixtures" / "results"
GOLDEN = Path(__file__).parent / "golden" / "report"
UPDATE_GOLDEN = os.environ.get("CERTBENCH_UPDATE_GOLDEN") == "1"
SUITES = (("smoke", "mnist"), ("smoke", "cifar10"))
# Explicit cards keep the goldens independent of which methods are registered today; "mystery" has none.
CARDS = {
    "linf-dist": MethodCard("ℓ∞-dist net", "Zhang et al. 2022", "ICLR 2022", "ℓ∞-dist net",
                            reference_label="l_inf-distance Net", reference_source="This paper"),
    "ibp": MethodCard("IBP", "Gowal et al. 2018", "arXiv", "DM-large",
                      reference_label="IBP", reference_source="(Gowal et al. 2018)"),
}


JUDGE_STALE = records._stale


@pytest.fixture(autouse=True, scope="module")
def fixture_configs_are_not_judged():
    """The fixture configs are made up: whether they are today's suite recipes is not for the goldens to pin
    (test_a_row_finished_under_an_earlier_recipe_is_marked checks the mark with the real judgement)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(records, "_stale", lambda rec, eps: False)
        yield


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def reported(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the fixture results with every suite's report written once."""
    root = tmp_path_factory.mktemp("results")
    shutil.copytree(FIXTURES, root, dirs_exist_ok=True)
    for scale, suite in SUITES:
        write_suite_report(root, scale, suite, cards=CARDS)
    return root


def test_a_row_finished_under_an_earlier_recipe_is_marked(tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """A result made under another config than the suite file gives its cell now gets the ‖ mark and its
    footnote; the same result under today's config gets no mark."""
    monkeypatch.setattr(records, "_stale", JUDGE_STALE)
    shutil.copytree(FIXTURES, tmp_path, dirs_exist_ok=True)
    result = tmp_path / "smoke/mnist/mnist/eps_1-10/ibp/seed0/result.json"
    record = json.loads(result.read_text())
    today = dump_config(load_suite("mnist").method_config("ibp", "smoke", Fraction(1, 10), {}))
    pages = {}
    for name, config in (("current", today), ("earlier", {**today, "epochs": int(today["epochs"]) + 1})):
        result.write_text(json.dumps({**record, "config": config}))
        write_suite_report(tmp_path, "smoke", "mnist", cards=CARDS)
        pages[name] = (tmp_path / "smoke/mnist/report.md").read_text()

    def ibp_row(page: str) -> str:
        return next(line for line in page.splitlines() if "ours (ibp" in line and "| 0.1 " in line)

    assert "‖" not in ibp_row(pages["current"])
    assert "ours (ibp, seed 0) ‖" in ibp_row(pages["earlier"])
    assert "‖ certbench: this run finished under an earlier recipe" in pages["earlier"]


@pytest.mark.parametrize("scale,suite", SUITES)
@pytest.mark.parametrize("name", ["report.md", "report.csv", "report.tex"])
def test_report_matches_golden(reported: Path, scale: str, suite: str, name: str):
    produced = (reported / scale / suite / name).read_text()
    golden = GOLDEN / scale / suite / name
    if UPDATE_GOLDEN:
        golden.parent.mkdir(parents=True, exist_ok=True)
        golden.write_text(produced)
    assert produced == golden.read_text(), f"{name} differs from {golden}; regenerate on purpose with " \
                                           "CERTBENCH_UPDATE_GOLDEN=1"


def test_regenerating_unchanged_results_is_byte_identical(reported: Path):
    before = _snapshot(reported)
    assert any(name.endswith(".png") for name in before)
    for scale, suite in SUITES:
        write_suite_report(reported, scale, suite, cards=CARDS)
    assert _snapshot(reported) == before


def test_our_rows_follow_the_paper_row_they_reproduce(reported: Path):
    report = build_suite_report(reported, "smoke", "mnist", cards=CARDS)
    at_03 = [(r.reference, r.ours) for r in report.rows if r.eps == Fraction(3, 10)]
    refs = [ref for ref, _ in at_03]
    assert refs.index("ours (ibp, seed 0)") == refs.index("(Gowal et al. 2018)") + 1
    assert refs.index("ours (linf-dist, 3 seeds)") == refs.index("This paper") + 1
    assert refs[-1] == "ours (mystery, seed 0)"  # no card: shown under its own name, after the paper's rows
    assert [ours for _, ours in at_03].count(False) == 6


def test_several_seeds_show_median_and_range_and_delta_against_the_paper(reported: Path):
    report = build_suite_report(reported, "smoke", "mnist", cards=CARDS)
    row = next(r for r in report.rows if r.reference == "ours (linf-dist, 3 seeds)")
    assert row.seeds == (0, 1, 2)
    assert stat_text(row.certified) == "68.00 (66.00–70.00)"
    assert row.delta == pytest.approx(0.68 - 0.932)
    mystery = next(r for r in report.rows if r.reference == "ours (mystery, seed 0)")
    assert mystery.method == "mystery" and mystery.delta is None


def test_unusable_result_files_are_reported_and_never_shown(reported: Path, capsys: pytest.CaptureFixture[str]):
    markdown = build_suite_report(reported, "smoke", "mnist", cards=CARDS).markdown
    err = capsys.readouterr().err.splitlines()
    assert len([line for line in err if line.startswith("skipped: ")]) == 2
    assert any("corrupt result file" in line for line in err)
    assert any("missing metrics" in line for line in err)
    table, _, notes = markdown.partition("NOT SHOWN: 2 unusable result files: ")
    assert "crown-ibp" not in table, "an unusable cell is never a row"
    assert notes.count("/result.json") == 2 and "crown-ibp" in notes, "but it is named below the table"


class _Checker(HTMLParser):
    VOID = {"meta", "img", "br", "hr", "link", "input"}

    def __init__(self) -> None:
        super().__init__()
        self.stack: list[str] = []
        self.errors: list[str] = []
        self.urls: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.urls += [v or "" for k, v in attrs if k in ("src", "href")]
        if tag == "link" or tag == "script" and any(k == "src" for k, _ in attrs):
            self.errors.append(f"external <{tag}>")
        if tag not in self.VOID:
            self.stack.append(tag)

    def handle_endtag(self, tag: str) -> None:
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"</{tag}> closes <{self.stack[-1] if self.stack else 'nothing'}>")
        else:
            self.stack.pop()


def test_html_is_valid_and_self_contained(reported: Path):
    folder = reported / "smoke" / "mnist"
    page = (folder / "report.html").read_text()
    assert page.startswith("<!DOCTYPE html>")
    checker = _Checker()
    checker.feed(page)
    checker.close()
    assert checker.errors == [] and checker.stack == []
    assert not [u for u in checker.urls if u.startswith(("http:", "https:", "//"))]
    images = [u for u in checker.urls if u.startswith("data:image/png;base64,")]
    assert len(images) == 6  # certified vs ε + the training curves of 5 cells
    links = [u for u in checker.urls if not u.startswith("data:")]
    assert links and all((folder / link).is_file() for link in links)


def test_training_figures_hold_the_logged_curves(reported: Path):
    data = (reported / "smoke" / "mnist" / "figures" / "train_mnist_eps_3-10_linf-dist.csv").read_text().splitlines()
    assert data[0] == "seed,epoch,loss,acc,train_certified,p,lam,eps,lr"
    assert len(data) == 1 + 3 * 5  # 3 seeds x 5 epochs


def test_cli_writes_chosen_formats_and_drops_figures_of_removed_cells(tmp_path: Path):
    out = tmp_path / "smoke" / "cifar10"
    shutil.copytree(FIXTURES / "smoke" / "cifar10", out)
    (out / "figures").mkdir()
    (out / "figures" / "train_cifar10_eps_2-255_gone.png").write_bytes(b"old")
    assert main(["report", "--results", str(tmp_path), "--suite", "cifar10", "--format", "md,csv"]) == 0
    assert sorted(p.name for p in out.glob("report.*")) == ["report.csv", "report.md"]
    assert sorted(p.name for p in (out / "figures").iterdir()) == [
        "certified_vs_eps_cifar10.csv", "certified_vs_eps_cifar10.png",
        "train_cifar10_eps_8-255_linf-dist.csv", "train_cifar10_eps_8-255_linf-dist.png"]


def test_cli_rejects_unknown_format_and_missing_results(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    assert main(["report", "--results", str(FIXTURES), "--format", "pdf"]) == 2
    assert main(["report", "--results", str(tmp_path)]) == 2
    assert main(["report", "--results", str(FIXTURES), "--suite", "tinyimagenet"]) == 2
    err = capsys.readouterr().err
    assert "--format" in err and "no result files" in err and "Traceback" not in err


def test_suite_table_markdown_uses_the_registry(reported: Path):
    text = suite_table_markdown(reported, "smoke", "cifar10")
    assert "scale smoke" in text.splitlines()[0]
    assert "| CIFAR-10  | 8/255 | l_inf-distance Net     | This paper " in text
    assert "ours (linf-dist, seed 0)" in text


def test_formatting_helpers():
    assert display_eps(Fraction(3, 10)) == "0.3" and display_eps(Fraction(8, 255)) == "8/255"
    assert Stat.of([0.5, 0.7, 0.6, 0.9]).median == pytest.approx(0.65)
    assert stat_text(None) == "-" and stat_text(Stat.of([0.4006])) == "40.06"
