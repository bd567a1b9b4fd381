"""One ROME edit, sequential edits (a fold) and independent edits from one base (a vmap).

    context = prepare(model, hparams, key)                # templates + key statistics, once
    new_params, report = edit(model, request, hparams, method="c-rome", context=context)

``edit`` is pure: the input params are unchanged and the same inputs (the same key for the
templates) give the same edit bit for bit. An edit is two jit-compiled steps: ``solve`` (the
keys and v*, which do not depend on the method; the residual stream below the edit layer is
computed once inside it) and the method's closed-form update, so several methods can share one
``solve``.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, Iterator, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from rome_jax.data import bucket, pad_batch
from rome_jax.editors.delta import Edit, apply_edit
from rome_jax.editors.rome import canonical_method, rank_one_update, two_key_update
from rome_jax.evaluation import target_probabilities
from rome_jax.models.config import ModelConfig
from rome_jax.models.model import Model, check_model, check_params
from rome_jax.models.transformer import (Params, residual_after, residual_at, rome_weight,
                                         widened)
from rome_jax.rome.hparams import RomeHParams, preset_for
from rome_jax.rome.keys import Keys, keys_from_residual
from rome_jax.rome.request import EditRequest, subject_lookup
from rome_jax.rome.stats import KeyStats, key_stats
from rome_jax.rome.templates import ContextTemplates, sample_context_templates
from rome_jax.rome.values import VBatch, VResult, optimize_v
from rome_jax.sharding import make_mesh, mesh_of, shard_params

KL_PROMPT = "{} is a"


@dataclasses.dataclass(frozen=True, eq=False)
class EditContext:
    """What every edit of one model at one layer shares: the context templates, the key
    statistics and the Cholesky factor of C + ridge·I. Edits check that their hparams ask for
    the same layer and ridge."""

    templates: ContextTemplates
    stats: KeyStats
    factor: jax.Array
    ridge: float = 0.0

    @property
    def layer(self) -> int:
        """The layer whose key statistics (and C⁻¹) this context holds."""
        return self.stats.layer


def _params(model: Model, params: Params | None) -> Params:
    """``params`` (``model.params`` when None), checked as a tree of ``model``'s shape."""
    if params is None:
        return model.params
    check_params(params, model.config)
    return params


def _checked(model: Model, hparams: RomeHParams | None,
             context: EditContext | None = None) -> RomeHParams:
    """``hparams`` (the model's preset when None) checked against ``model`` and, when given,
    ``context``: TypeError / ValueError naming the argument."""
    check_model(model)
    if hparams is None:
        hparams = preset_for(model.config)
    elif not isinstance(hparams, RomeHParams):
        raise TypeError(f"hparams: expected RomeHParams or None, got {type(hparams).__name__} "
                        f"{hparams!r} (a preset by name: preset_for(model.config, name))")
    hparams.check(model.config)
    if context is None:
        return hparams
    if not isinstance(context, EditContext):
        raise TypeError(f"context: expected an EditContext from prepare(), got "
                        f"{type(context).__name__}")
    if context.layer != hparams.layer or context.ridge != hparams.mom2_ridge:
        raise ValueError(f"context: prepared for layer {context.layer} (ridge "
                         f"{context.ridge:g}), but hparams ask for layer {hparams.layer} (ridge "
                         f"{hparams.mom2_ridge:g}); prepare(model, hparams) again")
    if context.factor.shape != (model.config.d_mlp,) * 2:
        raise ValueError(f"context: key statistics of shape {context.factor.shape}, the model's "
                         f"MLP needs {(model.config.d_mlp,) * 2} (prepared for another model?)")
    return hparams


def _request(request: EditRequest | Mapping) -> EditRequest:
    if isinstance(request, EditRequest):
        return request
    if isinstance(request, Mapping):
        return EditRequest.from_dict(request)
    raise TypeError(f"request: expected an EditRequest or a dict, got {type(request).__name__}")


def _requests(requests: Sequence[EditRequest | Mapping]) -> list[EditRequest]:
    if not isinstance(requests, (list, tuple)):
        raise TypeError(f"requests: expected a list of EditRequests or dicts, got "
                        f"{type(requests).__name__}")
    return [_request(r) for r in requests]


