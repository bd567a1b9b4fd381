"""Every boundary where outside data comes in refuses bad data in one line naming the file (or
flag) and the field, never with a Python error about the value (issue 23, items 5, 8-12,
15-18, 20, 23, 27, 30, 31), grouped by boundary: config, GGUF, index, data files, results
files, requests, export, API. The fuzz tests at the end throw malformed config.json, GGUF
metadata and request files at the CLI (in-process) and check that it never exits 1 (internal
error) and never changes an input file.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import SMALL, tiny_gpt2
from gguf import GGUFValueType as V
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_gguf import TOKENS, hf_tensors, write_gguf

import rome_jax
from rome_jax import cli, data
from rome_jax.models import gguf as gg
from rome_jax.hf import FAMILIES
from rome_jax.models.model import Model

REQUEST = ["--prompt", "{} plays the", "--subject", "Danielle Darrieux", "--target-new", "piano"]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    """A 2-layer, 16-wide GPT-2 with the real tokenizer, saved by rome_jax (no torch)."""
    path = tmp_path_factory.mktemp("inputs") / "tiny"
    rome_jax.save_hf(tiny_gpt2(n_layer=2, d_model=16, n_head=2, seq_len=32, seed=0), path)
    return path


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory, tiny_dir) -> Path:
    """A 2-layer, 16-wide random Llama with the GPT-2 tokenizer and its token ids in
    config.json, saved by rome_jax (no torch)."""
    config = rome_jax.ModelConfig.from_hf({
        "model_type": "llama", "vocab_size": 50257, "hidden_size": 16, "intermediate_size": 32,
        "num_hidden_layers": 2, "num_attention_heads": 2, "max_position_embeddings": 32,
        "bos_token_id": 50256, "eos_token_id": [50256]})
    rng = np.random.default_rng(0)
    params = FAMILIES["llama"].import_weights(
        lambda name, shape: rng.standard_normal(shape).astype(np.float32), config)
    path = tmp_path_factory.mktemp("inputs-llama") / "llama"
    rome_jax.save_hf(Model(config, params, rome_jax.load_model(tiny_dir).tokenizer), path)
    return path


@pytest.fixture
def model_dir(tiny_dir, tmp_path) -> Path:
    """A damageable copy of ``tiny_dir``."""
    return Path(shutil.copytree(tiny_dir, tmp_path / "model"))


@pytest.fixture
def llama_copy(llama_dir, tmp_path) -> Path:
    """A damageable copy of ``llama_dir``."""
    return Path(shutil.copytree(llama_dir, tmp_path / "llama"))


@pytest.fixture
def run(monkeypatch, capsys, tmp_path):
    """``run(*argv)`` -> (exit status, stderr lines): the CLI in this process."""
    monkeypatch.setenv("ROME_JAX_COMPILATION_CACHE", "0")
    monkeypatch.setenv("ROME_JAX_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("TQDM_DISABLE", "1")
    monkeypatch.delenv("ROME_JAX_DEBUG", raising=False)

    def call(*argv) -> tuple[int, list[str]]:
        capsys.readouterr()
        try:
            status = cli.main([str(a) for a in argv])
        except SystemExit as exit_:  # argparse errors
            status = exit_.code
        return status, capsys.readouterr().err.strip().splitlines()

    return call


def assert_user_error(status: int, lines: list[str], match: str) -> None:
    assert status == 2, lines
    assert lines and lines[-1].startswith("rome-jax: error: "), lines
    assert match in lines[-1], lines[-1]


# ----------------------------------------------------------------------------- config.json


def _write_config(path: Path, change) -> None:
    config = json.loads((path / "config.json").read_text())
    config = change(config) if callable(change) else {**config, **change}
    (path / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize("change, message", [
    (lambda c: [c], "expected a JSON object of attributes, got list"),          # 8
    ({"n_head": 0}, "n_head=0 must be a positive integer"),                      # 9
    ({"n_embd": "abc"}, "n_embd='abc' must be a positive integer"),              # 20
    ({"n_layer": 0}, "n_layer=0 must be a positive integer"),                    # 20
    ({"vocab_size": 5.5}, "vocab_size=5.5 must be a positive integer"),
    ({"layer_norm_epsilon": "tiny"}, "layer_norm_epsilon='tiny' must be a positive finite"),
    ({"tie_word_embeddings": "yes"}, "tie_word_embeddings='yes' must be true or false"),
    ({"model_type": ["gpt2"]}, "unknown architecture model_type=['gpt2']"),
])
def test_bad_config_names_file_and_attribute(model_dir, change, message):
    _write_config(model_dir, change)
    with pytest.raises(ValueError) as err:
        rome_jax.load_model(model_dir)
    assert str(err.value).startswith(f"{model_dir / 'config.json'}: ")
    assert message in str(err.value)


def test_bad_config_through_the_cli(model_dir, run):
    _write_config(model_dir, {"n_embd": "abc"})
    assert_user_error(*run("edit", *REQUEST, "--model", model_dir),
                      f"{model_dir / 'config.json'}: n_embd='abc' must be a positive integer")


@pytest.mark.parametrize("change, message", [
    ({"bos_token_id": -1}, "bos_token_id=-1 must be a token id"),
    ({"eos_token_id": [2, "x"]}, "eos_token_id=[2, 'x'] must be a token id"),
    ({"num_key_value_heads": "2"}, "num_key_value_heads='2' must be a positive integer"),
    ({"attention_bias": 1}, "attention_bias=1 must be true or false"),
])
def test_bad_llama_config(llama_copy, change, message):
    rome_jax.load_model(llama_copy)
    _write_config(llama_copy, change)
    with pytest.raises(ValueError, match=rf"config\.json: {re.escape(message)}"):
        rome_jax.load_model(llama_copy)


def test_llama_config_sizes_are_checked():
    from rome_jax import ModelConfig

    llama = {"model_type": "llama", "vocab_size": 10, "hidden_size": 8, "intermediate_size": 8,
             "num_hidden_layers": 1, "num_attention_heads": 2}
    assert ModelConfig.from_hf(llama).head_dim == 4
    with pytest.raises(ValueError, match=r"num_attention_heads=0 must be a positive integer"):
        ModelConfig.from_hf({**llama, "num_attention_heads": 0})
    with pytest.raises(ValueError, match=r"rope_theta=-1 must be a positive finite number"):
        ModelConfig.from_hf({**llama, "rope_theta": -1})


def test_tokenizer_larger_than_the_embedding_is_refused(tiny_dir, tmp_path):
    """5: ids past the embedding would be clamped into other tokens' rows."""
    model = rome_jax.load_model(tiny_dir)
    config = dataclasses.replace(model.config, vocab_size=1000)
    params = {**model.params, "wte": model.params["wte"][:1000]}
    rome_jax.save_hf(Model(config, params, model.tokenizer), tmp_path / "small")
    with pytest.raises(ValueError, match=r"vocab\.json and .*config\.json: the tokenizer has "
                                         r"50257 tokens but the embedding has only 1000 rows"):
        rome_jax.load_model(tmp_path / "small")


