"""Scoring: continuation log-probabilities (P(target)), perplexity, generation entropy.

NLLs are in nats. A continuation's score is the mean NLL of its tokens given the prompt (ROME's
convention, so multi-token targets are comparable); perplexity is corpus-level,
``exp(total NLL / predicted tokens)``, where a sentence's first token is context only.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from rome_jax.data import pad_batch
from rome_jax.models.config import ModelConfig
from rome_jax.models.model import Model
from rome_jax.models.transformer import Params, forward


@functools.partial(jax.jit, static_argnums=1)
def token_nll(params: Params, config: ModelConfig, input_ids, attention_mask):
    """NLL of each next token: [B, T-1], entry t = -log p(ids[t+1] | ids[:t+1]); 0 at padding."""
    logp = jax.nn.log_softmax(forward(params, config, input_ids, attention_mask).logits[:, :-1])
    nll = -jnp.take_along_axis(logp, input_ids[:, 1:, None], axis=-1)[..., 0]
    return nll * attention_mask[:, 1:]


def _batches(n: int, size: int):
    for start in range(0, n, size):
        yield slice(start, min(n, start + size))


def continuation_nll(model: Model, prompts: list[str], targets: list[str],
                     batch_size: int = 64, params: Params | None = None) -> np.ndarray:
    """Mean NLL per token of ``" " + target`` after each prompt: [N].

    ``exp(-nll)`` is the geometric-mean token probability, ROME's P(target).
    """
    params = model.params if params is None else params
    tok = model.tokenizer
    prompt_ids = tok.encode_batch(list(prompts))
    target_ids = tok.encode_batch([" " + t.strip() for t in targets])
    out = np.zeros(len(prompts))
    for sl in _batches(len(prompts), batch_size):
        seqs = [p + t for p, t in zip(prompt_ids[sl], target_ids[sl])]
        ids, mask = pad_batch(seqs, tok.eos_id)
        nll = np.asarray(token_nll(params, model.config, ids, mask))
        for row, (p, t) in enumerate(zip(prompt_ids[sl], target_ids[sl])):
            out[sl.start + row] = nll[row, len(p) - 1:len(p) + len(t) - 1].mean()
    return out


def target_probabilities(model: Model, prompt: str, target_new: str,
                         target_true: str | None = None, params: Params | None = None
                         ) -> tuple[float, float | None]:
    """(P(target_new), P(target_true) or None) after ``prompt``: geometric-mean token
    probabilities, as ROME reports them."""
    targets = [target_new] + ([target_true] if target_true else [])
    probs = np.exp(-continuation_nll(model, [prompt] * len(targets), targets, params=params))
    return float(probs[0]), (float(probs[1]) if len(probs) > 1 else None)


def perplexity(model: Model, texts: list[str], batch_size: int = 32,
               params: Params | None = None, max_tokens: int = 256) -> float:
    """Corpus perplexity exp(sum NLL / predicted tokens) of ``texts`` (each cut to max_tokens)."""
    params = model.params if params is None else params
    tok = model.tokenizer
    seqs = [s[:max_tokens] for s in tok.encode_batch(list(texts)) if len(s) > 1]
    total, count = 0.0, 0
    for sl in _batches(len(seqs), batch_size):
        ids, mask = pad_batch(seqs[sl], tok.eos_id)
        total += float(np.asarray(token_nll(params, model.config, ids, mask), np.float64).sum())
        count += int(mask[:, 1:].sum())
    return float(np.exp(total / count))
