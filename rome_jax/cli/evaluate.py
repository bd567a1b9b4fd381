"""``rome-jax evaluate``: ROME's CounterFact metrics of edit methods."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from rome_jax.arguments import nonnegative_int
from rome_jax.cli.common import (PPL_CORPUS, PROG, Setup, add_model_args, add_record_args,
                                counterfact_records, fmt, log, method_list, one_line,
                                positive_int, read_results, resumed_records)


def add_parser(sub) -> None:
    p = sub.add_parser("evaluate", help="CounterFact metrics (ES, PS, NS, S) of edit methods",
                       description="Edit N CounterFact records, each from the base model, with "
                                   "each method, and report ROME's CounterFact metrics (efficacy "
                                   "ES/EM, paraphrase PS/PM, neighbourhood NS/NM, their harmonic "
                                   "mean S), the ME-PPL_50 perplexity ratio, the median |Δ| and "
                                   "optionally generation entropy, for all records, first-token "
                                   "subjects and the others.")
    add_record_args(p, "evaluate")
    p.add_argument("--methods", type=method_list, default="rome,c-rome,p-rome",
                   help="comma-separated methods (default rome,c-rome,p-rome)")
    p.add_argument("--test-prefix", action="store_true",
                   help="score the rewrite and paraphrase prompts that open with the subject "
                        "with a random prefix in front (sampled apart from the edit's "
                        "templates); the summary shows these scores")
    p.add_argument("--generation-prompts", type=nonnegative_int, default=0, metavar="G",
                   help="also measure generation entropy on G generation prompts per record "
                        "(default 0: off)")
    p.add_argument("--generation-tokens", type=positive_int, default=50, metavar="T",
                   help="new tokens per generation (default 50)")
    p.add_argument("--out", metavar="FILE.json",
                   help="write every record's scores and the summary as JSON, rewritten after "
                        "each record; a rerun with the same settings resumes it")
    p.add_argument("--overwrite", action="store_true",
                   help="start over: replace an existing --out instead of resuming it")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    add_model_args(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from tqdm import tqdm

    from rome_jax.counterfact_eval import (EvalSettings, check_row, evaluate_record, summarize,
                                          test_prefixes)
    from rome_jax.files import write_json_atomic
    from rome_jax.rome.request import EditRequest

    evaluation = EvalSettings(
        methods=args.methods,
        test_prefix=args.test_prefix, generation_prompts=args.generation_prompts,
        generation_tokens=args.generation_tokens, seed=args.seed)
    previous = read_results(Path(args.out), "an evaluation", args.overwrite) if args.out else None
    records = counterfact_records(args)
    s = Setup(args)
    settings = s.result_settings(evaluation=dataclasses.asdict(evaluation))
    rows = resumed_records(previous, settings, Path(args.out)) if args.out else []
    for i, row in enumerate(rows):
        check_row(row, evaluation, f"{args.out}: record {i} (case {row['case_id']}): ")
    seen = {r["case_id"] for r in rows}
    todo = []
    for record in records:
        if record["case_id"] in seen:
            continue
        try:
            s.check_fits(EditRequest.from_dict(record))
            todo.append(record)
        except ValueError as err:
            log(f"{PROG}: skipping case {record['case_id']}: {one_line(err)}")
    if rows and todo:
        log(f"{PROG}: resuming {args.out}: {len(rows)} records done, {len(todo)} to go")
    prefixes = test_prefixes(s.model, args.seed) if evaluation.test_prefix else ()
    groups = {"all": lambda r: True, "first-token subjects": lambda r: r["first_token_subject"],
              "other subjects": lambda r: not r["first_token_subject"]}

    def results() -> dict:
        summary = {name: summarize(rows, evaluation.methods, keep, evaluation.test_prefix)
                   for name, keep in groups.items() if any(keep(r) for r in rows)}
        return {"command": "evaluate", "settings": settings, "test_prefixes": list(prefixes),
                "perplexity_before": s.probe.base, "summary": summary, "records": rows}

    with tqdm(todo, desc="evaluate", unit="record") as bar:
        for record in bar:
            rows.append(evaluate_record(s.model, record, s.hparams, s.context, s.probe,
                                        evaluation, prefixes))
            if args.out:  # after every record: an interrupted run resumes from here
                write_json_atomic(args.out, results())
    out = results()
    summary = out["summary"]
    if args.json:
        print(json.dumps({k: v for k, v in out.items() if k != "records"}, indent=1))
        return 0
    print(f"{PROG} evaluate: {settings['model']}, layer {s.hparams.layer}, {len(rows)} records, "
          f"{PPL_CORPUS} perplexity {s.probe.base:.4g}"
          + (", prompts that open with the subject scored with a test prefix"
             if evaluation.test_prefix else ""))
    ge = evaluation.generation_prompts > 0
    header = (f"{'records':<21} {'method':<7} {'n':>4} {'ES':>6} {'PS':>6} {'NS':>6} {'S':>6} "
              f"{'EM':>7} {'PM':>7} {'NM':>7} {'ppl x med':>9} {'ppl x max':>9} {'|Δ| med':>9}"
              + (f" {'GE':>6} {'GE norm':>7}" if ge else ""))
    print(header + "\n" + "-" * len(header))
    for name, by_method in summary.items():
        for method, m in by_method.items():
            print(f"{name:<21} {method:<7} {m['n']:>4} {m['ES']:>6.3f} {m['PS']:>6.3f} "
                  f"{m['NS']:>6.3f} {m['S']:>6.3f} {m['EM']:>7.3f} {m['PM']:>7.3f} "
                  f"{m['NM']:>7.3f} {m['ppl_ratio_median']:>9.3g} {m['ppl_ratio_max']:>9.3g} "
                  f"{fmt(m.get('delta_abs_median'), '.2e'):>9}"
                  + (f" {m['GE']:>6.3f} {m['GE_norm']:>7.3f}" if ge else "")
                  + (f"  ({m['failed']} failed)" if m["failed"] else ""))
    return 0
