"""k2-rome (``editors.rome.two_key_update``): property tests of its rank-2 update in float64 on
random SPD moments, keys and targets, and one edit of a tiny random GPT-2 through the pipeline.

Promises: both constraints hold (ŵᵀk̄ + b = v̄*, ŵᵀk^u + b = v*₀); with k^u along k̄ (or within
MIN_SIN2 of it) the update is c-rome's; the reported conditioning is the 2×2 system's, and it
bounds the update: λ_min(G) ≥ sin²θ·min(G₁₁, G₂₂)/2 and ‖Δw‖_F ≤ ‖R‖_F / √(λ_min(C)·λ_min(G)).
Problems are drawn with sin²θ ≥ 0.05 and C's eigenvalues in ≈ [0.1, 3], so float64 rounding is
far below the tolerances and a wrong formula gives an O(1) error.
"""

import jax
import numpy as np
import pytest
from conftest import tiny_gpt2
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from rome_jax import data
from rome_jax.editors.delta import apply_edit, dense
from rome_jax.editors.rome import MIN_SIN2, rank_one_update, two_key_update
from rome_jax.models.transformer import rome_weight
from rome_jax.rome.edit import build_batch, compute_edit, prepare, solve, solve_plain_core
from rome_jax.rome.hparams import RomeHParams
from rome_jax.rome.request import EditRequest
from rome_jax.rome.stats import compute_key_stats

sizes = dict(seed=st.integers(0, 2**31 - 1), f=st.sampled_from([3, 8]), d=st.sampled_from([2, 5]))


def problem(seed: int, f: int, d: int):
    """C [f, f] SPD, its Cholesky factor, keys k̄, k^u [f], targets [d], w [f, d], b [d]."""
    rng = np.random.default_rng(seed)
    a = rng.normal(size=(f, 2 * f))
    cov = a @ a.T / (2 * f) + 0.1 * np.eye(f)
    return dict(cov=cov, factor=np.linalg.cholesky(cov), mean=rng.normal(size=f),
                plain=rng.normal(size=f), v_mean=3 * rng.normal(size=d),
                v_plain=3 * rng.normal(size=d), w=rng.normal(size=(f, d)), b=rng.normal(size=d))


def sin2(p, plain) -> float:
    inv = np.linalg.inv(p["cov"])
    g12 = p["mean"] @ inv @ plain
    return 1 - g12 ** 2 / ((p["mean"] @ inv @ p["mean"]) * (plain @ inv @ plain))


def update(p, plain):
    with jax.enable_x64(True):
        edit, diag = two_key_update(p["w"], p["b"], p["factor"], plain, p["mean"], p["v_mean"],
                                    p["v_plain"], layer=0)
        return np.asarray(dense(edit.deltas[0])), jax.tree.map(
            lambda x: None if x is None else float(x), diag._asdict())


@settings(max_examples=10, deadline=None)
@given(**sizes)
def test_both_constraints_hold_exactly(seed, f, d):
    p = problem(seed, f, d)
    assume(sin2(p, p["plain"]) >= 0.05)
    delta, diag = update(p, p["plain"])
    w = p["w"] + delta
    np.testing.assert_allclose(p["mean"] @ w + p["b"], p["v_mean"], rtol=0, atol=1e-9)
    np.testing.assert_allclose(p["plain"] @ w + p["b"], p["v_plain"], rtol=0, atol=1e-9)
    assert np.linalg.matrix_rank(delta) == min(2, d)
    np.testing.assert_allclose(diag["delta_norm"], np.linalg.norm(delta), rtol=1e-9)
    np.testing.assert_allclose(diag["key_sin2"], sin2(p, p["plain"]), rtol=1e-9)


@settings(max_examples=10, deadline=None)
@given(scale=st.floats(-3, 3).filter(lambda x: abs(x) > 0.1),
       tilt=st.floats(0, 0.9 * np.sqrt(MIN_SIN2)), **sizes)
