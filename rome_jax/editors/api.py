"""One editor interface for every method: ``(model, requests, hparams, context) -> (Edit,
report)``.

    context = prepare_editor(model, method, hparams, key)       # once per model and method
    edit, report = edit_requests(model, requests, method, hparams, context=context)
    new_params = apply_edit(model.params, edit)

``rome``, ``c-rome`` (= ``r-rome``) and ``p-rome`` write the requests one after the other (a
fold of ROME's single edits, each on the result of the previous one, exactly as
``rome.edit.edit_sequential``): their ``Edit`` holds the B rank-one updates as one rank-B
factor pair at ROME's layer, and the report is the list of ``EditReport``s. ``memit``,
``emmet`` and ``alphaedit`` write them in one update (``editors.batch.edit_batch``): the report
is a ``BatchReport``. The CLI, the experiments and the guard choose a method and call these two.
"""

from __future__ import annotations

from typing import Sequence

import jax

from rome_jax.editors.batch import BatchContext, BatchReport, edit_batch, prepare_batch
from rome_jax.editors.delta import Edit, apply_edit, combine
from rome_jax.editors.hparams import BATCH_METHODS, BatchHParams
from rome_jax.editors.rome import METHODS as ROME_METHODS
from rome_jax.editors.rome import canonical_method
from rome_jax.models.model import Model
from rome_jax.models.transformer import Params
from rome_jax.rome.edit import (EditContext, EditReport, _checked, _requests, compute_edit,
                                prepare)
from rome_jax.rome.hparams import RomeHParams
from rome_jax.rome.request import EditRequest

METHODS = ROME_METHODS + BATCH_METHODS


def _method(method: str) -> str:
    if method in BATCH_METHODS:
        return method
    if method not in ROME_METHODS:
        raise ValueError(f"method: {method!r} is not one of {', '.join(METHODS)}")
    return canonical_method(method)


def prepare_editor(model: Model, method: str, hparams: RomeHParams | BatchHParams | None = None,
                   key: jax.Array | None = None, **options) -> EditContext | BatchContext:
    """What every edit of ``model`` by ``method`` shares (templates, key statistics): ROME's
    ``prepare`` or ``prepare_batch``; ``options`` go to them."""
    method = _method(method)
    if method in BATCH_METHODS:
        return prepare_batch(model, method, hparams, key, **options)
    return prepare(model, hparams, key, **options)


def edit_requests(model: Model, requests: Sequence[EditRequest | dict], method: str,
                  hparams: RomeHParams | BatchHParams | None = None, *,
                  context: EditContext | BatchContext | None = None,
                  params: Params | None = None) -> tuple[Edit, list[EditReport] | BatchReport]:
    """Every request of ``requests`` written into ``params`` (default ``model.params``) by
    ``method``: the edit as a value (not applied) and its report. Pure: the same inputs give the
    same edit bit for bit. ValueError for a bad request or a non-finite update."""
    method = _method(method)
    if method in BATCH_METHODS:
        result = edit_batch(model, requests, method, hparams, context=context, params=params)
        return result.edit, result.report
    hparams = _checked(model, hparams, context)
    requests = _requests(requests)
    if not requests:
        raise ValueError("requests: empty (an edit needs at least one request)")
    context = context or prepare(model, hparams)
    params = model.params if params is None else params
    total, reports = None, []
    for request in requests:
        update, report = compute_edit(model, request, hparams, method, context=context,
                                      params=params)
        params = apply_edit(params, update)
        total = update if total is None else combine(total, update)
        reports.append(report)
    return total, reports
