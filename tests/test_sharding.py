"""Independent edits (and solves) as one sharded program: 4 forced CPU devices give the
1-device results.

XLA_FLAGS must be set before jax is imported, so the 4-device run is a subprocess that loads the
saved tiny GPT-2 and the same context (templates and key statistics written by this process).

The model is ``tiny_gpt2`` at GPT-2's init scale, not conftest's O(1) random HF model: on that
one the v* loss is flat (~22 nats), Adam's normalised steps turn float32 rounding differences
into lr-sized (0.1) differences of δ, and even the unsharded vmap and a single edit differ by
0.1. Here they agree to float32 rounding, so that equality is a test that can fail.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from conftest import tiny_gpt2

from rome_jax import data, load_model, save_hf
from rome_jax.rome.edit import (Solved, batch_mesh, compute_edit, edit_independent, pad_rows,
                                prepare, solve, solve_many)
from rome_jax.rome.hparams import RomeHParams
from rome_jax.rome.request import EditRequest
from rome_jax.rome.stats import compute_key_stats

REPO = Path(__file__).resolve().parents[1]
HP = RomeHParams(layer=1, v_num_grad_steps=6, v_lr=0.1,
                 context_template_length_params=((4, 5), (6, 5)))
REQUESTS = [  # 6: not a multiple of 4, targets of 1 to 3 tokens
    EditRequest("{} plays the", "Lionel Messi", "piano", "football"),
    EditRequest("The capital of {} is", "France", "Rome", "Paris"),
    EditRequest("{} was born in", "Albert Einstein", "Tokyo", "Ulm"),
    EditRequest("{} is a product of", "iPhone", "Nokia", "Apple"),
    EditRequest("The mother tongue of {} is", "Danielle Darrieux", "English", "French"),
    EditRequest("{} has its headquarters in", "Toyota", "Rio de Janeiro", "Toyota City"),
]

# Runs in the subprocess: argv = model dir, context .npz, output dir.
SHARDED_RUN = """
import json, sys
from pathlib import Path
import jax, numpy as np
import rome_jax.rome.edit as edit_mod
from rome_jax import load_model
from rome_jax.rome.hparams import RomeHParams
from rome_jax.rome.request import EditRequest
from rome_jax.rome.stats import KeyStats

model_dir, context_file, out = sys.argv[1], sys.argv[2], Path(sys.argv[3])
spec = json.loads((out / "spec.json").read_text())
hp = RomeHParams(**spec["hparams"])
saved = np.load(context_file)
stats = KeyStats(saved["moment"], int(saved["count"]), hp.layer, "wiki200")
model = load_model(model_dir)
context = edit_mod.prepare(model, hp, templates=spec["templates"], stats=stats)
program, outputs = edit_mod._edit_vmap, []
def spy(*args):  # the compiled program's own outputs, before the padding is dropped
    outputs.append(program(*args))
    return outputs[-1]
edit_mod._edit_vmap = spy
requests = [EditRequest.from_dict(r) for r in spec["requests"]]
edits, reports = edit_mod.edit_independent(model, requests, hp, "c-rome", context=context)
leaves = jax.tree.leaves(outputs[0])
(out / "result.json").write_text(json.dumps({
    "n_devices": len(jax.devices()),
    "out_devices": [len(x.sharding.device_set) for x in leaves],
    "out_on_data_axis": [x.sharding.spec == jax.P("data") for x in leaves],
    "out_rows": [x.shape[0] for x in leaves],
    "shard_rows": [sorted({s.data.shape[0] for s in x.addressable_shards}) for x in leaves],
    "reports": [r.to_dict() for r in reports]}))
factors = edits.deltas[hp.layer]
np.savez(out / "edits.npz", key_dir=factors.left[..., 0], value_delta=factors.right[..., 0, :],
         factor=context.factor)
solved = edit_mod.solve_independent(model, requests, hp, context=context)
np.savez(out / "solved.npz", **{name: np.stack([np.asarray(get(x)) for x in solved])
                                for name, get in (("plain", lambda x: x.keys.plain),
                                                  ("mean", lambda x: x.keys.mean),
                                                  ("v_star", lambda x: x.values.v_star))})