def context_templates(model: Model, hparams: RomeHParams, key: jax.Array | None,
                      templates: ContextTemplates | Sequence[str] | None) -> ContextTemplates:
    """``templates`` as ContextTemplates, or sampled as ``hparams`` says with ``key`` (default
    ``jax.random.key(0)``) when None."""
    if key is not None and not isinstance(key, jax.Array):
        raise TypeError(f"key: expected a jax.random.key, got {type(key).__name__}")
    if templates is None:
        return sample_context_templates(model, jax.random.key(0) if key is None else key,
                                        hparams.context_template_length_params,
                                        style=hparams.context_templates)
    return templates if isinstance(templates, ContextTemplates) else ContextTemplates(
        tuple(templates))


def prepare(model: Model, hparams: RomeHParams | None = None, key: jax.Array | None = None, *,
            templates: ContextTemplates | Sequence[str] | None = None,
            stats: KeyStats | None = None, log=None) -> EditContext:
    """Sample the templates with ``key`` (default ``jax.random.key(0)``) unless given, and load
    or compute the key statistics (cached on disk) unless given."""
    hparams = _checked(model, hparams)
    if stats is not None and not isinstance(stats, KeyStats):
        raise TypeError(f"stats: expected KeyStats, got {type(stats).__name__}")
    templates = context_templates(model, hparams, key, templates)
    if stats is None:
        stats = key_stats(model, hparams.layer, hparams.mom2_corpus,
                          n_samples=hparams.mom2_n_samples, log=log)
    if stats.layer != hparams.layer or stats.moment.shape != (model.config.d_mlp,) * 2:
        raise ValueError(f"stats: computed for layer {stats.layer} with shape "
                         f"{stats.moment.shape}, the edit needs layer {hparams.layer} and "
                         f"{(model.config.d_mlp,) * 2}")
    return EditContext(templates, stats, stats.factor(hparams.mom2_ridge), hparams.mom2_ridge)


def batch_prompts(request: EditRequest, templates: ContextTemplates) -> list[str]:
    """The prompts (``{}`` for the subject) of ``request``'s batch: its prompt inside every
    context template (the first is the prompt alone), then ROME's KL prompt."""
    return [*templates.apply(request.prompt), KL_PROMPT]


def build_batch(model: Model, request: EditRequest, templates: ContextTemplates,
                fact_token: str, encodings: Sequence | None = None) -> VBatch:
    """Rows: every template around the prompt with target[:-1] appended, then the KL prompt.
    The width and the live width are bucketed so that jit sees few shapes. ``encodings``: those
    of ``batch_prompts`` with the subject filled in, made beforehand (``check_requests``).

    ValueError when the subject is not on token boundaries in the prompt, or after a context
    template (naming the template and the request's own prompt), or when a row is longer than
    the model's positions."""
    tok = model.tokenizer
    target = tok.encode(" " + request.target_new.strip())
    prompts = batch_prompts(request, templates)
    if encodings is None:
        encodings = tok.backend.encode_batch([p.format(request.subject) for p in prompts],
                                             add_special_tokens=False)
    rows, lookups, positions, targets, tmask = [], [], [], [], []
    for j, (prompt, encoding) in enumerate(zip(prompts, encodings)):
        try:
            ids, index = subject_lookup(tok, encoding, prompt, request.subject, fact_token)
        except ValueError:
            if j == 0:  # the request's own prompt: its message quotes what the user wrote
                raise
            where = (f"ROME's KL prompt {KL_PROMPT!r}" if j == len(prompts) - 1 else
                     f"the prompt {request.prompt!r} after the context template "
                     f"{templates.prefixes[j - 1]!r}")
            raise ValueError(f"subject: {request.subject!r} does not start on a token "
                             f"boundary in {where}") from None
        kl = j == len(prompts) - 1  # the KL prompt: no target, its lookup position repeated
        rows.append(ids if kl else ids + target[:-1])
        lookups.append(index)
        positions.append([index] * len(target) if kl else
                         [len(ids) - 1 + k for k in range(len(target))])
        targets.append(target)
        tmask.append([0 if kl else 1] * len(target))
    width = bucket(max(map(len, rows)))
    if width > model.config.n_positions:
        raise ValueError(f"prompt: {width} tokens with its template and target exceed the "
                         f"model's {model.config.n_positions} positions")
    ids, mask = pad_batch(rows, tok.pad_id, length=width)
    lookups = np.asarray(lookups, np.int32)
    live = np.asarray([len(r) for r in rows]) - lookups
    live_width = bucket(int(live.max()), 4)
    offsets = np.arange(live_width)[None, :]
    live_index = np.minimum(lookups[:, None] + offsets, width - 1).astype(np.int32)
    live_mask = (offsets < live[:, None]).astype(np.int32)
    as_i32 = lambda x: np.asarray(x, np.int32)
    return VBatch(ids, mask, lookups, as_i32(positions), as_i32(targets),
                  np.asarray(tmask, np.float32), live_index, live_mask)


