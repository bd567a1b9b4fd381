"""The batch editors' driver: many facts into one model, by MEMIT, EMMET or AlphaEdit.

    context = prepare_batch(model, "memit", hparams, key)   # templates, C per layer, once
    result = edit_batch(model, requests, "memit", hparams, context=context)
    new_params = apply_edit(model.params, result.edit)

For B requests and the window ``hparams.layers`` = l_1 < … < l_n (z layer l_n):

1. v* targets (``rome.edit.solve_built``, sharded over devices): δ_i at l_n, optimised as
   MEMIT's ``compute_z`` (``hparams.v``: MEMIT clamps ‖δ‖ against the residual stream).
2. For each layer l_j in order, on the params updated so far (so l_j's keys see the earlier
   layers' updates, as the original): the keys k^u, k̄ [B, F] at l_j and the residual stream
   h_z [B, D] leaving l_n at the plain prompt's lookup token; the residual
   R = (δ − (h_z − h_z⁰)) / (n − j + 1) [B, D] (h_z⁰: before any update), plus (k^u − k̄) w_l
   when the key convention is ``c-rome`` (the residual measured at k̄); then the method's closed
   form (``editors.memit`` / ``emmet`` / ``alphaedit``) gives Δw_l = left @ right, applied at
   once.
3. ``Edit`` = {l_j: Δw_l}, refused if not finite.

Keys (``keys``): ``rome``: K = k̄ with the residual at the plain prompt (MEMIT's own: its k
averages the plain prompt and the templates' group means; here k̄ is ROME's flat mean over the
same rows); ``c-rome``: K = k̄, residual at k̄; ``p-rome``: K = k^u. EMMET's constraints use
K_a = k̄, K_b = k^u under ``rome`` (the mixed keys of the original ROME code, batched), else
K_a = K_b = K.

AlphaEdit's K_pᵀK_p of earlier batches is ``preserved`` ({layer: [F, F]}), returned updated in
``BatchResult`` for the next batch of a sequential run (``edit_batches`` folds it); never a
global. Memory: O(F² + B·(F + D)) per layer besides the model; the request axis is processed
``chunk`` requests at a time.
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Callable, Iterable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from rome_jax.editors import alphaedit, emmet, memit
from rome_jax.editors.delta import Edit, apply_edit, compact
from rome_jax.editors.lowrank import LowRankDiagnostics
from rome_jax.editors.hparams import BATCH_METHODS, BatchHParams, batch_preset
from rome_jax.models.config import ModelConfig
from rome_jax.models.model import Model
from rome_jax.models.transformer import (Params, residual_after, residual_at, rome_weight,
                                         widened)
from rome_jax.rome.edit import (_checked, _requests, batch_mesh, build_batch,
                                context_templates, shard_requests, solve_built,
                                stack_batches)
from rome_jax.rome.keys import keys_from_residual
from rome_jax.rome.request import EditRequest
from rome_jax.rome.stats import KeyStats, key_stats_layers
from rome_jax.rome.templates import ContextTemplates
from rome_jax.rome.values import VBatch, VResult
from rome_jax.sharding import shard_params


@dataclasses.dataclass(frozen=True, eq=False)
class BatchContext:
    """What every batch of one model and method shares: the context templates, the key
    statistics of each edited layer and what the method derives from them once per layer
    (MEMIT: C in float32; EMMET: the Cholesky factor of C; AlphaEdit: the projector P onto C's
    null space)."""

    method: str
    layers: tuple[int, ...]
    templates: ContextTemplates
    stats: dict
    derived: dict


class BatchResult(NamedTuple):
    """The edit, its report, AlphaEdit's updated ``preserved`` ({layer: K_pᵀK_p [F, F]};
    unchanged for the other methods) and the keys each layer's closed form wrote ({layer: K
    [B, F]}; AlphaEdit's ``preserved`` grew by KᵀK)."""

    edit: Edit
    report: "BatchReport"
    preserved: dict
    keys: dict


