"""Flax ``flax_model.msgpack`` checkpoints: read as transformers' Flax classes wrote them, written
the same way by ``save_hf(format="flax")``, bad files refused in one line naming the key.

transformers 5 has no Flax classes, so the test builds the msgpack itself from the torch model's
own weights, as transformers' PyTorch -> Flax conversion did: by the kind of module each
parameter belongs to (``hf_flax_params``), not by the names rome_jax maps.
"""

from __future__ import annotations

import json
import shutil

import jax
import jax.numpy as jnp
import msgpack
import numpy as np
import pytest
from flax import serialization, traverse_util
from conftest import tracked_decodes
from test_hf_parity import CONFIGS

import rome_jax
from rome_jax.models import flax_checkpoint

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

ATOL = 1e-4
# tests/test_hf_parity.py's cases, so the session shares the models.
CASES = {name: CONFIGS[name] for name in ("gpt2", "gptj-partial-rotary", "llama-gqa2-tied",
                                          "llama-3heads-mqa-biases")}


def hf_flax_params(torch_model, family: str) -> dict:
    """The params tree of transformers' Flax twin of ``torch_model`` (FlaxGPT2LMHeadModel,
    FlaxGPTJForCausalLM, FlaxLlamaForCausalLM): the torch module path split at its dots; an
    ``Embedding``'s weight is ``embedding``, a ``LayerNorm``'s ``scale``, a ``Linear``'s or
    ``Conv1D``'s ``kernel``, transposed; anything else (RMSNorm weights, biases) as is. A tied
    head is absent from Flax GPT-2 / GPT-J (they reuse ``wte``); Flax Llama always has one."""
    from transformers.pytorch_utils import Conv1D

    tree: dict = {}
    for module_name, module in torch_model.named_modules():
        if module_name == "lm_head" and torch_model.config.tie_word_embeddings \
                and family != "llama":
            continue
        for leaf, param in module.named_parameters(recurse=False):
            value = param.detach().numpy()
            if isinstance(module, torch.nn.Embedding):
                leaf = "embedding"
            elif isinstance(module, torch.nn.LayerNorm) and leaf == "weight":
                leaf = "scale"
            elif isinstance(module, (torch.nn.Linear, Conv1D)) and leaf == "weight":
                leaf, value = "kernel", value.T
            node = tree
            for part in module_name.split("."):
                node = node.setdefault(part, {})
            node[leaf] = np.ascontiguousarray(value)
    return tree


def flax_dir(hf, tree: dict, path):
    """A model directory whose weights are only ``flax_model.msgpack`` holding ``tree``."""
    path.mkdir()
    (path / flax_checkpoint.FILE).write_bytes(serialization.msgpack_serialize(tree))
    for name in ("config.json", "vocab.json", "merges.txt"):
        shutil.copyfile(hf.path / name, path / name)
    return path


def flat(file) -> dict:
    return traverse_util.flatten_dict(serialization.msgpack_restore(file.read_bytes()), sep="/")


def assert_trees_equal(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b)
    for key in a:
        assert a[key].dtype == b[key].dtype, key
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def _ids(vocab: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, vocab, size=(3, 12), dtype=np.int32)


@pytest.mark.parametrize("name", sorted(CASES))
def test_flax_checkpoint_equals_transformers_and_round_trips(name, hf_model, tmp_path):
    family, overrides = CASES[name]
    hf = hf_model(family, **overrides)
    tree = hf_flax_params(hf.torch_model, family)
    d = flax_dir(hf, tree, tmp_path / "flax")
    model = rome_jax.load_model(d)
    ids = _ids(model.config.vocab_size)
    np.testing.assert_allclose(np.asarray(rome_jax.logits(model, ids)), hf.logits(ids),
                               atol=ATOL, rtol=0)
    # The same params, bit for bit, as from the torch model's safetensors.
    jax.tree.map(np.testing.assert_array_equal, model.params, rome_jax.load_model(hf.path).params)

    out = rome_jax.save_hf(model, tmp_path / "export", format="flax")
    files = {p.name for p in out.iterdir()}
    assert {"config.json", flax_checkpoint.FILE, "vocab.json", "merges.txt"} <= files
    assert "model.safetensors" not in files
    # The export is the tree transformers' Flax class holds, bit for bit ...
    assert_trees_equal(flat(out / flax_checkpoint.FILE), flat(d / flax_checkpoint.FILE))
    # ... and loads back to the same model.
    again = rome_jax.load_model(out)
    assert again.config == model.config
    jax.tree.map(np.testing.assert_array_equal, again.params, model.params)


