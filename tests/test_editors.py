"""The editor interface (``editors.api``) and the batch driver (``editors.batch``) on a tiny random
GPT-2: ROME's methods through the interface unchanged, EMMET with one request equal to ROME in
each key convention, purity, determinism and the sequential fold, MEMIT writing facts, the edit
file format, and refused non-finite updates.

Float32 bounds are stated where they are used. The key statistics come from a few WikiText texts
and the context templates are few and short, so the module stays cheap; nothing here depends on
the expensive defaults.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny_gpt2

from rome_jax import data
from rome_jax.editors.api import edit_requests, prepare_editor
from rome_jax.editors.batch import (BatchContext, edit_batch, edit_batches, layer_inputs,
                                    prepare_batch)
from rome_jax.editors.delta import (Edit, Factors, apply_edit, dense, load_edit, rank_one,
                                    save_edit)
from rome_jax.editors.hparams import BatchHParams
from rome_jax.rome.edit import (EditContext, build_batch, compute_edit, edit_sequential,
                                solve_built)
from rome_jax.rome.hparams import RomeHParams
from rome_jax.rome.request import EditRequest
from rome_jax.rome.stats import compute_key_stats

LAYERS = (1, 2)
CHUNK = 2  # requests per compiled step: every batch call shares its programs
EPS = float(np.finfo(np.float32).eps)
HP = RomeHParams(layer=2, v_num_grad_steps=6, v_lr=0.1, context_template_length_params=((4, 3),))
REQUESTS = [EditRequest("{} plays the", "Lionel Messi", "piano", "football"),
            EditRequest("The capital of {} is", "France", "Rome", "Paris"),
            EditRequest("{} was born in", "Barack Obama", "Tokyo", "Honolulu"),
            EditRequest("{} is a citizen of", "Toko Yasuda", "Italy", "Japan")]


@pytest.fixture(scope="module")
def model():
    return tiny_gpt2(n_layer=3, d_model=32, n_head=4, seq_len=64, seed=3)


@pytest.fixture(scope="module")
def stats(model):
    texts = data.load_wikitext()[:30]
    return {layer: compute_key_stats(model, layer, texts, "wiki30") for layer in LAYERS}


@pytest.fixture(scope="module")
def context(model, stats) -> EditContext:
    return prepare_editor(model, "c-rome", HP, jax.random.key(0), stats=stats[HP.layer])


def batch_hparams(**changes) -> BatchHParams:
    """The driver over LAYERS with ROME's v* settings at the last one."""
    return BatchHParams(layers=LAYERS, v=HP, **changes)


def batch_context(model, stats, context, method, hparams) -> BatchContext:
    return prepare_batch(model, method, hparams, templates=context.templates,
                         stats={layer: stats[layer] for layer in hparams.layers})


def host(tree):
    return jax.tree.map(lambda x: np.array(x, copy=True), tree)


def assert_trees_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    jax.tree.map(np.testing.assert_array_equal, host(a), host(b))


def fc_out(params) -> np.ndarray:
    return np.asarray(params["blocks"]["mlp"]["fc_out"]["w"])


# ----------------------------------------------------------------------------- ROME's methods


@pytest.mark.parametrize("method", ["rome", "c-rome", "r-rome", "p-rome"])
def test_one_request_is_compute_edit_bit_for_bit(model, context, method):
    edit, reports = edit_requests(model, [REQUESTS[0]], method, HP, context=context)
    expected, report = compute_edit(model, REQUESTS[0], HP, method, context=context)
    assert edit.layers == (HP.layer,)
    assert_trees_equal(edit, expected)
    assert [r.to_dict() for r in reports] == [report.to_dict()]