@dataclasses.dataclass
class BatchReport:
    """What a batch edit did; ``to_dict`` is JSON-ready. ``layers``: per edited layer, the
    closed form's diagnostics (``update.residual_norm_mean``, ``update.delta_norm`` = ‖Δw‖_F,
    ``update.fit_error_mean/max`` = ‖k_i Δw − r_i‖, EMMET's ``denominator_min`` /
    ``denominator_condition``, AlphaEdit's null-space rank), |Δ| = ‖Δw‖_F / (F·D) and the rank.
    ``v_losses`` / ``v_delta_norms``: each request's final v* loss and ‖δ‖. ``seconds_solve``:
    the v* solves; ``seconds_update``: keys, residuals and closed forms."""

    method: str
    keys: str
    n_requests: int
    layers: list[dict]
    v_losses: list[float]
    v_delta_norms: list[float]
    seconds_solve: float
    seconds_update: float

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _checked_batch(model: Model, method: str, hparams: BatchHParams | None,
                   context: BatchContext | None = None) -> BatchHParams:
    if hparams is not None and not isinstance(hparams, BatchHParams):
        raise TypeError(f"hparams: expected BatchHParams or None, got {type(hparams).__name__}")
    _checked(model, None if hparams is None else hparams.v)  # model type, v* settings
    if method not in BATCH_METHODS:
        raise ValueError(f"method: {method!r} is not one of {', '.join(BATCH_METHODS)}")
    if hparams is None:
        hparams = batch_preset(model.config, method)
    hparams.check(model.config)
    if context is not None:
        if not isinstance(context, BatchContext):
            raise TypeError(f"context: expected a BatchContext from prepare_batch(), got "
                            f"{type(context).__name__}")
        if context.method != method or context.layers != hparams.layers:
            raise ValueError(f"context: prepared for {context.method} at layers "
                             f"{list(context.layers)}, but the edit asks for {method} at layers "
                             f"{list(hparams.layers)}; prepare_batch again")
    return hparams


def _derive(method: str, stats: KeyStats, hparams: BatchHParams) -> jax.Array:
    moment = jnp.asarray(stats.moment, jnp.float32)
    if method == "memit":
        return moment
    if method == "emmet":  # the original's C' = mom2_update_weight·C + update_norm_lambda·I
        return stats.factor(hparams.update_norm_lambda / hparams.mom2_update_weight) * math.sqrt(
            hparams.mom2_update_weight)
    return alphaedit.null_space_projector(moment, hparams.nullspace_threshold,
                                          relative=hparams.nullspace_relative)


def prepare_batch(model: Model, method: str, hparams: BatchHParams | None = None,
                  key: jax.Array | None = None, *,
                  templates: ContextTemplates | Sequence[str] | None = None,
                  stats: dict | None = None, log=None) -> BatchContext:
    """Sample the templates with ``key`` (default ``jax.random.key(0)``) unless given, and
    load or compute (cached on disk, one file per layer) the key statistics of every edited
    layer unless given (``stats``: {layer: KeyStats}); the missing ones are computed in one
    pass up to the highest of them (``rome.stats.key_stats_layers``)."""
    hparams = _checked_batch(model, method, hparams)
    v = hparams.v
    templates = context_templates(model, v, key, templates)
    stats = dict(stats or {})
    missing = [layer for layer in hparams.layers if layer not in stats]
    if missing:  # one pass for the whole window, one cache file per layer
        stats.update(key_stats_layers(model, missing, v.mom2_corpus,
                                      n_samples=v.mom2_n_samples, log=log))
    for layer in hparams.layers:
        if stats[layer].moment.shape != (model.config.d_mlp,) * 2:
            raise ValueError(f"stats: layer {layer} has shape {stats[layer].moment.shape}, the "
                             f"model's MLP needs {(model.config.d_mlp,) * 2}")
    derived = {layer: _derive(method, stats[layer], hparams) for layer in hparams.layers}
    return BatchContext(method, hparams.layers, templates, stats, derived)


def layer_inputs(params: Params, config: ModelConfig, layer: int, z_layer: int,
                 batch: VBatch) -> tuple[jax.Array, jax.Array, jax.Array]:
    """One request's (k^u [F], k̄ [F]) at ``layer`` and the residual stream [D] leaving
    ``z_layer`` at the plain prompt's lookup token (traceable; vmap it over requests), all
    ``widened`` (computed in the params' dtype)."""
    residual = residual_at(params, config, batch.ids, batch.mask, layer)
    keys = keys_from_residual(params, config, layer, residual, batch.mask, batch.lookup,
                              n_rows=batch.ids.shape[0] - 1)
    h_z = residual_after(params, config, residual[:1], batch.mask[:1], layer, z_layer + 1,
                         batch.lookup[:1])[0]
    return keys.plain, keys.mean, widened(h_z)


_layer_inputs = jax.jit(jax.vmap(layer_inputs, in_axes=(None, None, None, None, 0)),
                        static_argnums=(1, 2, 3))


