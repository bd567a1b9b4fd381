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


def test_a_rome_setting_the_journal_predates_counts_as_its_default(tmp_path):
    """A journal written before ``clamp_reference`` existed resumes with its default and
    refuses another value."""
    path = tmp_path / "rows.jsonl"
    with Journal(path, "x", {**SETTINGS, "hparams": {"layer": 1}}) as journal:
        journal.append({"key": 1})
    now = {**SETTINGS, "hparams": {"layer": 1, "clamp_reference": "mlp_output"}}
    with Journal(path, "x", now) as journal:
        assert [r["key"] for r in journal.rows] == [1]
    with pytest.raises(ValueError, match=r"other settings \(hparams differ\)"):
        Journal(path, "x", {**now, "hparams": {"layer": 1, "clamp_reference": "residual"}})


def test_one_writer_at_a_time(tmp_path):
    path = tmp_path / "rows.jsonl"
    with Journal(path, "x", SETTINGS) as writer:
        writer.append({"key": 1})
        with pytest.raises(ValueError, match="another process is writing"):
            Journal(path, "x", SETTINGS)
        with Journal(path, "x", SETTINGS, read_only=True) as reader:  # a report meanwhile
            assert reader.being_written and [r["key"] for r in reader.rows] == [1]
        writer.append({"key": 2})
    with Journal(path, "x", SETTINGS) as journal:  # released on close
        assert [r["key"] for r in journal.rows] == [1, 2]
    with Journal(path, "x", SETTINGS, read_only=True) as reader:
        assert not reader.being_written


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


# ----------------------------------------------------------------------------- issue 23


@pytest.mark.parametrize("text", ["notes without newline", "hello\nworld without newline",
                                  '{"experiment": "x", "settings": []}\n',
                                  '{"experiment": "x", "settings": {}}\n[1, 2]\n',
                                  '{"experiment": "x", "settings": {}}\n{"key": 1}\nnotes',
                                  '{"experiment": 5, "settings": {}}\n', "\n"])
def test_what_is_not_a_journal_is_refused_and_kept(tmp_path, text):
    """Issue 23 (1, 13): no complete line, a header whose settings is not an object, a row
    that is not an object, or a last line that cannot be a torn row: refused, whatever the
    newlines, and the file is left byte for byte (also read only)."""
    path = tmp_path / "rows.jsonl"
    path.write_text(text)
    with pytest.raises(ValueError, match="not an experiment journal"):
        Journal(path, "x", {})
    with pytest.raises(ValueError, match="not an experiment journal"):
        Journal(path, "x", {}, read_only=True)
    with pytest.raises(ValueError, match="not an experiment journal"):
        read_rows(path)
    assert path.read_text() == text


def test_rows_the_experiment_cannot_read_are_refused(tmp_path):
    """Issue 23 (14): a collapse row ``{"key": 5}`` names its line and first missing field."""
    from rome_jax.experiments import collapse

    path = tmp_path / "rows.jsonl"
    text = '{"experiment": "collapse", "settings": {}}\n{"key": 5}\n'
    path.write_text(text)
    with pytest.raises(ValueError, match="line 2: case_id: missing"):
        Journal(path, "collapse", {}, check_row=collapse.check_row)
    path.write_text(text.replace('{"key": 5}', '{"key": 5, "case_id": 5, "first_token_subject":'
                                 ' true, "base_perplexity": 2, "rome": {}, "c-rome": {}}'))
    with pytest.raises(ValueError, match=r"line 2: rome\.ratio: missing"):
        read_rows(path, "collapse", collapse.check_row)


def test_a_refused_run_leaves_nothing_and_keeps_old_rows(tmp_path):
    """Issue 23 (21): a run that fails before its first row leaves no header-only journal (nor
    the folders made for it); a failed --overwrite run keeps the old rows; a finished run
    without rows records its settings."""
    path = tmp_path / "a" / "b" / "rows.jsonl"
    with pytest.raises(RuntimeError):
        with Journal(path, "x", SETTINGS):
            raise RuntimeError("refused")
    assert not (tmp_path / "a").exists()
    with Journal(path, "x", SETTINGS) as journal:
        journal.append({"key": 1})
    before = path.read_bytes()
    with pytest.raises(RuntimeError):
        with Journal(path, "x", {**SETTINGS, "layer": 9}, overwrite=True) as journal:
            assert journal.rows == []
            raise RuntimeError("refused")
    assert path.read_bytes() == before
    with Journal(tmp_path / "none.jsonl", "x", SETTINGS):
        pass
    assert read_rows(tmp_path / "none.jsonl") == ({"experiment": "x", "settings": {
        **SETTINGS, "lengths": [5, 10]}}, [])


def test_read_only_keeps_a_torn_line(tmp_path):
    path = tmp_path / "rows.jsonl"
    with Journal(path, "x", SETTINGS) as journal:
        journal.append({"key": 1})
    with open(path, "a") as f:
        f.write('{"key": 2, "rat')
    before = path.read_bytes()
    with Journal(path, "x", SETTINGS, read_only=True) as journal:
        assert [r["key"] for r in journal.rows] == [1]
        with pytest.raises(ValueError, match="read-only"):
            journal.append({"key": 3})
    assert path.read_bytes() == before
