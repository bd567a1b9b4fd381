"""Property tests of the batch closed forms (rome_jax/editors: MEMIT, EMMET, AlphaEdit) on random
SPD moments, keys and residuals, in float32 and float64, against float64 NumPy references.

Bounds. Every closed form is a Cholesky or LU solve, both backward stable: the computed X̂ of
A X = Y solves a system perturbed by ‖δA‖ ≤ c·n·eps·‖A‖ (Higham, "Accuracy and Stability of
Numerical Algorithms", Thms. 9.4, 10.3), and rounding the float64 inputs to the working dtype is a
perturbation of the same size. So the relative forward error is ≤ c·n·eps·κ(A) and the relative
residual ‖A X̂ − Y‖ / ‖Y‖ ≤ c·n·eps·κ(A). ``bound`` is that with c = SAFETY (growth constants of
small matrices), n the largest dimension and κ the 2-norm condition number of the matrices solved
with, computed from the float64 problem. Problems are drawn well conditioned (``assume`` caps κ) so
that every bound stays far below 1: a wrong formula (a missing term, a transpose, a wrong λ) gives
an O(1) error and fails. float64 runs inside ``jax.enable_x64``, a context that does not leak.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from rome_jax.editors.alphaedit import (accumulate_preserved, alphaedit_factors,
                                        null_space_projector)
from rome_jax.editors.emmet import emmet_factors
from rome_jax.editors.memit import memit_factors
from rome_jax.editors.rome import rank_one_update

DTYPES = {"float64": np.float64, "float32": np.float32}
SAFETY = 1.0
MAX_BOUND = 1e-2  # problems whose bound exceeds this are too ill conditioned to test anything

# Few distinct shapes (each compiles its own XLA programs, the suite's main cost); the data vary.
EXAMPLES = 10
sizes = dict(seed=st.integers(0, 2**31 - 1), f=st.sampled_from([3, 8]), d=st.sampled_from([1, 4]))


def bound(dtype, n: int, kappa: float) -> float:
    return SAFETY * n * np.finfo(dtype).eps * kappa


def problem(seed: int, f: int, d: int, b: int):
    """Float64 problem: SPD moment C (eigenvalues in ≈ [0.19, 3], as a Marchenko–Pastur
    sample plus 0.1·I), keys K [b, f], residuals R [b, d], weights w [f, d], bias [d]."""
    rng = np.random.default_rng(seed)
    a = rng.normal(size=(f, 2 * f))
    return dict(cov=a @ a.T / (2 * f) + 0.1 * np.eye(f), keys=rng.normal(size=(b, f)),
                other=rng.normal(size=(b, f)), residual=3 * rng.normal(size=(b, d)),
                w=rng.normal(size=(f, d)), bias=rng.normal(size=d))


def as64(x) -> np.ndarray:
    return np.asarray(x, np.float64)


def rel(x, ref) -> float:
    return float(np.linalg.norm(as64(x) - ref) / np.linalg.norm(ref))


def spectrum_problem(seed: int, f: int, n_small: int):
    """C = Q diag(s) Qᵀ with n_small eigenvalues in [1e-4, 1e-3] (the null space, below both
    the absolute threshold 2e-2 and the relative 1e-2·max ≥ 5e-3) and the rest in [0.5, 5]:
    a gap of ≥ 0.499 at the threshold, so f32 and f64 agree on the split."""
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.normal(size=(f, f)))
    s = np.concatenate([rng.uniform(1e-4, 1e-3, n_small), rng.uniform(0.5, 5, f - n_small)])
    return q @ np.diag(s) @ q.T, q[:, :n_small], q[:, n_small:]


# MEMIT


@pytest.mark.parametrize("dtype_name", DTYPES)
@settings(max_examples=EXAMPLES, deadline=None)
@given(**sizes, b=st.sampled_from([1, 4, 12]), weight=st.sampled_from([0.1, 1.0, 10.0, 1e3]))
def test_memit_matches_reference_and_zeroes_the_gradient(dtype_name, seed, f, d, b, weight):
    """Δw = (λC + KᵀK)⁻¹ KᵀR, and ∇[‖KΔw − R‖² + λ tr(Δwᵀ C Δw)] = 2Kᵀ(KΔw − R) + 2λCΔw ≈ 0
    relative to its value at Δw = 0 (−2KᵀR): the relative residual of the solve."""
    dtype = DTYPES[dtype_name]
    p = problem(seed, f, d, b)
    k, r, c = p["keys"], p["residual"], p["cov"]
    system = weight * c + k.T @ k
    tol = bound(dtype, f, np.linalg.cond(system))
    assume(tol < MAX_BOUND)
    with jax.enable_x64(dtype == np.float64):
        left, right, diag = memit_factors(jnp.asarray(k, dtype), jnp.asarray(r, dtype),
                                          jnp.asarray(c, dtype), weight)
        assert left.dtype == right.dtype == dtype and left.shape == (f, b)
        delta = as64(left) @ as64(right)
    reference = np.linalg.solve(system, k.T @ r)
    assert rel(delta, reference) <= tol
    gradient = 2 * k.T @ (k @ delta - r) + 2 * weight * c @ delta
    assert np.linalg.norm(gradient) <= tol * np.linalg.norm(2 * k.T @ r)
    # diagnostics: ‖Δw‖_F, ‖r_i‖ and the least-squares shortfall ‖k_i Δw − r_i‖
    np.testing.assert_allclose(as64(diag.delta_norm), np.linalg.norm(reference), rtol=tol + 1e-5)
    np.testing.assert_allclose(as64(diag.residual_norm), np.linalg.norm(r, axis=1), rtol=1e-5)
    fit = np.linalg.norm(k @ reference - r, axis=1)
    assert np.abs(as64(diag.fit_error) - fit).max() <= tol * np.linalg.norm(r) + 1e-5


# EMMET


def emmet_problem(seed, f, d, b, mixed: bool):
    """Keys as ROME's conventions: keys_b = keys_a (c-rome / p-rome) or keys_a plus a 0.3-scale
    perturbation (mixed: a = k̄, b = k^u). G = K_b C⁻¹ K_aᵀ in float64."""
    p = problem(seed, f, d, b)
    keys_b = p["keys"] + 0.3 * p["other"] if mixed else p["keys"]
    g = keys_b @ np.linalg.solve(p["cov"], p["keys"].T)
    return p, keys_b, g


def run_emmet(p, keys_b, mixed, lam, dtype):
    keys_a = jnp.asarray(p["keys"], dtype)
    return emmet_factors(keys_a, jnp.asarray(keys_b, dtype) if mixed else None,
                         jnp.asarray(p["residual"], dtype),
                         jnp.asarray(np.linalg.cholesky(p["cov"]), dtype), lam)


@pytest.mark.parametrize("dtype_name", DTYPES)
@pytest.mark.parametrize("mixed", [False, True], ids=["same-keys", "mixed-keys"])
@settings(max_examples=EXAMPLES, deadline=None)
@given(**sizes, b=st.sampled_from([1, 3]))
def test_emmet_meets_every_constraint(dtype_name, mixed, seed, f, d, b):
    """λ_E = 0: k_b,i @ (w + Δw) + bias = v_i for every request, with v = K_b w + bias + R.
    G is computed from the same Û = C⁻¹K_aᵀ as Δw, so the constraint residual is the solve's
    with G (κ(G)) plus the rounding of K_b (eps·‖K_b‖‖Δw‖)."""
    dtype = DTYPES[dtype_name]
    assume(b <= f)
    p, keys_b, g = emmet_problem(seed, f, d, b, mixed)
    kappa = np.linalg.cond(g)
    tol = bound(dtype, f, kappa)
    assume(tol < MAX_BOUND)
    with jax.enable_x64(dtype == np.float64):
        left, right, diag = run_emmet(p, keys_b, mixed, 0.0, dtype)
        assert left.dtype == right.dtype == dtype and left.shape == (f, b)
    delta = as64(left) @ as64(right)
    values = keys_b @ p["w"] + p["bias"] + p["residual"]
    error = keys_b @ (p["w"] + delta) + p["bias"] - values
    # the solve's share (‖R‖ and the rounding of K_b), and this check's own float64 rounding of
    # k_b,i @ (w + Δw) + bias − v_i (eps · the size of its terms)
    scale = np.linalg.norm(p["residual"]) + np.linalg.norm(keys_b) * np.linalg.norm(delta)
    own = np.linalg.norm(keys_b) * np.linalg.norm(p["w"] + delta) + np.linalg.norm(values)
    assert np.linalg.norm(error) <= tol * scale + bound(np.float64, f, 1.0) * own
    assert np.linalg.norm(as64(diag.update.fit_error)) <= tol * scale
    # the denominator diagnostics: G's smallest eigenvalue / singular value and its κ
    spectrum = (np.linalg.eigvalsh((g + g.T) / 2) if not mixed
                else np.linalg.svd(g, compute_uv=False)[::-1])
    gap = bound(dtype, f, np.linalg.cond(p["cov"]) * kappa)  # G itself carries C's solve error
    np.testing.assert_allclose(as64(diag.denominator_min), spectrum[0], rtol=gap)
    np.testing.assert_allclose(as64(diag.denominator_condition), kappa, rtol=2 * gap)


@pytest.mark.parametrize("dtype_name", DTYPES)
@pytest.mark.parametrize("mixed", [False, True], ids=["same-keys", "mixed-keys"])
@settings(max_examples=EXAMPLES, deadline=None)
@given(**sizes, b=st.sampled_from([2, 5]), lam=st.sampled_from([0.1, 1.0, 10.0]))
def test_emmet_matches_reference_with_lambda(dtype_name, mixed, seed, f, d, b, lam):
    """B > 1: Δw = U (G + λ_E I)⁻¹ R with U = C⁻¹K_aᵀ, λ_E added as the original does."""
    dtype = DTYPES[dtype_name]
    p, keys_b, g = emmet_problem(seed, f, d, b, mixed)
    regularised = g + lam * np.eye(b)
    tol = bound(dtype, f, np.linalg.cond(p["cov"]) * np.linalg.cond(regularised))
    assume(tol < MAX_BOUND)
    with jax.enable_x64(dtype == np.float64):
        left, right, _ = run_emmet(p, keys_b, mixed, lam, dtype)
    u = np.linalg.solve(p["cov"], p["keys"].T)
    reference = u @ np.linalg.solve(regularised, p["residual"])
    assert rel(as64(left) @ as64(right), reference) <= tol
    # λ_E > 0 gives up exact constraints: K_b Δw = G (G + λ_E I)⁻¹ R
    np.testing.assert_allclose(keys_b @ reference, g @ np.linalg.solve(regularised, p["residual"]),
                               rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("dtype_name", DTYPES)
@pytest.mark.parametrize("method", ["rome", "c-rome", "p-rome"])
@settings(max_examples=EXAMPLES, deadline=None)
@given(**sizes, lam=st.sampled_from([0.0, 0.1]))
def test_emmet_with_one_request_is_rank_one_update(dtype_name, method, seed, f, d, lam):
    """B = 1 in ROME's conventions: key_dir = left[:, 0], value_delta = right[0], and G = uᵀk_b
    is ROME's denominator. λ_E is not added for one request (as the original), so 0.1 changes
    nothing."""
    dtype = DTYPES[dtype_name]
    p = problem(seed, f, d, 1)
    key_mean, key_plain = p["keys"][0], p["keys"][0] + 0.3 * p["other"][0]
    key_a = key_plain if method == "p-rome" else key_mean
    key_b = key_mean if method == "c-rome" else key_plain
    v_star = key_b @ p["w"] + p["bias"] + p["residual"][0]
    u = np.linalg.solve(p["cov"], key_a)
    tol = bound(dtype, f, np.linalg.cond(p["cov"]) * np.linalg.norm(u) * np.linalg.norm(key_b)
                / abs(u @ key_b))
    assume(tol < MAX_BOUND)
    cast = lambda x: jnp.asarray(x, dtype)
    with jax.enable_x64(dtype == np.float64):
        factor = cast(np.linalg.cholesky(p["cov"]))
        edit, rome_diag = rank_one_update(cast(p["w"]), cast(p["bias"]), factor, cast(key_plain),
                                          cast(key_mean), cast(v_star), method)
        residual = v_star - (key_b @ p["w"] + p["bias"])
        keys_b = None if method != "rome" else cast(key_b[None])
        left, right, diag = emmet_factors(cast(key_a[None]), keys_b, cast(residual[None]),
                                          factor, lam)
    key_dir, value_delta = edit.deltas[0].left[:, 0], edit.deltas[0].right[0]  # rank one
    scale = np.linalg.norm(as64(key_dir))
    assert np.linalg.norm(as64(left[:, 0]) - as64(key_dir)) <= tol * scale
    np.testing.assert_allclose(as64(right[0]), as64(value_delta), rtol=tol,
                               atol=tol * np.abs(residual).max())
    np.testing.assert_allclose(as64(diag.denominator_min), abs(float(rome_diag.denominator)),
                               rtol=tol)
    np.testing.assert_allclose(as64(diag.update.delta_norm), as64(rome_diag.delta_norm), rtol=tol)


# AlphaEdit


@pytest.mark.parametrize("dtype_name", DTYPES)
@pytest.mark.parametrize("relative", [False, True], ids=["absolute", "relative"])
@settings(max_examples=EXAMPLES, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), f=st.sampled_from([2, 8]), data=st.data())
def test_null_space_projector(dtype_name, relative, seed, f, data):
    """P symmetric, idempotent, of rank n_small, and the projector onto C's small-eigenvalue
    eigenvectors: the subspace moves by ≤ eps·‖C‖ / gap (Davis–Kahan), gap ≥ 0.499."""
    dtype = DTYPES[dtype_name]
    # a relative threshold needs a large eigenvalue to be relative to
    n_small = data.draw(st.integers(0, f - relative), label="n_small")
    c, small, _ = spectrum_problem(seed, f, n_small)
    with jax.enable_x64(dtype == np.float64):
        projector = null_space_projector(jnp.asarray(c, dtype), 1e-2 if relative else 2e-2,
                                         relative=relative)
        assert projector.dtype == dtype
    p = as64(projector)
    tol = bound(dtype, f, 1.0)
    assert np.abs(p - p.T).max() <= tol
    assert np.abs(p @ p - p).max() <= tol
    assert abs(np.trace(p) - n_small) <= tol * f
    assert np.abs(p - small @ small.T).max() <= bound(dtype, f, 5 / 0.499)


def alphaedit_problem(seed, f, d, b, n_small, n_preserved):
    c, small, large = spectrum_problem(seed, f, n_small)
    p = problem(seed + 1, f, d, b + n_preserved)
    keys, earlier = p["keys"][:b], p["keys"][b:]
    return c, small, large, keys, earlier, p["residual"][:b]


@pytest.mark.parametrize("dtype_name", DTYPES)
@settings(max_examples=EXAMPLES, deadline=None)
@given(**sizes, b=st.sampled_from([1, 3]), n_preserved=st.integers(0, 8),
       l2=st.sampled_from([0.1, 1.0, 10.0]), data=st.data())
def test_alphaedit_update_spares_the_preserved_subspace(dtype_name, seed, f, d, b, n_preserved,
                                                         l2, data):
    """Δw = (P(KᵀK + K_pᵀK_p) + l2·I)⁻¹ P Kᵀ R against float64 NumPy with the exact projector,
    and k @ Δw ≈ 0 for every large-eigenvalue eigenvector k of C (the preserved knowledge):
    Δw's columns lie in range(P), up to the solve's error eps·κ(A)·‖Δw‖."""
    dtype = DTYPES[dtype_name]
    n_small = data.draw(st.integers(1, f), label="n_small")
    c, small, large, keys, earlier, residual = alphaedit_problem(seed, f, d, b, n_small,
                                                                 n_preserved)
    exact = small @ small.T
    preserved = earlier.T @ earlier
    system = exact @ (keys.T @ keys + preserved) + l2 * np.eye(f)
    # the projector's own error (≤ eps·‖C‖/gap, see above) enters as a perturbation of A
    tol = bound(dtype, f, np.linalg.cond(system) * 10)
    assume(tol < MAX_BOUND)
    with jax.enable_x64(dtype == np.float64):
        projector = null_space_projector(jnp.asarray(c, dtype), 2e-2)
        left, right, diag = alphaedit_factors(jnp.asarray(keys, dtype),
                                              jnp.asarray(residual, dtype), projector,
                                              jnp.asarray(preserved, dtype), l2)
        assert left.dtype == right.dtype == dtype and left.shape == (f, b)
    delta = as64(left) @ as64(right)
    reference = np.linalg.solve(system, exact @ keys.T @ residual)
    assert rel(delta, reference) <= tol
    assert np.linalg.norm(large.T @ delta) <= tol * np.linalg.norm(delta)
    if n_small < f:  # the check can fail: the same solve without P moves preserved keys
        unprojected = np.linalg.solve(keys.T @ keys + preserved + l2 * np.eye(f),
                                      keys.T @ residual)
        assert np.linalg.norm(large.T @ unprojected) > 10 * tol * np.linalg.norm(unprojected)
    np.testing.assert_allclose(as64(diag.null_rank), n_small, atol=tol * f)
    np.testing.assert_allclose(as64(diag.null_fraction),
                               np.linalg.norm(keys @ small, axis=1) / np.linalg.norm(keys, axis=1),
                               rtol=tol + 1e-5)


@settings(max_examples=EXAMPLES, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), f=st.sampled_from([1, 5]),
       sizes=st.lists(st.sampled_from([1, 3]), min_size=1, max_size=4))
def test_accumulate_preserved_folds_the_batches(seed, f, sizes):
    """A fold of accumulate_preserved from zeros is Σ_batches KᵀK = K_allᵀ K_all, and a fold
    from None (no earlier batch) is the same bit for bit."""
    rng = np.random.default_rng(seed)
    batches = [rng.normal(size=(n, f)).astype(np.float32) for n in sizes]
    preserved, from_none = jnp.zeros((f, f), jnp.float32), None
    for keys in batches:
        preserved = accumulate_preserved(preserved, jnp.asarray(keys))
        from_none = accumulate_preserved(from_none, jnp.asarray(keys))
    np.testing.assert_array_equal(np.asarray(from_none), np.asarray(preserved))
    everything = np.concatenate(batches).astype(np.float64)
    np.testing.assert_allclose(as64(preserved), everything.T @ everything,
                               atol=bound(np.float32, sum(sizes), 1.0)
                               * np.square(everything).sum())


# all three: jit with static shapes, float32 in → float32 out, float64 in → float64 out


@pytest.mark.parametrize("dtype_name", DTYPES)
def test_closed_forms_jit_and_keep_the_dtype(dtype_name):
    dtype = DTYPES[dtype_name]
    p = problem(7, 6, 3, 2)
    c, *_ = spectrum_problem(7, 6, 3)
    with jax.enable_x64(dtype == np.float64):
        k, r = jnp.asarray(p["keys"], dtype), jnp.asarray(p["residual"], dtype)
        factor = jnp.asarray(np.linalg.cholesky(p["cov"]), dtype)
        cov, moment = jnp.asarray(p["cov"], dtype), jnp.asarray(c, dtype)
        calls = {
            "memit": (memit_factors, (k, r, cov, 10.0)),
            "emmet": (lambda *a: emmet_factors(a[0], None, *a[1:]), (k, r, factor, 0.1)),
            "emmet-mixed": (emmet_factors, (k, k + 0.1, r, factor, 0.1)),
            "alphaedit": (lambda k, r, m, l2: alphaedit_factors(
                k, r, null_space_projector(m, 2e-2), accumulate_preserved(0 * m, k), l2),
                (k, r, moment, 1.0)),
        }
        for name, (fn, args) in calls.items():
            eager, jitted = fn(*args), jax.jit(fn)(*args)
            for a, b in zip(jax.tree.leaves(eager), jax.tree.leaves(jitted)):
                assert b.dtype == dtype, name
                np.testing.assert_allclose(as64(b), as64(a), rtol=1e-4, atol=1e-5, err_msg=name)