def test_bfloat16_msgpack_round_trip(hf_model, tmp_path):
    """A bfloat16 file loads as its source dtype and is written back bit for bit."""
    hf = hf_model("llama", **CASES["llama-gqa2-tied"][1])
    tree = jax.tree.map(lambda a: np.asarray(jnp.asarray(a, jnp.bfloat16)),
                        hf_flax_params(hf.torch_model, "llama"))
    d = flax_dir(hf, tree, tmp_path / "bf16")
    model = rome_jax.load_model(d)
    assert model.source_dtype == "bfloat16"
    out = rome_jax.save_hf(model, tmp_path / "export", format="flax")
    assert_trees_equal(flat(out / flax_checkpoint.FILE), flat(d / flax_checkpoint.FILE))


def test_sharded_flax_checkpoint(hf_model, tmp_path):
    """Shards named by ``flax_model.msgpack.index.json``, as transformers' Flax
    ``save_pretrained(max_shard_size=...)`` wrote them (each a nested tree)."""
    hf = hf_model("gpt2")
    leaves = traverse_util.flatten_dict(hf_flax_params(hf.torch_model, "gpt2"), sep="/")
    d = tmp_path / "sharded"
    d.mkdir()
    names = ["flax_model-00001-of-00002.msgpack", "flax_model-00002-of-00002.msgpack"]
    weight_map = {key: names[i % 2] for i, key in enumerate(sorted(leaves))}
    for file in names:
        shard = {k: v for k, v in leaves.items() if weight_map[k] == file}
        (d / file).write_bytes(serialization.msgpack_serialize(
            traverse_util.unflatten_dict(shard, sep="/")))
    (d / flax_checkpoint.INDEX).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    for name in ("config.json", "vocab.json", "merges.txt"):
        shutil.copyfile(hf.path / name, d / name)
    model = rome_jax.load_model(d)
    ids = _ids(model.config.vocab_size, seed=1)
    np.testing.assert_allclose(np.asarray(rome_jax.logits(model, ids)), hf.logits(ids),
                               atol=ATOL, rtol=0)


def _bad(tree: dict, damage: str) -> dict:
    leaves = traverse_util.flatten_dict(tree, sep="/")
    h0 = "transformer/h/0/"
    if damage == "missing":
        del leaves["transformer/h/1/mlp/c_fc/kernel"]
    elif damage == "shape":
        leaves[h0 + "attn/c_proj/kernel"] = np.zeros((32, 33), np.float32)
    elif damage == "unknown-tensor":
        leaves[h0 + "attn/extra/kernel"] = np.zeros((32, 32), np.float32)
    elif damage == "unknown-leaf":
        leaves[h0 + "attn/c_proj/gamma"] = leaves.pop(h0 + "attn/c_proj/kernel")
    elif damage == "wrong-kind":
        leaves["transformer/wte/kernel"] = leaves.pop("transformer/wte/embedding").T
    elif damage == "not-an-array":
        leaves["transformer/ln_f/scale"] = "1.0"
    elif damage == "nan":
        leaves[h0 + "mlp/c_fc/bias"] = np.full_like(leaves[h0 + "mlp/c_fc/bias"], np.nan)
    return traverse_util.unflatten_dict(leaves, sep="/")


