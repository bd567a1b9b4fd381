"""Lower precision: the default model loaded in bfloat16 edits close to the float32 one, with the
update computed in float32 and added to weights that keep the model's dtype; ``--dtype``."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import SMALL, assert_ok, assert_user_error, cli

from rome_jax import data
from rome_jax.editors.delta import apply_edit
from rome_jax.hf import load_model
from rome_jax.rome.edit import EditContext, compute_edit, edit, prepare, solve
from rome_jax.rome.hparams import preset_for
from rome_jax.rome.request import EditRequest
from rome_jax.rome.stats import compute_key_stats

REQUESTS = [EditRequest("{} plays the", "Lionel Messi", "piano", "football"),
            EditRequest("The mother tongue of {} is", "Danielle Darrieux", "English", "French")]


def setup(dtype):
    """The default model in ``dtype``, its preset, and a context whose key statistics come from
    40 WikiText texts through that model."""
    model = load_model(None, dtype=dtype)
    hparams = preset_for(model.config)
    stats = compute_key_stats(model, hparams.layer, data.load_wikitext()[:40], "wiki40")
    return model, hparams, prepare(model, hparams, jax.random.key(0), stats=stats)


@pytest.fixture(scope="module")
def f32():
    return setup(jnp.float32)


@pytest.fixture(scope="module")
def bf16():
    return setup(jnp.bfloat16)


def test_a_bfloat16_edit_is_close_to_the_float32_one(f32, bf16):
    # Measured (these two requests and 'The capital of {France} is' -> Rome): denominators within 6.1%,
    # ‖Δ‖_F within 4.8%, P(new) after within 0.05; the bounds leave about twice that.
    for request in REQUESTS:
        _, a = edit(f32[0], request, f32[1], context=f32[2])
        _, b = edit(bf16[0], request, bf16[1], context=bf16[2])
        assert abs(b.denominator / a.denominator - 1) < 0.12, (a.denominator, b.denominator)
        assert abs(b.delta_norm / a.delta_norm - 1) < 0.1, (a.delta_norm, b.delta_norm)
        assert abs(b.p_new_after - a.p_new_after) < 0.1, (a.p_new_after, b.p_new_after)
        assert b.p_new_after > 10 * b.p_new_before


def test_the_update_and_v_star_are_float32_on_a_bfloat16_model(bf16):
    model, hparams, context = bf16
    assert model.params["blocks"]["mlp"]["fc_out"]["w"].dtype == jnp.bfloat16
    solved = solve(model, REQUESTS[0], hparams, context=context)
    assert {x.dtype for x in jax.tree.leaves(solved)} - {jnp.dtype(jnp.int32)} == {
        jnp.dtype(jnp.float32)}
    update, _ = compute_edit(model, REQUESTS[0], hparams, context=context, solved=solved)
    factors = update.deltas[hparams.layer]
    assert factors.left.dtype == factors.right.dtype == jnp.float32


def test_edited_weights_keep_the_dtype_and_are_summed_in_float32(bf16):
    model, hparams, context = bf16
    update, _ = compute_edit(model, REQUESTS[0], hparams, context=context)
    new = apply_edit(model.params, update)
    assert all(x.dtype == y.dtype for x, y in zip(jax.tree.leaves(new),
                                                   jax.tree.leaves(model.params)))
    w = model.params["blocks"]["mlp"]["fc_out"]["w"][hparams.layer]
    expected = (w.astype(jnp.float32) + update.weight_delta()).astype(jnp.bfloat16)
    got = new["blocks"]["mlp"]["fc_out"]["w"][hparams.layer]
    np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(expected, np.float32))
    assert not np.array_equal(np.asarray(got, np.float32), np.asarray(w, np.float32))


def test_a_non_finite_update_is_refused_on_a_bfloat16_model(bf16):
    model, hparams, context = bf16
    poisoned = EditContext(context.templates, context.stats, context.factor * jnp.nan)
    with pytest.raises(ValueError, match="non-finite update refused"):
        edit(model, REQUESTS[0], hparams, context=poisoned)


def test_the_cli_edits_in_bfloat16_and_refuses_a_bad_dtype(env, tiny_model, tmp_path):
    args = ["edit", "--model", tiny_model, *SMALL, "--prompt", "{} plays the", "--subject",
            "Lionel Messi", "--target-new", "piano", "--no-guard"]
    assert_user_error(cli(env, *args, "--dtype", "float8"), "--dtype")
    report = tmp_path / "r.json"
    proc = cli(env, *args, "--dtype", "bfloat16", "--report", report)
    assert_ok(proc)
    written = json.loads(report.read_text())
    assert written["dtype"] == "bfloat16"
    entry = written["edits"][0]
    assert entry["status"] == "applied" and np.isfinite(entry["denominator"])
    assert np.isfinite(written["perplexity_after"])


def test_probabilities_and_perplexity_are_normalised_in_float32(bf16):
    # A bfloat16 log-softmax rounds P(new) = 0.9926 to 1 (SmolLM2, README's Precision).
    from rome_jax.evaluation import target_nll, token_nll

    model = bf16[0]
    ids = jnp.asarray([model.tokenizer.encode("The Eiffel Tower is in Paris")])
    mask = jnp.ones_like(ids)
    assert token_nll(model.params, model.config, ids, mask).dtype == jnp.float32
    positions, targets = jnp.asarray([[2, 3]]), ids[:, 3:5]
    assert target_nll(model.params, model.config, ids, mask, positions, targets,
                      jnp.ones((1, 2))).dtype == jnp.float32
