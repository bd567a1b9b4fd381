"""Scoring: continuation log-probabilities (P(target)), perplexity, CounterFact metrics and
generation entropy.

NLLs are in nats. A continuation's score is the mean NLL of its tokens given the prompt (ROME's
convention, so multi-token targets are comparable); perplexity is corpus-level,
``exp(total NLL / predicted tokens)``, where a sentence's first token is context only.
Prompts and texts are read as whole sequences (``Tokenizer.encode_sequence``: after the start
token when the model has one, which is then the context only, never a scored token); targets are
continuations and get none.

CounterFact metrics follow ROME's ``summarize.py``: per record, over its prompts of one kind,
success is the fraction of prompts where the right target is more probable (ES/PS: target_new
after the rewrite / paraphrase prompts; NS: target_true after the neighbourhood prompts) and
magnitude the mean probability margin (EM/PM: P(new) − P(true); NM: P(true) − P(new)); both
are then averaged over records, and S is the harmonic mean of ES, PS and NS.

Generation entropy measures how repetitive sampled text is (a collapsed model repeats itself):
ROME's weighted 2- and 3-gram entropy per text (``ngram_entropy``, in bits) and "Rebuilding
ROME"'s normalised word entropy of a record's texts together (``word_entropy``, in [0, 1]).
"""

from __future__ import annotations

import functools
import math
import re
from collections import Counter
from typing import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from rome_jax.data import pad_batch
from rome_jax.models.config import ModelConfig
from rome_jax.models.generate import generate
from rome_jax.models.model import Model
from rome_jax.models.transformer import Params, forward, widened
from rome_jax.rome.templates import with_test_prefix


@functools.partial(jax.jit, static_argnums=1)
def token_nll(params: Params, config: ModelConfig, input_ids, attention_mask):
    """NLL of each next token: [B, T-1], entry t = -log p(ids[t+1] | ids[:t+1]); 0 at padding."""
    logits = forward(params, config, input_ids, attention_mask).logits[:, :-1]
    logp = jax.nn.log_softmax(widened(logits))
    nll = -jnp.take_along_axis(logp, input_ids[:, 1:, None], axis=-1)[..., 0]
    return nll * attention_mask[:, 1:]


def _batches(n: int, size: int):
    for start in range(0, n, size):
        yield slice(start, min(n, start + size))


@functools.partial(jax.jit, static_argnums=1)
def target_nll(params: Params, config: ModelConfig, input_ids, attention_mask, positions,
               targets, valid):
    """Mean NLL of each row's target tokens: [B]. ``targets`` [B, K] are predicted by the logits
    at ``positions`` [B, K] (token t+1's at t); only ``valid`` [B, K] entries count, and only
    those positions reach the LM head (K·V logits a row, not T·V)."""
    logits = forward(params, config, input_ids, attention_mask, logit_positions=positions).logits
    logp = jax.nn.log_softmax(widened(logits))
    nll = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
    return (nll * valid).sum(-1) / jnp.maximum(valid.sum(-1), 1)


def continuation_nll(model: Model, prompts: list[str], targets: list[str],
                     batch_size: int = 64, params: Params | None = None) -> np.ndarray:
    """Mean NLL per token of ``" " + target`` after each prompt: [N].

    ``exp(-nll)`` is the geometric-mean token probability, ROME's P(target). The pairs are
    scored in batches of ``batch_size`` sorted by length (little padding), each batch padded to
    bucketed shapes (``pad_batch``; K target positions a power of two; the last batch filled
    with copies) so that jit compiles a few programs however many pairs there are.
    """
    params = model.params if params is None else params
    tok = model.tokenizer
    prompt_ids = tok.encode_sequences(list(prompts))
    target_ids = tok.encode_batch([" " + t.strip() for t in targets])
    out = np.zeros(len(prompts))
    order = np.argsort([len(p) + len(t) for p, t in zip(prompt_ids, target_ids)], kind="stable")
    for sl in _batches(len(order), batch_size):
        rows = list(order[sl]) + [order[sl][-1]] * (batch_size - (sl.stop - sl.start))
        ids, mask = pad_batch([prompt_ids[i] + target_ids[i] for i in rows], tok.pad_id)
        k = 1 << (max(1, *(len(target_ids[i]) for i in rows)) - 1).bit_length()
        positions = np.zeros((len(rows), k), np.int32)
        labels = np.zeros((len(rows), k), np.int32)
        valid = np.zeros((len(rows), k), np.float32)
        for row, i in enumerate(rows):
            n, start = len(target_ids[i]), len(prompt_ids[i]) - 1
            positions[row, :n] = np.arange(start, start + n)
            labels[row, :n] = target_ids[i]
            valid[row, :n] = 1
        nll = np.asarray(target_nll(params, model.config, ids, mask, positions, labels, valid))
        out[order[sl]] = nll[:sl.stop - sl.start]
    return out


