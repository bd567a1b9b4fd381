"""``rome-jax experiment`` at its boundaries, in process on the tiny random GPT-2: user errors
name the flag or file and exit 2 before any work, refused runs write nothing, a journal that is
not one is never changed (issue 23: 1, 6, 14, 19, 21), and a fuzz test over malformed journal
lines: never exit 1, never a changed input."""

from __future__ import annotations

import json
import pytest
from conftest import SMALL, in_process_env
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rome_jax import cli


@pytest.fixture
def run(tiny_model, tmp_path, monkeypatch, capsys):
    """``run(*args)`` -> (exit status, stderr lines) of ``rome-jax experiment collapse`` on
    the tiny model with small settings, --n 1 --max-first 0."""
    monkeypatch.setenv("ROME_JAX_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("ROME_JAX_COMPILATION_CACHE", "0")
    monkeypatch.setenv("TQDM_DISABLE", "1")
    monkeypatch.chdir(tmp_path)

    def go(*args, name="collapse", extra=("--n", "1", "--max-first", "0")):
        capsys.readouterr()
        try:
            code = cli.main(["experiment", name, "--model", str(tiny_model), *SMALL, *extra,
                             *map(str, args)])
        except SystemExit as exit:  # argparse
            code = exit.code
        return code, capsys.readouterr().err.strip().splitlines()
    return go


def one_error(result, match: str) -> None:
    code, err = result
    assert code == 2 and len(err) == 1, (code, err)
    assert err[0].startswith("rome-jax: error: ") and match in err[0], err[0]


def test_notes_without_newline_are_refused_and_kept(run, tmp_path):
    """Issue 23 (1): --report-only on a rows.jsonl without a newline refuses it, unchanged."""
    out = tmp_path / "X"
    out.mkdir()
    (out / "rows.jsonl").write_text("notes without newline")
    one_error(run("--out", out, "--report-only"), "not an experiment journal")
    one_error(run("--out", out), "not an experiment journal")
    assert (out / "rows.jsonl").read_text() == "notes without newline"
    assert sorted(p.name for p in out.iterdir()) == ["rows.jsonl"]


@pytest.mark.parametrize("value", ["nan", "inf", "-Infinity"])
def test_float_flags_must_be_finite(run, value):
    """Issue 23 (6)."""
    one_error(run(f"--threshold={value}", "--out", "x"),
              f"--threshold: '{value}' is not a finite number")


def test_errors_name_the_flag_and_refused_runs_write_nothing(run, tmp_path):
    """Issue 23 (19, 21): errors name --layer / --n, not Python fields; an --out that is a
    file, or holds a directory where rows.jsonl goes, is refused up front in one line; a
    run refused after set-up (bos without its baseline) leaves no folder behind."""
    one_error(run("--layer", "99", "--out", "x"), "--layer: 99 is out of range")
    one_error(run("--out", "x", extra=("--n", "0", "--max-first", "0")),
              "--n 0 and --max-first 0: select no records")
    (tmp_path / "file").write_text("")
    one_error(run("--out", tmp_path / "file"), f"--out {tmp_path / 'file'}: is a file")
    (tmp_path / "d" / "rows.jsonl").mkdir(parents=True)
    one_error(run("--out", tmp_path / "d"), "rows.jsonl: is a directory")
    one_error(run("--out", tmp_path / "bos", name="bos", extra=()), "--baseline")
    assert not (tmp_path / "bos").exists() and not (tmp_path / "x").exists()


def test_out_apart_from_the_inputs(run, tiny_model):
    """Issue 23 (2): experiment --out inside the model folder is refused."""
    one_error(run("--out", tiny_model / "results"), "is inside --model")
    assert not (tiny_model / "results").exists()


# ----------------------------------------------------------------------------- fuzz


@pytest.fixture(scope="module")
def finished(tiny_model, tmp_path_factory):
    """A finished collapse run's rows.jsonl (header and one row), as bytes."""
    root = tmp_path_factory.mktemp("fuzz")
    with in_process_env(root, default_model=False):
        assert cli.main(["experiment", "collapse", "--model", str(tiny_model), *SMALL, "--n",
                         "1", "--max-first", "0", "--out", str(root / "run")]) == 0
    return root, (root / "run" / "rows.jsonl").read_bytes()


JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
                    lambda inner: st.lists(inner, max_size=3)
                    | st.dictionaries(st.text(max_size=8), inner, max_size=3), max_leaves=8)


def mutated(row: dict):
    """A row with one field dropped, retyped or nested value replaced."""
    fields = st.sampled_from(sorted(row))
    return st.one_of(
        fields.map(lambda k: {f: v for f, v in row.items() if f != k}),
        st.tuples(fields, JSON).map(lambda kv: {**row, kv[0]: kv[1]}),
        st.tuples(st.sampled_from(["rome", "c-rome"]), st.sampled_from(
            ["ratio", "residual_norm", "success", "perplexity"]), JSON).map(
            lambda t: {**row, t[0]: {**row[t[0]], t[1]: t[2]}}))


@settings(max_examples=25, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_malformed_journal_lines_never_crash_or_change_the_file(finished, data, monkeypatch,
                                                                capsys):
    """Issue 23 (13, 14, fuzz): a journal with a mangled header or rows, any bytes after them,
    read by --report-only and by a resuming run with nothing left to do: exit 0 or 2 (never
    1, never a traceback), and rows.jsonl is byte for byte what it was."""
    root, good = finished
    header_line, row_line = good.decode().splitlines()[:2]
    header, row = json.loads(header_line), json.loads(row_line)
    header_text = data.draw(st.one_of(
        st.just(header_line),
        st.tuples(st.sampled_from(["experiment", "settings"]), JSON).map(
            lambda kv: json.dumps({**header, kv[0]: kv[1]})),
        JSON.map(json.dumps), st.text(max_size=20)), label="header")
    rows = data.draw(st.lists(st.one_of(mutated(row).map(json.dumps), JSON.map(json.dumps),
                                        st.text(max_size=20), st.just(row_line)), max_size=3),
                     label="rows")
    tail = data.draw(st.sampled_from(["", "{\"key\": 9, \"ca", "notes", "\n"]), label="tail")
    text = "\n".join([header_text, *rows]) + "\n" + tail
    out = root / "case"
    out.mkdir(exist_ok=True)
    (out / "rows.jsonl").write_text(text)
    monkeypatch.setenv("ROME_JAX_CACHE", str(root / "cache"))
    monkeypatch.setenv("ROME_JAX_COMPILATION_CACHE", "0")
    monkeypatch.setenv("TQDM_DISABLE", "1")
    model = header["settings"]["model"]
    for extra in (["--n", "1", "--report-only"], ["--n", "0"]):  # --n 0: refused after reading
        capsys.readouterr()
        code = cli.main(["experiment", "collapse", "--model", model, *SMALL, "--out", str(out),
                         "--max-first", "0", *extra])
        err = capsys.readouterr().err
        assert code in (0, 2) and "internal error" not in err, err
        assert (out / "rows.jsonl").read_text() == text