def check_requests(model: Model, requests: Sequence[EditRequest], templates: ContextTemplates,
                   fact_token: str, progress: Callable[[int], None] | None = None,
                   chunk: int = 256) -> None:
    """What ``build_batch`` refuses, for many requests at once: ValueError ``request {i}
    ({prompt!r}): ...`` for the first request whose subject is not on token boundaries in its
    prompt or after a template, or that is too long with its templates and target. The
    prompts of ``chunk`` requests are encoded in one ``encode_batch``; ``progress(n)`` is told
    of every ``n`` requests checked."""
    tok = model.tokenizer
    for start in range(0, len(requests), chunk):
        part = requests[start:start + chunk]
        prompts = [batch_prompts(r, templates) for r in part]
        encodings = iter(tok.backend.encode_batch(
            [p.format(r.subject) for r, ps in zip(part, prompts) for p in ps],
            add_special_tokens=False))
        for i, (request, ps) in enumerate(zip(part, prompts), start):
            try:
                build_batch(model, request, templates, fact_token,
                            [next(encodings) for _ in ps])
            except ValueError as err:
                raise ValueError(f"request {i} ({request.prompt!r}): {err}") from None
        if progress is not None:
            progress(len(part))


def _pad_batch(batch: VBatch, pad_id: int, width: int, live_width: int,
               n_target: int) -> VBatch:
    """Widen a batch to ``width`` tokens, ``live_width`` live positions and ``n_target`` target
    tokens, all masked, so that requests stack for vmap."""
    grow = lambda x, n, value=0: np.pad(x, ((0, 0), (0, n - x.shape[1])), constant_values=value)
    edge = lambda x: np.concatenate([x, np.repeat(x[:, -1:], n_target - x.shape[1], 1)], 1)
    live_index = np.minimum(batch.lookup[:, None] + np.arange(live_width)[None, :], width - 1)
    return batch._replace(
        ids=grow(batch.ids, width, pad_id), mask=grow(batch.mask, width),
        target_pos=edge(batch.target_pos), target_ids=edge(batch.target_ids),
        target_mask=grow(batch.target_mask, n_target),
        live_index=live_index.astype(np.int32), live_mask=grow(batch.live_mask, live_width))


class Solved(NamedTuple):
    """What an edit computes before its method is chosen: the keys (k^u, k̄) and v*; ``plain``
    is k2-rome's second target v*₀ (``solve_plain_core``), None until that method asks."""

    keys: Keys
    values: VResult
    plain: VResult | None = None


def solve_core(params: Params, config: ModelConfig, layer: int, steps: int, batch: VBatch,
               lr, weight_decay, kl_factor, clamp_norm_factor, early_stop_loss,
               clamp_reference: str = "mlp_output") -> Solved:
    """Keys and v* for one request's batch (traceable; ``clamp_reference`` static, as
    ``RomeHParams.clamp_reference``)."""
    residual = residual_at(params, config, batch.ids, batch.mask, layer)
    keys = keys_from_residual(params, config, layer, residual, batch.mask, batch.lookup,
                              n_rows=batch.ids.shape[0] - 1)
    w, b = rome_weight(params, layer)
    v_init = keys.plain @ widened(w) + widened(b)                 # float32 at least [D]
    reference = None
    if clamp_reference == "residual":
        reference = residual_after(params, config, residual[:1], batch.mask[:1], layer,
                                   layer + 1, batch.lookup[:1])[0]
    values = optimize_v(params, config, layer, batch, residual, v_init, steps=steps, lr=lr,
                        weight_decay=weight_decay, kl_factor=kl_factor,
                        clamp_norm_factor=clamp_norm_factor, early_stop_loss=early_stop_loss,
                        norm_reference=reference)
    return Solved(keys, values)


