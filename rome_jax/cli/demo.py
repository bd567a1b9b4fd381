"""``rome-jax demo``: CounterFact edits with rome and c-rome, before and after."""

from __future__ import annotations

import json
from pathlib import Path

from rome_jax.cli.common import (PPL_CORPUS, PROG, Setup, add_guard_args, add_model_args, fmt,
                                method_list, one_line, positive_int, probabilities,
                                test_prefix_entry)


def add_parser(sub) -> None:
    p = sub.add_parser("demo", help="CounterFact edits with rome and c-rome, before and after",
                       description="Edit a few CounterFact facts (at least one whose subject is "
                                   "the first token of its prompt) with rome and c-rome, each "
                                   "from the base model, and show greedy completions, "
                                   "P(target), ME-PPL_50 perplexity, the update's diagnostics "
                                   "and the guard's verdict.")
    p.add_argument("--n", type=positive_int, default=3,
                   help="records to edit (default 3: two first-token subjects, one other)")
    p.add_argument("--case-ids", metavar="ID,...",
                   help="edit these CounterFact case ids instead")
    p.add_argument("--methods", type=method_list, default="rome,c-rome",
                   help="comma-separated methods (default rome,c-rome)")
    p.add_argument("--tokens", type=positive_int, default=12,
                   help="new tokens per greedy completion (default 12)")
    p.add_argument("--test-prefix", action="store_true",
                   help="also measure prompts that open with their subject with the first "
                        "context-template prefix in front (the test-time fix)")
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    add_model_args(p)
    add_guard_args(p, force=False)
    p.set_defaults(func=run)


