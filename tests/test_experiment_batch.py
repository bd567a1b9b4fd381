"""``rome-jax experiment batch``, ``sequential-batch`` and ``batch-collapse`` on the embedded
default model at small sizes, in process: the rows' shapes, ranges and internal consistency,
the reports from the rows, and resuming without recomputing."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import in_process_env

from rome_jax import cli
from rome_jax.experiments.journal import Journal, read_rows

SMALL = ["--mom2-n-samples", "40", "--v-steps", "4", "--template-lengths", "5x5"]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("batch")
    with in_process_env(root):
        yield root


def harmonic(*xs: float) -> float:
    return 0.0 if min(xs) <= 0 else len(xs) / sum(1 / x for x in xs)


def test_batch_rows_and_resume(env):
    args = ["experiment", "batch", "--sizes", "1,3", "--methods", "memit,emmet",
            "--ppl-texts", "5", "--out", str(env / "batch"), *SMALL]
    assert cli.main(args) == 0
    header, rows = read_rows(env / "batch" / "rows.jsonl", "batch")
    by_key = {r["key"]: r for r in rows}
    assert set(by_key) == {f"{m}/{n}" for m in ("none", "memit", "emmet") for n in (1, 3)}
    assert by_key["none/1"]["ppl"] == by_key["none/3"]["ppl"]  # one unedited model
    for key, r in by_key.items():
        for score in ("ES", "PS", "NS"):
            assert 0 <= r[score] <= 1
        assert r["S"] == pytest.approx(harmonic(r["ES"], r["PS"], r["NS"]))
        if r["method"] == "none":
            continue
        assert r["layers"] == ([0, 1, 2] if r["method"] == "memit" else [2])  # the presets
        assert [layer["layer"] for layer in r["update"]] == r["layers"]
        for layer in r["update"]:
            assert layer["rank"] == min(r["n"], 64) and np.isfinite(layer["update.delta_norm"])
            assert layer["update.delta_norm"] > 0
        assert r["seconds_solve"] > 0 and r["seconds_update"] > 0 and r["ppl"] > 1
    # a rerun with the same settings computes nothing and keeps the rows
    for n in (1, 3):  # the v* targets are solved once and shared by the methods of a size
        for field in ("v_loss_median", "seconds_solve"):
            assert by_key[f"memit/{n}"][field] == by_key[f"emmet/{n}"][field]
    assert len(list((env / "batch").glob("targets-*.npz"))) == 1
    assert cli.main(args) == 0
    assert read_rows(env / "batch" / "rows.jsonl", "batch")[1] == rows
    table = (env / "batch" / "table.md").read_text()
    assert "| memit | 3 |" in table and "MEMIT, GPT-J, 10,000 edits" in table


def test_shared_targets_resume(env, tmp_path, monkeypatch):
    """Targets saved every SAVE_EVERY requests: a run killed after the first save solves only the
    rest, and the resumed targets equal an uninterrupted run's."""
    import jax

    from rome_jax.editors import batch as editors_batch
    from rome_jax.editors.batch import prepare_batch
    from rome_jax.editors.hparams import resolve
    from rome_jax.experiments import batch
    from rome_jax.hf import DEFAULT_MODEL, load_model
    from rome_jax.rome.request import EditRequest

    model = load_model(DEFAULT_MODEL)
    hparams = resolve(model.config, "emmet", v_num_grad_steps=2)
    context = prepare_batch(model, "emmet", hparams, jax.random.key(0),
                            templates=["{}", "A. {}"])
    requests = [EditRequest("{} is located in", s, "Paris", "Rome")
                for s in ("Berlin", "Madrid", "Oslo")]
    monkeypatch.setattr(batch, "SAVE_EVERY", 2)  # chunks of 2: [0, 1], [2]
    whole, _ = batch.shared_targets(model, requests, hparams, context, tmp_path / "a", 2)
    solve = editors_batch.solve_targets
    calls = []

    def killed(model, piece, *a, **k):
        calls.append(len(piece))
        if len(calls) == 2:
            raise KeyboardInterrupt  # killed after the first save
        return solve(model, piece, *a, **k)

    monkeypatch.setattr(editors_batch, "solve_targets", killed)
    with pytest.raises(KeyboardInterrupt):
        batch.shared_targets(model, requests, hparams, context, tmp_path / "b", 2)
    monkeypatch.setattr(editors_batch, "solve_targets", lambda model, piece, *a, **k: (
        calls.append(len(piece)), solve(model, piece, *a, **k))[1])
    resumed, seconds = batch.shared_targets(model, requests, hparams, context,
                                            tmp_path / "b", 2)
    assert calls == [2, 1, 1] and seconds > 0
    for a, b in zip(whole, resumed):
        for x, y in zip(a, b):
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_sequential_batch_folds_and_resumes(env):
    out = env / "seq"
    args = ["experiment", "sequential-batch", "--n", "4", "--batch-size", "2", "--methods",
            "alphaedit,memit", "--tasks", "sst2", "--downstream-n", "4", "--shots", "1",
            "--ppl-texts", "5", "--out", str(out), *SMALL]
    assert cli.main(args) == 0
    from rome_jax.experiments.sequential import accuracy_cell, downstream_columns

    _, rows = read_rows(out / "rows.jsonl", "sequential-batch")
    # batch by batch, every method in turn: a stopped run has every method equally far; the
    # unedited outcome of every drawn fact before the first batch
    from rome_jax.experiments.sequential_batch import UNEDITED_FACTS, unedited_es_so_far

    assert [r["key"] for r in rows] == [["alphaedit", 0], ["memit", 0], UNEDITED_FACTS] + [
        [m, b] for b in (1, 2) for m in ("alphaedit", "memit")]
    facts = rows[2]
    assert len(facts["case_ids"]) == len(facts["p_new"]) == len(facts["p_true"]) == 4
    assert all(0 < p < 1 for p in facts["p_new"])
    assert all(np.isnan(p) or 0 < p < 1 for p in facts["p_true"])
    summary = json.loads((out / "summary.json").read_text())
    first = next(r["downstream"] for r in rows if r["key"] == ["alphaedit", 0])
    table = (out / "table.md").read_text()
    for method in ("alphaedit", "memit"):
        trace = sorted((r for r in rows if r.get("method") == method),
                       key=lambda r: r["batches"])
        # beside every ES so far, the unedited model's ES of the same facts
        assert [r["es_so_far_unedited"] for r in summary["traces"][method]] == [
            None, unedited_es_so_far(facts, 2), unedited_es_so_far(facts, 4)]
        assert [r["batches"] for r in trace] == [0, 1, 2]
        assert [r["edited"] for r in trace] == [0, 2, 4]
        for r in trace[1:]:
            assert 0 <= r["es_so_far"] <= 1 and 0 <= r["es_batch"] <= 1
            assert len(r["delta_norm"]) == 3 and all(np.isfinite(r["delta_norm"]))
        assert all(r["ppl1k"] > 1 for r in trace)
        assert trace[0]["downstream"] == first  # the unedited model, evaluated once
        assert 0 <= first["sst2"]["accuracy"] <= 1 and first["sst2"]["n"] == 4
        kept, note = downstream_columns(first)
        assert all(list(r["downstream"]) == kept for r in trace[1:])  # edited: tasks kept
        assert (f"| {first['sst2']['accuracy']:.2f} [" in table) == bool(kept)
        assert ("sst2 " + accuracy_cell(first["sst2"]) in table) == (not kept)
        state = np.load(out / f"state-{method}.npz")
        assert int(state["done"]) == 2
        preserved = [k for k in state.files if k.startswith("preserved")]
        assert bool(preserved) == (method == "alphaedit")  # AlphaEdit's fold state only
        for k in preserved:
            np.testing.assert_allclose(state[k], state[k].T, rtol=1e-5, atol=1e-5)
    assert cli.main(args) == 0
    assert read_rows(out / "rows.jsonl", "sequential-batch")[1] == rows
    assert sorted(p.name for p in (out / "vstar").iterdir()) == [
        f"{m}-{b:05d}.npz" for m in ("alphaedit", "memit") for b in (1, 2)]


