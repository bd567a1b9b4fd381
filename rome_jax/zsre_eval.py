"""zsRE evaluation of edit methods as ROME does it (``dsets/zsre.py`` ``MENDQADataset`` and
``experiments/py/eval_utils_zsre.py`` ``compute_rewrite_quality_zsre``).

A zsRE record is the request to write ``answers[0]`` (ROME's choice: the gold answer, so the
unedited model may already get some of it right) after the question ``src``, whose subject is
replaced by ``{}``. Each metric is a *token accuracy*: the fraction of the target's tokens
(``" " + target``) that are the model's argmax prediction when the target's earlier tokens are
given (teacher forcing):

- efficacy: the question ``src``, target ``answers[0]``;
- paraphrase: the rephrased question ``rephrase``, target ``answers[0]``;
- specificity: an unrelated Natural Questions prompt ``loc + "?"``, target ``loc_ans`` (an edit
  should leave it as it was).

ROME re-tokenises ``prompt + decode(target[:i])`` for each i and compares the argmax with the
first token of ``decode(target[i])``; here prompt and target ids are concatenated once, the
same sequence wherever the tokens do not merge across the boundary (GPT-2's byte-level BPE never
merges across the space that opens the target). A record's metric is its mean over target
tokens, averaged over records by the experiment (ROME's ``summarize.py``).
"""

from __future__ import annotations

import functools
from typing import Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from rome_jax.data import bucket, pad_batch
from rome_jax.models.model import Model
from rome_jax.models.transformer import Params, forward, residual_at
from rome_jax.rome.edit import EditContext, Solved, compute_edit, solve
from rome_jax.rome.hparams import RomeHParams
from rome_jax.rome.request import EditRequest
from rome_jax.editors.delta import apply_edit
from rome_jax.training import first_token_subject

METRICS = ("efficacy", "paraphrase", "specificity")
FIELDS = ("subject", "src", "rephrase", "answers", "loc", "loc_ans")


def zsre_record(raw: Mapping, case_id: int) -> dict:
    """ROME's ``MENDQADataset`` record of a raw zsRE record, in CounterFact's shape:
    ``{case_id, requested_rewrite: {prompt, subject, target_new: {str}}, paraphrase_prompts:
    [rephrase], neighborhood_prompts: [{prompt: loc + "?", target: loc_ans}]}``. The
    neighbourhood target is kept whole (ROME splits it into one prompt per token; the token
    accuracy does that here). ValueError naming the field that is missing or unusable."""
    missing = [f for f in FIELDS if f not in raw]
    if missing:
        raise ValueError(f"{missing[0]}: missing from zsRE record {case_id}")
    answers = raw["answers"]
    if not isinstance(answers, list) or not answers or not isinstance(answers[0], str):
        raise ValueError(f"answers: zsRE record {case_id} needs a non-empty list of strings, "
                         f"got {answers!r}")
    subject, question = raw["subject"], raw["src"]
    if not isinstance(subject, str) or not subject or subject not in question:
        raise ValueError(f"subject: {subject!r} is not in the question {question!r}")
    return {"case_id": int(case_id),
            "requested_rewrite": {"prompt": question.replace(subject, "{}"), "subject": subject,
                                  "target_new": {"str": answers[0]}},
            "paraphrase_prompts": [raw["rephrase"]],
            "neighborhood_prompts": [{"prompt": raw["loc"] + "?", "target": raw["loc_ans"]}]}


def metric_pairs(record: Mapping) -> tuple[list[str], list[str]]:
    """(prompts, targets) of a ``zsre_record``, one pair per metric, in ``METRICS`` order."""
    rw = record["requested_rewrite"]
    target = rw["target_new"]["str"]
    (paraphrase,), (neighbour,) = record["paraphrase_prompts"], record["neighborhood_prompts"]
    return ([rw["prompt"].format(rw["subject"]), paraphrase, neighbour["prompt"]],
            [target, target, neighbour["target"]])


@functools.partial(jax.jit, static_argnums=(1, 2))
def target_hits(params: Params, config, layer: int | None, input_ids, attention_mask,
                residual, positions, targets):
    """[B, P] bool: the argmax of the logits at ``positions`` [B, P] equals ``targets`` [B, P].
    ``residual`` [B, T, D]: the stream entering block ``layer`` (None, with layer None: a full
    forward)."""
    logits = forward(params, config, input_ids, attention_mask, layer=layer, residual=residual,
                     logit_positions=positions).logits
    return jnp.argmax(logits, axis=-1) == targets


_residual = jax.jit(residual_at, static_argnums=(1, 4))


