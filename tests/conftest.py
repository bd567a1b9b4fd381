"""Shared fixtures: tiny random Hugging Face models built with ``transformers`` + ``torch``.

``hf_model(family, **config)`` returns an :class:`HFModel` whose directory holds what
``save_pretrained`` wrote plus the GPT-2 ``vocab.json`` / ``merges.txt`` from the shared tokenizer
folder. Models are cached for the whole session by their arguments, so every test asking for the
same architecture shares one directory; tests that damage a checkpoint copy it first
(``copy_model_dir``).

Weights are re-drawn with O(1) scales (``randomize``): HF's default init (std 0.02) makes every
attention pattern almost uniform and every logit almost zero, so a wrong rotary layout, a swapped
projection or a wrong position id would still match HF to 1e-4. With O(1) weights they do not.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
from hypothesis import settings

from rome_jax.data import tokenizer_dir

# Property tests draw the same examples on every run (CI must not be flaky); set
# HYPOTHESIS_PROFILE=explore locally to search new ones.
settings.register_profile("ci", derandomize=True, deadline=None, print_blob=True)
settings.register_profile("explore", deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

# torch and transformers (the ``test`` extra) are imported where used, so that test files which
# do not need them still run without them.

TOKENIZER_FILES = ("vocab.json", "merges.txt")


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
    """Drop jit's compiled programs after a test module once the process holds many. Each
    compiled XLA program keeps about three memory mappings alive (measured: 300 programs, +965
    mappings, all released by ``jax.clear_caches``), and past the kernel's vm.max_map_count
    (65,530 here) the next compilation segfaults: seen once, at about test 540 of 836 of one
    pytest process. Later modules recompile what they need."""
    yield
    try:
        with open("/proc/self/maps") as maps:
            n = sum(1 for _ in maps)
    except OSError:  # not Linux: no such limit to watch
        return
    if n > 30_000:
        import gc

        import jax

        jax.clear_caches()
        gc.collect()


@dataclasses.dataclass(frozen=True)
class HFModel:
    """A saved tiny HF model: its directory, the torch module (eval mode) and its config."""

    path: Path
    torch_model: Any
    family: str
    config: dict

    def logits(self, input_ids, attention_mask=None, position_ids=None) -> np.ndarray:
        """HF logits (float32 numpy) for numpy inputs."""
        import torch

        kwargs = {"input_ids": torch.as_tensor(np.asarray(input_ids), dtype=torch.long)}
        if attention_mask is not None:
            kwargs["attention_mask"] = torch.as_tensor(np.asarray(attention_mask),
                                                       dtype=torch.long)
        if position_ids is not None:
            kwargs["position_ids"] = torch.as_tensor(np.asarray(position_ids), dtype=torch.long)
        with torch.no_grad():
            return self.torch_model(**kwargs).logits.float().numpy()


def randomize(model, seed: int) -> None:
    """Re-draw every parameter at O(1) scale (see the module docstring)."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight", "layernorm.weight",
                              "model.norm.weight", "q_norm.weight", "k_norm.weight",
                              "final_layer_norm.weight")):
                p.copy_(1.0 + 0.3 * torch.randn(p.shape, generator=gen))
            elif p.ndim == 1:  # biases (LayerNorm and dense)
                p.copy_(0.3 * torch.randn(p.shape, generator=gen))
            elif name.endswith(("wte.weight", "wpe.weight", "embed_tokens.weight",
                                "embed_in.weight")):
                p.copy_(torch.randn(p.shape, generator=gen))
            else:  # dense weights; Conv1D [in, out], Linear [out, in]
                fan_in = p.shape[0] if "c_" in name.rsplit(".", 2)[-2] else p.shape[1]
                p.copy_(1.5 / math.sqrt(fan_in) * torch.randn(p.shape, generator=gen))


