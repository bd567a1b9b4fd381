"""MEMIT's λ (mom2_update_weight) against efficacy on the first --n CounterFact records.

    python scripts/memit_lambda.py [--model PATH_OR_ID] [--n 20] [--weights 15000,1500,150,15]
                                   [--mom2-n-samples 300]

One MEMIT update of the records per λ (the model's batch preset otherwise); prints ES
(P(new) > P(true) on the rewrite prompt) before and after, and per layer ‖Δw‖_F, the mean fit
error ‖k_i Δw − r_i‖ and the mean residual ‖r_i‖.
"""

import argparse


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None)
    p.add_argument("--n", type=int, default=20)
    p.add_argument("--weights", default="15000,1500,150,15")
    p.add_argument("--mom2-n-samples", type=int, default=300)
    args = p.parse_args()

    from rome_jax import load_model
    from rome_jax.data import load_counterfact
    from rome_jax.editors.batch import edit_batch, prepare_batch
    from rome_jax.editors.delta import apply_edit
    from rome_jax.editors.hparams import batch_preset
    from rome_jax.evaluation import efficacy, request_probabilities
    from rome_jax.rome.request import EditRequest

    model = load_model(args.model)
    requests = [EditRequest.from_dict(r) for r in load_counterfact()[:args.n]]

    def es(params=None) -> float:
        return efficacy(*request_probabilities(model, requests, params))

    print(f"ES before: {es():.2f}")
    hparams = batch_preset(model.config, "memit")
    hparams = hparams.replace(v=hparams.v.replace(mom2_n_samples=args.mom2_n_samples))
    context = prepare_batch(model, "memit", hparams)
    for weight in (float(w) for w in args.weights.split(",")):
        result = edit_batch(model, requests, "memit", hparams.replace(mom2_update_weight=weight),
                            context=context)
        layers = [(r["layer"], round(r["update.delta_norm"], 2),
                   round(r["update.fit_error_mean"], 2), round(r["update.residual_norm_mean"], 2))
                  for r in result.report.layers]
        print(f"λ {weight:g}: ES after {es(apply_edit(model.params, result.edit)):.2f}; "
              f"(layer, ‖Δw‖, fit error, residual): {layers}")


if __name__ == "__main__":
    main()
