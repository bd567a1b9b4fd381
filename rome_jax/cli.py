"""rome-jax: edit facts with ROME from the command line, and see (and stop) model collapse.

    rome-jax edit --prompt "{} plays the" --subject "Toko Yasuda" --target-new piano
    rome-jax edit --requests edits.json --mode sequential --out edited/ --report report.json
    rome-jax demo                      # CounterFact edits with rome and c-rome, before/after
    rome-jax stats [--rebuild]         # key statistics C = E[k kᵀ] at the edit layer
    rome-jax screen --n 200 --out screen.json   # which single rome edits collapse the model
    rome-jax evaluate --n 100 --test-prefix     # CounterFact ES/PS/NS/S of rome, c-rome, p-rome
    rome-jax trace --prompt "{} plays the" --subject "Toko Yasuda" --out trace.png

Every command takes ``--model PATH_OR_HUB_ID`` (default: the embedded gpt2-cf-tiny) and
``--layer L`` (default: the model's preset). User errors print one line
``rome-jax: error: ...`` and exit with status 2; an edit refused by the collapse guard, or rolled
back because it collapsed the model, exits with status 3.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import shutil
import sys
from pathlib import Path
from typing import Any, Sequence

PROG = "rome-jax"
EXIT_USAGE = 2
EXIT_REFUSED = 3
PPL_CORPUS = "ME-PPL_50"


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors: ``rome-jax: error: <sub>: <message>``, exit status 2."""

    def error(self, message: str):
        where = self.prog.removeprefix(PROG).strip()
        text = f"{where}: {message}" if where else message
        self.exit(EXIT_USAGE, f"{PROG}: error: {_one_line(text)} (see {self.prog} --help)\n")


def _one_line(text: Any) -> str:
    return " ".join(str(text).split())


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- arguments


def _template_lengths(text: str) -> tuple[tuple[int, int], ...]:
    try:
        pairs = tuple(tuple(int(x) for x in part.lower().split("x")) for part in
                      text.split(","))
        if not pairs or any(len(p) != 2 or p[0] < 1 or p[1] < 0 for p in pairs):
            raise ValueError
        return pairs
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not LENGTHxCOUNT[,LENGTHxCOUNT...] (e.g. 5x10,10x10)") from None