# ----------------------------------------------------------------------------- GGUF metadata


def _gguf(tmp_path, metadata=None, tensors=None) -> Path:
    path = tmp_path / "m.gguf"
    write_gguf(path, hf_tensors() if tensors is None else tensors, metadata=metadata)
    return path


@pytest.mark.parametrize("key, value, message", [
    ("llama.attention.head_count", (0, V.UINT32),                                  # 10
     "metadata llama.attention.head_count=0 must be a positive integer"),
    ("llama.embedding_length", ("abc", V.STRING),                                   # 11
     "metadata llama.embedding_length='abc' must be a positive integer"),
    ("llama.attention.layer_norm_rms_epsilon", ("tiny", V.STRING),
     "layer_norm_rms_epsilon='tiny' must be a positive finite number"),
    ("tokenizer.ggml.merges", (["a b c"], V.ARRAY, V.STRING), "'a b c' is not two tokens"),
    ("tokenizer.ggml.token_type", (5, V.UINT32), "token_type must be a list of int"),
    ("tokenizer.ggml.bos_token_id", ("x", V.STRING), "bos_token_id='x' must be a token id"),
    ("tokenizer.ggml.pre", (["smollm"], V.ARRAY, V.STRING), "tokenizer.ggml.pre=['smollm']"),
])
def test_bad_gguf_metadata_names_file_and_key(tmp_path, key, value, message):
    path = _gguf(tmp_path, {key: value})
    with pytest.raises(ValueError) as err:
        gg.read_gguf(path)
    assert str(err.value).startswith(f"{path}: ") and message in str(err.value)