def prefixed_reference(keys, w: jax.Array, b: jax.Array, v_init: jax.Array) -> jax.Array:
    """``v_init`` (d_out,) rescaled to mean_i ‖W k_i + b‖ over the prefixed rows of ``keys.all``
    (i ≥ 1; row 0 when it is the only one): the reference against which k2-rome's v*₀ is
    clamped and decayed, a normal-sized value where position 0's own output is tiny."""
    prefixed = keys.all[1:] if keys.all.shape[0] > 1 else keys.all
    scale = jnp.linalg.norm(prefixed @ w + b, axis=-1).mean()
    return v_init * (scale / jnp.linalg.norm(v_init))


def solve_plain_core(params: Params, config: ModelConfig, layer: int, steps: int,
                     batch: VBatch, factor: jax.Array, solved: Solved, lr, weight_decay,
                     kl_factor, clamp_norm_factor, early_stop_loss,
                     clamp_reference: str = "mlp_output") -> Solved:
    """``solved`` with k2-rome's plain target v*₀ = v_init + δ₀ (traceable). δ₀ is optimised on
    the plain prompt alone (row 0 of ``batch`` and its KL row) of the model that already carries
    c-rome's update (its v̄* at k̄), from v_init = ŵ_c k^u + b, that model's output at the plain
    key: what c-rome leaves to do at k^u, so δ₀ stays small (and k2-rome near c-rome) where
    c-rome already makes the plain prompt work. The clamp and the decay are measured against
    the mean norm of the prefixed rows' MLP outputs mean_i ‖W k_i + b‖ (i ≥ 1), not ‖v_init‖:
    at position 0 of a Llama-family model v_init is about ten times smaller than elsewhere and
    ROME's clamp would starve δ₀. Only a subject that ends at position 0 of the plain prompt
    (a first-token subject, the case c-rome leaves unedited) gets δ₀; elsewhere v*₀ = v_init,
    which c-rome's update already meets, so k2-rome's update is c-rome's (without this gate
    δ₀ runs to the clamp on ordinary subjects too: 3.5x c-rome's ‖Δ‖ on the README's example).
    ``clamp_reference`` is accepted for a common signature and not used."""
    rows = jnp.asarray([0, batch.ids.shape[0] - 1])
    plain = jax.tree.map(lambda x: x[rows], batch)
    residual = residual_at(params, config, plain.ids, plain.mask, layer)
    w, b = rome_weight(params, layer)
    keys = solved.keys
    c_rome, _ = rank_one_update(w, b, factor, keys.plain, keys.mean, solved.values.v_star,
                                "c-rome", layer)
    edited = apply_edit(params, c_rome)
    v_init = keys.plain @ rome_weight(edited, layer)[0] + b
    values = optimize_v(edited, config, layer, plain, residual, v_init, steps=steps, lr=lr,
                        weight_decay=weight_decay, kl_factor=kl_factor,
                        clamp_norm_factor=clamp_norm_factor, early_stop_loss=early_stop_loss,
                        norm_reference=prefixed_reference(keys, w, b, v_init))
    first = batch.lookup[0] == 0
    values = values._replace(v_star=jnp.where(first, values.v_star, v_init),
                             delta=jnp.where(first, values.delta, 0.0))
    return solved._replace(plain=values)


def update_core(params: Params, layer: int, method: str, factor: jax.Array, solved: Solved):
    """The update of ``method`` from solved keys and v* (traceable; k2-rome needs
    ``solved.plain``): (Edit, UpdateDiagnostics, cos(k^u, k̄))."""
    keys = solved.keys
    w, b = rome_weight(params, layer)
    if method == "k2-rome":
        update, diagnostics = two_key_update(w, b, factor, keys.plain, keys.mean,
                                             solved.values.v_star, solved.plain.v_star, layer)
    else:
        update, diagnostics = rank_one_update(w, b, factor, keys.plain,
                                              keys.mean, solved.values.v_star, method, layer)
    cosine = keys.plain @ keys.mean / (jnp.linalg.norm(keys.plain) * jnp.linalg.norm(keys.mean))
    return update, diagnostics, cosine


