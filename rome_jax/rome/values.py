"""v* = v_init + δ: the MLP output that makes the model say ``target_new`` (ROME's compute_v).

Batch rows: one per context template, ``template(prompt) + target[:-1]``, then one KL row,
``"{subject} is a"``. δ is added to the MLP output of the edit layer at each row's lookup token;
the loss, minimised by Adam for at most ``v_num_grad_steps`` steps (stopping early below
``early_stop_loss``), is

    NLL(target | every template)  +  kl_factor · KL(p_δ || p_0) at the KL row's lookup token
    + v_weight_decay · ‖δ‖ / ‖v_init‖²,

with δ projected after each step onto the ball ‖δ‖ ≤ clamp_norm_factor · ‖v_init‖. The residual
entering the edit layer is computed once; only blocks ≥ layer run inside the loop, with logits
only at the target positions. The whole loop is one ``lax.while_loop`` on the device.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from rome_jax.models.config import ModelConfig
from rome_jax.models.transformer import Params, forward


class VBatch(NamedTuple):
    """ids, mask [R, T]; lookup [R]; target_pos, target_ids, target_mask [R, P].

    Rows 0..R-2 are the templates (row 0 the plain prompt), row R-1 the KL prompt, whose
    target_mask is 0 and whose target_pos all point at its lookup token."""

    ids: jax.Array
    mask: jax.Array
    lookup: jax.Array
    target_pos: jax.Array
    target_ids: jax.Array
    target_mask: jax.Array


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


def optimize_v(params: Params, config: ModelConfig, layer: int, batch: VBatch,
               residual: jax.Array, v_init: jax.Array, *, steps: int, lr, weight_decay,
               kl_factor, clamp_norm_factor, early_stop_loss) -> VResult:
    """Run ROME's δ optimisation (traceable; ``steps`` is static). residual [R, T, D] is the
    stream entering ``layer``; v_init [D] the MLP output at row 0's lookup token."""

    def logprobs(delta):
        logits = forward(params, config, batch.ids, batch.mask, layer=layer,
                         token_index=batch.lookup, mlp_delta=delta, residual=residual,
                         logit_positions=batch.target_pos).logits
        return jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)     # [R, P, V]

    kl_init = jax.lax.stop_gradient(logprobs(jnp.zeros_like(v_init))[-1, 0])
    v_norm_sq = jnp.sum(jnp.square(v_init))
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