def test_unedited_es_so_far_counts_as_efficacy_does():
    """The first ``edited`` facts only; facts without a true object (NaN P(true)) left out, as
    ``evaluation.efficacy`` leaves them; a facts row whose lists differ in length is refused,
    naming the field."""
    from rome_jax.experiments.sequential_batch import (UNEDITED_FACTS, check_row,
                                                       unedited_es_so_far)

    nan = float("nan")
    facts = {"key": UNEDITED_FACTS, "case_ids": [1, 2, 3, 4], "p_new": [0.3, 0.2, 0.1, 0.5],
             "p_true": [0.1, nan, 0.4, 0.2]}
    check_row(facts)
    assert unedited_es_so_far(facts, 3) == 0.5
    assert unedited_es_so_far(facts, 4) == 2 / 3
    assert unedited_es_so_far({"p_new": [0.1, 0.9], "p_true": [nan, 0.1]}, 1) is None
    for field in ("p_new", "p_true"):
        with pytest.raises(ValueError, match=f"^{field}: "):
            check_row({**facts, field: facts[field][:3]})
    with pytest.raises(ValueError, match="p_true"):
        check_row({k: v for k, v in facts.items() if k != "p_true"})


def test_sequential_batch_replays_from_its_vstar_journal(env, monkeypatch, capsys):
    """A fresh checkout has the rows and the v* journal but no state (the state is not
    committed): the rerun replays both batches from the journal, solving nothing and evaluating
    nothing, to the same weights and AlphaEdit state bit for bit; a journal entry of other
    records is refused, naming its file."""
    import shutil

    from rome_jax.editors import batch as editors_batch
    from rome_jax.experiments import sequential_batch

    out = env / "seq"
    if not (out / "state-alphaedit.npz").exists():
        pytest.skip("needs test_sequential_batch_folds_and_resumes's run")
    fresh = env / "seq-fresh"
    shutil.copytree(out, fresh, ignore=shutil.ignore_patterns("state-*.npz"))

    def refused(*a, **k):
        raise AssertionError("a replay solved v* or evaluated")

    monkeypatch.setattr(editors_batch, "solve_targets", refused)
    monkeypatch.setattr(sequential_batch, "_efficacy", refused)
    args = ["experiment", "sequential-batch", "--n", "4", "--batch-size", "2", "--methods",
            "alphaedit,memit", "--tasks", "sst2", "--downstream-n", "4", "--shots", "1",
            "--ppl-texts", "5", *SMALL]
    assert cli.main([*args, "--out", str(fresh)]) == 0
    for method in ("alphaedit", "memit"):
        whole, replayed = (np.load(d / f"state-{method}.npz") for d in (out, fresh))
        assert sorted(whole.files) == sorted(replayed.files)
        for name in whole.files:
            np.testing.assert_array_equal(whole[name], replayed[name])
    other = fresh / "vstar" / "memit-00002.npz"
    saved = dict(np.load(other))
    np.savez(other, **{**saved, "case_ids": saved["case_ids"] + 1})
    for path in fresh.glob("state-*.npz"):
        path.unlink()
    assert cli.main([*args, "--out", str(fresh)]) != 0
    assert f"{other}: the v* targets of other records" in capsys.readouterr().err


