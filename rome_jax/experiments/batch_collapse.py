"""Collapse in batches: the collapse cases of a ``collapse`` run and normal records written in
ONE update, by every batch editor in every key convention.

The records of a finished ``collapse`` run (``--baseline``; by default ``collapse-lLAYER``
beside this run): its collapse cases (a single ``rome`` edit multiplied ME-PPL_50 perplexity
past the run's threshold) and its first ``--n-normal`` normal cases, as one batch. The v*
targets are solved once (every method and convention shares MEMIT's z settings at the top
layer) and each (method, key convention) writes the whole batch in one update of the base
model. A row per (method, convention): ME-PPL_50 perplexity ratio, the efficacy ES (P(new) >
P(true) on the rewrite prompt) of the collapse cases and of the normal cases, each layer's
‖Δw‖_F, and for EMMET its batch denominator (the smallest eigenvalue or singular value of
K_b C⁻¹ K_aᵀ) and condition number, the batch form of ROME's denominator.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

from rome_jax.experiments import collapse
from rome_jax.experiments.report import Report, markdown_table, run_label

NAME = "batch-collapse"
HELP = "collapse cases and normal records in one MEMIT/EMMET/AlphaEdit batch per key convention"
METHODS = ("memit", "emmet", "alphaedit")
CONVENTIONS = ("rome", "c-rome", "p-rome")


def add_args(p) -> None:
    collapse.add_baseline_arg(p)
    p.add_argument("--n-normal", type=int, default=75,
                   help="normal cases of the baseline in the batch (default 75)")
    p.add_argument("--methods", default=",".join(METHODS), metavar="M,M",
                   help=f"batch editors (default {','.join(METHODS)})")
    p.add_argument("--conventions", default=",".join(CONVENTIONS), metavar="K,K",
                   help=f"key conventions (default {','.join(CONVENTIONS)})")


def settings(args) -> dict:
    from rome_jax.arguments import comma_list

    if args.n_normal < 0:
        raise ValueError(f"--n-normal: must be 0 or more, got {args.n_normal}")
    return {"baseline": args.baseline, "n_normal": args.n_normal,
            "methods": comma_list(args.methods, "--methods", known=METHODS),
            "conventions": comma_list(args.conventions, "--conventions", known=CONVENTIONS)}


def check_row(row: Mapping) -> None:
    """ValueError naming the first field a row lacks."""
    from rome_jax.experiments.journal import NUMBER, require

    require(row, {"key": list, "method": str, "keys": str, "layers": list, "n_collapse": int,
                  "n_normal": int})
    if "error" not in row:
        require(row, {"ppl50_ratio": NUMBER, "es_collapse": NUMBER, "es_normal": NUMBER,
                      "update": list})


def run(s, args, journal, header: Mapping) -> None:
    from rome_jax.data import counterfact_by_case_id, load_counterfact, load_me_ppl
    from rome_jax.editors.batch import edit_batch, prepare_batch, solve_targets
    from rome_jax.editors.delta import apply_edit
    from rome_jax.arguments import batch_hparams
    from rome_jax.evaluation import perplexity
    from rome_jax.experiments.sequential_batch import _efficacy
    from rome_jax.rome.request import EditRequest

    import jax

    st = header["settings"]
    base_header, base_rows = collapse.baseline(header, st["bos"])
    picked = [(g, c) for g, c, _ in collapse.chosen(base_header, base_rows, st["n_normal"])
              if g in ("collapse", "normal")]
    records = counterfact_by_case_id(load_counterfact(), [c for _, c in picked])
    groups = np.asarray([g for g, _ in picked])
    requests = [EditRequest.from_dict(r) for r in records]
    texts = load_me_ppl("ME-PPL_50")
    base_ppl = perplexity(s.model, texts)
    targets = None
    for method in st["methods"]:
        context = None
        for keys in st["conventions"]:
            key = [method, keys]
            if key in journal:
                continue
            hparams = batch_hparams(s.model.config, method, args, keys=keys,
                                    layer=s.hparams.layer)
            context = context or prepare_batch(s.model, method, hparams,
                                               jax.random.key(st.get("seed", 0)))
            targets = targets or solve_targets(s.model, requests, hparams, context,
                                               chunk=args.batch)
            row = {"key": key, "method": method, "keys": keys, "layers": list(hparams.layers),
                   "n_collapse": int((groups == "collapse").sum()),
                   "n_normal": int((groups == "normal").sum())}
            try:
                result = edit_batch(s.model, requests, method, hparams, context=context,
                                    targets=targets)
            except ValueError as err:  # a non-finite update: the batch would destroy it
                journal.append({**row, "error": " ".join(str(err).split())})
                continue
            params = apply_edit(s.model.params, result.edit)
            ppl = perplexity(s.model, texts, params=params)
            journal.append({
                **row, "ppl50": ppl, "ppl50_ratio": ppl / base_ppl,
                "es_collapse": _efficacy(s.model, [r for r, g in zip(records, groups)
                                                    if g == "collapse"], params),
                "es_normal": _efficacy(s.model, [r for r, g in zip(records, groups)
                                                  if g == "normal"], params),
                "update": result.report.layers})


def report(header: Mapping, rows: Sequence[Mapping]) -> Report:
    st = header["settings"]
    table_rows = []
    for r in rows:
        if "error" in r:
            table_rows.append([r["method"], r["keys"], "non-finite: refused", *[None] * 6])
            continue
        layers = r["update"]
        top = max(layers, key=lambda x: x["update.delta_norm"])
        table_rows.append([r["method"], r["keys"], r["ppl50_ratio"], r["es_collapse"],
                           r["es_normal"], top["update.delta_norm"], top["layer"],
                           top.get("denominator_min"), top.get("denominator_condition")])
    n = next((r for r in rows if "error" not in r), {})
    markdown = (f"# Collapse cases in one batch ({run_label(st)}; {n.get('n_collapse', '?')} "
                f"collapse cases + {n.get('n_normal', '?')} normal records per update)\n\n"
                + markdown_table(["method", "keys", "ME-PPL_50 x base", "ES collapse cases",
                                  "ES normal", "max ‖Δw‖_F", "at layer",
                                  "EMMET denominator min", "EMMET condition"], table_rows)
                + "\n")
    summary = {"settings": st, "rows": [{k: v for k, v in r.items() if k != "key"}
                                        for r in rows]}
    return Report(summary, markdown, None)
