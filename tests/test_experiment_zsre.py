"""``rome-jax experiment zsre`` in-process on a tiny random GPT-2: rows, the summary and table
made from them, a skipped record, resuming, and a rerun with other settings refused."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from conftest import tiny_gpt2

from rome_jax import cli, data, zsre_eval
from rome_jax.experiments import EXPERIMENTS
from rome_jax.experiments.journal import read_rows
from rome_jax.experiments.zsre import mean_ci95, methods_of, sample_ids

SMALL = ["--layer", "1", "--mom2-n-samples", "40", "--v-steps", "4", "--template-lengths", "5x5"]
METHODS = ("rome", "c-rome", "p-rome")


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    from rome_jax import save_hf

    path = tmp_path_factory.mktemp("zsre") / "tiny-gpt2"
    save_hf(tiny_gpt2(n_layer=2, d_model=64, n_head=4, seq_len=64, seed=0), path)
    return path


@pytest.fixture
def records(monkeypatch):
    """Four real zsRE records, the third with a subject that is not in its question."""
    raw = data.load_zsre()[:4]
    raw[2] = {**raw[2], "subject": "Nowhere Land"}
    monkeypatch.setattr(data, "load_zsre", lambda: raw)
    return raw


@pytest.fixture
def calls(monkeypatch):
    """The case ids evaluate_record is called with."""
    seen, real = [], zsre_eval.evaluate_record
    monkeypatch.setattr(zsre_eval, "evaluate_record",
                        lambda model, raw, case_id, *a: seen.append(case_id) or
                        real(model, raw, case_id, *a))
    return seen


def run(tiny_model, out, *extra) -> int:
    return cli.main(["experiment", "zsre", "--model", str(tiny_model), *SMALL, "--out",
                     str(out), *extra])


@pytest.fixture(autouse=True)
def env(monkeypatch, tmp_path_factory):
    monkeypatch.setenv("ROME_JAX_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))
    monkeypatch.setenv("ROME_JAX_COMPILATION_CACHE", "0")
    monkeypatch.setenv("TQDM_DISABLE", "1")


def test_registered_and_sample_is_a_seeded_prefix():
    assert EXPERIMENTS["zsre"].NAME == "zsre"
    assert sample_ids(100, 5, 3) == sample_ids(100, 9, 3)[:5] != sample_ids(100, 5, 4)
    assert len(set(sample_ids(100, 100, 0))) == 100
    with pytest.raises(ValueError, match="--n: 101 asked"):
        sample_ids(100, 101, 0)
    assert methods_of("rome, r-rome,c-rome") == ["rome", "c-rome"]
    with pytest.raises(ValueError, match="--methods: .*memit"):
        methods_of("rome,memit")


def test_mean_ci95_by_hand():
    x = [0.0, 0.5, 1.0, 1.0]
    got = mean_ci95(x)
    sd = math.sqrt(sum((v - 0.625) ** 2 for v in x) / 3)
    assert got == {"mean": 0.625, "ci95": pytest.approx(1.96 * sd / 2), "n": 4}
    assert math.isnan(mean_ci95([1.0])["ci95"]) and mean_ci95([])["n"] == 0


def test_small_run_summary_is_the_rows_and_resume_skips_them(tiny_model, tmp_path, records,
                                                             calls, capsys):
    out = tmp_path / "z"
    assert run(tiny_model, out, "--n", "3") == 0
    header, rows = read_rows(out / "rows.jsonl", "zsre")
    ids = sample_ids(4, 3, 0)
    assert [r["key"] for r in rows] == [r["case_id"] for r in rows] == ids == calls
    assert header["settings"]["methods"] == list(METHODS)
    skipped = [r for r in rows if "error" in r]
    edited = [r for r in rows if "error" not in r]
    assert [r["case_id"] for r in skipped] == [2]  # the record without its subject
    for r in skipped:
        assert "subject: 'Nowhere Land' is not in the question" in r["error"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["skipped"] == [{"case_id": r["case_id"], "error": r["error"]}
                                  for r in skipped]
    group = summary["groups"]["all"]
    assert group["n"] == len(edited) >= 2
    base = edited[0]["none"]["perplexity"]
    for r in edited:
        assert r["none"]["perplexity"] == base == summary["base_perplexity"]
        for method in ("none", *METHODS):
            assert 0 <= min(r[method][m] for m in zsre_eval.METRICS)
            assert max(r[method][m] for m in zsre_eval.METRICS) <= 1
        for method in METHODS:
            assert r[method]["ppl_ratio"] == pytest.approx(r[method]["perplexity"] / base)
            assert r[method]["delta_abs"] > 0 and r[method]["delta_norm"] > 0
    for method in ("none", *METHODS):
        for m in zsre_eval.METRICS:
            values = [r[method][m] for r in edited]
            assert group[method][m]["mean"] == pytest.approx(np.mean(values))
            assert group[method][m]["ci95"] == pytest.approx(
                1.96 * np.std(values, ddof=1) / math.sqrt(len(values)))
    assert group["rome"]["ppl_ratio"]["max"] == pytest.approx(
        max(r["rome"]["ppl_ratio"] for r in edited))
    assert sum(summary["groups"][g]["n"] for g in summary["groups"] if g != "all") == len(edited)
    table = (out / "table.md").read_text()
    efficacy = 100 * group["c-rome"]["efficacy"]["mean"]
    assert f"| all | c-rome | {len(edited)} | {efficacy:.1f}" in table
    assert "Skipped records:" in table and (out / "figure.png").stat().st_size > 0
    assert "Efficacy" in capsys.readouterr().out

    calls.clear()
    assert run(tiny_model, out, "--n", "3") == 0  # nothing left to do
    assert calls == []
    assert run(tiny_model, out, "--n", "4") == 0  # the sample grows by one record
    assert calls == [sample_ids(4, 4, 0)[3]]
    assert read_rows(out / "rows.jsonl")[1][:3] == rows

    calls.clear()
    assert run(tiny_model, out, "--n", "4", "--methods", "rome") == 2
    assert "other settings (methods differ)" in capsys.readouterr().err and calls == []
