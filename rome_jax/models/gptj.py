"""GPT-J <-> HF ``GPTJForCausalLM`` weight names.

HF GPT-J uses ``nn.Linear`` layers stored ``[out, in]``: every dense weight is transposed on the
way in and out. Attention projections have no bias; the LM head is separate and has one.
"""

from __future__ import annotations

from typing import Callable

import jax.numpy as jnp

from rome_jax.models.config import ModelConfig
from rome_jax.models.transformer import Params

IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias")
# Flax checkpoints (models/flax_checkpoint.py): Embed table, LayerNorm scales, untied head.
FLAX_EMBEDDINGS, FLAX_NORM, FLAX_LM_HEAD = ("wte.weight",), "scale", None
_ATTN = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "out_proj"}


def import_weights(read: Callable[[str, tuple], jnp.ndarray], cfg: ModelConfig) -> Params:
    """Build params from HF tensors; ``read(name, shape)`` returns the checked tensor."""
    D, F, V = cfg.d_model, cfg.d_mlp, cfg.vocab_size

    def stack(name: str, shape: tuple) -> jnp.ndarray:
        return jnp.stack([read(f"h.{i}.{name}", shape) for i in range(cfg.n_layer)])

    def linear(name: str, d_in: int, d_out: int) -> dict:  # [out, in] -> [in, out]
        return {"w": stack(f"{name}.weight", (d_out, d_in)).transpose(0, 2, 1),
                "b": stack(f"{name}.bias", (d_out,))}

    attn = {ours: {"w": stack(f"attn.{hf}.weight", (D, D)).transpose(0, 2, 1)}
            for ours, hf in _ATTN.items()}
    return {
        "wte": read("wte.weight", (V, D)),
        "blocks": {
            "ln_1": {"scale": stack("ln_1.weight", (D,)), "bias": stack("ln_1.bias", (D,))},
            "attn": attn,
            "mlp": {"fc_in": linear("mlp.fc_in", D, F), "fc_out": linear("mlp.fc_out", F, D)},
        },
        "ln_f": {"scale": read("ln_f.weight", (D,)), "bias": read("ln_f.bias", (D,))},
        "lm_head": {"w": read("lm_head.weight", (V, D)).T, "b": read("lm_head.bias", (V,))},
    }


def export_weights(params: Params, cfg: ModelConfig) -> dict[str, jnp.ndarray]:
    """HF tensor name -> array ([out, in] for every dense weight)."""
    b = params["blocks"]
    out = {"transformer.wte.weight": params["wte"],
           "transformer.ln_f.weight": params["ln_f"]["scale"],
           "transformer.ln_f.bias": params["ln_f"]["bias"],
           "lm_head.weight": params["lm_head"]["w"].T, "lm_head.bias": params["lm_head"]["b"]}
    for i in range(cfg.n_layer):
        pre = f"transformer.h.{i}."
        out[pre + "ln_1.weight"] = b["ln_1"]["scale"][i]
        out[pre + "ln_1.bias"] = b["ln_1"]["bias"][i]
        for ours, hf in _ATTN.items():
            out[pre + f"attn.{hf}.weight"] = b["attn"][ours]["w"][i].T
        for ours in ("fc_in", "fc_out"):
            out[pre + f"mlp.{ours}.weight"] = b["mlp"][ours]["w"][i].T
            out[pre + f"mlp.{ours}.bias"] = b["mlp"][ours]["b"][i]
    return out