def target_probabilities(model: Model, prompt: str, target_new: str,
                         target_true: str | None = None, params: Params | None = None
                         ) -> tuple[float, float | None]:
    """(P(target_new), P(target_true) or None) after ``prompt``: geometric-mean token
    probabilities, as ROME reports them."""
    targets = [target_new] + ([target_true] if target_true else [])
    probs = np.exp(-continuation_nll(model, [prompt] * len(targets), targets, params=params))
    return float(probs[0]), (float(probs[1]) if len(probs) > 1 else None)


def request_probabilities(model: Model, requests: Sequence, params: Params | None = None
                          ) -> tuple[np.ndarray, np.ndarray]:
    """P(target_new), P(target_true) [B] after each request's plain prompt (``EditRequest``s;
    NaN where a request has no target_true), every request in ``continuation_nll``'s batches."""
    texts = [r.text for r in requests]
    p_new = np.exp(-continuation_nll(model, texts, [r.target_new for r in requests],
                                     params=params))
    known = [i for i, r in enumerate(requests) if r.target_true]
    p_true = np.full(len(requests), np.nan)
    if known:
        p_true[known] = np.exp(-continuation_nll(
            model, [texts[i] for i in known], [requests[i].target_true for i in known],
            params=params))
    return p_new, p_true


def efficacy(p_new: np.ndarray, p_true: np.ndarray) -> float | None:
    """Share of P(new) > P(true) over the requests with a target_true (None without any)."""
    known = ~np.isnan(p_true)
    return float((p_new[known] > p_true[known]).mean()) if known.any() else None


def perplexity_batches(tokenizer, texts: Sequence[str], batch_size: int = 32,
                       max_tokens: int = 256) -> list[tuple[np.ndarray, np.ndarray]]:
    """``texts`` with two or more tokens (the start token counted, if any), each read as a whole
    sequence and cut to ``max_tokens``, as padded (ids, mask) batches [B, T]; sorted by length
    first, so that little of each batch is padding. ValueError if no text has two tokens
    (nothing to predict)."""
    seqs = sorted((s[:max_tokens] for s in tokenizer.encode_sequences(list(texts))
                   if len(s) > 1), key=len)
    if not seqs:
        raise ValueError("perplexity: no text with two or more tokens")
    return [pad_batch(seqs[sl], tokenizer.pad_id) for sl in _batches(len(seqs), batch_size)]


def _text_nlls(model: Model, texts: Sequence[str], batch_size: int, params: Params | None,
               max_tokens: int) -> tuple[np.ndarray, np.ndarray]:
    """Summed NLL and predicted-token count of each text with two or more tokens: ([N], [N]),
    in length order."""
    params = model.params if params is None else params
    sums, counts = [], []
    for ids, mask in perplexity_batches(model.tokenizer, texts, batch_size, max_tokens):
        sums.append(np.asarray(token_nll(params, model.config, ids, mask), np.float64).sum(1))
        counts.append(mask[:, 1:].sum(1))
    return np.concatenate(sums), np.concatenate(counts)


def perplexity(model: Model, texts: list[str], batch_size: int = 32,
               params: Params | None = None, max_tokens: int = 256) -> float:
    """Corpus perplexity exp(sum NLL / predicted tokens) of ``texts`` (each cut to max_tokens)."""
    nll, count = _text_nlls(model, texts, batch_size, params, max_tokens)
    return float(np.exp(nll.sum() / count.sum()))


