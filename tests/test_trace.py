"""Causal tracing: invariants, a hand-written reference for one restoration, the PNG/JSON."""

from __future__ import annotations

import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny_gpt2

from rome_jax.trace import embedding_std, plot_trace, trace

PROMPT, SUBJECT = "{} plays the", "Danielle Darrieux"


@pytest.fixture(scope="module")
def tiny():
    return tiny_gpt2(n_layer=3, d_model=32, n_head=4, seq_len=32, seed=2, weight_scale=30)


@pytest.fixture(scope="module")
def result(tiny):
    return trace(tiny, PROMPT, SUBJECT, "piano", key=jax.random.key(0), samples=3,
                 kinds=("hidden", "mlp", "attn"), window=2)


def test_shapes_and_subject(result, tiny):
    assert result.tokens == ["Daniel", "le", " Dar", "rie", "ux", " plays", " the"]
    assert result.subject_range == (0, 5)
    assert result.target_id == tiny.tokenizer.encode(" piano")[0]
    for grid in result.scores.values():
        assert grid.shape == (7, 3) and np.isfinite(grid).all()
    assert result.low_score != pytest.approx(result.high_score, rel=1e-3)


def test_restoring_the_last_state_gives_the_clean_probability(result):
    assert result.scores["hidden"][-1, -1] == pytest.approx(result.high_score, rel=1e-5)


def test_the_last_layer_matters_only_at_the_last_token(result):
    # The last block's output at " plays" feeds no later computation of the last position.
    assert result.scores["hidden"][5, -1] == pytest.approx(result.low_score, rel=1e-5)


def test_no_noise_means_nothing_to_restore(tiny):
    r = trace(tiny, PROMPT, SUBJECT, "piano", key=jax.random.key(0), samples=3,
              noise_scale=0.0, kinds=("hidden", "mlp"))
    assert r.low_score == pytest.approx(r.high_score, rel=1e-5)
    for grid in r.scores.values():
        np.testing.assert_allclose(grid, r.high_score, rtol=1e-5)


def test_one_restoration_against_a_hand_written_loop(tiny, result):
    from rome_jax.models.transformer import block, embed, make_context, unembed

    p, cfg = tiny.params, tiny.config
    ids = jnp.asarray(tiny.tokenizer.encode(PROMPT.format(SUBJECT)))[None]
    ctx = make_context(ids.shape, None)
    key_std, key_noise = jax.random.split(jax.random.key(0))
    std = embedding_std(tiny, key_std)
    assert std == pytest.approx(result.noise_std)
    noise = 3.0 * std * jax.random.normal(key_noise, (3, 7, cfg.d_model))
    noise = noise * (jnp.arange(7) < 5)[None, :, None]

    def run(h, restore=None):
        states = []
        for j in range(cfg.n_layer):
            h = block(jax.tree.map(lambda w: w[j], p["blocks"]), cfg, h, ctx)[0]
            if restore is not None and restore[0] == j:
                h = h.at[:, restore[1]].set(restore[2][j][0, restore[1]])
            states.append(h)
        probs = jax.nn.softmax(unembed(p, cfg, h[:, -1]), -1)[:, result.target_id]
        return states, float(probs.mean())

    clean_states, high = run(embed(p, cfg, ids, ctx))
    corrupted = embed(p, cfg, ids, ctx) + noise
    assert high == pytest.approx(result.high_score, rel=1e-5)
    assert run(corrupted)[1] == pytest.approx(result.low_score, rel=1e-5)
    for layer, token in [(0, 4), (1, 2), (2, 6)]:
        got = run(corrupted, (layer, token, clean_states))[1]
        assert got == pytest.approx(result.scores["hidden"][token, layer], rel=1e-5)


def test_embedding_std_is_that_of_the_embeddings_the_model_adds(tiny):
    """Gemma multiplies its token embeddings by sqrt(D) before the first block, where the noise
    goes: the std is measured there, so the corruption is 3 std of what the model reads."""
    import dataclasses

    from rome_jax.models.transformer import embed, make_context

    scaled = dataclasses.replace(tiny, config=dataclasses.replace(tiny.config, embed_scale=True))
    key = jax.random.key(5)
    ids = jax.random.randint(key, (1000,), 0, tiny.config.vocab_size)
    rows = embed(scaled.params, scaled.config, ids[:, None], make_context((1000, 1), None))
    rows = rows[:, 0] - tiny.params["wpe"][0]  # each token alone at position 0, its wpe off
    assert embedding_std(scaled, key) == pytest.approx(float(jnp.std(rows)), rel=1e-5)
    assert embedding_std(scaled, key) == pytest.approx(
        math.sqrt(tiny.config.d_model) * embedding_std(tiny, key), rel=1e-6)


def test_same_key_same_trace_and_greedy_target(tiny, result):
    again = trace(tiny, PROMPT, SUBJECT, "piano", key=jax.random.key(0), samples=3,
                  kinds=("hidden",), window=2)
    np.testing.assert_array_equal(again.scores["hidden"], result.scores["hidden"])
    other = trace(tiny, PROMPT, SUBJECT, "piano", key=jax.random.key(1), samples=3,
                  kinds=("hidden",))
    assert other.low_score != result.low_score
    greedy = trace(tiny, PROMPT, SUBJECT, key=jax.random.key(0), samples=3, kinds=("hidden",))
    assert greedy.high_score == pytest.approx(
        float(jax.nn.softmax(tiny_logits(tiny)[-1]).max()), rel=1e-5)


def tiny_logits(tiny):
    from rome_jax.models.model import logits

    ids = jnp.asarray(tiny.tokenizer.encode(PROMPT.format(SUBJECT)))[None]
    return logits(tiny, ids)[0]


@pytest.mark.parametrize("kwargs, match", [
    (dict(prompt="Danielle plays", subject="Danielle"), "exactly one"),
    (dict(prompt="In{} plays", subject="dia"), "token boundary"),
    (dict(prompt=PROMPT, subject=SUBJECT, kinds=("mlp", "bogus")), "kind"),
    (dict(prompt=PROMPT, subject=" "), "subject")])
def test_bad_arguments(tiny, kwargs, match):
    with pytest.raises(ValueError, match=match):
        trace(tiny, key=jax.random.key(0), **kwargs)


def test_plot_and_json(result, tmp_path):
    out = plot_trace(result, tmp_path / "sub" / "heat.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in out.parent.iterdir()) == ["heat.png"]
    umask = os.umask(0o022)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o666 & ~umask  # as open() makes it, not 0600
    data = json.loads(json.dumps(result.to_dict()))
    assert data["layers"] == 3 and len(data["scores"]["mlp"]) == 7
