"""Model: config + params + tokenizer, and the jit-compiled full-sequence logits."""

from __future__ import annotations

import dataclasses
import functools
import hashlib

import jax
import numpy as np

from rome_jax.models.config import ModelConfig
from rome_jax.models.tokenizer import EOS_TOKEN, Tokenizer
from rome_jax.models.transformer import Params, forward


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


@functools.partial(jax.jit, static_argnums=1)
def _logits(params: Params, config: ModelConfig, input_ids, attention_mask):
    return forward(params, config, input_ids, attention_mask).logits


def logits(model: Model, input_ids, attention_mask=None) -> jax.Array:
    """Logits [batch, seq, vocab] for input_ids [batch, seq] (mask: 1 = real token)."""
    return _logits(model.params, model.config, input_ids, attention_mask)


def params_digest(params: Params) -> str:
    """The first 20 hex digits of a sha256 over every leaf's path and bytes: the identity of a
    set of weights (results made with other weights are not resumed)."""
    digest = hashlib.sha256()
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        digest.update(jax.tree_util.keystr(path).encode())
        digest.update(np.ascontiguousarray(np.asarray(leaf)).tobytes())
    return digest.hexdigest()[:20]
