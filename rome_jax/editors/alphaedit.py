"""AlphaEdit's null-space projected update at one layer (Fang et al., ICLR 2025;
jianghoucheng/AlphaEdit ``AlphaEdit/AlphaEdit_main.py``, ``experiments/evaluate.py``).

Orientation as the model (``out = k @ w + b``, w [F, D]); a batch's keys K [B, F] (rows),
residuals R [B, D]. Knowledge to preserve lives in the span of C's large-eigenvalue
eigenvectors (C = E[k kᵀ] over a corpus, ``KeyStats.moment``); the update is confined to the
rest:

    P = Û Ûᵀ [F, F],  Û = the eigenvectors of C with eigenvalue < threshold
        (absolute, as the original's ``nullspace_threshold`` 2e-2 on the moment, or
        ``relative``: < threshold · the largest eigenvalue),
    Δw = (P (KᵀK + K_pᵀK_p) + l2·I)⁻¹ P Kᵀ R = left @ right,  left [F, B],  right = R,

K_pᵀK_p (``preserved``) = the keys of earlier batches of a sequential run, summed by
``accumulate_preserved`` (the original's ``cache_c``, threaded through the caller's fold here,
never a global). As the original: no C term in the solve (its ``mom2_update_weight`` is unused),
P computed once from the unedited model's C. The original takes an SVD of C (for a symmetric
positive semidefinite C its singular values are its eigenvalues) and solves in float32; here
``eigh`` and the dtype of the inputs. P (KᵀK + K_pᵀK_p) + l2·I is not symmetric: LU solve.

Why Δw leaves preserved keys alone: from (P M + l2 I) X = P Y, l2 X = P (Y − M X), so for
l2 > 0 every column of Δw lies in range(P) and k @ Δw = 0 for every k orthogonal to it (C's
large-eigenvalue eigenvectors).

Pinned by tests/test_batch_closed_forms.py: P symmetric, idempotent, the reference projector
for a spectrum with a gap at the threshold; k @ Δw ≈ 0 for C's large-eigenvalue
eigenvectors; Δw matches a float64 NumPy solve; the preserved sum folds batch by batch.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from rome_jax.editors.lowrank import LowRankDiagnostics, low_rank_diagnostics


def null_space_projector(moment: jax.Array, threshold, relative: bool = False) -> jax.Array:
    """P [F, F] onto the eigenvectors of ``moment`` [F, F] whose eigenvalues are below
    ``threshold`` (times the largest eigenvalue when ``relative``, a static flag)."""
    eigenvalues, vectors = jnp.linalg.eigh(moment)
    cut = jnp.asarray(threshold, eigenvalues.dtype) * (eigenvalues[-1] if relative else 1)
    kept = vectors * (eigenvalues < cut).astype(vectors.dtype)
    return kept @ vectors.T


def accumulate_preserved(preserved: jax.Array | None, keys: jax.Array) -> jax.Array:
    """preserved [F, F] + Kᵀ K for a batch's keys [B, F]: one step of a sequential fold
    (``preserved`` None: the fold's first step, Kᵀ K)."""
    grown = keys.T @ keys
    return grown if preserved is None else preserved + grown


class AlphaEditDiagnostics(NamedTuple):
    """update: ‖r_i‖, ‖Δw‖_F, ‖k_i Δw − r_i‖ (LowRankDiagnostics); null_fraction [B] =
    ‖P k_i‖ / ‖k_i‖, the share of each key the projected update can reach; null_rank [] =
    tr P, the dimension of the null space."""

    update: LowRankDiagnostics
    null_fraction: jax.Array
    null_rank: jax.Array


def alphaedit_factors(keys: jax.Array, residual: jax.Array, projector: jax.Array,
                      preserved: jax.Array, l2
                      ) -> tuple[jax.Array, jax.Array, AlphaEditDiagnostics]:
    """keys [B, F], residual R [B, D], projector P [F, F], preserved Σ K_pᵀK_p [F, F] of the
    earlier batches (zeros for the first), l2 > 0 (scalar; the original's ``L2``).

    Returns (left [F, B], right [B, D], AlphaEditDiagnostics); Δw = left @ right. Pure,
    traceable.
    """
    projector = jnp.asarray(projector)
    projected = keys @ projector.T                  # [B, F]: row i is (P k_i)ᵀ
    eye = jnp.eye(projector.shape[0], dtype=projector.dtype)
    system = projector @ (keys.T @ keys + preserved) + jnp.asarray(l2, projector.dtype) * eye
    left = jnp.linalg.solve(system, projected.T)
    null_fraction = (jnp.linalg.norm(projected, axis=-1)
                     / jnp.linalg.norm(keys, axis=-1))
    return left, residual, AlphaEditDiagnostics(
        low_rank_diagnostics(keys, left, residual), null_fraction,
        jnp.trace(projector))
