"""Sharded parameters (``rome_jax.sharding``): on 4 and 8 forced CPU devices, random GPT-J-
and Llama-shaped models loaded onto a data x model mesh give the unsharded model's logits, key
statistics and edits by every editor (c-rome, k2-rome, MEMIT, EMMET, AlphaEdit; 1e-5 relative
on Δ and on the logits after it), every rule-sharded weight's shards hold 1/M of it, the
loader reads one tensor at a time, ``save_hf`` gathers one tensor at a time, and an export of a
sharded edit loads in transformers with the same logits. The batch editors' v* targets are
solved as one program over the requests, split over the data axis (Llama: data=2).

XLA_FLAGS must be set before jax is imported, so each device count is one subprocess
(``SHARDED_RUN``, both families in it). The margin of 1e-5 is thin (C's float32 rounding,
~1e-7 relative, reaches Δ through C⁻¹), so the models, written here by rome_jax itself, are
chosen for a well conditioned C: dense weights of std 1/sqrt(fan-in), small biases, an MLP as
wide as the residual (GPT-J's C at layer 1: condition number about 500; 1e5 at GPT-2's init
scale with F = 2D, measured). v* is optimised below the top layer: at the top layer of these
models Adam's normalised steps diverge, and there one device against four differ by O(1) even
unsharded. The batch editors edit layers 1-2, v*'s layer the top one. AlphaEdit's projector
onto C's small eigenvalues moves by about δC / (the gap in C's spectrum at its threshold): at
the original's 2e-2 (absolute) GPT-J's eigenvalues lie 2e-3 apart and its sharded Δ is off by
4.3e-5 (Llama's C has none below 2e-2: Δ = 0), so the run puts the threshold at 0.9 of C's
largest eigenvalue, in gaps of at least 0.14 of it. c-rome and k2-rome edit a subject at
position 0, where k2-rome's second key gets its own target (its Δ is not c-rome's). Measured
(``run_sharded`` on 4 and 8 devices): the largest error 4.2e-6 (Llama's AlphaEdit Δ at
layer 2), MEMIT's and EMMET's Δ ≤ 3.5e-6, c-rome's and k2-rome's ≤ 2.1e-6, C ≤ 1.9e-7,
logits before and after the edits ≤ 4.5e-7.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from conftest import copy_tokenizer
from safetensors.numpy import load_file, save_file

from rome_jax import save_hf
from rome_jax.models.config import ModelConfig
from rome_jax.models.model import FAMILIES, Model
from rome_jax.models.tokenizer import Tokenizer
from rome_jax.sharding import (RULES, initialize_distributed, make_mesh, param_spec,
                               parse_mesh)

REPO = Path(__file__).resolve().parents[1]
VOCAB = 512  # GPT-2's first 512 tokens: divisible by 4 and 8, so the vocabulary is split
CONFIGS = {
    "gptj": dict(model_type="gptj", vocab_size=VOCAB, n_positions=128, n_embd=64, n_layer=4,
                 n_head=8, rotary_dim=4, n_inner=64, activation_function="gelu_new",
                 layer_norm_epsilon=1e-5),
    "llama": dict(model_type="llama", vocab_size=VOCAB, max_position_embeddings=128,
                  hidden_size=64, intermediate_size=64, num_hidden_layers=4,
                  num_attention_heads=8, num_key_value_heads=4, rms_norm_eps=1e-6,
                  rope_theta=10000.0, tie_word_embeddings=False, hidden_act="silu"),
}
# Split over the model axis (every other leaf is replicated); wte and lm_head by vocabulary.
SHARDED = {"gptj": {"wte", "lm_head/w", "lm_head/b", "blocks/attn/q/w", "blocks/attn/k/w",
                    "blocks/attn/v/w", "blocks/attn/o/w", "blocks/mlp/fc_in/w",
                    "blocks/mlp/fc_in/b", "blocks/mlp/fc_out/w"},
           "llama": {"wte", "lm_head/w", "blocks/attn/q/w", "blocks/attn/k/w", "blocks/attn/v/w",
                     "blocks/attn/o/w", "blocks/mlp/gate/w", "blocks/mlp/fc_in/w",
                     "blocks/mlp/fc_out/w"}}

# Runs in the subprocess: argv = models dir, output dir, {family: mesh spec} as JSON.
SHARDED_RUN = r"""
import json, sys, weakref
from pathlib import Path
import jax, numpy as np
import rome_jax.hf as hf
from rome_jax import load_model, logits, save_hf
from rome_jax.editors.batch import edit_batch, prepare_batch, solve_targets
from rome_jax.editors.delta import apply_edit
from rome_jax.editors.hparams import BatchHParams
from rome_jax.rome.edit import compute_edit, prepare, solve
from rome_jax.rome.hparams import RomeHParams
from rome_jax.rome.request import EditRequest
from rome_jax.rome.stats import compute_layer_stats
from rome_jax.sharding import leaf_name

