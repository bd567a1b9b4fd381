"""CounterFact evaluation of edit methods: every record is edited from the base model with each
method and scored with ROME's CounterFact metrics (``evaluation.counterfact_metrics``), the
perplexity ratio of a probe corpus, the update's size, and optionally generation entropy.

With ``test_prefix`` the rewrite prompt of a record whose subject opens it is scored with a
prefix in front ("The Fall of ROME"'s test-time fix). The prefixes are sampled from the model
with their own key, so they are not the context templates the edit was computed with, and a
record's prefix is chosen by its case id, so its scores do not depend on which records run.

The keys and v* of a record do not depend on the method, so they are computed once per record
and every method's update is made from them.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, Mapping, Sequence

import jax
import numpy as np

from rome_jax.evaluation import (counterfact_metrics, counterfact_nll, generation_entropy,
                                 summarize_counterfact)
from rome_jax.models.model import Model
from rome_jax.rome.edit import EditContext, compute_edit, solve, with_test_prefix
from rome_jax.rome.hparams import RomeHParams
from rome_jax.rome.request import EditRequest
from rome_jax.rome.templates import sample_context_templates
from rome_jax.rome.update import apply_edit, canonical_method
from rome_jax.training import first_token_subject


@dataclasses.dataclass(frozen=True)
class EvalSettings:
    """``generation_prompts`` > 0 also measures generation entropy on that many of each record's
    generation prompts, ``generation_tokens`` new tokens each (top-5 sampling)."""

    methods: tuple[str, ...] = ("rome", "c-rome", "p-rome")
    test_prefix: bool = False
    generation_prompts: int = 0
    generation_tokens: int = 50
    seed: int = 0

    def __post_init__(self):
        if not self.methods:
            raise ValueError("methods: give at least one method")
        for m in self.methods:
            canonical_method(m)
        if self.generation_prompts < 0 or self.generation_tokens < 1:
            raise ValueError("generation_prompts must be >= 0 and generation_tokens >= 1")


def test_prefixes(model: Model, seed: int, n: int = 10) -> tuple[str, ...]:
    """``n`` 10-token prefixes sampled from the model with key ``(seed, 1)``: held apart from the
    context templates of the edits (sampled with key ``seed``)."""
    key = jax.random.fold_in(jax.random.key(seed), 1)
    return sample_context_templates(model, key, ((10, n),)).prefixes


def _scores(model: Model, record: Mapping, params, rewrite_prompt: str, settings: EvalSettings,
            perplexity: float, base_perplexity: float, key: jax.Array) -> dict:
    row = counterfact_metrics(counterfact_nll(model, record, params, rewrite_prompt))
    row.update(perplexity=perplexity, ppl_ratio=perplexity / base_perplexity)
    if settings.generation_prompts:
        prompts = list(record["generation_prompts"][:settings.generation_prompts])
        row["GE"] = generation_entropy(model, prompts, key, settings.generation_tokens,
                                       params=params)
    return row


def evaluate_record(model: Model, record: Mapping, hparams: RomeHParams, context: EditContext,
                    probe: Callable, settings: EvalSettings, prefixes: Sequence[str] = ()
                    ) -> dict:
    """One record: its scores before editing and after each method's edit.

    ``probe(params)`` is a perplexity (e.g. ``guard.PerplexityProbe``, whose ``base`` is the
    unedited value); with ``settings.test_prefix`` the rewrite prompt gets
    ``prefixes[case_id % len(prefixes)]`` (``test_prefixes``).
    Returns {"case_id", "subject_first", "first_token_subject", "rewrite_prompt", "before": scores,
    "edits": {method: scores + update diagnostics, or {"error": ...}}}.
    """
    request = EditRequest.from_dict(record)
    if settings.test_prefix and not prefixes:
        raise ValueError("test_prefix: give the prefixes to choose from")
    rewrite = (with_test_prefix(request.text, request.subject,
                                prefixes[int(record["case_id"]) % len(prefixes)])
               if settings.test_prefix else request.text)
    key = jax.random.fold_in(jax.random.key(settings.seed), int(record["case_id"]))
    base = probe.base
    row = {"case_id": int(record["case_id"]), "subject_first": request.subject_first,
           "first_token_subject": first_token_subject(record, model.tokenizer),
           "rewrite_prompt": rewrite,
           "before": _scores(model, record, model.params, rewrite, settings, base, base, key),
           "edits": {}}
    solved = solve(model, request, hparams, context=context)  # keys and v*: the same per method
    for method in settings.methods:
        try:
            update, report = compute_edit(model, request, hparams, method, context=context,
                                          solved=solved)
        except ValueError as err:  # a non-finite update: nothing to score
            row["edits"][method] = {"error": " ".join(str(err).split())}
            continue
        params = apply_edit(model.params, update)
        scores = _scores(model, record, params, rewrite, settings, probe(params), base, key)
        scores.update(delta_abs=report.delta_abs, denominator=report.denominator,
                      denominator_unit_u=report.denominator_unit_u,
                      residual_norm=report.residual_norm, key_cosine=report.key_cosine)
        row["edits"][method] = scores
    return row


def summarize(rows: Sequence[Mapping], methods: Sequence[str],
              subset: Callable[[Mapping], bool] = lambda row: True) -> dict[str, dict]:
    """Per method (and "none", before editing) over the rows in ``subset``: the CounterFact
    summary (ES, PS, NS, S, EM, PM, NM, n), the median and largest perplexity ratio, the mean
    generation entropy when measured, the median |Δ| and how many edits failed."""
    rows = [r for r in rows if subset(r)]
    out = {}
    for method in ("none", *methods):
        scored = [r["before"] if method == "none" else r["edits"][method] for r in rows]
        ok = [s for s in scored if "error" not in s]
        summary = summarize_counterfact(ok)
        ratios = [s["ppl_ratio"] for s in ok]
        summary.update(
            ppl_ratio_median=float(np.median(ratios)) if ratios else math.nan,
            ppl_ratio_max=float(np.max(ratios)) if ratios else math.nan,
            failed=len(scored) - len(ok))
        if ok and "GE" in ok[0]:
            summary["GE"] = float(np.mean([s["GE"] for s in ok]))
        if method != "none":
            summary["delta_abs_median"] = (float(np.median([s["delta_abs"] for s in ok]))
                                           if ok else math.nan)
        out[method] = summary
    return out
