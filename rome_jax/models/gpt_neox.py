"""GPT-NeoX (Pythia) <-> HF ``GPTNeoXForCausalLM`` weight names.

HF GPT-NeoX uses ``nn.Linear`` layers stored ``[out, in]``: every dense weight is transposed on
the way in and out. ``attention.query_key_value`` fuses q, k, v per head: its 3D output rows are
[H, 3, hd] (head h's q rows, then its k rows, then its v rows), split on import and interleaved
again on export. ``input_layernorm`` is our ``ln_1``, ``post_attention_layernorm`` our ``ln_2``
(LayerNorms with bias); the MLP is ``dense_h_to_4h`` -> act -> ``dense_4h_to_h`` (ROME's W; its
key is the input of ``dense_4h_to_h``); ``embed_out`` is the LM head (no bias), read only when
untied.
"""

from __future__ import annotations

from typing import Callable

import jax.numpy as jnp

from rome_jax.models.config import ModelConfig
from rome_jax.models.transformer import Params

IGNORED_SUFFIXES = (".attention.bias", ".attention.masked_bias", ".rotary_emb.inv_freq",
                    "embed_out.weight")
_NORMS = {"ln_1": "input_layernorm", "ln_2": "post_attention_layernorm"}
_MLP = {"fc_in": "dense_h_to_4h", "fc_out": "dense_4h_to_h"}


def import_weights(read: Callable[[str, tuple], jnp.ndarray], cfg: ModelConfig) -> Params:
    """Build params from HF tensors; ``read(name, shape)`` returns the checked tensor."""
    D, F, V, H, hd = cfg.d_model, cfg.d_mlp, cfg.vocab_size, cfg.n_head, cfg.head_dim
    L = cfg.n_layer

    def stack(name: str, shape: tuple) -> jnp.ndarray:
        return jnp.stack([read(f"gpt_neox.layers.{i}.{name}", shape) for i in range(L)])

    def linear(name: str, d_in: int, d_out: int, bias: bool = True) -> dict:
        out = {"w": stack(f"{name}.weight", (d_out, d_in)).transpose(0, 2, 1)}
        if bias:
            out["b"] = stack(f"{name}.bias", (d_out,))
        return out

    def norm(name: str) -> dict:
        return {"scale": stack(f"{name}.weight", (D,)), "bias": stack(f"{name}.bias", (D,))}

    qkv_w = stack("attention.query_key_value.weight", (3 * D, D)).reshape(L, H, 3, hd, D)
    attn = {name: {"w": qkv_w[:, :, j].reshape(L, H * hd, D).transpose(0, 2, 1)}
            for j, name in enumerate("qkv")}
    if cfg.attention_bias:
        qkv_b = stack("attention.query_key_value.bias", (3 * D,)).reshape(L, H, 3, hd)
        for j, name in enumerate("qkv"):
            attn[name]["b"] = qkv_b[:, :, j].reshape(L, H * hd)
    attn["o"] = linear("attention.dense", D, D, cfg.attention_out_bias)
    params = {
        "wte": read("gpt_neox.embed_in.weight", (V, D)),
        "blocks": {
            **{ours: norm(hf) for ours, hf in _NORMS.items()},
            "attn": attn,
            "mlp": {"fc_in": linear("mlp.dense_h_to_4h", D, F),
                    "fc_out": linear("mlp.dense_4h_to_h", F, D)},
        },
        "ln_f": {"scale": read("gpt_neox.final_layer_norm.weight", (D,)),
                 "bias": read("gpt_neox.final_layer_norm.bias", (D,))},
    }
    if not cfg.tied_lm_head:
        params["lm_head"] = {"w": read("embed_out.weight", (V, D)).T}
    return params


def export_weights(params: Params, cfg: ModelConfig) -> dict[str, jnp.ndarray]:
    """HF tensor name -> array ([out, in] for every dense weight)."""
    b, H, hd, D = params["blocks"], cfg.n_head, cfg.head_dim, cfg.d_model
    attn = b["attn"]
    out = {"gpt_neox.embed_in.weight": params["wte"],
           "gpt_neox.final_layer_norm.weight": params["ln_f"]["scale"],
           "gpt_neox.final_layer_norm.bias": params["ln_f"]["bias"]}
    if not cfg.tied_lm_head:
        out["embed_out.weight"] = params["lm_head"]["w"].T
    for i in range(cfg.n_layer):
        pre = f"gpt_neox.layers.{i}."
        for ours, hf in _NORMS.items():
            out[pre + f"{hf}.weight"] = b[ours]["scale"][i]
            out[pre + f"{hf}.bias"] = b[ours]["bias"][i]
        # [D, H*hd] each -> [H, 3, hd, D] -> [3D, D]
        qkv = jnp.stack([attn[n]["w"][i].T.reshape(H, hd, D) for n in "qkv"], axis=1)
        out[pre + "attention.query_key_value.weight"] = qkv.reshape(3 * D, D)
        if "b" in attn["q"]:
            out[pre + "attention.query_key_value.bias"] = jnp.stack(
                [attn[n]["b"][i].reshape(H, hd) for n in "qkv"], axis=1).reshape(3 * D)
        out[pre + "attention.dense.weight"] = attn["o"]["w"][i].T
        if "b" in attn["o"]:
            out[pre + "attention.dense.bias"] = attn["o"]["b"][i]
        for ours, hf in _MLP.items():
            out[pre + f"mlp.{hf}.weight"] = b["mlp"][ours]["w"][i].T
            out[pre + f"mlp.{hf}.bias"] = b["mlp"][ours]["b"][i]
    return out