"""


def assert_rows_close(actual, desired, rel: float = 1e-4) -> None:
    """‖actual_i − desired_i‖ ≤ rel · ‖desired_i‖ for every row i (an elementwise relative error
    means nothing for the near-zero entries of C⁻¹k̄)."""
    actual, desired = np.asarray(actual), np.asarray(desired)
    assert actual.shape == desired.shape
    error = np.linalg.norm(actual - desired, axis=1) / np.linalg.norm(desired, axis=1)
    assert (error <= rel).all(), error


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    model_dir = tmp_path_factory.mktemp("sharding") / "tiny-gpt2"
    save_hf(tiny_gpt2(n_layer=3, d_model=32, n_head=4, seq_len=64, seed=3), model_dir)
    model = load_model(model_dir)
    stats = compute_key_stats(model, HP.layer, data.load_wikitext()[:200], "wiki200")
    return model_dir, model, stats, prepare(model, HP, jax.random.key(0), stats=stats)


def run_on_four_devices(model_dir, stats, context, tmp_path):
    np.savez(tmp_path / "context.npz", moment=stats.moment, count=stats.count)
    hparams = {"layer": HP.layer, "v_num_grad_steps": HP.v_num_grad_steps, "v_lr": HP.v_lr,
               "context_template_length_params": HP.context_template_length_params}
    (tmp_path / "spec.json").write_text(json.dumps({
        "hparams": hparams, "templates": list(context.templates.templates),
        "requests": [r.to_dict() for r in REQUESTS]}))
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
           "JAX_PLATFORMS": "cpu",
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-c", SHARDED_RUN, str(model_dir),
                           str(tmp_path / "context.npz"), str(tmp_path)],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return (json.loads((tmp_path / "result.json").read_text()), np.load(tmp_path / "edits.npz"),
            np.load(tmp_path / "solved.npz"))


def test_sharded_edits_equal_one_device_and_single_edits(setup, tmp_path):
    model_dir, model, stats, context = setup
    result, sharded, solved = run_on_four_devices(model_dir, stats, context, tmp_path)

    # the program ran on 4 devices, each holding 2 of the 8 rows (6 requests + 2 copies)
    assert result["n_devices"] == 4
    assert set(result["out_devices"]) == {4} and all(result["out_on_data_axis"])
    assert set(result["out_rows"]) == {8}
    assert result["shard_rows"] == [[2]] * len(result["out_rows"])
    np.testing.assert_array_equal(sharded["factor"], context.factor)  # the same context

    one_device, one_reports = edit_independent(model, REQUESTS, HP, "c-rome", context=context,
                                               devices=jax.devices()[:1])
    key_dir = lambda edit: edit.deltas[HP.layer].left[..., 0]        # rank-one factors
    value_delta = lambda edit: edit.deltas[HP.layer].right[..., 0, :]
    assert key_dir(one_device).shape == (len(REQUESTS), model.config.d_mlp)
    assert sharded["key_dir"].shape == key_dir(one_device).shape
    # Each device's program has 2 rows where the 1-device one has 6 and a single edit 1, so XLA
    # may order float32 sums differently; C⁻¹ amplifies that in key_dir. Measured: row errors
    # <= 4e-6 relative (key_dir), <= 1.4e-6 (value_delta and the reports); bounds 25x that.
    assert_rows_close(sharded["key_dir"], key_dir(one_device))
    assert_rows_close(sharded["value_delta"], value_delta(one_device))
    for four, one, request in zip(result["reports"], one_reports, REQUESTS):
        assert four["request"] == request.to_dict() == one.request  # request order kept
        assert four["v_steps"] == one.v_steps
        for field in ("denominator", "numerator_norm", "delta_norm", "key_cosine", "v_losses"):
            np.testing.assert_allclose(four[field], getattr(one, field), rtol=1e-4,
                                       err_msg=field)

    for i, request in enumerate(REQUESTS):
        single, report = compute_edit(model, request, HP, "c-rome", context=context)
        assert_rows_close(sharded["key_dir"][i:i + 1], key_dir(single)[None])
        assert_rows_close(sharded["value_delta"][i:i + 1], value_delta(single)[None])
        assert result["reports"][i]["v_steps"] == report.v_steps

    # solve_independent on 4 devices: each request's keys and v* are solve's
    for i, request in enumerate(REQUESTS):
        one = solve(model, request, HP, context=context)
        for name, value in (("plain", one.keys.plain), ("mean", one.keys.mean),
                            ("v_star", one.values.v_star)):
            assert_rows_close(solved[name][i:i + 1], np.asarray(value)[None])


def test_solve_many_keeps_order_errors_and_nones(setup):
    _, model, _, context = setup
    too_long = EditRequest("{} " + "and then " * 40 + "is in", "Paris", "Rome", "France")
    requests = [REQUESTS[0], None, too_long, REQUESTS[1].to_dict(), REQUESTS[2]]
    single = [solve(model, r, HP, context=context) for r in (REQUESTS[0], REQUESTS[1],
                                                            REQUESTS[2])]
    for batch in (1, 2, 4):
        out = list(solve_many(model, requests, HP, context=context, batch=batch))
        assert len(out) == len(requests)
        assert out[1] is None
        assert isinstance(out[2], ValueError) and "exceed" in str(out[2])
        for got, want in zip((out[0], out[3], out[4]), single):
            assert isinstance(got, Solved)
            for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
                if batch == 1:  # through solve itself: bit for bit
                    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
                else:
                    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4,
                                               atol=1e-5)
    with pytest.raises(ValueError, match="batch"):
        next(solve_many(model, requests, HP, context=context, batch=0))


def test_pad_rows_repeats_the_last_row_up_to_a_multiple():
    tree = {"a": np.arange(6).reshape(3, 2), "b": np.arange(3)}
    padded = pad_rows(tree, 4)
    np.testing.assert_array_equal(padded["b"], [0, 1, 2, 2])
    np.testing.assert_array_equal(padded["a"][3], tree["a"][2])
    assert pad_rows(tree, 3) is not None and pad_rows(tree, 3)["b"].shape == (3,)


def test_batch_mesh_refuses_no_devices():
    assert batch_mesh().size == len(jax.devices())
    with pytest.raises(ValueError, match="devices"):
        batch_mesh([])
