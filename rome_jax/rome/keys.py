"""The keys of an edit: k^u (subject in the plain prompt) and k̄ (mean over context templates).

Both are read at the lookup token from one batch, ``[plain prompt, prefixed prompts...]``, whose
rows may carry the target tokens after the prompt: under causal attention they cannot change a
key at or before the subject.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from rome_jax.models.config import ModelConfig
from rome_jax.models.transformer import Params, block, make_context, widened


class Keys(NamedTuple):
    """plain [F] = k^u; mean [F] = k̄ (row 0, the plain prompt, is one of the averaged rows);
    all [N, F]."""

    plain: jax.Array
    mean: jax.Array
    all: jax.Array


def keys_from_residual(params: Params, config: ModelConfig, layer: int, residual: jax.Array,
                       attention_mask: jax.Array, lookup: jax.Array,
                       n_rows: int | None = None) -> Keys:
    """Keys at ``lookup`` [B] from the residual [B, T, D] entering block ``layer``; only the first
    ``n_rows`` rows (the context templates) enter the mean. The keys are computed in the params'
    dtype and returned ``widened`` (float32 at least; the mean taken so), for the closed forms."""
    ctx = make_context(attention_mask.shape, attention_mask, residual.dtype)
    keys = block(jax.tree.map(lambda w: w[layer], params["blocks"]), config, residual, ctx,
                 layer=layer).key
    at = widened(jnp.take_along_axis(keys, lookup[:, None, None], axis=1)[:, 0][:n_rows])
    return Keys(at[0], at.mean(0), at)