class TokenAccuracy:
    """Teacher-forced token accuracy of fixed (prompt, target) pairs, in padded batches.

    A pair is read as ``prompt`` (a whole sequence: after the start token, if any) followed by
    the tokens of ``" " + target`` but its last; ``self(params)`` gives, per pair, the bool
    array [len(target tokens)] saying which target tokens are the argmax after the tokens before
    them. With ``layer``, ``params`` may differ from the base only at blocks ≥ ``layer`` (an edit
    there): the residual stream entering ``layer`` is computed once from the base params and
    reused, as in ``guard.PerplexityProbe``. ValueError for an empty prompt or target, or a pair
    longer than the model's positions.
    """

    def __init__(self, model: Model, prompts: Sequence[str], targets: Sequence[str],
                 layer: int | None = None, batch_size: int = 32, params: Params | None = None):
        if len(prompts) != len(targets) or not prompts:
            raise ValueError(f"targets: need one per prompt and at least one pair, got "
                             f"{len(prompts)} prompts and {len(targets)} targets")
        tok, config = model.tokenizer, model.config
        self.model = model
        self.layer = None if layer is None else config.check_layer(layer)
        params = model.params if params is None else params
        prompt_ids = tok.encode_sequences(list(prompts))
        target_ids = tok.encode_batch([" " + t.strip() for t in targets])
        for prompt, p, t in zip(prompts, prompt_ids, target_ids):
            if not p:
                raise ValueError(f"prompt: {prompt!r} has no tokens")
            if len(p) + len(t) - 1 > config.n_positions:
                raise ValueError(f"prompt: {prompt!r} and its target are {len(p) + len(t) - 1}"
                                 f" tokens, more than the model's {config.n_positions} "
                                 "positions")
        self.lengths = [len(t) for t in target_ids]
        self.batches = []
        for start in range(0, len(prompt_ids), batch_size):
            ps, ts = prompt_ids[start:start + batch_size], target_ids[start:start + batch_size]
            ids, mask = pad_batch([p + t[:-1] for p, t in zip(ps, ts)], tok.pad_id)
            width = bucket(max(map(len, ts)), 4)
            positions, _ = pad_batch([[len(p) - 1 + j for j in range(len(t))]
                                      for p, t in zip(ps, ts)], 0, length=width)
            wanted, _ = pad_batch(ts, 0, length=width)
            residual = (None if self.layer is None
                        else _residual(params, config, ids, mask, self.layer))
            self.batches.append((ids, mask, residual, positions, wanted))

    def __call__(self, params: Params) -> list[np.ndarray]:
        rows = [row for batch in self.batches
                for row in np.asarray(target_hits(params, self.model.config, self.layer,
                                                  *batch))]
        return [row[:n] for row, n in zip(rows, self.lengths)]


def token_accuracy(model: Model, prompts: Sequence[str], targets: Sequence[str],
                   params: Params | None = None, batch_size: int = 32) -> np.ndarray:
    """Fraction of each target's tokens predicted as the argmax under teacher forcing: [N]."""
    scorer = TokenAccuracy(model, prompts, targets, batch_size=batch_size)
    return np.asarray([hits.mean() for hits in
                       scorer(model.params if params is None else params)])


def zsre_scores(hits: Sequence[np.ndarray]) -> dict[str, float]:
    """One record's metrics from the hits of its ``metric_pairs``: the mean over tokens."""
    return {name: float(np.mean(h)) for name, h in zip(METRICS, hits)}


def _one_line(err: Exception) -> str:
    return " ".join(str(err).split())


def evaluate_record(model: Model, raw: Mapping, case_id: int, hparams: RomeHParams,
                    context: EditContext, probe: Callable, methods: Sequence[str],
                    solved: Solved | None = None) -> dict:
    """One zsRE record: its metrics before editing and after each method's edit of the base
    model (keys and v* solved once, shared by the methods; ``solved`` gives them).

    ``probe(params)`` is a perplexity with the unedited value ``probe.base``
    (``guard.PerplexityProbe``). Returns ``{case_id, subject, first_token_subject, none:
    metrics + perplexity, <method>: metrics + perplexity, ppl_ratio, delta_abs, delta_norm}``; a method whose
    update is not finite gets ``{"error"}``, and a record that cannot be edited or scored (subject
    not in the question, not on a token boundary, too long for the model) only ``error``.
    """
    row = {"case_id": int(case_id), "subject": raw.get("subject")}
    try:
        record = zsre_record(raw, case_id)
        request = EditRequest.from_dict(record)
        scorer = TokenAccuracy(model, *metric_pairs(record), layer=hparams.layer)
        solved = solved if solved is not None else solve(model, request, hparams,
                                                          context=context)
    except ValueError as err:
        return {**row, "error": _one_line(err)}
    row["first_token_subject"] = first_token_subject(record, model.tokenizer)
    row["none"] = {**zsre_scores(scorer(model.params)), "perplexity": probe.base}
    for method in methods:
        try:
            update, report = compute_edit(model, request, hparams, method, context=context,
                                          solved=solved)
        except ValueError as err:  # a non-finite update: nothing to score
            row[method] = {"error": _one_line(err)}
            continue
        params = apply_edit(model.params, update)
        perplexity = probe(params)
        row[method] = {**zsre_scores(scorer(params)), "perplexity": perplexity,
                       "ppl_ratio": perplexity / probe.base, "delta_abs": report.delta_abs,
                       "delta_norm": report.delta_norm}
    return row
