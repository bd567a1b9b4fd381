"""ModelConfig: the architecture facts rome_jax needs, read from a Hugging Face ``config.json``.

One forward (``transformer.py``) serves every family; the families differ only in these fields:

* ``gpt2`` – learned absolute positions, sequential residual (attention then MLP, each with its
  own LayerNorm), fused ``c_attn`` Conv1D projections with biases, plain MLP, LM head tied to the
  token embedding. ROME edits ``transformer.h.{l}.mlp.c_proj``.
* ``gptj`` – rotary position embeddings on the first ``rotary_dim`` dimensions of each head
  (interleaved pairs, "rotate every two", theta 10000), attention and MLP in parallel from one
  LayerNorm, bias-free attention projections, plain MLP, untied LM head with a bias. ROME edits
  ``transformer.h.{l}.mlp.fc_out``.
* ``llama`` – RMSNorm (weight only, computed in float32), sequential residual, rotary embeddings
  on the whole head in the "rotate half" layout with ``rope_theta``, grouped-query attention
  (``num_key_value_heads``), an explicit ``head_dim``, optional attention / MLP biases, a gated
  SwiGLU MLP ``down(silu(gate(x)) * up(x))``, tied or untied LM head without bias. ROME edits
  ``model.layers.{l}.mlp.down_proj``; its key is the input of ``down_proj``.
* ``qwen2`` – Llama with biases on q, k and v but not on o (``attention_out_bias``).
* ``qwen3`` – Llama with an RMSNorm over each head's ``head_dim`` on q and k before the rotary
  embedding (``qk_norm``).
* ``mistral`` – Llama without biases, with sliding-window attention: a query at position i sees
  the keys at positions j with ``i - sliding_window < j <= i``.
* ``phi3`` – Llama without biases, with q, k, v fused into ``qkv_proj`` and gate, up into
  ``gate_up_proj`` (split on import: the params are Llama's), rotary on the first
  ``partial_rotary_factor * head_dim`` dims and an optional sliding window.
* ``gpt_neox`` – LayerNorms with bias, attention and MLP in parallel from two LayerNorms
  (``use_parallel_residual``; else sequential), rotary in the "rotate half" layout on the first
  ``partial_rotary_factor * head_dim`` dims, a fused per-head QKV with biases, a plain MLP and a
  head without bias (untied by default). ROME edits ``gpt_neox.layers.{l}.mlp.dense_4h_to_h``.
* ``gemma2``, ``gemma3_text`` – Llama's projections with the token embedding scaled by
  sqrt(d_model), RMSNorms that scale by (1 + w), a norm after attention and after the MLP as
  well as before each (``sandwich_norm``), scores scaled by ``query_pre_attn_scalar^-1/2``,
  a GeLU-tanh SwiGLU, per-layer attention types (``layer_types``: sliding-window or full, with
  their own rotary bases in Gemma 3), tanh soft-capping of scores (Gemma 2) and logits where set, tied
  head; Gemma 3 adds (1 + w) RMSNorms of q and k over head_dim. ROME edits
  ``model.layers.{l}.mlp.down_proj``: its key is the input of ``down_proj`` and δ is added to
  ``down_proj``'s output, before the post-feedforward norm.

Qwen2 / Qwen3 with ``use_sliding_window`` or sliding ``layer_types``, Gemma 3 with score
soft-capping (transformers 5 ignores it), rope types other than the default and quantized
checkpoints are refused.

``from_hf`` checks every attribute that changes the computation and refuses values it does not
implement by name, instead of silently computing something else.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Mapping

SUPPORTED_ACTIVATIONS = ("gelu_new", "gelu_pytorch_tanh", "gelu", "relu")
LLAMA_ACTIVATIONS = ("silu",)

# Attributes that only matter for training, generation defaults or other heads.
_IGNORED = {
    "architectures", "attn_pdrop", "embd_pdrop", "resid_pdrop", "summary_type",
    "summary_use_proj", "summary_activation", "summary_proj_to_labels",
    "summary_first_dropout", "initializer_range", "use_cache", "bos_token_id", "eos_token_id",
    "pad_token_id", "transformers_version", "task_specific_params", "torch_dtype", "dtype",
    "model_type", "n_ctx", "_name_or_path", "id2label", "label2id", "output_hidden_states",
    "output_attentions", "return_dict", "chunk_size_feed_forward", "is_encoder_decoder",
    "problem_type", "reorder_and_upcast_attn", "gradient_checkpointing", "tokenizer_class",
    "prefix", "decoder_start_token_id", "use_return_dict", "tie_word_embeddings",
    "attention_dropout", "hidden_dropout", "classifier_dropout", "is_decoder",
}
# GPT-2 and GPT-J always use token 50256 (``to_hf`` writes it); the other families keep their own
# ids in ``extra`` (the tokenizer may need the eos id, and export writes them back).
_TOKEN_IDS = {"bos_token_id", "eos_token_id", "pad_token_id"}

# Families with Llama's layout (RMSNorm, rotate-half rotary, grouped queries, SwiGLU); each one's
# differences are read by ``_llama_fields``.
LLAMA_LIKE = ("llama", "qwen2", "qwen3", "mistral", "phi3", "gemma2", "gemma3_text")
GEMMA = ("gemma2", "gemma3_text")
ARCHITECTURES = {"gpt2": "GPT2LMHeadModel", "gptj": "GPTJForCausalLM",
                 "llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM",
                 "qwen3": "Qwen3ForCausalLM", "mistral": "MistralForCausalLM",
                 "phi3": "Phi3ForCausalLM", "gpt_neox": "GPTNeoXForCausalLM",
                 "gemma2": "Gemma2ForCausalLM", "gemma3_text": "Gemma3ForCausalLM"}

# Attribute -> the only value we implement (an absent attribute means that value).
_REQUIRED = {
    "gpt2": {"scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False,
             "add_cross_attention": False},
    "gptj": {},
    # rope_interleaved (nanotron exports) is ignored by transformers; refused when true, since
    # its weights would then expect pairs rotated the GPT-J way.
    "llama": {"quantization_config": None, "sliding_window": None, "use_sliding_window": False,
              "layer_types": None, "rope_interleaved": False},
    # Qwen's sliding_window and max_window_layers only act with use_sliding_window (kept as
    # they are); layer_types must then be all "full_attention" (checked in _llama_fields).
    "qwen2": {"quantization_config": None, "use_sliding_window": False},
    "qwen3": {"quantization_config": None, "use_sliding_window": False},
    "mistral": {"quantization_config": None, "layer_types": None},
    "phi3": {"quantization_config": None, "layer_types": None},
    "gpt_neox": {"quantization_config": None},
    "gemma2": {"quantization_config": None},
    "gemma3_text": {"quantization_config": None},
}


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture of a decoder-only transformer.

    Attributes:
      model_type: ``"gpt2"``, ``"gptj"``, ``"llama"``, ``"qwen2"``, ``"qwen3"``, ``"mistral"``,
        ``"phi3"``, ``"gpt_neox"``, ``"gemma2"`` or ``"gemma3_text"``.
      vocab_size: rows of the token embedding (V).
      n_positions: longest sequence the model supports.
      d_model: residual width (D, HF ``n_embd`` / ``hidden_size``).
      n_layer: number of blocks (L).
      n_head: query heads (H).
      d_mlp: MLP hidden width (F, HF ``n_inner`` or ``4 * n_embd``, ``intermediate_size``); also
        the key size of ROME.
      activation: MLP non-linearity.
      layer_norm_epsilon: LayerNorm / RMSNorm epsilon.
      rotary_dim: rotary dimensions per head; ``None`` for learned positions.
      parallel_residual: attention and MLP both read the block's input h (GPT-J: through one
        LayerNorm; GPT-NeoX: through one each) and both outputs are added to it.
      tied_lm_head: logits use the token embedding; else a separate head (``lm_head``).
      norm: ``"layer"`` (LayerNorm with bias), ``"rms"`` (RMSNorm in float32, times w) or
        ``"gemma"`` (RMSNorm in float32, times 1 + w).
      gated_mlp: the MLP key is ``act(gate(x)) * fc_in(x)`` (SwiGLU) instead of ``act(fc_in(x))``.
      rotary_layout: ``"interleaved"`` pairs (2i, 2i+1) (GPT-J) or ``"half"`` pairs
        (i, i + rotary_dim/2) (Llama's ``rotate_half``).
      rope_theta: rotary base; pair i turns by ``position / rope_theta^(2i / rotary_dim)``.
      n_kv_head: key/value heads (KV, grouped-query attention; query head h reads KV head
        ``h // (H / KV)``); ``None`` means H.
      head_dim: size of each head (hd); ``None`` means ``d_model // n_head``.
      attention_bias: q, k, v projections have biases.
      attention_out_bias: the o projection has a bias; ``None`` means ``attention_bias``.
      mlp_bias: MLP projections have biases.
      qk_norm: q and k are RMS-normed over each head's ``head_dim`` (weights
        ``attn/q_norm``, ``attn/k_norm`` [hd]) before the rotary embedding (Qwen3).
      sliding_window: a query at position i attends only to keys at positions j with
        ``i - j < sliding_window`` (Mistral; with ``layer_types`` only in its sliding layers);
        ``None``: every earlier position.
      layer_types: per layer ``"sliding_attention"`` or ``"full_attention"`` (Gemma); ``None``:
        every layer the same.
      rope_local_theta: the rotary base of the sliding layers (Gemma 3); ``None``: rope_theta.
      embed_scale: token embeddings are multiplied by sqrt(d_model) (Gemma).
      sandwich_norm: attention and MLP outputs are normed (``attn_post``, ``mlp_post``) before
        they are added to the residual stream (Gemma).
      query_scale: scores are q·k / sqrt(query_scale); ``None``: sqrt(head_dim).
      attn_softcap, final_softcap: scores / logits become ``c tanh(x / c)``; ``None``: off.
      extra: the remaining HF attributes, kept so that export writes them back.
    """

    model_type: str
    vocab_size: int
    n_positions: int
    d_model: int
    n_layer: int
    n_head: int
    d_mlp: int
    activation: str = "gelu_new"
    layer_norm_epsilon: float = 1e-5
    rotary_dim: int | None = None
    parallel_residual: bool = False
    tied_lm_head: bool = True
    norm: str = "layer"
    gated_mlp: bool = False
    rotary_layout: str = "interleaved"
    rope_theta: float = 10000.0
    n_kv_head: int | None = None
    head_dim: int | None = None
    attention_bias: bool = True
    attention_out_bias: bool | None = None
    mlp_bias: bool = True
    qk_norm: bool = False
    sliding_window: int | None = None
    layer_types: tuple[str, ...] | None = None
    rope_local_theta: float | None = None
    embed_scale: bool = False
    sandwich_norm: bool = False
    query_scale: float | None = None
    attn_softcap: float | None = None
    final_softcap: float | None = None
    extra: tuple = ()

    def __post_init__(self):
        if self.attention_out_bias is None:
            object.__setattr__(self, "attention_out_bias", self.attention_bias)
        if self.n_kv_head is None:
            object.__setattr__(self, "n_kv_head", self.n_head)
        if self.head_dim is None:
            object.__setattr__(self, "head_dim", self.d_model // self.n_head)

    @property
    def edit_module(self) -> str:
        """HF name of ROME's edit target in block ``{}``."""
        if self.model_type in LLAMA_LIKE:
            return "model.layers.{}.mlp.down_proj"
        return {"gpt2": "transformer.h.{}.mlp.c_proj", "gptj": "transformer.h.{}.mlp.fc_out",
                "gpt_neox": "gpt_neox.layers.{}.mlp.dense_4h_to_h"}[self.model_type]

    def check_layer(self, layer: int) -> int:
        if not isinstance(layer, int) or not 0 <= layer < self.n_layer:
            raise ValueError(f"layer: {layer!r} is out of range for a model with "
                             f"{self.n_layer} layers (0..{self.n_layer - 1})")
        return layer

    @property
    def token_ids(self) -> dict[str, int]:
        """bos/eos/pad token ids kept from config.json (not GPT-2 / GPT-J; an id list gives its
        first)."""
        ids = {k: _thaw(v) for k, v in self.extra if k in _TOKEN_IDS}
        ids = {k: v[0] if isinstance(v, list) and v else v for k, v in ids.items()}
        return {k: v for k, v in ids.items() if isinstance(v, int)}

    @classmethod
    def from_hf(cls, hf: Mapping[str, Any], source: str = "config.json") -> "ModelConfig":
        """Build from a parsed HF ``config.json``; ``source`` names the file in errors.

        Every attribute that is read is type-checked (sizes positive integers, epsilons and
        rotary bases positive finite numbers, flags true/false): ValueError naming the file and
        the attribute, never a Python error about the value."""
        if not isinstance(hf, Mapping):
            raise ValueError(f"{source}: expected a JSON object of attributes, got "
                             f"{type(hf).__name__}")
        model_type = hf.get("model_type")
        if not isinstance(model_type, str) or model_type not in _REQUIRED:
            raise ValueError(f"{source}: unknown architecture model_type={model_type!r}; "
                             f"rome_jax supports {sorted(_REQUIRED)}")
        for name, value in _REQUIRED[model_type].items():
            if name in hf and hf[name] != value:
                raise ValueError(f"{source}: {name}={hf[name]!r} is not supported "
                                 f"(rome_jax implements {name}={value!r})")
        try:
            read = {"gpt2": _gpt_fields, "gptj": _gpt_fields, "gpt_neox": _neox_fields,
                    "gemma2": _gemma_fields, "gemma3_text": _gemma_fields}.get(
                model_type, _llama_fields)
            cfg, known = read(hf, model_type, source)
        except KeyError as err:
            raise ValueError(f"{source}: missing attribute {err.args[0]!r}") from None
        known |= set(_REQUIRED[model_type]) | _IGNORED
        if model_type not in ("gpt2", "gptj"):
            known -= _TOKEN_IDS
            for name in _TOKEN_IDS & hf.keys():
                ids = hf[name] if isinstance(hf[name], list) else [hf[name]]
                if not all(i is None or (isinstance(i, int) and not isinstance(i, bool)
                                         and 0 <= i < 2**31) for i in ids):
                    raise ValueError(f"{source}: {name}={hf[name]!r} must be a token id (an "
                                     "integer >= 0), a list of them or null")
        # Other attributes (generic generation settings and the like) do not change the maths;
        # they are kept so that export writes them back.
        extra = tuple(sorted((k, _freeze(v)) for k, v in hf.items()
                             if k not in known and k != "model_type"))
        return cls(**cfg, extra=extra)

    def to_hf(self) -> dict[str, Any]:
        """The HF ``config.json`` dict (loadable by ``transformers.AutoConfig``)."""
        out: dict[str, Any] = {k: _thaw(v) for k, v in self.extra}
        out.update(model_type=self.model_type, vocab_size=self.vocab_size,
                   tie_word_embeddings=self.tied_lm_head,
                   architectures=[ARCHITECTURES[self.model_type]])
        rope = {"rope_type": "default", "rope_theta": self.rope_theta}
        if self.model_type in ("phi3", "gpt_neox"):
            rope["partial_rotary_factor"] = self.rotary_dim / self.head_dim
        if self.model_type in LLAMA_LIKE:
            out.update(
                hidden_size=self.d_model, intermediate_size=self.d_mlp,
                num_hidden_layers=self.n_layer, num_attention_heads=self.n_head,
                num_key_value_heads=self.n_kv_head, head_dim=self.head_dim,
                hidden_act=self.activation, max_position_embeddings=self.n_positions,
                rms_norm_eps=self.layer_norm_epsilon, rope_theta=self.rope_theta,
                rope_parameters=rope,
            )
            if self.model_type == "llama":
                out.update(attention_bias=self.attention_bias, mlp_bias=self.mlp_bias,
                           pretraining_tp=1)
            elif self.model_type in GEMMA:
                del out["hidden_act"], out["rope_theta"]
                out.update(hidden_activation=self.activation, attention_bias=self.attention_bias,
                           query_pre_attn_scalar=self.query_scale,
                           sliding_window=self.sliding_window,
                           layer_types=list(self.layer_types),
                           attn_logit_softcapping=self.attn_softcap,
                           final_logit_softcapping=self.final_softcap)
                if self.model_type == "gemma3_text":
                    local = {"rope_type": "default", "rope_theta": self.rope_local_theta}
                    out.update(rope_parameters={"full_attention": rope,
                                                "sliding_attention": local},
                               use_bidirectional_attention=False)
            elif self.model_type in ("qwen2", "qwen3"):
                out.update(use_sliding_window=False,
                           layer_types=["full_attention"] * self.n_layer)
                if self.model_type == "qwen3":
                    out.update(attention_bias=self.attention_bias)
            else:
                out.update(sliding_window=self.sliding_window)
            return out
        if self.model_type == "gpt_neox":
            out.update(
                hidden_size=self.d_model, intermediate_size=self.d_mlp,
                num_hidden_layers=self.n_layer, num_attention_heads=self.n_head,
                hidden_act=self.activation, max_position_embeddings=self.n_positions,
                layer_norm_eps=self.layer_norm_epsilon, rope_parameters=rope,
                use_parallel_residual=self.parallel_residual,
                attention_bias=self.attention_bias,
            )
            return out
        out.update(
            n_positions=self.n_positions, n_embd=self.d_model, n_layer=self.n_layer,
            n_head=self.n_head, n_inner=self.d_mlp, activation_function=self.activation,
            layer_norm_epsilon=self.layer_norm_epsilon, bos_token_id=50256, eos_token_id=50256,
        )
        if self.model_type == "gpt2":
            out.update(scale_attn_weights=True, scale_attn_by_inverse_layer_idx=False,
                       add_cross_attention=False)
        else:
            out.update(rotary_dim=self.rotary_dim)
        return out


def _gpt_fields(hf: Mapping[str, Any], model_type: str, source: str) -> tuple[dict, set]:
    """GPT-2 / GPT-J ``config.json`` -> (ModelConfig fields, attributes consumed)."""
    size = functools.partial(_positive_int, hf, source)
    d_model, n_head = size("n_embd"), size("n_head")
    cfg = dict(
        model_type=model_type, vocab_size=size("vocab_size"), n_positions=size("n_positions"),
        d_model=d_model, n_layer=size("n_layer"), n_head=n_head,
        d_mlp=size("n_inner", None) or 4 * d_model,
        activation=hf.get("activation_function", "gelu_new"),
        layer_norm_epsilon=_positive_float(hf, "layer_norm_epsilon", source, 1e-5),
    )
    if cfg["activation"] not in SUPPORTED_ACTIVATIONS:
        raise ValueError(f"{source}: activation_function={cfg['activation']!r} is not "
                         f"supported ({', '.join(SUPPORTED_ACTIVATIONS)})")
    if d_model % n_head:
        raise ValueError(f"{source}: n_embd={d_model} is not divisible by n_head={n_head}")
    tied = _flag(hf, "tie_word_embeddings", source, model_type == "gpt2")
    if model_type == "gpt2":
        if not tied:
            raise ValueError(f"{source}: tie_word_embeddings=False is not supported for gpt2")
        cfg.update(rotary_dim=None, parallel_residual=False, tied_lm_head=True)
    else:
        if tied:
            raise ValueError(f"{source}: tie_word_embeddings=True is not supported for gptj")
        # Absent: GPTJConfig's default 64 (what transformers computes); null: the whole
        # head (transformers 4 rotates all of it, which only works with one head).
        rotary_dim = (d_model // n_head if "rotary_dim" in hf and hf["rotary_dim"] is None
                      else _positive_int(hf, source, "rotary_dim", 64))
        if rotary_dim % 2 or rotary_dim > d_model // n_head:
            raise ValueError(f"{source}: rotary_dim={rotary_dim} must be even and at most "
                             f"the head size {d_model // n_head}")
        cfg.update(rotary_dim=int(rotary_dim), parallel_residual=True, tied_lm_head=False,
                   attention_bias=False)
    known = {"vocab_size", "n_positions", "n_embd", "n_layer", "n_head", "n_inner",
             "activation_function", "layer_norm_epsilon", "rotary_dim"}
    return cfg, known


def _llama_fields(hf: Mapping[str, Any], model_type: str, source: str) -> tuple[dict, set]:
    """Llama, Qwen2, Qwen3, Mistral or Phi-3 ``config.json`` -> (ModelConfig fields, attributes
    consumed).

    Defaults are ``transformers.LlamaConfig``'s. Biases: Llama's ``attention_bias`` (q, k, v,
    o) and ``mlp_bias``; Qwen3's ``attention_bias``; Qwen2's q, k, v always; none in Mistral and
    Phi-3 (their HF classes have no bias attributes).
    """
    size = functools.partial(_positive_int, hf, source)
    d_model, n_head = size("hidden_size"), size("num_attention_heads")
    n_layer = size("num_hidden_layers")
    n_kv_head = size("num_key_value_heads", None) or n_head
    head_dim = size("head_dim", None) or d_model // n_head
    activation = hf.get("hidden_act", "silu")
    if activation not in LLAMA_ACTIVATIONS:
        raise ValueError(f"{source}: hidden_act={activation!r} is not supported "
                         f"({', '.join(LLAMA_ACTIVATIONS)})")
    if hf.get("pretraining_tp") not in (None, 1):
        raise ValueError(f"{source}: pretraining_tp={hf['pretraining_tp']!r} is not supported "
                         "(rome_jax implements pretraining_tp=1)")
    if n_head % n_kv_head:
        raise ValueError(f"{source}: num_attention_heads={n_head} is not a multiple of "
                         f"num_key_value_heads={n_kv_head}")
    if head_dim % 2 or not head_dim:
        raise ValueError(f"{source}: head_dim={head_dim} must be even and positive for rotary "
                         "embeddings")
    theta, factor = _rope(hf, source)
    # Only Phi-3's rotary reads partial_rotary_factor; the others rotate the whole head.
    rotary_dim = _rotary_dim(head_dim, factor, source) if model_type == "phi3" else head_dim
    bias = (_flag(hf, "attention_bias", source, False) if model_type in ("llama", "qwen3")
            else model_type == "qwen2")
    known = {"vocab_size", "hidden_size", "num_attention_heads", "num_key_value_heads",
             "head_dim", "hidden_act", "pretraining_tp", "max_position_embeddings",
             "num_hidden_layers", "intermediate_size", "rms_norm_eps", "rope_theta",
             "rope_scaling", "rope_parameters"}
    if model_type == "llama":
        known |= {"attention_bias", "mlp_bias"}
    elif model_type == "qwen3":
        known |= {"attention_bias"}
    if model_type in ("qwen2", "qwen3"):
        types = hf.get("layer_types")
        if types is not None and types != ["full_attention"] * n_layer:
            raise ValueError(f"{source}: layer_types={types!r} is not supported (rome_jax "
                             f"implements {n_layer} x 'full_attention')")
        known |= {"layer_types"}
    window = None
    if model_type in ("mistral", "phi3"):
        window = size("sliding_window", None)
        known |= {"sliding_window"}
    if model_type == "phi3":
        known |= {"partial_rotary_factor"}
    cfg = dict(
        model_type=model_type, vocab_size=size("vocab_size"),
        n_positions=size("max_position_embeddings", 2048), d_model=d_model,
        n_layer=n_layer, n_head=n_head,
        d_mlp=size("intermediate_size"), activation=activation,
        layer_norm_epsilon=_positive_float(hf, "rms_norm_eps", source, 1e-6),
        rotary_dim=rotary_dim, parallel_residual=False,
        tied_lm_head=_flag(hf, "tie_word_embeddings", source, False), norm="rms",
        gated_mlp=True, rotary_layout="half", rope_theta=theta,
        n_kv_head=n_kv_head, head_dim=head_dim,
        attention_bias=bias, attention_out_bias=bias and model_type != "qwen2",
        mlp_bias=model_type == "llama" and _flag(hf, "mlp_bias", source, False),
        qk_norm=model_type == "qwen3", sliding_window=window,
    )
    return cfg, known


def _gemma_fields(hf: Mapping[str, Any], model_type: str, source: str) -> tuple[dict, set]:
    """Gemma 2 / Gemma 3 (text) ``config.json`` -> (ModelConfig fields, attributes consumed).

    Defaults and the layer types of a config without ``layer_types`` are transformers'
    (Gemma 2: even layers sliding; Gemma 3: every ``sliding_window_pattern``-th layer full).
    Gemma 3's rotary bases: ``rope_parameters`` per layer type (transformers 5) or
    ``rope_theta`` / ``rope_local_base_freq``."""
    size = functools.partial(_positive_int, hf, source)
    d_model, n_head = size("hidden_size"), size("num_attention_heads")
    n_layer = size("num_hidden_layers")
    n_kv_head = size("num_key_value_heads", None) or n_head
    head_dim = size("head_dim", 256)
    if n_head % n_kv_head or head_dim % 2:
        raise ValueError(f"{source}: num_attention_heads={n_head} must be a multiple of "
                         f"num_key_value_heads={n_kv_head} and head_dim={head_dim} even")
    activation = hf.get("hidden_activation", "gelu_pytorch_tanh")
    if activation != "gelu_pytorch_tanh":
        raise ValueError(f"{source}: hidden_activation={activation!r} is not supported "
                         "(gelu_pytorch_tanh)")
    if hf.get("use_bidirectional_attention") not in (None, False):
        raise ValueError(f"{source}: use_bidirectional_attention="
                         f"{hf['use_bidirectional_attention']!r} is not supported (rome_jax "
                         "implements causal attention)")
    gemma3 = model_type == "gemma3_text"
    if gemma3 and hf.get("attn_logit_softcapping") is not None:
        # Gemma 3 checkpoints have none, and transformers 5's Gemma 3 attention ignores it.
        raise ValueError(f"{source}: attn_logit_softcapping={hf['attn_logit_softcapping']!r} is "
                         "not supported for gemma3_text (rome_jax implements null)")
    pattern = hf.get("sliding_window_pattern", hf.get("_sliding_window_pattern", 6))
    types = hf.get("layer_types") or [
        "sliding_attention" if (i + 1) % (pattern if gemma3 else 2) else "full_attention"
        for i in range(n_layer)]
    if (not isinstance(types, list) or len(types) != n_layer
            or not set(types) <= {"sliding_attention", "full_attention"}):
        raise ValueError(f"{source}: layer_types={types!r} is not supported (expected "
                         f"{n_layer} of 'sliding_attention' / 'full_attention')")
    rope = hf.get("rope_parameters")
    if gemma3 and isinstance(rope, Mapping) and "full_attention" in rope:
        theta = _rope({"rope_parameters": rope["full_attention"]}, source, 1e6)[0]
        local = _rope({"rope_parameters": rope.get("sliding_attention") or {}}, source, 1e4)[0]
    else:
        theta = _rope(hf, source, 1e6 if gemma3 else 1e4)[0]
        local = _positive_float(hf, "rope_local_base_freq", source, 1e4) if gemma3 else None
    softcaps = {name: (None if hf.get(name, default) is None
                       else _positive_float(hf, name, source, default))
                for name, default in (("attn_logit_softcapping", None if gemma3 else 50.0),
                                      ("final_logit_softcapping", None if gemma3 else 30.0))}
    cfg = dict(
        model_type=model_type, vocab_size=size("vocab_size"),
        n_positions=size("max_position_embeddings", 8192), d_model=d_model, n_layer=n_layer,
        n_head=n_head, d_mlp=size("intermediate_size"), activation=activation,
        layer_norm_epsilon=_positive_float(hf, "rms_norm_eps", source, 1e-6),
        rotary_dim=head_dim, tied_lm_head=_flag(hf, "tie_word_embeddings", source, True),
        norm="gemma", gated_mlp=True, rotary_layout="half", rope_theta=theta,
        n_kv_head=n_kv_head, head_dim=head_dim,
        attention_bias=_flag(hf, "attention_bias", source, False), mlp_bias=False,
        qk_norm=gemma3,  # an explicit null: no window, as in transformers
        sliding_window=size("sliding_window", None) if "sliding_window" in hf else 4096,
        layer_types=tuple(types), rope_local_theta=local, embed_scale=True,
        sandwich_norm=True, query_scale=size("query_pre_attn_scalar", 256),
        attn_softcap=softcaps["attn_logit_softcapping"],
        final_softcap=softcaps["final_logit_softcapping"],
    )
    known = {"vocab_size", "hidden_size", "num_attention_heads", "num_key_value_heads",
             "head_dim", "hidden_activation", "max_position_embeddings", "num_hidden_layers",
             "intermediate_size", "rms_norm_eps", "rope_theta", "rope_scaling",
             "rope_parameters", "rope_local_base_freq", "attention_bias", "sliding_window",
             "layer_types", "sliding_window_pattern", "_sliding_window_pattern",
             "query_pre_attn_scalar", "attn_logit_softcapping", "final_logit_softcapping",
             "use_bidirectional_attention"}
    return cfg, known


def _neox_fields(hf: Mapping[str, Any], model_type: str, source: str) -> tuple[dict, set]:
    """GPT-NeoX (Pythia) ``config.json`` -> (ModelConfig fields, attributes consumed).

    Defaults are ``transformers.GPTNeoXConfig``'s; the legacy ``rotary_pct`` and
    ``rotary_emb_base`` are read as transformers reads them (``rope_parameters`` wins)."""
    size = functools.partial(_positive_int, hf, source)
    d_model, n_head = size("hidden_size"), size("num_attention_heads")
    if d_model % n_head:
        raise ValueError(f"{source}: hidden_size={d_model} is not divisible by "
                         f"num_attention_heads={n_head}")
    activation = hf.get("hidden_act", "gelu")
    if activation not in SUPPORTED_ACTIVATIONS:
        raise ValueError(f"{source}: hidden_act={activation!r} is not supported "
                         f"({', '.join(SUPPORTED_ACTIVATIONS)})")
    theta, factor = _rope(hf, source, hf.get("rotary_emb_base"), hf.get("rotary_pct", 0.25))
    bias = _flag(hf, "attention_bias", source, True)
    cfg = dict(
        model_type=model_type, vocab_size=size("vocab_size"),
        n_positions=size("max_position_embeddings", 2048), d_model=d_model,
        n_layer=size("num_hidden_layers"), n_head=n_head, d_mlp=size("intermediate_size"),
        activation=activation,
        layer_norm_epsilon=_positive_float(hf, "layer_norm_eps", source, 1e-5),
        rotary_dim=_rotary_dim(d_model // n_head, factor, source),
        parallel_residual=_flag(hf, "use_parallel_residual", source, True),
        tied_lm_head=_flag(hf, "tie_word_embeddings", source, False), norm="layer",
        rotary_layout="half", rope_theta=theta, attention_bias=bias, mlp_bias=True,
    )
    known = {"vocab_size", "hidden_size", "num_attention_heads", "hidden_act",
             "max_position_embeddings", "num_hidden_layers", "intermediate_size",
             "layer_norm_eps", "rope_theta", "rope_scaling", "rope_parameters", "rotary_pct",
             "rotary_emb_base", "use_parallel_residual", "attention_bias",
             "partial_rotary_factor"}
    return cfg, known


def _rotary_dim(head_dim: int, factor: float, source: str) -> int:
    """``int(head_dim * partial_rotary_factor)`` as transformers computes it; it must be even
    and within the head."""
    rotary_dim = int(head_dim * factor)
    if rotary_dim % 2 or not 0 < rotary_dim <= head_dim:
        raise ValueError(f"{source}: partial_rotary_factor={factor!r} gives {rotary_dim} "
                         f"rotary dims of a {head_dim}-dim head (must be even, 2..{head_dim})")
    return rotary_dim


def _rope(hf: Mapping[str, Any], source: str, theta: Any = None,
          factor: Any = 1.0) -> tuple[float, float]:
    """(``rope_theta``, ``partial_rotary_factor``) from ``rope_scaling`` / ``rope_parameters``
    (transformers 5) or the top-level attributes (``theta``, ``factor``: the family's legacy
    values); any rope type other than the default is refused by name."""
    theta = hf.get("rope_theta", theta)
    factor = hf.get("partial_rotary_factor", factor)
    for name in ("rope_scaling", "rope_parameters"):  # transformers lets rope_scaling win
        rope = hf.get(name)
        if rope is None:
            continue
        if not isinstance(rope, Mapping):
            raise ValueError(f"{source}: {name}={rope!r} is not supported (expected a dict)")
        kind = rope.get("rope_type", rope.get("type", "default"))
        if kind != "default":
            raise ValueError(f"{source}: {name} with rope_type={kind!r} is not supported "
                             "(rome_jax implements the default rotary embedding)")
        theta = rope.get("rope_theta", theta)
        factor = rope.get("partial_rotary_factor", factor)
        break
    values = {"rope_theta": theta, "partial_rotary_factor": factor}
    return (_positive_float(values, "rope_theta", source, 10000.0),
            _positive_float(values, "partial_rotary_factor", source, 1.0))


def positive_int(value: Any, where: str) -> int:
    """``value`` when it is a positive integer (not a bool); else ValueError ``{where}={value!r}
    must be a positive integer`` (``where``: the file and the field)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{where}={value!r} must be a positive integer")
    return value


def positive_number(value: Any, where: str) -> float:
    """``value`` as a float when it is a positive finite number; else ValueError as
    :func:`positive_int`."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (
            math.isfinite(value) and value > 0):
        raise ValueError(f"{where}={value!r} must be a positive finite number")
    return float(value)


def _positive_int(hf: Mapping[str, Any], source: str, name: str, default: Any = ...) -> Any:
    """``hf[name]`` as a positive integer; ``default`` when absent or null (``...``: required,
    KeyError)."""
    value = hf.get(name)
    if value is None:
        if default is ...:
            raise KeyError(name)
        return default
    return positive_int(value, f"{source}: {name}")


def _positive_float(hf: Mapping[str, Any], name: str, source: str, default: float) -> float:
    """``hf[name]`` (``default`` when absent or null) as a positive finite float."""
    value = hf.get(name)
    return default if value is None else positive_number(value, f"{source}: {name}")


def _flag(hf: Mapping[str, Any], name: str, source: str, default: bool) -> bool:
    """``hf[name]`` (``default`` when absent or null) as true/false."""
    value = hf.get(name)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise ValueError(f"{source}: {name}={value!r} must be true or false")
    return value


def _freeze(value: Any) -> Any:
    """Make a JSON value hashable so that ModelConfig stays usable as a jit static argument."""
    if isinstance(value, dict):
        return ("__dict__", tuple(sorted((k, _freeze(v)) for k, v in value.items())))
    if isinstance(value, list):
        return ("__list__", tuple(_freeze(v) for v in value))
    return value


def _thaw(value: Any) -> Any:
    if isinstance(value, tuple) and value and value[0] == "__dict__":
        return {k: _thaw(v) for k, v in value[1]}
    if isinstance(value, tuple) and value and value[0] == "__list__":
        return [_thaw(v) for v in value[1]]
    return value
