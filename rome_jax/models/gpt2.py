"""GPT-2 <-> HF ``GPT2LMHeadModel`` weight names.

HF GPT-2 uses Conv1D layers whose weights are already stored ``[in, out]``, our orientation, so no
transposes are needed; the fused ``c_attn`` [D, 3D] is split into q, k, v. The LM head is tied to
``wte``. Names may carry a ``transformer.`` prefix (saved by ``transformers``) or not (the original
OpenAI conversion); ``hf.py`` strips it before calling ``import_weights``.
"""

from __future__ import annotations

from typing import Callable

import jax.numpy as jnp

from rome_jax.models.config import ModelConfig
from rome_jax.models.transformer import Params

# Tensors HF checkpoints may hold that carry no weights of their own.
IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias", "lm_head.weight")
# Flax checkpoints (models/flax_checkpoint.py): Embed tables, LayerNorm scales; Flax GPT-2
# reuses wte as its head (no lm_head).
FLAX_EMBEDDINGS, FLAX_NORM, FLAX_LM_HEAD = ("wte.weight", "wpe.weight"), "scale", None


def import_weights(read: Callable[[str, tuple], jnp.ndarray], cfg: ModelConfig) -> Params:
    """Build params from HF tensors; ``read(name, shape)`` returns the checked tensor."""
    D, F = cfg.d_model, cfg.d_mlp

    def stack(name: str, shape: tuple) -> jnp.ndarray:
        return jnp.stack([read(f"h.{i}.{name}", shape) for i in range(cfg.n_layer)])

    def norm(name: str) -> dict:
        return {"scale": stack(f"{name}.weight", (D,)), "bias": stack(f"{name}.bias", (D,))}

    qkv_w = stack("attn.c_attn.weight", (D, 3 * D))
    qkv_b = stack("attn.c_attn.bias", (3 * D,))
    attn = {name: {"w": qkv_w[:, :, j * D:(j + 1) * D], "b": qkv_b[:, j * D:(j + 1) * D]}
            for j, name in enumerate("qkv")}
    attn["o"] = {"w": stack("attn.c_proj.weight", (D, D)), "b": stack("attn.c_proj.bias", (D,))}
    return {
        "wte": read("wte.weight", (cfg.vocab_size, D)),
        "wpe": read("wpe.weight", (cfg.n_positions, D)),
        "blocks": {
            "ln_1": norm("ln_1"), "ln_2": norm("ln_2"), "attn": attn,
            "mlp": {"fc_in": {"w": stack("mlp.c_fc.weight", (D, F)),
                              "b": stack("mlp.c_fc.bias", (F,))},
                    "fc_out": {"w": stack("mlp.c_proj.weight", (F, D)),
                               "b": stack("mlp.c_proj.bias", (D,))}},
        },
        "ln_f": {"scale": read("ln_f.weight", (D,)), "bias": read("ln_f.bias", (D,))},
    }


def export_weights(params: Params, cfg: ModelConfig) -> dict[str, jnp.ndarray]:
    """HF tensor name (with the ``transformer.`` prefix) -> array."""
    b = params["blocks"]
    out = {"transformer.wte.weight": params["wte"], "transformer.wpe.weight": params["wpe"],
           "transformer.ln_f.weight": params["ln_f"]["scale"],
           "transformer.ln_f.bias": params["ln_f"]["bias"]}
    for i in range(cfg.n_layer):
        pre = f"transformer.h.{i}."
        attn = b["attn"]
        out.update({
            pre + "ln_1.weight": b["ln_1"]["scale"][i], pre + "ln_1.bias": b["ln_1"]["bias"][i],
            pre + "ln_2.weight": b["ln_2"]["scale"][i], pre + "ln_2.bias": b["ln_2"]["bias"][i],
            pre + "attn.c_attn.weight": jnp.concatenate([attn[n]["w"][i] for n in "qkv"], -1),
            pre + "attn.c_attn.bias": jnp.concatenate([attn[n]["b"][i] for n in "qkv"], -1),
            pre + "attn.c_proj.weight": attn["o"]["w"][i], pre + "attn.c_proj.bias": attn["o"]["b"][i],
            pre + "mlp.c_fc.weight": b["mlp"]["fc_in"]["w"][i],
            pre + "mlp.c_fc.bias": b["mlp"]["fc_in"]["b"][i],
            pre + "mlp.c_proj.weight": b["mlp"]["fc_out"]["w"][i],
            pre + "mlp.c_proj.bias": b["mlp"]["fc_out"]["b"][i],
        })
    return out
