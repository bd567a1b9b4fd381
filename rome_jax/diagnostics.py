"""Key geometry behind collapse: how far k^u is from k̄, and what that does to the denominators.

For each request: cos(k^u, k̄) at the edit layer, and the denominators of the original update,
(C⁻¹k̄)ᵀk^u, and of the consistent one, (C⁻¹k̄)ᵀk̄. Subjects at the first token of the prompt
(no context: GPT-2's first position acts as an attention sink) are compared with the rest.
"""

from __future__ import annotations

import numpy as np
from tqdm import tqdm

from rome_jax.models.model import Model
from rome_jax.rome.keys import compute_keys
from rome_jax.rome.request import EditRequest
from rome_jax.rome.stats import solve
from rome_jax.rome.templates import ContextTemplates


def key_geometry(model: Model, requests: list[EditRequest], templates: ContextTemplates,
                 layer: int, factor, fact_token: str = "subject_last") -> list[dict]:
    """Per request: case_id, subject_first, cosine, rome and c-rome denominators."""
    rows = []
    for request in tqdm(requests, desc="key geometry", leave=False):
        keys = compute_keys(model, request, templates, layer, fact_token)
        plain, mean = np.asarray(keys.plain, np.float64), np.asarray(keys.mean, np.float64)
        u = np.asarray(solve(factor, keys.mean), np.float64)
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
