"""ROME's closed forms as an ``Edit``: the rank-one update in its three key conventions, and
k2-rome's rank-2 update at two keys.

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

``k2-rome`` (two-key ROME, ``two_key_update``) asks both keys at once, with one rank-2 update:
c-rome's constraint at k̄ and a second one at the plain prompt's own key,
ŵᵀ[k̄ k^u] + b = [v̄* v*₀] (v*₀ optimised on the plain prompt alone, on top of c-rome's update:
``rome.edit.solve_plain_core``). It is EMMET's batched closed form (``editors.emmet``) with the
two keys as the batch and λ_E = 0: K = [k̄; k^u] [2, F], G = K C⁻¹ Kᵀ [2, 2],
Δw = C⁻¹Kᵀ G⁻¹ R. Its conditioning is sin²θ = det G / (G₁₁ G₂₂)
= 1 − (k̄ᵀC⁻¹k^u)² / (k̄ᵀC⁻¹k̄ · k^uᵀC⁻¹k^u), the squared sine of the keys' angle in C⁻¹'s
metric; λ_min(G) ≥ sin²θ · min(G₁₁, G₂₂) / 2 and ‖Δw‖_F ≤ ‖R‖_F / √(λ_min(C) λ_min(G)) (the
C-weighted energy of Δw is tr(RᵀG⁻¹R)). Where sin²θ < ``MIN_SIN2`` (k^u nearly along k̄: one
key, nothing to add) the second constraint is dropped and the update is c-rome's, so λ_min(G)
never approaches 0 the way ROME's uᵀk^u does.

Units: the original code normalises u to unit length (``compute_u`` returns u/‖u‖) and writes
Δ = r (u/‖u‖)ᵀ / (kbᵀu/‖u‖), so the numerator and denominator of the papers' tables ("The Fall
of ROME" Table 1) are ‖r‖ and kbᵀu/‖u‖; here they are reported beside ‖r‖‖u‖ and uᵀkb (the
guard's units). Δ is the same either way.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from rome_jax.editors.delta import Edit, Factors, rank_one
from rome_jax.editors.emmet import emmet_factors
from rome_jax.models.transformer import widened
from rome_jax.rome.stats import solve

METHODS = ("rome", "c-rome", "r-rome", "p-rome", "k2-rome")
# k2-rome keeps its second key only where sin²θ (above) reaches this: below it the 2×2 system
# is too close to singular for float32 and k^u adds nothing that k̄ does not carry.
MIN_SIN2 = 1e-3


def canonical_method(method: str) -> str:
    if method not in METHODS:
        raise ValueError(f"method: {method!r} is not one of {', '.join(METHODS)}")
    return "c-rome" if method == "r-rome" else method


class UpdateDiagnostics(NamedTuple):
    """numerator_norm = ‖r uᵀ‖_F = ‖r‖‖u‖; denominator = uᵀkb; delta_norm = ‖Δ‖_F;
    delta_abs = ‖Δ‖_F / (F·D) (the |Δ| of "Rebuilding ROME"); residual_norm = ‖r‖, the papers'
    numerator; denominator_unit_u = kbᵀu/‖u‖ = denominator / ‖u‖, the papers' denominator.
    ‖Δ‖_F = numerator_norm / |denominator| = residual_norm / |denominator_unit_u|."""

    numerator_norm: jax.Array
    denominator: jax.Array
    delta_norm: jax.Array
    delta_abs: jax.Array
    residual_norm: jax.Array
    denominator_unit_u: jax.Array
    key_sin2: jax.Array | None = None
    key_condition: jax.Array | None = None


def rank_one_update(w: jax.Array, b: jax.Array, factor: jax.Array, key_plain: jax.Array,
                    key_mean: jax.Array, v_star: jax.Array, method: str, layer: int = 0):
    """The update for w [F, D], b [D], Cholesky factor of C [F, F], keys [F], v* [D].

    Returns (Edit of rank one at ``layer``, UpdateDiagnostics). Pure and traceable; ``method``
    is static. Computed in float32 or the widest dtype of the inputs if wider (bfloat16 /
    float16 weights are widened): the solve, the residual and both factors.
    """
    method = canonical_method(method)
    if method == "k2-rome":
        raise ValueError("method: k2-rome is a rank-2 update (two_key_update), not rank one")
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


def two_key_update(w: jax.Array, b: jax.Array, factor: jax.Array, key_plain: jax.Array,
                   key_mean: jax.Array, v_star_mean: jax.Array, v_star_plain: jax.Array,
                   layer: int = 0):
    """k2-rome: ŵᵀk̄ + b = v̄* and ŵᵀk^u + b = v*₀ (w [F, D], b [D], Cholesky factor of C
    [F, F], keys [F], targets [D]) by one rank-2 update, or c-rome's alone where
    sin²θ < MIN_SIN2 (module docstring).

    Returns (Edit with Factors of rank 2 at ``layer``, UpdateDiagnostics) where
    ``denominator`` is λ_min(G) (G₁₁ = c-rome's uᵀk̄ when the second key is dropped),
    ``residual_norm`` ‖R‖_F, ``delta_norm`` ‖Δw‖_F, ``key_sin2`` sin²θ, ``key_condition`` G's
    condition number; numerator_norm = delta_norm·|denominator| and denominator_unit_u =
    residual_norm / delta_norm keep ``UpdateDiagnostics``' identities. Pure and traceable;
    computed in float32 or wider, as ``rank_one_update``.
    """
    w, b, factor, key_plain, key_mean, v_star_mean, v_star_plain = map(widened, (
        w, b, factor, key_plain, key_mean, v_star_mean, v_star_plain))
    keys = jnp.stack([key_mean, key_plain])                          # [2, F]
    residual = jnp.stack([v_star_mean, v_star_plain]) - (keys @ w + b)  # [2, D]
    left, right, emmet = emmet_factors(keys, None, residual, factor, 0.0)
    u = solve(factor, key_mean)
    g11 = u @ key_mean
    u_plain = solve(factor, key_plain)
    sin2 = 1 - (u @ key_plain) ** 2 / (g11 * (u_plain @ key_plain))
    two = sin2 >= MIN_SIN2
    single = jnp.stack([u / g11, jnp.zeros_like(u)], -1)             # c-rome, rank padded to 2
    left = jnp.where(two, left, single)
    denominator = jnp.where(two, emmet.denominator_min, g11)
    gram = jnp.sum((left.T @ left) * (right @ right.T))
    delta_norm = jnp.sqrt(jnp.maximum(gram, 0))
    residual_norm = jnp.linalg.norm(right)
    diagnostics = UpdateDiagnostics(
        delta_norm * jnp.abs(denominator), denominator, delta_norm,
        delta_norm / (w.shape[0] * w.shape[1]), residual_norm, residual_norm / delta_norm,
        sin2, emmet.denominator_condition)
    return Edit({layer: Factors(left, right)}), diagnostics
