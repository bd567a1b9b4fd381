"""rome_jax computes what ``transformers`` computes, and its exports load back into ``transformers``.

Every comparison is float32 logits to 1e-4 absolute, on tiny random models whose weights are
O(1) (see conftest), so attention patterns and positions matter.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import jax
import numpy as np
import pytest

import rome_jax
from rome_jax.data import pad_batch

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

ATOL = 1e-4

CONFIGS = {
    "gpt2": ("gpt2", {}),
    "gpt2-3heads-gelu": ("gpt2", dict(n_embd=24, n_head=3, n_layer=3,
                                      activation_function="gelu")),
    "gpt2-5heads-relu": ("gpt2", dict(n_embd=40, n_head=5, n_layer=1, n_inner=56,
                                      activation_function="relu", layer_norm_epsilon=1e-3)),
    # head_dim 12, rotary on the first 4 dims only
    "gptj-partial-rotary": ("gptj", dict(n_embd=48, n_head=4, rotary_dim=4)),
    "gptj-3heads-full-rotary": ("gptj", dict(n_embd=36, n_head=3, rotary_dim=12, n_inner=40)),
    "gptj-5heads-gelu": ("gptj", dict(n_embd=40, n_head=5, rotary_dim=6, n_layer=3,
                                      activation_function="gelu")),
    # config.json "rotary_dim": null; HF rotates the whole (single) head
    "gptj-rotary-none": ("gptj", dict(n_embd=16, n_head=1, rotary_dim=None)),
    # Llama: every query head its own KV head, untied head (the conftest defaults)
    "llama-mha-untied": ("llama", {}),
    # two KV heads for four query heads, tied embeddings, rope_theta != 10000
    "llama-gqa2-tied": ("llama", dict(num_key_value_heads=2, tie_word_embeddings=True,
                                      rope_theta=500.0, rms_norm_eps=1e-5)),
    # one KV head for 3 query heads, head_dim 10 != 24 / 3, every bias on
    "llama-3heads-mqa-biases": ("llama", dict(hidden_size=24, num_attention_heads=3,
                                              num_key_value_heads=1, head_dim=10,
                                              attention_bias=True, mlp_bias=True,
                                              rope_theta=100000.0, num_hidden_layers=3)),
    # 5 heads, all of them KV heads, head_dim 6 != 40 / 5, MLP bias only
    "llama-5heads-mlp-bias": ("llama", dict(hidden_size=40, num_attention_heads=5, head_dim=6,
                                            intermediate_size=56, mlp_bias=True,
                                            tie_word_embeddings=True)),
    # Qwen2: q, k, v biases, none on o
    "qwen2-gqa2-tied": ("qwen2", dict(num_key_value_heads=2, tie_word_embeddings=True)),
    "qwen2-3heads-mqa": ("qwen2", dict(hidden_size=24, num_attention_heads=3,
                                       num_key_value_heads=1, head_dim=10, rope_theta=1e5,
                                       num_hidden_layers=3)),
    # Qwen3: q/k RMSNorms over head_dim (12 != 32 / 4); every attention bias on in one
    "qwen3-gqa2-head12": ("qwen3", dict(num_key_value_heads=2, head_dim=12)),
    "qwen3-biases-tied": ("qwen3", dict(attention_bias=True, tie_word_embeddings=True,
                                        rms_norm_eps=1e-5)),
    # Mistral / Phi-3: sliding windows shorter than the SEQ = 12 tokens compared
    "mistral-window4-gqa2": ("mistral", dict(sliding_window=4, num_key_value_heads=2)),
    "mistral-3heads-window5": ("mistral", dict(hidden_size=24, num_attention_heads=3,
                                               head_dim=10, sliding_window=5, rope_theta=500.0)),
    "mistral-no-window": ("mistral", {}),
    # Phi-3: fused qkv_proj (grouped queries) and gate_up_proj
    "phi3-window4-gqa2": ("phi3", dict(sliding_window=4, num_key_value_heads=2)),
    "phi3-partial-rotary-tied": ("phi3", dict(
        tie_word_embeddings=True, head_dim=12,
        rope_parameters={"rope_type": "default", "rope_theta": 1e4,
                         "partial_rotary_factor": 0.5})),
    # GPT-NeoX: parallel residual, rotary on 2 of 8 dims (the default 0.25), fused QKV
    "gpt_neox-parallel": ("gpt_neox", {}),
    "gpt_neox-sequential-tied-nobias": ("gpt_neox", dict(
        use_parallel_residual=False, attention_bias=False, tie_word_embeddings=True,
        hidden_act="gelu_new", layer_norm_eps=1e-3,
        rope_parameters={"rope_type": "default", "rope_theta": 500.0,
                         "partial_rotary_factor": 0.5})),
    # Gemma 2: transformers' alternating layer types, soft-capping at its defaults (30, 50)
    # and below them, query_pre_attn_scalar != head_dim
    "gemma2-window4-gqa2": ("gemma2", dict(sliding_window=4, query_pre_attn_scalar=12,
                                           num_key_value_heads=2)),
    "gemma2-3layers-caps": ("gemma2", dict(num_hidden_layers=3, head_dim=12, sliding_window=5,
                                           attn_logit_softcapping=2.0,
                                           final_logit_softcapping=5.0)),
    # Gemma 3: q/k norms, a rotary base per layer type, layer types given or by the pattern
    "gemma3-window4-thetas": ("gemma3_text", dict(
        num_hidden_layers=3, num_key_value_heads=2, sliding_window=4, query_pre_attn_scalar=12,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"],
        final_logit_softcapping=5.0,
        rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 1000.0},
                         "sliding_attention": {"rope_type": "default", "rope_theta": 10.0}})),
    "gemma3-pattern-window3": ("gemma3_text", dict(head_dim=16, sliding_window=3)),
}
SEQ = 12
LENGTHS = (12, 7, 1)


@pytest.fixture(params=sorted(CONFIGS))
def case(request, hf_model):
    family, overrides = CONFIGS[request.param]
    hf = hf_model(family, **overrides)
    return hf, rome_jax.load_model(hf.path)


def _ids(vocab: int, batch: int = len(LENGTHS), seq: int = SEQ, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, vocab, size=(batch, seq), dtype=np.int32)


def _real(mask: np.ndarray, *arrays: np.ndarray) -> list[np.ndarray]:
    """Rows of each [B, T, ...] array at the real (mask == 1) positions, concatenated."""
    return [a[mask.astype(bool)] for a in arrays]


def test_config_read(case):
    hf, model = case
    cfg = model.config
    tc = hf.torch_model.config
    if hf.family == "gpt_neox":
        assert (cfg.d_model, cfg.n_layer, cfg.n_head, cfg.d_mlp, cfg.parallel_residual) == (
            tc.hidden_size, tc.num_hidden_layers, tc.num_attention_heads,
            tc.intermediate_size, tc.use_parallel_residual)
        attention = hf.torch_model.gpt_neox.layers[0].attention
        assert (cfg.rotary_dim, cfg.rope_theta) == (
            attention.rotary_ndims, tc.rope_parameters["rope_theta"])
        return
    if hf.family != "gpt2" and hf.family != "gptj":
        assert (cfg.d_model, cfg.n_layer, cfg.n_head, cfg.n_kv_head, cfg.head_dim, cfg.d_mlp) == (
            tc.hidden_size, tc.num_hidden_layers, tc.num_attention_heads,
            tc.num_key_value_heads, tc.head_dim, tc.intermediate_size)
        rope = tc.rope_parameters
        assert cfg.rope_theta == rope.get("full_attention", rope)["rope_theta"]
        assert cfg.layer_types == (tuple(tc.layer_types) if hf.family.startswith("gemma")
                                   else None)
        assert cfg.tied_lm_head == tc.tie_word_embeddings
        assert cfg.sliding_window == getattr(tc, "sliding_window", None)
        layer = hf.torch_model.model.layers[0]
        q = getattr(layer.self_attn, "q_proj", None)
        assert cfg.attention_bias == (q is not None and q.bias is not None)
        assert cfg.attention_out_bias == (layer.self_attn.o_proj.bias is not None)
        assert cfg.mlp_bias == (layer.mlp.down_proj.bias is not None)
        assert cfg.qk_norm == hasattr(layer.self_attn, "q_norm")
        assert (cfg.norm, cfg.gated_mlp) == ("gemma" if cfg.layer_types else "rms", True)
        return
    assert (cfg.d_model, cfg.n_layer, cfg.n_head) == (
        hf.config["n_embd"], hf.config["n_layer"], hf.config["n_head"])
    assert cfg.d_mlp == (hf.config.get("n_inner") or 4 * hf.config["n_embd"])
    if hf.family == "gptj":
        assert cfg.rotary_dim == (hf.config["rotary_dim"] or cfg.head_dim)
    else:
        assert cfg.rotary_dim is None


def test_logits_unpadded(case):
    hf, model = case
    ids = _ids(model.config.vocab_size)
    ours = np.asarray(rome_jax.logits(model, ids))
    assert ours.shape == (*ids.shape, model.config.vocab_size)
    np.testing.assert_allclose(ours, hf.logits(ids), atol=ATOL, rtol=0)


def test_logits_right_padding(case):
    hf, model = case
    rows = [list(r[:n]) for r, n in zip(_ids(model.config.vocab_size, seed=1), LENGTHS)]
    ids, mask = pad_batch(rows, pad_id=0, side="right", length=SEQ)
    ours = np.asarray(rome_jax.logits(model, ids, mask))
    ref = hf.logits(ids, attention_mask=mask)
    a, b = _real(mask, ours, ref)
    np.testing.assert_allclose(a, b, atol=ATOL, rtol=0)


def test_logits_left_padding(case):
    hf, model = case
    rows = [list(r[:n]) for r, n in zip(_ids(model.config.vocab_size, seed=2), LENGTHS)]
    ids, mask = pad_batch(rows, pad_id=0, side="left", length=SEQ)
    ours = np.asarray(rome_jax.logits(model, ids, mask))
    positions = np.maximum(np.cumsum(mask, axis=-1) - 1, 0)
    ref = hf.logits(ids, attention_mask=mask, position_ids=positions)
    a, b = _real(mask, ours, ref)
    np.testing.assert_allclose(a, b, atol=ATOL, rtol=0)
    # And each left-padded row computes what the row alone computes in HF.
    for row, (seq, n) in enumerate(zip(rows, LENGTHS)):
        alone = hf.logits(np.asarray([seq]))[0]
        np.testing.assert_allclose(ours[row, SEQ - n:], alone, atol=ATOL, rtol=0)


def test_export_loads_in_transformers(case, tmp_path):
    hf, model = case
    out = rome_jax.save_hf(model, tmp_path / "export")
    assert {"config.json", "model.safetensors", "vocab.json", "merges.txt",
            "tokenizer_config.json"} <= {p.name for p in out.iterdir()}
    ids = _ids(model.config.vocab_size, seed=3)
    reloaded_hf = transformers.AutoModelForCausalLM.from_pretrained(out).float().eval()
    assert type(reloaded_hf) is type(hf.torch_model)
    with torch.no_grad():
        ref = reloaded_hf(torch.as_tensor(ids, dtype=torch.long)).logits.numpy()
    np.testing.assert_allclose(np.asarray(rome_jax.logits(model, ids)), ref, atol=ATOL, rtol=0)
    np.testing.assert_allclose(hf.logits(ids), ref, atol=ATOL, rtol=0)

    again = rome_jax.load_model(out)
    assert again.config == model.config
    jax.tree.map(np.testing.assert_array_equal, again.params, model.params)


def test_exported_tokenizer_matches(hf_model, tmp_path):
    hf = hf_model("gpt2", vocab_size=50257, n_embd=16, n_layer=1, n_head=2)
    model = rome_jax.load_model(hf.path)
    assert model.tokenizer.vocab_size == model.config.vocab_size == 50257
    assert model.tokenizer.eos_id == 50256
    out = rome_jax.save_hf(model, tmp_path / "export")
    texts = ["The Eiffel Tower is located in", " Paris, France.", "  two  spaces\nand a newline",
             "Ünïcödé — 東京 🙂", "don't won't it's", "", "1234567 3.14159", "\t tabs\t",
             "<|endoftext|>", "end.<|endoftext|>The next"]
    tokenizers = [transformers.AutoTokenizer.from_pretrained(out),
                  transformers.GPT2TokenizerFast.from_pretrained(out)]
    reloaded = rome_jax.load_model(out).tokenizer
    for text in texts:
        ours = model.tokenizer.encode(text)
        assert reloaded.encode(text) == ours, text
        assert model.tokenizer.decode(ours) == text
        for tok in tokenizers:
            assert tok(text)["input_ids"] == ours, (type(tok).__name__, text)
            assert tok.decode(ours) == text
    for tok in tokenizers:
        assert tok.eos_token_id == model.tokenizer.eos_id
    # The exported weights and the exported tokenizer agree in HF as they do in rome_jax.
    ids = np.asarray([model.tokenizer.encode(texts[0])])
    reloaded_hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        ref = reloaded_hf(torch.as_tensor(ids, dtype=torch.long)).logits.numpy()
    np.testing.assert_allclose(np.asarray(rome_jax.logits(model, ids)), ref, atol=ATOL, rtol=0)


@pytest.mark.parametrize("name", ["gpt2", "gptj-partial-rotary", "llama-gqa2-tied",
                                  "phi3-window4-gqa2", "gpt_neox-parallel"])
def test_sharded_safetensors(name, hf_model, tmp_path):
    family, overrides = CONFIGS[name]
    hf = hf_model(family, **overrides)
    d = tmp_path / "sharded"
    hf.torch_model.save_pretrained(d, max_shard_size="20KB")
    for f in ("vocab.json", "merges.txt"):
        shutil.copyfile(hf.path / f, d / f)
    index = json.loads((d / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert not (d / "model.safetensors").exists()
    model = rome_jax.load_model(d)
    ids = _ids(model.config.vocab_size, seed=4)
    np.testing.assert_allclose(np.asarray(rome_jax.logits(model, ids)), hf.logits(ids),
                               atol=ATOL, rtol=0)


def _bin_dir(hf, tmp_path, **save_args) -> Path:
    """``hf``'s weights as a ``pytorch_model.bin`` directory (``save_args`` to torch.save)."""
    d = tmp_path / "bin"
    d.mkdir()
    # transformers 5 no longer writes pytorch_model.bin (no safe_serialization=False).
    torch.save(hf.torch_model.state_dict(), d / "pytorch_model.bin", **save_args)
    for f in ("config.json", "vocab.json", "merges.txt"):
        shutil.copyfile(hf.path / f, d / f)
    return d


