"""What every batch closed form reports about its low-rank update Δw = left @ right.

Orientation as the model: ``out = k @ w + b`` with w [F, D]; a batch of B requests has keys
K [B, F] (rows) and residuals R [B, D] (targets minus current outputs); left [F, B] and
right = R [B, D] (for MEMIT, EMMET and AlphaEdit, as for ROME's value_delta). Nothing here
forms the [F, D] matrix:

    ‖Δw‖_F² = Σ (leftᵀ left) ⊙ (R Rᵀ)      (two [B, B] Gram matrices)
    fit_error_i = ‖k_i Δw − r_i‖ = ‖((K left) R − R)_i‖

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


def low_rank_diagnostics(keys: jax.Array, left: jax.Array, residual: jax.Array
                         ) -> LowRankDiagnostics:
    """keys [B, F] (where the targets are asked), left [F, B], residual R [B, D] (= right);
    O(B²(F + D)) work."""
    gram = jnp.sum((left.T @ left) * (residual @ residual.T))
    fit = (keys @ left) @ residual - residual
    return LowRankDiagnostics(jnp.linalg.norm(residual, axis=-1),
                              jnp.sqrt(jnp.maximum(gram, 0)), jnp.linalg.norm(fit, axis=-1))
