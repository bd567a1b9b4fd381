"""True- and false-positive rates of the collapse guard on a `rome-jax screen --guard` file.

    python scripts/guard_report.py runs/screen_trained.json [PROFILE.json]

With the guard profile (the ``.guard-n*.json`` beside the key statistics), the screened edits
are also re-judged offline (``guard.evaluate``, pure) under a grid of thresholds.

"Positive" = the guard refused the edit. Rates are given against three references: the
perplexity verdict at several ratios (a small model's collapse may raise ME-PPL_50 perplexity
less than 10x), and ‖Δ‖ outliers (log ‖Δ‖_F above median + 3·1.4826·MAD over the screened edits).
Also splits by first-token subjects. A collapse run's edits are scored (ROC curves, the
guard's profile built without them) by ``rome-jax experiment guard``; the rates here are its.
"""

import json
import sys

import numpy as np

from rome_jax.experiments.guard import confusion, rate


def rates(refused: np.ndarray, actual: np.ndarray) -> str:
    c = confusion(refused, actual)
    return f"TPR {rate(c['tp'], c['positives'])}, FPR {rate(c['fp'], c['negatives'])}"


def main(path: str, profile_path: str | None = None) -> None:
    screen = json.loads(open(path).read())
    rows = [r for r in screen["records"] if "guard_ok" in r and "ratio" in r]
    refused = np.array([not r["guard_ok"] for r in rows])
    ratio = np.array([r["ratio"] for r in rows])
    log_delta = np.log(np.array([r["delta_norm"] for r in rows]))
    first = np.array([r["first_token_subject"] for r in rows])
    median = np.median(log_delta)
    mad = np.median(np.abs(log_delta - median)) * 1.4826
    outlier = log_delta > median + 3 * mad
    print(f"{len(rows)} screened edits ({first.sum()} first-token subjects), guard refused "
          f"{refused.sum()}; max perplexity ratio {ratio.max():.3f}")
    for x in (10.0, 2.0, 1.2, 1.05):
        print(f"vs perplexity ratio > {x}: {rates(refused, ratio > x)}")
    print(f"vs ‖Δ‖ outliers (log‖Δ‖ > median + 3 MAD-σ; {outlier.sum()} edits): "
          f"{rates(refused, outlier)}")
    print(f"vs first-token subject: {rates(refused, first)}")
    for name, group in (("first-token", first), ("other", ~first)):
        if group.any():
            print(f"{name}: median ‖Δ‖ {np.exp(np.median(log_delta[group])):.1f}, median "
                  f"denominator {np.median([r['denominator'] for r, g in zip(rows, group) if g]):.0f}, "
                  f"median perplexity ratio {np.median(ratio[group]):.4f}, max {ratio[group].max():.4f}")
    if profile_path:
        threshold_grid(rows, profile_path, outlier, first)


def threshold_grid(rows: list[dict], profile_path: str, outlier, first) -> None:
    from rome_jax.guard import GuardProfile, evaluate

    profile = GuardProfile.from_dict(json.loads(open(profile_path).read()))
    print(f"\noffline re-judging with {profile_path} ({profile.n} normal edits):")
    for margin in (3.0, 2.0, 1.5):
        for mad_k in (5.0, 3.0, 2.0):
            p = profile.with_thresholds(margin=margin, mad_k=mad_k)
            refused = np.array([not evaluate({**r, "method": "rome"}, p).ok for r in rows])
            print(f"margin {margin}, k {mad_k}: vs ‖Δ‖ outliers {rates(refused, outlier)}; "
                  f"vs first-token {rates(refused, first)}")


if __name__ == "__main__":
    main(*sys.argv[1:])
