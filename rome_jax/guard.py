"""Collapse guard: refuse an edit whose update looks like a collapse before it is applied.

A ROME edit collapses the model ("The Fall of ROME", "The Butterfly Effect of Model Editing")
when its rank-one update is huge: with ROME's mixed keys the denominator ``uᵀk^u`` can come
close to 0 (subject at the first token), and ``|Δ| = ‖r‖‖u‖ / |uᵀk^u| / (F·D)`` explodes. The
guard compares an edit's denominator and ``|Δ|`` with those of *normal* edits of the same model
and layer (a :class:`GuardProfile`, computed once from ``rome`` edits of CounterFact records
whose subject is not the first token, keeping only those that left ME-PPL_50 perplexity within
``max_ppl_ratio``; cached as JSON beside the key statistics, keyed by their fingerprint):

* denominator ≤ 0, or below the profile's ``quantile`` (default 5 %) divided by ``margin``;
* ``log |Δ|`` above ``median + mad_k · 1.4826 · MAD`` of the normal edits' ``log |Δ|``;
* after applying (when the report carries ``perplexity_before`` / ``perplexity_after``):
  perplexity grew by more than ``max_ppl_ratio``, so the edit must be rolled back.

:func:`evaluate` is a pure function of a report (an ``EditReport`` or its dict) and a profile.
:class:`PerplexityProbe` measures ME-PPL perplexity after an edit at layer ``l`` from the residual
stream cached at ``l`` (an edit there cannot change the blocks below).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import numbers
import os
from pathlib import Path
from typing import Any, Callable, Collection, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from rome_jax import data
from rome_jax.evaluation import perplexity_batches
from rome_jax.files import build_once, write_json_atomic
from rome_jax.models.transformer import forward, residual_at, widened
from rome_jax.rome.edit import build_batch, compute_edit, edit_independent
from rome_jax.rome.request import EditRequest
from rome_jax.rome.stats import cache_path, fingerprint, resolve_corpus, shipped_cache_dir
from rome_jax.editors.delta import apply_edit

MAD_TO_SIGMA = 1.4826  # MAD of a normal distribution times this is its standard deviation
MIN_LOG_SCALE = 0.1    # floor of the robust log-|Δ| scale (few or identical samples)
PROFILE_VERSION = 2  # 2: the default mad_k is 5; a version-1 profile is rebuilt


@dataclasses.dataclass(frozen=True)
class Verdict:
    """``ok`` False: the edit is predicted to collapse (or did); ``reasons`` say why and
    ``suggestion`` what to do instead; ``failed`` names the check behind each reason
    (``"denominator"``, ``"delta_abs"``, ``"perplexity"``; empty for a reason from elsewhere,
    such as a non-finite update)."""

    ok: bool
    reasons: list[str]
    suggestion: str
    failed: tuple[str, ...] = ()

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class GuardProfile:
    """Denominators and |Δ| of normal edits of one model at one layer, and the thresholds.

    ``denominators`` / ``delta_abs``: one entry per normal edit (same order as ``case_ids``).
    ``quantile`` / ``margin``: the denominator floor is ``quantile(denominators) / margin``.
    ``mad_k``: the |Δ| ceiling is ``exp(median + mad_k · σ)`` of ``log |Δ|`` with
    σ = max(1.4826 · MAD, 0.1). ``max_ppl_ratio``: the perplexity rollback threshold.
    ``fingerprint``, ``settings``: what the profile was computed for (the cache key).
    """

    layer: int
    denominators: tuple[float, ...]
    delta_abs: tuple[float, ...]
    case_ids: tuple[int, ...] = ()
    method: str = "rome"
    quantile: float = 0.05
    margin: float = 3.0
    # 5 (version 2; 2 before): scored on real collapses (EXPERIMENTS.md 9b, `experiment
    # guard`: SmolLM2 layers 12 and 4, the default model), k = 5 refuses every collapse that
    # k = 2 refuses (ME-PPL_50 ratio > 10 and > 2) and fewer other edits at every layer
    # (layer 12: 4/233 against 15/233). k = 2 had been chosen on ‖Δ‖ outliers of a model that
    # never collapses (it refused 53/53 of them, k = 5 31/53).
    mad_k: float = 5.0
    max_ppl_ratio: float = 10.0
    base_perplexity: float | None = None
    fingerprint: str = ""
    settings: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        if len(self.denominators) == 0 or len(self.denominators) != len(self.delta_abs):
            raise ValueError("guard profile: needs as many denominators as |Δ| values, at "
                             "least one")
        if not all(_real(x) and x > 0 for x in self.delta_abs):
            raise ValueError("guard profile: |Δ| values must be finite and positive")
        if not all(_real(x) for x in self.denominators):
            raise ValueError("guard profile: denominators must be finite")
        # `not (x > 0)` rather than `x <= 0`: NaN passes every comparison, so each range is
        # checked as what must hold, and every number must be finite.
        if not (_real(self.quantile) and 0 <= self.quantile <= 1 and _real(self.margin)
                and self.margin > 0 and _real(self.mad_k) and self.mad_k > 0):
            raise ValueError(f"guard profile: need finite 0 <= quantile <= 1, margin > 0 and "
                             f"mad_k > 0, got {self.quantile!r}, {self.margin!r}, "
                             f"{self.mad_k!r}")
        if self.max_ppl_ratio is not None and not (_real(self.max_ppl_ratio)
                                                   and self.max_ppl_ratio > 1):
            raise ValueError(f"guard profile: max_ppl_ratio must be finite and > 1 (or None: "
                             f"no check), got {self.max_ppl_ratio!r}")
        if not (isinstance(self.layer, numbers.Integral) and not isinstance(self.layer, bool)
                and self.layer >= 0):
            raise ValueError(f"guard profile: layer must be an integer >= 0, got "
                             f"{self.layer!r}")
        if not all(isinstance(i, numbers.Integral) and not isinstance(i, bool)
                   for i in self.case_ids):
            raise ValueError("guard profile: case_ids must be integers")
        if self.base_perplexity is not None and not (_real(self.base_perplexity)
                                                     and self.base_perplexity > 0):
            raise ValueError(f"guard profile: base_perplexity {self.base_perplexity} is not "
                             "finite and positive (non-finite weights?)")

    @property
    def n(self) -> int:
        return len(self.denominators)

    @property
    def denominator_quantile(self) -> float:
        return float(np.quantile(np.asarray(self.denominators, np.float64), self.quantile))

    @property
    def denominator_floor(self) -> float:
        """Edits with a denominator below this are refused."""
        return self.denominator_quantile / self.margin

    @property
    def log_delta_median(self) -> float:
        return float(np.median(np.log(self.delta_abs)))

    @property
    def log_delta_scale(self) -> float:
        """Robust σ of log |Δ|: 1.4826 · MAD, at least 0.1."""
        logs = np.log(self.delta_abs)
        return max(MAD_TO_SIGMA * float(np.median(np.abs(logs - np.median(logs)))),
                   MIN_LOG_SCALE)

    @property
    def delta_abs_ceiling(self) -> float:
        """Edits with |Δ| above this are refused."""
        return float(math.exp(self.log_delta_median + self.mad_k * self.log_delta_scale))

    def with_thresholds(self, **changes) -> "GuardProfile":
        """The same samples with other ``quantile``, ``margin``, ``mad_k`` or
        ``max_ppl_ratio`` (None values are ignored)."""
        return dataclasses.replace(self, **{k: v for k, v in changes.items() if v is not None})

    def summary(self) -> dict:
        """Thresholds and sample ranges, JSON-ready."""
        return {"n": self.n, "layer": self.layer, "method": self.method,
                "denominator_min": float(min(self.denominators)),
                "denominator_median": float(np.median(self.denominators)),
                "denominator_quantile": self.denominator_quantile,
                "denominator_floor": self.denominator_floor,
                "delta_abs_median": float(math.exp(self.log_delta_median)),
                "delta_abs_max": float(max(self.delta_abs)),
                "delta_abs_ceiling": self.delta_abs_ceiling, "quantile": self.quantile,
                "margin": self.margin, "mad_k": self.mad_k,
                "max_ppl_ratio": self.max_ppl_ratio, "base_perplexity": self.base_perplexity}

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out.update(version=PROFILE_VERSION, denominators=list(self.denominators),
                   delta_abs=list(self.delta_abs), case_ids=list(self.case_ids),
                   settings=dict(self.settings))
        return out

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> "GuardProfile":
        if not isinstance(raw, Mapping) or raw.get("version") != PROFILE_VERSION:
            raise ValueError(f"guard profile: not a version-{PROFILE_VERSION} profile")
        names = {f.name for f in dataclasses.fields(cls)}
        try:
            kwargs = {k: v for k, v in raw.items() if k in names}
            for k in ("denominators", "delta_abs", "case_ids"):
                kwargs[k] = tuple(kwargs.get(k, ()))
            return cls(**kwargs)
        except TypeError as err:
            raise ValueError(f"guard profile: {err}") from None


def _real(x: Any) -> bool:
    """A finite real number (not a bool, a string or NaN)."""
    return isinstance(x, numbers.Real) and not isinstance(x, bool) and math.isfinite(x)


def _field(report: Any, name: str, default=None):
    if isinstance(report, Mapping):
        return report.get(name, default)
    return getattr(report, name, default)


def _subject_first(report: Any) -> bool:
    request = _field(report, "request") or {}
    prompt = request.get("prompt", "") if isinstance(request, Mapping) else ""
    return prompt.startswith("{}")


def evaluate(report: Any, profile: GuardProfile) -> Verdict:
    """The guard's verdict on one edit (pure).

    ``report``: an ``EditReport`` or a dict with ``denominator``, ``delta_abs``, ``method`` and
    ``request`` (its ``prompt``); when it also has ``perplexity_before`` and
    ``perplexity_after`` (the edit was applied), the perplexity ratio is checked too.
    """
    reasons, failed = [], []
    den = _field(report, "denominator")
    dabs = _field(report, "delta_abs")
    if den is None or dabs is None:
        raise ValueError("report: needs 'denominator' and 'delta_abs'")
    den, dabs = float(den), float(dabs)
    if not math.isfinite(den) or den <= 0:
        reasons.append(f"denominator {den:.3g} is not positive: the update is undefined or "
                       "points the wrong way")
        failed.append("denominator")
    elif den < profile.denominator_floor:
        reasons.append(
            f"denominator {den:.3g} is below {profile.denominator_floor:.3g} (the "
            f"{profile.quantile:.0%} quantile {profile.denominator_quantile:.3g} of "
            f"{profile.n} normal edits / {profile.margin:g})")
        failed.append("denominator")
    if not math.isfinite(dabs) or dabs > profile.delta_abs_ceiling:
        median = math.exp(profile.log_delta_median)
        reasons.append(
            f"|Δ| {dabs:.3g} is above {profile.delta_abs_ceiling:.3g} ({dabs / median:.3g}x the "
            f"median {median:.3g} of {profile.n} normal edits; limit median·exp("
            f"{profile.mad_k:g}·{profile.log_delta_scale:.2f}))")
        failed.append("delta_abs")
    before = _field(report, "perplexity_before")
    after = _field(report, "perplexity_after")
    if profile.max_ppl_ratio is not None and before is not None and after is not None:
        ratio = float(after) / float(before) if float(before) > 0 else math.inf
        if not math.isfinite(ratio) or ratio > profile.max_ppl_ratio:
            reasons.append(f"ME-PPL perplexity rose from {float(before):.4g} to "
                           f"{float(after):.4g} ({ratio:.3g}x > {profile.max_ppl_ratio:g}x): "
                           "the edit collapsed the model")
            failed.append("perplexity")
    if not reasons:
        return Verdict(True, [], "")
    return Verdict(False, reasons, suggest(_field(report, "method", "rome"),
                                           _subject_first(report)), tuple(failed))


def score(report: Any, profile: GuardProfile) -> float:
    """How far an edit lies past the guard's pre-apply thresholds, in log units (pure):

        max(log(floor / denominator), log(|Δ| / ceiling))

    (+inf for a denominator ≤ 0 or a non-finite value; the first term is -inf when the floor is
    not positive). :func:`evaluate` refuses an edit before applying it exactly when the score
    is > 0; moving both thresholds by one factor λ (floor / λ, ceiling · λ) refuses it exactly
    when the score is > log λ, the one parameter along which the guard's ROC curve is swept.
    ``report``: as for :func:`evaluate` (its perplexities are not used)."""
    den, dabs = float(_field(report, "denominator")), float(_field(report, "delta_abs"))
    if not (math.isfinite(den) and math.isfinite(dabs)) or den <= 0:
        return math.inf
    floor = profile.denominator_floor
    below = math.log(floor / den) if floor > 0 else -math.inf
    return max(below, math.log(dabs / profile.delta_abs_ceiling) if dabs > 0 else -math.inf)


def suggest(method: str, subject_first: bool, finite: bool = True) -> str:
    """What to do instead of a refused edit of ``method`` (never the method it already is);
    ``finite`` False: the update itself was non-finite, which ``--force`` cannot apply."""
    if method == "rome":
        text = ("use --method c-rome (consistent keys: its denominator k̄ᵀC⁻¹k̄ cannot vanish)")
        if subject_first:
            text += (", or keep rome and query the edited model with the test-time prefix "
                     "(--test-prefix: the subject no longer opens the prompt)")
        return text + ("; --force applies it anyway" if finite else "")
    if not finite:  # c-rome's and p-rome's denominators cannot vanish: the inputs are bad
        return (f"a non-finite {method} update points at non-finite weights or key "
                "statistics: check the model, or try another --layer")
    return ("this request is an outlier even for " + method + ": check the request (a rare "
            "or one-token subject?), try another --layer, or --force to apply it anyway")


def check_perplexity(before: float, after: float, max_ratio: float, method: str,
                     subject_first: bool) -> Verdict:
    """The rollback check alone: perplexity grew by more than ``max_ratio``."""
    ratio = after / before if before > 0 else math.inf
    if math.isfinite(ratio) and ratio <= max_ratio:
        return Verdict(True, [], "")
    return Verdict(False, [f"ME-PPL perplexity rose from {before:.4g} to {after:.4g} "
                           f"({ratio:.3g}x > {max_ratio:g}x): the edit collapsed the model"],
                   "roll back; " + suggest(method, subject_first), ("perplexity",))


# ----------------------------------------------------------------------------- cache


def profile_settings(hparams, n_samples: int, method: str = "rome") -> dict:
    """What a profile depends on besides the weights and C (stored in it, checked on load)."""
    keep = ("layer", "fact_token", "v_num_grad_steps", "v_lr", "v_weight_decay", "kl_factor",
            "clamp_norm_factor", "early_stop_loss", "context_template_length_params",
            "context_templates", "mom2_corpus", "mom2_n_samples", "mom2_ridge")
    out = {k: getattr(hparams, k) for k in keep}
    out["context_template_length_params"] = [list(x) for x in
                                             out["context_template_length_params"]]
    out.update(n_samples=n_samples, method=method)
    return out


def profile_path(model, hparams, n_samples: int, cache_dir: Path | None = None) -> Path:
    """``<key stats cache>.guard-n<N>.json``, beside the key statistics of the same key (so
    keyed by the weights' fingerprint, the layer, the corpus content and the start token)."""
    stats = cache_path(model, hparams.layer, resolve_corpus(
        hparams.mom2_corpus, n_samples=hparams.mom2_n_samples), cache_dir)
    return stats.with_name(f"{stats.stem}.guard-n{n_samples}.json")


def load_profile(path: str | os.PathLike, settings: Mapping | None = None
                 ) -> GuardProfile | None:
    """The cached profile, or None when missing, unreadable, of another format version, with
    a non-finite or out-of-range number, or made with other settings."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        profile = GuardProfile.from_dict(json.loads(path.read_text()))
    except (ValueError, OSError):
        return None
    if settings is not None and json.loads(json.dumps(dict(settings))) != dict(
            profile.settings):
        return None
    return profile


def find_profile(path: str | os.PathLike, settings: Mapping) -> GuardProfile | None:
    """The profile cached at ``path`` for ``settings``, else the embedded default's shipped
    profile of the same name (so of the same weights, layer, corpus and settings), else None."""
    path = Path(path)
    return (load_profile(path, settings)
            or load_profile(shipped_cache_dir() / path.name, settings))


def cached_profile(path: str | os.PathLike, settings: Mapping,
                   build: Callable[[], GuardProfile]) -> GuardProfile:
    """``find_profile``, else ``build()`` written to ``path`` atomically. Concurrent callers
    build it once: the others wait for the lock, then load."""

    def build_and_save() -> GuardProfile:
        profile = build()
        write_json_atomic(path, profile.to_dict())
        return profile

    return build_once(path, lambda: find_profile(path, settings), build_and_save)


# ----------------------------------------------------------------------------- perplexity


@functools.partial(jax.jit, static_argnums=(1, 2))
def _nll_sum(params, config, layer: int, ids, mask, residual):
    logits = forward(params, config, ids, mask, layer=layer, residual=residual).logits[:, :-1]
    logp = jax.nn.log_softmax(widened(logits))
    nll = -jnp.take_along_axis(logp, ids[:, 1:, None], axis=-1)[..., 0]
    return (nll * mask[:, 1:]).sum()


class PerplexityProbe:
    """Perplexity of ``texts`` (as ``evaluation.perplexity``) for params that differ from the
    base only at blocks ≥ ``layer``: the residual stream entering ``layer`` is computed once
    and reused, so each call runs only the blocks from ``layer`` up."""

    def __init__(self, model, texts: Sequence[str], layer: int, batch_size: int = 32,
                 max_tokens: int = 256, params=None):
        self.model, self.layer = model, model.config.check_layer(layer)
        params = model.params if params is None else params
        batches = perplexity_batches(model.tokenizer, texts, batch_size, max_tokens)
        residual = jax.jit(residual_at, static_argnums=(1, 4))
        self.batches = [(ids, mask, residual(params, model.config, ids, mask, layer))
                        for ids, mask in batches]
        self.count = sum(int(m[:, 1:].sum()) for _, m, _ in self.batches)
        self.base = self(params)

    def __call__(self, params) -> float:
        total = 0.0
        for ids, mask, residual in self.batches:
            total += float(np.asarray(_nll_sum(params, self.model.config, self.layer, ids,
                                               mask, residual), np.float64))
        value = math.exp(total / self.count) if math.isfinite(total) else math.inf
        return value if math.isfinite(value) else math.inf


# ----------------------------------------------------------------------------- building


def normal_requests(records: Sequence[Mapping], tokenizer, n: int, seed: int = 0,
                    exclude: Callable[[Mapping], bool] | None = None) -> list:
    """Up to ``n`` CounterFact records (shuffled by ``seed``) whose subject is NOT the first
    token of its prompt (one token at the very start), as EditRequests."""
    order = np.random.default_rng(seed).permutation(len(records))
    out = []
    for i in order:
        record = records[int(i)]
        rw = record.get("requested_rewrite", record)
        if rw["prompt"].startswith("{}") and len(tokenizer.encode(rw["subject"])) == 1:
            continue
        if exclude is not None and exclude(record):
            continue
        out.append(EditRequest.from_dict(record))
        if len(out) >= n:
            break
    return out


def build_profile(model, hparams, context, n_samples: int = 48, *, method: str = "rome",
                  probe: PerplexityProbe | None = None, max_ppl_ratio: float = 10.0,
                  records: Sequence[Mapping] | None = None, seed: int = 0, chunk: int = 16,
                  progress=None, exclude: Collection[int] = (), **thresholds) -> GuardProfile:
    """Edit ``n_samples`` CounterFact records whose subject is not the first token with
    ``method`` (independent edits of the base model, vmapped by ``chunk``), keep those that are
    finite and (with ``probe``) leave perplexity within ``max_ppl_ratio``, and profile them.
    ``exclude``: case ids never used (the records the guard is then scored on); they are
    stored in the profile's settings as ``excluded_case_ids`` (so such a profile is never
    loaded for the default's settings)."""
    records = data.load_counterfact() if records is None else records
    excluded = frozenset(int(i) for i in exclude)
    candidates = normal_requests(records, model.tokenizer, 4 * n_samples + 16, seed,
                                 exclude=lambda r: int(r["case_id"]) in excluded)
    usable = []
    for request in candidates:
        try:
            build_batch(model, request, context.templates, hparams.fact_token)
        except ValueError:
            continue
        usable.append(request)
    dens, dabs, ids = [], [], []
    bar = progress(total=n_samples) if progress else None
    for start in range(0, len(usable), chunk):
        if len(dens) >= n_samples:
            break
        group = usable[start:start + chunk]
        try:
            updates, reports = edit_independent(model, group, hparams, method, context=context)
            pairs = [(jax.tree.map(lambda x, i=i: x[i], updates), r)
                     for i, r in enumerate(reports)]
        except ValueError:  # a non-finite update in the group: one by one
            pairs = []
            for request in group:
                try:
                    pairs.append(compute_edit(model, request, hparams, method, context=context))
                except ValueError:
                    continue
        for update, report in pairs:
            if len(dens) >= n_samples:
                break
            if not (math.isfinite(report.denominator) and report.delta_abs > 0
                    and math.isfinite(report.delta_abs)):
                continue
            if probe is not None:
                after = probe(apply_edit(model.params, update))
                if not after / probe.base <= max_ppl_ratio:
                    continue
            dens.append(report.denominator)
            dabs.append(report.delta_abs)
            ids.append(report.request.get("case_id"))
            if bar is not None:
                bar.update(1)
    if bar is not None:
        bar.close()
    if not dens:
        raise ValueError("guard profile: no normal edit could be computed (all requests too "
                         "long for the model, or non-finite)")
    return GuardProfile(
        layer=hparams.layer, denominators=tuple(dens), delta_abs=tuple(dabs),
        case_ids=tuple(-1 if i is None else int(i) for i in ids), method=method,
        max_ppl_ratio=max_ppl_ratio, base_perplexity=None if probe is None else probe.base,
        fingerprint=fingerprint(model.params, hparams.layer),
        settings={**profile_settings(hparams, n_samples, method),
                  **({"excluded_case_ids": sorted(excluded)} if excluded else {})},
        **{k: v for k, v in thresholds.items() if v is not None})
