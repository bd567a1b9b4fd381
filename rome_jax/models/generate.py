"""Greedy and top-k sampled generation with an explicit ``jax.random`` key.

Prompts are left-padded into one fixed buffer ``[B, T_prompt + max_new_tokens]``; each step runs
the full forward (no KV cache: the models here are small and generations short) and reads the
logits of the last position only, all inside one ``lax.fori_loop``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from rome_jax.data import bucket, pad_batch
from rome_jax.models.config import ModelConfig
from rome_jax.models.model import Model
from rome_jax.models.transformer import Params, forward


@functools.partial(jax.jit, static_argnames=("config", "n_new", "top_k"))
def _generate(params: Params, config: ModelConfig, ids, mask, key, n_new: int, top_k: int):
    """ids, mask [B, T] left-padded with n_new free slots on the right -> ids [B, T]."""
    width = ids.shape[1]
    start = width - n_new

    def step(t, state):
        ids, mask, key = state
        cur = start + t
        logits = forward(params, config, ids, mask,
                         logit_positions=jnp.full((ids.shape[0], 1), cur - 1)).logits[:, 0]
        if top_k == 1:
            token = jnp.argmax(logits, -1)
        else:
            key, sub = jax.random.split(key)
            top_vals, top_idx = jax.lax.top_k(logits, top_k)
            choice = jax.random.categorical(sub, top_vals, axis=-1)
            token = jnp.take_along_axis(top_idx, choice[:, None], axis=-1)[:, 0]
        ids = ids.at[:, cur].set(token.astype(ids.dtype))
        mask = mask.at[:, cur].set(1)
        return ids, mask, key

    return jax.lax.fori_loop(0, n_new, step, (ids, mask, key))[0]


def generate_ids(model: Model, sequences: list[list[int]], max_new_tokens: int,
                 key: jax.Array | None = None, top_k: int = 1, params: Params | None = None
                 ) -> np.ndarray:
    """The ``max_new_tokens`` new token ids [B, max_new_tokens] after each token sequence
    (already encoded, start token included). ``top_k=1`` (or ``key=None``) is greedy;
    otherwise samples from the top-k logits with ``key``."""
    params = model.params if params is None else params
    pad_id = model.tokenizer.pad_id
    if any(len(e) == 0 for e in sequences):
        raise ValueError("prompts: an empty prompt cannot be continued")
    longest = max(len(e) for e in sequences)
    if longest + max_new_tokens > model.config.n_positions:
        raise ValueError(f"max_new_tokens: prompt + {max_new_tokens} tokens exceed the model's "
                         f"{model.config.n_positions} positions")
    # prompts left-padded to a bucketed width, so that new prompt lengths rarely recompile
    width = min(bucket(longest), model.config.n_positions - max_new_tokens) + max_new_tokens
    ids, mask = pad_batch([list(e) + [pad_id] * max_new_tokens for e in sequences], pad_id,
                          side="left", length=width)
    mask[:, width - max_new_tokens:] = 0
    if key is None:
        top_k = 1
        key = jax.random.key(0)
    out = np.asarray(_generate(params, model.config, ids, mask, key, max_new_tokens, top_k))
    return out[:, width - max_new_tokens:]


def generate(model: Model, prompts: list[str], max_new_tokens: int,
             key: jax.Array | None = None, top_k: int = 1, params: Params | None = None
             ) -> list[str]:
    """Continue each prompt (read as a whole sequence: after the tokenizer's start token, if
    any) by ``max_new_tokens`` tokens; returns only the new text. See ``generate_ids``."""
    tok = model.tokenizer
    new = generate_ids(model, tok.encode_sequences(list(prompts)), max_new_tokens, key, top_k,
                       params)
    return [tok.decode(row) for row in new]
