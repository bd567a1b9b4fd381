"""EMMET's closed form at one layer (Gupta et al., "A Unified Framework for Model Editing";
scalable-model-editing/unified-model-editing ``emmet/emmet_main.py``): ROME's
equality-constrained update for a whole batch.

Orientation as the model (``out = k @ w + b``, w [F, D]). Each request i asks
``k_b,i @ (w + Δw) + b = v_i`` while Δw stays small in C's metric; with ROME's key conventions
the update's directions come from keys_a and the constraints hold at keys_b:

    U = C⁻¹ K_aᵀ [F, B],   G = K_b U [B, B]  (G[j, i] = k_b,j · C⁻¹ k_a,i),
    Δw = U (G + λ_E I)⁻¹ R = left @ right,  left = U (G + λ_E I)⁻¹ [F, B],  right = R [B, D],

R = V − (K_b w + b). Then K_b Δw = G (G + λ_E I)⁻¹ R: every constraint holds exactly for
λ_E = 0; λ_E > 0 trades them for stability when G is ill-conditioned. Conventions (as
``rome_jax.editors.rome``): c-rome a = b = k̄; p-rome a = b = k^u; rome a = k̄, b = k^u. For
B = 1, G is ROME's denominator uᵀk_b and Δw is ``rank_one_update``'s.

Where λ_E enters, as the original: its D = Kᵀ C'⁻¹ K is G (keys_a = keys_b = the template
averaged keys: the c-rome convention only), and ``emmet_lambda``·I is added to D only when the
batch has more than one request (``if D.shape[0] > 1``); so here ``lam`` is ignored for B = 1.
Its R is MEMIT's (z minus the last edit layer's output at the bare prompt), not W k̄ + b.
The original's C' = ``mom2_update_weight``·C + ``update_norm_lambda``·I: pass the Cholesky
factor of that matrix to match it (λ_E then acts as λ_E·mom2_update_weight against the
unscaled C's G). The original inverts C' and D explicitly in float64 (pinv if that fails);
here: C⁻¹ by the Cholesky factor (``rome_jax.rome.stats.solve``), G + λ_E I by Cholesky when
keys_a and keys_b are one array (G symmetric positive definite; keys_b None or the same
object), else by LU (``jnp.linalg.solve``). Dtype follows the inputs.

Diagnostics: G's smallest eigenvalue (symmetric case; its smallest singular value otherwise)
and condition number, λ_E not included: the batch's denominator, whose collapse toward 0 is
ROME's collapse in batch form.

Pinned by tests/test_batch_closed_forms.py: every constraint met when G is well conditioned
(λ_E = 0, both symmetric and mixed keys); one request equals ``rank_one_update`` in the rome,
c-rome and p-rome conventions; Δw matches a float64 NumPy solve with λ_E > 0.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from rome_jax.editors.lowrank import LowRankDiagnostics, low_rank_diagnostics
from rome_jax.rome.stats import solve


class EmmetDiagnostics(NamedTuple):
    """update: ‖r_i‖, ‖Δw‖_F, ‖k_b,i Δw − r_i‖ (LowRankDiagnostics); denominator_min: G's
    smallest eigenvalue (symmetric G) or singular value (mixed keys); denominator_condition:
    G's condition number (inf when its smallest eigenvalue is ≤ 0). For B = 1 and symmetric
    keys denominator_min is ROME's uᵀk."""

    update: LowRankDiagnostics
    denominator_min: jax.Array
    denominator_condition: jax.Array


def emmet_factors(keys_a: jax.Array, keys_b: jax.Array | None, residual: jax.Array,
                  factor: jax.Array, lam) -> tuple[jax.Array, jax.Array, EmmetDiagnostics]:
    """keys_a [B, F] (directions), keys_b [B, F] or None (= keys_a; constraint keys),
    residual R [B, D] = V − (K_b w + b), factor [F, F] lower Cholesky of C, lam λ_E ≥ 0
    (scalar; unused for B = 1, as the original).

    Returns (left [F, B], right [B, D], EmmetDiagnostics); Δw = left @ right. Pure, traceable.
    """
    symmetric = keys_b is None or keys_b is keys_a
    keys_b = keys_a if keys_b is None else keys_b
    u = solve(factor, keys_a)                       # [B, F]: row i is C⁻¹ k_a,i
    g = keys_b @ u.T                                # [B, B]
    n = g.shape[0]
    reg = g if n == 1 else g + jnp.asarray(lam, g.dtype) * jnp.eye(n, dtype=g.dtype)
    if symmetric:
        g = (g + g.T) / 2
        reg = (reg + reg.T) / 2
        # u holds Uᵀ; left = U reg⁻¹ = (reg⁻¹ Uᵀ)ᵀ for a symmetric reg
        left = jax.scipy.linalg.cho_solve((jnp.linalg.cholesky(reg), True), u).T
        spectrum = jnp.linalg.eigvalsh(g)
        smallest, largest = spectrum[0], spectrum[-1]
    else:
        left = jnp.linalg.solve(reg.T, u).T          # U reg⁻¹ = (reg⁻ᵀ Uᵀ)ᵀ
        spectrum = jnp.linalg.svd(g, compute_uv=False)
        smallest, largest = spectrum[-1], spectrum[0]
    condition = jnp.where(smallest > 0, largest / smallest, jnp.inf)
    return left, residual, EmmetDiagnostics(
        low_rank_diagnostics(keys_b, left, residual), smallest, condition)