BAD = {
    "truncated": r"not a readable Flax msgpack file, truncated or corrupt",
    "not-a-map": r"not a Flax params tree \(a msgpack map of names\), got a list",
    "missing": r"missing tensor 'h/1/mlp/c_fc/kernel' \(a gpt2 with 2 layers needs it\)",
    "shape": r"tensor 'transformer/h/0/attn/c_proj/kernel' has shape \(32, 33\), expected "
             r"\(32, 32\)",
    "unknown-tensor": r"unexpected tensors \['transformer/h/0/attn/extra/kernel'\] for a gpt2",
    "unknown-leaf": r"unexpected key 'transformer/h/0/attn/c_proj/gamma' \(2-D\)$",
    "wrong-kind": r"unexpected key 'transformer/wte/kernel' \(2-D\); a gpt2 model stores this "
                  r"tensor as 'transformer/wte/embedding'",
    "not-an-array": r"'transformer/ln_f/scale' holds a str, not an array",
    "nan": r"tensor 'transformer/h/0/mlp/c_fc/bias' holds NaN or infinite values",
}


@pytest.mark.parametrize("damage", sorted(BAD))
def test_bad_flax_checkpoint_is_refused_naming_the_key(damage, hf_model, tmp_path):
    hf = hf_model("gpt2")
    tree = hf_flax_params(hf.torch_model, "gpt2")
    d = flax_dir(hf, _bad(tree, damage), tmp_path / damage)
    file = d / flax_checkpoint.FILE
    if damage == "truncated":
        file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])
    elif damage == "not-a-map":
        file.write_bytes(serialization.msgpack_serialize([1, 2]))
    with pytest.raises(ValueError, match=BAD[damage]) as err:
        rome_jax.load_model(d)
    message = str(err.value)
    assert "\n" not in message and message.startswith(str(file))


def test_save_hf_refuses_an_unknown_format(hf_model, tmp_path):
    model = rome_jax.load_model(hf_model("gpt2").path)
    with pytest.raises(ValueError, match=r"format must be one of safetensors, flax, got 'onnx'"):
        rome_jax.save_hf(model, tmp_path / "out", format="onnx")
    assert not (tmp_path / "out").exists()


def test_edit_format_flag(hf_model, tmp_path):
    """``edit --format flax`` reaches the export (``_write_outputs``), and needs ``--out``."""
    from rome_jax.cli import build_parser
    from rome_jax.cli.edit import _write_outputs

    args = build_parser().parse_args(["edit", "--prompt", "{} plays", "--subject", "A",
                                      "--target-new", "B", "--format", "flax"])
    with pytest.raises(ValueError, match=r"--format flax: .* give --out DIR"):
        args.func(args)
    model = rome_jax.load_model(hf_model("gpt2").path)
    out = tmp_path / "edited"
    _write_outputs(model, out, {"status": "applied"}, None, False, "flax")
    assert (out / flax_checkpoint.FILE).is_file() and not (out / "model.safetensors").exists()
    jax.tree.map(np.testing.assert_array_equal, rome_jax.load_model(out).params, model.params)


def test_hub_id_without_safetensors_downloads_the_flax_weights(hf_model, tmp_path, monkeypatch):
    """A hub repository with safetensors gets them alone; one without (Flax only) gets its
    ``flax_model.msgpack`` (``snapshot_download`` faked by a local repository)."""
    import fnmatch

    import huggingface_hub

    hf = hf_model("gpt2")
    repos = {"user/st": hf.path,
             "user/flax": flax_dir(hf, hf_flax_params(hf.torch_model, "gpt2"), tmp_path / "fx")}
    calls = []

    def snapshot_download(repo_id, allow_patterns):
        calls.append((repo_id, allow_patterns))
        snapshot = tmp_path / "hub" / repo_id / str(len(calls))
        snapshot.mkdir(parents=True)
        for file in repos[repo_id].iterdir():
            if any(fnmatch.fnmatch(file.name, p) for p in allow_patterns):
                shutil.copyfile(file, snapshot / file.name)
        return str(snapshot)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    ids = _ids(hf.config["vocab_size"], seed=2)
    for repo in ("user/st", "user/flax"):
        model = rome_jax.load_model(repo)
        np.testing.assert_allclose(np.asarray(rome_jax.logits(model, ids)), hf.logits(ids),
                                   atol=ATOL, rtol=0)
    assert [repo for repo, _ in calls] == ["user/st", "user/flax", "user/flax"]
    assert not any("msgpack" in p for p in calls[0][1])
    assert flax_checkpoint.FILE in {p.name for p in (tmp_path / "hub/user/flax/3").iterdir()}