@pytest.mark.parametrize("method", ["rome", "c-rome", "p-rome"])
def test_several_requests_apply_as_the_sequential_fold(model, context, method):
    """The returned Edit holds the B rank-one updates as one rank-B pair; applying it equals
    ``edit_sequential``'s params to float32 rounding. Both sum the same B + 1 float32 terms
    w + Σ l_i r_iᵀ, in different orders: each sum is within (B + 1)·eps/2·S of the exact one, S =
    |w| + Σ |l_i| |r_i| elementwise, so they differ by at most (B + 1)·eps·S (measured: 0.41 of
    that bound at worst over the three methods)."""
    requests = REQUESTS[:3]
    edit, reports = edit_requests(model, requests, method, HP, context=context)
    params, expected_reports = edit_sequential(model, requests, HP, method, context=context)
    assert [r.to_dict() for r in reports] == [r.to_dict() for r in expected_reports]
    factors = edit.deltas[HP.layer]
    assert isinstance(factors, Factors) and factors.rank == len(requests)
    applied = apply_edit(model.params, edit)
    w = fc_out(model.params)[HP.layer]
    scale = np.abs(w) + np.abs(np.asarray(factors.left)) @ np.abs(np.asarray(factors.right))
    error = np.abs(fc_out(applied)[HP.layer] - fc_out(params)[HP.layer])
    assert (error <= (len(requests) + 1) * EPS * scale).all(), (error / scale).max()
    # every other leaf (and every other layer of fc_out) untouched, in both
    others = lambda p: {**p, "blocks": {**p["blocks"], "mlp": {
        **p["blocks"]["mlp"], "fc_out": {**p["blocks"]["mlp"]["fc_out"], "w": np.delete(
            fc_out(p), HP.layer, 0)}}}}
    assert_trees_equal(others(applied), others(params))
    assert_trees_equal(others(applied), others(model.params))


# ----------------------------------------------------------------------------- EMMET = ROME at B = 1


@pytest.mark.parametrize("weight", [1.0, 15000.0])
@pytest.mark.parametrize("keys", ["c-rome", "rome", "p-rome"])
def test_emmet_with_one_request_at_one_layer_is_rome(model, stats, context, keys, weight):
    """One request, one layer, ROME's v* settings: EMMET's Δw (λ_E unused at B = 1; C' =
    mom2_update_weight·C, whose scale cancels) is the ``compute_edit`` Δw of the same convention.
    This pins the driver's residual: for c-rome δ + (k^u − k̄) w must be ROME's v* − W k̄ − b.

    Bounds, relative to max |Δw|: with weight 1 both solve with the same Cholesky factor, and
    differ only by float32 rounding of the keys (vmapped against unbatched programs) and of
    dividing by uᵀk through a 1×1 Cholesky: 1e-5. With weight 15000 EMMET's factor is √λ·L
    rounded, a relative perturbation eps of C, so u = C⁻¹k moves by up to eps·κ(C) (first
    order; ≈ 1.3e-3 here). Measured (30 WikiText texts, κ(C) ≈ 1.1e4): ≤ 4.1e-7 with weight 1,
    ≤ 2.4e-6 with 15000; a wrong formula gives O(1)."""
    hparams = BatchHParams(layers=(HP.layer,), v=HP, keys=keys, mom2_update_weight=weight)
    bctx = batch_context(model, stats, context, "emmet", hparams)
    result = edit_batch(model, [REQUESTS[0]], "emmet", hparams, context=bctx)
    expected, report = compute_edit(model, REQUESTS[0], HP, keys, context=context)
    got, want = np.asarray(result.edit.weight_delta(HP.layer)), np.asarray(expected.weight_delta())
    eigenvalues = np.linalg.eigvalsh(np.asarray(stats[HP.layer].moment, np.float64))
    bound = 1e-5 if weight == 1.0 else max(1e-5, float(EPS * eigenvalues[-1] / eigenvalues[0]))
    assert bound < 1e-2  # still far below a wrong formula's O(1)
    scale = np.abs(want).max()
    np.testing.assert_allclose(got, want, rtol=0, atol=bound * scale)
    (layer,) = result.report.layers
    assert layer["rank"] == 1
    assert layer["update.residual_norm_mean"] == pytest.approx(report.residual_norm, rel=1e-5)
    assert layer["update.delta_norm"] == pytest.approx(report.delta_norm, rel=bound)
    # the batch's denominator is ROME's uᵀk_b, in C' = mom2_update_weight·C's units
    assert layer["denominator_min"] * hparams.mom2_update_weight == pytest.approx(
        abs(report.denominator), rel=bound)


# ----------------------------------------------------------------------------- purity, the fold