def _demo_records(s: Setup, args) -> tuple[list[dict], str]:
    """The records to edit, and where they came from (``data.counterfact_cases``)."""
    from rome_jax.data import counterfact_cases, data_file, describe, load_counterfact
    from rome_jax.training import first_token_subject
    from rome_jax.rome.request import EditRequest

    tok = s.model.tokenizer
    if args.case_ids:
        try:
            wanted = [int(x) for x in args.case_ids.split(",") if x.strip()]
        except ValueError:
            raise ValueError(f"--case-ids: {args.case_ids!r} is not a comma-separated list of "
                             "integers") from None
        try:
            chosen, source = counterfact_cases(wanted)
        except ValueError as err:
            raise ValueError(f"--case-ids: {one_line(err).removeprefix('case_ids: ')}") from None
        for r in chosen:
            s.check_fits(EditRequest.from_dict(r))
        return chosen, source
    ids_file = Path(s.model.name) / "training_case_ids.json" if s.model.name else None
    if ids_file is not None and ids_file.is_file():  # facts the model knows
        records, source = counterfact_cases(sorted(set(json.loads(ids_file.read_text()))))
    else:
        records, source = load_counterfact(), describe(data_file("counterfact.json"))
    n_first = max(1, args.n - args.n // 3)
    first, other = [], []
    for r in records:
        is_first = first_token_subject(r, tok)
        bucket = first if is_first else other
        if len(bucket) >= (n_first if is_first else args.n - n_first):
            continue
        try:
            s.check_fits(EditRequest.from_dict(r))
        except ValueError:
            continue
        bucket.append(r)
        if len(first) >= n_first and len(other) >= args.n - n_first:
            break
    return first + other, source


def run(args) -> int:
    from rome_jax.guard import evaluate
    from rome_jax.training import first_token_subject
    from rome_jax.models.generate import generate
    from rome_jax.rome.edit import compute_edit
    from rome_jax.rome.request import EditRequest
    from rome_jax.editors.delta import apply_edit

    methods = list(args.methods)
    s = Setup(args)
    records, source = _demo_records(s, args)
    requests = [EditRequest.from_dict(r) for r in records]
    texts = [r.text for r in requests]
    model = s.model
    profile = None if args.no_guard else s.profile()
    base_ppl = s.probe.base
    before = generate(model, texts, args.tokens)
    results = []
    for i, (record, request) in enumerate(zip(records, requests)):
        p_new, p_true = probabilities(model, model.params, request.text, request)
        row = {"case_id": record["case_id"], "request": request.to_dict(),
               "first_token_subject": first_token_subject(record, model.tokenizer),
               "completion_before": before[i], "p_new_before": p_new, "p_true_before": p_true,
               "edits": []}
        for method in methods:
            try:
                update, report = compute_edit(model, request, s.hparams, method,
                                              context=s.context)
            except ValueError as err:
                row["edits"].append({"method": method, "error": one_line(err)})
                continue
            params = apply_edit(model.params, update)
            entry = report.to_dict()
            entry.pop("request")
            entry["p_new_after"], entry["p_true_after"] = probabilities(
                model, params, request.text, request)
            entry["perplexity_before"] = base_ppl
            entry["perplexity_after"] = s.probe(params)
            entry["completion_after"] = generate(model, texts, args.tokens, params=params)[i]
            if args.test_prefix:
                entry["test_prefix"] = test_prefix_entry(s, model.params, params, request,
                                                         args.tokens)
            entry["guard"] = (None if profile is None else
                              evaluate({**entry, "request": request.to_dict()},
                                       profile).to_dict())
            row["edits"].append(entry)
        results.append(row)
    out = {"command": "demo", "model": str(args.model or model.name), "layer": s.hparams.layer,
           "counterfact": source, "perplexity_corpus": PPL_CORPUS,
           "perplexity_before": base_ppl,
           "guard_profile": None if profile is None else profile.summary(), "records": results}
    if args.json:
        print(json.dumps(out, indent=1))
        return 0
    print(f"{PROG} demo: {out['model']}, layer {s.hparams.layer}, {PPL_CORPUS} perplexity "
          f"{base_ppl:.4g}\nCounterFact: {source}")
    for row in results:
        r = row["request"]
        where = ("subject is the first token" if row["first_token_subject"] else
                 "subject inside the prompt" if not r["prompt"].startswith("{}") else
                 "subject opens the prompt")
        print(f"\n[case {row['case_id']}] {r['prompt'].format(r['subject'])!r}: "
              f"{r['target_true']!r} -> {r['target_new']!r} ({where})")
        print(f"  {'before':<8} | ...{row['completion_before']!r}")
        for e in row["edits"]:
            if "error" in e:
                print(f"  {e['method']:<8} | error: {e['error']}")
                continue
            print(f"  {e['method']:<8} | ...{e['completion_after']!r}")
            tp = e.get("test_prefix")
            if tp:
                print(f"  {'':<8} | with the test-time prefix {tp['prefix']!r}: "
                      f"...{tp['completion_after']!r} (before: ...{tp['completion_before']!r}); "
                      f"P(new) {tp['p_new_before']:.3g} -> {tp['p_new_after']:.3g}")
    header = (f"{'case':>6}  {'method':<7} {'P(new) before -> after':>22} "
              f"{'P(true) after':>13} {'ME-PPL_50 after':>15} {'x base':>8} "
              f"{'denominator':>11} {'|Δ|':>9}  guard")
    print("\n" + header + "\n" + "-" * len(header))
    for row in results:
        for e in row["edits"]:
            if "error" in e:
                print(f"{row['case_id']:>6}  {e['method']:<7} error: {e['error']}")
                continue
            g = e["guard"]
            verdict = "-" if g is None else "ok" if g["ok"] else "REFUSE"
            ratio = e["perplexity_after"] / base_ppl
            print(f"{row['case_id']:>6}  {e['method']:<7} "
                  f"{fmt(row['p_new_before'], '.3g'):>9} -> {fmt(e['p_new_after'], '.3g'):<9} "
                  f"{fmt(e['p_true_after'], '.3g'):>13} {e['perplexity_after']:>15.4g} "
                  f"{ratio:>8.3g} {e['denominator']:>11.4g} {e['delta_abs']:>9.2e}  {verdict}")
    if profile is not None:
        p = profile.summary()
        print(f"\nguard: refuses denominator < {p['denominator_floor']:.4g} or |Δ| > "
              f"{p['delta_abs_ceiling']:.3e} (from {p['n']} normal edits); rolls back "
              f"perplexity x > {p['max_ppl_ratio']:g}")
    return 0