def test_a_plain_key_along_the_mean_key_gives_c_rome(seed, f, d, scale, tilt):
    """k^u = scale·k̄ (+ a tilt of sin²θ < MIN_SIN2): the update is c-rome's, bit for bit the
    same formula as rank_one_update's."""
    p = problem(seed, f, d)
    other = p["plain"] - (p["plain"] @ p["mean"]) / (p["mean"] @ p["mean"]) * p["mean"]
    plain = scale * p["mean"] + tilt * np.linalg.norm(p["mean"]) / np.linalg.norm(other) * other
    assume(sin2(p, plain) < MIN_SIN2)
    delta, diag = update(p, plain)
    with jax.enable_x64(True):
        c_rome, c_diag = rank_one_update(p["w"], p["b"], p["factor"], plain, p["mean"],
                                         p["v_mean"], "c-rome")
        c_rome = np.asarray(dense(c_rome.deltas[0]))
    np.testing.assert_allclose(delta, c_rome, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(diag["denominator"], float(c_diag.denominator), rtol=1e-12)


@settings(max_examples=10, deadline=None)
@given(**sizes)
def test_the_conditioning_bounds_the_update(seed, f, d):
    p = problem(seed, f, d)
    s = sin2(p, p["plain"])
    assume(s >= MIN_SIN2)
    delta, diag = update(p, p["plain"])
    inv = np.linalg.inv(p["cov"])
    keys = np.stack([p["mean"], p["plain"]])
    g = keys @ inv @ keys.T
    eig = np.linalg.eigvalsh(g)
    residual = np.stack([p["v_mean"], p["v_plain"]]) - (keys @ p["w"] + p["b"])
    np.testing.assert_allclose(diag["denominator"], eig[0], rtol=1e-6)
    np.testing.assert_allclose(diag["key_condition"], eig[-1] / eig[0], rtol=1e-6)
    assert eig[0] >= s * min(g[0, 0], g[1, 1]) / 2 * (1 - 1e-9)
    lam_c = np.linalg.eigvalsh(p["cov"])[0]
    assert np.linalg.norm(delta) <= np.linalg.norm(residual) / np.sqrt(lam_c * eig[0]) * (1 + 1e-9)
    # the C-weighted energy of Δw is exactly tr(Rᵀ G⁻¹ R)
    np.testing.assert_allclose(np.trace(delta.T @ p["cov"] @ delta),
                               np.trace(residual.T @ np.linalg.solve(g, residual)), rtol=1e-8)


@pytest.mark.parametrize("prompt", ["{} plays the", "Yesterday {} played the"])
def test_a_k2_rome_edit_writes_v_star_at_both_keys(prompt):
    """Through the pipeline on a tiny GPT-2: the edited weights map k̄ to v̄* and k^u to v*₀,
    and the report carries sin²θ and v*₀'s losses. A subject at position 0 gets its own δ₀;
    one later in the prompt does not, and the update is c-rome's."""
    hp = RomeHParams(layer=1, v_num_grad_steps=4, v_lr=0.1,
                     context_template_length_params=((4, 3),))
    model = tiny_gpt2(n_layer=2, d_model=32, n_head=4, seq_len=64, seed=3)
    stats = compute_key_stats(model, hp.layer, data.load_wikitext()[:50], "wiki50")
    context = prepare(model, hp, jax.random.key(0), stats=stats)
    request = EditRequest(prompt, "Paris", "piano", "football")
    solved = solve(model, request, hp, context=context)
    batch = build_batch(model, request, context.templates, hp.fact_token)
    first = int(batch.lookup[0]) == 0
    assert first == prompt.startswith("{}")
    solved = solve_plain_core(model.params, model.config, hp.layer, hp.v_num_grad_steps, batch,
                              context.factor, solved, hp.v_lr, hp.v_weight_decay, hp.kl_factor,
                              hp.clamp_norm_factor, hp.early_stop_loss)
    update, report = compute_edit(model, request, hp, "k2-rome", context=context, solved=solved)
    assert update.deltas[1].rank == 2 and report.method == "k2-rome"
    assert report.key_sin2 >= MIN_SIN2 and report.key_condition >= 1
    assert report.plain_v_losses == [float(x) for x in solved.plain.losses[:solved.plain.steps]]
    w, b = rome_weight(apply_edit(model.params, update), hp.layer)
    for key, target in ((solved.keys.mean, solved.values.v_star),
                        (solved.keys.plain, solved.plain.v_star)):
        np.testing.assert_allclose(key @ w + b, target, rtol=0,
                                   atol=1e-3 * float(np.linalg.norm(target)))
    assert (float(np.linalg.norm(solved.plain.delta)) > 0) == first
    if not first:
        c_rome, _ = compute_edit(model, request, hp, "c-rome", context=context, solved=solved)
        np.testing.assert_allclose(dense(update.deltas[1]), dense(c_rome.deltas[1]), rtol=0,
                                   atol=1e-4 * float(np.abs(dense(c_rome.deltas[1])).max()))