def test_gguf_without_blocks_names_block_count(tmp_path):
    """20: block_count 0 (and no block tensors) said "Need at least one array to stack"."""
    tensors = {k: v for k, v in hf_tensors().items() if not k.startswith("model.layers.")}
    path = _gguf(tmp_path, {"llama.block_count": (0, V.UINT32)}, tensors)
    with pytest.raises(ValueError, match=r"m\.gguf: metadata llama\.block_count=0 must be a "
                                         r"positive integer"):
        rome_jax.load_model(path)


def test_gguf_tokenizer_larger_than_the_embedding_is_refused(tmp_path):
    """5, GGUF: three tokens more than llama.vocab_size (and the embedding's rows)."""
    tensors = hf_tensors()
    rows = len(TOKENS) - 3
    tensors["model.embed_tokens.weight"] = tensors["model.embed_tokens.weight"][:rows]
    path = _gguf(tmp_path, {"llama.vocab_size": (rows, V.UINT32)}, tensors)
    with pytest.raises(ValueError, match=rf"m\.gguf \(tokenizer\.ggml\.tokens, llama\.vocab_size"
                                         rf"\): the tokenizer has {len(TOKENS)} tokens but the "
                                         rf"embedding has only {rows} rows"):
        rome_jax.load_model(path)


# ----------------------------------------------------------------------------- safetensors index


@pytest.mark.parametrize("index", [{"weight_map": ["model.safetensors"]},          # 12
                                   {"weight_map": {"wte.weight": "../model.safetensors"}},
                                   {"weight_map": {"wte.weight": 5}}, ["weight_map"]])
def test_bad_safetensors_index(model_dir, index):
    (model_dir / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match=r"model\.safetensors\.index\.json: weight_map must be "
                                         r"a JSON object of tensor name -> file name"):
        rome_jax.load_model(model_dir)


# ----------------------------------------------------------------------------- data files


RECORD = {"case_id": 7, "requested_rewrite": {
    "prompt": "{} plays the", "subject": "Danielle Darrieux", "target_new": {"str": "piano"},
    "target_true": {"str": "violin"}},
    "paraphrase_prompts": ["Danielle Darrieux plays the"], "neighborhood_prompts": ["X plays"],
    "attribute_prompts": ["Y plays"], "generation_prompts": ["Danielle Darrieux is"]}


def _without(field: str) -> dict:
    return {k: v for k, v in RECORD.items() if k != field}


