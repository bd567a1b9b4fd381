"""Why k2-rome cannot be subject-specific at position 0 of SmolLM2's layer 12: the plain key k^u of
a first-token subject is (nearly) the key of every text's first token.

For each case id this solves the record's keys, v̄* and k2-rome's v*₀ (``rome.edit.solve``,
``solve_plain_core``), takes k₀, the mean key at position 0 of the context templates' rows
(their first tokens: other words opening other texts), and prints cos(k^u, k₀) and sin²θ of
the two in C⁻¹'s metric. Then it scores (CounterFact ES, PS, NS, EM on the plain prompts,
ME-PPL_50 ratio, ‖Δw‖_F, the system's condition number) k2-rome as shipped and two ways to keep
the first tokens of other texts unchanged: a third equality constraint Δwᵀk₀ = 0 (EMMET's closed
form with the keys [k̄, k^u, k₀]), C + μ·E[k₀k₀ᵀ] as the update's metric (``--mu``), and
C + μ·E_t[k₀(t)k₀(t)ᵀ] with the expectation over every vocabulary token t alone at position 0
(a first token's key depends on that token only, so this is the set of all first-token keys).

    python scripts/position0_probe.py --model smollm2-135m --layer 12 --case-ids 946
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp

from rome_jax.cli.common import Setup, add_model_args
from rome_jax.data import counterfact_by_case_id, load_counterfact
from rome_jax.editors.delta import Edit, Factors, apply_edit
from rome_jax.editors.emmet import emmet_factors
from rome_jax.editors.rome import two_key_update
from rome_jax.evaluation import counterfact_metrics, counterfact_nlls, counterfact_prompts
from rome_jax.models.transformer import block, make_context, residual_at, rome_weight
from rome_jax.rome.edit import build_batch, solve, solve_plain_core
from rome_jax.rome.request import EditRequest
from rome_jax.rome.stats import solve as c_solve


def first_token_moment(model, layer: int, chunk: int = 2048):
    """E_t[k₀(t)k₀(t)ᵀ] [F, F]: the key at ``layer`` of every vocabulary token t as a one-token
    text (the last chunk is shorter and compiles once more)."""

    @jax.jit
    def moment(ids):                                  # ids [n, 1]
        mask = jnp.ones(ids.shape, bool)
        residual = residual_at(model.params, model.config, ids, mask, layer)
        keys = block(jax.tree.map(lambda x: x[layer], model.params["blocks"]), model.config,
                     residual, make_context(mask.shape, mask, residual.dtype))[1][:, 0]
        return keys.T @ keys

    vocab = model.config.vocab_size
    total = sum(moment(jnp.arange(start, min(start + chunk, vocab))[:, None])
                for start in range(0, vocab, chunk))
    return total / vocab


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--case-ids", required=True, help="comma-separated CounterFact case ids")
    p.add_argument("--mu", default="100,1000",
                   help="weights μ of E[k₀k₀ᵀ] added to C ('' for none)")
    p.add_argument("--vocab-mu", default="1,10,100",
                   help="weights μ of the vocabulary's E_t[k₀(t)k₀(t)ᵀ] added to C ('' for none)")
    add_model_args(p)
    args = p.parse_args()
    s = Setup(args)
    model, hp, ctx, layer = s.model, s.hparams, s.context, s.hparams.layer
    case_ids = [int(x) for x in args.case_ids.split(",")]
    records = counterfact_by_case_id(load_counterfact(), case_ids)
    w, b = rome_weight(model.params, layer)
    mus, vocab_mus = ([float(x) for x in text.split(",") if x] for text in (args.mu, args.vocab_mu))
    moment = ctx.factor @ ctx.factor.T
    vocab_moment = first_token_moment(model, layer) if vocab_mus else None
    for case_id, record in zip(case_ids, records):
        request = EditRequest.from_dict(record)
        batch = build_batch(model, request, ctx.templates, hp.fact_token)
        solved = solve(model, request, hp, context=ctx)
        solved = jax.jit(solve_plain_core, static_argnums=(1, 2, 3, 12))(
            model.params, model.config, layer, hp.v_num_grad_steps, batch, ctx.factor, solved,
            hp.v_lr, hp.v_weight_decay, hp.kl_factor, hp.clamp_norm_factor, hp.early_stop_loss)
        residual = residual_at(model.params, model.config, batch.ids, batch.mask, layer)
        keys_all = block(jax.tree.map(lambda x: x[layer], model.params["blocks"]), model.config,
                         residual, make_context(batch.mask.shape, batch.mask, residual.dtype))[1]
        first = keys_all[1:-1, 0]                       # position 0 of the template rows
        k0, ku, kbar = first.mean(0), solved.keys.plain, solved.keys.mean
        u0, uu = c_solve(ctx.factor, k0), c_solve(ctx.factor, ku)
        cosine = ku @ k0 / (jnp.linalg.norm(ku) * jnp.linalg.norm(k0))
        sin2 = 1 - (u0 @ ku) ** 2 / ((u0 @ k0) * (uu @ ku))
        print(f"case {case_id}: cos(k^u, k0) {float(cosine):.4f}, sin2 in C^-1 metric "
              f"{float(sin2):.4f}")
        targets = (solved.values.v_star, solved.plain.v_star)
        variants = {"k2-rome": None, "k0 constraint": "k0",
                    **{f"C + {mu:g}·E[k0k0ᵀ]": mu for mu in mus},
                    **{f"C + {mu:g}·E_t[k0(t)k0(t)ᵀ]": ("vocab", mu) for mu in vocab_mus}}
        for name, how in variants.items():
            if how == "k0":
                keys = jnp.stack([kbar, ku, k0])
                residual3 = jnp.stack([*targets, k0 @ w + b]) - (keys @ w + b)
                left, right, d = emmet_factors(keys, None, residual3, ctx.factor, 0.0)
                update, norm, condition = Edit({layer: Factors(left, right)}), \
                    d.update.delta_norm, d.denominator_condition
            else:
                if how is None:
                    factor = ctx.factor
                elif isinstance(how, tuple):
                    factor = jnp.linalg.cholesky(moment + how[1] * vocab_moment)
                else:
                    factor = jnp.linalg.cholesky(moment + how * first.T @ first / first.shape[0])
                update, d = two_key_update(w, b, factor, ku, kbar, *targets, layer)
                norm, condition = d.delta_norm, d.key_condition
            params = apply_edit(model.params, update)
            m = counterfact_metrics(counterfact_nlls(model, record, [counterfact_prompts(record)],
                                                     params)[0])
            print(f"  {name:<22} ES {m['ES']:.2f} PS {m['PS']:.2f} NS {m['NS']:.2f} "
                  f"EM {m['EM']:.3f} ME-PPL_50 x{s.probe(params) / s.probe.base:.3g} "
                  f"|Δw| {float(norm):.4g} cond {float(condition):.3g}")


if __name__ == "__main__":
    main()