def _all_layer_inputs(model: Model, params: Params, layer: int, z_layer: int,
                      stacked: VBatch, n: int, chunk: int, devices) -> tuple[np.ndarray, ...]:
    """``layer_inputs`` of every request, ``chunk`` at a time, each chunk sharded over the
    devices: (k^u [B, F], k̄ [B, F], h_z [B, D]) on the host."""
    mesh = batch_mesh(devices, params)
    params = shard_params(params, mesh)
    parts = []
    for start in range(0, n, chunk):
        piece = jax.tree.map(lambda x: x[start:start + chunk], stacked)
        rows = len(piece.ids)
        piece = jax.tree.map(lambda x: np.concatenate(
            [x, np.repeat(x[-1:], chunk - rows, 0)]) if rows < chunk else x, piece)
        out = jax.device_get(_layer_inputs(params, model.config, layer, z_layer,
                                           shard_requests(piece, mesh)))
        parts.append([x[:rows] for x in out])
    return tuple(np.concatenate(xs) for xs in zip(*parts))


def _closed_form(method: str, hparams: BatchHParams, derived: jax.Array, keys_a: jax.Array,
                 keys_b: jax.Array | None, residual: jax.Array, preserved: jax.Array | None):
    """(left [F, B], right [B, D], diagnostics) of ``method`` at one layer; keys_b (EMMET's
    constraint keys) None means keys_a."""
    if method == "memit":
        return memit.memit_factors(keys_a, residual, derived, hparams.mom2_update_weight)
    if method == "emmet":
        return emmet.emmet_factors(keys_a, keys_b, residual, derived, hparams.emmet_lambda)
    return alphaedit.alphaedit_factors(keys_a, residual, derived, preserved, hparams.l2)


_closed_form_jit = jax.jit(_closed_form, static_argnums=(0, 1))


def _diagnostics_dict(diagnostics, prefix: str = "") -> dict:
    """A closed form's (nested) diagnostics as JSON numbers: scalars as they are, per-request
    arrays (even of one request) as their mean and max (``fit_error_mean``, ``fit_error_max``)."""
    out = {}
    for name, value in diagnostics._asdict().items():
        if hasattr(value, "_asdict"):
            out.update(_diagnostics_dict(value, f"{prefix}{name}."))
            continue
        value = np.asarray(value, np.float64)
        if value.ndim == 0:
            out[prefix + name] = float(value)
        else:
            out[f"{prefix}{name}_mean"], out[f"{prefix}{name}_max"] = (float(value.mean()),
                                                                       float(value.max()))
    return out


def solve_targets(model: Model, requests: Sequence[EditRequest | dict],
                  hparams: BatchHParams, context: BatchContext, *, params: Params | None = None,
                  chunk: int = 32, devices: Sequence[jax.Device] | None = None,
                  progress: Callable[[Iterable], Iterable] | None = None) -> list[VResult]:
    """The v* targets of ``edit_batch``'s step 1 (``hparams.v`` at the last layer, on
    ``params``), one ``VResult`` per request, for ``edit_batch(..., targets=...)``: methods and
    key conventions with the same ``hparams.v`` and templates share them."""
    model = model if params is None else model.with_params(params)
    batches = [build_batch(model, r, context.templates, hparams.v.fact_token)
               for r in _requests(requests)]
    return _solve(model, batches, hparams, chunk, devices, progress)


def _solve(model: Model, batches: Sequence[VBatch], hparams: BatchHParams, chunk: int,
           devices, progress) -> list[VResult]:
    solved = solve_built(model, batches, hparams.v, batch=chunk, devices=devices)
    return [s.values for s in (progress(solved) if progress else solved)]


