"""Llama <-> HF ``LlamaForCausalLM`` weight names; also Qwen2, Qwen3, Mistral and Gemma 2 / 3,
which name their weights as Llama does (Gemma with four norms per layer, ``_GEMMA_NORMS``).

HF Llama uses ``nn.Linear`` layers stored ``[out, in]``: every dense weight is transposed on the
way in and out. Biases exist only with ``attention_bias`` (q, k, v), ``attention_out_bias`` (o)
and ``mlp_bias`` (gate, up, down). RMSNorms have a weight only; Qwen3 adds
``self_attn.q_norm`` / ``k_norm`` ([head_dim]). ``lm_head.weight`` is read and written only for an
untied head; a tied checkpoint may still carry a copy of the embedding there, which is ignored.
"""

from __future__ import annotations

from typing import Callable

import jax.numpy as jnp

from rome_jax.models.config import ModelConfig
from rome_jax.models.transformer import Params

# Tensors HF checkpoints may hold that carry no weights of their own.
IGNORED_SUFFIXES = (".rotary_emb.inv_freq", "lm_head.weight")
# Flax checkpoints (models/flax_checkpoint.py): Embed table, RMSNorm weights, and a head that
# Flax Llama always has (a copy of the embedding when tied).
FLAX_EMBEDDINGS, FLAX_NORM = ("embed_tokens.weight",), "weight"
FLAX_LM_HEAD = "model.embed_tokens.weight"
_ATTN = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj"}
_MLP = {"gate": "gate_proj", "fc_in": "up_proj", "fc_out": "down_proj"}
_NORMS = {"ln_1": "input_layernorm", "ln_2": "post_attention_layernorm"}
# Gemma's post_attention_layernorm norms the attention output; pre_feedforward_layernorm is ln_2.
_GEMMA_NORMS = {"ln_1": "input_layernorm", "attn_post": "post_attention_layernorm",
                "ln_2": "pre_feedforward_layernorm", "mlp_post": "post_feedforward_layernorm"}
_QK_NORMS = ("q_norm", "k_norm")


def _norms(cfg: ModelConfig) -> dict[str, str]:
    return _GEMMA_NORMS if cfg.sandwich_norm else _NORMS


def _shapes(cfg: ModelConfig) -> dict[str, tuple[int, int]]:
    """Our dense name -> (in, out)."""
    D, F, q, kv = cfg.d_model, cfg.d_mlp, cfg.n_head * cfg.head_dim, cfg.n_kv_head * cfg.head_dim
    return {"q": (D, q), "k": (D, kv), "v": (D, kv), "o": (q, D),
            "gate": (D, F), "fc_in": (D, F), "fc_out": (F, D)}


def import_weights(read: Callable[[str, tuple], jnp.ndarray], cfg: ModelConfig) -> Params:
    """Build params from HF tensors; ``read(name, shape)`` returns the checked tensor."""
    D, V = cfg.d_model, cfg.vocab_size
    shapes = _shapes(cfg)

    def stack(name: str, shape: tuple) -> jnp.ndarray:
        return jnp.stack([read(f"model.layers.{i}.{name}", shape) for i in range(cfg.n_layer)])

    def linear(ours: str, hf: str, bias: bool) -> dict:  # [out, in] -> [in, out]
        d_in, d_out = shapes[ours]
        out = {"w": stack(f"{hf}.weight", (d_out, d_in)).transpose(0, 2, 1)}
        if bias:
            out["b"] = stack(f"{hf}.bias", (d_out,))
        return out

    params = {
        "wte": read("model.embed_tokens.weight", (V, D)),
        "blocks": {
            **{ours: {"scale": stack(f"{hf}.weight", (D,))} for ours, hf in _norms(cfg).items()},
            "attn": {ours: linear(ours, f"self_attn.{hf}", cfg.attention_out_bias if ours == "o"
                                  else cfg.attention_bias) for ours, hf in _ATTN.items()},
            "mlp": {ours: linear(ours, f"mlp.{hf}", cfg.mlp_bias) for ours, hf in _MLP.items()},
        },
        "ln_f": {"scale": read("model.norm.weight", (D,))},
    }
    if cfg.qk_norm:
        for name in _QK_NORMS:
            params["blocks"]["attn"][name] = {"scale": stack(f"self_attn.{name}.weight",
                                                             (cfg.head_dim,))}
    if not cfg.tied_lm_head:
        params["lm_head"] = {"w": read("lm_head.weight", (V, D)).T}
    return params


def export_weights(params: Params, cfg: ModelConfig) -> dict[str, jnp.ndarray]:
    """HF tensor name -> array ([out, in] for every dense weight)."""
    b = params["blocks"]
    out = {"model.embed_tokens.weight": params["wte"], "model.norm.weight": params["ln_f"]["scale"]}
    if not cfg.tied_lm_head:
        out["lm_head.weight"] = params["lm_head"]["w"].T
    for i in range(cfg.n_layer):
        pre = f"model.layers.{i}."
        for ours, hf in _norms(cfg).items():
            out[pre + f"{hf}.weight"] = b[ours]["scale"][i]
        for group, prefix, names in (("attn", "self_attn", _ATTN), ("mlp", "mlp", _MLP)):
            for ours, hf in names.items():
                layer = b[group][ours]
                out[pre + f"{prefix}.{hf}.weight"] = layer["w"][i].T
                if "b" in layer:
                    out[pre + f"{prefix}.{hf}.bias"] = layer["b"][i]
        if cfg.qk_norm:
            for name in _QK_NORMS:
                out[pre + f"self_attn.{name}.weight"] = b["attn"][name]["scale"][i]
    return out