# family -> transformers (config class, model class) of the families named as HF names them.
HF_CLASSES = {"llama": ("LlamaConfig", "LlamaForCausalLM"),
              "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
              "qwen3": ("Qwen3Config", "Qwen3ForCausalLM"),
              "mistral": ("MistralConfig", "MistralForCausalLM"),
              "phi3": ("Phi3Config", "Phi3ForCausalLM"),
              "gpt_neox": ("GPTNeoXConfig", "GPTNeoXForCausalLM"),
              "gemma2": ("Gemma2Config", "Gemma2ForCausalLM"),
              "gemma3_text": ("Gemma3TextConfig", "Gemma3ForCausalLM")}


def build_hf_model(family: str, seed: int = 0, **overrides):
    """A random tiny ``GPT2LMHeadModel`` / ``GPTJForCausalLM`` / a ``HF_CLASSES`` model (float32,
    eval mode)."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    if family in HF_CLASSES:
        cfg: dict[str, Any] = dict(vocab_size=101, max_position_embeddings=32, hidden_size=32,
                                   intermediate_size=48, num_hidden_layers=2,
                                   num_attention_heads=4)
        if family in ("llama", "qwen2", "qwen3", "mistral", "phi3"):
            cfg.update(rope_theta=10000.0)
        if family == "mistral":
            cfg.update(sliding_window=None)
        if family == "phi3":  # its default ids lie past a tiny vocabulary
            cfg.update(bos_token_id=1, eos_token_id=2, pad_token_id=2)
    else:
        cfg = dict(vocab_size=101, n_positions=32, n_embd=32, n_layer=2, n_head=4)
    cfg.update(overrides)
    if family in ("qwen2", "qwen3", "mistral", "phi3", "gemma2", "gemma3_text"):
        # their defaults are not Llama's
        cfg.setdefault("num_key_value_heads", cfg["num_attention_heads"])
        cfg.setdefault("head_dim", cfg["hidden_size"] // cfg["num_attention_heads"])
    if family in HF_CLASSES:
        config_class, model_class = HF_CLASSES[family]
        config = getattr(transformers, config_class)(**cfg)
        cls = getattr(transformers, model_class)
    elif family == "gpt2":
        config = transformers.GPT2Config(**cfg)
        cls = transformers.GPT2LMHeadModel
    elif family == "gptj":
        cfg.setdefault("rotary_dim", 4)
        hf_cfg = dict(cfg)
        if cfg["rotary_dim"] is None:
            # transformers 5 refuses rotary_dim=None; transformers 4 then rotates
            # sin/cos of width n_embd over each head, which only works with one head.
            if cfg["n_head"] != 1:
                raise ValueError("rotary_dim=None is only computable by HF with n_head=1")
            hf_cfg["rotary_dim"] = cfg["n_embd"]  # same sin/cos table as None
        config = transformers.GPTJConfig(**hf_cfg)
        cls = transformers.GPTJForCausalLM
    else:
        raise ValueError(family)
    torch.manual_seed(seed)
    model = cls(config).float().eval()
    if family == "gptj" and cfg["rotary_dim"] is None:
        for block in model.transformer.h:  # take HF's rotary_dim=None code path
            block.attn.rotary_dim = None
    randomize(model, seed)
    return model, cfg


def save_hf_dir(model, cfg: dict, path: Path) -> None:
    """``save_pretrained`` + tokenizer files; ``rotary_dim=None`` is written as JSON null."""
    model.save_pretrained(path)
    if cfg.get("rotary_dim", 0) is None:
        config = json.loads((path / "config.json").read_text())
        config["rotary_dim"] = None
        (path / "config.json").write_text(json.dumps(config, indent=2))
    copy_tokenizer(path, cfg["vocab_size"])


def copy_tokenizer(dest: Path, vocab_size: int = 50257) -> None:
    """GPT-2's ``vocab.json`` / ``merges.txt``, cut to the first ``vocab_size`` tokens (and the
    merges among them) for a smaller embedding: rome_jax refuses a tokenizer with more tokens
    than the embedding has rows."""
    src = tokenizer_dir()
    for name in TOKENIZER_FILES:
        if not (src / name).is_file():
            pytest.skip(f"{src / name}: shared GPT-2 tokenizer file missing")
        shutil.copyfile(src / name, dest / name)
    vocab = json.loads((src / "vocab.json").read_text())
    if vocab_size >= len(vocab):
        return
    kept = {token: i for token, i in vocab.items() if i < vocab_size}
    lines = (src / "merges.txt").read_text().splitlines()
    merges = [m for m in lines[1:] if len(m.split(" ")) == 2
              and {*m.split(" "), m.replace(" ", "")} <= kept.keys()]
    (dest / "vocab.json").write_text(json.dumps(kept))
    (dest / "merges.txt").write_text("\n".join([lines[0], *merges]) + "\n")


@pytest.fixture(scope="session")
def hf_model(tmp_path_factory) -> Callable[..., HFModel]:
    """Factory: ``hf_model("gpt2", n_head=3, n_embd=24)`` -> cached :class:`HFModel`.

    Defaults: vocab 101, 32 positions, width 32, 2 layers, 4 heads (GPT-J: rotary_dim 4;
    ``HF_CLASSES``: HF names, MLP 48 wide, untied head, head_dim 8, no sliding window).
    Pass ``vocab_size=50257`` where the tokenizer must agree with the embedding.
    """
    cache: dict[tuple, HFModel] = {}

    def make(family: str, seed: int = 0, **overrides) -> HFModel:
        key = (family, seed, repr(sorted(overrides.items())))  # values may be dicts
        if key not in cache:
            model, cfg = build_hf_model(family, seed, **overrides)
            path = tmp_path_factory.mktemp(f"hf-{family}")
            save_hf_dir(model, cfg, path)
            cache[key] = HFModel(path, model, family, cfg)
        return cache[key]

    return make


@pytest.fixture
def copy_model_dir(tmp_path) -> Callable[[HFModel | Path], Path]:
    """Copy a cached model directory into this test's tmp dir (safe to damage)."""

    def copy(src: HFModel | Path) -> Path:
        src = src.path if isinstance(src, HFModel) else Path(src)
        dest = tmp_path / f"model-{sum(1 for _ in tmp_path.glob('model-*'))}"
        shutil.copytree(src, dest)
        return dest

    return copy