def edit_core(params: Params, config: ModelConfig, layer: int, method: str, steps: int,
              batch: VBatch, factor: jax.Array, *v_settings):
    """Keys, v* (and k2-rome's v*₀) and the update for one request's batch (traceable; vmap it
    for many): (Edit, UpdateDiagnostics, v*'s VResult, cos(k^u, k̄)); k2-rome's v*₀ losses are
    reported by ``compute_edit`` only."""
    solved = solve_core(params, config, layer, steps, batch, *v_settings)
    if method == "k2-rome":
        solved = solve_plain_core(params, config, layer, steps, batch, factor, solved,
                                  *v_settings)
    update, diagnostics, cosine = update_core(params, layer, method, factor, solved)
    return update, diagnostics, solved.values, cosine


_solve_jit = jax.jit(solve_core, static_argnums=(1, 2, 3, 10))
_solve_plain_jit = jax.jit(solve_plain_core, static_argnums=(1, 2, 3, 12))
_update_jit = jax.jit(update_core, static_argnums=(1, 2))
_edit_vmap = jax.jit(jax.vmap(edit_core, in_axes=(None,) * 5 + (0,) + (None,) * 7),
                     static_argnums=(1, 2, 3, 4, 12))
_solve_vmap = jax.jit(jax.vmap(solve_core, in_axes=(None,) * 4 + (0,) + (None,) * 6),
                      static_argnums=(1, 2, 3, 10))


def batch_mesh(devices: Sequence[jax.Device] | None = None, params: Params | None = None
               ) -> Mesh:
    """The mesh whose ``data`` axis requests are split over: the one ``params`` lie on
    (``sharding.mesh_of``) when no ``devices`` are named, else every device of ``devices``
    (default ``jax.devices()``) on the data axis (``sharding.make_mesh``)."""
    placed = mesh_of(params) if devices is None else None
    return placed or make_mesh(None, devices)


def pad_rows(tree, multiple: int):
    """Every leaf [n, ...] of ``tree`` padded to [ceil(n / multiple) * multiple, ...] with
    copies of its last row."""
    def pad(x):
        extra = -x.shape[0] % multiple
        return np.concatenate([x, np.repeat(x[-1:], extra, 0)]) if extra else x
    return jax.tree.map(pad, tree)


@dataclasses.dataclass
class EditReport:
    """What an edit did and why it is (un)safe; ``to_dict`` is JSON-ready.

    With u = C⁻¹ka and r = v* − W kb − b (``editors/rome.py``): ``numerator_norm`` = ‖r‖‖u‖ and
    ``denominator`` = uᵀkb (this project's units, the guard's); ``residual_norm`` = ‖r‖ and
    ``denominator_unit_u`` = kbᵀu/‖u‖ are the original code's and the papers' numerator and
    denominator (u normalised to unit length). ``delta_norm`` = ‖Δ‖_F in both."""

    method: str
    layer: int
    request: dict
    numerator_norm: float
    denominator: float
    delta_norm: float
    delta_abs: float
    residual_norm: float
    denominator_unit_u: float
    key_cosine: float
    v_init_norm: float
    delta_v_norm: float
    v_losses: list[float]
    v_steps: int
    p_new_before: float | None = None
    p_new_after: float | None = None
    p_true_before: float | None = None
    p_true_after: float | None = None
    key_sin2: float | None = None
    key_condition: float | None = None
    plain_v_losses: list[float] | None = None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _report(request, method, layer, diagnostics, values, cosine, plain=None) -> EditReport:
    f = lambda x: float(np.asarray(x))
    f_or_none = lambda x: None if x is None else f(x)
    finite = lambda x: [float(v) for v in np.asarray(x) if not np.isnan(v)]
    losses = np.asarray(values.losses)
    return EditReport(
        method=method, layer=layer, request=request.to_dict(),
        numerator_norm=f(diagnostics.numerator_norm), denominator=f(diagnostics.denominator),
        delta_norm=f(diagnostics.delta_norm), delta_abs=f(diagnostics.delta_abs),
        residual_norm=f(diagnostics.residual_norm),
        denominator_unit_u=f(diagnostics.denominator_unit_u), key_cosine=f(cosine),
        v_init_norm=f(jnp.linalg.norm(values.v_init)), delta_v_norm=f(jnp.linalg.norm(values.delta)),
        v_losses=[float(x) for x in losses[~np.isnan(losses)]], v_steps=int(values.steps),
        key_sin2=f_or_none(diagnostics.key_sin2),
        key_condition=f_or_none(diagnostics.key_condition),
        plain_v_losses=None if plain is None else finite(plain.losses))


