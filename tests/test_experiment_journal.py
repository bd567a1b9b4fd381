"""The experiments' resumable JSONL journal and report helpers."""

from __future__ import annotations

import json

import numpy as np
import pytest

from rome_jax.experiments.journal import Journal, read_rows
from rome_jax.experiments.report import Report, markdown_table, stats, write_report

SETTINGS = {"layer": 2, "threshold": 10.0, "model": "a/path", "lengths": (5, 10)}


def test_rows_are_kept_and_resumed(tmp_path):
    path = tmp_path / "rows.jsonl"
    with Journal(path, "collapse", SETTINGS) as journal:
        assert journal.rows == [] and 7 not in journal
        journal.append({"key": 7, "ratio": 1.5})
        journal.append({"key": [1, "rome"], "ratio": float("inf")})
        with pytest.raises(ValueError, match="already in"):
            journal.append({"key": 7})
        with pytest.raises(ValueError, match="needs a 'key'"):
            journal.append({"ratio": 1})
    lines = path.read_text().splitlines()
    assert json.loads(lines[0]) == {"experiment": "collapse",
                                    "settings": {**SETTINGS, "lengths": [5, 10]}}
    assert len(lines) == 3
    # another model path with the same settings resumes; tuples compare as their JSON lists
    with Journal(path, "collapse", {**SETTINGS, "model": "elsewhere"}) as journal:
        assert [r["key"] for r in journal.rows] == [7, [1, "rome"]]
        assert 7 in journal and (1, "rome") in journal and 8 not in journal
        assert journal.rows[1]["ratio"] == float("inf")
    header, rows = read_rows(path, "collapse")
    assert header["experiment"] == "collapse" and len(rows) == 2


def test_a_torn_last_line_is_dropped(tmp_path):
    path = tmp_path / "rows.jsonl"
    with Journal(path, "x", SETTINGS) as journal:
        journal.append({"key": 1})
    with open(path, "a") as f:
        f.write('{"key": 2, "rat')  # a run killed mid-write
    assert len(read_rows(path)[1]) == 1
    with Journal(path, "x", SETTINGS) as journal:
        assert [r["key"] for r in journal.rows] == [1]
        journal.append({"key": 2})
    assert [json.loads(line)["key"] for line in path.read_text().splitlines()[1:]] == [1, 2]


def test_other_settings_experiments_and_files_are_refused(tmp_path):
    path = tmp_path / "rows.jsonl"
    with Journal(path, "x", SETTINGS) as journal:
        journal.append({"key": 1})
    with pytest.raises(ValueError, match=r"other settings \(layer, threshold differ\)"):
        Journal(path, "x", {**SETTINGS, "layer": 3, "threshold": 5.0})
    with pytest.raises(ValueError, match="holds experiment 'x', not 'y'"):
        Journal(path, "y", SETTINGS)
    with Journal(path, "x", {**SETTINGS, "layer": 3}, overwrite=True) as journal:
        assert journal.rows == []
    other = tmp_path / "notes.jsonl"
    other.write_text("hello\n")
    with pytest.raises(ValueError, match="not an experiment journal"):
        Journal(other, "x", SETTINGS)
    assert other.read_text() == "hello\n"  # nothing lost


def test_one_writer_at_a_time(tmp_path):
    path = tmp_path / "rows.jsonl"
    with Journal(path, "x", SETTINGS):
        with pytest.raises(ValueError, match="another process is writing"):
            Journal(path, "x", SETTINGS)
    with Journal(path, "x", SETTINGS) as journal:  # released on close
        assert journal.rows == []


def test_report_helpers(tmp_path):
    s = stats([1.0, 3.0, float("inf"), 2.0])
    assert (s["n"], s["mean"], s["median"], s["max"], s["not_finite"]) == (4, 2.0, 2.0, 3.0, 1)
    assert np.isnan(stats([])["mean"])
    table = markdown_table(["a", "b"], [["x", 1.23456], [None, float("nan")]])
    assert table.splitlines() == ["| a | b |", "|---|---|", "| x | 1.23 |", "| - | - |"]

    def draw(path):
        path.write_bytes(b"\x89PNG fake")
    paths = write_report(tmp_path / "out", Report({"n": 1}, "# t", draw))
    assert [p.name for p in paths] == ["summary.json", "table.md", "figure.png"]
    assert json.loads((tmp_path / "out" / "summary.json").read_text()) == {"n": 1}
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "figure.png", "summary.json", "table.md"]  # no temporary files left