@pytest.mark.parametrize("method", ["memit", "emmet", "alphaedit"])
def test_edit_batch_is_pure_and_deterministic(model, stats, context, method):
    hparams = batch_hparams()
    bctx = batch_context(model, stats, context, method, hparams)
    before = host(model.params)
    first = edit_batch(model, REQUESTS[:2], method, hparams, context=bctx)
    second = edit_batch(model, REQUESTS[:2], method, hparams, context=bctx)
    assert_trees_equal(model.params, before)
    assert_trees_equal(first.edit, second.edit)
    timeless = lambda r: {k: v for k, v in r.to_dict().items() if not k.startswith("seconds")}
    assert timeless(first.report) == timeless(second.report)
    assert first.edit.layers == LAYERS and first.edit.is_finite()
    assert (set(first.preserved) == set(LAYERS)) == (method == "alphaedit")
    # through the interface: the same edit, the same report
    edit, report = edit_requests(model, REQUESTS[:2], method, hparams, context=bctx)
    assert_trees_equal(edit, first.edit)
    assert timeless(report) == timeless(first.report)


def batch_keys(model, requests, templates, params, layer) -> np.ndarray:
    """k̄ [B, F] of ``requests`` at ``layer`` on ``params``, computed here by ``layer_inputs``
    one request at a time (the driver vmaps it over chunks)."""
    rows = []
    for request in requests:
        batch = build_batch(model, request, templates, HP.fact_token)
        _, k_mean, _ = layer_inputs(params, model.config, layer, LAYERS[-1], batch)
        rows.append(np.asarray(k_mean, np.float64))
    return np.stack(rows)


def test_edit_batches_is_the_fold_of_edit_batch(model, stats, context):
    """AlphaEdit, the one method with state between batches (the fold is the same code for
    all three): ``edit_batches`` equals ``edit_batch`` twice by hand, params passed on."""
    method = "alphaedit"
    hparams = batch_hparams(nullspace_threshold=0.05, nullspace_relative=True)
    bctx = batch_context(model, stats, context, method, hparams)
    batches = [REQUESTS[:2], REQUESTS[2:]]
    folded = list(edit_batches(model, batches, method, hparams, context=bctx))
    assert len(folded) == 2
    params, preserved, by_hand = model.params, None, []
    for requests in batches:
        result = edit_batch(model, requests, method, hparams, context=bctx, params=params,
                            preserved=preserved)
        params, preserved = apply_edit(params, result.edit), result.preserved
        by_hand.append((params, result))
    for (p_fold, r_fold), (p_hand, r_hand) in zip(folded, by_hand):
        assert_trees_equal(p_fold, p_hand)
        assert_trees_equal(r_fold.edit, r_hand.edit)
        assert_trees_equal(r_fold.preserved, r_hand.preserved)
    first, second = folded[0][1], folded[1][1]
    assert first.edit.is_finite() and second.edit.is_finite()
    assert np.abs(fc_out(folded[1][0]) - fc_out(folded[0][0])).max() > 0  # batch 2 did edit
    # AlphaEdit threads K_pᵀK_p: after a batch, the earlier sum plus KᵀK of the batch's keys,
    # each layer's keys on the params updated so far (the earlier batches and earlier layers).
    # Bound: the keys here and in the driver's vmapped program agree to float32 rounding.
    start = model.params
    for requests, result, earlier in ((batches[0], first, None), (batches[1], second, first)):
        params = start
        for layer in LAYERS:
            keys = batch_keys(model, requests, context.templates, params, layer)
            np.testing.assert_allclose(result.keys[layer], keys, rtol=0,  # what it reports
                                       atol=1e-5 * np.abs(keys).max())
            expected = keys.T @ keys + (0 if earlier is None
                                        else np.asarray(earlier.preserved[layer], np.float64))
            got = np.asarray(result.preserved[layer], np.float64)
            np.testing.assert_allclose(got, expected, rtol=0,
                                       atol=1e-5 * np.abs(expected).max())
            np.testing.assert_array_equal(got, got.T)
            assert np.linalg.eigvalsh(got).min() >= -1e-5 * np.abs(got).max()
            params = apply_edit(params, Edit({layer: result.edit.deltas[layer]}))
        start = params


# ----------------------------------------------------------------------------- MEMIT over layers


