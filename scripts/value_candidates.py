"""Issue 20's two value-side candidates for a first-token subject, beside c-rome as shipped:
where v* starts and what its clamp is measured against.

ROME's v* = v_init + δ with v_init = W k^u + b, the plain prompt's MLP output, and ‖δ‖ clamped
to ``clamp_norm_factor``·‖v_init‖ (the weight decay scaled by ‖v_init‖² too). At position 0 of
SmolLM2 v_init is about ten times smaller than elsewhere, so the clamp binds and v* stays weak;
and c-rome writes that v* at k̄, where the model's own output was W k̄ + b (EXPERIMENTS.md,
"The test-time prefix does not restore efficacy on SmolLM2"). Per case id this solves ROME's δ
(``rome.values.optimize_v``, the same rows and loss: every context template, the plain prompt
among them, and the KL row) three ways and writes each v* with c-rome's update (at k̄, C⁻¹k̄):

- ``c-rome``: as shipped (v_init = W k^u + b, clamp and decay against ‖v_init‖);
- ``consistent values``: v_init = W k̄ + b, the value of the key c-rome writes at, so the update
  adds exactly δ there (v* − W k̄ − b = δ) and the clamp is against a normal-sized value;
- ``prefixed clamp``: v_init = W k^u + b as ROME, the clamp and decay against the mean norm of
  the prefixed rows' MLP outputs mean_i ‖W k_i + b‖ (i ≥ 1), as k2-rome's v*₀ is clamped.

(The issue's "v* loss over plain and prefixed prompts together" is ROME's loss already: row 0
of every batch is the plain prompt.) It prints, per case and candidate, CounterFact's ES, PS,
NS and EM on the plain prompts, the ME-PPL_50 ratio, ‖δ‖, ‖v* − W k̄ − b‖ and ‖Δw‖_F, then each
candidate's means and medians over the cases.

    python scripts/value_candidates.py --model smollm2-135m --layer 12 \\
        --case-ids benchmarks/smollm2_collapse_l12_case_ids.json
"""

from __future__ import annotations

import argparse
import json
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from rome_jax.cli.common import Setup, add_model_args
from rome_jax.data import counterfact_by_case_id, load_counterfact
from rome_jax.editors.delta import apply_edit
from rome_jax.editors.rome import rank_one_update
from rome_jax.evaluation import counterfact_metrics, counterfact_nlls, counterfact_prompts
from rome_jax.models.transformer import residual_at, rome_weight
from rome_jax.rome.edit import build_batch, prefixed_reference, solve
from rome_jax.rome.request import EditRequest
from rome_jax.rome.values import optimize_v

CANDIDATES = ("c-rome", "consistent values", "prefixed clamp")


@partial(jax.jit, static_argnums=(1, 2, 3, 4))
def solve_candidate(params, config, layer, steps, candidate, batch, keys, lr, weight_decay,
                    kl_factor, clamp_norm_factor, early_stop_loss):
    """v*'s VResult for ``candidate`` (static: "consistent values" or "prefixed clamp"; c-rome's
    own is ``solve``'s) from the solved keys of ``batch``."""
    residual = residual_at(params, config, batch.ids, batch.mask, layer)
    w, b = rome_weight(params, layer)
    plain, mean = keys.plain @ w + b, keys.mean @ w + b
    v_init, reference = plain, None
    if candidate == "consistent values":
        v_init = mean
    else:
        reference = prefixed_reference(keys, w, b, plain)
    return optimize_v(params, config, layer, batch, residual, v_init, steps=steps, lr=lr,
                      weight_decay=weight_decay, kl_factor=kl_factor,
                      clamp_norm_factor=clamp_norm_factor, early_stop_loss=early_stop_loss,
                      norm_reference=reference)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--case-ids", required=True,
                   help="comma-separated CounterFact case ids, or a JSON file of a list of them")
    p.add_argument("--json", metavar="FILE", help="also write every case's numbers here")
    add_model_args(p)
    args = p.parse_args()
    s = Setup(args)
    model, hp, ctx, layer = s.model, s.hparams, s.context, s.hparams.layer
    text = args.case_ids
    case_ids = (json.load(open(text)) if text.endswith(".json")
                else [int(x) for x in text.split(",")])
    records = counterfact_by_case_id(load_counterfact(), case_ids)
    w, b = rome_weight(model.params, layer)
    rows = []
    for case_id, record in zip(case_ids, records):
        request = EditRequest.from_dict(record)
        batch = build_batch(model, request, ctx.templates, hp.fact_token)
        solved = solve(model, request, hp, context=ctx)  # c-rome's keys and v*, as shipped
        keys = solved.keys
        for candidate in CANDIDATES:
            values = solved.values if candidate == "c-rome" else solve_candidate(
                model.params, model.config, layer, hp.v_num_grad_steps, candidate, batch, keys,
                hp.v_lr, hp.v_weight_decay, hp.kl_factor, hp.clamp_norm_factor,
                hp.early_stop_loss)
            update, d = rank_one_update(w, b, ctx.factor, keys.plain, keys.mean,
                                        values.v_star, "c-rome", layer)
            params = apply_edit(model.params, update)
            m = counterfact_metrics(counterfact_nlls(model, record, [counterfact_prompts(record)],
                                                     params)[0])
            row = {"case_id": case_id, "candidate": candidate,
                   **{k: float(m[k]) for k in ("ES", "PS", "NS", "EM")},
                   "ppl_ratio": s.probe(params) / s.probe.base,
                   "delta": float(jnp.linalg.norm(values.delta)),
                   "residual": float(jnp.linalg.norm(values.v_star - keys.mean @ w - b)),
                   "delta_w": float(d.delta_norm)}
            rows.append(row)
            print(f"case {case_id} {candidate:<18} ES {row['ES']:.2f} PS {row['PS']:.2f} "
                  f"NS {row['NS']:.2f} EM {row['EM']:.3f} ME-PPL_50 x{row['ppl_ratio']:.3g} "
                  f"|δ| {row['delta']:.3g} |v*-Wk̄-b| {row['residual']:.3g} "
                  f"|Δw| {row['delta_w']:.3g}", flush=True)
        if args.json:
            with open(args.json, "w") as out:
                json.dump(rows, out, indent=1)
    print(f"\n{len(case_ids)} cases, layer {layer}: mean ES PS NS EM, ME-PPL_50 x median / max, "
          "median |δ|, median |v*-Wk̄-b|, mean |Δw|")
    for candidate in CANDIDATES:
        got = [r for r in rows if r["candidate"] == candidate]
        col = lambda k: np.array([r[k] for r in got])
        print(f"| {candidate} | {col('ES').mean():.2f} | {col('EM').mean():.3f} | "
              f"{col('PS').mean():.2f} | {col('NS').mean():.3f} | "
              f"{np.median(col('ppl_ratio')):.3g} | {col('ppl_ratio').max():.3g} | "
              f"{np.median(col('delta')):.3g} | {np.median(col('residual')):.3g} | "
              f"{col('delta_w').mean():.3g} |")


if __name__ == "__main__":
    main()
