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
from rome_jax.models.transformer import Params, block, make_context, mlp_key


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
    ``n_rows`` rows (the context templates) enter the mean."""
    ctx = make_context(attention_mask.shape, attention_mask, residual.dtype)
    keys = block(jax.tree.map(lambda w: w[layer], params["blocks"]), config, residual, ctx)[1]
    at = jnp.take_along_axis(keys, lookup[:, None, None], axis=1)[:, 0][:n_rows]
    return Keys(at[0], at.mean(0), at)


_mlp_key = jax.jit(mlp_key, static_argnums=(1, 4))


def compute_keys(model, request, templates, layer: int, fact_token: str = "subject_last",
                 params: Params | None = None) -> Keys:
    """k^u and k̄ of ``request`` (an EditRequest) over ``templates`` (ContextTemplates)."""
    from rome_jax.data import pad_batch
    from rome_jax.rome.request import subject_token_index

    rows, lookup = [], []
    for template in templates.apply(request.prompt):
        ids, index = subject_token_index(model.tokenizer, template, request.subject, fact_token)
        rows.append(ids)
        lookup.append(index)
    ids, mask = pad_batch(rows, model.tokenizer.eos_id)
    at = _mlp_key(model.params if params is None else params, model.config, ids, mask, layer,
                  jnp.asarray(lookup, jnp.int32))
    return Keys(at[0], at.mean(0), at)