ArrayImpl = type(jax.numpy.zeros(0))  # np.asarray(a jax.Array) calls its __array__
root, out, meshes = Path(sys.argv[1]), Path(sys.argv[2]), json.loads(sys.argv[3])
setup = json.loads((root / "setup.json").read_text())
texts, ids = setup["texts"], np.asarray(setup["ids"])
templates = setup["templates"]
requests = [EditRequest(**r) for r in setup["requests"]]
single = EditRequest(**setup["single_request"])  # c-rome's and k2-rome's
hp = RomeHParams(layer=1, v_num_grad_steps=5, v_lr=0.1, mom2_ridge=1e-3)
bhp = BatchHParams(layers=(1, 2), v=RomeHParams(layer=2, v_num_grad_steps=5, v_lr=0.1))
batch_hp = {"memit": bhp, "emmet": bhp,  # AlphaEdit's threshold in a wide gap of C's spectrum
            "alphaedit": bhp.replace(nullspace_threshold=0.9, nullspace_relative=True)}

live, most_alive = [], 0
read = hf._get
def tracked(handle, name, file):  # every tensor read from a file, and how many are alive
    global most_alive
    tensor = read(handle, name, file)
    live.append(weakref.ref(tensor))
    most_alive = max(most_alive, sum(r() is not None for r in live))
    return tensor
hf._get = tracked
place, staged = hf.shard_params, []
def placing(params, mesh):  # the params as the family built them, before the rules place them
    staged.extend(leaf.size // max(s.data.size for s in leaf.addressable_shards)
                  for leaf in jax.tree.leaves(params))
    return place(params, mesh)
hf.shard_params = placing
gathered, most_gathered = [], 0
to_host = ArrayImpl.__array__
def gathering(array, *args, **kwargs):  # every device-to-host copy, and how many are alive
    global most_gathered
    host = to_host(array, *args, **kwargs)
    gathered.append(weakref.ref(host))
    most_gathered = max(most_gathered, sum(r() is not None for r in gathered))
    return host

def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))

def run(model):
    stats = compute_layer_stats(model, [1, 2], texts, "t", batch_size=8)
    context = prepare(model, hp, templates=templates, stats=stats[1])
    solved = solve(model, single, hp, context=context)  # keys and v*: c-rome's and k2-rome's
    edits = {method: compute_edit(model, single, hp, method, context=context, solved=solved)[0]
             for method in ("c-rome", "k2-rome")}
    targets = None  # MEMIT's, EMMET's and AlphaEdit's v* (the same hparams.v): solved once
    for method, bhp_m in batch_hp.items():
        bcontext = prepare_batch(model, method, bhp_m, templates=templates, stats=stats)
        if targets is None:
            targets = solve_targets(model, requests, bhp_m, bcontext)
        edits[method] = edit_batch(model, requests, method, bhp_m, context=bcontext,
                                   targets=targets).edit
    got = dict(logits=logits(model, ids), C1=stats[1].moment, C2=stats[2].moment)
    for method, edit in edits.items():
        for layer in edit.layers:
            got[f"{method} Δ{layer}"] = edit.weight_delta(layer)
        got[f"{method} logits"] = logits(model.with_params(apply_edit(model.params, edit)), ids)
    return got, apply_edit(model.params, edits["c-rome"])