# ---------------------------------------------------------------------------------------------
# Lazy reading: read() walks the file's headers and decodes nothing; each array is copied out of
# the memory-mapped file when the import looks it up, once, and dropped once placed.

def random_bits(tree: dict, dtype, seed: int = 0) -> dict:
    """``tree`` with every leaf replaced by random bits of ``dtype`` (NaNs with payloads,
    infinities and subnormals included), so that only a bit-for-bit copy compares equal."""
    rng = np.random.default_rng(seed)
    bits = np.dtype(f"uint{8 * np.dtype(dtype).itemsize}")
    return jax.tree.map(lambda a: rng.integers(0, np.iinfo(bits).max, a.shape, bits,
                                               endpoint=True).view(dtype), tree)


@pytest.mark.parametrize("dtype", [np.float32, jnp.bfloat16])
def test_lazy_read_equals_msgpack_restore_bit_for_bit(dtype, hf_model, tmp_path, monkeypatch):
    """Every tensor ``read`` loads is flax's own decode (``msgpack_restore``) of the same key, bit
    for bit, in HF's layout (a kernel transposed); arrays over flax's MAX_CHUNK_SIZE (made 1 KiB
    here) are written chunked and read whole."""
    from rome_jax.models import gpt2

    hf = hf_model("gpt2")
    monkeypatch.setattr(serialization, "MAX_CHUNK_SIZE", 1024)
    d = flax_dir(hf, random_bits(hf_flax_params(hf.torch_model, "gpt2"), dtype),
                 tmp_path / "bits")
    monkeypatch.undo()
    file = d / flax_checkpoint.FILE
    assert b"__msgpack_chunked_array__" in file.read_bytes()
    eager = flat(file)
    lazy = flax_checkpoint.read(file, gpt2)
    assert sorted(key for key, _ in lazy.values()) == sorted(eager)
    chunked = 0
    for name, (key, load) in lazy.items():
        value = load()
        expected = eager[key].T if key.endswith("/kernel") else eager[key]
        assert value.dtype == expected.dtype == dtype and value.shape == expected.shape, name
        assert value.tobytes() == expected.tobytes(), name
        chunked += expected.nbytes > 1024
    assert chunked >= 4


def test_chunked_msgpack_loads_as_the_safetensors(hf_model, tmp_path, monkeypatch):
    """A file whose arrays flax wrote in chunks loads to the params of the torch model's
    safetensors, bit for bit."""
    hf = hf_model("gpt2")
    monkeypatch.setattr(serialization, "MAX_CHUNK_SIZE", 1024)
    d = flax_dir(hf, hf_flax_params(hf.torch_model, "gpt2"), tmp_path / "chunked")
    monkeypatch.undo()
    jax.tree.map(np.testing.assert_array_equal, rome_jax.load_model(d).params,
                 rome_jax.load_model(hf.path).params)


@pytest.mark.parametrize("mesh", [None, "data=1,model=1"])
def test_msgpack_decodes_nothing_before_lookup_then_each_tensor_once_at_a_time(
        mesh, hf_model, tmp_path, monkeypatch):
    """``read`` decodes no array; ``load_model`` decodes each once and drops it (placed as a jax
    array) before the next one is decoded. In bfloat16, as tests/test_gguf.py's twin: a float32
    array jax may take as a param's own buffer would stay alive in the params."""
    from rome_jax.models import gpt2

    hf = hf_model("gpt2")
    d = flax_dir(hf, hf_flax_params(hf.torch_model, "gpt2"), tmp_path / "lazy")
    file = d / flax_checkpoint.FILE
    spans, alive = tracked_decodes(monkeypatch, flax_checkpoint, lambda buf, array: array.spans)
    read = flax_checkpoint.read(file, gpt2)
    assert spans == [] and len(read) == len(flat(file))
    read["transformer.h.1.mlp.c_fc.weight"][1]()
    assert len(spans) == 1
    spans.clear()
    alive.clear()
    model = rome_jax.load_model(d, dtype=jnp.bfloat16, mesh=mesh)
    assert len(spans) == len(set(spans)) == len(read)
    assert max(alive) == 1
    monkeypatch.undo()
    jax.tree.map(np.testing.assert_array_equal, model.params,
                 rome_jax.load_model(hf.path, dtype=jnp.bfloat16).params)


