"""``rome-jax screen``: which single CounterFact edits collapse the model (resumable)."""

from __future__ import annotations

import json
import math
from pathlib import Path

from rome_jax.cli.common import (PPL_CORPUS, PROG, Setup, add_model_args, add_record_args,
                                counterfact_records, hparams_dict, log, one_line,
                                positive_float, positive_int, ratio_above_one)


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
    p.add_argument("--method", choices=("rome", "c-rome", "r-rome", "p-rome"), default="rome")
    p.add_argument("--out", required=True, metavar="FILE.json", help="results (resumable)")
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


def _model_digest(params) -> str:
    import hashlib

    import jax
    import numpy as np

    digest = hashlib.sha256()
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        digest.update(jax.tree_util.keystr(path).encode())
        digest.update(np.ascontiguousarray(np.asarray(leaf)).tobytes())
    return digest.hexdigest()[:20]


def _screen_summary(records: list[dict], threshold: float) -> dict:
    collapse, normal, skipped = [], [], []
    for r in records:
        if r.get("error"):
            skipped.append(r["case_id"])
        elif r["ratio"] > threshold or not math.isfinite(r["ratio"]):
            collapse.append(r["case_id"])
        else:
            normal.append(r["case_id"])
    out = {"collapse": collapse, "normal": normal, "skipped": skipped}
    judged = [r for r in records if not r.get("error") and r.get("guard_ok") is not None]
    if judged:
        bad = lambda r: r["ratio"] > threshold or not math.isfinite(r["ratio"])
        out["guard_confusion"] = {
            "refused_collapse": sum(1 for r in judged if not r["guard_ok"] and bad(r)),
            "refused_normal": sum(1 for r in judged if not r["guard_ok"] and not bad(r)),
            "passed_collapse": sum(1 for r in judged if r["guard_ok"] and bad(r)),
            "passed_normal": sum(1 for r in judged if r["guard_ok"] and not bad(r))}
    return out


def run(args) -> int:
    import time

    from tqdm import tqdm

    from rome_jax.guard import evaluate, write_json_atomic
    from rome_jax.training import first_token_subject
    from rome_jax.rome.edit import compute_edit
    from rome_jax.rome.request import EditRequest
    from rome_jax.rome.update import apply_edit

    out = Path(args.out)
    previous = None
    if out.exists():
        try:
            previous = json.loads(out.read_text())
            if not isinstance(previous, dict) or not isinstance(previous.get("records"), list):
                raise ValueError("no 'records' list")
        except (ValueError, UnicodeDecodeError) as err:
            raise ValueError(f"{out}: exists but is not a screening file ({one_line(err)}); "
                             "use another --out") from None
    records = counterfact_records(args)
    s = Setup(args)
    args.max_ppl_ratio = args.threshold  # the guard profile keeps edits below the threshold
    settings = {"model": str(args.model or s.model.name), "digest": _model_digest(s.model.params),
                "layer": s.hparams.layer, "method": args.method,
                "hparams": hparams_dict(s.hparams), "seed": args.seed,
                "perplexity_corpus": PPL_CORPUS}
    done: list[dict] = []
    if previous is not None:
        old = previous.get("settings", {})
        differ = [k for k in settings if k != "model" and old.get(k) != json.loads(
            json.dumps(settings[k]))]
        if differ:
            raise ValueError(f"{out}: was screened with other settings ({', '.join(differ)} "
                             "differ); use the same settings or another --out")
        done = previous["records"]
    seen = {r["case_id"] for r in done}
    todo = [r for r in records if r["case_id"] not in seen]
    context, probe = s.context, s.probe
    profile = s.profile() if args.guard else None
    base = probe.base
    tok = s.model.tokenizer

    def save():
        write_json_atomic(out, {"settings": settings, "threshold": args.threshold,
                                "base_perplexity": base,
                                **_screen_summary(done, args.threshold), "records": done})

    if previous is not None and todo:
        log(f"{PROG}: resuming {out}: {len(seen)} records done, {len(todo)} to go")
    last_save, unsaved = time.time(), 0
    try:
        for record in tqdm(todo, desc="screen", unit="edit"):
            request = EditRequest.from_dict(record)
            rw = record["requested_rewrite"]
            row = {"case_id": record["case_id"], "subject": rw["subject"],
                   "prompt": rw["prompt"], "target_new": request.target_new,
                   "subject_first": request.subject_first,
                   "first_token_subject": first_token_subject(record, tok)}
            try:
                s.check_request(request)
                s.check_fits(request)
            except ValueError as err:
                row["error"] = one_line(err)
            else:
                try:
                    update, report = compute_edit(s.model, request, s.hparams, args.method,
                                                  context=context)
                except ValueError as err:  # non-finite update: the model would be destroyed
                    row.update(perplexity=math.inf, ratio=math.inf, collapse=True,
                               note=one_line(err))
                else:
                    after = probe(apply_edit(s.model.params, update))
                    ratio = after / base
                    row.update({k: getattr(report, k) for k in (
                        "denominator", "numerator_norm", "delta_norm", "delta_abs",
                        "residual_norm", "key_cosine", "delta_v_norm", "v_steps")})
                    row["v_loss_final"] = report.v_losses[-1] if report.v_losses else None
                    row.update(perplexity=after, ratio=ratio,
                               collapse=not ratio <= args.threshold)
                    if profile is not None:
                        verdict = evaluate(report, profile)
                        row.update(guard_ok=verdict.ok, guard_reasons=verdict.reasons)
            done.append(row)
            unsaved += 1
            if unsaved >= args.save_every or time.time() - last_save > 30:
                save()
                last_save, unsaved = time.time(), 0
    finally:
        save()
    summary = _screen_summary(done, args.threshold)
    print(f"{PROG} screen: {len(done)} records in {out} ({len(summary['collapse'])} collapse, "
          f"{len(summary['normal'])} normal, {len(summary['skipped'])} skipped; base "
          f"{PPL_CORPUS} perplexity {base:.4g}, threshold x{args.threshold:g})")
    if "guard_confusion" in summary:
        c = summary["guard_confusion"]
        print(f"guard: refused {c['refused_collapse']} collapse and {c['refused_normal']} "
              f"normal edits; passed {c['passed_collapse']} collapse and "
              f"{c['passed_normal']} normal edits")
    return 0
