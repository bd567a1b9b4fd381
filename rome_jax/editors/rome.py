"""ROME's closed form: the rank-one update in its three key conventions, as an ``Edit``.

With the model's orientation ``out = k @ w + b`` (w [F, D], ROME's W = wᵀ), an edit is
``ŵ = w + key_dir ⊗ value_delta`` (``editors.delta.rank_one``), i.e.
``Ŵ = W + value_delta · key_dirᵀ``, where

    method   u = C⁻¹·ka   residual r = v* − (W kb + b)   key_dir = u / (uᵀ kb)
    rome     ka = k̄      kb = k^u   (the original code: mixed keys)
    c-rome   ka = k̄      kb = k̄     (= r-rome; W k̄ + b is the mean MLP output over templates)
    p-rome   ka = k^u     kb = k^u

For the consistent methods ``ŵᵀ kb + b = v*`` exactly (key_dirᵀ kb = 1). For ``rome`` the
denominator uᵀk^u can approach 0 when k^u is far from k̄ (subject at the first token): that is the
collapse mechanism.

Units: the original code normalises u to unit length (``compute_u`` returns u/‖u‖) and writes
Δ = r (u/‖u‖)ᵀ / (kbᵀu/‖u‖), so the numerator and denominator of the papers' tables ("The Fall
of ROME" Table 1) are ‖r‖ and kbᵀu/‖u‖; here they are reported beside ‖r‖‖u‖ and uᵀkb (the
guard's units). Δ is the same either way.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from rome_jax.editors.delta import rank_one
from rome_jax.models.transformer import widened
from rome_jax.rome.stats import solve

METHODS = ("rome", "c-rome", "r-rome", "p-rome")


def canonical_method(method: str) -> str:
    if method not in METHODS:
        raise ValueError(f"method: {method!r} is not one of {', '.join(METHODS)}")
    return "c-rome" if method == "r-rome" else method


class UpdateDiagnostics(NamedTuple):
    """numerator_norm = ‖r uᵀ‖_F = ‖r‖‖u‖; denominator = uᵀkb; delta_norm = ‖Δ‖_F;
    delta_abs = ‖Δ‖_F / (F·D) (the |Δ| of "The Fall of ROME"); residual_norm = ‖r‖, the papers'
    numerator; denominator_unit_u = kbᵀu/‖u‖ = denominator / ‖u‖, the papers' denominator.
    ‖Δ‖_F = numerator_norm / |denominator| = residual_norm / |denominator_unit_u|."""

    numerator_norm: jax.Array
    denominator: jax.Array
    delta_norm: jax.Array
    delta_abs: jax.Array
    residual_norm: jax.Array
    denominator_unit_u: jax.Array


def rank_one_update(w: jax.Array, b: jax.Array, factor: jax.Array, key_plain: jax.Array,
                    key_mean: jax.Array, v_star: jax.Array, method: str, layer: int = 0):
    """The update for w [F, D], b [D], Cholesky factor of C [F, F], keys [F], v* [D].

    Returns (Edit of rank one at ``layer``, UpdateDiagnostics). Pure and traceable; ``method``
    is static. Computed in float32 or the widest dtype of the inputs if wider (bfloat16 /
    float16 weights are widened): the solve, the residual and both factors.
    """
    method = canonical_method(method)
    w, b, factor, key_plain, key_mean, v_star = map(widened, (w, b, factor, key_plain,
                                                            key_mean, v_star))
    key_a = key_plain if method == "p-rome" else key_mean
    key_b = key_mean if method == "c-rome" else key_plain
    u = solve(factor, key_a)
    denominator = u @ key_b
    residual = v_star - (key_b @ w + b)
    key_dir = u / denominator
    u_norm = jnp.linalg.norm(u)
    numerator_norm = jnp.linalg.norm(residual) * u_norm
    delta_norm = numerator_norm / jnp.abs(denominator)
    diagnostics = UpdateDiagnostics(numerator_norm, denominator, delta_norm,
                                    delta_norm / (w.shape[0] * w.shape[1]),
                                    jnp.linalg.norm(residual), denominator / u_norm)
    return rank_one(key_dir, residual, layer), diagnostics