def mean_sentence_perplexity(model: Model, texts: list[str], batch_size: int = 32,
                             params: Params | None = None, max_tokens: int = 256) -> float:
    """Mean over texts of exp(mean NLL of the text's predicted tokens): the ME-PPL paper's
    metric (Yang et al. 2024, ``ppl.py`` without a start token). It weighs every sentence
    alike, so short, hard sentences count more than in ``perplexity``."""
    nll, count = _text_nlls(model, texts, batch_size, params, max_tokens)
    return float(np.mean(np.exp(nll / count)))


COUNTERFACT_GROUPS = ("rewrite", "paraphrase", "neighborhood")


def counterfact_prompts(record: Mapping, prefix: str | None = None) -> dict[str, list[str]]:
    """The filled-in prompts of a CounterFact record: {"rewrite": [1], "paraphrase": [P],
    "neighborhood": [N]}. With ``prefix``, each rewrite and paraphrase prompt that opens with
    the subject gets it in front ("The Fall of ROME"'s test-time prefix, so that the model reads
    the subject after some context, as it was edited); neighbourhood prompts, about other
    subjects, never do."""

    rw = record["requested_rewrite"]
    subject = rw["subject"]
    fix = (lambda p: with_test_prefix(p, subject, prefix)) if prefix else (lambda p: p)
    return {"rewrite": [fix(rw["prompt"].format(subject))],
            "paraphrase": [fix(p) for p in record["paraphrase_prompts"]],
            "neighborhood": list(record["neighborhood_prompts"])}


def counterfact_nlls(model: Model, record: Mapping, prompt_sets: Sequence[Mapping[str, list]],
                     params: Params | None = None) -> list[dict[str, np.ndarray]]:
    """``counterfact_nll`` for each of several prompt sets of one record (``counterfact_prompts``
    with and without a prefix, say) in one pass: each distinct prompt is scored once, so prompts
    the sets share get identical numbers."""
    rw = record["requested_rewrite"]
    targets = [rw["target_new"]["str"], rw["target_true"]["str"]]
    unique = list(dict.fromkeys(p for prompts in prompt_sets for g in COUNTERFACT_GROUPS
                                for p in prompts[g]))
    nll = continuation_nll(model, [p for p in unique for _ in targets], targets * len(unique),
                           params=params).reshape(-1, 2)
    row = {p: i for i, p in enumerate(unique)}
    return [{g: nll[[row[p] for p in prompts[g]]].reshape(-1, 2) for g in COUNTERFACT_GROUPS}
            for prompts in prompt_sets]


def counterfact_nll(model: Model, record: Mapping, params: Params | None = None,
                    prompts: Mapping[str, list] | None = None) -> dict[str, np.ndarray]:
    """Mean token NLLs of ``target_new`` (column 0) and ``target_true`` (column 1) after each
    prompt of a CounterFact record: {"rewrite": [1, 2], "paraphrase": [P, 2],
    "neighborhood": [N, 2]}. ``prompts`` replaces ``counterfact_prompts(record)`` (e.g. with a
    test-time prefix)."""
    return counterfact_nlls(model, record, [prompts or counterfact_prompts(record)], params)[0]


def counterfact_scores(model: Model, records: Sequence[Mapping],
                       params: Params | None = None, batch_size: int = 64
                       ) -> list[dict[str, float]]:
    """``counterfact_metrics`` of each record (its plain prompts) on ``params``, every
    record's prompts scored together in ``continuation_nll``'s batches (a batch edit's facts
    at once, rather than one call per record)."""
    pairs, spans = [], []
    for record in records:
        rw = record["requested_rewrite"]
        prompts = counterfact_prompts(record)
        start = len(pairs)
        pairs += [(p, t) for g in COUNTERFACT_GROUPS for p in prompts[g]
                  for t in (rw["target_new"]["str"], rw["target_true"]["str"])]
        spans.append((start, [len(prompts[g]) for g in COUNTERFACT_GROUPS]))
    nll = continuation_nll(model, [p for p, _ in pairs], [t for _, t in pairs], batch_size,
                           params)
    out = []
    for start, sizes in spans:
        groups, at = {}, start
        for group, size in zip(COUNTERFACT_GROUPS, sizes):
            groups[group] = nll[at:at + 2 * size].reshape(-1, 2)
            at += 2 * size
        out.append(counterfact_metrics(groups))
    return out


