"""Property tests of the closed-form rank-one update on random W, SPD C, keys and values."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rome_jax.editors.delta import apply_edit, rank_one
from rome_jax.editors.rome import rank_one_update

DTYPES = {"float64": (np.float64, 1e-9), "float32": (np.float32, 2e-3)}


def problem(seed: int, f: int, d: int, dtype):
    rng = np.random.default_rng(seed)
    a = rng.normal(size=(f, 2 * f))
    cov = a @ a.T / (2 * f) + 0.1 * np.eye(f)
    return dict(w=rng.normal(size=(f, d)), b=rng.normal(size=d), cov=cov,
                key_plain=rng.normal(size=f), key_mean=rng.normal(size=f),
                v_star=rng.normal(size=d) * 3)


def run(p, method, dtype, **override):
    p = {**p, **override}
    factor = np.linalg.cholesky(p["cov"])
    cast = lambda x: jnp.asarray(x, dtype)
    return rank_one_update(cast(p["w"]), cast(p["b"]), cast(factor), cast(p["key_plain"]),
                           cast(p["key_mean"]), cast(p["v_star"]), method)


shapes = dict(seed=st.integers(0, 2**31 - 1), f=st.integers(2, 12), d=st.integers(1, 8))


@pytest.mark.parametrize("dtype_name", DTYPES)
@pytest.mark.parametrize("method,key_name", [("c-rome", "key_mean"), ("r-rome", "key_mean"),
                                             ("p-rome", "key_plain")])
@settings(max_examples=40, deadline=None)
@given(**shapes)
def test_consistent_methods_write_v_star_exactly(dtype_name, method, key_name, seed, f, d):
    dtype, tol = DTYPES[dtype_name]
    p = problem(seed, f, d, dtype)
    with jax.enable_x64(dtype == np.float64):
        edit, diag = run(p, method, dtype)
        new_w = np.asarray(p["w"]) + np.asarray(edit.weight_delta(), np.float64)
        out = p[key_name] @ new_w + p["b"]
        scale = 1 + np.abs(p["v_star"]).max()
        assert np.abs(out - p["v_star"]).max() <= tol * scale * (1 + float(diag.delta_norm))
        # the update has rank one
        sv = np.linalg.svd(np.asarray(edit.weight_delta(), np.float64), compute_uv=False)
        assert sv[1:].max(initial=0.0) <= 1e-5 * sv[0]


@pytest.mark.parametrize("dtype_name", DTYPES)
@settings(max_examples=40, deadline=None)
@given(**shapes)
def test_c_rome_denominator_is_bounded_below(dtype_name, seed, f, d):
    dtype, _ = DTYPES[dtype_name]
    p = problem(seed, f, d, dtype)
    with jax.enable_x64(dtype == np.float64):
        _, diag = run(p, "c-rome", dtype)
    bound = p["key_mean"] @ p["key_mean"] / np.linalg.eigvalsh(p["cov"]).max()
    assert bound > 0
    assert float(diag.denominator) >= bound * (1 - 1e-4)


@settings(max_examples=40, deadline=None)
@given(**shapes)
def test_rome_equals_c_rome_when_keys_agree(seed, f, d):
    p = problem(seed, f, d, np.float64)
    with jax.enable_x64(True):
        rome, rome_diag = run(p, "rome", np.float64, key_plain=p["key_mean"])
        crome, crome_diag = run(p, "c-rome", np.float64)
    np.testing.assert_allclose(rome.weight_delta(), crome.weight_delta(), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(rome_diag.denominator, crome_diag.denominator, rtol=1e-12)


@settings(max_examples=40, deadline=None)
@given(**shapes, eps=st.sampled_from([1e-2, 1e-4, 1e-6]))
def test_rome_denominator_collapses_for_orthogonal_plain_key(seed, f, d, eps):
    """A k^u (nearly) orthogonal to C⁻¹k̄ drives the original denominator to 0 and ‖Δ‖ up."""
    p = problem(seed, f, d, np.float64)
    u = np.linalg.solve(p["cov"], p["key_mean"])
    orthogonal = p["key_plain"] - (u @ p["key_plain"]) / (u @ u) * u
    orthogonal /= np.linalg.norm(orthogonal)
    near = orthogonal + eps * u / np.linalg.norm(u)
    with jax.enable_x64(True):
        _, exact = run(p, "rome", np.float64, key_plain=orthogonal)
        _, almost = run(p, "rome", np.float64, key_plain=near)
        _, safe = run(p, "c-rome", np.float64)
    assert abs(float(exact.denominator)) < 1e-9 * np.linalg.norm(u)
    assert abs(float(almost.denominator)) <= 1.01 * eps * np.linalg.norm(u)
    assert float(almost.delta_norm) > float(safe.delta_norm) * min(1.0, 1e-2 / eps)


@pytest.mark.parametrize("method", ["rome", "c-rome", "p-rome"])
@settings(max_examples=30, deadline=None)
@given(**shapes)
def test_papers_units_unit_u(method, seed, f, d):
    """The original code's u/‖u‖: denominator_unit_u·‖u‖ = uᵀkb, and ‖Δ‖ = ‖r‖/|kbᵀu/‖u‖|, the
    same ‖Δ‖ as in this project's units; all recomputed here from the definitions."""
    p = problem(seed, f, d, np.float64)
    key_a = p["key_plain"] if method == "p-rome" else p["key_mean"]
    key_b = p["key_mean"] if method == "c-rome" else p["key_plain"]
    u = np.linalg.solve(p["cov"], key_a)
    residual = p["v_star"] - (key_b @ p["w"] + p["b"])
    with jax.enable_x64(True):
        edit, diag = run(p, method, np.float64)
    unit = u / np.linalg.norm(u)
    np.testing.assert_allclose(float(diag.denominator_unit_u), key_b @ unit, rtol=1e-8)
    np.testing.assert_allclose(float(diag.denominator_unit_u) * np.linalg.norm(u),
                               float(diag.denominator), rtol=1e-8)
    np.testing.assert_allclose(float(diag.residual_norm), np.linalg.norm(residual), rtol=1e-8)
    original = np.outer(unit, residual) / (key_b @ unit)      # the original code's Δ
    np.testing.assert_allclose(np.asarray(edit.weight_delta()), original, rtol=1e-7,
                               atol=1e-9 * np.abs(original).max())
    delta_norm = float(diag.residual_norm) / abs(float(diag.denominator_unit_u))
    np.testing.assert_allclose(delta_norm, float(diag.delta_norm), rtol=1e-8)
    np.testing.assert_allclose(np.linalg.norm(original), float(diag.delta_norm), rtol=1e-7)


