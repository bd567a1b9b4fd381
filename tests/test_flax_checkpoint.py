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
import numpy as np
import pytest
from flax import serialization, traverse_util
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