def test_msgpack_peak_host_memory_is_a_few_tensors_not_the_file(hf_model, tmp_path):
    """numpy's and Python's allocations (traced by tracemalloc; the mapped file and jax's device
    buffers are not) while a 4-layer float32 GPT-2 msgpack of 12.8 MB loads (in bfloat16: no
    decoded array becomes a param's buffer): measured 1.67 MB at the peak, its largest tensor
    (1.05 MB) and change, against 26.5 MB when the file was decoded whole by
    ``msgpack_restore`` (its bytes and the arrays)."""
    import tracemalloc

    hf = hf_model("gpt2", n_embd=256, n_layer=4, n_head=4)
    d = flax_dir(hf, hf_flax_params(hf.torch_model, "gpt2"), tmp_path / "big")
    total = (d / flax_checkpoint.FILE).stat().st_size
    rome_jax.load_model(d, dtype=jnp.bfloat16)  # compile the checks first
    tracemalloc.start()
    try:
        rome_jax.load_model(d, dtype=jnp.bfloat16)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < total / 4, (peak, total)


def _ext(payload: tuple) -> bytes:
    """A flax ndarray ext object (type 1) holding ``payload``, as msgpack packs it."""
    return msgpack.packb(msgpack.ExtType(1, msgpack.packb(payload, use_bin_type=True)))


def _corrupt(raw: bytes, damage: str) -> bytes:
    """``raw`` (a GPT-2 params tree whose ``ln_f/bias`` is 32 float32 zeros) damaged: cut,
    extended, or with that leaf rewritten."""
    bias = _ext(((32,), "float32", bytes(128)))
    assert raw.count(bias) == 1
    if damage == "cut-last-byte":
        return raw[:-1]
    if damage == "trailing-bytes":
        return raw + b"\x00"
    if damage == "empty":
        return b""
    if damage == "no-msgpack-type":
        return raw.replace(bias, b"\xc1")
    if damage.startswith("chunked"):  # flax's layout of an array over MAX_CHUNK_SIZE, halved
        half = msgpack.ExtType(1, msgpack.packb(((16,), "float32", bytes(64)), use_bin_type=True))
        return raw.replace(bias, msgpack.packb({
            "__msgpack_chunked_array__": True,
            "shape": {"0": 33 if damage == "chunked-size" else 32},
            "chunks": {"0": half, "2" if damage == "chunked-keys" else "1": half}}))
    replacement = {
        "short-array-bytes": ((32,), "float32", bytes(124)),
        "negative-dim": ((-32,), "float32", bytes(128)),
        "not-a-triple": ((32,), "float32"),
    }[damage]
    return raw.replace(bias, _ext(replacement))


CORRUPT = {
    "cut-last-byte": r"an object at byte \d+ runs past byte \d+",
    "trailing-bytes": r"1 bytes after the params tree",
    "empty": r"an object at byte 0 runs past byte 0",
    "no-msgpack-type": r"byte \d+ \(0xc1\) starts no msgpack object",
    "short-array-bytes": r"'transformer/ln_f/bias': 124 bytes for shape \(32,\) float32",
    "negative-dim": r"'transformer/ln_f/bias': its shape holds -32, not a size",
    "not-a-triple": r"'transformer/ln_f/bias' is no \[shape, dtype, bytes\] array",
    "chunked-size": r"'transformer/ln_f/bias': its chunks are not 1-D arrays of one dtype holding "
                    r"the 33 elements of shape \(33,\)",
    "chunked-keys": r"'transformer/ln_f/bias': a chunked array's map has the keys \['0', '2'\], "
                    r"not 0, 1, ...",
}


