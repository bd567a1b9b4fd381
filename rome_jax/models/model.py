"""Model: config + params + tokenizer, and the jit-compiled full-sequence logits."""

from __future__ import annotations

import dataclasses
import functools
import hashlib

from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from rome_jax.models import gpt2, gpt_neox, gptj, llama, phi3
from rome_jax.models.config import ModelConfig
from rome_jax.models.tokenizer import EOS_TOKEN, Tokenizer
from rome_jax.models.transformer import Params, forward

# model_type -> the module that maps its HF weight names (Qwen, Mistral and Gemma name theirs as
# Llama).
FAMILIES = {"gpt2": gpt2, "gptj": gptj, "llama": llama, "qwen2": llama, "qwen3": llama,
            "mistral": llama, "phi3": phi3, "gpt_neox": gpt_neox, "gemma2": llama,
            "gemma3_text": llama}


@functools.lru_cache(maxsize=16)
def param_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Leaf path (``jax.tree_util.keystr``) -> shape of the params of a ``config`` model (the
    tree its family's ``import_weights`` builds; traced, nothing is allocated)."""
    family = FAMILIES[config.model_type]
    tree = jax.eval_shape(lambda: family.import_weights(
        lambda name, shape: jnp.zeros(shape, jnp.float32), config))
    return {jax.tree_util.keystr(path): tuple(leaf.shape)
            for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def check_params(params, config: ModelConfig, argument: str = "params") -> None:
    """TypeError naming ``argument`` unless ``params`` is the params tree of a ``config`` model
    (same leaves, same shapes; any dtype)."""
    what = f"the params of this {config.model_type} model ({config.n_layer} layers)"
    if not isinstance(params, Mapping):
        raise TypeError(f"{argument}: expected {what}, got {type(params).__name__}")
    expected = param_shapes(config)
    got = {jax.tree_util.keystr(path): tuple(np.shape(leaf))
           for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]}
    missing, extra = sorted(expected.keys() - got.keys()), sorted(got.keys() - expected.keys())
    if missing or extra:
        raise TypeError(f"{argument}: not {what}: missing {', '.join(missing[:3]) or 'none'}; "
                        f"unexpected {', '.join(extra[:3]) or 'none'}")
    wrong = [k for k in expected if got[k] != expected[k]]
    if wrong:
        raise TypeError(f"{argument}: not {what}: {wrong[0]} has shape {got[wrong[0]]}, "
                        f"expected {expected[wrong[0]]}")


@dataclasses.dataclass(frozen=True, eq=False)
class Model:
    """A loaded model. ``params`` is an immutable-by-convention pytree (see transformer.py);
    an edit returns a new Model via ``with_params``. ``source_dtype``: the dtype the weights
    were stored in (``"float16"``, say; None when built in memory), which exports keep."""

    config: ModelConfig
    params: Params
    tokenizer: Tokenizer
    name: str = ""
    source_dtype: str | None = None

    def __post_init__(self):
        if not isinstance(self.config, ModelConfig):
            raise TypeError(f"config: expected a ModelConfig, got {type(self.config).__name__}")
        if not isinstance(self.tokenizer, Tokenizer):
            raise TypeError(f"tokenizer: expected a Tokenizer, got "
                            f"{type(self.tokenizer).__name__}")
        check_params(self.params, self.config)

    def with_params(self, params: Params) -> "Model":
        return dataclasses.replace(self, params=params)

    def with_bos(self, token: str | None = EOS_TOKEN) -> "Model":
        """A Model that reads every sequence (prompts, templates, corpus texts) after the start
        token ``token`` (None: nothing prepended). The default is the document separator that
        GPT-2 and SmolLM2 were pretrained with, not the config's ``bos_token``."""
        tokenizer = self.tokenizer.with_bos(token)
        if tokenizer.bos_id is not None and tokenizer.bos_id >= self.config.vocab_size:
            raise ValueError(f"bos: token {token!r} (id {tokenizer.bos_id}) is outside the "
                             f"model's {self.config.vocab_size} embeddings")
        return dataclasses.replace(self, tokenizer=tokenizer)


def check_model(model, argument: str = "model") -> "Model":
    """``model`` when it is a :class:`Model`; else TypeError naming ``argument``."""
    if not isinstance(model, Model):
        raise TypeError(f"{argument}: expected a rome_jax Model (rome_jax.load_model), got "
                        f"{type(model).__name__}")
    return model


@functools.partial(jax.jit, static_argnums=1)
def _logits(params: Params, config: ModelConfig, input_ids, attention_mask):
    return forward(params, config, input_ids, attention_mask).logits


def logits(model: Model, input_ids, attention_mask=None) -> jax.Array:
    """Logits [batch, seq, vocab] for input_ids [batch, seq] (mask: 1 = real token)."""
    check_model(model)
    return _logits(model.params, model.config, input_ids, attention_mask)


def params_digest(params: Params) -> str:
    """The first 20 hex digits of a sha256 over every leaf's path and bytes: the identity of a
    set of weights (results made with other weights are not resumed)."""
    digest = hashlib.sha256()
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        digest.update(jax.tree_util.keystr(path).encode())
        digest.update(np.ascontiguousarray(np.asarray(leaf)).tobytes())
    return digest.hexdigest()[:20]
