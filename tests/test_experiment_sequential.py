"""``rome-jax experiment sequential`` on a tiny random GPT-2, in process: consistent rows, the
report from the rows, resume after an interruption to the same weights, refused reruns and a
trace ended by a non-finite update."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import tiny_gpt2

from rome_jax.experiments import sequential, state
from rome_jax.experiments.journal import read_rows

SMALL = ["--layer", "1", "--mom2-n-samples", "40", "--v-steps", "4", "--template-lengths",
         "5x5"]
ARGS = ["--n", "3", "--every", "2", "--methods", "rome,r-rome", "--tasks", "sst2,piqa",
        "--downstream-n", "4", "--shots", "1", "--ppl-texts", "12"]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    from rome_jax import save_hf

    root = tmp_path_factory.mktemp("seq")
    save_hf(tiny_gpt2(n_layer=2, d_model=64, n_head=4, seq_len=64, seed=0), root / "model")
    return root


def experiment(env: Path, monkeypatch, out: Path, *extra: str) -> int:
    from rome_jax import cli

    monkeypatch.setenv("ROME_JAX_CACHE", str(env / "cache"))
    monkeypatch.setenv("ROME_JAX_COMPILATION_CACHE", "0")
    monkeypatch.setenv("TQDM_DISABLE", "1")
    return cli.main(["experiment", "sequential", "--model", str(env / "model"), *SMALL, *ARGS,
                     "--out", str(out), *extra])


@pytest.fixture(scope="module")
def done(env):
    """An uninterrupted run."""
    with pytest.MonkeyPatch.context() as mp:
        assert experiment(env, mp, env / "whole") == 0
    return env / "whole"


def test_rows_are_consistent(done):
    header, rows = read_rows(done / "rows.jsonl", "sequential")
    assert header["settings"]["methods"] == ["rome", "c-rome"]
    traces = sequential.traces(rows)
    assert list(traces) == ["rome", "c-rome"]
    for method, trace in traces.items():
        assert [r["step"] for r in trace] == [0, 1, 2, 3]
        assert [("ppl1k" in r) for r in trace] == [True, False, True, True]  # 0, every 2, last
        assert trace[0]["ppl50_ratio"] == 1.0
        for r in trace[1:]:
            assert np.isfinite(r["delta_norm"]) and r["delta_norm"] > 0
            assert r["ppl50_ratio"] == pytest.approx(r["ppl50"] / trace[0]["ppl50"])
        kept, _ = sequential.downstream_columns(trace[0]["downstream"])
        for r in trace:
            if "ppl1k" in r:  # the unedited model on every task, edited ones on those kept
                assert r["ppl1k"] > 1
                assert set(r["downstream"]) == ({"sst2", "piqa"} if r["step"] == 0 else
                                                set(kept))
                for v in r["downstream"].values():
                    assert 0 <= v["accuracy"] <= 1 and v["n"] == 4 and 0.5 <= v["chance"] <= 1
                    assert v["interval"][0] <= v["accuracy"] <= v["interval"][1]
        assert trace[0]["ppl1k"] == traces["rome"][0]["ppl1k"]  # one unedited model
    case_ids = [r["case_id"] for r in traces["rome"][1:]]
    assert case_ids == [r["case_id"] for r in traces["c-rome"][1:]]  # same records, same order
    finals = {r["method"]: r for r in rows if r["key"][1] == "final"}
    for method, final in finals.items():
        assert final["case_ids"] == case_ids and len(final["records"]) == 3
        assert final["summary"]["ES"] == pytest.approx(np.mean([x["ES"] for x in
                                                                final["records"]]))
    singles = [r for r in rows if r["key"][0] == "single"]
    assert sorted(r["case_id"] for r in singles) == sorted(case_ids)
    assert all(set(r["edits"]) == {"rome", "c-rome"} for r in singles)
    for method in ("rome", "c-rome"):
        saved = np.load(done / f"state-{method}.npz")
        assert int(saved["done"]) == 3 and saved["weight1"].shape == (256, 64)
        assert sorted(saved.files) == ["done", "weight1"]  # the one layer ROME changes


def test_report_numbers_are_the_rows(done):
    _, rows = read_rows(done / "rows.jsonl", "sequential")
    summary = json.loads((done / "summary.json").read_text())
    table = (done / "table.md").read_text()
    assert (done / "figure.png").stat().st_size > 0
    traces = sequential.traces(rows)
    for method, v in summary["methods"].items():
        trace = traces[method]
        assert v["delta_norm"] == [r["delta_norm"] for r in trace[1:]]
        assert [e["step"] for e in v["evaluated"]] == [0, 2, 3]
        assert [e["ppl1k"] for e in v["evaluated"]] == [r["ppl1k"] for r in trace
                                                        if "ppl1k" in r]
        final = next(r for r in rows if r["key"] == [method, "final"])
        assert v["sequential"] == final["summary"]
        singles = [r["edits"][method] for r in rows if r["key"][0] == "single"]
        assert v["single"]["NS"] == pytest.approx(np.mean([s["NS"] for s in singles]))
        for e in v["evaluated"]:
            assert f"| {e['step']} | {e['ppl1k']:.3g} |" in table
    assert "r-rome = c-rome" in table and "| rome | sequential | 3 |" in table
    base = next(r for r in rows if r["key"] == ["rome", 0])["downstream"]
    kept, note = sequential.downstream_columns(base)
    assert summary["tasks"] == kept and summary["dropped"] == note
    for task in ("sst2", "piqa"):  # each task a column or named as dropped
        assert (f"| {task} |" in table) == (task in kept)
        assert (f"{task} {sequential.accuracy_cell(base[task])} against" in table) == (
            task not in kept)


def test_tasks_at_chance_are_dropped_by_name():
    unedited = {"sst2": {"accuracy": 0.74, "n": 600, "chance": 0.5},
                "mrpc": {"accuracy": 0.5, "n": 200, "chance": 0.51},
                "piqa": {"accuracy": 0.55, "n": 20, "chance": 0.5}}
    kept, note = sequential.downstream_columns(unedited)
    assert kept == ["sst2"]
    assert "mrpc 0.50 [0.43, 0.57] against a majority rate of 0.51" in note
    assert "piqa 0.55 [0.34, 0.74]" in note and "sst2" not in note
    assert sequential.downstream_columns({"sst2": unedited["sst2"]}) == (["sst2"], "")


def test_evaluation_flags():
    import argparse

    from rome_jax.downstream import DOWNSTREAM_N, SHOTS

    p = argparse.ArgumentParser()
    sequential.add_evaluation_args(p)
    st = sequential.evaluation_settings(p.parse_args(["--tasks", "piqa,sst2"]))
    assert st["shots"] == {"piqa": SHOTS["piqa"], "sst2": SHOTS["sst2"]}
    assert st["downstream_n"] == DOWNSTREAM_N and st["tasks"] == ["piqa", "sst2"]
    shots = sequential.evaluation_settings(p.parse_args(["--shots", "2"]))["shots"]
    assert shots == dict.fromkeys(SHOTS, 2)
    with pytest.raises(ValueError, match="--shots"):
        sequential.evaluation_settings(p.parse_args(["--shots", "-1"]))
    assert sequential.shots_text({"sst2": 0, "piqa": 3}) == "sst2 0-shot, piqa 3-shot"
    assert sequential.shots_text(3) == "3-shot"  # a journal from before per-task shots


def test_resume_after_an_interruption_reaches_the_same_weights(env, done, monkeypatch):
    """Cut after the row of rome's edit 2 but before its state (the worst place): the rerun
    replays that edit from the state of edit 1 and ends with the uninterrupted run's rows and
    weights."""
    out = env / "cut"
    save = sequential.save_state
    calls = []

    def cut(out_dir, method, step, *rest):
        calls.append(step)
        if (method, step) == ("rome", 2):
            raise KeyboardInterrupt
        save(out_dir, method, step, *rest)

    monkeypatch.setattr(sequential, "save_state", cut)
    assert experiment(env, monkeypatch, out) != 0
    _, rows = read_rows(out / "rows.jsonl")
    assert [r["key"] for r in rows] == [["rome", 0], ["rome", 1], ["rome", 2]]
    assert int(np.load(out / "state-rome.npz")["done"]) == 1
    monkeypatch.setattr(sequential, "save_state", save)
    assert experiment(env, monkeypatch, out) == 0
    _, whole = read_rows(done / "rows.jsonl")
    _, resumed = read_rows(out / "rows.jsonl")
    assert [r["key"] for r in resumed] == [r["key"] for r in whole]
    assert [r.get("delta_norm") for r in resumed] == [r.get("delta_norm") for r in whole]
    for method in ("rome", "c-rome"):
        np.testing.assert_array_equal(np.load(out / f"state-{method}.npz")["weight1"],
                                      np.load(done / f"state-{method}.npz")["weight1"])


def test_a_rerun_with_other_settings_is_refused(env, done, monkeypatch, capsys):
    before = (done / "rows.jsonl").read_bytes()
    assert experiment(env, monkeypatch, done, "--every", "3") == 2
    assert "every" in capsys.readouterr().err
    assert (done / "rows.jsonl").read_bytes() == before


def test_a_non_finite_update_ends_the_trace(env, monkeypatch):
    """The refused update of edit 2 ends rome's trace with a row saying so; the final scores
    are those of the edit before."""
    import rome_jax.rome.edit as edit_module

    real = edit_module.compute_edit
    count = {"rome": 0}

    def compute(model, request, hparams, method, **kw):
        if method == "rome":
            count["rome"] += 1
            if count["rome"] == 2:
                raise ValueError("non-finite update refused (method rome, denominator 0)")
        return real(model, request, hparams, method, **kw)

    monkeypatch.setattr(edit_module, "compute_edit", compute)
    out = env / "ended"
    assert experiment(env, monkeypatch, out, "--methods", "rome", "--n", "2", "--every",
                      "1") == 0
    header, rows = read_rows(out / "rows.jsonl")
    trace = sequential.traces(rows)["rome"]
    assert [r["step"] for r in trace] == [0, 1, 2] and trace[-1]["ended"]
    assert "non-finite" in trace[-1]["error"]
    final = next(r for r in rows if r["key"] == ["rome", "final"])
    assert final["step"] == 1 and len(final["records"]) == 1
    assert int(np.load(out / "state-rome.npz")["done"]) == 1
    summary = sequential.report(header | {"out": str(out)}, rows).summary
    assert summary["methods"]["rome"]["ended_at"] == 2
    assert summary["methods"]["rome"]["edits"] == 1


def test_a_journal_behind_its_state_is_replayed(env, done, monkeypatch, capsys):
    """Issue 23 (7): rows.jsonl restored to an older copy (rome's rows after step 1 gone) while
    state-rome.npz says step 3: the rerun replays rome's edits from the base model instead of
    skipping steps 2 and 3, and ends with the uninterrupted run's rows and weights."""
    import shutil

    out = env / "behind"
    shutil.copytree(done, out)
    lines = (out / "rows.jsonl").read_text().splitlines(keepends=True)
    (out / "rows.jsonl").write_text("".join(lines[:3]))  # header, rome 0, rome 1
    assert int(np.load(out / "state-rome.npz")["done"]) == 3
    assert experiment(env, monkeypatch, out) == 0
    assert "replaying" in capsys.readouterr().err
    _, whole = read_rows(done / "rows.jsonl")
    _, resumed = read_rows(out / "rows.jsonl")
    assert [r["key"] for r in resumed] == [r["key"] for r in whole]
    assert [r.get("delta_norm") for r in resumed] == [r.get("delta_norm") for r in whole]
    np.testing.assert_array_equal(np.load(out / "state-rome.npz")["weight1"],
                                  np.load(done / "state-rome.npz")["weight1"])


@pytest.mark.parametrize("content", [b"garbage", "pickled", "no step", "no weight"])
def test_a_corrupt_state_names_its_file(tmp_path, content):
    """Issue 23 (26): a state-*.npz that is not one: ValueError naming the file, never numpy's
    advice to unpickle it."""
    import io

    path = state.state_path(tmp_path, "rome")
    arrays = {"pickled": {"done": np.array([{"a": 1}], dtype=object), "weight1": np.zeros(2)},
              "no step": {"weight1": np.zeros(2)},
              "no weight": {"done": 3, "weight0": np.zeros(2)}}.get(content)
    if arrays is not None:
        buffer = io.BytesIO()
        np.savez(buffer, **arrays)
        content = buffer.getvalue()
    path.write_bytes(content)
    with pytest.raises(ValueError) as err:
        state.load_state(tmp_path, "rome", {}, [1])
    assert str(path) in str(err.value) and "allow_pickle" not in str(err.value)


# ----------------------------------------------------------------------------- --collapse-cases

NORMAL, CASES = (0, 1, 2, 3), (946, 5)  # the baseline's normal and collapse-labelled records
SEQUENCE = ["normal", "collapse", "normal", "collapse", "normal", "normal"]  # positions 2, 4


def test_collapse_positions_are_evenly_spaced_and_distinct():
    assert sequential.collapse_positions(100, 25)[:4] == [5, 10, 14, 19]
    assert sequential.collapse_positions(4, 2) == [2, 4]
    for n in range(1, 30):
        for c in range(30):
            p = sequential.collapse_positions(n, c)
            assert p == sorted(set(p)) and all(1 <= x < n + c for x in p)


@pytest.fixture(scope="module")
def baseline(env):
    """A hand-written collapse baseline: 5 normal cases, 2 collapse-labelled ones and a
    first-token record below the threshold, left out."""
    from rome_jax import load_model
    from rome_jax.experiments.journal import Journal
    from rome_jax.models.model import params_digest

    baseline = env / "collapse-l1"
    settings = {"layer": 1, "bos": None, "threshold": 10.0, "sample_seed": 0,
                "digest": params_digest(load_model(env / "model").params)}
    labelled = [(946, True, 100.0), (0, False, 1.0), (8, True, 1.5), (1, False, 2.0),
                (5, False, float("inf")), (2, False, 1.0), (3, False, 1.1), (6, False, 1.0)]
    with Journal(baseline / "rows.jsonl", "collapse", settings) as journal:
        for case_id, first, ratio in labelled:
            journal.append({"key": case_id, "case_id": case_id, "first_token_subject": first,
                            "rome": {"ratio": ratio}})
    return baseline


@pytest.fixture(scope="module")
def collapse_run(env, baseline):
    """A --collapse-cases run on the baseline's first 4 normal cases."""
    with pytest.MonkeyPatch.context() as mp:
        assert experiment(env, mp, env / "seqc", "--collapse-cases", "--baseline",
                          str(baseline), "--n", "4", "--every", "3", "--tasks", "sst2") == 0
    return env / "seqc"


def test_collapse_sequence_rows(collapse_run):
    header, rows = read_rows(collapse_run / "rows.jsonl", "sequential")
    traces = sequential.traces(rows)
    assert list(traces) == ["rome", "rome/control", "c-rome", "c-rome/control"]
    for name, trace in traces.items():
        method, control = name.split("/")[0], name.endswith("/control")
        groups = ["normal"] * 4 if control else SEQUENCE
        assert [r["step"] for r in trace] == list(range(len(groups) + 1))
        assert all(r["method"] == method for r in trace)
        edits = trace[1:]
        assert [r["group"] for r in edits] == groups
        cases, normal = iter(CASES), iter(NORMAL)
        assert [r["case_id"] for r in edits] == [next(cases if g == "collapse" else normal)
                                                 for g in groups]
        assert [("ppl1k" in r) for r in trace] == [i % 3 == 0 or i == len(groups)
                                                   for i in range(len(groups) + 1)]
        for i, r in enumerate(edits, 1):
            assert r["ppl50_ratio"] == pytest.approx(r["ppl50"] / trace[0]["ppl50"])
            for g in ("normal", "collapse"):  # a share of the group's records edited so far
                k = groups[:i].count(g)
                es = r[f"es_{g}"]
                assert (es is None) == (k == 0)
                if k:
                    assert 0 <= es <= 1 and es * k == pytest.approx(round(es * k))
        saved = np.load(state.state_path(collapse_run, name))
        assert int(saved["done"]) == len(groups)
        final = next(r for r in rows if r["key"] == [name, "final"])
        assert final["case_ids"] == [r["case_id"] for r in edits]
    assert not (collapse_run / "state-rome").exists()  # "/" never makes a folder
    assert sorted(r["case_id"] for r in rows if r["key"][0] == "single") == sorted(NORMAL
                                                                                  + CASES)


def test_collapse_report_is_the_rows(collapse_run, env, monkeypatch):
    _, rows = read_rows(collapse_run / "rows.jsonl", "sequential")
    summary = json.loads((collapse_run / "summary.json").read_text())
    table = (collapse_run / "table.md").read_text()
    assert (collapse_run / "figure.png").stat().st_size > 0
    for name, trace in sequential.traces(rows).items():
        c = summary["methods"][name]["collapse"]
        edits = trace[1:]
        assert c["positions"] == ([] if name.endswith("/control") else [2, 4])
        assert c["ppl50_ratio"] == [r["ppl50_ratio"] for r in edits]
        over = [r["step"] for r in edits if r["ppl50_ratio"] > 10]
        assert c["first_x10"] == (over[0] if over else None)
        assert c["peak"] == max(c["ppl50_ratio"]) and c["last"] == c["ppl50_ratio"][-1]
        assert 0 < c["recovery"] <= 1
        assert f"| {sequential.label(name)} | {len(edits)} | {len(c['positions'])} |" in table
    assert "| r-rome = c-rome, control |" in table
    before = (collapse_run / "rows.jsonl").read_bytes()
    assert experiment(env, monkeypatch, collapse_run, "--collapse-cases", "--baseline",
                      str(env / "collapse-l1"), "--n", "4", "--every", "3",
                      "--tasks", "sst2") == 0  # a finished run: resumed, no row added
    assert (collapse_run / "rows.jsonl").read_bytes() == before


@pytest.mark.parametrize("extra, message", [
    (["--n", "6"], "--n: "),  # the baseline has 5 normal cases
    (["--case-ids", "ids.json"], "--case-ids: not with --collapse-cases"),
])
def test_collapse_cases_refuse_bad_input(env, collapse_run, monkeypatch, capsys, extra,
                                         message):
    (env / "ids.json").write_text("[0, 1]")
    monkeypatch.chdir(env)
    assert experiment(env, monkeypatch, env / "seqc-bad", "--collapse-cases",
                      "--baseline", str(env / "collapse-l1"), *extra) != 0
    assert message in capsys.readouterr().err


def test_collapse_cases_of_another_layer_are_edited_at_this_one(env, baseline):
    """Issue 20: the collapse cases found at one layer (the baseline's, 1 here), edited at
    another (0); only the weights and the start token must match, and only here: an
    experiment that compares with the baseline's rows still refuses another layer."""
    from rome_jax.experiments import collapse

    base = json.loads((baseline / "rows.jsonl").read_text().splitlines()[0])["settings"]
    header = {"out": str(env / "seqc-l0"), "settings": {
        "layer": 0, "bos": None, "n": 4, "baseline": str(baseline), "digest": base["digest"]}}
    records, groups = sequential.collapse_sequence(header)
    assert groups == SEQUENCE
    cases, normal = iter(CASES), iter(NORMAL)
    assert [int(r["case_id"]) for r in records] == [next(cases if g == "collapse" else normal)
                                                    for g in groups]
    with pytest.raises(ValueError, match=r"made with another layer \(1, not 0\); it must be "
                                         r"the collapse run of this model and layer"):
        collapse.baseline(header, None)
    other = {**header, "settings": {**header["settings"], "digest": "other"}}
    with pytest.raises(ValueError, match=r"made with another digest .*of this model$"):
        sequential.collapse_sequence(other)


def test_baseline_needs_collapse_cases(env, monkeypatch, capsys):
    assert experiment(env, monkeypatch, env / "seqc-nobase", "--baseline", "x") == 2
    assert "--baseline: only with --collapse-cases" in capsys.readouterr().err


# ----------------------------------------------------------------------------- batch editors

BATCH = ["--collapse-cases", "--n", "2", "--every", "2", "--tasks", "sst2", "--methods",
         "alphaedit,rome,memit"]  # the sequence 946, 0, 5, 1 (collapse positions 1, 3)


def batch_experiment(env, baseline, monkeypatch, out) -> int:
    return experiment(env, monkeypatch, out, *BATCH, "--baseline", str(baseline))


@pytest.fixture(scope="module")
def batch_run(env, baseline):
    """MEMIT and AlphaEdit one fact per update (window 0-1 on the 2-layer model, --layer 1)
    beside rome, through the collapse cases, uninterrupted."""
    with pytest.MonkeyPatch.context() as mp:
        assert batch_experiment(env, baseline, mp, env / "seqb") == 0
    return env / "seqb"


def test_batch_methods_edit_one_fact_at_a_time(batch_run):
    header, rows = read_rows(batch_run / "rows.jsonl", "sequential")
    assert header["settings"]["methods"] == ["alphaedit", "rome", "memit"]
    traces = sequential.traces(rows)
    assert list(traces) == ["alphaedit", "alphaedit/control", "rome", "rome/control", "memit",
                            "memit/control"]
    for name, trace in traces.items():
        method = name.split("/")[0]
        layers = [1] if method == "rome" else [0, 1]
        assert trace[0]["layers"] == layers
        assert [r["case_id"] for r in trace[1:]] == ([0, 1] if "/" in name else [946, 0, 5, 1])
        for r in trace[1:]:
            assert not r.get("ended") and r["delta_norm"] > 0 and r["residual_norm"] > 0
            assert r["ppl50_ratio"] == pytest.approx(r["ppl50"] / trace[0]["ppl50"])
            if method != "rome":
                assert len(r["delta_norms"]) == 2 and r["delta_norm"] == max(r["delta_norms"])
                assert "denominator" not in r and "key_cosine" not in r
        saved = np.load(state.state_path(batch_run, name))
        assert int(saved["done"]) == len(trace) - 1
        preserved = [f"preserved{x}" for x in layers] if method == "alphaedit" else []
        assert sorted(saved.files) == sorted(["done", *(f"weight{x}" for x in layers),
                                              *preserved])
        for k in preserved:  # K_pᵀK_p of the facts edited: symmetric, nonzero
            assert np.abs(saved[k]).max() > 0
            np.testing.assert_allclose(saved[k], saved[k].T, rtol=1e-5, atol=1e-5)
    singles = [r for r in rows if r["key"][0] == "single"]
    assert sorted(r["case_id"] for r in singles) == [0, 1, 5, 946]
    for r in singles:
        assert list(r["edits"]) == ["alphaedit", "rome", "memit"]
        for scores in r["edits"].values():
            assert 0 <= scores["ES"] <= 1 and scores["ppl_ratio"] > 0
    table = (batch_run / "table.md").read_text()
    for method in ("memit", "alphaedit"):
        assert f"| {method} | 4 | 2 |" in table and f"| {method}, control | 2 | 0 |" in table
        assert f"| {method} | single | 4 |" in table and f"| {method} | sequential | 4 |" in table


def test_a_checkout_without_states_replays_the_update_journal(env, baseline, batch_run,
                                                               monkeypatch):
    """The states are not committed; the update journal is. A copy of the run without its
    states and final rows (traces cut short) replays every step from updates/ with no edit
    computed and nothing evaluated, to the uninterrupted run's weights and AlphaEdit K_pᵀK_p
    bit for bit, and the same final rows."""
    import shutil

    out = env / "fresh"
    shutil.copytree(batch_run, out, ignore=shutil.ignore_patterns("state-*.npz"))
    header, *lines = (out / "rows.jsonl").read_text().splitlines(keepends=True)
    (out / "rows.jsonl").write_text(header + "".join(
        x for x in lines if json.loads(x)["key"][1] != "final"))
    names = sorted(p.name for p in (out / "updates").iterdir())
    assert "alphaedit-control-00002.npz" in names and "memit-00004.npz" in names

    def refused(*a, **k):
        raise AssertionError("a replay computed an edit or a row")

    monkeypatch.setattr(sequential.Editor, "edit", refused)
    monkeypatch.setattr(sequential.Editor, "probe", property(refused))
    assert batch_experiment(env, baseline, monkeypatch, out) == 0
    _, whole = read_rows(batch_run / "rows.jsonl")
    _, replayed = read_rows(out / "rows.jsonl")
    final = {json.dumps(r["key"]): r for r in whole if r["key"][1] == "final"}
    assert {json.dumps(r["key"]): r for r in replayed if r["key"][1] == "final"} == final
    for trace in sequential.traces(whole):
        a, b = (np.load(state.state_path(d, trace)) for d in (batch_run, out))
        assert sorted(a.files) == sorted(b.files)
        for name in a.files:
            np.testing.assert_array_equal(a[name], b[name])


def test_an_update_journal_entry_of_another_record_names_its_file(tmp_path):
    from rome_jax.editors.delta import rank_one

    edit = rank_one(np.ones(4, np.float32), np.ones(3, np.float32), 1)
    state.save_update(tmp_path, "a/control", 2, 17, edit, {})
    loaded, keys = state.load_update(tmp_path, "a/control", 2, 17)
    np.testing.assert_array_equal(loaded.weight_delta(1), edit.weight_delta(1))
    assert keys == {} and state.load_update(tmp_path, "a/control", 3, 17) is None
    with pytest.raises(ValueError, match="a-control-00002.npz: the update of record 17"):
        state.load_update(tmp_path, "a/control", 2, 18)


def test_batch_ppl50_is_the_edited_models_perplexity(env, batch_run):
    """A batch method changes layer 0 of the window 0-1: its ME-PPL_50 (and ME-PPL_1k) are those
    of the edited params computed from the embeddings up, which a probe at the edit layer 1
    would miss."""
    from rome_jax import load_model
    from rome_jax.data import load_me_ppl
    from rome_jax.guard import PerplexityProbe

    model = load_model(env / "model")
    _, rows = read_rows(batch_run / "rows.jsonl", "sequential")
    texts = load_me_ppl("ME-PPL_50")
    for trace in ("memit", "alphaedit"):
        last = sequential.traces(rows)[trace][-1]
        _, params, _ = state.load_state(batch_run, trace, model.params, [0, 1])
        assert last["ppl50"] == pytest.approx(PerplexityProbe(model, texts, 0)(params),
                                              rel=1e-5)
        assert last["ppl50"] != pytest.approx(PerplexityProbe(model, texts, 1)(params),
                                              rel=1e-5)
        assert last["ppl1k"] == pytest.approx(PerplexityProbe(
            model, load_me_ppl("ME-PPL_1k")[:12], 0)(params), rel=1e-5)


def test_batch_resume_restores_the_window_and_preserved(env, baseline, batch_run,
                                                        monkeypatch):
    """Cut after the row of AlphaEdit's edit 2 but before its state: the rerun restores the
    window's weights and K_pᵀK_p of edit 1, replays edit 2 and ends with the uninterrupted
    run's rows and states."""
    out = env / "seqb-cut"
    save, resume = sequential.save_state, sequential.resume
    saved, restored = {}, {}

    def cut(out_dir, trace, step, params, layers, preserved):
        saved[trace, step] = preserved
        if (trace, step) == ("alphaedit", 2):
            raise KeyboardInterrupt
        save(out_dir, trace, step, params, layers, preserved)

    def resumed(out_dir, trace, *rest):
        step, params, preserved = resume(out_dir, trace, *rest)
        restored[trace, step] = preserved
        return step, params, preserved

    monkeypatch.setattr(sequential, "save_state", cut)
    assert batch_experiment(env, baseline, monkeypatch, out) != 0
    monkeypatch.setattr(sequential, "save_state", save)
    monkeypatch.setattr(sequential, "resume", resumed)
    assert batch_experiment(env, baseline, monkeypatch, out) == 0
    assert set(restored[("alphaedit", 1)]) == {0, 1}
    for layer, p in restored[("alphaedit", 1)].items():
        np.testing.assert_array_equal(p, saved[("alphaedit", 1)][layer])
    _, whole = read_rows(batch_run / "rows.jsonl")
    _, again = read_rows(out / "rows.jsonl")
    assert [r["key"] for r in again] == [r["key"] for r in whole]
    for field in ("delta_norm", "delta_norms", "ppl50", "ppl1k", "es_normal"):
        assert [r.get(field) for r in again] == [r.get(field) for r in whole]
    for trace in sequential.traces(whole):
        a, b = np.load(state.state_path(out, trace)), np.load(state.state_path(batch_run, trace))
        assert a.files == b.files
        for k in a.files:
            np.testing.assert_array_equal(a[k], b[k])


def test_a_non_finite_batch_update_ends_the_trace(env, monkeypatch):
    import rome_jax.editors.batch as batch_module

    real, calls = batch_module.edit_batch, []

    def edit_batch(*args, **kw):
        calls.append(len(calls) + 1)
        if len(calls) == 2:
            raise ValueError("non-finite update refused (memit, layers [0, 1]: ‖Δw‖ [nan])")
        return real(*args, **kw)

    monkeypatch.setattr(batch_module, "edit_batch", edit_batch)
    out = env / "ended-memit"
    assert experiment(env, monkeypatch, out, "--methods", "memit", "--n", "2", "--every", "1",
                      "--tasks", "sst2") == 0
    header, rows = read_rows(out / "rows.jsonl")
    trace = sequential.traces(rows)["memit"]
    assert [r["step"] for r in trace] == [0, 1, 2] and trace[-1]["ended"]
    assert "non-finite" in trace[-1]["error"]
    assert next(r for r in rows if r["key"] == ["memit", "final"])["step"] == 1
    assert int(np.load(out / "state-memit.npz")["done"]) == 1
    singles = [r for r in rows if r["key"][0] == "single"]  # edited alone: calls 3 and 4
    assert len(singles) == 2 and all("ES" in r["edits"]["memit"] for r in singles)
    summary = sequential.report(header | {"out": str(out)}, rows).summary
    assert summary["methods"]["memit"]["ended_at"] == 2


def test_emmet_rows_keep_its_denominators(env, monkeypatch):
    """EMMET edits the edit layer alone: one layer's weight saved, its probes those of the
    edit layer, and its B×B system's smallest eigenvalue and condition in the row."""
    out = env / "seq-emmet"
    assert experiment(env, monkeypatch, out, "--methods", "emmet", "--n", "1", "--tasks",
                      "sst2") == 0
    _, rows = read_rows(out / "rows.jsonl")
    start, edit = sequential.traces(rows)["emmet"]
    assert start["layers"] == [1] and len(edit["delta_norms"]) == 1
    assert len(edit["denominator_min"]) == len(edit["denominator_condition"]) == 1
    assert edit["denominator_min"][0] > 0 and edit["denominator_condition"][0] >= 1
    assert sorted(np.load(out / "state-emmet.npz").files) == ["done", "weight1"]


def test_unknown_methods_are_refused_by_flag(env, monkeypatch, capsys):
    assert experiment(env, monkeypatch, env / "seq-bad", "--methods", "memit,bogus") == 2
    assert "--methods: bogus not one of" in capsys.readouterr().err
