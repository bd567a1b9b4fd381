"""``rome-jax experiment collapse`` and ``bos`` on a tiny random GPT-2 (see conftest's CLI
helpers): rows, resume, refusals, and tables that agree with the rows."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import SMALL, assert_ok, assert_user_error, cli

from rome_jax.experiments import collapse
from rome_jax.experiments.journal import read_rows


def test_collapse_rows_resume_and_report(env, tiny_model, tmp_path):
    out = tmp_path / "collapse"
    args = ["experiment", "collapse", "--model", tiny_model, "--threshold", "1.05",
            "--max-first", "1", "--out", out, *SMALL]
    first = cli(env, *args, "--n", "1")
    assert_ok(first)
    header, rows = read_rows(out / "rows.jsonl", "collapse")
    assert header["settings"]["threshold"] == 1.05 and header["settings"]["layer"] == 1
    assert len(rows) == 2 and [r["first_token_subject"] for r in rows] == [True, False]
    for r in rows:
        assert r["key"] == r["case_id"]
        for m in collapse.METHODS:
            e = r[m]
            assert e["ratio"] == pytest.approx(e["perplexity"] / r["base_perplexity"])
            assert e["collapse"] == (e["ratio"] > 1.05)
            assert e["residual_norm"] > 0 and np.isfinite(e["denominator_unit_u"])
            assert e["success"] == (e["p_new_after"] > e["p_true_after"])

    resumed = cli(env, *args, "--n", "2")
    assert_ok(resumed)
    assert "2 rows done" in resumed.stderr
    _, again = read_rows(out / "rows.jsonl")
    assert again[:2] == rows and len(again) == 3

    summary = json.loads((out / "summary.json").read_text())
    groups = summary["groups"]
    assert sum(g["n"] for g in groups.values()) == 3
    by_id = {r["case_id"]: r for r in again}
    for name, g in groups.items():
        members = [by_id[i] for i in g["case_ids"]]
        assert all(collapse.group_of(r, 1.05) == name for r in members)
        for m in collapse.METHODS:
            assert g[m]["numerator"]["mean"] == pytest.approx(
                np.mean([r[m]["residual_norm"] for r in members]))
            assert g[m]["abs_denominator"]["mean"] == pytest.approx(
                np.mean([abs(r[m]["denominator_unit_u"]) for r in members]))
            assert g[m]["perplexity"]["max"] == pytest.approx(
                max(r[m]["perplexity"] for r in members))
    table = (out / "table.md").read_text()
    assert table == resumed.stdout.split("\n\nrome-jax experiment")[0] + "\n"
    assert all(f"| {name} | {g['n']} |" in table for name, g in groups.items())
    assert (out / "figure.png").read_bytes()[:4] == b"\x89PNG"

    other = cli(env, *args[:-len(SMALL)], *SMALL[:-2], "--n", "2")  # other templates
    assert_user_error(other, "other settings (hparams differ)")
    (out / "table.md").unlink()
    report = cli(env, *args, "--n", "2", "--report-only")
    assert_ok(report)
    assert (out / "table.md").read_text() == table


def test_bos_runs_the_baseline_records_with_a_start_token(env, tiny_model, tmp_path):
    root = tmp_path / "experiments"
    missing = cli(env, "experiment", "bos", "--model", tiny_model, "--out", root / "bos",
                  *SMALL)
    assert_user_error(missing, "run `rome-jax experiment collapse`")
    base = ["--model", tiny_model, "--threshold", "1.05", *SMALL]
    assert_ok(cli(env, "experiment", "collapse", "--n", "1", "--max-first", "1",
                  "--out", root / "collapse-l1", *base))
    proc = cli(env, "experiment", "bos", "--model", tiny_model, "--out", root / "bos", *SMALL)
    assert_ok(proc)
    header, rows = read_rows(root / "bos" / "rows.jsonl", "bos")
    _, base_rows = read_rows(root / "collapse-l1" / "rows.jsonl")
    assert header["settings"]["bos"] is not None  # <|endoftext|> by default
    assert sorted(r["case_id"] for r in rows) == sorted(
        r["case_id"] for r in base_rows if "error" not in r
        and collapse.group_of(r, 1.05) in ("normal", "collapse", "first-token, below threshold"))
    summary = json.loads((root / "bos" / "summary.json").read_text())
    for g in summary["groups"].values():
        assert g["with"]["n"] == g["without"]["n"]
    # the start token changes the keys, so the edits differ from the baseline's
    assert rows[0]["rome"]["denominator"] != next(
        r for r in base_rows if r["case_id"] == rows[0]["case_id"])["rome"]["denominator"]


def test_batched_solves_give_the_same_rows(env, tiny_model, tmp_path):
    """``--batch 3`` solves the three records' keys and v* as one vmapped program: the same
    rows as one record at a time, the key-only numbers equal to float32 rounding (v* itself is
    too ill-conditioned on this O(1) random model to compare; ``test_sharding`` compares it on
    a GPT-2-scale one)."""
    args = ["experiment", "collapse", "--model", tiny_model, "--threshold", "1.05", "--n", "2",
            "--max-first", "1", *SMALL]
    rows = {}
    for batch in (1, 3):
        assert_ok(cli(env, *args, "--batch", batch, "--out", tmp_path / f"b{batch}"))
        rows[batch] = read_rows(tmp_path / f"b{batch}" / "rows.jsonl")[1]
    assert [r["case_id"] for r in rows[3]] == [r["case_id"] for r in rows[1]]
    assert len(rows[1]) == 3
    for one, three in zip(rows[1], rows[3]):
        assert one.keys() == three.keys()
        for m in collapse.METHODS:
            assert one[m].keys() == three[m].keys()
            for field in ("denominator_unit_u", "key_cosine"):
                assert three[m][field] == pytest.approx(one[m][field], rel=1e-4, abs=1e-6)
    refused = cli(env, *args, "--batch", 0, "--out", tmp_path / "b0")
    assert refused.returncode == 2 and "--batch" in refused.stderr
    assert not (tmp_path / "b0").exists()