def _number(parse, accept, requirement: str):
    """An argparse type: ``parse`` the text, then require ``accept(value)``."""
    noun = "an integer" if parse is int else "a number"

    def convert(text: str):
        try:
            value = parse(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {noun}") from None
        if not accept(value):
            raise argparse.ArgumentTypeError(f"{text!r} {requirement}")
        return value

    return convert


_positive_float = _number(float, lambda v: v > 0 and math.isfinite(v), "must be a positive number")
_nonnegative_float = _number(float, lambda v: v >= 0 and math.isfinite(v), "must be 0 or more")
_positive_int = _number(int, lambda v: v >= 1, "must be at least 1")
_nonnegative_int = _number(int, lambda v: v >= 0, "must be 0 or more")
_ratio = _number(float, lambda v: v > 1, "must be greater than 1")


def _add_model_args(p: argparse.ArgumentParser, edits: bool = True) -> None:
    g = p.add_argument_group("model and ROME settings")
    g.add_argument("--model", metavar="PATH_OR_ID",
                   help="HF model directory or hub id (default: $ROME_JAX_DEFAULT_MODEL or the "
                        "embedded checkpoints/gpt2-cf-tiny)")
    g.add_argument("--layer", type=int, metavar="L",
                   help="edit layer (default: the model's preset; required for models without "
                        "one)")
    g.add_argument("--mom2-n-samples", type=_positive_int, metavar="N",
                   help="key statistics from the first N WikiText texts only (default: all); "
                        "small values make statistics for tiny test models quick")
    if edits:
        g.add_argument("--v-steps", type=_positive_int, metavar="N",
                       help="maximum optimisation steps for v* (default: the preset's, 20)")
        g.add_argument("--template-lengths", type=_template_lengths, metavar="LxN,...",
                       help="context templates: N prefixes of L tokens each (default 5x10,10x10 "
                            "as ROME)")
        g.add_argument("--seed", type=int, default=0,
                       help="jax.random seed for the context templates (default 0)")


def _add_guard_args(p: argparse.ArgumentParser, force: bool = True) -> None:
    g = p.add_argument_group("collapse guard")
    g.add_argument("--no-guard", action="store_true",
                   help="skip the collapse guard (no profile is built, nothing is refused)")
    if force:
        g.add_argument("--force", action="store_true",
                       help="apply edits the guard refuses, and keep edits that collapse "
                            "perplexity (the verdict is still reported)")
    g.add_argument("--guard-samples", type=_positive_int, default=48, metavar="N",
                   help="normal CounterFact edits in the guard profile (default 48; computed "
                        "once, cached beside the key statistics)")
    g.add_argument("--guard-margin", type=_positive_float, metavar="M",
                   help="refuse denominators below the normal 5%% quantile / M (default 3)")
    g.add_argument("--guard-k", type=_positive_float, metavar="K",
                   help="refuse |Δ| above median·exp(K·1.4826·MAD) of normal log|Δ| "
                        "(default 2)")
    g.add_argument("--max-ppl-ratio", type=_ratio, default=10.0, metavar="X",
                   help=f"roll back an edit that multiplies {PPL_CORPUS} perplexity by more "
                        "than X (default 10)")


def _add_record_args(p: argparse.ArgumentParser, verb: str) -> None:
    """--n, --start, --case-ids: which CounterFact records (see ``_counterfact_records``)."""
    p.add_argument("--n", type=_positive_int, required=True, help=f"records to {verb}")
    p.add_argument("--start", type=int, default=0, metavar="K",
                   help="skip the first K CounterFact records (sorted by case id)")
    p.add_argument("--case-ids", metavar="FILE.json",
                   help=f"{verb} only these case ids (a JSON list, e.g. the default model's "
                        "training_case_ids.json); --start and --n then count within them")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, description=__doc__.split("\n\n")[0],
                     epilog="Run 'rome-jax COMMAND --help' for a command's options.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True,
                                parser_class=_Parser)

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
    g.add_argument("--method", choices=("rome", "c-rome", "r-rome", "p-rome"), default="c-rome",
                   help="update: rome (original mixed keys), c-rome / r-rome (consistent k̄, "
                        "default), p-rome (plain keys)")
    g.add_argument("--test-prefix", action="store_true",
                   help="when the subject opens the prompt, also measure P(target) with the "
                        "first context-template prefix in front (the test-time fix)")
    _add_model_args(p)
    _add_guard_args(p)
    g = p.add_argument_group("output")
    g.add_argument("--out", metavar="DIR", help="write the edited model as an HF directory")
    g.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    g.add_argument("--report", metavar="FILE.json", help="write the report as JSON")
    g.add_argument("--json", action="store_true", help="print the report as JSON on stdout")
    p.set_defaults(func=cmd_edit)

    p = sub.add_parser("demo", help="CounterFact edits with rome and c-rome, before and after",
                       description="Edit a few CounterFact facts (at least one whose subject is "
                                   "the first token of its prompt) with rome and c-rome, each "
                                   "from the base model, and show greedy completions, "
                                   "P(target), ME-PPL_50 perplexity, the update's diagnostics "
                                   "and the guard's verdict.")
    p.add_argument("--n", type=_positive_int, default=3,
                   help="records to edit (default 3: two first-token subjects, one other)")
    p.add_argument("--case-ids", metavar="ID,...",
                   help="edit these CounterFact case ids instead")
    p.add_argument("--methods", default="rome,c-rome",
                   help="comma-separated methods (default rome,c-rome)")
    p.add_argument("--tokens", type=_positive_int, default=12,
                   help="new tokens per greedy completion (default 12)")
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    _add_model_args(p)
    _add_guard_args(p, force=False)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("stats", help="build or inspect the cached key statistics",
                       description="Build (or load from the cache) the key statistics "
                                   "C = E[k kᵀ] at the edit layer and show the token count, "
                                   "corpus, cache path and eigenvalue range; with --guard also "
                                   "the collapse guard's profile.")
    _add_model_args(p, edits=False)
    p.add_argument("--rebuild", action="store_true", help="recompute even if cached")
    p.add_argument("--guard", action="store_true",
                   help="also build (or load) the guard profile (uses the edit settings)")
    p.add_argument("--guard-samples", type=_positive_int, default=48, metavar="N",
                   help="normal edits in the guard profile (default 48)")
    p.add_argument("--v-steps", type=_positive_int, metavar="N", help=argparse.SUPPRESS)
    p.add_argument("--template-lengths", type=_template_lengths, help=argparse.SUPPRESS)
    p.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--json", action="store_true", help="print as JSON")
    p.set_defaults(func=cmd_stats)

    p = sub.add_parser("screen", help="find the CounterFact edits that collapse the model",
                       description="Single edits (rome by default) of N CounterFact records, "
                                   "each from the base model; ME-PPL_50 perplexity after each. "
                                   "A record collapses when perplexity exceeds THRESHOLD times "
                                   "the unedited model's. Writes {collapse, normal, records} "
                                   "JSON; re-running with the same --out resumes.")
    _add_record_args(p, "screen")
    p.add_argument("--threshold", type=_ratio, default=10.0, metavar="X",
                   help="collapse: perplexity > X times the base model's (default 10)")
    p.add_argument("--method", choices=("rome", "c-rome", "r-rome", "p-rome"), default="rome")
    p.add_argument("--out", required=True, metavar="FILE.json", help="results (resumable)")
    p.add_argument("--guard", action="store_true",
                   help="also record the guard's prediction for every edit (builds the "
                        "profile) and its confusion counts")
    p.add_argument("--guard-samples", type=_positive_int, default=48, metavar="N")
    p.add_argument("--guard-margin", type=_positive_float, metavar="M")
    p.add_argument("--guard-k", type=_positive_float, metavar="K")
    p.add_argument("--save-every", type=_positive_int, default=10, metavar="N",
                   help="write the file after every N records (and at the end; default 10)")
    _add_model_args(p)
    p.set_defaults(func=cmd_screen)

    p = sub.add_parser("evaluate", help="CounterFact metrics (ES, PS, NS, S) of edit methods",
                       description="Edit N CounterFact records, each from the base model, with "
                                   "each method, and report ROME's CounterFact metrics (efficacy "
                                   "ES/EM, paraphrase PS/PM, neighbourhood NS/NM, their harmonic "
                                   "mean S), the ME-PPL_50 perplexity ratio, the median |Δ| and "
                                   "optionally generation entropy, for all records, first-token "
                                   "subjects and the others.")
    _add_record_args(p, "evaluate")
    p.add_argument("--methods", default="rome,c-rome,p-rome",
                   help="comma-separated methods (default rome,c-rome,p-rome)")
    p.add_argument("--test-prefix", action="store_true",
                   help="score the rewrite prompt of records whose subject opens it with a "
                        "random prefix in front (sampled apart from the edit's templates)")
    p.add_argument("--generation-prompts", type=_nonnegative_int, default=0, metavar="G",
                   help="also measure generation entropy on G generation prompts per record "
                        "(default 0: off)")
    p.add_argument("--generation-tokens", type=_positive_int, default=50, metavar="T",
                   help="new tokens per generation (default 50)")
    p.add_argument("--out", metavar="FILE.json", help="write every record's scores and the "
                                                      "summary as JSON")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    _add_model_args(p)
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("trace", help="causal tracing heatmap (ROME §2.1)",
                       description="Corrupt the subject's token embeddings with Gaussian noise "
                                   "(NOISE × the embedding std), restore each clean state "
                                   "(hidden, MLP or attention, per layer and token) and measure "
                                   "the recovered probability of the target.")
    p.add_argument("--prompt", required=True, help="prompt with {} for the subject")
    p.add_argument("--subject", required=True)
    p.add_argument("--target", help="target word (default: the clean model's greedy token)")
    p.add_argument("--kind", default="hidden,mlp,attn",
                   help="comma-separated states to restore: hidden, mlp, attn (default all)")
    p.add_argument("--samples", type=_positive_int, default=10,
                   help="noise samples (default 10)")
    p.add_argument("--noise", type=_nonnegative_float, default=3.0,
                   help="noise = NOISE × embedding std (default 3)")
    p.add_argument("--window", type=_positive_int, default=10,
                   help="layers restored around each layer for mlp/attn (default 10)")
    p.add_argument("--std-subjects", type=int, default=500, metavar="N",
                   help="embedding std over the tokens of N CounterFact subjects drawn with "
                        "the seed (default 500; 0: over random token ids)")
    p.add_argument("--seed", type=int, default=0, help="jax.random seed (default 0)")
    p.add_argument("--model", metavar="PATH_OR_ID", help="model (default: the embedded one)")
    p.add_argument("--out", metavar="FILE.png",
                   help="heatmap PNG (its grid is written beside it as .json unless --report)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.add_argument("--report", metavar="FILE.json", help="write the grid as JSON")
    p.add_argument("--json", action="store_true", help="print the grid as JSON")
    p.set_defaults(func=cmd_trace)
    return parser


# ----------------------------------------------------------------------------- shared setup


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
                raise ValueError(f"{path}: request {i}: {err}") from None
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


class Setup:
    """The model, ROME settings and what edits share, built lazily from the arguments."""

    def __init__(self, args):
        from rome_jax.hf import load_model
        from rome_jax.rome.hparams import RomeHParams, preset_for

        self.args = args
        self.model = load_model(args.model)
        config = self.model.config
        if args.layer is None:
            hparams = preset_for(config)
        else:
            try:
                hparams = preset_for(config).replace(layer=args.layer)
            except ValueError:
                hparams = RomeHParams(layer=args.layer)
        changes = {"mom2_n_samples": args.mom2_n_samples,
                   "v_num_grad_steps": getattr(args, "v_steps", None),
                   "context_template_length_params": getattr(args, "template_lengths", None)}
        self.hparams = hparams.replace(**{k: v for k, v in changes.items() if v is not None})
        self.hparams.check(config)

    @functools.cached_property
    def context(self):
        import jax

        from rome_jax.rome.edit import prepare

        return prepare(self.model, self.hparams, jax.random.key(getattr(self.args, "seed", 0)),
                       log=_log)

    @functools.cached_property
    def probe(self):
        from rome_jax.data import load_me_ppl
        from rome_jax.guard import PerplexityProbe

        return PerplexityProbe(self.model, load_me_ppl(PPL_CORPUS), self.hparams.layer)

    def profile(self, build: bool = True):
        """The guard profile (loaded, or built and cached), with the threshold arguments."""
        from tqdm import tqdm

        from rome_jax.guard import (build_profile, load_profile, profile_path,
                                    profile_settings, write_json_atomic)

        n = self.args.guard_samples
        path = profile_path(self.model, self.hparams, n)
        profile = load_profile(path, profile_settings(self.hparams, n))
        if profile is None:
            if not build:
                return None
            context, probe = self.context, self.probe
            _log(f"{PROG}: building the collapse-guard profile ({n} rome edits of CounterFact "
                 f"records whose subject is not the first token) -> {path}")
            profile = build_profile(
                self.model, self.hparams, context, n, probe=probe,
                max_ppl_ratio=getattr(self.args, "max_ppl_ratio", None) or 10.0,
                progress=lambda total: tqdm(total=total, desc="guard profile", leave=False))
            write_json_atomic(path, profile.to_dict())
        return profile.with_thresholds(margin=getattr(self.args, "guard_margin", None),
                                       mad_k=getattr(self.args, "guard_k", None),
                                       max_ppl_ratio=getattr(self.args, "max_ppl_ratio", None))

    def check_request(self, request) -> None:
        """ValueError now (before any long computation) for a subject that does not tokenise
        inside its prompt."""
        from rome_jax.rome.request import subject_token_index

        subject_token_index(self.model.tokenizer, request.prompt, request.subject,
                            self.hparams.fact_token)

    def check_fits(self, request) -> None:
        """ValueError when the request with its templates and target is too long."""
        from rome_jax.rome.edit import build_batch

        build_batch(self.model, request, self.context.templates, self.hparams.fact_token)


def _probabilities(model, params, text: str, request) -> tuple[float, float | None]:
    from rome_jax.evaluation import target_probabilities

    return target_probabilities(model, text, request.target_new, request.target_true, params)


def _hparams_dict(hparams) -> dict:
    out = dataclasses.asdict(hparams)
    out["context_template_length_params"] = [list(x) for x in
                                             out["context_template_length_params"]]
    return out


def _merge_verdicts(entries: list[dict]) -> dict | None:
    verdicts = [(i, e["guard"]) for i, e in enumerate(entries) if e.get("guard") is not None]
    if not verdicts:
        return None
    bad = [(i, v) for i, v in verdicts if not v["ok"]]
    prefix = (lambda i: f"edit {i}: ") if len(entries) > 1 else (lambda i: "")
    return {"ok": not bad, "reasons": [prefix(i) + r for i, v in bad for r in v["reasons"]],
            "suggestion": bad[0][1]["suggestion"] if bad else ""}


# ----------------------------------------------------------------------------- edit


def _one_edit(s: Setup, request, params, method: str, profile, ppl_before: float,
              test_prefix: bool) -> tuple[dict, Any]:
    """Compute, judge, apply and measure one edit. Returns (entry, new params or None)."""
    from rome_jax.guard import Verdict, evaluate
    from rome_jax.rome.edit import compute_edit, with_test_prefix
    from rome_jax.rome.update import apply_edit

    force = s.args.force
    model = s.model
    p_new, p_true = _probabilities(model, params, request.text, request)
    try:
        update, report = compute_edit(model, request, s.hparams, method, context=s.context,
                                      params=params)
    except ValueError as err:  # the request was checked: only a non-finite update is left
        entry = {"method": method, "layer": s.hparams.layer, "request": request.to_dict(),
                 "p_new_before": p_new, "p_true_before": p_true, "applied": False,
                 "guard": Verdict(False, [_one_line(err)], "use --method c-rome").to_dict()}
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
    entry["p_new_after"], entry["p_true_after"] = _probabilities(model, new_params, request.text,
                                                                 request)
    entry["perplexity_after"] = s.probe(new_params)
    if test_prefix:
        entry["test_prefix"] = None
        if request.subject_first:
            prefixes = s.context.templates.prefixes
            if not prefixes:
                raise ValueError("--test-prefix: needs context templates (--template-lengths)")
            text = with_test_prefix(request.text, request.subject, prefixes[0])
            before = _probabilities(model, params, text, request)
            after = _probabilities(model, new_params, text, request)
            entry["test_prefix"] = {"prefix": prefixes[0], "prompt": text,
                                    "p_new_before": before[0], "p_true_before": before[1],
                                    "p_new_after": after[0], "p_true_after": after[1]}
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


def _fmt(x, spec: str = ".4g") -> str:
    return "-" if x is None else format(x, spec)


def _print_edit_report(report: dict) -> None:
    print(f"{PROG} edit: {report['method']} at layer {report['layer']} of {report['model']} "
          f"({report['mode']}, {len(report['edits'])} request"
          f"{'s' if len(report['edits']) != 1 else ''})")
    for i, e in enumerate(report["edits"]):
        r = e["request"]
        print(f"\n[{i}] {r['prompt'].format(r['subject'])!r} -> {r['target_new']!r}"
              + (f" (was {r['target_true']!r})" if r.get("target_true") else "")
              + (f", case {r['case_id']}" if r.get("case_id") is not None else ""))
        rows = [("numerator ‖r‖·‖u‖", _fmt(e.get("numerator_norm"))),
                ("denominator", _fmt(e.get("denominator"))),
                ("‖Δ‖_F", _fmt(e.get("delta_norm"))),
                ("|Δ| (‖Δ‖_F / F·D)", _fmt(e.get("delta_abs"), ".3e"))]
        losses = e.get("v_losses") or []
        if losses:
            rows.append(("v* loss", f"{losses[0]:.4g} -> {losses[-1]:.4g} "
                                    f"({len(losses)} steps)"))
        rows.append(("P(new)", f"{_fmt(e.get('p_new_before'))} -> {_fmt(e.get('p_new_after'))}"))
        if e.get("p_true_before") is not None:
            rows.append(("P(true)", f"{_fmt(e.get('p_true_before'))} -> "
                                    f"{_fmt(e.get('p_true_after'))}"))
        tp = e.get("test_prefix")
        if tp:
            rows.append(("P(new) with prefix", f"{_fmt(tp['p_new_before'])} -> "
                                               f"{_fmt(tp['p_new_after'])}  {tp['prompt']!r}"))
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


def cmd_edit(args) -> int:
    from rome_jax.guard import write_json_atomic

    requests = _read_requests(args)
    method = args.method
    if args.out and args.mode == "independent" and len(requests) > 1:
        raise ValueError("--out: independent edits give one model per request; use --mode "
                         "sequential to write one model with all of them")
    if args.out and Path(args.out).exists() and not args.overwrite:
        raise FileExistsError(f"{args.out}: already exists (pass --overwrite to replace it)")
    s = Setup(args)
    for i, request in enumerate(requests):
        try:
            s.check_request(request)
        except ValueError as err:
            where = f"request {i}: " if len(requests) > 1 else ""
            raise ValueError(f"{where}{err}") from None
    for request in requests:
        s.check_fits(request)
    profile = None if args.no_guard else s.profile()
    base = s.probe.base
    params, ppl = s.model.params, base
    entries, status = [], "applied"
    for request in requests:
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
        "command": "edit", "model": str(args.model or s.model.name), "method": method,
        "layer": s.hparams.layer, "mode": args.mode if len(requests) > 1 else "single",
        "perplexity_corpus": PPL_CORPUS, "perplexity_before": base,
        "perplexity_after": ppl if args.mode == "sequential" and status == "applied" else None,
        "status": status, "guard": _merge_verdicts(entries),
        "guard_profile": None if profile is None else profile.summary(),
        "hparams": _hparams_dict(s.hparams), "edits": entries, "out": None}
    if args.out and status == "applied":
        from rome_jax.hf import save_hf

        report["out"] = str(Path(args.out))
        save_hf(s.model.with_params(params), args.out, overwrite=args.overwrite,
                extra_files={"rome_edit.json": json.dumps(report, indent=1)})
    if args.report:
        write_json_atomic(args.report, report)
    if args.json:
        print(json.dumps(report, indent=1))
    else:
        _print_edit_report(report)
    if status != "applied":
        verdict = report["guard"] or {"reasons": [], "suggestion": ""}
        what = "refused" if status == "refused" else "rolled back"
        reasons = "; ".join(verdict["reasons"]) or "non-finite update"
        hint = f" Suggestion: {verdict['suggestion']}." if verdict["suggestion"] else ""
        _log(f"{PROG}: edit {what}: {reasons}.{hint}"
             + (" Nothing was written." if args.out else ""))
        return EXIT_REFUSED
    return 0