def edit_batch(model: Model, requests: Sequence[EditRequest | dict], method: str = "memit",
               hparams: BatchHParams | None = None, *, context: BatchContext | None = None,
               params: Params | None = None, preserved: dict | None = None, chunk: int = 32,
               devices: Sequence[jax.Device] | None = None,
               progress: Callable[[Iterable], Iterable] | None = None,
               targets: Sequence[VResult] | None = None) -> BatchResult:
    """One ``method`` update of ``params`` (default ``model.params``) that writes every request
    at once; returns ``BatchResult(edit, report, preserved, keys)``, the edit not applied.
    Pure: the same inputs give the same edit. ``preserved``: AlphaEdit's K_pᵀK_p of earlier batches
    ({layer: [F, F]}, default zeros). ``progress`` wraps the v* solves (a tqdm, say).
    ``targets``: the requests' v* targets on ``params`` with ``hparams.v`` and the context's
    templates (``solve_targets``), to share them between methods or key conventions with the
    same z settings.

    Raises ValueError for a request that does not fit the model (naming its index) and for a
    non-finite update (the model is unchanged)."""
    hparams = _checked_batch(model, method, hparams, context)
    requests = _requests(requests)
    if not requests:
        raise ValueError("requests: empty (a batch edit needs at least one request)")
    if not isinstance(chunk, int) or chunk < 1:
        raise ValueError(f"chunk: {chunk!r}; give a positive integer")
    context = context or prepare_batch(model, method, hparams)
    params = model.params if params is None else params
    current = model.with_params(params)
    batches = []
    for i, request in enumerate(requests):
        try:
            batches.append(build_batch(model, request, context.templates, hparams.v.fact_token))
        except ValueError as err:
            raise ValueError(f"requests[{i}]: {err}") from None
    n, layers, z_layer = len(requests), hparams.layers, hparams.layers[-1]
    start = time.perf_counter()
    if targets is None:
        targets = _solve(current, batches, hparams, chunk, devices, progress)
    elif len(targets) != len(requests):
        raise ValueError(f"targets: {len(targets)} v* targets for {len(requests)} requests")
    deltas = jnp.stack([t.delta for t in targets])                            # [B, D]
    seconds_solve = time.perf_counter() - start
    start = time.perf_counter()
    stacked = stack_batches(model, batches)
    chunk = min(chunk, n)
    preserved = dict(preserved or {})
    d_mlp = model.config.d_mlp
    out, written, reports, h_z0 = {}, {}, [], None
    for j, layer in enumerate(layers):
        k_plain, k_mean, h_z = _all_layer_inputs(model, params, layer, z_layer, stacked, n,
                                                 chunk, devices)
        h_z0 = h_z if h_z0 is None else h_z0
        residual = (deltas - (h_z - h_z0)) / (len(layers) - j)
        w, _ = rome_weight(params, layer)
        if hparams.keys == "p-rome":
            keys_a, keys_b = jnp.asarray(k_plain), None         # None: keys_b = keys_a
        else:
            keys_a = jnp.asarray(k_mean)
            keys_b = jnp.asarray(k_plain) if hparams.keys == "rome" else None
            if hparams.keys == "c-rome":
                residual = residual + (k_plain - k_mean) @ widened(w)
        layer_preserved = preserved.get(layer, jnp.zeros((d_mlp, d_mlp), jnp.float32))
        left, right, diagnostics = _closed_form_jit(
            method, hparams, context.derived[layer], keys_a, keys_b, jnp.asarray(residual),
            layer_preserved if method == "alphaedit" else None)
        delta = compact(left, right)
        params = apply_edit(params, Edit({layer: delta}))
        if method == "alphaedit":
            preserved[layer] = alphaedit.accumulate_preserved(layer_preserved, keys_a)
        out[layer], written[layer] = delta, keys_a
        numbers = _diagnostics_dict(diagnostics, "update." if isinstance(
            diagnostics, LowRankDiagnostics) else "")
        numbers["delta_abs"] = numbers["update.delta_norm"] / (w.shape[0] * w.shape[1])
        reports.append({"layer": layer, "rank": int(left.shape[-1]), **numbers})
    edit = Edit(out)
    report = BatchReport(
        method=method, keys=hparams.keys, n_requests=n, layers=reports,
        v_losses=[float(np.asarray(t.losses)[int(t.steps) - 1]) for t in targets],
        v_delta_norms=[float(jnp.linalg.norm(t.delta)) for t in targets],
        seconds_solve=seconds_solve, seconds_update=time.perf_counter() - start)
    if not edit.is_finite():
        norms = [r["update.delta_norm"] for r in reports]
        raise ValueError(f"non-finite update refused ({method}, layers {list(layers)}: ‖Δw‖ "
                         f"{norms}); the model is unchanged")
    return BatchResult(edit, report, preserved, written)


def edit_batches(model: Model, batches: Iterable[Sequence[EditRequest | dict]],
                 method: str = "memit", hparams: BatchHParams | None = None, *,
                 context: BatchContext | None = None, params: Params | None = None,
                 preserved: dict | None = None, **options
                 ) -> Iterable[tuple[Params, BatchResult]]:
    """Sequential batch editing, a fold: each batch is edited into the result of the previous
    ones (C and the templates stay the base model's, as in the originals), AlphaEdit's
    ``preserved`` threaded through. Yields (params after the batch, its BatchResult), so a
    caller can evaluate, journal and stop anywhere; ``options`` go to ``edit_batch``."""
    hparams = _checked_batch(model, method, hparams, context)
    context = context or prepare_batch(model, method, hparams)
    params = model.params if params is None else params
    for requests in batches:
        result = edit_batch(model, requests, method, hparams, context=context, params=params,
                            preserved=preserved, **options)
        params, preserved = apply_edit(params, result.edit), result.preserved
        yield params, result