@pytest.mark.parametrize("damage", sorted(CORRUPT))
def test_corrupt_msgpack_is_refused_naming_the_file(damage, hf_model, tmp_path):
    """Bytes that are no msgpack, or an array ext that is not flax's layout, are refused when
    the file is read (before any array is decoded), in one line naming the file."""
    hf = hf_model("gpt2")
    tree = hf_flax_params(hf.torch_model, "gpt2")
    tree["transformer"]["ln_f"]["bias"] = np.zeros(32, np.float32)
    d = flax_dir(hf, tree, tmp_path / damage)
    file = d / flax_checkpoint.FILE
    file.write_bytes(_corrupt(file.read_bytes(), damage))
    with pytest.raises(ValueError, match=r"not a readable Flax msgpack file, truncated or "
                                         rf"corrupt \({CORRUPT[damage]}\)$") as err:
        rome_jax.load_model(d)
    message = str(err.value)
    assert "\n" not in message and message.startswith(str(file))


NOT_AN_ARRAY = {
    "complex": (msgpack.ExtType(2, msgpack.packb((1.0, 2.0))),
                r"'transformer/ln_f/scale' holds a complex, not an array"),
    "numpy-scalar": (msgpack.ExtType(3, msgpack.packb(((), "float32", bytes(4)),
                                                      use_bin_type=True)),
                     r"'transformer/ln_f/scale' holds a numpy scalar, not an array"),
    "unknown-ext": (msgpack.ExtType(42, b"\x00"),
                    r"'transformer/ln_f/scale' holds a msgpack ext of type 42, not an array"),
    "list": ([1.0, 2.0], r"'transformer/ln_f/scale' holds a list, not an array"),
    "object-dtype": (msgpack.ExtType(1, msgpack.packb(((1,), "object", bytes(8)),
                                                      use_bin_type=True)),
                     r"'transformer/ln_f/scale' has dtype 'object', not a numeric one"),
}


@pytest.mark.parametrize("leaf", sorted(NOT_AN_ARRAY))
def test_leaf_that_is_no_numeric_array_is_refused_naming_the_key(leaf, hf_model, tmp_path):
    """A leaf of another ext type (flax's complex and numpy scalar included) or of a non-numeric
    dtype is refused naming the Flax key (nothing in it is decoded, let alone unpickled)."""
    hf = hf_model("gpt2")
    tree = hf_flax_params(hf.torch_model, "gpt2")
    value, message = NOT_AN_ARRAY[leaf]
    tree["transformer"]["ln_f"]["scale"] = value
    d = flax_dir(hf, {}, tmp_path / leaf)
    file = d / flax_checkpoint.FILE
    file.write_bytes(_pack(tree))
    with pytest.raises(ValueError, match=rf"^{file}: {message}$"):
        rome_jax.load_model(d)


def _pack(tree: dict) -> bytes:
    """``tree`` packed by msgpack itself, arrays as flax's ndarray ext, any leaf allowed."""
    return msgpack.packb(tree, use_bin_type=True, default=lambda a: msgpack.ExtType(
        1, msgpack.packb((a.shape, a.dtype.name, a.tobytes()), use_bin_type=True)))


@pytest.mark.parametrize("key", ["number", "map"])
def test_key_that_is_no_string_is_refused(key, hf_model, tmp_path):
    hf = hf_model("gpt2")
    tree = hf_flax_params(hf.torch_model, "gpt2")
    tree["transformer"]["h"][7] = tree["transformer"]["h"].pop("1")
    raw = _pack(tree)
    if key == "map":  # msgpack allows any key; Python cannot pack a dict as one
        assert raw.count(msgpack.packb("wte")) == 1
        raw = raw.replace(msgpack.packb("wte"), msgpack.packb({}))
    d = flax_dir(hf, {}, tmp_path / key)
    file = d / flax_checkpoint.FILE
    file.write_bytes(raw)
    shown = "transformer/<dict>" if key == "map" else "transformer/h/7"
    with pytest.raises(ValueError, match=rf"^{file}: key '{shown}' is not a name \(a Flax params "
                                         r"tree is a map of non-empty strings\)$"):
        rome_jax.load_model(d)
