"""``rome-jax screen``: which single CounterFact edits collapse the model (resumable)."""

from __future__ import annotations

from pathlib import Path

from rome_jax.cli.common import (PPL_CORPUS, PROG, Setup, add_model_args, add_record_args,
                                counterfact_records, log, positive_float,
                                positive_int, ratio_above_one, read_results, resumed_records)


def add_parser(sub) -> None:
    p = sub.add_parser("screen", help="find the CounterFact edits that collapse the model",
                       description="Single edits (rome by default) of N CounterFact records, "
                                   "each from the base model; ME-PPL_50 perplexity after each. "
                                   "A record collapses when perplexity exceeds THRESHOLD times "
                                   "the unedited model's. Writes {collapse, normal, records} "
                                   "JSON; re-running with the same --out resumes.")
    add_record_args(p, "screen")
    p.add_argument("--threshold", type=ratio_above_one, default=10.0, metavar="X",
                   help="collapse: perplexity > X times the base model's (default 10)")
    p.add_argument("--method", choices=("rome", "c-rome", "r-rome", "p-rome", "k2-rome"),
                   default="rome")
    p.add_argument("--out", required=True, metavar="FILE.json", help="results (resumable)")
    p.add_argument("--overwrite", action="store_true",
                   help="start over: replace an existing --out instead of resuming it")
    p.add_argument("--guard", action="store_true",
                   help="also record the guard's prediction for every edit (builds the "
                        "profile) and its confusion counts")
    p.add_argument("--guard-samples", type=positive_int, default=48, metavar="N")
    p.add_argument("--guard-margin", type=positive_float, metavar="M")
    p.add_argument("--guard-k", type=positive_float, metavar="K")
    p.add_argument("--save-every", type=positive_int, default=10, metavar="N",
                   help="write the file after every N records (and at the end; default 10)")
    add_model_args(p)
    p.set_defaults(func=run)


def run(args) -> int:
    import time

    from tqdm import tqdm

    from rome_jax.files import write_json_atomic
    from rome_jax.screening import screen_record, summarize_screen

    out = Path(args.out)
    previous = read_results(out, "a screening", args.overwrite)
    records = counterfact_records(args)
    s = Setup(args)
    args.max_ppl_ratio = args.threshold  # the guard profile keeps edits below the threshold
    settings = s.result_settings(method=args.method, seed=args.seed)
    done = resumed_records(previous, settings, out)
    seen = {r["case_id"] for r in done}
    todo = [r for r in records if r["case_id"] not in seen]
    context, probe = s.context, s.probe
    profile = s.profile() if args.guard else None

    def save():
        write_json_atomic(out, {"settings": settings, "threshold": args.threshold,
                                "base_perplexity": probe.base,
                                **summarize_screen(done, args.threshold), "records": done})

    if done and todo:
        log(f"{PROG}: resuming {out}: {len(seen)} records done, {len(todo)} to go")
    last_save, unsaved = time.time(), 0
    try:
        with tqdm(todo, desc="screen", unit="edit") as bar:
            for record in bar:
                done.append(screen_record(s.model, record, s.hparams, context, probe,
                                          args.method, args.threshold, profile))
                unsaved += 1
                if unsaved >= args.save_every or time.time() - last_save > 30:
                    save()
                    last_save, unsaved = time.time(), 0
    finally:
        save()
    summary = summarize_screen(done, args.threshold)
    print(f"{PROG} screen: {len(done)} records in {out} ({len(summary['collapse'])} collapse, "
          f"{len(summary['normal'])} normal, {len(summary['skipped'])} skipped; base "
          f"{PPL_CORPUS} perplexity {probe.base:.4g}, threshold x{args.threshold:g})")
    if "guard_confusion" in summary:
        c = summary["guard_confusion"]
        print(f"guard: refused {c['refused_collapse']} collapse and {c['refused_normal']} "
              f"normal edits; passed {c['passed_collapse']} collapse and "
              f"{c['passed_normal']} normal edits")
    return 0