@pytest.mark.parametrize("content, message", [                                      # 15, 18
    ({"0": RECORD}, "expected a JSON list of records, got dict"),
    ([1, 2], "record 0: expected a JSON object, got int"),
    ([RECORD, _without("case_id")], "record 1: case_id: missing"),
    ([_without("paraphrase_prompts")], "record 0: paraphrase_prompts: missing"),
    ([{**RECORD, "case_id": "7"}], 'record 0: case_id: expected an integer, got "7"'),
    ([{**RECORD, "neighborhood_prompts": "X plays"}],
     "record 0: neighborhood_prompts: expected a list of strings"),
    ([{**RECORD, "requested_rewrite": {"prompt": "{} plays"}}], "record 0: requested_rewrite"),
    (json.dumps([RECORD])[:50], "not valid JSON"),
])
def test_bad_counterfact_names_file_record_and_field(tmp_path, monkeypatch, run, content,
                                                     message):
    path = tmp_path / "data" / "counterfact.json"
    path.parent.mkdir()
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    monkeypatch.setenv("ROME_JAX_DATA", str(path.parent))
    with pytest.raises(ValueError) as err:
        data.load_counterfact()
    assert str(err.value).startswith(f"{path}: ") and message in str(err.value)
    assert_user_error(*run("evaluate", "--n", "1", "--model", tmp_path / "nope"), str(path))


def test_good_counterfact_loads(tmp_path, monkeypatch):
    (tmp_path / "counterfact.json").write_text(json.dumps([RECORD]))
    monkeypatch.setenv("ROME_JAX_DATA", str(tmp_path))
    assert data.load_counterfact() == [RECORD]


# ----------------------------------------------------------------------------- results files


@pytest.mark.parametrize("content, message", [                                       # 16
    ({"settings": {}, "records": [1]}, "record 0: not an object with an integer case_id"),
    ({"settings": {}, "records": [{"rows": 1}]}, "record 0: not an object with an integer"),
    ({"settings": "rome", "records": []}, "settings: expected an object, got str"),
])
def test_bad_evaluate_out_is_refused_before_the_work(tmp_path, run, content, message):
    out = tmp_path / "eval.json"
    out.write_text(json.dumps(content))
    before = out.read_bytes()
    assert_user_error(*run("evaluate", "--n", "1", "--out", out, "--model", tmp_path / "nope"),
                      f"{out}: exists but is not an evaluation file ({message}")
    assert out.read_bytes() == before


def _row(**changes) -> dict:
    scores = dict(ES=1.0, PS=0.5, NS=1.0, EM=0.1, PM=0.1, NM=0.1, ppl_ratio=1.0)
    row = {"case_id": 3, "first_token_subject": False, "before": scores,
           "edits": {"rome": {**scores, "delta_abs": 1e-3, "residual_norm": 2.0},
                     "c-rome": {"error": "non-finite update"}}}
    return {**row, **changes}


def test_evaluate_records_are_checked_against_their_settings():
    """16: a resumed record must hold what the summary reads."""
    from rome_jax.counterfact_eval import EvalSettings, check_row

    settings = EvalSettings(methods=("rome", "c-rome"))
    check_row(_row(), settings)
    for row, message in [
            (_row(edits={"rome": {}}), "out.json: record 0: edits.rome.ES: expected a number"),
            (_row(edits=[]), "edits: expected an object"),
            (_row(before={**_row()["before"], "PS": "high"}), "before.PS: expected a number"),
            (_row(first_token_subject=None), "first_token_subject: expected true or false")]:
        with pytest.raises(ValueError, match=message.replace(".", r"\.")):
            check_row(row, settings, "out.json: record 0: ")
    with pytest.raises(ValueError, match=r"before\.prefixed: expected an object"):
        check_row(_row(), dataclasses.replace(settings, test_prefix=True))
    with pytest.raises(ValueError, match=r"before\.GE: expected a number"):
        check_row(_row(), dataclasses.replace(settings, generation_prompts=2))