@pytest.mark.parametrize("name", ["gpt2", "gptj-partial-rotary", "llama-gqa2-tied"])
def test_pytorch_model_bin(name, hf_model, tmp_path):
    family, overrides = CONFIGS[name]
    hf = hf_model(family, **overrides)
    model = rome_jax.load_model(_bin_dir(hf, tmp_path))
    ids = _ids(model.config.vocab_size, seed=5)
    np.testing.assert_allclose(np.asarray(rome_jax.logits(model, ids)), hf.logits(ids),
                               atol=ATOL, rtol=0)


def _mapped(file: Path) -> list[tuple[int, int]]:
    """The address ranges at which ``/proc/self/maps`` shows ``file`` mapped."""
    ranges = []
    for line in Path("/proc/self/maps").read_text().splitlines():
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and fields[5] == str(file.resolve()):
            lo, hi = fields[0].split("-")
            ranges.append((int(lo, 16), int(hi, 16)))
    return ranges


@pytest.mark.parametrize("zipped", [True, False])
def test_pytorch_model_bin_is_mapped_not_read_whole(zipped, hf_model, tmp_path, monkeypatch):
    """A ``.bin`` in torch's zip format (torch.save's default) is memory-mapped: every tensor
    torch.load hands over lies in the file's mapping, its bytes read only when its reader
    converts it. An older (pre-zip) file cannot be mapped: it is read whole, and loads."""
    if not Path("/proc/self/maps").is_file():
        pytest.skip("needs /proc/self/maps (Linux) to see the file's mapping")
    hf = hf_model("gpt2")
    d = _bin_dir(hf, tmp_path, _use_new_zipfile_serialization=zipped)
    states, load = [], torch.load
    monkeypatch.setattr(torch, "load", lambda *args, **kw: states.append(load(*args, **kw))
                        or states[-1])
    model = rome_jax.load_model(d)
    ranges = _mapped(d / "pytorch_model.bin")
    assert len(states) == 1 and bool(ranges) == zipped
    assert [any(lo <= t.data_ptr() < hi for lo, hi in ranges) for t in states[0].values()] \
        == [zipped] * len(states[0])
    ids = _ids(model.config.vocab_size, seed=5)
    np.testing.assert_allclose(np.asarray(rome_jax.logits(model, ids)), hf.logits(ids),
                               atol=ATOL, rtol=0)


