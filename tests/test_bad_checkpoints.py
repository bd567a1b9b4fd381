"""Broken or unsupported model directories fail with errors naming the file and the tensor."""

from __future__ import annotations

import json
import re
import shutil

import numpy as np
import pytest

import rome_jax
from rome_jax import ModelConfig

torch = pytest.importorskip("torch")
from safetensors.torch import load_file, save_file  # noqa: E402


@pytest.fixture
def gpt2_dir(hf_model, copy_model_dir):
    """A fresh, damageable copy of a tiny GPT-2 directory."""
    return copy_model_dir(hf_model("gpt2"))


@pytest.fixture
def gptj_dir(hf_model, copy_model_dir):
    return copy_model_dir(hf_model("gptj", n_embd=48, n_head=4, rotary_dim=4))


def _edit_config(path, **changes):
    config = json.loads((path / "config.json").read_text())
    config.update(changes)
    (path / "config.json").write_text(json.dumps(config))


def _edit_tensors(path, edit):
    file = path / "model.safetensors"
    tensors = load_file(str(file))
    edit(tensors)
    save_file(tensors, str(file), metadata={"format": "pt"})


def test_intact_copy_loads(gpt2_dir, gptj_dir):
    assert rome_jax.load_model(gpt2_dir).config.model_type == "gpt2"
    assert rome_jax.load_model(gptj_dir).config.model_type == "gptj"


def test_unknown_model_type(gpt2_dir):
    _edit_config(gpt2_dir, model_type="mamba")
    with pytest.raises(ValueError, match=r"config\.json: unknown architecture model_type='mamba'"):
        rome_jax.load_model(gpt2_dir)


def test_missing_config(gpt2_dir):
    (gpt2_dir / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"config\.json: missing"):
        rome_jax.load_model(gpt2_dir)


def test_invalid_json_config(gpt2_dir):
    (gpt2_dir / "config.json").write_text('{"model_type": "gpt2", "n_embd": ')
    with pytest.raises(ValueError, match=r"config\.json: not valid JSON"):
        rome_jax.load_model(gpt2_dir)


def test_missing_config_attribute(gpt2_dir):
    config = json.loads((gpt2_dir / "config.json").read_text())
    del config["n_head"]
    (gpt2_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"config\.json: missing attribute 'n_head'"):
        rome_jax.load_model(gpt2_dir)


@pytest.mark.parametrize("change, message", [
    (dict(scale_attn_by_inverse_layer_idx=True),
     "scale_attn_by_inverse_layer_idx=True is not supported"),
    (dict(scale_attn_weights=False), "scale_attn_weights=False is not supported"),
    (dict(add_cross_attention=True), "add_cross_attention=True is not supported"),
    (dict(activation_function="swish"), "activation_function='swish' is not supported"),
    (dict(tie_word_embeddings=False), "tie_word_embeddings=False is not supported"),
    (dict(n_head=5), "n_embd=32 is not divisible by n_head=5"),
])
def test_unsupported_gpt2_config(gpt2_dir, change, message):
    _edit_config(gpt2_dir, **change)
    with pytest.raises(ValueError, match=re.escape(message)):
        rome_jax.load_model(gpt2_dir)


@pytest.mark.parametrize("change, message", [
    (dict(rotary_dim=5), "rotary_dim=5 must be even"),
    (dict(rotary_dim=14), "rotary_dim=14 must be even and at most the head size 12"),
    (dict(tie_word_embeddings=True), "tie_word_embeddings=True is not supported"),
])
def test_unsupported_gptj_config(gptj_dir, change, message):
    _edit_config(gptj_dir, **change)
    with pytest.raises(ValueError, match=re.escape(message)):
        rome_jax.load_model(gptj_dir)


def test_missing_weights_file(gpt2_dir):
    (gpt2_dir / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"no weights \(model\.safetensors"):
        rome_jax.load_model(gpt2_dir)


def test_missing_shard(hf_model, tmp_path):
    hf = hf_model("gpt2")
    d = tmp_path / "sharded"
    hf.torch_model.save_pretrained(d, max_shard_size="20KB")
    for f in ("vocab.json", "merges.txt"):
        shutil.copyfile(hf.path / f, d / f)
    shard = sorted(d.glob("model-*.safetensors"))[-1]
    shard.unlink()
    with pytest.raises(FileNotFoundError, match=re.escape(f"{shard.name}: weight file missing")):
        rome_jax.load_model(d)


def test_missing_tensor(gpt2_dir):
    _edit_tensors(gpt2_dir, lambda t: t.pop("transformer.h.1.mlp.c_proj.weight"))
    with pytest.raises(ValueError, match=r"model\.safetensors: missing tensor "
                                         r"'h\.1\.mlp\.c_proj\.weight'"):
        rome_jax.load_model(gpt2_dir)


def test_missing_tensor_gptj(gptj_dir):
    _edit_tensors(gptj_dir, lambda t: t.pop("lm_head.bias"))
    with pytest.raises(ValueError, match=r"model\.safetensors: missing tensor 'lm_head\.bias'"):
        rome_jax.load_model(gptj_dir)


def test_wrong_shape_tensor(gpt2_dir):
    def edit(t):
        t["transformer.h.0.attn.c_attn.weight"] = torch.zeros(32, 95)

    _edit_tensors(gpt2_dir, edit)
    with pytest.raises(ValueError, match=r"model\.safetensors: tensor 'h\.0\.attn\.c_attn\.weight'"
                                         r" has shape \(32, 95\), expected \(32, 96\)"):
        rome_jax.load_model(gpt2_dir)


