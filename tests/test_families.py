"""Qwen2, Qwen3, Mistral, Phi-3, GPT-NeoX and Gemma 2 / 3 specifics: config.json reading
(legacy attributes included), refusals by name, and ROME edits on a Mistral and a Gemma 3 whose
sliding windows are shorter than the prompts.

Logit parity with ``transformers`` (and exports loading back) is in test_hf_parity.py and the
ROME taps in test_forward_taps.py, each parametrized over the families.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest
from conftest import assert_live_forward_is_full

from rome_jax import data
from rome_jax.hf import load_model
from rome_jax.models.config import ModelConfig
from rome_jax.models.transformer import mlp_key, rome_weight
from rome_jax.rome.edit import build_batch, edit, edit_core, prepare
from rome_jax.rome.hparams import RomeHParams
from rome_jax.rome.request import EditRequest
from rome_jax.rome.stats import compute_key_stats
from rome_jax.editors.delta import apply_edit

# Pythia-160m's shape with the attributes transformers 4 wrote (rotary_pct, rotary_emb_base).
PYTHIA = {
    "architectures": ["GPTNeoXForCausalLM"], "bos_token_id": 0, "eos_token_id": 0,
    "hidden_act": "gelu", "hidden_size": 768, "initializer_range": 0.02,
    "intermediate_size": 3072, "layer_norm_eps": 1e-05, "max_position_embeddings": 2048,
    "model_type": "gpt_neox", "num_attention_heads": 12, "num_hidden_layers": 12,
    "rotary_emb_base": 10000, "rotary_pct": 0.25, "tie_word_embeddings": False,
    "torch_dtype": "float16", "transformers_version": "4.24.0", "use_cache": True,
    "use_parallel_residual": True, "vocab_size": 50304, "attention_dropout": 0.0,
    "hidden_dropout": 0.0, "classifier_dropout": 0.1,
}
# Qwen2.5-0.5B's shape: a sliding_window that use_sliding_window=false leaves unused.
QWEN2 = {
    "architectures": ["Qwen2ForCausalLM"], "bos_token_id": 151643, "eos_token_id": 151643,
    "hidden_act": "silu", "hidden_size": 896, "intermediate_size": 4864,
    "max_position_embeddings": 32768, "max_window_layers": 24, "model_type": "qwen2",
    "num_attention_heads": 14, "num_hidden_layers": 24, "num_key_value_heads": 2,
    "rms_norm_eps": 1e-06, "rope_theta": 1000000.0, "sliding_window": 32768,
    "tie_word_embeddings": True, "use_sliding_window": False, "vocab_size": 151936,
}
# Gemma 3 1B's shape with the attributes transformers 4 wrote (rope_local_base_freq,
# sliding_window_pattern, no layer_types).
GEMMA3 = {
    "architectures": ["Gemma3ForCausalLM"], "attn_logit_softcapping": None, "bos_token_id": 2,
    "eos_token_id": 1, "final_logit_softcapping": None, "head_dim": 256,
    "hidden_activation": "gelu_pytorch_tanh", "hidden_size": 1152, "intermediate_size": 6912,
    "max_position_embeddings": 32768, "model_type": "gemma3_text", "num_attention_heads": 4,
    "num_hidden_layers": 26, "num_key_value_heads": 1, "pad_token_id": 0,
    "query_pre_attn_scalar": 256, "rms_norm_eps": 1e-06, "rope_local_base_freq": 10000,
    "rope_scaling": None, "rope_theta": 1000000, "sliding_window": 512,
    "sliding_window_pattern": 6, "vocab_size": 262144,
}
MISTRAL = {"model_type": "mistral", "vocab_size": 32000, "hidden_size": 64,
           "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
           "num_key_value_heads": 2, "sliding_window": 4096}


def test_pythia_legacy_rotary_attributes():
    cfg = ModelConfig.from_hf(PYTHIA)
    assert (cfg.head_dim, cfg.rotary_dim, cfg.rope_theta, cfg.rotary_layout) == (
        64, 16, 10000.0, "half")
    assert (cfg.parallel_residual, cfg.norm, cfg.attention_bias, cfg.tied_lm_head) == (
        True, "layer", True, False)
    assert cfg.edit_module == "gpt_neox.layers.{}.mlp.dense_4h_to_h"
    assert ModelConfig.from_hf(cfg.to_hf()) == cfg
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoConfig.for_model(**PYTHIA)
    assert int(hf.hidden_size // hf.num_attention_heads
               * hf.rope_parameters["partial_rotary_factor"]) == cfg.rotary_dim


def test_qwen2_unused_sliding_window_is_kept_not_applied():
    cfg = ModelConfig.from_hf(QWEN2)
    assert (cfg.sliding_window, cfg.attention_bias, cfg.attention_out_bias, cfg.mlp_bias) == (
        None, True, False, False)
    assert (cfg.n_kv_head, cfg.head_dim, cfg.rope_theta) == (2, 64, 1e6)
    written = cfg.to_hf()
    assert (written["sliding_window"], written["max_window_layers"]) == (32768, 24)
    assert ModelConfig.from_hf(written) == cfg


def test_gemma3_legacy_rope_and_layer_pattern():
    cfg = ModelConfig.from_hf(GEMMA3)
    assert (cfg.rope_theta, cfg.rope_local_theta, cfg.sliding_window) == (1e6, 1e4, 512)
    assert [i for i, t in enumerate(cfg.layer_types) if t == "full_attention"] == [5, 11, 17, 23]
    assert (cfg.norm, cfg.embed_scale, cfg.sandwich_norm, cfg.qk_norm, cfg.tied_lm_head) == (
        "gemma", True, True, True, True)
    assert (cfg.query_scale, cfg.attn_softcap, cfg.final_softcap) == (256, None, None)
    assert ModelConfig.from_hf(cfg.to_hf()) == cfg
    assert ModelConfig.from_hf({**GEMMA3, "sliding_window": None}).sliding_window is None
    assert ModelConfig.from_hf({k: v for k, v in GEMMA3.items()
                                if k != "sliding_window"}).sliding_window == 4096
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoConfig.for_model(**GEMMA3)
    assert tuple(hf.layer_types) == cfg.layer_types
    assert (hf.rope_parameters["full_attention"]["rope_theta"],
            hf.rope_parameters["sliding_attention"]["rope_theta"]) == (1e6, 1e4)


@pytest.mark.parametrize("hf,name", [
    ({**GEMMA3, "rope_scaling": {"rope_type": "linear", "factor": 8.0}}, "rope_scaling"),
    ({**GEMMA3, "attn_logit_softcapping": 50.0}, "attn_logit_softcapping"),
    ({**GEMMA3, "use_bidirectional_attention": True}, "use_bidirectional_attention"),
    ({**GEMMA3, "hidden_activation": "gelu"}, "hidden_activation"),
    ({**GEMMA3, "layer_types": ["chunked_attention"] * 26}, "layer_types"),
    ({**GEMMA3, "model_type": "gemma2", "layer_types": ["full_attention"]}, "layer_types"),
    ({**QWEN2, "use_sliding_window": True}, "use_sliding_window"),
    ({**QWEN2, "layer_types": ["sliding_attention"] * 24}, "layer_types"),
    ({**QWEN2, "model_type": "qwen3", "rope_scaling": {"rope_type": "yarn", "factor": 4.0}},
     "rope_scaling"),
    ({**QWEN2, "quantization_config": {"quant_method": "gptq"}}, "quantization_config"),
    ({**MISTRAL, "layer_types": ["full_attention"] * 2}, "layer_types"),
    ({**MISTRAL, "hidden_act": "gelu"}, "hidden_act"),
    ({**MISTRAL, "sliding_window": 0}, "sliding_window"),
    ({**MISTRAL, "model_type": "phi3", "rope_scaling": {"type": "longrope"}}, "rope_scaling"),
    ({**MISTRAL, "model_type": "phi3", "partial_rotary_factor": 0.1}, "partial_rotary_factor"),
    ({**PYTHIA, "rope_scaling": {"type": "linear", "factor": 2.0}}, "rope_scaling"),
    ({**PYTHIA, "rotary_pct": 0.01}, "partial_rotary_factor"),
    ({**PYTHIA, "hidden_act": "swish"}, "hidden_act"),
    ({**PYTHIA, "hidden_size": 770}, "hidden_size"),
])
def test_unsupported_attributes_are_refused_by_name(hf, name):
    with pytest.raises(ValueError, match=name):
        ModelConfig.from_hf(hf)


HP = RomeHParams(layer=1, v_num_grad_steps=6, v_lr=0.1,
                 context_template_length_params=((4, 5), (6, 5)))
REQUEST = EditRequest("{} plays the", "Lionel Messi", "piano", "football")


@pytest.mark.parametrize("family,extra", [
    ("mistral", {}),
    # windows in layers 0 and 2, the edit at layer 1 (full), δ before its post-feedforward norm
    ("gemma3_text", dict(layer_types=["sliding_attention", "full_attention",
                                      "sliding_attention"], final_logit_softcapping=5.0)),
])
def test_rome_edit_with_a_window_shorter_than_the_prompts(hf_model, family, extra):
    """The live-position forward of v*'s optimisation equals the full forward where the window
    cuts the past; the edited W maps the key to v*; ROME lowers v*'s loss at every step and
    edits only its layer's W."""
    pytest.importorskip("transformers")
    model = load_model(hf_model(family, vocab_size=50257, num_key_value_heads=2,
                                num_hidden_layers=3, max_position_embeddings=64,
                                sliding_window=4, **extra).path)
    stats = compute_key_stats(model, HP.layer, data.load_wikitext()[:200], "wiki200")
    context = prepare(model, HP, jax.random.key(0), stats=stats)
    batch = build_batch(model, REQUEST, context.templates, HP.fact_token)
    assert batch.ids.shape[1] > 2 * model.config.sliding_window

    assert_live_forward_is_full(model, batch, HP.layer)

    update, _, values, _ = edit_core(model.params, model.config, HP.layer, "c-rome",
                                     HP.v_num_grad_steps, batch, context.factor, HP.v_lr,
                                     HP.v_weight_decay, HP.kl_factor, HP.clamp_norm_factor,
                                     HP.early_stop_loss)
    keys = mlp_key(model.params, model.config, batch.ids, batch.mask, HP.layer, batch.lookup)
    w, b = rome_weight(apply_edit(model.params, update), HP.layer)
    np.testing.assert_allclose(keys[:-1].mean(0) @ w + b, values.v_star, atol=2e-4, rtol=1e-4)

    new, report = edit(model, REQUEST, HP, "rome", context=context)
    assert np.all(np.diff(report.v_losses) < 0)  # v*'s loss falls through the windowed forward
    changed = np.asarray(new["blocks"]["mlp"]["fc_out"]["w"] != model.params["blocks"]["mlp"][
        "fc_out"]["w"])
    assert changed[HP.layer].any() and not changed[np.arange(3) != HP.layer].any()


def test_batch_editors_keep_to_one_layer_on_gemma():
    """Gemma norms the MLP output before the residual stream, so MEMIT's residual spread over a
    window is refused by name; a one-layer batch edit (EMMET's preset) is exact and allowed."""
    from rome_jax.editors.hparams import resolve

    cfg = ModelConfig.from_hf(GEMMA3)
    with pytest.raises(ValueError, match=r"^layers: \[3, 4\]: a gemma3_text model"):
        resolve(cfg, "memit", layers=(3, 4))
    assert resolve(cfg, "emmet", layers=(4,)).layers == (4,)
    assert resolve(cfg, "memit", layer=4).layers == (4,)  # the rule's window: one layer
    assert ModelConfig.from_hf(MISTRAL).sandwich_norm is False
    assert resolve(ModelConfig.from_hf(MISTRAL), "memit", layers=(0, 1)).layers == (0, 1)