result = {"n_devices": len(jax.devices())}
for family, spec in meshes.items():
    plain = load_model(root / family)
    most_alive, live[:], staged[:] = 0, [], []
    sharded = load_model(root / f"{family}-shards", mesh=spec)
    result[family] = {"reads": len(live), "most_alive": most_alive, "staged": sorted(set(staged))}
    mesh = jax.tree.leaves(sharded.params)[0].sharding.mesh
    placed = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(sharded.params)[0]:
        sizes = {s.data.size for s in leaf.addressable_shards}
        placed[leaf_name(path)] = {"split": "model" in leaf.sharding.spec,
                                   "fraction": [leaf.size // s for s in sizes],
                                   "mesh": leaf.sharding.mesh == mesh}
    result[family]["placed"] = placed
    ref, _ = run(plain)
    got, edited = run(sharded)
    result[family]["errors"] = {k: rel(got[k], ref[k]) for k in ref}
    result[family]["k2_beyond_c_rome"] = rel(ref["k2-rome Δ1"], ref["c-rome Δ1"])
    result[family]["edited_split"] = [
        "model" in leaf.sharding.spec for leaf in jax.tree.leaves(edited["blocks"]["mlp"])]
    gathered[:], most_gathered = [], 0
    ArrayImpl.__array__ = gathering
    save_hf(sharded.with_params(edited), out / f"{family}-export")
    ArrayImpl.__array__ = to_host
    result[family].update(gathers=len(gathered), most_gathered=most_gathered)
    np.save(out / f"{family}-rome-logits.npy", np.asarray(ref["c-rome logits"]))
(out / "result.json").write_text(json.dumps(result))
"""

WORDS = ("the river city north old stone bridge music green king paper winter light house "
         "small market road lake song field tower school garden ship iron").split()


def random_model(family: str, path: Path, seed: int) -> None:
    """A random ``family`` model (see the module docstring) written as an HF directory (one
    safetensors file) and as 3 safetensors shards with an index (``path``-shards)."""
    cfg = ModelConfig.from_hf(CONFIGS[family])
    rng = np.random.default_rng(seed)

    def draw(name: str, shape: tuple) -> jax.Array:
        if name.endswith("weight") and len(shape) == 1:  # a norm's scale
            return 1.0 + 0.1 * rng.standard_normal(shape, np.float32)
        if len(shape) == 1:  # a bias
            return 0.02 * rng.standard_normal(shape, np.float32)
        scale = 1.0 if name.endswith(("wte.weight", "embed_tokens.weight")) else shape[1] ** -0.5
        return scale * rng.standard_normal(shape, np.float32)

    path.mkdir()
    copy_tokenizer(path, VOCAB)
    params = FAMILIES[cfg.model_type].import_weights(draw, cfg)
    save_hf(Model(cfg, params, Tokenizer.from_dir(path)), path, overwrite=True)
    shards = path.with_name(path.name + "-shards")
    shards.mkdir()
    tensors = load_file(str(path / "model.safetensors"))
    names, weight_map = sorted(tensors), {}
    for i in range(3):
        file = f"model-{i + 1:05d}-of-00003.safetensors"
        part = names[i::3]
        save_file({n: tensors[n] for n in part}, str(shards / file), metadata={"format": "pt"})
        weight_map.update({n: file for n in part})
    (shards / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    for file in path.iterdir():
        if file.suffix != ".safetensors":
            (shards / file.name).write_bytes(file.read_bytes())


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("param-sharding")
    for seed, family in enumerate(CONFIGS):
        random_model(family, root / family, seed)
    rng = np.random.default_rng(7)
    texts = [" ".join(rng.choice(WORDS, rng.integers(8, 20))) + "." for _ in range(48)]
    (root / "setup.json").write_text(json.dumps({
        "texts": texts, "ids": rng.integers(0, VOCAB, (2, 10)).tolist(),
        "templates": ["{}", "Then. {}", "A song: {}", "In winter, {}"],
        "requests": [dict(prompt="{} is in the", subject="The old tower", target_new=" lake",
                          target_true=" city"),
                     dict(prompt="The song of {} is", subject="the king", target_new=" green",
                          target_true=" small"),
                     dict(prompt="{} sails to", subject="The iron ship", target_new=" north",
                          target_true=" road")],
        # c-rome's and k2-rome's: a one-token subject at position 0 ("The", GPT-2's token
        # 464), where k2-rome's second key gets a target of its own
        "single_request": dict(prompt="{} old tower is in the", subject="The",
                               target_new=" lake", target_true=" city")}))
    return root


def run_sharded(root: Path, n_devices: int, meshes: dict[str, str], out: Path) -> dict:
    """``SHARDED_RUN`` on ``n_devices`` forced CPU devices, each family of ``meshes`` on its
    mesh spec; its result.json."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": f"--xla_force_host_platform_device_count={n_devices}",
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-c", SHARDED_RUN, str(root), str(out),
                           json.dumps(meshes)], env=env, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((out / "result.json").read_text())


EDITORS = {"c-rome", "k2-rome", "memit", "emmet", "alphaedit"}  # rome_jax.editors' closed forms


# both families on each device count, one subprocess each: GPT-J on the model axis alone (4,
# then 8: every dimension the rules name divides by 8), Llama with data=2 (its v* targets split
# over data) by model=2, then 4; slow (about 2.5 min each): `pytest -m slow`
@pytest.mark.slow
@pytest.mark.parametrize("n_devices, meshes", [
    (4, {"gptj": "data=1,model=4", "llama": "data=2,model=2"}),
    (8, {"gptj": "data=1,model=8", "llama": "data=2,model=4"})], ids=["4dev", "8dev"])
