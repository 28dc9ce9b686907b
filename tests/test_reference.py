"""The published reference numbers under results/reference/ load as typed rows and stay as published."""

from fractions import Fraction
from pathlib import Path

import pytest

from bench.errors import BenchError
from bench.reference import card_rows, load_baselines, load_note_marks, load_table2
from bench.report.table import ASSUMED_MARK, STALE_MARK
from methods import base as registry
from methods.base import MethodCard


def test_table2_has_every_row_of_the_paper_once():
    rows = load_table2()
    assert len(rows) == 31
    keys = [(r.dataset, r.eps, r.label, r.source) for r in rows]
    assert len(set(keys)) == len(keys)
    per_setting = {(d, e): sum(1 for r in rows if (r.dataset, r.eps) == (d, e)) for d, e, _, _ in keys}
    assert per_setting == {("mnist", Fraction(1, 10)): 6, ("mnist", Fraction(3, 10)): 6,
                           ("cifar10", Fraction(2, 255)): 6, ("cifar10", Fraction(8, 255)): 8,
                           ("cifar10", Fraction(16, 255)): 5}


def test_table2_values_are_fractions_as_published():
    rows = {(r.dataset, r.eps, r.label, r.source): r for r in load_table2()}
    ours = rows[("cifar10", Fraction(8, 255), "l_inf-distance Net", "This paper")]
    assert (ours.clean, ours.pgd, ours.certified) == (0.543, 0.4184, 0.4006)
    shi = rows[("cifar10", Fraction(8, 255), "CROWN-IBP", "(Shi et al. 2021)")]
    assert shi.pgd is None and shi.certified == 0.3497
    cap = rows[("mnist", Fraction(1, 10), "CAP", "(Wong et al. 2018)")]
    assert cap.clean is None and cap.certified == 0.9633
    for row in rows.values():
        for value in (row.clean, row.pgd, row.certified):
            assert value is None or 0 < value < 1


def test_every_footnote_mark_is_explained():
    marks = load_note_marks()
    assert set(marks) == {"*", "†", "‡", "¶", ASSUMED_MARK, STALE_MARK}  # the paper's, then certbench's own
    used = {n for r in load_table2() for n in r.notes.split(";") if len(n) == 1}
    assert used <= set(marks)


def test_baselines_say_where_each_number_comes_from_and_flag_open_questions():
    rows = load_baselines()
    assert rows and all(r.source and r.certified is not None for r in rows)
    flagged = [r for r in rows if "VERIFY:" in r.notes]
    # Gowal et al.'s arXiv-v1 numbers are traced, but which model produced them is not.
    assert {(r.dataset, r.eps) for r in flagged} >= {("mnist", Fraction(1, 10)), ("cifar10", Fraction(8, 255))}
    cibp = [r for r in rows if r.source.startswith("CIBP README") and r.eps == Fraction(3, 10)]
    assert [r.certified for r in cibp] == [0.9332]


def test_card_rows_match_label_and_source():
    card = MethodCard("t", "p", "v", "a", reference_label="IBP", reference_source="(Gowal et al. 2018)")
    found = card_rows(card, load_table2())
    assert {(r.dataset, r.eps) for r in found} == {("mnist", Fraction(1, 10)), ("mnist", Fraction(3, 10)),
                                                   ("cifar10", Fraction(2, 255)), ("cifar10", Fraction(8, 255)),
                                                   ("cifar10", Fraction(16, 255))}


@pytest.mark.parametrize("name", registry.list_methods())
def test_registered_method_cards_link_to_published_rows(name):
    card = registry.get(name).card
    assert card_rows(card, load_table2() + load_baselines()), (
        f"{name}: no reference row labelled {card.reference_label!r} from {card.reference_source!r}")


def test_bad_reference_file_names_the_line(tmp_path: Path):
    (tmp_path / "table2.csv").write_text("dataset,eps,method,reference,clean,pgd,certified,notes\n"
                                         "mnist,1/10,IBP,(x),98.9,,97.2,\nmnist,zero,IBP,(x),1,,1,\n")
    with pytest.raises(BenchError, match=r"table2.csv:3: "):
        load_table2(tmp_path)
    (tmp_path / "table2.csv").write_text("dataset,eps,method,reference,clean,pgd,certified,notes\n"
                                         "mnist,1/10,IBP,(x),989,,97.2,\n")
    with pytest.raises(BenchError, match="not a percentage"):
        load_table2(tmp_path)
