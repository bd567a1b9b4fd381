"""Phi-3 <-> HF ``Phi3ForCausalLM`` weight names: Llama's (``llama.py``), except that q, k, v are
fused into ``self_attn.qkv_proj`` ([H*hd + 2 KV*hd, D]: the q rows, then k, then v) and gate, up
into ``mlp.gate_up_proj`` ([2F, D]: gate rows, then up). They are split on import, so the params,
the forward, ROME's W (``down_proj``) and its key (the input of ``down_proj``) are Llama's, and
fused again on export. Phi-3 has no biases.
"""

from __future__ import annotations

import re
from typing import Callable

import jax.numpy as jnp

from rome_jax.models import llama
from rome_jax.models.config import ModelConfig
from rome_jax.models.transformer import Params

IGNORED_SUFFIXES = llama.IGNORED_SUFFIXES
_LAYER = re.compile(r"(model\.layers\.\d+\.)(.+)")


def _fused(cfg: ModelConfig) -> dict[str, tuple[str, tuple[str, ...], tuple[int, ...]]]:
    """HF fused name -> (its Llama parts, in row order; their row counts)."""
    q, kv, F = cfg.n_head * cfg.head_dim, cfg.n_kv_head * cfg.head_dim, cfg.d_mlp
    return {"self_attn.qkv_proj.weight": (
                ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"),
                (q, kv, kv)),
            "mlp.gate_up_proj.weight": (("mlp.gate_proj.weight", "mlp.up_proj.weight"), (F, F))}


def import_weights(read: Callable[[str, tuple], jnp.ndarray], cfg: ModelConfig) -> Params:
    """Build params from HF tensors; ``read(name, shape)`` returns the checked tensor."""
    part_of = {}  # Llama name suffix -> (fused suffix, first row, rows)
    for fused, (parts, rows) in _fused(cfg).items():
        start = 0
        for part, n in zip(parts, rows):
            part_of[part] = (fused, start, n)
            start += n
    loaded: dict[str, jnp.ndarray] = {}  # each fused tensor is read (and checked) once

    def read_part(name: str, shape: tuple) -> jnp.ndarray:
        match = _LAYER.fullmatch(name)
        if not match or match[2] not in part_of:
            return read(name, shape)
        fused, start, n = part_of[match[2]]
        full_name = match[1] + fused
        if full_name not in loaded:
            loaded[full_name] = read(full_name, (sum(_fused(cfg)[fused][1]), cfg.d_model))
        return loaded[full_name][start:start + n]

    return llama.import_weights(read_part, cfg)


def export_weights(params: Params, cfg: ModelConfig) -> dict[str, jnp.ndarray]:
    """HF tensor name -> array ([out, in] for every dense weight)."""
    out = llama.export_weights(params, cfg)
    for i in range(cfg.n_layer):
        pre = f"model.layers.{i}."
        for fused, (parts, _) in _fused(cfg).items():
            out[pre + fused] = jnp.concatenate([out.pop(pre + part) for part in parts], axis=0)
    return out
