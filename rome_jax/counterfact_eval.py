"""CounterFact evaluation of edit methods: every record is edited from the base model with each
method and scored with ROME's CounterFact metrics (``evaluation.counterfact_metrics``), the
perplexity ratio of a probe corpus, the update's size, and optionally generation entropy.

With ``test_prefix`` every model is also scored with a prefix in front of the rewrite and
paraphrase prompts that open with the subject ("The Fall of ROME"'s test-time fix,
``evaluation.counterfact_prompts``), beside the plain scores. The prefixes are sampled from the
model with their own key, so they are not the context templates the edit was computed with, and
a record's prefix is chosen by its case id, so its scores do not depend on which records run.

The keys and v* of a record do not depend on the method, so they are computed once per record
and every method's update is made from them.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, Mapping, Sequence

import jax
import numpy as np

from rome_jax.evaluation import (counterfact_metrics, counterfact_nlls, counterfact_prompts,
                                 generation_entropy, summarize_counterfact)
from rome_jax.models.model import Model
from rome_jax.rome.edit import EditContext, Solved, compute_edit, solve
from rome_jax.rome.hparams import RomeHParams
from rome_jax.rome.request import EditRequest
from rome_jax.rome.templates import sample_context_templates
from rome_jax.editors.delta import apply_edit
from rome_jax.editors.rome import canonical_method
from rome_jax.training import first_token_subject


@dataclasses.dataclass(frozen=True)
class EvalSettings:
    """``test_prefix`` also scores with a test-time prefix; ``generation_prompts`` > 0 also
    measures generation entropy (ROME's ``GE`` and the normalised ``GE_norm``) on that many of
    each record's generation prompts, ``generation_tokens`` new tokens each (top-5 sampling)."""

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


def _scores(model: Model, record: Mapping, params, prefix: str | None, settings: EvalSettings,
            perplexity: float, base_perplexity: float, key: jax.Array) -> dict:
    """CounterFact metrics of ``params`` (and, with a prefix, the same under "prefixed"),
    perplexity, its ratio, and generation entropy when asked."""
    prompt_sets = [counterfact_prompts(record)]
    if prefix is not None:
        prompt_sets.append(counterfact_prompts(record, prefix))
    nlls = counterfact_nlls(model, record, prompt_sets, params)
    row = counterfact_metrics(nlls[0])
    if prefix is not None:
        row["prefixed"] = counterfact_metrics(nlls[1])
    row.update(perplexity=perplexity, ppl_ratio=perplexity / base_perplexity)
    if settings.generation_prompts:
        prompts = list(record["generation_prompts"][:settings.generation_prompts])
        row["GE"], row["GE_norm"] = generation_entropy(model, prompts, key,
                                                       settings.generation_tokens, params=params)
    return row


def evaluate_record(model: Model, record: Mapping, hparams: RomeHParams, context: EditContext,
                    probe: Callable, settings: EvalSettings, prefixes: Sequence[str] = (),
                    solved: Solved | None = None) -> dict:
    """One record: its scores before editing and after each method's edit (keys and v* solved
    once and shared by the methods; ``solved`` gives them, e.g. from ``solve_many``).

    ``probe(params)`` is a perplexity (e.g. ``guard.PerplexityProbe``, whose ``base`` is the
    unedited value); with ``settings.test_prefix`` the prefixed scores use
    ``prefix = prefixes[case_id % len(prefixes)]`` (``test_prefixes``).
    Returns {"case_id", "subject_first", "first_token_subject", "prefix" (or None),
    "rewrite_prompt" (as scored with the prefix), "before": scores, "edits": {method: scores +
    update diagnostics (|Δ|, ‖Δ‖, denominators...), or {"error": ...}}}.
    """
    request = EditRequest.from_dict(record)
    if settings.test_prefix and not prefixes:
        raise ValueError("test_prefix: give the prefixes to choose from")
    prefix = prefixes[int(record["case_id"]) % len(prefixes)] if settings.test_prefix else None
    key = jax.random.fold_in(jax.random.key(settings.seed), int(record["case_id"]))
    base = probe.base
    row = {"case_id": int(record["case_id"]), "subject_first": request.subject_first,
           "first_token_subject": first_token_subject(record, model.tokenizer),
           "prefix": prefix, "rewrite_prompt": counterfact_prompts(record, prefix)["rewrite"][0],
           "before": _scores(model, record, model.params, prefix, settings, base, base, key),
           "edits": {}}
    if solved is None:
        solved = solve(model, request, hparams, context=context)
    for method in settings.methods:
        try:
            update, report = compute_edit(model, request, hparams, method, context=context,
                                          solved=solved)
        except ValueError as err:  # a non-finite update: nothing to score
            row["edits"][method] = {"error": " ".join(str(err).split())}
            continue
        params = apply_edit(model.params, update)
        scores = _scores(model, record, params, prefix, settings, probe(params), base, key)
        scores.update(delta_abs=report.delta_abs, delta_norm=report.delta_norm,
                      denominator=report.denominator,
                      denominator_unit_u=report.denominator_unit_u,
                      residual_norm=report.residual_norm, key_cosine=report.key_cosine)
        if report.key_sin2 is not None:  # k2-rome: the conditioning of its two keys
            scores.update(key_sin2=report.key_sin2, key_condition=report.key_condition)
        row["edits"][method] = scores
    return row


_METRICS = ("ES", "PS", "NS", "EM", "PM", "NM")


def check_row(row: Mapping, settings: EvalSettings, where: str = "") -> None:
    """ValueError (prefixed by ``where``, naming the field) unless ``row`` holds what
    ``summarize`` reads of an ``evaluate_record`` row made with ``settings``: a true/false
    ``first_token_subject``, numeric scores ``before`` and for each method (or its
    ``error``), with the prefixed scores and generation entropies when measured."""
    def number(x) -> bool:
        return isinstance(x, (int, float)) and not isinstance(x, bool)

    if not isinstance(row.get("first_token_subject"), bool):
        raise ValueError(f"{where}first_token_subject: expected true or false")
    edits = row.get("edits")
    if not isinstance(edits, Mapping):
        raise ValueError(f"{where}edits: expected an object of method -> scores")
    for name, scores in [("before", row.get("before")),
                         *((f"edits.{m}", edits.get(m)) for m in settings.methods)]:
        if not isinstance(scores, Mapping):
            raise ValueError(f"{where}{name}: expected an object of scores")
        if name != "before" and "error" in scores:
            continue
        need = {name: (*_METRICS, "ppl_ratio")}
        if name != "before":
            need[name] += ("delta_abs", "residual_norm")
        if settings.generation_prompts:
            need[name] += ("GE", "GE_norm")
        if settings.test_prefix:
            if not isinstance(scores.get("prefixed"), Mapping):
                raise ValueError(f"{where}{name}.prefixed: expected an object of scores")
            need[f"{name}.prefixed"] = _METRICS
        for part, fields in need.items():
            values = scores if part == name else scores["prefixed"]
            bad = [f for f in fields if not number(values.get(f))]
            if bad:
                raise ValueError(f"{where}{part}.{bad[0]}: expected a number, got "
                                 f"{values.get(bad[0])!r}")


def summarize(rows: Sequence[Mapping], methods: Sequence[str],
              subset: Callable[[Mapping], bool] = lambda row: True,
              prefixed: bool = False) -> dict[str, dict]:
    """Per method (and "none", before editing) over the rows in ``subset``: the CounterFact
    summary (ES, PS, NS, S, EM, PM, NM, n; with ``prefixed``, of the scores with the test-time
    prefix), the median and largest perplexity ratio, the mean generation entropies when
    measured, the median |Δ| and median ‖v* − Wk − b‖ (the update's residual at the key it
    writes) and how many edits failed."""
    rows = [r for r in rows if subset(r)]
    out = {}
    for method in ("none", *methods):
        scored = [r["before"] if method == "none" else r["edits"][method] for r in rows]
        ok = [s for s in scored if "error" not in s]
        summary = summarize_counterfact([s["prefixed"] for s in ok] if prefixed else ok)
        ratios = [s["ppl_ratio"] for s in ok]
        summary.update(
            ppl_ratio_median=float(np.median(ratios)) if ratios else math.nan,
            ppl_ratio_max=float(np.max(ratios)) if ratios else math.nan,
            failed=len(scored) - len(ok))
        for entropy in ("GE", "GE_norm"):
            if ok and entropy in ok[0]:
                summary[entropy] = float(np.nanmean([s[entropy] for s in ok]))
        if method != "none":
            for field in ("delta_abs", "residual_norm"):
                summary[f"{field}_median"] = (float(np.median([s[field] for s in ok]))
                                              if ok else math.nan)
        out[method] = summary
    return out
