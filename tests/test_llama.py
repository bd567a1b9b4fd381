"""Llama specifics: config.json reading and refusals, special tokens of a non-GPT-2 tokenizer,
tied / untied export, and the key-statistics fingerprint covering the gate.

Logit parity with ``transformers`` is in test_hf_parity.py, the ROME taps in
test_forward_taps.py and edits in test_rome_edit.py (each parametrized over the families).
"""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest
from safetensors import safe_open

import rome_jax
from rome_jax.data import pad_batch
from rome_jax.models.config import ModelConfig
from rome_jax.models.tokenizer import Tokenizer
from rome_jax.rome.hparams import preset_for
from rome_jax.rome.stats import fingerprint

# SmolLM2-135M-Instruct's config.json (as published; transformers 4 writes rope_theta).
SMOLLM2 = {
    "architectures": ["LlamaForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "bos_token_id": 1, "eos_token_id": 2, "hidden_act": "silu", "hidden_size": 576,
    "initializer_range": 0.041666666666666664, "intermediate_size": 1536,
    "is_llama_config": True, "max_position_embeddings": 8192, "mlp_bias": False,
    "model_type": "llama", "num_attention_heads": 9, "num_hidden_layers": 30,
    "num_key_value_heads": 3, "pad_token_id": 2, "pretraining_tp": 1, "rms_norm_eps": 1e-05,
    "rope_interleaved": False, "rope_scaling": None, "rope_theta": 100000,
    "tie_word_embeddings": True, "torch_dtype": "bfloat16", "transformers_version": "4.42.3",
    "use_cache": True, "vocab_size": 49152,
}


def test_smollm2_config_is_read_and_written_back():
    cfg = ModelConfig.from_hf(SMOLLM2)
    assert (cfg.n_layer, cfg.d_model, cfg.d_mlp, cfg.n_head, cfg.n_kv_head, cfg.head_dim) == (
        30, 576, 1536, 9, 3, 64)
    assert (cfg.rope_theta, cfg.layer_norm_epsilon, cfg.activation) == (1e5, 1e-5, "silu")
    assert (cfg.tied_lm_head, cfg.attention_bias, cfg.mlp_bias) == (True, False, False)
    assert (cfg.norm, cfg.gated_mlp, cfg.rotary_layout, cfg.rotary_dim) == (
        "rms", True, "half", 64)
    assert cfg.token_ids == {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2}
    assert cfg.edit_module == "model.layers.{}.mlp.down_proj"
    assert ModelConfig.from_hf(cfg.to_hf()) == cfg
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoConfig.for_model(**cfg.to_hf())
    assert type(hf) is transformers.LlamaConfig
    assert (hf.num_key_value_heads, hf.head_dim, hf.rope_parameters["rope_theta"],
            hf.tie_word_embeddings, hf.eos_token_id) == (3, 64, 1e5, True, 2)


@pytest.mark.parametrize("rope,theta", [
    ({"rope_theta": 500.0}, 500.0),
    ({"rope_parameters": {"rope_type": "default", "rope_theta": 250.0}}, 250.0),
    ({"rope_scaling": {"type": "default"}, "rope_theta": 70.0}, 70.0),
    ({}, 10000.0),
])
def test_rope_theta_in_either_format(rope, theta):
    base = {k: v for k, v in SMOLLM2.items() if k not in ("rope_theta", "rope_scaling")}
    assert ModelConfig.from_hf({**base, **rope}).rope_theta == theta


@pytest.mark.parametrize("change,name", [
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "rope_scaling"),
    ({"rope_scaling": {"type": "linear", "factor": 2.0}}, "rope_scaling"),
    ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4}}, "rope_parameters"),
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"pretraining_tp": 2}, "pretraining_tp"),
    ({"num_key_value_heads": 2}, "num_key_value_heads"),
    ({"quantization_config": {"quant_method": "bitsandbytes"}}, "quantization_config"),
    ({"sliding_window": 4096}, "sliding_window"),
    ({"rope_interleaved": True}, "rope_interleaved"),
    ({"head_dim": 63}, "head_dim"),
])
def test_unsupported_llama_attributes_are_refused_by_name(change, name):
    with pytest.raises(ValueError, match=name):
        ModelConfig.from_hf({**SMOLLM2, **change})


def test_missing_llama_attribute_is_named():
    with pytest.raises(ValueError, match="missing attribute 'intermediate_size'"):
        ModelConfig.from_hf({k: v for k, v in SMOLLM2.items() if k != "intermediate_size"})


