"""Properties of ROME's taps in ``rome_jax.models.transformer.forward``.

The reference for the MLP at a layer is HF itself: forward hooks on the MLP of block l record its
input (the normed residual) and its output, and can add a delta to that output; a hook on ROME's
edit module (``config.edit_module``) records its input, the key.
That keeps the checks non-circular: nothing here compares ``forward`` with a re-assembly of the
same block functions it is built from.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import rome_jax
from rome_jax.models.transformer import Dropout, drop, forward, mlp, residual_at, rome_weight

torch = pytest.importorskip("torch")

BATCH, SEQ, N_POS, N_LAYER = 2, 8, 3, 3
MODELS = {  # N_LAYER layers each, odd head counts, GPT-J with partial rotary, Llama with GQA,
    # Qwen3 with q/k norms, Mistral with a window shorter than the sequence, GPT-NeoX with a
    # parallel residual from two LayerNorms, Gemma 3 with norms after each branch (δ before the
    # post-feedforward norm) and per-layer windows (Qwen2, Phi-3 and Gemma 2 run blocks tested
    # here: see test_hf_parity.py)
    "gpt2": dict(n_embd=24, n_head=3, n_layer=N_LAYER, activation_function="gelu"),
    "gptj": dict(n_embd=40, n_head=5, rotary_dim=6, n_layer=N_LAYER, activation_function="gelu"),
    "llama": dict(hidden_size=30, num_attention_heads=3, num_key_value_heads=1, head_dim=8,
                  num_hidden_layers=N_LAYER, attention_bias=True, mlp_bias=True,
                  rope_theta=1000.0),
    "qwen3": dict(num_key_value_heads=2, head_dim=12, num_hidden_layers=N_LAYER),
    "mistral": dict(sliding_window=3, num_hidden_layers=N_LAYER),  # SEQ = 8 > 3
    "gpt_neox": dict(num_hidden_layers=N_LAYER),
    "gemma3_text": dict(num_key_value_heads=2, sliding_window=3, num_hidden_layers=N_LAYER,
                        layer_types=["sliding_attention", "full_attention", "sliding_attention"],
                        final_logit_softcapping=5.0),
}
SETTINGS = settings(max_examples=3, deadline=None, derandomize=True)  # per family

_forward = jax.jit(forward, static_argnums=1, static_argnames=("layer",))
_residual_at = jax.jit(residual_at, static_argnums=(1, 4))


class _Models(dict):
    def __repr__(self) -> str:  # keeps hypothesis' failure reports readable
        return f"<models {sorted(self)}>"


@pytest.fixture(scope="module")
def models(hf_model):
    out = _Models()
    for family, overrides in MODELS.items():
        hf = hf_model(family, **overrides)
        out[family] = (hf, rome_jax.load_model(hf.path))
    return out


@st.composite
def batches(draw, family: str):
    """A right-padded batch, a layer, one real position per row, and a delta seed."""
    layer = draw(st.integers(0, N_LAYER - 1))
    lengths = draw(st.lists(st.integers(1, SEQ), min_size=BATCH, max_size=BATCH))
    token_index = [draw(st.integers(0, n - 1)) for n in lengths]
    logit_positions = draw(st.lists(st.lists(st.integers(0, SEQ - 1), min_size=N_POS,
                                             max_size=N_POS), min_size=BATCH, max_size=BATCH))
    seed = draw(st.integers(0, 2**16))
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, 101, size=(BATCH, SEQ), dtype=np.int32)
    mask = (np.arange(SEQ)[None] < np.asarray(lengths)[:, None]).astype(np.int32)
    ids = np.where(mask > 0, ids, 0).astype(np.int32)
    return dict(family=family, layer=layer, ids=ids, mask=mask,
                token_index=np.asarray(token_index, np.int32),
                logit_positions=np.asarray(logit_positions, np.int32),
                delta_seed=seed)


def _hf_mlp(hf, cfg, batch, delta=None):
    """HF logits with hooks on the MLP of ``layer``: (logits, mlp input, mlp output, input of
    the edit module).

    With ``delta`` [B, D], it is added to the MLP output at ``token_index`` of each row.
    """
    seen = {}
    edit_name = cfg.edit_module.format(batch["layer"])
    mlp_module = hf.torch_model.get_submodule(edit_name.rsplit(".", 1)[0])
    edit_module = hf.torch_model.get_submodule(edit_name)
    rows = torch.arange(BATCH)
    cols = torch.as_tensor(batch["token_index"], dtype=torch.long)

    def hook(module, args, output):
        seen["in"], seen["out"] = args[0].numpy().copy(), output.numpy().copy()
        if delta is not None:
            output = output.clone()
            output[rows, cols] += torch.as_tensor(np.asarray(delta))
            return output
        return None

    def key_hook(module, args):
        seen["key"] = args[0].numpy().copy()

    handles = [mlp_module.register_forward_hook(hook),
               edit_module.register_forward_pre_hook(key_hook)]
    try:
        logits = hf.logits(batch["ids"], attention_mask=batch["mask"])
    finally:
        for handle in handles:
            handle.remove()
    return logits, seen["in"], seen["out"], seen["key"]


def _real(mask, a, b):
    m = mask.astype(bool)
    return np.asarray(a)[m], np.asarray(b)[m]


def _delta(batch, d_model):
    return (2.0 * np.random.default_rng(batch["delta_seed"]).standard_normal(
        (BATCH, d_model))).astype(np.float32)


@pytest.mark.parametrize("family", sorted(MODELS))
@SETTINGS
@given(data=st.data())
def test_key_is_input_of_mlp_output_projection(models, family, data):
    batch = data.draw(batches(family))
    hf, model = models[batch["family"]]
    params, cfg, layer = model.params, model.config, batch["layer"]
    rows, idx = np.arange(BATCH), batch["token_index"]
    out = _forward(params, cfg, batch["ids"], batch["mask"], layer=layer, token_index=idx)
    hf_logits, hf_in, hf_out, hf_key = _hf_mlp(hf, cfg, batch)
    key = np.asarray(out.key)
    assert key.shape == (BATCH, cfg.d_mlp)

    # The key is the input HF's edit module (c_proj, fc_out, down_proj) receives there ...
    np.testing.assert_allclose(key, hf_key[rows, idx], atol=1e-4, rtol=0)
    # ... key @ W_out + b_out is the MLP output HF computes there ...
    w, b = rome_weight(params, layer)
    value = key @ np.asarray(w) + np.asarray(b)
    np.testing.assert_allclose(value, hf_out[rows, idx], atol=1e-4, rtol=0)
    # ... and the key is the post-activation hidden of the MLP applied to HF's MLP input.
    p_mlp = jax.tree.map(lambda w: w[layer], params["blocks"]["mlp"])
    _, keys = mlp(p_mlp, cfg, hf_in)
    np.testing.assert_allclose(key, np.asarray(keys)[rows, idx], atol=1e-4, rtol=0)
    # Reading the key does not change the logits.
    np.testing.assert_allclose(*_real(batch["mask"], out.logits, hf_logits), atol=1e-4, rtol=0)


@pytest.mark.parametrize("family", sorted(MODELS))
@SETTINGS
@given(data=st.data())
def test_cached_residual_gives_same_outputs(models, family, data):
    batch = data.draw(batches(family))
    _, model = models[batch["family"]]
    params, cfg, layer = model.params, model.config, batch["layer"]
    ids, mask, idx = batch["ids"], batch["mask"], batch["token_index"]
    residual = _residual_at(params, cfg, ids, mask, layer)
    assert residual.shape == (BATCH, SEQ, cfg.d_model)

    full = _forward(params, cfg, ids, mask).logits
    cached = _forward(params, cfg, ids, mask, layer=layer, residual=residual).logits
    np.testing.assert_allclose(cached, full, atol=1e-5, rtol=0)

    delta = _delta(batch, cfg.d_model)
    a = _forward(params, cfg, ids, mask, layer=layer, token_index=idx, mlp_delta=delta,
                 residual=residual)
    b = _forward(params, cfg, ids, mask, layer=layer, token_index=idx, mlp_delta=delta)
    np.testing.assert_allclose(a.logits, b.logits, atol=1e-5, rtol=0)
    np.testing.assert_allclose(a.key, b.key, atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", sorted(MODELS))
@SETTINGS
@given(data=st.data())
def test_mlp_delta_is_causal_and_matches_hf(models, family, data):
    batch = data.draw(batches(family))
    hf, model = models[batch["family"]]
    params, cfg, layer = model.params, model.config, batch["layer"]
    ids, mask, idx = batch["ids"], batch["mask"], batch["token_index"]
    delta = _delta(batch, cfg.d_model)
    kwargs = dict(layer=layer, token_index=idx)
    edited = _forward(params, cfg, ids, mask, mlp_delta=delta, **kwargs)
    edited_logits = np.asarray(edited.logits)
    # Baselines: the same program with a zero delta (so equal to rounding-free precision), and
    # the plain forward.
    zero = np.asarray(_forward(params, cfg, ids, mask, mlp_delta=0 * delta, **kwargs).logits)
    base = np.asarray(_forward(params, cfg, ids, mask).logits)
    np.testing.assert_allclose(zero, base, atol=1e-5, rtol=0)

    for row in range(BATCH):
        i = idx[row]
        np.testing.assert_allclose(edited_logits[row, :i], zero[row, :i], atol=1e-6, rtol=0)
        assert np.abs(edited_logits[row, i] - zero[row, i]).max() > 1e-3
    # Same as HF with the delta added to the MLP output by a hook.
    hf_edited = _hf_mlp(hf, cfg, batch, delta=delta)[0]
    np.testing.assert_allclose(*_real(mask, edited_logits, hf_edited), atol=1e-4, rtol=0)
    # The key is read before the delta, so the delta does not change it.
    plain = _forward(params, cfg, ids, mask, layer=layer, token_index=idx)
    np.testing.assert_allclose(edited.key, plain.key, atol=1e-6, rtol=0)
    # A [D] delta is broadcast to every row.
    one = _forward(params, cfg, ids, mask, layer=layer, token_index=idx, mlp_delta=delta[0])
    tiled = _forward(params, cfg, ids, mask, layer=layer, token_index=idx,
                     mlp_delta=np.tile(delta[:1], (BATCH, 1)))
    np.testing.assert_allclose(one.logits, tiled.logits, atol=1e-6, rtol=0)


@pytest.mark.parametrize("family", sorted(MODELS))
@SETTINGS
@given(data=st.data())
def test_logit_positions_gather_full_logits(models, family, data):
    batch = data.draw(batches(family))
    _, model = models[batch["family"]]
    params, cfg, layer = model.params, model.config, batch["layer"]
    ids, mask, idx, pos = batch["ids"], batch["mask"], batch["token_index"], \
        batch["logit_positions"]

    def gathered(logits):
        return np.take_along_axis(np.asarray(logits), pos[:, :, None], axis=1)

    full = _forward(params, cfg, ids, mask).logits
    some = _forward(params, cfg, ids, mask, logit_positions=pos).logits
    assert some.shape == (BATCH, N_POS, cfg.vocab_size)
    np.testing.assert_allclose(some, gathered(full), atol=1e-5, rtol=0)

    delta = _delta(batch, cfg.d_model)
    kwargs = dict(layer=layer, token_index=idx, mlp_delta=delta)
    full = _forward(params, cfg, ids, mask, **kwargs)
    some = _forward(params, cfg, ids, mask, logit_positions=pos, **kwargs)
    np.testing.assert_allclose(some.logits, gathered(full.logits), atol=1e-5, rtol=0)
    np.testing.assert_allclose(some.key, full.key, atol=1e-6, rtol=0)


def test_taps_need_a_layer(models):
    _, model = models["gpt2"]
    ids = np.zeros((1, 4), np.int32)
    with pytest.raises(ValueError, match="layer"):
        forward(model.params, model.config, ids, token_index=np.zeros(1, np.int32))
    with pytest.raises(ValueError, match="layer"):
        forward(model.params, model.config, ids, layer=model.config.n_layer)


@pytest.mark.parametrize("rate", [0.05, 0.1, 0.5])
def test_drop_zeroes_the_rounded_rate_and_keeps_the_mean(rate):
    x = np.ones(400_000, np.float32)
    y = np.asarray(drop(x, jax.random.key(3), rate))
    p = round(rate * 256) / 256
    zero = y == 0
    sigma = np.sqrt(p * (1 - p) / x.size)
    assert abs(zero.mean() - p) < 4 * sigma
    np.testing.assert_allclose(y[~zero], 1 / (1 - p), rtol=1e-6)
    assert abs(y.mean() - 1) < 4 * sigma / (1 - p)
    assert drop(x, None, rate) is x


@pytest.mark.parametrize("family", sorted(MODELS))
def test_dropout_is_keyed_and_only_for_training(models, family):
    _, model = models[family]
    ids = np.arange(2 * SEQ, dtype=np.int32).reshape(2, SEQ)
    plain = np.asarray(forward(model.params, model.config, ids).logits)
    run = lambda key, rate: np.asarray(forward(model.params, model.config, ids,
                                               dropout=Dropout(jax.random.key(key), rate)).logits)
    np.testing.assert_array_equal(run(0, 0.0), plain)
    np.testing.assert_array_equal(run(0, 0.2), run(0, 0.2))
    assert np.abs(run(0, 0.2) - plain).max() > 1e-3
    assert np.abs(run(0, 0.2) - run(1, 0.2)).max() > 1e-3
    with pytest.raises(ValueError, match="dropout"):
        forward(model.params, model.config, ids, layer=0,
                dropout=Dropout(jax.random.key(0), 0.2))
