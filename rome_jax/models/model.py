"""Model: config + params + tokenizer, and the jit-compiled full-sequence logits."""

from __future__ import annotations

import dataclasses
import functools

import jax

from rome_jax.models.config import ModelConfig
from rome_jax.models.tokenizer import Tokenizer
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


@functools.partial(jax.jit, static_argnums=1)
def _logits(params: Params, config: ModelConfig, input_ids, attention_mask):
    return forward(params, config, input_ids, attention_mask).logits


def logits(model: Model, input_ids, attention_mask=None) -> jax.Array:
    """Logits [batch, seq, vocab] for input_ids [batch, seq] (mask: 1 = real token)."""
    return _logits(model.params, model.config, input_ids, attention_mask)