def test_batch_collapse_rows(env):
    from rome_jax import load_model
    from rome_jax.models.model import params_digest

    baseline = env / "collapse-l2"
    settings = {"layer": 2, "bos": None, "threshold": 10.0, "sample_seed": 0,
                "digest": params_digest(load_model().params)}
    with Journal(baseline / "rows.jsonl", "collapse", settings) as journal:
        for case_id, first, ratio in ((946, True, 100.0), (0, False, 1.0), (2, False, 1.01)):
            journal.append({"key": case_id, "case_id": case_id, "first_token_subject": first,
                            "rome": {"ratio": ratio}})
    out = env / "batch-collapse"
    assert cli.main(["experiment", "batch-collapse", "--baseline", str(baseline), "--n-normal",
                     "2", "--methods", "emmet", "--conventions", "rome,c-rome", "--out",
                     str(out), *SMALL]) == 0
    _, rows = read_rows(out / "rows.jsonl", "batch-collapse")
    assert [(r["method"], r["keys"]) for r in rows] == [("emmet", "rome"), ("emmet", "c-rome")]
    for r in rows:
        assert (r["n_collapse"], r["n_normal"]) == (1, 2)
        assert 0 <= r["es_collapse"] <= 1 and 0 <= r["es_normal"] <= 1 and r["ppl50_ratio"] > 0
        (layer,) = r["update"]
        assert layer["layer"] == 2 and layer["rank"] == 3
        assert layer["denominator_condition"] >= 1
