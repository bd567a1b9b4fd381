"""v* = v_init + δ: the MLP output that makes the model say ``target_new`` (ROME's compute_v).

Batch rows: one per context template, ``template(prompt) + target[:-1]``, then one KL row,
``"{subject} is a"``. δ is added to the MLP output of the edit layer at each row's lookup token;
the loss, minimised by Adam for at most ``v_num_grad_steps`` steps (stopping early below
``early_stop_loss``), is

    NLL(target | every template)  +  kl_factor · KL(p_δ || p_0) at the KL row's lookup token
    + v_weight_decay · ‖δ‖ / ‖v_init‖²,

with δ projected after each step onto the ball ‖δ‖ ≤ clamp_norm_factor · ‖v_init‖. (MEMIT measures
both against the residual stream leaving the layer instead of v_init: ``norm_reference``. Adding
δ to the MLP output is adding it to that residual stream, MEMIT's z.) The residual
entering the edit layer, and the attention keys and values of the positions before each row's
lookup token at every layer ≥ layer, are computed once (δ cannot change them: attention is
causal). Inside the loop only the live positions (lookup token onwards) of blocks ≥ layer run,
with logits only at the target positions. The whole loop is one ``lax.while_loop``.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from rome_jax.models.config import ModelConfig
from rome_jax.models.transformer import (Context, Params, blocks_kv, forward_live, make_context,
                                         widened)


class VBatch(NamedTuple):
    """ids, mask [R, T]; lookup [R]; target_pos, target_ids, target_mask [R, P];
    live_index, live_mask [R, W]: the positions ``lookup + j`` that δ can change.

    Rows 0..R-2 are the templates (row 0 the plain prompt), row R-1 the KL prompt, whose
    target_mask is 0 and whose target_pos all point at its lookup token."""

    ids: jax.Array
    mask: jax.Array
    lookup: jax.Array
    target_pos: jax.Array
    target_ids: jax.Array
    target_mask: jax.Array
    live_index: jax.Array
    live_mask: jax.Array


class VResult(NamedTuple):
    """v_star, v_init, delta [D]; losses [steps] (NaN after the stop); steps run; the final
    NLL / KL / decay terms."""

    v_star: jax.Array
    v_init: jax.Array
    delta: jax.Array
    losses: jax.Array
    steps: jax.Array
    nll: jax.Array
    kl: jax.Array
    decay: jax.Array


def live_context(params: Params, config: ModelConfig, layer: int, batch: VBatch,
                 residual: jax.Array) -> tuple[Context, jax.Array, jax.Array]:
    """Positions and attention bias of the live positions, and the fixed keys/values.

    A live query j of row r attends to cached positions p < lookup[r] (real tokens) and to live
    positions j' <= j. Returns (Context [R, W], past_k, past_v [L - layer, R, T, H, hd]).
    """
    full = make_context(batch.ids.shape, batch.mask, residual.dtype)
    _, past_k, past_v = blocks_kv(params, config, residual, full, layer)
    seq, width = batch.ids.shape[1], batch.live_index.shape[1]
    past_ok = (jnp.arange(seq)[None, :] < batch.lookup[:, None]) & (batch.mask > 0)
    live_ok = jnp.tril(jnp.ones((width, width), bool))[None] & (batch.live_mask[:, None, :] > 0)
    allowed = jnp.concatenate(
        [jnp.broadcast_to(past_ok[:, None, :], (len(past_ok), width, seq)), live_ok], -1)
    bias = jnp.where(allowed, 0.0, jnp.finfo(residual.dtype).min).astype(residual.dtype)
    positions = jnp.take_along_axis(full.positions, batch.live_index, axis=1)
    key_positions = jnp.concatenate([full.positions, positions], -1)     # a sliding window's
    return Context(positions, bias[:, None], key_positions), past_k, past_v


def optimize_v(params: Params, config: ModelConfig, layer: int, batch: VBatch,
               residual: jax.Array, v_init: jax.Array, *, steps: int, lr, weight_decay,
               kl_factor, clamp_norm_factor, early_stop_loss,
               norm_reference: jax.Array | None = None) -> VResult:
    """Run ROME's δ optimisation (traceable; ``steps`` is static). residual [R, T, D] is the
    stream entering ``layer``; v_init [D] the MLP output at row 0's lookup token;
    ``norm_reference`` [D] the vector whose norm scales the clamp and the decay (default v_init,
    ROME's; MEMIT's is the residual stream leaving ``layer`` there).

    Precision: the forward runs in the params' dtype (δ is cast to it where it is added); δ,
    v_init, v*, the loss and Adam's state are float32 (``widened``) whatever that dtype."""
    v_init = widened(v_init)
    if norm_reference is not None:
        norm_reference = widened(norm_reference)

    live_ctx, past_k, past_v = live_context(params, config, layer, batch, residual)
    h_live = jnp.take_along_axis(residual, batch.live_index[:, :, None], axis=1)
    at_lookup = (jnp.arange(batch.live_index.shape[1]) == 0)[None, :, None]   # live j = 0
    live_targets = batch.target_pos - batch.lookup[:, None]

    def logprobs(delta):
        logits = forward_live(params, config, layer, h_live, live_ctx, past_k, past_v,
                              (at_lookup * delta).astype(h_live.dtype), live_targets)
        return jax.nn.log_softmax(widened(logits), axis=-1)     # [R, P, V]

    kl_init = jax.lax.stop_gradient(logprobs(jnp.zeros_like(v_init))[-1, 0])
    v_norm_sq = jnp.sum(jnp.square(v_init if norm_reference is None else norm_reference))
    n_target = batch.target_mask[0].sum()

    def loss_fn(delta):
        logp = logprobs(delta)
        token_logp = jnp.take_along_axis(logp, batch.target_ids[..., None], axis=-1)[..., 0]
        nll = -(token_logp * batch.target_mask).sum(1)[:-1].mean() / n_target
        kl_logp = logp[-1, 0]
        kl = kl_factor * jnp.sum(jnp.exp(kl_logp) * (kl_logp - kl_init))
        decay = weight_decay * optax.safe_norm(delta, 0.0) / v_norm_sq  # grad 0 at δ = 0
        return nll + kl + decay, (nll, kl, decay)

    optimizer = optax.adam(lr)
    max_norm = clamp_norm_factor * jnp.sqrt(v_norm_sq)
    nan = jnp.full((steps,), jnp.nan, jnp.float32)
    zero = jnp.zeros((), jnp.float32)

    def body(state):
        it, delta, opt_state, losses, _, _ = state
        (loss, terms), grad = jax.value_and_grad(loss_fn, has_aux=True)(delta)
        stop = (loss < early_stop_loss) | (it == steps - 1)
        updates, new_opt_state = optimizer.update(grad, opt_state, delta)
        stepped = delta + updates
        norm = jnp.linalg.norm(stepped)
        stepped = jnp.where(norm > max_norm, stepped * (max_norm / norm), stepped)
        delta = jnp.where(stop, delta, stepped)
        opt_state = jax.tree.map(lambda new, old: jnp.where(stop, old, new), new_opt_state,
                                 opt_state)
        return it + 1, delta, opt_state, losses.at[it].set(loss), stop, jnp.stack(terms)

    delta0 = jnp.zeros_like(v_init)
    state = (jnp.zeros((), jnp.int32), delta0, optimizer.init(delta0), nan,
             jnp.zeros((), bool), jnp.stack([zero, zero, zero]))
    it, delta, _, losses, _, terms = jax.lax.while_loop(lambda s: ~s[4], body, state)
    return VResult(v_init + delta, v_init, delta, losses, it, terms[0], terms[1], terms[2])