@contextlib.contextmanager
def in_process_env(root: Path, default_model: bool = True):
    """Environment for in-process ``cli.main`` runs: the cache under ``root``, no compilation
    cache, no progress bars; ``default_model``: no ROME_JAX_DEFAULT_MODEL override."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ROME_JAX_CACHE", str(root / "cache"))
        mp.setenv("ROME_JAX_COMPILATION_CACHE", "0")
        mp.setenv("TQDM_DISABLE", "1")
        if default_model:
            mp.delenv("ROME_JAX_DEFAULT_MODEL", raising=False)
        yield mp


def tiny_gpt2(n_layer: int, d_model: int, n_head: int, seq_len: int, seed: int,
              weight_scale: float = 1.0, name: str = ""):
    """A random GPT-2 with the real tokenizer, built by rome_jax itself (no torch).

    ``weight_scale`` multiplies every matrix: GPT-2's init (std 0.02) makes attention almost
    uniform, which hides position and attention bugs.
    """
    import jax

    from rome_jax import training
    from rome_jax.models.model import Model
    from rome_jax.models.tokenizer import Tokenizer

    tok = Tokenizer.from_dir(tokenizer_dir())
    cfg = training.model_config(training.TrainSettings(n_layer=n_layer, d_model=d_model,
                                                       n_head=n_head, seq_len=seq_len),
                                tok.vocab_size)
    params = training.init_params(cfg, jax.random.key(seed))
    if weight_scale != 1.0:
        params = jax.tree.map(lambda w: w * weight_scale if w.ndim >= 2 else w, params)
    return Model(cfg, params, tok, name=name)


# ----------------------------------------------------------------------------- the CLI as users run it

# Small settings for CLI runs on ``tiny_model``: 40 WikiText texts for the key statistics, 4 v*
# steps, 5 context templates.
SMALL = ["--layer", "1", "--mom2-n-samples", "40", "--v-steps", "4", "--template-lengths", "5x5"]


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """A 2-layer, 64-wide random GPT-2 with the real tokenizer, saved with rome_jax.save_hf."""
    from rome_jax import save_hf

    path = tmp_path_factory.mktemp("cli") / "tiny-gpt2"
    save_hf(tiny_gpt2(n_layer=2, d_model=64, n_head=4, seq_len=64, seed=0), path)
    return path


@pytest.fixture(scope="session")
def env(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("cli-env")
    out = dict(os.environ)
    out.update(JAX_COMPILATION_CACHE_DIR=str(root / "xla"),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
               JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0", JAX_PLATFORMS="cpu",
               ROME_JAX_CACHE=str(root / "cache"),
               ROME_JAX_DEFAULT_MODEL=str(root / "no-default-model"), TQDM_DISABLE="1")
    return out


def cli(env, *args, cwd=None, script: bool = False) -> subprocess.CompletedProcess:
    if script:
        command = [str(Path(sys.executable).with_name("rome-jax"))]
        if not Path(command[0]).exists():
            pytest.skip("the rome-jax console script is not installed beside python")
    else:
        command = [sys.executable, "-m", "rome_jax.cli"]
    return subprocess.run([*command, *map(str, args)], capture_output=True, text=True, env=env,
                          cwd=cwd, timeout=600)


def assert_ok(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, f"rc {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    assert "Traceback" not in proc.stderr


def assert_user_error(proc: subprocess.CompletedProcess, match: str) -> None:
    assert proc.returncode == 2, f"rc {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("rome-jax: error: ")
    assert match in lines[0], lines[0]
    assert "Traceback" not in proc.stderr


def tracked_decodes(monkeypatch, module, label: Callable) -> tuple[list, list[int]]:
    """Wrap ``module._decode`` (a lazy loader's one decoding function) so that each call records
    ``label(*args)`` (which tensor it decoded) and how many of the decoded arrays are alive once
    it returns (itself included); (labels, alive), filled as the test runs."""
    import weakref

    labels, alive, live = [], [], []
    decode = module._decode

    def tracked(*args):
        value = decode(*args)
        live.append(weakref.ref(value))
        labels.append(label(*args))
        alive.append(sum(ref() is not None for ref in live))
        return value

    monkeypatch.setattr(module, "_decode", tracked)
    return labels, alive


def assert_live_forward_is_full(model, batch, layer: int) -> None:
    """The live-position forward of v*'s optimisation (keys and values before the lookup token
    cached, only the positions from it on recomputed) gives the full forward's logits with a
    random δ added at the lookup token of ``batch`` (a ``VBatch``) at ``layer``."""
    import jax
    import jax.numpy as jnp

    from rome_jax.models.transformer import forward, forward_live, residual_at
    from rome_jax.rome.values import live_context

    delta = jax.random.normal(jax.random.key(1), (model.config.d_model,))
    residual = residual_at(model.params, model.config, batch.ids, batch.mask, layer)
    full = forward(model.params, model.config, batch.ids, batch.mask, layer=layer,
                   token_index=batch.lookup, mlp_delta=delta, residual=residual,
                   logit_positions=batch.target_pos).logits
    ctx, past_k, past_v = live_context(model.params, model.config, layer, batch, residual)
    h_live = jnp.take_along_axis(residual, batch.live_index[:, :, None], axis=1)
    at_lookup = (jnp.arange(batch.live_index.shape[1]) == 0)[None, :, None]
    live = forward_live(model.params, model.config, layer, h_live, ctx, past_k, past_v,
                        at_lookup * delta, batch.target_pos - batch.lookup[:, None])
    np.testing.assert_allclose(live, full, atol=1e-4, rtol=1e-4)