# ----------------------------------------------------------------------------- demo


def _demo_records(s: Setup, args) -> list[dict]:
    from rome_jax.data import load_counterfact
    from rome_jax.training import first_token_subject
    from rome_jax.rome.request import EditRequest

    records = load_counterfact()
    tok = s.model.tokenizer
    if args.case_ids:
        try:
            wanted = [int(x) for x in args.case_ids.split(",") if x.strip()]
        except ValueError:
            raise ValueError(f"--case-ids: {args.case_ids!r} is not a comma-separated list of "
                             "integers") from None
        by_id = {r["case_id"]: r for r in records}
        missing = [i for i in wanted if i not in by_id]
        if missing or not wanted:
            raise ValueError(f"--case-ids: no CounterFact record with case id "
                             f"{missing[0] if missing else '(none given)'}")
        chosen = [by_id[i] for i in wanted]
        for r in chosen:
            s.check_fits(EditRequest.from_dict(r))
        return chosen
    known = None
    ids_file = Path(s.model.name) / "training_case_ids.json" if s.model.name else None
    if ids_file is not None and ids_file.is_file():
        known = set(json.loads(ids_file.read_text()))
    n_first = max(1, args.n - args.n // 3)
    first, other = [], []
    for r in records:
        if known is not None and r["case_id"] not in known:
            continue
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
    return first + other


def cmd_demo(args) -> int:
    from rome_jax.guard import evaluate
    from rome_jax.training import first_token_subject
    from rome_jax.models.generate import generate
    from rome_jax.rome.edit import compute_edit
    from rome_jax.rome.request import EditRequest
    from rome_jax.rome.update import apply_edit, canonical_method

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    for m in methods:
        canonical_method(m)
    if not methods:
        raise ValueError("--methods: give at least one method")
    s = Setup(args)
    records = _demo_records(s, args)
    requests = [EditRequest.from_dict(r) for r in records]
    texts = [r.text for r in requests]
    model = s.model
    profile = None if args.no_guard else s.profile()
    base_ppl = s.probe.base
    before = generate(model, texts, args.tokens)
    results = []
    for i, (record, request) in enumerate(zip(records, requests)):
        p_new, p_true = _probabilities(model, model.params, request.text, request)
        row = {"case_id": record["case_id"], "request": request.to_dict(),
               "first_token_subject": first_token_subject(record, model.tokenizer),
               "completion_before": before[i], "p_new_before": p_new, "p_true_before": p_true,
               "edits": []}
        for method in methods:
            try:
                update, report = compute_edit(model, request, s.hparams, method,
                                              context=s.context)
            except ValueError as err:
                row["edits"].append({"method": method, "error": _one_line(err)})
                continue
            params = apply_edit(model.params, update)
            entry = report.to_dict()
            entry.pop("request")
            entry["p_new_after"], entry["p_true_after"] = _probabilities(
                model, params, request.text, request)
            entry["perplexity_before"] = base_ppl
            entry["perplexity_after"] = s.probe(params)
            entry["completion_after"] = generate(model, texts, args.tokens, params=params)[i]
            entry["guard"] = (None if profile is None else
                              evaluate({**entry, "request": request.to_dict()},
                                       profile).to_dict())
            row["edits"].append(entry)
        results.append(row)
    out = {"command": "demo", "model": str(args.model or model.name), "layer": s.hparams.layer,
           "perplexity_corpus": PPL_CORPUS, "perplexity_before": base_ppl,
           "guard_profile": None if profile is None else profile.summary(), "records": results}
    if args.json:
        print(json.dumps(out, indent=1))
        return 0
    print(f"{PROG} demo: {out['model']}, layer {s.hparams.layer}, {PPL_CORPUS} perplexity "
          f"{base_ppl:.4g}")
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
            else:
                print(f"  {e['method']:<8} | ...{e['completion_after']!r}")
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
                  f"{_fmt(row['p_new_before'], '.3g'):>9} -> {_fmt(e['p_new_after'], '.3g'):<9} "
                  f"{_fmt(e['p_true_after'], '.3g'):>13} {e['perplexity_after']:>15.4g} "
                  f"{ratio:>8.3g} {e['denominator']:>11.4g} {e['delta_abs']:>9.2e}  {verdict}")
    if profile is not None:
        p = profile.summary()
        print(f"\nguard: refuses denominator < {p['denominator_floor']:.4g} or |Δ| > "
              f"{p['delta_abs_ceiling']:.3e} (from {p['n']} normal edits); rolls back "
              f"perplexity x > {p['max_ppl_ratio']:g}")
    return 0