def test_memit_over_two_layers_reaches_z_up_to_the_last_fit_error(model, stats, context):
    """MEMIT over two layers on four requests (p-rome keys, so each layer's update acts at the
    plain prompt where z is measured): the layers share the residual δ − (h_z − h_z⁰) in order,
    so after the whole edit the residual stream leaving the last layer is h_z⁰ + δ up to the last
    layer's fit error ‖k_i Δw − r_i‖, which is below the residual it was given. Each layer's Δw
    has rank ≤ B and the reported ‖Δw‖_F.

    (P(target_new) itself is not tested: on this tiny model at GPT-2's init scale every
    next-token probability is ≈ 1/vocab and the v* losses stay near ln(vocab), so P(new) moves by
    float32 noise either way.) Bounds: the driver vmaps over chunks, ``layer_inputs`` here runs
    one request at a time: the streams agree to float32 rounding, 1e-5 of ‖h_z⁰‖."""
    requests = REQUESTS
    hparams = batch_hparams(keys="p-rome", mom2_update_weight=1.0)
    bctx = batch_context(model, stats, context, "memit", hparams)
    result = edit_batch(model, requests, "memit", hparams, context=bctx, chunk=CHUNK)
    assert result.edit.is_finite() and result.edit.layers == LAYERS
    params = apply_edit(model.params, result.edit)
    batches = [build_batch(model, r, context.templates, HP.fact_token) for r in requests]
    deltas = np.stack([np.asarray(s.values.delta) for s in solve_built(
        model, batches, HP, batch=CHUNK)])
    np.testing.assert_allclose(np.linalg.norm(deltas, axis=-1), result.report.v_delta_norms,
                               rtol=1e-6)
    z = LAYERS[-1]
    h_before = np.stack([np.asarray(layer_inputs(model.params, model.config, z, z, b)[2])
                         for b in batches])
    h_after = np.stack([np.asarray(layer_inputs(params, model.config, z, z, b)[2])
                        for b in batches])
    miss = np.linalg.norm(h_after - h_before - deltas, axis=-1)
    last = result.report.layers[-1]
    tol = 1e-5 * np.linalg.norm(h_before, axis=-1).max()
    assert abs(miss.max() - last["update.fit_error_max"]) <= tol + 1e-3 * miss.max()
    assert abs(miss.mean() - last["update.fit_error_mean"]) <= tol + 1e-3 * miss.mean()
    assert (miss < np.linalg.norm(deltas, axis=-1)).all()
    for layer, report in zip(LAYERS, result.report.layers):
        delta = np.asarray(dense(result.edit.deltas[layer]), np.float64)
        factors = result.edit.deltas[layer]
        assert isinstance(factors, Factors) and factors.rank == len(requests)
        assert report["layer"] == layer and report["rank"] == len(requests)
        # rank at float32 resolution (the product of float32 factors is not exactly rank B)
        tol = max(delta.shape) * EPS * np.linalg.norm(delta, 2)
        assert np.linalg.matrix_rank(delta, tol=tol) <= len(requests)
        assert report["update.delta_norm"] == pytest.approx(np.linalg.norm(delta), rel=1e-4)
        assert report["update.fit_error_max"] < report["update.residual_norm_max"]
        assert report["update.fit_error_mean"] < report["update.residual_norm_mean"]
    assert len(result.report.v_losses) == len(requests)


# ----------------------------------------------------------------------------- the edit file


def test_save_and_load_round_trip_bit_for_bit(tmp_path):
    rng = np.random.default_rng(0)
    left, right = rng.normal(size=(8, 2)), rng.normal(size=(2, 5))
    edit = Edit({1: Factors(jnp.asarray(left, jnp.float32), jnp.asarray(right, jnp.float32)),
                 3: jnp.asarray(rng.normal(size=(8, 5)), jnp.float32)})
    path = tmp_path / "edit.npz"
    save_edit(edit, path)
    loaded = load_edit(path)
    assert isinstance(loaded.deltas[1], Factors) and not isinstance(loaded.deltas[3], Factors)
    assert_trees_equal(loaded, edit)
    assert [p.name for p in tmp_path.iterdir()] == ["edit.npz"]  # no temporary left behind
    one = rank_one(jnp.arange(4.0), jnp.arange(3.0), 0)
    save_edit(one, path)
    assert_trees_equal(load_edit(path), one)
    stacked = rank_one(jnp.ones((2, 4)), jnp.ones((2, 3)), 5)  # edit_independent's layout
    save_edit(stacked, path)
    assert_trees_equal(load_edit(path), stacked)