def test_transposed_gptj_tensor(gptj_dir):
    """A GPT-J Linear stored [in, out] instead of [out, in] is caught by its shape."""
    def edit(t):
        name = "transformer.h.0.mlp.fc_in.weight"
        t[name] = t[name].T.contiguous()

    _edit_tensors(gptj_dir, edit)
    with pytest.raises(ValueError, match=r"tensor 'h\.0\.mlp\.fc_in\.weight' has shape "
                                         r"\(48, 192\), expected \(192, 48\)"):
        rome_jax.load_model(gptj_dir)


def test_unexpected_tensor(gpt2_dir):
    def edit(t):
        t["transformer.h.2.ln_1.weight"] = torch.ones(32)

    _edit_tensors(gpt2_dir, edit)
    with pytest.raises(ValueError, match=r"unexpected tensors \['h\.2\.ln_1\.weight'\]"):
        rome_jax.load_model(gpt2_dir)


def test_truncated_safetensors(gpt2_dir):
    file = gpt2_dir / "model.safetensors"
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"model\.safetensors: .*truncated"):
        rome_jax.load_model(gpt2_dir)


def test_garbage_safetensors(gpt2_dir):
    (gpt2_dir / "model.safetensors").write_bytes(b"\x00" * 5)
    with pytest.raises(ValueError, match=r"model\.safetensors: not a readable safetensors file"):
        rome_jax.load_model(gpt2_dir)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_weights_are_refused_at_load(gpt2_dir, bad):
    def edit(t):
        t["transformer.h.1.mlp.c_proj.weight"][3, 5] = bad

    _edit_tensors(gpt2_dir, edit)
    with pytest.raises(ValueError, match=r"model\.safetensors: tensor 'h\.1\.mlp\.c_proj\.weight'"
                                         r" holds NaN or infinite values"):
        rome_jax.load_model(gpt2_dir)


def test_fp16_checkpoint_exports_as_fp16(gpt2_dir, tmp_path):
    from safetensors import safe_open

    _edit_tensors(gpt2_dir, lambda t: t.update({k: v.half() for k, v in t.items()}))
    model = rome_jax.load_model(gpt2_dir)
    assert model.source_dtype == "float16"
    assert model.params["wte"].dtype == np.float32  # computation stays float32
    out = rome_jax.save_hf(model, tmp_path / "out")
    with safe_open(str(out / "model.safetensors"), framework="np") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {np.dtype("float16")}
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "float16"
    size = (out / "model.safetensors").stat().st_size
    assert size <= 1.05 * (gpt2_dir / "model.safetensors").stat().st_size
    wide = rome_jax.save_hf(model, tmp_path / "wide", dtype=np.float32)
    assert (wide / "model.safetensors").stat().st_size > 1.8 * size  # asked for: float32
    assert rome_jax.load_model(out).source_dtype == "float16"


def test_pickle_with_objects_is_refused_without_torchs_advice(gpt2_dir):
    class Payload:
        def __reduce__(self):
            return (print, ("unpickled!",))

    state = load_file(str(gpt2_dir / "model.safetensors"))
    torch.save({**state, "extra": Payload()}, gpt2_dir / "pytorch_model.bin")
    (gpt2_dir / "model.safetensors").unlink()
    with pytest.raises(ValueError) as err:
        rome_jax.load_model(gpt2_dir)
    text = str(err.value)
    assert "pytorch_model.bin: holds objects other than tensors" in text
    assert "never unpickles" in text and "weights_only" not in text


def test_no_tokenizer_files(gpt2_dir):
    (gpt2_dir / "vocab.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"no tokenizer .*missing vocab\.json"):
        rome_jax.load_model(gpt2_dir)
    (gpt2_dir / "merges.txt").unlink()
    with pytest.raises(FileNotFoundError, match=r"missing vocab\.json, merges\.txt"):
        rome_jax.load_model(gpt2_dir)


def test_missing_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such model directory"):
        rome_jax.load_model(tmp_path / "nope")


def _snapshot(path):
    return {p.relative_to(path): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def test_save_hf_refuses_existing_dir_then_overwrites(hf_model, tmp_path):
    model = rome_jax.load_model(hf_model("gpt2").path)
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    before = _snapshot(out)

    with pytest.raises(FileExistsError, match=re.escape(str(out))):
        rome_jax.save_hf(model, out)
    assert _snapshot(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temp dirs left

    assert rome_jax.save_hf(model, out, overwrite=True) == out
    names = {p.name for p in out.iterdir()}
    assert "keep.txt" not in names
    assert {"config.json", "model.safetensors", "vocab.json", "merges.txt"} <= names
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    again = rome_jax.load_model(out)
    ids = np.arange(6, dtype=np.int32)[None]
    np.testing.assert_array_equal(np.asarray(rome_jax.logits(again, ids)),
                                  np.asarray(rome_jax.logits(model, ids)))


def test_save_hf_refuses_non_finite_weights(hf_model, tmp_path):
    model = rome_jax.load_model(hf_model("gpt2").path)
    params = dict(model.params, ln_f={**model.params["ln_f"],
                                      "bias": model.params["ln_f"]["bias"].at[0].set(np.nan)})
    with pytest.raises(ValueError, match="non-finite weights.*transformer.ln_f.bias"):
        rome_jax.save_hf(model.with_params(params), tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("layer", [-1, 2, 7, 1.0, "0"])
def test_check_layer_out_of_range(layer):
    cfg = ModelConfig(model_type="gpt2", vocab_size=11, n_positions=8, d_model=8, n_layer=2,
                      n_head=2, d_mlp=32)
    assert cfg.check_layer(0) == 0 and cfg.check_layer(1) == 1
    with pytest.raises(ValueError, match=r"^layer: .* out of range .* 2 layers"):
        cfg.check_layer(layer)