# ----------------------------------------------------------------------------- stats


def cmd_stats(args) -> int:
    import numpy as np

    from rome_jax.rome.stats import cache_path, fingerprint, key_stats

    s = Setup(args)
    hp = s.hparams
    path = cache_path(s.model, hp.layer, hp.mom2_corpus, hp.mom2_n_samples)
    cached = path.exists() and not args.rebuild
    if args.rebuild and path.exists():
        shutil.rmtree(path)
    if not cached:
        _log(f"{PROG}: computing key statistics at layer {hp.layer} -> {path}")
    stats = key_stats(s.model, hp.layer, hp.mom2_corpus, n_samples=hp.mom2_n_samples, log=_log)
    eig = np.linalg.eigvalsh(stats.moment)
    info = {"path": str(path), "cached": cached, "layer": stats.layer, "corpus": stats.corpus,
            "n_samples": hp.mom2_n_samples, "tokens": stats.count,
            "dim": int(stats.moment.shape[0]),
            "fingerprint": fingerprint(s.model.params, hp.layer),
            "eigenvalue_min": float(eig[0]), "eigenvalue_max": float(eig[-1]),
            "condition_number": float(eig[-1] / eig[0]) if eig[0] > 0 else math.inf,
            "positive_definite": bool(eig[0] > 0), "guard_profile": None}
    if args.guard:
        from rome_jax.guard import profile_path

        info["guard_profile"] = {**s.profile().summary(), "path": str(
            profile_path(s.model, hp, args.guard_samples))}
    else:
        found = sorted(path.parent.glob(f"{path.name}.guard-n*.json"))
        if found:
            from rome_jax.guard import load_profile

            profile = load_profile(found[-1])
            if profile is not None:
                info["guard_profile"] = {**profile.summary(), "path": str(found[-1])}
    if args.json:
        print(json.dumps(info, indent=1))
        return 0
    print(f"{PROG} stats: {args.model or s.model.name}, layer {info['layer']}")
    rows = [("cache", f"{info['path']} ({'loaded' if cached else 'built'})"),
            ("corpus", f"{info['corpus']} ({info['n_samples'] or 'all'} texts)"),
            ("tokens", f"{info['tokens']:,}"), ("size", f"{info['dim']} x {info['dim']}"),
            ("eigenvalues", f"{info['eigenvalue_min']:.4g} .. {info['eigenvalue_max']:.4g}"),
            ("condition number", f"{info['condition_number']:.4g}"),
            ("fingerprint", info["fingerprint"])]
    g = info["guard_profile"]
    if g:
        rows.append(("guard profile", f"{g['n']} normal edits: denominator floor "
                                      f"{g['denominator_floor']:.4g}, |Δ| ceiling "
                                      f"{g['delta_abs_ceiling']:.3e} ({g['path']})"))
    for name, value in rows:
        print(f"  {name:<17} {value}")
    if not info["positive_definite"]:
        print("  warning: C is not positive definite; use more samples (--mom2-n-samples)")
    return 0