def _check_finite(update: Edit, report: EditReport) -> None:
    if not update.is_finite() or not math.isfinite(report.denominator) or report.denominator == 0:
        raise ValueError(f"non-finite update refused (method {report.method}, denominator "
                         f"{report.denominator:.3g}, |Δ|_F {report.delta_norm:.3g}); the "
                         "model is unchanged")


def _probabilities(model: Model, params: Params, request: EditRequest):
    return target_probabilities(model, request.text, request.target_new, request.target_true,
                                params=params)


def _v_settings(hparams: RomeHParams) -> tuple:
    """solve_core's arguments after the batch (the last one static)."""
    return (hparams.v_lr, hparams.v_weight_decay, hparams.kl_factor, hparams.clamp_norm_factor,
            hparams.early_stop_loss, hparams.clamp_reference)


def solve(model: Model, request: EditRequest | dict, hparams: RomeHParams | None = None, *,
          context: EditContext | None = None, params: Params | None = None) -> Solved:
    """Keys and v* of ``request`` on ``params`` (default ``model.params``): everything an edit
    computes before its method. ``compute_edit(..., solved=...)`` reuses it for each method of
    the same params."""
    hparams = _checked(model, hparams, context)
    request = _request(request)
    params = _params(model, params)
    context = context or prepare(model, hparams)
    return _solve_built(model, hparams, params,
                        build_batch(model, request, context.templates, hparams.fact_token))


def _solve_built(model: Model, hparams: RomeHParams, params: Params, batch: VBatch) -> Solved:
    """``solve`` of one request's built batch (its compiled program)."""
    return _solve_jit(params, model.config, hparams.layer, hparams.v_num_grad_steps, batch,
                      *_v_settings(hparams))


def compute_edit(model: Model, request: EditRequest | dict, hparams: RomeHParams | None = None,
                 method: str = "c-rome", *, context: EditContext | None = None,
                 params: Params | None = None, solved: Solved | None = None
                 ) -> tuple[Edit, EditReport]:
    """The edit as a value (not applied) and its report (without probabilities); ``solved``
    (from ``solve`` on the same params) skips recomputing the keys and v*."""
    hparams = _checked(model, hparams, context)
    method = canonical_method(method)
    request = _request(request)
    if solved is not None and not isinstance(solved, Solved):
        raise TypeError(f"solved: expected the result of solve(), got {type(solved).__name__}")
    params = _params(model, params)
    context = context or prepare(model, hparams)
    if solved is None:
        solved = solve(model, request, hparams, context=context, params=params)
    if method == "k2-rome" and solved.plain is None:
        batch = build_batch(model, request, context.templates, hparams.fact_token)
        solved = _solve_plain_jit(params, model.config, hparams.layer,
                                  hparams.v_num_grad_steps, batch, context.factor, solved,
                                  *_v_settings(hparams))
    update, diagnostics, cosine = _update_jit(params, hparams.layer, method, context.factor,
                                              solved)
    report = _report(request, method, hparams.layer, diagnostics, solved.values, cosine,
                     solved.plain if method == "k2-rome" else None)
    _check_finite(update, report)
    return update, report


def edit(model: Model, request: EditRequest | dict, hparams: RomeHParams | None = None,
         method: str = "c-rome", *, context: EditContext | None = None,
         params: Params | None = None, probabilities: bool = True
         ) -> tuple[Params, EditReport]:
    """Apply one edit to ``params`` (default ``model.params``); returns (new params, report).

    Raises ValueError for a bad request, method or layer, and for a non-finite update.
    """
    hparams = _checked(model, hparams, context)
    request = _request(request)
    params = model.params if params is None else params
    update, report = compute_edit(model, request, hparams, method, context=context,
                                  params=params)
    new_params = apply_edit(params, update)
    if probabilities:
        report.p_new_before, report.p_true_before = _probabilities(model, params, request)
        report.p_new_after, report.p_true_after = _probabilities(model, new_params, request)
    return new_params, report