def test_settings_mismatch_names_the_flags():
    """27: "evaluation differ" named no flag."""
    from rome_jax.cli.common import resumed_records

    old = {"settings": {"model": "a", "layer": 1, "evaluation": {"methods": ["rome"],
                                                                 "seed": 0},
                        "hparams": {"layer": 1, "kl_factor": 0.0625}}, "records": []}
    new = {"model": "b", "layer": 2, "evaluation": {"methods": ["c-rome"], "seed": 0},
           "hparams": {"layer": 2, "kl_factor": 0.5}}
    with pytest.raises(ValueError) as err:
        resumed_records(old, new, Path("eval.json"))
    assert str(err.value).startswith(
        'eval.json: was made with other settings (--layer: 1 in the file, 2 now; --methods: '
        '["rome"] in the file, ["c-rome"] now; hparams.kl_factor: 0.0625 in the file, 0.5 now)')
    assert resumed_records(old, {**old["settings"], "model": "b"}, Path("x")) == []
    # a ROME setting the file predates counts as its default
    now = {**old["settings"], "hparams": {**old["settings"]["hparams"],
                                          "clamp_reference": "mlp_output"}}
    assert resumed_records(old, now, Path("x")) == []
    now["hparams"]["clamp_reference"] = "residual"
    with pytest.raises(ValueError, match='hparams.clamp_reference: "mlp_output" in the file'):
        resumed_records(old, now, Path("x"))


@pytest.mark.parametrize("command", ["evaluate", "demo"])
def test_unknown_method_names_the_flag(run, command):
    """27: "method: 'foo' ..." named no flag."""
    status, lines = run(command, "--n", "1", "--methods", "rome,foo") if command == "evaluate" \
        else run(command, "--methods", "rome,foo")
    assert_user_error(status, lines, "argument --methods: 'foo' is not one of rome, c-rome")


# ----------------------------------------------------------------------------- requests


def test_template_boundary_error_quotes_the_users_prompt(tiny_dir):
    """23: the error quoted the template-prefixed text, which the user never wrote."""
    from rome_jax.rome.edit import build_batch
    from rome_jax.rome.request import EditRequest
    from rome_jax.rome.templates import ContextTemplates

    model = rome_jax.load_model(tiny_dir)
    request = EditRequest("{} plays the", "ing", "piano")
    build_batch(model, request, ContextTemplates(("{}",)), "subject_last")
    with pytest.raises(ValueError) as err:
        build_batch(model, request, ContextTemplates(("{}", "Great play{}")), "subject_last")
    assert str(err.value) == ("subject: 'ing' does not start on a token boundary in the prompt "
                              "'{} plays the' after the context template 'Great play'")


def test_check_requests_names_the_request_and_reports_progress(tiny_dir):
    """23, 31: many requests are checked in chunks, with progress; the first bad one is named
    by its index and own prompt."""
    from rome_jax.rome.edit import check_requests
    from rome_jax.rome.request import EditRequest
    from rome_jax.rome.templates import ContextTemplates

    model = rome_jax.load_model(tiny_dir)
    templates = ContextTemplates(("{}", "Good. {}"))
    good = EditRequest("{} plays the", "Danielle Darrieux", "piano")
    done = []
    check_requests(model, [good] * 10, templates, "subject_last", done.append, chunk=4)
    assert done == [4, 4, 2]
    bad = EditRequest("In{} plays the", "dia", "piano")
    with pytest.raises(ValueError, match=r"^request 6 \('In\{\} plays the'\): subject: 'dia' "
                                         r"does not start on a token boundary"):
        check_requests(model, [good] * 6 + [bad], templates, "subject_last", chunk=4)


def test_requests_errors_name_the_request_and_its_prompt(tiny_dir, tmp_path, run):
    """23: a request too long for the model is named by its index and own prompt (the message
    said "--prompt" before)."""
    good = {"prompt": "{} plays the", "subject": "Danielle Darrieux", "target_new": "piano"}
    long = {**good, "prompt": "{} plays" + " and plays" * 40}
    path = tmp_path / "requests.json"
    path.write_text(json.dumps([good] * 119 + [long]))
    status, lines = run("edit", "--requests", path, "--model", tiny_dir, *SMALL, "--no-guard")
    assert_user_error(status, lines, f"--requests {path}: request 119 ('{{}} plays and plays")
    assert "'): prompt: " in lines[-1] and "exceed the model's 32 positions" in lines[-1]


# ----------------------------------------------------------------------------- export