def test_gpt2_names_without_transformer_prefix(hf_model, tmp_path):
    """The original OpenAI conversion stores ``h.0.attn...`` without ``transformer.``."""
    from safetensors.torch import save_file

    hf = hf_model("gpt2")
    d = tmp_path / "noprefix"
    d.mkdir()
    state = {k.removeprefix("transformer."): v.contiguous()
             for k, v in hf.torch_model.state_dict().items() if k != "lm_head.weight"}
    save_file(state, str(d / "model.safetensors"))
    for f in ("config.json", "vocab.json", "merges.txt"):
        shutil.copyfile(hf.path / f, d / f)
    model = rome_jax.load_model(d)
    ids = _ids(model.config.vocab_size, seed=6)
    np.testing.assert_allclose(np.asarray(rome_jax.logits(model, ids)), hf.logits(ids),
                               atol=ATOL, rtol=0)


def test_missing_rotary_dim_means_hf_default():
    """A GPT-J config.json without rotary_dim computes with GPTJConfig's default (64)."""
    base = dict(model_type="gptj", vocab_size=11, n_positions=8, n_layer=1,
                tie_word_embeddings=False)
    cfg = rome_jax.ModelConfig.from_hf(dict(base, n_embd=256, n_head=2))
    assert cfg.rotary_dim == transformers.GPTJConfig().rotary_dim == 64
    assert rome_jax.ModelConfig.from_hf(dict(base, n_embd=256, n_head=2,
                                             rotary_dim=None)).rotary_dim == 128