def edit_sequential(model: Model, requests: Sequence[EditRequest | dict],
                    hparams: RomeHParams | None = None, method: str = "c-rome", *,
                    context: EditContext | None = None, probabilities: bool = False,
                    progress=None) -> tuple[Params, list[EditReport]]:
    """Each edit on the result of the previous one (a fold); C and the templates stay those of
    the base model, as in ROME."""
    hparams = _checked(model, hparams, context)
    requests = _requests(requests)
    context = context or prepare(model, hparams)
    params, reports = model.params, []
    for request in (progress(requests) if progress else requests):
        params, report = edit(model, request, hparams, method, context=context, params=params,
                              probabilities=probabilities)
        reports.append(report)
    return params, reports


def stack_batches(model: Model, batches: Sequence[VBatch]) -> VBatch:
    """Requests' batches (``build_batch``) padded to equal shapes (masked) and stacked: every
    leaf gains a leading request axis."""
    width = max(b.ids.shape[1] for b in batches)
    live_width = max(b.live_index.shape[1] for b in batches)
    n_target = max(b.target_ids.shape[1] for b in batches)
    batches = [_pad_batch(b, model.tokenizer.pad_id, width, live_width, n_target)
               for b in batches]
    return VBatch(*(np.stack(xs) for xs in zip(*batches)))


def shard_requests(stacked, mesh: Mesh):
    """A stacked pytree's request axis padded to a multiple of the mesh's data axis (copies of
    the last request) and sharded over it."""
    return jax.device_put(pad_rows(stacked, mesh.shape["data"]),
                          NamedSharding(mesh, PartitionSpec("data")))


def _sharded(model: Model, batches: Sequence[VBatch], context: EditContext,
             devices: Sequence[jax.Device] | None):
    """Requests' batches stacked (``stack_batches``), the request axis padded to a multiple of
    the data axis and sharded over it (``batch_mesh``: the params' mesh, or ``devices`` on the
    data axis); params placed by the sharding rules (replicated without a model axis), the
    Cholesky factor replicated: (stacked batch, params, factor)."""
    mesh = batch_mesh(devices, model.params)
    stacked = shard_requests(stack_batches(model, batches), mesh)
    factor = jax.device_put(context.factor, NamedSharding(mesh, PartitionSpec()))
    return stacked, shard_params(model.params, mesh), factor


def _solve_sharded(model: Model, batches: Sequence[VBatch], hparams: RomeHParams,
                   devices: Sequence[jax.Device] | None) -> list[Solved]:
    """The keys and v* of each built batch on ``model.params``, as one vmapped program sharded
    over ``devices``."""
    mesh = batch_mesh(devices, model.params)
    stacked = shard_requests(stack_batches(model, batches), mesh)
    params = shard_params(model.params, mesh)
    out = jax.device_get(_solve_vmap(params, model.config, hparams.layer,
                                     hparams.v_num_grad_steps, stacked, *_v_settings(hparams)))
    return [jax.tree.map(lambda x: jnp.asarray(x[i]), out) for i in range(len(batches))]


def solve_built(model: Model, batches: Sequence[VBatch | ValueError | None],
                hparams: RomeHParams, *, batch: int = 1,
                devices: Sequence[jax.Device] | None = None
                ) -> Iterator[Solved | ValueError | None]:
    """The keys and v* of each built batch (``build_batch``) on ``model.params``, in order,
    ``batch`` at a time as one sharded program (lazily, a chunk when its first result is
    taken); a ValueError or None in place of a batch is passed through. With ``batch`` 1 each
    runs ``solve``'s own program, bit for bit as a single edit."""
    if batch < 1:
        raise ValueError(f"batch: {batch}; give 1 or more")
    for start in range(0, len(batches), batch):
        chunk = batches[start:start + batch]
        live = [b for b in chunk if isinstance(b, VBatch)]
        if batch == 1:
            solved = [_solve_built(model, hparams, model.params, b) for b in live]
        else:
            solved = _solve_sharded(model, live, hparams, devices) if live else []
        results = iter(solved)
        for b in chunk:
            yield next(results) if isinstance(b, VBatch) else b