def test_presets_by_shape():
    """SmolLM2-135M's shape gets its preset; a Llama of another width has none (a clear error)."""
    assert preset_for(ModelConfig.from_hf(SMOLLM2)) == preset_for(
        ModelConfig.from_hf(SMOLLM2), "smollm2-135m")
    with pytest.raises(ValueError, match="layer: no preset for a 30-layer llama"):
        preset_for(ModelConfig.from_hf({**SMOLLM2, "hidden_size": 640, "head_dim": 64}))
    assert preset_for(ModelConfig.from_hf(SMOLLM2), "gpt2-medium").layer == 8


def _llama_tokenizer_json() -> str:
    """A byte-level BPE with Llama's special tokens and no ``<|endoftext|>``."""
    from tokenizers import Tokenizer as Backend, decoders, models, pre_tokenizers, trainers

    backend = Backend(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(["The Eiffel Tower is in Paris.", "Messi plays football."] * 5,
                                trainer)
    return backend.to_str()


@pytest.fixture
def llama_dir(hf_model, copy_model_dir):
    """A tiny Llama directory whose tokenizer is a ``tokenizer.json`` without <|endoftext|>."""
    path = copy_model_dir(hf_model("llama", vocab_size=300))
    for name in ("vocab.json", "merges.txt"):
        (path / name).unlink()
    (path / "tokenizer.json").write_text(_llama_tokenizer_json())
    return path


def test_tokenizer_special_tokens_come_from_the_config(llama_dir, tmp_path):
    transformers = pytest.importorskip("transformers")
    model = rome_jax.load_model(llama_dir)
    tok = model.tokenizer
    assert (tok.bos_token, tok.eos_token, tok.eos_id, tok.pad_id) == ("<s>", "</s>", 2, 2)
    out = rome_jax.save_hf(model, tmp_path / "export")
    written = json.loads((out / "tokenizer_config.json").read_text())
    assert written["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert {"vocab.json", "merges.txt"}.isdisjoint(p.name for p in out.iterdir())
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    assert (hf_tok.bos_token_id, hf_tok.eos_token_id) == (1, 2)
    for text in ["The Eiffel Tower is in", " Paris, France.", "Messi</s> plays", ""]:
        ids = tok.encode(text)
        assert hf_tok(text, add_special_tokens=False)["input_ids"] == ids
        assert hf_tok.decode(ids) == tok.decode(ids) == text


def test_tokenizer_without_eos_pads_with_zero(llama_dir):
    tok = Tokenizer.from_dir(llama_dir)  # no config ids, no <|endoftext|>
    assert tok.eos_id is None and tok.pad_id == 0
    ids, mask = pad_batch([tok.encode("The Eiffel"), tok.encode("Paris")], tok.pad_id)
    assert ids.shape == mask.shape and mask.sum() == len(tok.encode("The Eiffel")) + len(
        tok.encode("Paris"))


@pytest.mark.parametrize("tied", [True, False])
def test_export_writes_lm_head_only_when_untied(hf_model, tmp_path, tied):
    model = rome_jax.load_model(hf_model("llama", tie_word_embeddings=tied).path)
    assert ("lm_head" in model.params) is not tied
    out = rome_jax.save_hf(model, tmp_path / "export")
    with safe_open(str(out / "model.safetensors"), framework="numpy") as f:
        names = set(f.keys())
    assert ("lm_head.weight" in names) is not tied
    assert not any(n.endswith(".bias") for n in names)  # no attention_bias / mlp_bias


def test_stats_fingerprint_covers_the_gate_not_the_edited_projection(hf_model):
    params = rome_jax.load_model(hf_model("llama", num_hidden_layers=3).path).params
    layer = 1
    base = fingerprint(params, layer)

    def bumped(*path):
        def bump(p, leaf):
            names = [k.key for k in p]
            return leaf.at[layer].add(1.0) if names[:len(path)] == list(path) else leaf
        return jax.tree_util.tree_map_with_path(bump, params)

    assert fingerprint(bumped("blocks", "mlp", "gate"), layer) != base
    assert fingerprint(bumped("blocks", "mlp", "fc_in"), layer) != base
    assert fingerprint(bumped("blocks", "attn", "k"), layer) != base
    assert fingerprint(bumped("blocks", "mlp", "fc_out"), layer) == base
    np.testing.assert_array_equal(params["blocks"]["mlp"]["gate"]["w"].shape, (3, 32, 48))