def test_full_disk_during_export_is_one_oserror_and_leaves_nothing(tiny_dir, tmp_path,
                                                                    monkeypatch):
    """17: a full disk while the weights are written is one OSError naming the export."""
    import errno

    import rome_jax.hf
    from rome_jax.cli.edit import _write_outputs

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    model = rome_jax.load_model(tiny_dir)
    monkeypatch.setattr(rome_jax.hf, "write_safetensors", full)
    out, report = tmp_path / "out" / "edited", tmp_path / "out" / "report.json"
    with pytest.raises(OSError, match=r"edited: writing model\.safetensors failed \(.*No space "
                                      r"left on device.*\); nothing was written"):
        _write_outputs(model, out, {"status": "applied"}, report, False)
    assert list((tmp_path / "out").iterdir()) == []


# ----------------------------------------------------------------------------- API


def test_api_misuse_names_the_argument(tiny_dir):
    """30: KeyError / AttributeError / dot_general TypeError before."""
    from rome_jax.rome.edit import compute_edit
    from rome_jax.rome.hparams import RomeHParams

    model = rome_jax.load_model(tiny_dir)
    with pytest.raises(TypeError, match=r"model: expected a rome_jax Model .* got str"):
        rome_jax.save_hf("model", "out")
    with pytest.raises(TypeError, match=r"model: expected a rome_jax Model .* got PosixPath"):
        rome_jax.logits(tiny_dir, np.zeros((1, 2), np.int32))
    with pytest.raises(TypeError, match=r"load_model: path_or_id must be a path.* got int"):
        rome_jax.load_model(5)
    with pytest.raises(TypeError, match=r"params: not the params of this gpt2 model \(2 layers\)"
                                        r": missing .*unexpected \['a'\]"):
        model.with_params({"a": np.zeros(3)})
    with pytest.raises(TypeError, match=r"params: expected the params of this gpt2 model"):
        model.with_params([model.params])
    wide = tiny_gpt2(n_layer=2, d_model=32, n_head=2, seq_len=32, seed=0)
    with pytest.raises(TypeError, match=r"\['k'\]\['b'\] has shape \(2, 32\), expected "
                                        r"\(2, 16\)"):
        model.with_params(wide.params)
    llama_config = rome_jax.ModelConfig.from_hf({
        "model_type": "llama", "vocab_size": 50257, "hidden_size": 16, "intermediate_size": 64,
        "num_hidden_layers": 2, "num_attention_heads": 2})
    llama_params = FAMILIES["llama"].import_weights(lambda name, shape: np.zeros(shape),
                                                    llama_config)
    with pytest.raises(TypeError, match=r"params: not the params of this gpt2 model"):
        compute_edit(model, {"prompt": "{} plays", "subject": "A", "target_new": "b"},
                     RomeHParams(layer=1), params=llama_params)


# ----------------------------------------------------------------------------- fuzz

JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-3, 2**40) | st.floats(allow_nan=True)
    | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner,
                                                                 max_size=3),
    max_leaves=6)
FUZZ = settings(max_examples=25, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                        HealthCheck.too_slow])


def _digest(path: Path) -> dict[str, str]:
    files = sorted(path.rglob("*")) if path.is_dir() else [path]
    return {str(f): hashlib.sha256(f.read_bytes()).hexdigest() for f in files if f.is_file()}


def _never_internal(run, inputs: Path, *argv) -> None:
    before = _digest(inputs)
    status, lines = run(*argv)
    assert status in (2, 3), lines
    assert not any("internal error" in line for line in lines), lines
    assert _digest(inputs) == before


GPT2_KEYS = ["n_embd", "n_head", "n_layer", "vocab_size", "n_positions", "n_inner",
             "layer_norm_epsilon", "activation_function", "model_type", "tie_word_embeddings",
             "rotary_dim", "scale_attn_weights", "rope_scaling", "task_specific_params"]
