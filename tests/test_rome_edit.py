"""Edits on a tiny random GPT-2 and a tiny random Llama (grouped-query attention, bias-free
down_proj): purity, determinism, exactness at the key, vmap, fold, errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import assert_live_forward_is_full, tiny_gpt2

from rome_jax import data
from rome_jax.hf import load_model
from rome_jax.models.transformer import mlp_key, rome_weight
from rome_jax.rome.edit import (EditContext, build_batch, compute_edit, edit, edit_core,
                                edit_independent, edit_sequential, prepare, solve)
from rome_jax.rome.hparams import RomeHParams
from rome_jax.rome.request import EditRequest
from rome_jax.rome.stats import compute_key_stats
from rome_jax.rome.templates import sample_context_templates, with_test_prefix
from rome_jax.editors.delta import apply_edit

HP = RomeHParams(layer=1, v_num_grad_steps=6, v_lr=0.1,
                 context_template_length_params=((4, 5), (6, 5)))
REQUEST = EditRequest("{} plays the", "Lionel Messi", "piano", "football")
OTHER = EditRequest("The capital of {} is", "France", "Rome", "Paris")


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def model(request, hf_model):
    if request.param == "gpt2":
        return tiny_gpt2(n_layer=3, d_model=32, n_head=4, seq_len=64, seed=3)
    pytest.importorskip("transformers")
    # The GPT-2 tokenizer (conftest copies it into the directory), so the vocabularies agree.
    return load_model(hf_model("llama", vocab_size=50257, hidden_size=32, num_attention_heads=4,
                               num_key_value_heads=2, num_hidden_layers=3,
                               max_position_embeddings=64).path)


@pytest.fixture(scope="module")
def context(model):
    stats = compute_key_stats(model, HP.layer, data.load_wikitext()[:200], "wiki200")
    return prepare(model, HP, jax.random.key(0), stats=stats)


def host(tree):
    return jax.tree.map(lambda x: np.array(x, copy=True), tree)


def test_templates_are_reproducible_from_the_key(model):
    a = sample_context_templates(model, jax.random.key(7), ((4, 5),))
    b = sample_context_templates(model, jax.random.key(7), ((4, 5),))
    c = sample_context_templates(model, jax.random.key(8), ((4, 5),))
    assert a == b and a != c
    assert a.templates[0] == "{}" and len(a.templates) == 6
    assert all(t.endswith(". {}") for t in a.templates[1:])


@pytest.mark.parametrize("method", ["rome", "c-rome", "p-rome"])
def test_edit_is_pure_and_bit_for_bit_deterministic(model, context, method):
    before = host(model.params)
    new_a, report_a = edit(model, REQUEST, HP, method, context=context)
    new_b, report_b = edit(model, REQUEST, HP, method, context=context)
    jax.tree.map(np.testing.assert_array_equal, host(model.params), before)
    jax.tree.map(np.testing.assert_array_equal, host(new_a), host(new_b))
    assert report_a.to_dict() == report_b.to_dict()
    changed = np.asarray(new_a["blocks"]["mlp"]["fc_out"]["w"]) != before["blocks"]["mlp"]["fc_out"]["w"]
    assert changed[HP.layer].any() and not changed[np.arange(3) != HP.layer].any()
    assert report_a.method == method and 1 <= report_a.v_steps <= HP.v_num_grad_steps
    assert len(report_a.v_losses) == report_a.v_steps


@pytest.mark.parametrize("method", ["c-rome", "p-rome"])
def test_edited_weights_map_the_key_to_v_star(model, context, method):
    batch = build_batch(model, REQUEST, context.templates, HP.fact_token)
    update, diag, values, _ = edit_core(model.params, model.config, HP.layer, method,
                                        HP.v_num_grad_steps, batch, context.factor, HP.v_lr,
                                        HP.v_weight_decay, HP.kl_factor, HP.clamp_norm_factor,
                                        HP.early_stop_loss)
    new = apply_edit(model.params, update)
    keys = mlp_key(model.params, model.config, batch.ids, batch.mask, HP.layer, batch.lookup)[:-1]
    key = keys.mean(0) if method == "c-rome" else keys[0]
    w, b = rome_weight(new, HP.layer)
    np.testing.assert_allclose(key @ w + b, values.v_star, atol=2e-4, rtol=1e-4)
    # the plain key through the unedited weights is v_init, the start of v*
    w, b = rome_weight(model.params, HP.layer)
    np.testing.assert_allclose(keys[0] @ w + b, values.v_init, atol=1e-5, rtol=1e-5)


def test_independent_edits_by_vmap_match_single_edits(model, context):
    edits, reports = edit_independent(model, [REQUEST, OTHER], HP, "c-rome", context=context)
    stacked = edits.deltas[HP.layer]
    assert stacked.left.shape == (2, model.config.d_mlp, 1)
    for i, request in enumerate([REQUEST, OTHER]):
        single, report = compute_edit(model, request, HP, "c-rome", context=context)
        one = single.deltas[HP.layer]
        np.testing.assert_allclose(stacked.right[i], one.right, rtol=2e-3, atol=2e-4)
        np.testing.assert_allclose(stacked.left[i], one.left, rtol=2e-3, atol=1e-5)
        assert reports[i].request == request.to_dict()


def test_methods_share_one_solve(model, context):
    """Keys and v* do not depend on the method: reusing them changes nothing, bit for bit."""
    solved = solve(model, REQUEST, HP, context=context)
    for method in ("rome", "c-rome", "p-rome"):
        fresh, fresh_report = compute_edit(model, REQUEST, HP, method, context=context)
        reused, reused_report = compute_edit(model, REQUEST, HP, method, context=context,
                                             solved=solved)
        np.testing.assert_array_equal(fresh.weight_delta(), reused.weight_delta())
        assert fresh_report.to_dict() == reused_report.to_dict()


def test_sequential_edits_are_a_fold(model, context):
    params, reports = edit_sequential(model, [REQUEST, OTHER], HP, "c-rome", context=context)
    first, _ = edit(model, REQUEST, HP, "c-rome", context=context, probabilities=False)
    second, _ = edit(model, OTHER, HP, "c-rome", context=context, params=first,
                     probabilities=False)
    jax.tree.map(np.testing.assert_array_equal, host(params), host(second))
    assert [r.request["subject"] for r in reports] == ["Lionel Messi", "France"]


def test_non_finite_update_is_refused(model, context):
    poisoned = EditContext(context.templates, context.stats, context.factor * jnp.nan)
    with pytest.raises(ValueError, match="non-finite update"):
        edit(model, REQUEST, HP, "c-rome", context=poisoned)


@pytest.mark.parametrize("changes,field", [
    (dict(prompt="{} plays {} the"), "prompt"), (dict(prompt="plays the"), "prompt"),
    (dict(target_new=" "), "target_new"), (dict(subject=""), "subject"),
])
def test_bad_requests_name_the_field(changes, field):
    fields = dict(prompt="{} plays the", subject="Messi", target_new="piano")
    with pytest.raises(ValueError, match=field):
        EditRequest(**{**fields, **changes})


def test_subject_that_does_not_start_on_a_token_boundary(model, context):
    with pytest.raises(ValueError, match="subject: 'dia' does not start on a token boundary"):
        edit(model, EditRequest("In{} is in", "dia", "China"), HP, context=context)


def test_layer_out_of_range_is_refused(model, context):
    with pytest.raises(ValueError, match="layer"):
        edit(model, REQUEST, HP.replace(layer=3), context=context)


def test_counterfact_records_become_requests():
    record = data.load_counterfact()[0]
    request = EditRequest.from_dict(record)
    assert request.subject == "Danielle Darrieux" and request.target_new == "English"
    assert request.target_true == "French" and request.case_id == 0
    with pytest.raises(ValueError, match="target_new"):
        EditRequest.from_dict({"prompt": "{} is", "subject": "x"})


def test_test_time_prefix_only_for_first_token_subjects():
    assert with_test_prefix("Messi plays the", "Messi", "The game. ") == "The game. Messi plays the"
    assert with_test_prefix("The sport of Messi", "Messi", "X. ") == "The sport of Messi"


def test_live_positions_give_the_full_forward_logits(model, context):
    """Recomputing only positions from the lookup token on (with cached keys/values before it)
    gives the logits of the full forward with δ added."""
    batch = build_batch(model, REQUEST, context.templates, HP.fact_token)
    assert_live_forward_is_full(model, batch, HP.layer)
    assert batch.live_index.shape[1] < batch.ids.shape[1]


@pytest.mark.parametrize("changes,field", [
    (dict(target_true=5), "target_true"), (dict(target_new=5), "target_new"),
    (dict(subject=["Messi"]), "subject"), (dict(prompt=None), "prompt"),
    (dict(target_true=""), "target_true"), (dict(case_id="7"), "case_id"),
    (dict(case_id=True), "case_id"), (dict(case_id=1.5), "case_id"),
])
def test_request_field_types_are_checked_up_front(changes, field):
    fields = dict(prompt="{} plays the", subject="Messi", target_new="piano")
    with pytest.raises(ValueError, match=f"^{field}: "):
        EditRequest(**{**fields, **changes})
    flat = {**fields, **changes}
    with pytest.raises(ValueError, match=f"^{field}: "):
        EditRequest.from_dict(flat)
    assert EditRequest(**fields, case_id=np.int64(3)).case_id == 3


def test_from_dict_targets_as_strings_or_str_objects():
    flat = dict(prompt="{} plays the", subject="Messi", target_new={"str": "piano"},
                target_true="football", case_id=4)
    assert EditRequest.from_dict(flat) == EditRequest("{} plays the", "Messi", "piano",
                                                      "football", 4)
    with pytest.raises(ValueError, match="^target_new: .*without \"str\""):
        EditRequest.from_dict({**flat, "target_new": {"id": "Q1"}})
    with pytest.raises(ValueError, match="^target_true: must be a string, got int"):
        EditRequest.from_dict({**flat, "target_true": {"str": 5}})
    with pytest.raises(ValueError, match="^requested_rewrite: "):
        EditRequest.from_dict({"requested_rewrite": "x", "case_id": 1})


@pytest.mark.parametrize("changes,field", [
    (dict(layer="2"), "layer"), (dict(layer=True), "layer"), (dict(layer=-1), "layer"),
    (dict(v_lr=-1), "v_lr"), (dict(v_lr=float("nan")), "v_lr"),
    (dict(v_num_grad_steps=2.5), "v_num_grad_steps"), (dict(kl_factor="0.1"), "kl_factor"),
    (dict(mom2_n_samples=0), "mom2_n_samples"), (dict(mom2_ridge=-1e-3), "mom2_ridge"),
    (dict(fact_token="first"), "fact_token"), (dict(mom2_corpus=None), "mom2_corpus"),
    (dict(context_template_length_params=((5, 0),)), "context_template_length_params"),
    (dict(context_template_length_params=5), "context_template_length_params"),
])
def test_hparams_fields_are_checked(changes, field):
    with pytest.raises(ValueError, match=f"^{field}: "):
        RomeHParams(**{"layer": 1, **changes})
    with pytest.raises(ValueError, match=f"^{field}: "):
        HP.replace(**changes)
    same = RomeHParams(layer=1, v_lr=1, context_template_length_params=[[4, 5]])
    assert same.v_lr == 1.0 and same.context_template_length_params == ((4, 5),)


def test_a_context_for_another_layer_is_refused_where_it_is_used(model, context):
    other = HP.replace(layer=2)
    with pytest.raises(ValueError, match="^context: prepared for layer 1 .* layer 2"):
        solve(model, REQUEST, other, context=context)
    solved = solve(model, REQUEST, HP, context=context)
    for call in (lambda: compute_edit(model, REQUEST, other, context=context, solved=solved),
                 lambda: edit(model, REQUEST, other, context=context),
                 lambda: edit_sequential(model, [REQUEST], other, context=context),
                 lambda: edit_independent(model, [REQUEST], other, context=context)):
        with pytest.raises(ValueError, match="^context: prepared for layer 1"):
            call()
    with pytest.raises(ValueError, match="^context: .*ridge 0.*ridge 0.5"):
        compute_edit(model, REQUEST, HP.replace(mom2_ridge=0.5), context=context, solved=solved)


@pytest.mark.parametrize("call,exc,field", [
    (lambda m, c: edit(m, REQUEST, "gpt2", context=c), TypeError, "hparams"),
    (lambda m, c: edit(m, REQUEST, HP, context="x"), TypeError, "context"),
    (lambda m, c: solve(m, REQUEST, HP, context="x"), TypeError, "context"),
    (lambda m, c: compute_edit(m, REQUEST, HP, context=c, solved="x"), TypeError, "solved"),
    (lambda m, c: edit("gpt2", REQUEST, HP, context=c), TypeError, "model"),
    (lambda m, c: edit(m, "Messi plays piano", HP, context=c), TypeError, "request"),
    (lambda m, c: edit(m, REQUEST, HP, "crome", context=c), ValueError, "method"),
    (lambda m, c: edit_independent(m, [], HP, context=c), ValueError, "requests"),
    (lambda m, c: edit_independent(m, REQUEST, HP, context=c), TypeError, "requests"),
    (lambda m, c: edit_sequential(m, REQUEST, HP, context=c), TypeError, "requests"),
    (lambda m, c: prepare(m, "gpt2"), TypeError, "hparams"),
    (lambda m, c: prepare(m, HP, "seed"), TypeError, "key"),
    (lambda m, c: prepare(m, HP, stats=c.factor), TypeError, "stats"),
])
def test_api_arguments_of_the_wrong_kind_are_named(model, context, call, exc, field):
    with pytest.raises(exc, match=f"^{field}: "):
        call(model, context)
