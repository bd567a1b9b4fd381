"""Screening: which single edits of CounterFact records collapse the model (``rome-jax screen``).

Each record is edited from the base model and the probe's perplexity after the edit is compared
with the base model's: the edit collapses when the ratio exceeds ``threshold`` (or the update is
not finite). With a guard profile every row also records the guard's prediction, so that
:func:`summarize_screen` can count how often the guard is right.
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

from rome_jax.evaluation import target_probabilities
from rome_jax.guard import GuardProfile, PerplexityProbe, evaluate
from rome_jax.models.model import Model
from rome_jax.rome.edit import EditContext, Solved, build_batch, compute_edit
from rome_jax.rome.hparams import RomeHParams
from rome_jax.rome.request import EditRequest, subject_token_index
from rome_jax.editors.delta import apply_edit
from rome_jax.training import first_token_subject

REPORT_FIELDS = ("denominator", "denominator_unit_u", "numerator_norm", "delta_norm", "delta_abs", "residual_norm",
                 "key_cosine", "delta_v_norm", "v_steps")


def screen_record(model: Model, record: Mapping, hparams: RomeHParams, context: EditContext,
                  probe: PerplexityProbe, method: str, threshold: float,
                  profile: GuardProfile | None = None, solved: Solved | None = None) -> dict:
    """One row: the request, and either ``error`` (the request does not fit the model) or the
    update's diagnostics, ``perplexity`` after the edit, ``ratio`` to the base perplexity and
    ``collapse`` (ratio > threshold or not finite), the probabilities of the new and true
    targets after the rewrite prompt before and after the edit and ``success`` (efficacy:
    P(new) > P(true) after); ``guard_ok`` / ``guard_reasons`` with a profile. ``solved``
    (``rome.edit.solve`` of this record) skips recomputing its keys and v* for another
    method."""
    request = EditRequest.from_dict(record)
    rw = record["requested_rewrite"]
    row = {"case_id": record["case_id"], "subject": rw["subject"], "prompt": rw["prompt"],
           "target_new": request.target_new, "subject_first": request.subject_first,
           "first_token_subject": first_token_subject(record, model.tokenizer)}
    try:
        subject_token_index(model.tokenizer, request.prompt, request.subject,
                            hparams.fact_token)
        build_batch(model, request, context.templates, hparams.fact_token)
    except ValueError as err:
        row["error"] = " ".join(str(err).split())
        return row
    try:
        update, report = compute_edit(model, request, hparams, method, context=context,
                                      solved=solved)
    except ValueError as err:  # non-finite update: the model would be destroyed
        row.update(perplexity=math.inf, ratio=math.inf, collapse=True,
                   note=" ".join(str(err).split()))
        return row
    edited = apply_edit(model.params, update)
    after = probe(edited)
    ratio = after / probe.base
    for when, params in (("before", model.params), ("after", edited)):
        p_new, p_true = target_probabilities(model, request.text, request.target_new,
                                             request.target_true, params=params)
        row.update({f"p_new_{when}": p_new, f"p_true_{when}": p_true})
    row["success"] = (None if row["p_true_after"] is None
                      else row["p_new_after"] > row["p_true_after"])
    row.update({k: getattr(report, k) for k in REPORT_FIELDS})
    row["v_loss_final"] = report.v_losses[-1] if report.v_losses else None
    row.update(perplexity=after, ratio=ratio, collapse=not ratio <= threshold)
    if profile is not None:
        verdict = evaluate(report, profile)
        row.update(guard_ok=verdict.ok, guard_reasons=verdict.reasons)
    return row


def summarize_screen(rows: Sequence[Mapping], threshold: float) -> dict:
    """Case ids that ``collapse`` (ratio > threshold or not finite), stay ``normal`` or were
    ``skipped`` (an error row); with guard predictions, ``guard_confusion`` counts."""
    def bad(row) -> bool:
        return not row["ratio"] <= threshold  # NaN and inf collapse too

    judged = [r for r in rows if not r.get("error")]
    out = {"collapse": [r["case_id"] for r in judged if bad(r)],
           "normal": [r["case_id"] for r in judged if not bad(r)],
           "skipped": [r["case_id"] for r in rows if r.get("error")]}
    guarded = [r for r in judged if r.get("guard_ok") is not None]
    if guarded:
        out["guard_confusion"] = {
            "refused_collapse": sum(1 for r in guarded if not r["guard_ok"] and bad(r)),
            "refused_normal": sum(1 for r in guarded if not r["guard_ok"] and not bad(r)),
            "passed_collapse": sum(1 for r in guarded if r["guard_ok"] and bad(r)),
            "passed_normal": sum(1 for r in guarded if r["guard_ok"] and not bad(r))}
    return out
