"""``rome-jax edit``: one fact or a JSON list of facts, with the guard's verdict and an optional
HF export."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from rome_jax.cli.batch import layer_range
from rome_jax.cli.common import (EXIT_REFUSED, PPL_CORPUS, PROG, Setup, add_guard_args,
                                add_model_args, check_inputs_apart, check_output, fmt,
                                hparams_dict, log, one_line, positive_int, probabilities,
                                status as show_status, test_prefix_entry)
from rome_jax.hf import EXPORT_FORMATS


def add_parser(sub) -> None:
    p = sub.add_parser("edit", help="edit one fact, or a list of facts, and report",
                       description="Edit one fact (--prompt/--subject/--target-new) or the "
                                   "requests of a JSON file (--requests), report the update's "
                                   "diagnostics, P(target) and ME-PPL_50 perplexity before and "
                                   "after, and the collapse guard's verdict; optionally export "
                                   "the edited model. Exit status 3: refused or rolled back.")
    g = p.add_argument_group("request")
    g.add_argument("--prompt", help="prompt with {} where the subject goes, e.g. '{} plays the'")
    g.add_argument("--subject", help="the subject that fills {}")
    g.add_argument("--target-new", help="the new object the model should say")
    g.add_argument("--target-true", help="the old object (reported only)")
    g.add_argument("--requests", metavar="FILE.json",
                   help="JSON list of requests, CounterFact records or flat {prompt, subject, "
                        "target_new[, target_true]} objects")
    g.add_argument("--mode", choices=("sequential", "independent"), default="sequential",
                   help="with --requests: each edit on the previous result (sequential, "
                        "default) or every edit on the base model (independent)")
    g.add_argument("--method", choices=("rome", "c-rome", "r-rome", "p-rome", "k2-rome", "memit",
                                        "emmet", "alphaedit"), default="c-rome",
                   help="update: rome (original mixed keys), c-rome / r-rome (consistent k̄, "
                        "default), p-rome (plain keys), k2-rome (rank 2: k̄ and the plain key "
                        "k^u, for subjects that open the prompt); or a batch editor that writes "
                        "all --requests in one update: memit, emmet, alphaedit")
    g = p.add_argument_group("batch editors (--method memit|emmet|alphaedit)")
    g.add_argument("--layers", type=layer_range, metavar="FIRST-LAST",
                   help="edited layers, e.g. 13-17 or 3,5,7 (default: the method's preset)")
    g.add_argument("--keys", choices=("rome", "c-rome", "p-rome"), default="rome",
                   help="key convention: rome (k̄ with the residual at the plain prompt, as "
                        "MEMIT; default), c-rome (k̄ throughout), p-rome (the plain key)")
    g.add_argument("--chunk", type=positive_int, default=32, metavar="B",
                   help="requests per compiled step of the v* solves and the keys (default 32)")
    g.add_argument("--test-prefix", action="store_true",
                   help="when the subject opens the prompt, also measure P(target) with the "
                        "first context-template prefix in front (the test-time fix)")
    add_model_args(p)
    add_guard_args(p)
    g = p.add_argument_group("output")
    g.add_argument("--out", metavar="DIR", help="write the edited model as an HF directory")
    g.add_argument("--format", choices=EXPORT_FORMATS, default="safetensors",
                   help="the weights file of --out: model.safetensors (default) or "
                        "flax_model.msgpack, as transformers' Flax classes wrote it")
    g.add_argument("--overwrite", action="store_true",
                   help="replace an existing --out or --report")
    g.add_argument("--report", metavar="FILE.json", help="write the report as JSON")
    g.add_argument("--json", action="store_true", help="print the report as JSON on stdout")
    p.set_defaults(func=run)


def _read_requests(args) -> list:
    from rome_jax.rome.request import EditRequest

    single = {"--prompt": args.prompt, "--subject": args.subject,
              "--target-new": args.target_new, "--target-true": args.target_true}
    if args.requests:
        given = [k for k, v in single.items() if v is not None]
        if given:
            raise ValueError(f"{given[0]}: use either --requests or --prompt/--subject/"
                             "--target-new, not both")
        path = Path(args.requests)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such requests file")
        try:
            items = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}: not valid JSON ({err})") from None
        except UnicodeDecodeError:
            raise ValueError(f"{path}: not a UTF-8 text file") from None
        if not isinstance(items, list) or not items:
            raise ValueError(f"{path}: expected a non-empty JSON list of requests")
        requests = []
        for i, item in enumerate(items):
            try:
                requests.append(EditRequest.from_dict(item))
            except (ValueError, TypeError, AttributeError) as err:
                raise ValueError(f"{path}: request {i}: {one_line(err)}") from None
        return requests
    if args.mode == "independent":
        raise ValueError("--mode independent: needs --requests")
    missing = [k for k in ("--prompt", "--subject", "--target-new") if single[k] is None]
    if missing:
        raise ValueError(f"{missing[0]}: required (or give --requests FILE.json)")
    prompt, subject = args.prompt, args.subject
    if "{}" not in prompt:
        hint = (f"; write {prompt.replace(subject, '{}', 1)!r}" if subject and subject in prompt
                else f"; the subject {subject!r} is not in it either")
        raise ValueError(f"--prompt: must contain {{}} where the subject goes{hint}")
    return [EditRequest(prompt, subject, args.target_new, args.target_true)]


def _merge_verdicts(entries: list[dict]) -> dict | None:
    verdicts = [(i, e["guard"]) for i, e in enumerate(entries) if e.get("guard") is not None]
    if not verdicts:
        return None
    bad = [(i, v) for i, v in verdicts if not v["ok"]]
    prefix = (lambda i: f"edit {i}: ") if len(entries) > 1 else (lambda i: "")
    return {"ok": not bad, "reasons": [prefix(i) + r for i, v in bad for r in v["reasons"]],
            "suggestion": bad[0][1]["suggestion"] if bad else ""}


def _one_edit(s: Setup, request, params, method: str, profile, ppl_before: float,
              test_prefix: bool) -> tuple[dict, Any]:
    """Compute, judge, apply and measure one edit. Returns (entry, new params or None)."""
    from rome_jax.guard import Verdict, evaluate, suggest
    from rome_jax.rome.edit import compute_edit
    from rome_jax.editors.delta import apply_edit

    force = s.args.force
    model = s.model
    p_new, p_true = probabilities(model, params, request.text, request)
    try:
        update, report = compute_edit(model, request, s.hparams, method, context=s.context,
                                      params=params)
    except ValueError as err:  # the request was checked: only a non-finite update is left
        entry = {"method": method, "layer": s.hparams.layer, "request": request.to_dict(),
                 "p_new_before": p_new, "p_true_before": p_true, "applied": False,
                 "guard": Verdict(False, [one_line(err)],
                                  suggest(method, request.subject_first, finite=False)).to_dict()}
        return entry, None
    entry = report.to_dict()
    entry.update(p_new_before=p_new, p_true_before=p_true, perplexity_before=ppl_before)
    pre = evaluate(report, profile) if profile is not None else None
    entry["guard"] = pre.to_dict() if pre is not None else None
    if pre is not None and not pre.ok and not force:
        entry["applied"] = False
        entry["status"] = "refused"
        return entry, None
    new_params = apply_edit(params, update)
    entry["p_new_after"], entry["p_true_after"] = probabilities(model, new_params, request.text,
                                                                 request)
    entry["perplexity_after"] = s.probe(new_params)
    if test_prefix:
        entry["test_prefix"] = test_prefix_entry(s, params, new_params, request)
    if profile is not None:
        post = evaluate(entry, profile)
        entry["guard"] = post.to_dict()
        if not post.ok and not force:
            entry["applied"] = False
            entry["status"] = "rolled_back"
            return entry, None
    entry["applied"] = True
    entry["status"] = "applied"
    return entry, new_params


def _print_edit_report(report: dict) -> None:
    print(f"{PROG} edit: {report['method']} at layer {report['layer']} of {report['model']} "
          f"({report['mode']}, {len(report['edits'])} request"
          f"{'s' if len(report['edits']) != 1 else ''})")
    for i, e in enumerate(report["edits"]):
        r = e["request"]
        print(f"\n[{i}] {r['prompt'].format(r['subject'])!r} -> {r['target_new']!r}"
              + (f" (was {r['target_true']!r})" if r.get("target_true") else "")
              + (f", case {r['case_id']}" if r.get("case_id") is not None else ""))
        rows = [("numerator ‖r‖·‖u‖", fmt(e.get("numerator_norm"))),
                ("denominator", fmt(e.get("denominator"))),
                ("‖Δ‖_F", fmt(e.get("delta_norm"))),
                ("|Δ| (‖Δ‖_F / F·D)", fmt(e.get("delta_abs"), ".3e"))]
        losses = e.get("v_losses") or []
        if losses:
            rows.append(("v* loss", f"{losses[0]:.4g} -> {losses[-1]:.4g} "
                                    f"({len(losses)} steps)"))
        rows.append(("P(new)", f"{fmt(e.get('p_new_before'))} -> {fmt(e.get('p_new_after'))}"))
        if e.get("p_true_before") is not None:
            rows.append(("P(true)", f"{fmt(e.get('p_true_before'))} -> "
                                    f"{fmt(e.get('p_true_after'))}"))
        tp = e.get("test_prefix")
        if tp:
            rows.append(("P(new) with prefix", f"{fmt(tp['p_new_before'])} -> "
                                               f"{fmt(tp['p_new_after'])}  {tp['prompt']!r}"))
        if e.get("perplexity_after") is not None:
            ratio = e["perplexity_after"] / e["perplexity_before"]
            rows.append((f"{PPL_CORPUS} perplexity", f"{e['perplexity_before']:.4g} -> "
                                                     f"{e['perplexity_after']:.4g} "
                                                     f"(x{ratio:.3g})"))
        g = e.get("guard")
        rows.append(("guard", "off" if g is None else "ok" if g["ok"] else
                     "COLLAPSE: " + "; ".join(g["reasons"])))
        rows.append(("status", e.get("status", "applied" if e.get("applied") else "refused")))
        for name, value in rows:
            print(f"  {name:<22} {value}")
    if report["mode"] != "independent" and report.get("perplexity_after") is not None:
        print(f"\n{PPL_CORPUS} perplexity: {report['perplexity_before']:.4g} -> "
              f"{report['perplexity_after']:.4g}")
    if report.get("out"):
        print(f"wrote {report['out']}")


def _write_outputs(model, out: Path | None, report: dict, report_file: Path | None,
                   overwrite: bool, format: str = "safetensors") -> None:
    """The report first, then the model (when ``model``, in ``format``: ``save_hf``'s): a failed
    export removes the report it described, so the two succeed or fail together."""
    from rome_jax.files import write_json_atomic
    from rome_jax.hf import save_hf

    if report_file:
        write_json_atomic(report_file, report)
    if model is None:
        return
    try:
        save_hf(model, out, overwrite=overwrite, format=format,
                extra_files={"rome_edit.json": json.dumps(report, indent=1)})
    except BaseException:
        if report_file:
            report_file.unlink(missing_ok=True)
        raise


def run(args) -> int:
    from tqdm import tqdm

    requests = _read_requests(args)
    method = args.method
    if args.out and args.mode == "independent" and len(requests) > 1:
        raise ValueError("--out: independent edits give one model per request; use --mode "
                         "sequential to write one model with all of them")
    if args.format != "safetensors" and not args.out:
        raise ValueError(f"--format {args.format}: the format of the model --out writes; give "
                         "--out DIR")
    out = check_output(args.out, "--out", args.overwrite, directory=True) if args.out else None
    report_file = check_output(args.report, "--report", args.overwrite) if args.report else None
    if out and report_file and out.absolute() in report_file.absolute().parents:
        raise ValueError(f"--report {report_file}: inside --out {out}, which the export replaces")
    for path, flag in ((out, "--out"), (report_file, "--report")):
        if path:
            check_inputs_apart(path, flag, args)
    if method in ("memit", "emmet", "alphaedit"):
        from rome_jax.cli.batch import run_batch

        return run_batch(args, requests, out, report_file, _write_outputs)
    s = Setup(args)
    s.check_requests(requests, args.requests)
    profile = None if args.no_guard else s.profile()
    base = s.probe.base
    params, ppl = s.model.params, base
    entries, status = [], "applied"
    if len(requests) == 1:
        show_status("computing the edit (v*, the update, perplexity after)")
    with tqdm(requests, desc="edit", unit="request", disable=len(requests) < 2) as bar:
        for request in bar:
            start = s.model.params if args.mode == "independent" else params
            start_ppl = base if args.mode == "independent" else ppl
            entry, new_params = _one_edit(s, request, start, method, profile, start_ppl,
                                          args.test_prefix)
            entries.append(entry)
            if new_params is None:
                status = entry.get("status", "refused")
                if args.mode == "sequential":
                    break
                continue
            if args.mode == "sequential":
                params, ppl = new_params, entry["perplexity_after"]
    report = {
        "command": "edit", "model": str(args.model or s.model.name), "dtype": args.dtype,
        "method": method,
        "layer": s.hparams.layer, "mode": args.mode if len(requests) > 1 else "single",
        "perplexity_corpus": PPL_CORPUS, "perplexity_before": base,
        "perplexity_after": ppl if args.mode == "sequential" and status == "applied" else None,
        "status": status, "guard": _merge_verdicts(entries),
        "guard_profile": None if profile is None else profile.summary(),
        "hparams": hparams_dict(s.hparams), "edits": entries,
        "out": str(out) if out and status == "applied" else None}
    _write_outputs(s.model.with_params(params) if report["out"] else None, out, report,
                   report_file, args.overwrite, args.format)
    if args.json:
        print(json.dumps(report, indent=1))
    else:
        _print_edit_report(report)
    if status != "applied":
        verdict = report["guard"] or {"reasons": [], "suggestion": ""}
        what = "refused" if status == "refused" else "rolled back"
        reasons = "; ".join(verdict["reasons"]) or "non-finite update"
        hint = f" Suggestion: {verdict['suggestion']}." if verdict["suggestion"] else ""
        written = (f" --out {out}: not written." if out else "") + (
            f" The report is in {report_file}." if report_file else "")
        log(f"{PROG}: edit {what}: {reasons}.{hint}{written}")
        return EXIT_REFUSED
    return 0