def counterfact_metrics(nll: Mapping[str, np.ndarray]) -> dict[str, float]:
    """One record's ES, PS, NS (success fractions) and EM, PM, NM (probability margins) from
    ``counterfact_nll``; a group without prompts gives NaN."""
    out = {}
    for group, name, sign in (("rewrite", "E", 1), ("paraphrase", "P", 1),
                              ("neighborhood", "N", -1)):
        x = np.asarray(nll[group], np.float64).reshape(-1, 2)
        if len(x) == 0:
            out[name + "S"] = out[name + "M"] = math.nan
            continue
        margin = sign * (np.exp(-x[:, 0]) - np.exp(-x[:, 1]))
        out[name + "S"] = float((sign * (x[:, 1] - x[:, 0]) > 0).mean())
        out[name + "M"] = float(margin.mean())
    return out


def summarize_counterfact(rows: Sequence[Mapping[str, float]]) -> dict[str, float]:
    """Means of per-record metrics over records (NaNs skipped), plus S = harmonic mean of ES, PS
    and NS (0 when any of them is 0)."""
    keys = ("ES", "PS", "NS", "EM", "PM", "NM")
    out = {k: float(np.nanmean([r[k] for r in rows])) if rows else math.nan for k in keys}
    parts = [out[k] for k in ("ES", "PS", "NS")]
    out["S"] = (0.0 if min(parts) <= 0 else len(parts) / sum(1 / p for p in parts)
                ) if all(math.isfinite(p) for p in parts) else math.nan
    out["n"] = len(rows)
    return out


_WORD = re.compile(r"\w+|[^\w\s]")


def ngram_entropy(text: str, ns: Sequence[int] = (2, 3),
                  weights: Sequence[float] = (2 / 3, 4 / 3)) -> float:
    """ROME's generation entropy of one text: mean over n of weight_n · H(n-gram frequencies) in
    bits. Words are ``\\w+`` runs and single punctuation marks (ROME uses NLTK's
    ``word_tokenize``, which splits alike on ordinary text). Low values mean repetitive text, the
    mark of a collapsed model."""
    words = _WORD.findall(text)
    terms = []
    for n, weight in zip(ns, weights):
        counts = np.array(list(Counter(zip(*(words[i:] for i in range(n)))).values()), float)
        p = counts / counts.sum() if counts.size else counts
        terms.append(weight * float(-(p * np.log2(p)).sum()))
    return float(np.mean(terms))


def word_entropy(texts: Sequence[str]) -> float:
    """"Rebuilding ROME"'s normalised generation entropy of one record's generated texts: the
    entropy of the frequencies of the words of all ``texts`` together (lower-cased, full stops
    dropped, split at white space), over its largest value log2(number of distinct words). In
    [0, 1]: 1 when no word repeats, 0 when one word is all there is; NaN without words."""
    words = " ".join(texts).lower().replace(".", "").split()
    counts = np.array(list(Counter(words).values()), float)
    if counts.size < 2:
        return 0.0 if counts.size else math.nan
    p = counts / counts.sum()
    return float(-(p * np.log2(p)).sum() / np.log2(counts.size))


def generation_entropy(model: Model, prompts: list[str], key: jax.Array,
                       max_new_tokens: int = 100, top_k: int = 5,
                       params: Params | None = None) -> tuple[float, float]:
    """(GE, GE_norm) of each prompt followed by its top-k sampled continuation (ROME samples
    top-5 continuations of a record's generation prompts, 100 tokens in all): the mean
    ``ngram_entropy`` of the texts, and the ``word_entropy`` of all of them together."""
    texts = [p + t for p, t in zip(prompts, generate(model, prompts, max_new_tokens, key=key,
                                                      top_k=top_k, params=params))]
    return float(np.mean([ngram_entropy(t) for t in texts])), word_entropy(texts)
