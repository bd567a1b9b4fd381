"""``rome-jax experiment single`` on the embedded default model, in process, from a collapse run
whose rows are written here: which records it edits, the rows' numbers, the test-time prefix,
the report against the rows, resuming and refusing other settings."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from conftest import in_process_env

from rome_jax import cli
from rome_jax.experiments import single
from rome_jax.experiments.journal import Journal, read_rows

SMALL = ["--mom2-n-samples", "40", "--v-steps", "4", "--template-lengths", "5x5",
         "--generation-prompts", "1", "--generation-tokens", "4"]
METRICS = ("ES", "EM", "PS", "PM", "NS", "NM")
# Case ids for the default model's tokenizer: 946 ("Bay") and 1420 ("Life") are first-token
# subjects; 0 and 2 are not, and only 2's rewrite prompt opens with its subject.
BASELINE = {946: (True, 100.0), 1420: (True, 1.02), 0: (False, 1.0), 2: (False, 1.01)}


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("single")
    with in_process_env(root):
        yield root


@pytest.fixture(scope="module")
def baseline(env):
    """A finished collapse run (threshold 10x): 946 collapses, 1420 is a first-token record
    below the threshold, 0 and 2 are normal cases, 5 did not fit."""
    from rome_jax import load_model
    from rome_jax.models.model import params_digest

    path = env / "collapse-l2"
    settings = {"layer": 2, "bos": None, "threshold": 10.0, "sample_seed": 0,
                "digest": params_digest(load_model().params)}
    with Journal(path / "rows.jsonl", "collapse", settings) as journal:
        for case_id, (first, ratio) in BASELINE.items():
            journal.append({"key": case_id, "case_id": case_id, "first_token_subject": first,
                            "rome": {"ratio": ratio}})
        journal.append({"key": 5, "case_id": 5, "error": "does not fit"})
    return path


def run(env, baseline, *extra) -> int:
    return cli.main(["experiment", "single", "--baseline", str(baseline), "--out",
                     str(env / "single"), *SMALL, *extra])


@pytest.fixture(scope="module")
def first_run(env, baseline):
    assert run(env, baseline, "--n", "1") == 0
    return read_rows(env / "single" / "rows.jsonl", "single")


def test_rows_cover_the_groups_and_are_in_range(first_run):
    header, rows = first_run
    assert header["settings"]["generation_tokens"] == 4
    assert {r["case_id"]: r["group"] for r in rows} == {
        946: "collapse", 0: "normal", 1420: "first-token, below threshold"}  # --n 1: not 2
    for row in rows:
        assert set(row["edits"]) == set(single.METHODS)
        assert row["prefix"] and row["prompts_prefixed"] == int(row["case_id"] != 0)
        for name, scores in [("before", row["before"]), *row["edits"].items()]:
            for s in (scores, scores["prefixed"]):
                assert all(0 <= s[k] <= 1 for k in ("ES", "PS", "NS"))
                assert all(-1 <= s[k] <= 1 for k in ("EM", "PM", "NM"))
            assert scores["ppl_ratio"] > 0 and 0 <= scores["GE_norm"] <= 1 and scores["GE"] >= 0
            if name != "before":
                assert 0 < scores["delta_abs"] < scores["delta_norm"]
        # rome and p-rome both write at k^u: the same residual v* − Wk^u − b = δ
        assert row["edits"]["rome"]["residual_norm"] == pytest.approx(
            row["edits"]["p-rome"]["residual_norm"])
        assert row["before"]["ppl_ratio"] == pytest.approx(1.0)


def test_prefix_changes_only_subject_first_prompts(first_run):
    _, rows = first_run
    for row in rows:
        opens = row["rewrite_prompt"] != row["rewrite_prompt"].removeprefix(row["prefix"])
        assert opens == (row["case_id"] != 0)  # paraphrases here never open with the subject
        for scores in [row["before"], *row["edits"].values()]:
            plain, prefixed = scores, scores["prefixed"]
            assert (plain["NS"], plain["NM"]) == (prefixed["NS"], prefixed["NM"])
            assert (plain["PS"], plain["PM"]) == (prefixed["PS"], prefixed["PM"])
            if opens:
                assert plain["EM"] != prefixed["EM"]
            else:
                assert (plain["ES"], plain["EM"]) == (prefixed["ES"], prefixed["EM"])


def test_report_matches_rows(env, first_run):
    _, rows = first_run
    summary = json.loads((env / "single" / "summary.json").read_text())
    table = (env / "single" / "table.md").read_text()
    assert (env / "single" / "figure.png").stat().st_size > 0
    assert "seed 0" in summary["normal_sample"]
    for group, stats in summary["groups"].items():
        members = [r for r in rows if r["group"] == group]
        assert stats["n"] == len(members) == stats["plain"]["c-rome"]["n"]
        for method in single.METHODS:
            norms = [r["edits"][method]["residual_norm"] for r in members]
            got = stats["plain"][method]["residual_norm_median"]
            assert got == pytest.approx(np.median(norms)) and got > 0
        for scoring in single.SCORINGS:
            for method in ("none", *single.METHODS):
                got = stats[scoring][method]
                scored = [r["before"] if method == "none" else r["edits"][method]
                          for r in members]
                scored = [s["prefixed"] if scoring == "prefixed" else s for s in scored]
                for k in METRICS:
                    assert got[k] == pytest.approx(np.mean([s[k] for s in scored]))
        c = stats["plain"]["c-rome"]
        assert f"| {group} | {stats['n']} | r-rome (= c-rome) | {c['ES']:.3g} | {c['EM']:.3g} |" \
            in table
    assert math.isfinite(summary["groups"]["collapse"]["prefixed"]["rome"]["ES"])


def test_resume_computes_only_new_rows_and_refuses_other_settings(env, baseline, first_run,
                                                                   monkeypatch, capsys):
    from rome_jax import counterfact_eval

    done = [r["case_id"] for r in first_run[1]]
    edited = []
    evaluate = counterfact_eval.evaluate_record
    monkeypatch.setattr(counterfact_eval, "evaluate_record",
                        lambda model, record, *a: edited.append(record["case_id"])
                        or evaluate(model, record, *a))
    assert run(env, baseline, "--n", "2") == 0
    assert edited == [2]
    _, rows = read_rows(env / "single" / "rows.jsonl")
    assert [r["case_id"] for r in rows] == done + [2]
    capsys.readouterr()
    assert run(env, baseline, "--n", "2", "--generation-tokens", "5") == 2
    assert "generation_tokens differ" in capsys.readouterr().err