# ----------------------------------------------------------------------------- screen


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


def _counterfact_records(args) -> list[dict]:
    """CounterFact records ``--start`` .. ``--start + --n``, within ``--case-ids`` when given."""
    from rome_jax.data import load_counterfact

    if args.start < 0:
        raise ValueError("--start: must be 0 or more")
    records = load_counterfact()
    if args.case_ids:
        try:
            wanted = set(json.loads(Path(args.case_ids).read_text()))
        except (OSError, ValueError, TypeError) as err:
            raise ValueError(f"--case-ids: {args.case_ids}: not a JSON list of case ids "
                             f"({_one_line(err)})") from None
        records = [r for r in records if r["case_id"] in wanted]
    chosen = records[args.start:args.start + args.n]
    if not chosen:
        raise ValueError(f"--start {args.start}: past the end of the {len(records)} records")
    return chosen


def cmd_screen(args) -> int:
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
            raise ValueError(f"{out}: exists but is not a screening file ({_one_line(err)}); "
                             "use another --out") from None
    records = _counterfact_records(args)
    s = Setup(args)
    args.max_ppl_ratio = args.threshold  # the guard profile keeps edits below the threshold
    settings = {"model": str(args.model or s.model.name), "digest": _model_digest(s.model.params),
                "layer": s.hparams.layer, "method": args.method,
                "hparams": _hparams_dict(s.hparams), "seed": args.seed,
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
        _log(f"{PROG}: resuming {out}: {len(seen)} records done, {len(todo)} to go")
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
                row["error"] = _one_line(err)
            else:
                try:
                    update, report = compute_edit(s.model, request, s.hparams, args.method,
                                                  context=context)
                except ValueError as err:  # non-finite update: the model would be destroyed
                    row.update(perplexity=math.inf, ratio=math.inf, collapse=True,
                               note=_one_line(err))
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


# ----------------------------------------------------------------------------- evaluate


def cmd_evaluate(args) -> int:
    from tqdm import tqdm

    from rome_jax.counterfact_eval import EvalSettings, evaluate_record, summarize, test_prefixes
    from rome_jax.guard import write_json_atomic
    from rome_jax.rome.request import EditRequest

    settings = EvalSettings(
        methods=tuple(m.strip() for m in args.methods.split(",") if m.strip()),
        test_prefix=args.test_prefix, generation_prompts=args.generation_prompts,
        generation_tokens=args.generation_tokens, seed=args.seed)
    records = _counterfact_records(args)
    s = Setup(args)
    fitting = []
    for record in records:
        try:
            s.check_fits(EditRequest.from_dict(record))
            fitting.append(record)
        except ValueError as err:
            _log(f"{PROG}: skipping case {record['case_id']}: {_one_line(err)}")
    prefixes = test_prefixes(s.model, args.seed) if settings.test_prefix else ()
    rows = [evaluate_record(s.model, record, s.hparams, s.context, s.probe, settings, prefixes)
            for record in tqdm(fitting, desc="evaluate", unit="record")]
    groups = {"all": lambda r: True, "first-token subjects": lambda r: r["first_token_subject"],
              "other subjects": lambda r: not r["first_token_subject"]}
    summary = {name: summarize(rows, settings.methods, keep) for name, keep in groups.items()
               if any(keep(r) for r in rows)}
    out = {"command": "evaluate", "model": str(args.model or s.model.name),
           "layer": s.hparams.layer, "hparams": _hparams_dict(s.hparams),
           "settings": dataclasses.asdict(settings), "test_prefixes": list(prefixes),
           "perplexity_corpus": PPL_CORPUS, "perplexity_before": s.probe.base,
           "summary": summary, "records": rows}
    if args.out:
        write_json_atomic(Path(args.out), out)
    if args.json:
        print(json.dumps({k: v for k, v in out.items() if k != "records"}, indent=1))
        return 0
    print(f"{PROG} evaluate: {out['model']}, layer {s.hparams.layer}, {len(rows)} records, "
          f"{PPL_CORPUS} perplexity {s.probe.base:.4g}"
          + (", rewrite prompts of subject-first records with a test prefix"
             if settings.test_prefix else ""))
    ge = settings.generation_prompts > 0
    header = (f"{'records':<21} {'method':<7} {'n':>4} {'ES':>6} {'PS':>6} {'NS':>6} {'S':>6} "
              f"{'EM':>7} {'PM':>7} {'NM':>7} {'ppl x med':>9} {'ppl x max':>9} {'|Δ| med':>9}"
              + (f" {'GE':>6}" if ge else ""))
    print(header + "\n" + "-" * len(header))
    for name, by_method in summary.items():
        for method, m in by_method.items():
            print(f"{name:<21} {method:<7} {m['n']:>4} {m['ES']:>6.3f} {m['PS']:>6.3f} "
                  f"{m['NS']:>6.3f} {m['S']:>6.3f} {m['EM']:>7.3f} {m['PM']:>7.3f} "
                  f"{m['NM']:>7.3f} {m['ppl_ratio_median']:>9.3g} {m['ppl_ratio_max']:>9.3g} "
                  f"{_fmt(m.get('delta_abs_median'), '.2e'):>9}"
                  + (f" {m['GE']:>6.3f}" if ge else "")
                  + (f"  ({m['failed']} failed)" if m["failed"] else ""))
    return 0


# ----------------------------------------------------------------------------- trace


def cmd_trace(args) -> int:
    import jax
    import numpy as np

    from rome_jax.guard import write_json_atomic
    from rome_jax.hf import load_model
    from rome_jax.trace import KINDS, plot_trace, trace

    kinds = [k.strip() for k in args.kind.split(",") if k.strip()]
    bad = [k for k in kinds if k not in KINDS]
    if bad or not kinds:
        raise ValueError(f"--kind: {bad[0] if bad else args.kind!r} is not one of "
                         f"{', '.join(KINDS)}")
    if "{}" not in args.prompt:
        hint = (f"; write {args.prompt.replace(args.subject, '{}', 1)!r}"
                if args.subject and args.subject in args.prompt else "")
        raise ValueError(f"--prompt: must contain {{}} where the subject goes{hint}")
    if args.out and Path(args.out).exists() and not args.overwrite:
        raise FileExistsError(f"{args.out}: already exists (pass --overwrite to replace it)")
    if args.std_subjects < 0:
        raise ValueError("--std-subjects: must be 0 or more")
    model = load_model(args.model)
    key_subjects, key_trace = jax.random.split(jax.random.key(args.seed))
    subjects = None
    if args.std_subjects:
        from rome_jax.data import load_counterfact

        records = load_counterfact()
        pick = np.asarray(jax.random.choice(key_subjects, len(records),
                                            (min(args.std_subjects, len(records)),),
                                            replace=False))
        subjects = [records[int(i)]["requested_rewrite"]["subject"] for i in pick]
    result = trace(model, args.prompt, args.subject, args.target, key=key_trace,
                   samples=args.samples, noise_scale=args.noise, std_subjects=subjects,
                   kinds=kinds, window=args.window)
    grid = {"command": "trace", "model": str(args.model or model.name), **result.to_dict()}
    report = args.report or (str(Path(args.out).with_suffix(".json")) if args.out else None)
    if args.out:
        plot_trace(result, args.out)
    if report:
        write_json_atomic(report, grid)
    if args.json:
        print(json.dumps(grid, indent=1))
        return 0
    print(f"{PROG} trace: {args.prompt.format(args.subject)!r} -> {result.target!r}: clean "
          f"p={result.high_score:.4g}, corrupted p={result.low_score:.4g} (noise "
          f"{args.noise:g} x std {result.noise_std:.4g}, {args.samples} samples)")
    for kind, scores in result.scores.items():
        layer = np.unravel_index(int(np.argmax(scores)), scores.shape)
        print(f"  restore {kind:<6}: best p={scores.max():.4g} at token "
              f"{result.tokens[layer[0]]!r} (#{layer[0]}), layer {layer[1]}")
    for path in (args.out, report):
        if path:
            print(f"wrote {path}")
    return 0


# ----------------------------------------------------------------------------- main


def _compilation_cache() -> None:
    """Keep XLA compilations between runs (most of a small edit's time is compiling): in
    ``$JAX_COMPILATION_CACHE_DIR`` when set, else ``$ROME_JAX_CACHE/jax`` (default
    ``~/.cache/rome_jax/jax``); ``ROME_JAX_COMPILATION_CACHE=0`` turns it off."""
    import os

    if os.environ.get("ROME_JAX_COMPILATION_CACHE", "1") == "0" or os.environ.get(
            "JAX_COMPILATION_CACHE_DIR"):
        return
    import jax

    root = Path(os.environ.get("ROME_JAX_CACHE", Path.home() / ".cache" / "rome_jax"))
    try:
        jax.config.update("jax_compilation_cache_dir", str(root / "jax"))
        if "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS" not in os.environ:
            jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)
    except Exception:  # an older jax without these options: no cache, nothing else changes
        pass


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``rome-jax``; returns the exit status."""
    for stream in (sys.stdout, sys.stderr):  # never a UnicodeEncodeError for ‖Δ‖ on odd locales
        try:
            stream.reconfigure(errors="backslashreplace")
        except (AttributeError, ValueError):
            pass
    parser = build_parser()
    args = parser.parse_args(argv)
    _compilation_cache()
    try:
        return args.func(args) or 0
    except BrokenPipeError:  # `rome-jax ... | head`: stop quietly
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except (ValueError, OSError) as err:  # FileNotFoundError, FileExistsError, JSON errors...
        print(f"{PROG}: error: {_one_line(err)}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