def edit_independent(model: Model, requests: Sequence[EditRequest | dict],
                     hparams: RomeHParams | None = None, method: str = "c-rome", *,
                     context: EditContext | None = None,
                     devices: Sequence[jax.Device] | None = None
                     ) -> tuple[Edit, list[EditReport]]:
    """Edits of the same base model for every request, computed as one compiled program: a
    ``jax.vmap`` over requests padded to equal shapes, whose request axis is sharded over a 1-D
    mesh of ``devices`` (default ``jax.devices()``; params and the Cholesky factor replicated).
    The number of requests is padded up to a multiple of the device count with copies of the
    last request, whose edits are dropped. Returns the stacked edits (one ``Edit`` whose
    factors carry a leading request axis, [E, F, 1] and [E, 1, D] in request order, on the
    default device; apply one with ``apply_edit(params, jax.tree.map(lambda x: x[i], edits))``)
    and their reports."""
    hparams = _checked(model, hparams, context)
    method = canonical_method(method)
    requests = _requests(requests)
    if not requests:
        raise ValueError("requests: empty (edit_independent needs at least one request)")
    context = context or prepare(model, hparams)
    batches = [build_batch(model, r, context.templates, hparams.fact_token) for r in requests]
    stacked, params, factor = _sharded(model, batches, context, devices)
    out = _edit_vmap(params, model.config, hparams.layer, method, hparams.v_num_grad_steps,
                     stacked, factor, *_v_settings(hparams))
    updates, diagnostics, values, cosine = jax.tree.map(lambda x: x[:len(requests)],
                                                        jax.device_get(out))
    reports = []
    for i, request in enumerate(requests):
        pick = lambda tree: jax.tree.map(lambda x: x[i], tree)
        report = _report(request, method, hparams.layer, pick(diagnostics), pick(values),
                         cosine[i])
        _check_finite(pick(updates), report)
        reports.append(report)
    return jax.tree.map(jnp.asarray, updates), reports


def solve_independent(model: Model, requests: Sequence[EditRequest | dict],
                      hparams: RomeHParams | None = None, *,
                      context: EditContext | None = None,
                      devices: Sequence[jax.Device] | None = None) -> list[Solved]:
    """``solve`` of every request as one compiled program, vmapped and sharded over
    ``devices`` as in ``edit_independent``: the keys and v* of each request, for
    ``compute_edit(..., solved=...)`` with any method. They equal ``solve``'s to float32
    rounding (the padding changes the shapes XLA reduces over, so not bit for bit)."""
    hparams = _checked(model, hparams, context)
    requests = _requests(requests)
    if not requests:
        raise ValueError("requests: empty (solve_independent needs at least one request)")
    context = context or prepare(model, hparams)
    return _solve_sharded(model, [build_batch(model, r, context.templates, hparams.fact_token)
                                  for r in requests], hparams, devices)


def solve_many(model: Model, requests: Sequence[EditRequest | Mapping | None],
               hparams: RomeHParams | None = None, *, context: EditContext | None = None,
               batch: int = 1, devices: Sequence[jax.Device] | None = None
               ) -> Iterator[Solved | ValueError | None]:
    """The ``solve`` of each request in order, ``batch`` requests at a time as one sharded
    program (as ``solve_independent``; lazily: a chunk is solved when its first result is
    taken, so a progress bar over the results moves as they come). Each request is built once.
    A request that does not fit the model yields its ValueError (the rest of its chunk is
    solved without it); ``None`` (a request the caller could not build) yields ``None``. With
    ``batch`` 1 every request runs ``solve``'s own program, bit for bit as a single edit."""
    if batch < 1:
        raise ValueError(f"batch: {batch}; give 1 or more")
    hparams = _checked(model, hparams, context)
    context = context or prepare(model, hparams)

    def built(request):  # its batch, its ValueError, or None
        try:
            return None if request is None else build_batch(
                model, _request(request), context.templates, hparams.fact_token)
        except ValueError as err:
            return err

    for start in range(0, len(requests), batch):
        yield from solve_built(model, [built(r) for r in requests[start:start + batch]],
                               hparams, batch=batch, devices=devices)
