"""``rome-jax edit --method memit|emmet|alphaedit``: one batch update that writes every request
of ``--requests`` into the model at once, with one report for the batch."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import numpy as np

from rome_jax.arguments import batch_hparams
from rome_jax.cli.common import PPL_CORPUS, PROG, Setup, fmt, log


def layer_range(text: str) -> tuple[int, ...]:
    """``--layers``: "13-17" or "3,4,5" -> ascending layer numbers."""
    from rome_jax.editors.hparams import parse_layers

    try:
        return parse_layers(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def run_batch(args, requests: list, out: Path | None, report_file: Path | None,
              write_outputs) -> int:
    """Edit, measure, write (``write_outputs(model or None, out, report, report_file,
    overwrite, format)``, edit's) and print; the exit status."""
    import jax
    from tqdm import tqdm

    from rome_jax.editors.batch import edit_batch, prepare_batch
    from rome_jax.editors.delta import apply_edit
    from rome_jax.evaluation import efficacy, request_probabilities

    method = args.method
    if args.mode == "independent":
        raise ValueError(f"--mode independent: {method} writes all requests in one update; "
                         "drop --mode")
    if args.test_prefix:
        raise ValueError(f"--test-prefix: not implemented for {method}")
    if args.layer is None and args.layers is not None:
        # Setup asks a model without a ROME preset for --layer; a batch edit takes its layers
        # from --layers alone (batch_hparams checks them against the model, naming --layers),
        # so Setup gets layer 0, which every model has and nothing below reads.
        args = argparse.Namespace(**{**vars(args), "layer": 0})
    s = Setup(args)
    hparams = batch_hparams(s.model.config, method, args, args.layers, args.keys, args.layer)
    for i, request in enumerate(requests):
        try:
            s.check_request(request)
        except ValueError as err:
            raise ValueError(f"request {i}: {err}") from None
    log(f"{PROG}: {method} on {len(requests)} requests at layers {list(hparams.layers)} "
        f"(keys {hparams.keys}); guard: not calibrated for batch editors, not applied")
    context = prepare_batch(s.model, method, hparams, jax.random.key(args.seed), log=log)
    probe = s.probe_at(hparams.layers[0])
    p_new0, p_true0 = request_probabilities(s.model, requests)
    with tqdm(total=len(requests), desc=f"{method} v*", unit="request") as bar:
        def progress(items):
            for item in items:
                bar.update(1)
                yield item

        result = edit_batch(s.model, requests, method, hparams, context=context,
                            chunk=args.chunk, progress=progress)
    params = apply_edit(s.model.params, result.edit)
    p_new1, p_true1 = request_probabilities(s.model, requests, params)
    ppl_after = probe(params)
    edits = [{"request": r.to_dict(), "p_new_before": float(a), "p_new_after": float(b),
              "p_true_before": None if np.isnan(c) else float(c),
              "p_true_after": None if np.isnan(d) else float(d), "v_loss": loss,
              "v_delta_norm": norm}
             for r, a, b, c, d, loss, norm in zip(requests, p_new0, p_new1, p_true0, p_true1,
                                                  result.report.v_losses,
                                                  result.report.v_delta_norms)]
    hp = dataclasses.asdict(hparams)
    hp["v"]["context_template_length_params"] = [
        list(x) for x in hp["v"]["context_template_length_params"]]
    report = {
        "command": "edit", "model": str(args.model or s.model.name), "method": method,
        "layers": list(hparams.layers), "keys": hparams.keys, "mode": "batch",
        "n_requests": len(requests), "perplexity_corpus": PPL_CORPUS,
        "perplexity_before": probe.base, "perplexity_after": ppl_after,
        "efficacy_before": efficacy(p_new0, p_true0), "efficacy_after": efficacy(p_new1, p_true1),
        "status": "applied", "hparams": hp, "update": result.report.to_dict(), "edits": edits,
        "out": str(out) if out else None}
    write_outputs(s.model.with_params(params) if out else None, out, report, report_file,
                  args.overwrite, args.format)
    if args.json:
        import json

        print(json.dumps(report, indent=1))
        return 0
    print(f"{PROG} edit: {method} at layers {list(hparams.layers)} of {report['model']} "
          f"(one update, {len(requests)} request{'s' if len(requests) != 1 else ''}, keys "
          f"{hparams.keys})")
    for i, e in enumerate(edits[:10]):
        r = e["request"]
        print(f"  [{i}] {r['prompt'].format(r['subject'])!r} -> {r['target_new']!r}: "
              f"P(new) {fmt(e['p_new_before'])} -> {fmt(e['p_new_after'])}, P(true) "
              f"{fmt(e['p_true_before'])} -> {fmt(e['p_true_after'])}")
    if len(edits) > 10:
        print(f"  ... {len(edits) - 10} more in --report / --json")
    for layer in result.report.layers:
        print(f"  layer {layer['layer']}: ‖Δw‖_F {layer['update.delta_norm']:.4g}, rank "
              f"{layer['rank']}, fit error (mean) {layer['update.fit_error_mean']:.4g}")
    if report["efficacy_before"] is not None:
        print(f"  efficacy (P(new) > P(true)): {report['efficacy_before']:.3f} -> "
              f"{report['efficacy_after']:.3f}")
    print(f"  {PPL_CORPUS} perplexity: {probe.base:.4g} -> {ppl_after:.4g} "
          f"(x{ppl_after / probe.base:.3g})")
    print(f"  time: v* solves {result.report.seconds_solve:.1f} s, update "
          f"{result.report.seconds_update:.1f} s")
    if out:
        print(f"wrote {out}")
    return 0
