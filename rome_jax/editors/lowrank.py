"""What every batch closed form reports about its low-rank update Δw = left @ right.

Orientation as the model: ``out = k @ w + b`` with w [F, D]; a batch of B requests has keys
K [B, F] (rows) and residuals R [B, D] (targets minus current outputs); left [F, B],
right [B, D] (right = R for MEMIT, EMMET and AlphaEdit). Nothing here forms the [F, D] matrix:

    ‖Δw‖_F² = Σ (leftᵀ left) ⊙ (right rightᵀ)      (two [B, B] Gram matrices)
    fit_error_i = ‖k_i Δw − r_i‖ = ‖((K left) right − R)_i‖

``fit_error`` is how far the update falls short of each target at this layer: 0 for EMMET with
λ_E = 0 (its constraints), > 0 by design for MEMIT and AlphaEdit (least squares).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


class LowRankDiagnostics(NamedTuple):
    """residual_norm [B] = ‖r_i‖; delta_norm [] = ‖Δw‖_F; fit_error [B] = ‖k_i Δw − r_i‖."""

    residual_norm: jax.Array
    delta_norm: jax.Array
    fit_error: jax.Array


def low_rank_diagnostics(keys: jax.Array, left: jax.Array, right: jax.Array,
                         residual: jax.Array) -> LowRankDiagnostics:
    """keys [B, F], left [F, B'], right [B', D], residual [B, D]; O(B²(F + D)) work."""
    gram = jnp.sum((left.T @ left) * (right @ right.T))
    fit = (keys @ left) @ right - residual
    return LowRankDiagnostics(jnp.linalg.norm(residual, axis=-1),
                              jnp.sqrt(jnp.maximum(gram, 0)), jnp.linalg.norm(fit, axis=-1))