LLAMA_KEYS = ["hidden_size", "num_attention_heads", "num_key_value_heads", "head_dim",
              "num_hidden_layers", "intermediate_size", "max_position_embeddings", "vocab_size",
              "rms_norm_eps", "rope_theta", "rope_scaling", "rope_parameters", "hidden_act",
              "bos_token_id", "eos_token_id", "pad_token_id", "tie_word_embeddings",
              "attention_bias", "mlp_bias", "pretraining_tp", "sliding_window"]


def _fuzz_config(run, path: Path, changes: dict, whole) -> None:
    original = (path / "config.json").read_bytes()
    config = json.loads(original)
    (path / "config.json").write_text(json.dumps({**config, **changes} if whole is None
                                                 else whole))
    try:
        _never_internal(run, path, "edit", *REQUEST, "--model", path, "--layer", "99")
    finally:
        (path / "config.json").write_bytes(original)


@FUZZ
@given(changes=st.dictionaries(st.sampled_from(GPT2_KEYS), JSON_VALUES, min_size=1,
                               max_size=3),
       whole=st.none() | JSON_VALUES)
def test_fuzz_config_json(model_dir, run, changes, whole):
    _fuzz_config(run, model_dir, changes, whole)


@FUZZ
@given(changes=st.dictionaries(st.sampled_from(LLAMA_KEYS), JSON_VALUES, min_size=1,
                               max_size=3))
def test_fuzz_llama_config_json(llama_copy, run, changes):
    _fuzz_config(run, llama_copy, changes, None)


GGUF_KEYS = ["llama.block_count", "llama.context_length", "llama.embedding_length",
             "llama.feed_forward_length", "llama.attention.head_count",
             "llama.attention.head_count_kv", "llama.rope.freq_base",
             "llama.attention.layer_norm_rms_epsilon", "llama.rope.dimension_count",
             "llama.vocab_size", "tokenizer.ggml.pre", "tokenizer.ggml.bos_token_id",
             "tokenizer.ggml.eos_token_id", "tokenizer.ggml.token_type",
             "tokenizer.ggml.merges", "tokenizer.ggml.tokens", "llama.rope.scaling.type"]
GGUF_VALUES = st.one_of(
    st.integers(0, 2**32 - 1).map(lambda v: (v, V.UINT32)),
    st.integers(-2**31, 2**31 - 1).map(lambda v: (v, V.INT32)),
    st.floats(width=32).map(lambda v: (v, V.FLOAT32)),
    st.booleans().map(lambda v: (v, V.BOOL)),
    st.text(max_size=6).map(lambda v: (v, V.STRING)),
    st.lists(st.text(max_size=4), min_size=1, max_size=4).map(lambda v: (v, V.ARRAY, V.STRING)),
    st.lists(st.integers(0, 10), min_size=1, max_size=4).map(lambda v: (v, V.ARRAY, V.INT32)),
    st.none())


@FUZZ
@given(changes=st.dictionaries(st.sampled_from(GGUF_KEYS), GGUF_VALUES, min_size=1,
                               max_size=3))
def test_fuzz_gguf_metadata(tmp_path, run, changes):
    folder = tmp_path / f"gguf-{len(list(tmp_path.glob('gguf-*')))}"
    folder.mkdir()
    path = folder / "m.gguf"
    write_gguf(path, hf_tensors(), metadata=changes)
    _never_internal(run, folder, "edit", *REQUEST, "--model", path, "--layer", "99")


REQUEST_FIELDS = st.dictionaries(
    st.sampled_from(["prompt", "subject", "target_new", "target_true", "case_id",
                     "requested_rewrite"]),
    JSON_VALUES | st.sampled_from(["{} plays", "{}", "{{}}", " ", "A"]), max_size=5)


@FUZZ
@given(content=st.lists(REQUEST_FIELDS | JSON_VALUES, max_size=3) | JSON_VALUES)
def test_fuzz_request_files(tmp_path, run, content):
    path = tmp_path / "requests.json"
    path.write_text(json.dumps(content))
    _never_internal(run, path, "edit", "--requests", path, "--model", tmp_path / "nope")
