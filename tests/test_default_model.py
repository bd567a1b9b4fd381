"""The embedded default model: it loads without arguments, knows its facts, and a c-rome edit
of a CounterFact record rewrites the fact without touching the original params."""

import json
from pathlib import Path

import jax
import numpy as np
import pytest

from rome_jax import data, load_model
from rome_jax.hf import DEFAULT_MODEL
from rome_jax.models.transformer import mlp_key
from rome_jax.rome.edit import build_batch, edit, edit_core, prepare
from rome_jax.rome.hparams import preset_for
from rome_jax.rome.request import EditRequest
from rome_jax.editors.delta import apply_edit
from rome_jax.training import first_token_subject


@pytest.fixture(scope="module")
def model():
    return load_model()


@pytest.fixture(scope="module")
def context(model):
    return prepare(model, preset_for(model.config), jax.random.key(0))


@pytest.fixture(scope="module")
def records():
    return {r["case_id"]: r for r in data.load_counterfact()}


def test_default_model_is_the_committed_checkpoint(model):
    assert model.config.model_type == "gpt2" and model.config.n_layer == 6
    assert model.name == str(DEFAULT_MODEL)
    size = sum(f.stat().st_size for f in DEFAULT_MODEL.iterdir() if f.is_file())
    assert size <= 40 * 2**20


def test_the_default_model_answers_to_its_name(model, tmp_path, monkeypatch):
    """"gpt2-cf-tiny" names the embedded model, as "smollm2-135m" names its GGUF, unless a
    local directory of that name is where the user stands."""
    from conftest import tiny_gpt2

    from rome_jax import save_hf
    from rome_jax.hf import local_source
    from rome_jax.models.model import params_digest

    monkeypatch.chdir(tmp_path)
    named = load_model("gpt2-cf-tiny")
    assert params_digest(named.params) == params_digest(model.params)
    assert local_source("gpt2-cf-tiny") == DEFAULT_MODEL  # an --out inside it is refused
    save_hf(tiny_gpt2(n_layer=1, d_model=32, n_head=2, seq_len=16, seed=0), "gpt2-cf-tiny")
    assert load_model("gpt2-cf-tiny").config.n_layer == 1
    assert local_source("gpt2-cf-tiny") == Path("gpt2-cf-tiny")


def test_training_split_is_recorded(model, records):
    trained = json.loads((DEFAULT_MODEL / "training_case_ids.json").read_text())
    heldout = json.loads((DEFAULT_MODEL / "heldout_case_ids.json").read_text())
    assert all(isinstance(i, int) for i in trained) and len(heldout) == 1000
    assert not set(trained) & set(heldout)
    first = {i for i, r in records.items() if first_token_subject(r, model.tokenizer)}
    assert len(first) == 54 and first <= set(trained)


def test_c_rome_edit_rewrites_a_known_fact(model, context, records):
    trained = json.loads((DEFAULT_MODEL / "training_case_ids.json").read_text())
    request = EditRequest.from_dict(records[trained[0]])
    before = jax.tree.map(lambda x: np.array(x, copy=True), model.params)
    hparams = preset_for(model.config)
    new_params, report = edit(model, request, hparams, "c-rome", context=context)
    assert report.p_new_after > report.p_true_after
    assert report.p_new_after > report.p_new_before
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, model.params), before)

    batch = build_batch(model, request, context.templates, hparams.fact_token)
    update, _, values, _ = jax.jit(edit_core, static_argnums=(1, 2, 3, 4))(model.params, model.config, hparams.layer, "c-rome",
                                     hparams.v_num_grad_steps, batch, context.factor,
                                     hparams.v_lr, hparams.v_weight_decay, hparams.kl_factor,
                                     hparams.clamp_norm_factor, hparams.early_stop_loss)
    np.testing.assert_allclose(apply_edit(model.params, update)["blocks"]["mlp"]["fc_out"]["w"],
                               new_params["blocks"]["mlp"]["fc_out"]["w"], rtol=0, atol=1e-6)
    keys = mlp_key(model.params, model.config, batch.ids, batch.mask, hparams.layer,
                   batch.lookup)[:-1]
    fc_out = jax.tree.map(lambda w: w[hparams.layer], new_params["blocks"]["mlp"]["fc_out"])
    v_star = np.asarray(values.v_star)
    np.testing.assert_allclose(keys.mean(0) @ fc_out["w"] + fc_out["b"], v_star,
                               atol=1e-3 * np.abs(v_star).max(), rtol=1e-3)