def test_sharded_edits_equal_unsharded(models, tmp_path, n_devices, meshes):
    transformers = pytest.importorskip("transformers")
    torch = pytest.importorskip("torch")
    result = run_sharded(models, n_devices, meshes, tmp_path)
    assert result["n_devices"] == n_devices
    setup = json.loads((models / "setup.json").read_text())
    for family, spec in meshes.items():
        got, m = result[family], parse_mesh(spec, n_devices)["model"]
        # every tensor read from the 3 files once, and each dropped before the next is read
        n_tensors = len(load_file(str(models / family / "model.safetensors")))
        assert got["reads"] == n_tensors and got["most_alive"] == 1, (family, got)
        # and each went to the devices split M ways (every size here is divisible by M): while
        # the model was assembled, only the one tensor being read was ever whole
        assert got["staged"] == [m], (family, got["staged"])
        # the rules' weights split 1/M over the model axis (replicated over data); the rest whole
        split = {name for name, p in got["placed"].items() if p["split"]}
        assert split == SHARDED[family], family
        for name, placed in got["placed"].items():
            assert placed["mesh"] and placed["fraction"] == [m if name in split else 1], name
        # logits, C, every editor's Δ and the logits after it (a Δ of 0 would give nan here)
        assert {what.split(" ")[0] for what in got["errors"]} >= EDITORS, got["errors"]
        for what, error in got["errors"].items():
            assert error < 1e-5, f"{family} {what}: {json.dumps(got['errors'])}"
        # k2-rome's second key did something: its Δ is not c-rome's at the same solve
        assert got["k2_beyond_c_rome"] > 0.1, (family, got["k2_beyond_c_rome"])
        assert any(got["edited_split"])  # the edited weights stay split
        # save_hf gathered each tensor to the host once, and dropped it before the next
        assert got["gathers"] == n_tensors and got["most_gathered"] == 1, (family, got)
        # the export of the sharded ROME edit loads in transformers with the same logits
        hf = transformers.AutoModelForCausalLM.from_pretrained(
            tmp_path / f"{family}-export").float().eval()
        with torch.no_grad():
            exported = hf(torch.as_tensor(setup["ids"])).logits.numpy()
        want = np.load(tmp_path / f"{family}-rome-logits.npy")
        np.testing.assert_allclose(exported, want, atol=1e-4, rtol=0, err_msg=family)


def test_mesh_specs_and_rules():
    assert parse_mesh(None, 8) == {"data": 8, "model": 1}
    assert parse_mesh("data=2,model=4", 8) == {"data": 2, "model": 4}
    assert parse_mesh("model=4", 8) == {"data": 2, "model": 4}
    assert parse_mesh({"data": 1}, 1) == {"data": 1, "model": 1}
    for bad, match in (("data=3,model=4", "data=3 x model=4 is 12 devices, but there are 8"),
                       ("data=2,model=x", "not data=D,model=M"), ("rows=8", "axes are data"),
                       ("", "axes are data")):
        with pytest.raises(ValueError, match=f"^mesh: .*{match}"):
            parse_mesh(bad, 8)
    mesh = make_mesh()
    assert mesh.axis_names == ("data", "model") and mesh.shape["model"] == 1
    assert make_mesh(mesh) is mesh
    assert len(RULES) == len({pattern for pattern, _ in RULES})
    # a dimension the model axis does not divide stays whole
    grid = jax.sharding.Mesh(np.asarray(jax.devices() * 1).reshape(1, -1), ("data", "model"))
    assert param_spec("blocks/mlp/fc_out/w", (2, 8, 4), grid) == jax.P(None, "model", None)
    assert param_spec("ln_f/scale", (8,), grid) == jax.P()


def test_distributed_only_with_a_coordinator(monkeypatch):
    calls = []
    monkeypatch.setattr(jax.distributed, "initialize", lambda *a, **k: calls.append((a, k)))
    assert not initialize_distributed({})
    assert initialize_distributed({"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234",
                                   "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "1"})
    assert calls == [(("10.0.0.1:1234",), {"num_processes": 2, "process_id": 1})]
    with pytest.raises(ValueError, match="^JAX_PROCESS_ID: 'one'"):
        initialize_distributed({"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_PROCESS_ID": "one"})


def test_the_cli_mesh_reaches_the_loader_and_names_itself(tmp_path, capsys):
    from conftest import in_process_env

    from rome_jax import cli as rome_cli

    with in_process_env(tmp_path):
        status = rome_cli.main(["stats", "--layer", "1", "--mesh", "data=3,model=5"])
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and len(err) == 1, err
    assert err[0].endswith(f"--mesh: data=3 x model=5 is 15 devices, but there are "
                           f"{len(jax.devices())}"), err
