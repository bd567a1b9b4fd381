"""The library side of ``rome-jax screen`` and of ``--case-ids``: the screen summary and the
selection of CounterFact records by case id."""

from __future__ import annotations

import math

import pytest

from rome_jax.data import counterfact_by_case_id
from rome_jax.screening import summarize_screen


def test_summarize_screen_splits_and_counts_the_guard():
    rows = [{"case_id": 1, "ratio": 1.5, "guard_ok": True},
            {"case_id": 2, "ratio": 12.0, "guard_ok": False},
            {"case_id": 3, "ratio": math.inf, "guard_ok": True},
            {"case_id": 4, "ratio": math.nan},
            {"case_id": 5, "ratio": 2.0, "guard_ok": False},
            {"case_id": 6, "error": "subject: does not tokenise"}]
    summary = summarize_screen(rows, threshold=10.0)
    assert summary["collapse"] == [2, 3, 4] and summary["normal"] == [1, 5]
    assert summary["skipped"] == [6]
    assert summary["guard_confusion"] == {"refused_collapse": 1, "refused_normal": 1,
                                          "passed_collapse": 1, "passed_normal": 1}
    assert "guard_confusion" not in summarize_screen(rows[3:4], threshold=10.0)


RECORDS = [{"case_id": i, "requested_rewrite": {}} for i in (0, 3, 5, 9)]


def test_counterfact_by_case_id_keeps_the_given_order():
    assert [r["case_id"] for r in counterfact_by_case_id(RECORDS, [9, 0, 5])] == [9, 0, 5]


@pytest.mark.parametrize("ids, match", [
    ([3, 4, 7], "no record with case id 4, 7"),
    ({"3": 1}, "non-empty list of integers, got dict"),
    ([], "got list \\(empty\\)"),
    ([3, "5", True], "not integers: '5', True"),
])
def test_counterfact_by_case_id_refuses_unknown_and_malformed_ids(ids, match):
    with pytest.raises(ValueError, match=match):
        counterfact_by_case_id(RECORDS, ids)