def write_npz(path, **arrays):
    np.savez(path, **arrays)
    return path


@pytest.mark.parametrize("case", ["garbage", "pickle", "missing-right", "missing-left",
                                  "bad-name", "negative-layer", "npy", "empty-file",
                                  "missing-file", "shapes", "vector", "integers"])
def test_a_file_that_is_not_an_edit_is_refused_by_name(tmp_path, case):
    path = tmp_path / f"{case}.npz"
    f = np.ones((4, 2), np.float32)
    if case == "garbage":
        path.write_bytes(b"this is not an edit at all\x00\x01")
    elif case == "pickle":
        write_npz(path, **{"layer1.dense": np.array([{"a": 1}], dtype=object)})
    elif case == "missing-right":
        write_npz(path, **{"layer1.left": f})
    elif case == "missing-left":  # an orphan right factor is not dropped silently
        write_npz(path, **{"layer1.right": f})
    elif case == "bad-name":
        write_npz(path, **{"layerX.dense": f})
    elif case == "negative-layer":
        write_npz(path, **{"layer-1.dense": f})
    elif case == "vector":
        write_npz(path, **{"layer1.dense": f[0]})
    elif case == "integers":
        write_npz(path, **{"layer1.dense": f.astype(np.int32)})
    elif case == "npy":
        np.save(path, f)
        path = path.with_suffix(".npz.npy")
    elif case == "empty-file":
        path.write_bytes(b"")
    elif case == "shapes":  # left [4, 2] with right [3, 5]: no product
        write_npz(path, **{"layer1.left": f, "layer1.right": np.ones((3, 5), np.float32)})
    with pytest.raises(ValueError, match=f"^{path}: "):
        load_edit(path)


# ----------------------------------------------------------------------------- refusals


@pytest.mark.parametrize("method", ["memit", "emmet", "alphaedit"])
def test_a_non_finite_batch_update_is_refused(model, stats, context, method):
    hparams = batch_hparams()
    bctx = batch_context(model, stats, context, method, hparams)
    poisoned = dataclasses.replace(bctx, derived={
        layer: d * jnp.nan for layer, d in bctx.derived.items()})
    before = host(model.params)
    with pytest.raises(ValueError, match=f"non-finite update refused \\({method}"):
        edit_batch(model, REQUESTS[:2], method, hparams, context=poisoned)
    with pytest.raises(ValueError, match="non-finite update refused"):
        edit_requests(model, REQUESTS[:2], method, hparams, context=poisoned)
    fold = edit_batches(model, [REQUESTS[:2]], method, hparams, context=poisoned)
    with pytest.raises(ValueError, match="non-finite update refused"):
        next(fold)
    assert_trees_equal(model.params, before)


def test_a_non_finite_rome_update_is_refused_through_the_interface(model, context):
    poisoned = EditContext(context.templates, context.stats, context.factor * jnp.nan)
    before = host(model.params)
    with pytest.raises(ValueError, match="non-finite update refused"):
        edit_requests(model, REQUESTS[:2], "c-rome", HP, context=poisoned)
    assert_trees_equal(model.params, before)


@pytest.mark.parametrize("call,exc,field", [
    (lambda m, c: edit_requests(m, REQUESTS[:1], "x-rome", HP, context=c), ValueError, "method"),
    (lambda m, c: edit_requests(m, [], "c-rome", HP, context=c), ValueError, "requests"),
    (lambda m, c: edit_requests(m, [], "memit", batch_hparams()), ValueError, "requests"),
    (lambda m, c: edit_requests(m, REQUESTS[:1], "memit", HP), TypeError, "hparams"),
    (lambda m, c: edit_requests(m, REQUESTS[:1], "memit", batch_hparams(), context=c),
     TypeError, "context"),
])
def test_interface_arguments_are_named(model, context, call, exc, field):
    with pytest.raises(exc, match=f"^{field}: "):
        call(model, context)
