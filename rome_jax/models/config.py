"""ModelConfig: the architecture facts rome_jax needs, read from a Hugging Face ``config.json``.

Two families are supported:

* ``gpt2`` – learned absolute positions, sequential residual (attention then MLP, each with its
  own LayerNorm), fused ``c_attn`` Conv1D projections with biases, LM head tied to the token
  embedding. ROME edits ``transformer.h.{l}.mlp.c_proj``.
* ``gptj`` – rotary position embeddings on the first ``rotary_dim`` dimensions of each head
  (interleaved pairs, "rotate every two"), attention and MLP in parallel from one LayerNorm,
  bias-free attention projections, untied LM head with a bias. ROME edits
  ``transformer.h.{l}.mlp.fc_out``.

``from_hf`` checks every attribute that changes the computation and refuses values it does not
implement by name, instead of silently computing something else.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

SUPPORTED_ACTIVATIONS = ("gelu_new", "gelu_pytorch_tanh", "gelu", "relu")

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
}

# Attribute -> the only value we implement.
_REQUIRED = {
    "gpt2": {"scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False,
             "add_cross_attention": False},
    "gptj": {},
}


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture of a decoder-only transformer.

    Attributes:
      model_type: ``"gpt2"`` or ``"gptj"``.
      vocab_size: rows of the token embedding (V).
      n_positions: longest sequence the model supports.
      d_model: residual width (D, HF ``n_embd``).
      n_layer: number of blocks (L).
      n_head: attention heads (H); ``d_model % n_head == 0``.
      d_mlp: MLP hidden width (F, HF ``n_inner`` or ``4 * n_embd``); also the key size of ROME.
      activation: MLP non-linearity.
      layer_norm_epsilon: LayerNorm epsilon.
      rotary_dim: rotary dimensions per head (GPT-J); ``None`` for learned positions.
      parallel_residual: attention and MLP read the same LayerNorm output (GPT-J).
      tied_lm_head: logits use the token embedding (GPT-2); else a separate head with bias.
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
    extra: tuple = ()

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_head

    @property
    def edit_module(self) -> str:
        """HF name of ROME's edit target in block ``{}``."""
        return {"gpt2": "transformer.h.{}.mlp.c_proj", "gptj": "transformer.h.{}.mlp.fc_out"}[
            self.model_type]

    def check_layer(self, layer: int) -> int:
        if not isinstance(layer, int) or not 0 <= layer < self.n_layer:
            raise ValueError(f"layer: {layer!r} is out of range for a model with "
                             f"{self.n_layer} layers (0..{self.n_layer - 1})")
        return layer

    @classmethod
    def from_hf(cls, hf: Mapping[str, Any], source: str = "config.json") -> "ModelConfig":
        """Build from a parsed HF ``config.json``; ``source`` names the file in errors."""
        model_type = hf.get("model_type")
        if model_type not in _REQUIRED:
            raise ValueError(f"{source}: unknown architecture model_type={model_type!r}; "
                             f"rome_jax supports {sorted(_REQUIRED)}")
        for name, value in _REQUIRED[model_type].items():
            if name in hf and hf[name] != value:
                raise ValueError(f"{source}: {name}={hf[name]!r} is not supported "
                                 f"(rome_jax implements {name}={value!r})")
        try:
            d_model, n_head = int(hf["n_embd"]), int(hf["n_head"])
            cfg = dict(
                model_type=model_type, vocab_size=int(hf["vocab_size"]),
                n_positions=int(hf["n_positions"]), d_model=d_model,
                n_layer=int(hf["n_layer"]), n_head=n_head,
                d_mlp=int(hf.get("n_inner") or 4 * d_model),
                activation=hf.get("activation_function", "gelu_new"),
                layer_norm_epsilon=float(hf.get("layer_norm_epsilon", 1e-5)),
            )
        except KeyError as err:
            raise ValueError(f"{source}: missing attribute {err.args[0]!r}") from None
        if cfg["activation"] not in SUPPORTED_ACTIVATIONS:
            raise ValueError(f"{source}: activation_function={cfg['activation']!r} is not "
                             f"supported ({', '.join(SUPPORTED_ACTIVATIONS)})")
        if d_model % n_head:
            raise ValueError(f"{source}: n_embd={d_model} is not divisible by n_head={n_head}")
        tied = bool(hf.get("tie_word_embeddings", model_type == "gpt2"))
        if model_type == "gpt2":
            if not tied:
                raise ValueError(f"{source}: tie_word_embeddings=False is not supported for gpt2")
            cfg.update(rotary_dim=None, parallel_residual=False, tied_lm_head=True)
        else:
            if tied:
                raise ValueError(f"{source}: tie_word_embeddings=True is not supported for gptj")
            # Absent: GPTJConfig's default 64 (what transformers computes); null: the whole
            # head (transformers 4 rotates all of it, which only works with one head).
            rotary_dim = hf.get("rotary_dim", 64) or d_model // n_head
            if rotary_dim % 2 or rotary_dim > d_model // n_head:
                raise ValueError(f"{source}: rotary_dim={rotary_dim} must be even and at most "
                                 f"the head size {d_model // n_head}")
            cfg.update(rotary_dim=int(rotary_dim), parallel_residual=True, tied_lm_head=False)
        known = {"vocab_size", "n_positions", "n_embd", "n_layer", "n_head", "n_inner",
                 "activation_function", "layer_norm_epsilon", "rotary_dim"}
        known |= set(_REQUIRED[model_type]) | _IGNORED
        # Other attributes (generic generation settings and the like) do not change the maths;
        # they are kept so that export writes them back.
        extra = tuple(sorted((k, _freeze(v)) for k, v in hf.items()
                             if k not in known and k != "model_type"))
        return cls(**cfg, extra=extra)

    def to_hf(self) -> dict[str, Any]:
        """The HF ``config.json`` dict (loadable by ``transformers.AutoConfig``)."""
        out: dict[str, Any] = {k: _thaw(v) for k, v in self.extra}
        out.update(
            model_type=self.model_type, vocab_size=self.vocab_size,
            n_positions=self.n_positions, n_embd=self.d_model, n_layer=self.n_layer,
            n_head=self.n_head, n_inner=self.d_mlp, activation_function=self.activation,
            layer_norm_epsilon=self.layer_norm_epsilon, tie_word_embeddings=self.tied_lm_head,
            bos_token_id=50256, eos_token_id=50256,
        )
        if self.model_type == "gpt2":
            out.update(architectures=["GPT2LMHeadModel"], scale_attn_weights=True,
                       scale_attn_by_inverse_layer_idx=False, add_cross_attention=False)
        else:
            out.update(architectures=["GPTJForCausalLM"], rotary_dim=self.rotary_dim)
        return out


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
