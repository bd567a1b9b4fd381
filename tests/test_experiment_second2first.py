"""``rome-jax experiment second2first`` on the tiny random GPT-2, in process, against a
hand-written collapse baseline of two first-token records (and one normal record, which it
leaves out): ``second_to_first`` moves wpe[1] to position 0 and changes nothing else (nor its
input), rotary models are refused by name, and the rows hold both models' keys and edits, in
range, with the Second2First keys those of the moved params; a rerun resumes with nothing
to do."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from conftest import SMALL, in_process_env, tiny_gpt2

from rome_jax import cli
from rome_jax.experiments import second2first
from rome_jax.experiments.second2first import second_to_first


def test_second_to_first_moves_position_one_and_leaves_its_input():
    import jax

    model = tiny_gpt2(n_layer=1, d_model=32, n_head=2, seq_len=16, seed=3)
    before = jax.tree.map(np.array, model.params)
    moved = second_to_first(model.params, model.config)
    wpe = np.asarray(before["wpe"])
    np.testing.assert_array_equal(np.asarray(moved["wpe"][0]), wpe[1])
    np.testing.assert_array_equal(np.asarray(moved["wpe"][1:]), wpe[1:])
    assert moved["wpe"].shape == wpe.shape and moved["wpe"].dtype == model.params["wpe"].dtype
    jax.tree.map(np.testing.assert_array_equal, before, jax.tree.map(np.array, model.params))
    assert not np.array_equal(np.asarray(model.params["wpe"][0]), wpe[1])  # the input is kept
    others = {k: v for k, v in moved.items() if k != "wpe"}
    assert all(others[k] is model.params[k] for k in others)


def test_rotary_models_are_refused_naming_why():
    from rome_jax.models.config import ModelConfig

    config = ModelConfig(model_type="llama", vocab_size=10, n_positions=8, d_model=8,
                         n_layer=1, n_head=2, d_mlp=16, rotary_dim=4, norm="rms")
    with pytest.raises(ValueError, match="model: .*llama.*rotary.*identity"):
        second_to_first({"wte": np.zeros((10, 8))}, config)


@pytest.fixture(scope="module")
def finished(tiny_model, tmp_path_factory):
    """(out folder, first-token case ids, the model's folder) of a finished run on a
    hand-written baseline."""
    from rome_jax import load_model
    from rome_jax.data import load_counterfact
    from rome_jax.experiments.journal import Journal
    from rome_jax.experiments.records import first_token_and_sample
    from rome_jax.models.model import params_digest

    root = tmp_path_factory.mktemp("second2first")
    model = load_model(tiny_model)
    first, others = first_token_and_sample(load_counterfact(), model.tokenizer, 1, seed=0)
    settings = {"model": str(tiny_model), "digest": params_digest(model.params), "layer": 1,
                "bos": None, "threshold": 10.0, "sample_seed": 0}
    edit = lambda ratio: {"ratio": ratio, "denominator_unit_u": 1.0}
    with Journal(root / "base" / "rows.jsonl", "collapse", settings) as journal:
        for case_id, ratio, is_first in ((first[0], 50.0, True), (first[1], 1.0, True),
                                         (others[0], 1.0, False)):
            journal.append({"key": case_id, "case_id": case_id, "first_token_subject": is_first,
                            "rome": edit(ratio), "c-rome": edit(1.0)})
    args = ["experiment", "second2first", "--model", str(tiny_model), *SMALL, "--baseline",
            str(root / "base"), "--out", str(root / "out")]
    with in_process_env(root):
        assert cli.main(args) == 0
        rows = (root / "out" / "rows.jsonl").read_text()
        assert cli.main(args) == 0  # resumes: nothing left to do, no row added
        assert (root / "out" / "rows.jsonl").read_text() == rows
    return root / "out", first[:2], tiny_model


def test_rows_hold_both_models_in_range(finished):
    from rome_jax.experiments.journal import read_rows

    out, first, _ = finished
    _, rows = read_rows(out / "rows.jsonl", "second2first", second2first.check_row)
    assert sorted(r["key"] for r in rows) == sorted(f"{v}/{i}" for v in second2first.VARIANTS
                                                    for i in first)
    groups = {first[0]: "collapse", first[1]: "first-token, below threshold"}
    for r in rows:
        assert "error" not in r and r["group"] == groups[r["case_id"]]
        assert -1 <= r["cos_plain_mean"] <= 1 and r["norm_ratio"] > 0
        assert r["base_perplexity"] > 1
        for m in ("rome", "c-rome"):
            assert math.isfinite(r[m]["ratio"]) and r[m]["ratio"] > 0
        # the rome edit's denominator is the keys' k^uᵀC⁻¹k̄/‖C⁻¹k̄‖ of the same model
        np.testing.assert_allclose(r["rome"]["denominator_unit_u"], r["denominator_rome"],
                                   rtol=1e-3, atol=1e-4)
    base = {r["variant"]: r["base_perplexity"] for r in rows}
    assert len(base) == 2 and base["original"] != base["second2first"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["paired"]["n"] == 2
    assert summary["groups"][second2first.ALL]["second2first"]["n"] == 2
    assert "| all first-token records | second2first | 2 |" in (out / "table.md").read_text()
    assert (out / "figure.png").stat().st_size > 0


def test_second2first_keys_are_those_of_the_moved_params(finished):
    import jax

    from rome_jax.cli.common import Setup
    from rome_jax.data import counterfact_by_case_id, load_counterfact
    from rome_jax.diagnostics import edit_keys
    from rome_jax.experiments.journal import read_rows
    from rome_jax.rome.edit import context_templates
    from rome_jax.rome.request import EditRequest

    out, first, path = finished
    _, rows = read_rows(out / "rows.jsonl")
    by = {(r["variant"], r["case_id"]): r for r in rows}
    s = Setup(cli.build_parser().parse_args(["experiment", "second2first", "--model", str(path),
                                             *SMALL]))
    model = s.model  # the run's templates: its hparams and seed 0 (no key statistics needed)
    templates = context_templates(model, s.hparams, jax.random.key(0), None)
    moved = model.with_params(second_to_first(model.params, model.config))
    for record in counterfact_by_case_id(load_counterfact(), first):
        request = EditRequest.from_dict(record)
        for name, m in (("original", model), ("second2first", moved)):
            plain, mean, _ = edit_keys(m, request, templates, 1)
            row = by[name, record["case_id"]]
            np.testing.assert_allclose(row["norm_plain"], np.linalg.norm(plain), rtol=1e-4)
            np.testing.assert_allclose(row["norm_mean"], np.linalg.norm(mean), rtol=1e-4)
        assert not np.isclose(by["original", record["case_id"]]["norm_plain"],
                              by["second2first", record["case_id"]]["norm_plain"], rtol=1e-6)
