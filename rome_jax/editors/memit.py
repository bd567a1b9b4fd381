"""MEMIT's closed form at one layer (Meng et al. 2023, kmeng01/memit ``memit/memit_main.py``).

In the model's orientation (``out = k @ w + b``, w [F, D]), with the batch's keys K [B, F]
(rows, each averaged over the context templates), residuals R [B, D] and the key moment
C [F, F] (``KeyStats.moment``), MEMIT minimises

    ‖K Δw − R‖²_F + λ tr(Δwᵀ C Δw)        (λ = ``mom2_update_weight``)

whose gradient 2Kᵀ(K Δw − R) + 2λ C Δw vanishes at

    Δw = (λC + KᵀK)⁻¹ Kᵀ R = left @ right,   left = (λC + KᵀK)⁻¹ Kᵀ [F, B],  right = R [B, D].

This is the original's ``adj_k = solve(mom2_update_weight·cov + K Kᵀ, K)``, ``upd = resid @
adj_kᵀ`` transposed (its K is [F, B], its update [D, F] for GPT-J). λC + KᵀK is symmetric
positive definite (C is, λ > 0), so the solve is one Cholesky factorisation and two triangular
solves with B right-hand sides; no inverse is formed. The original solves in float64; here the
dtype follows the inputs. Spreading over layers (R divided by the number of layers left) and
recomputing keys and residuals per layer are the caller's: this is one layer's step. In the
original, K holds the template-averaged keys k̄ at this layer, and R = z − (the last edit
layer's output at the subject's last token of the bare prompt), recomputed after the earlier
layers' updates: a residual-stream target, not this layer's W k̄ + b.

Pinned by tests/test_batch_closed_forms.py: Δw matches a float64 NumPy solve within
c·F·eps·κ(λC + KᵀK), and the objective's gradient at Δw is ≈ 0 relative to its value at 0.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from rome_jax.editors.lowrank import LowRankDiagnostics, low_rank_diagnostics


def memit_factors(keys: jax.Array, residual: jax.Array, moment: jax.Array, weight
                  ) -> tuple[jax.Array, jax.Array, LowRankDiagnostics]:
    """keys [B, F], residual [B, D], moment C [F, F], weight λ > 0 (scalar).

    Returns (left [F, B], right [B, D], LowRankDiagnostics); Δw = left @ right. Pure,
    traceable; a non-positive-definite λC + KᵀK shows as NaN factors.
    """
    moment = jnp.asarray(moment)
    factor = jnp.linalg.cholesky(jnp.asarray(weight, moment.dtype) * moment + keys.T @ keys)
    left = jax.scipy.linalg.cho_solve((factor, True), keys.T)
    return left, residual, low_rank_diagnostics(keys, left, residual)