def test_apply_edit_is_pure():
    params = {"blocks": {"mlp": {"fc_out": {"w": jnp.zeros((3, 4, 2)), "b": jnp.zeros((3, 2))}}},
              "wte": jnp.ones((5, 2))}
    edit = rank_one(jnp.array([1.0, 2.0, 0.0, 0.0]), jnp.array([1.0, -1.0]), layer=1)
    new = apply_edit(params, edit)
    assert float(jnp.abs(params["blocks"]["mlp"]["fc_out"]["w"]).sum()) == 0.0
    np.testing.assert_array_equal(new["blocks"]["mlp"]["fc_out"]["w"][1],
                                  np.outer([1, 2, 0, 0], [1, -1]))
    np.testing.assert_array_equal(new["blocks"]["mlp"]["fc_out"]["w"][0], 0)
    assert new["wte"] is params["wte"]


def test_unknown_method_is_refused():
    p = problem(0, 3, 2, np.float32)
    with pytest.raises(ValueError, match="method"):
        run(p, "memit", np.float32)


@pytest.mark.parametrize("method", ["rome", "c-rome", "p-rome"])
def test_rank_one_edit_applies_as_the_outer_product_bit_for_bit(method):
    """ROME as an ``Edit`` (factors [F, 1] @ [1, D]) changes the weights exactly as the rank-one
    outer product key_dir ⊗ value_delta did before the editor interface (float32)."""
    p = problem(3, 12, 8, np.float32)
    cast = lambda x: jnp.asarray(x, jnp.float32)
    edit, _ = run(p, method, np.float32)
    factors = edit.deltas[0]
    w = jnp.stack([cast(p["w"])] * 2)
    params = {"blocks": {"mlp": {"fc_out": {"w": w, "b": jnp.zeros((2, 8))}}}}
    old = w.at[0].add(jnp.outer(factors.left[:, 0], factors.right[0]))
    new = apply_edit(params, edit)["blocks"]["mlp"]["fc_out"]["w"]
    np.testing.assert_array_equal(np.asarray(new), np.asarray(old))
