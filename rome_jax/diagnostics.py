"""Key geometry behind collapse: how far k^u is from k̄, and what that does to the denominators.

For each request: cos(k^u, k̄) at the edit layer, and the denominators of the original update,
(C⁻¹k̄)ᵀk^u, and of the consistent one, (C⁻¹k̄)ᵀk̄. Subjects at the first token of the prompt
(no context: GPT-2's first position acts as an attention sink) are compared with the rest.
"""

from __future__ import annotations

import numpy as np
from tqdm import tqdm

import jax

from rome_jax.data import bucket, pad_batch
from rome_jax.models.model import Model
from rome_jax.models.transformer import mlp_key
from rome_jax.rome.edit import build_batch
from rome_jax.rome.keys import Keys
from rome_jax.rome.request import EditRequest
from rome_jax.rome.stats import solve
from rome_jax.rome.templates import ContextTemplates


_mlp_key = jax.jit(mlp_key, static_argnums=(1, 4))


def edit_keys(model: Model, request: EditRequest, templates: ContextTemplates, layer: int,
              fact_token: str = "subject_last") -> Keys:
    """The keys an edit of ``request`` reads, by one forward pass to ``layer`` (no v*): k^u
    [F], k̄ [F] and every template's key [N, F] (row 0 the plain prompt), float64 numpy."""
    # The edit's own batch: the keys at the lookup tokens of the template rows (the last row is
    # the KL prompt); the target tokens after them cannot change these keys.
    batch = build_batch(model, request, templates, fact_token)
    keys = np.asarray(_mlp_key(model.params, model.config, batch.ids, batch.mask, layer,
                               batch.lookup)[:-1], np.float64)
    return Keys(keys[0], keys.mean(0), keys)


def sequence_keys(model: Model, ids: list[int], positions: list[int], layer: int) -> np.ndarray:
    """The keys [P, F] (float64 numpy) at ``positions`` of one token sequence ``ids``."""
    batch, mask = pad_batch([ids], model.tokenizer.pad_id, length=bucket(len(ids)))
    keys = _mlp_key(model.params, model.config, batch, mask, layer)[0]
    return np.asarray(keys[np.asarray(positions)], np.float64)


def key_geometry(model: Model, requests: list[EditRequest], templates: ContextTemplates,
                 layer: int, factor, fact_token: str = "subject_last") -> list[dict]:
    """Per request: case_id, subject_first, cosine, rome and c-rome denominators."""
    rows = []
    for request in tqdm(requests, desc="key geometry", leave=False):
        plain, mean, _ = edit_keys(model, request, templates, layer, fact_token)
        u = np.asarray(solve(factor, mean.astype(np.float32)), np.float64)
        rows.append({"case_id": request.case_id, "subject_first": request.subject_first,
                     "cosine": float(plain @ mean / np.linalg.norm(plain) / np.linalg.norm(mean)),
                     "denominator_rome": float(u @ plain), "denominator_c_rome": float(u @ mean)})
    return rows


def summarize_geometry(rows: list[dict]) -> dict:
    """Means per group (subject first / not) and the median denominator ratio c-rome / rome."""
    out = {}
    for name, first in (("subject_first", True), ("subject_later", False)):
        group = [r for r in rows if r["subject_first"] == first]
        if not group:
            continue
        ratio = [r["denominator_c_rome"] / r["denominator_rome"] for r in group]
        out[name] = {"n": len(group), "mean_cosine": float(np.mean([r["cosine"] for r in group])),
                     "median_denominator_ratio": float(np.median(ratio)),
                     "median_denominator_rome": float(np.median([r["denominator_rome"]
                                                                 for r in group]))}
    return out
