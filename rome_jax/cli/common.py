"""What the ``rome-jax`` commands share: the one-line error parser, argument types and groups,
the lazily built :class:`Setup` (model, ROME settings, context, probe, guard profile), and
small output helpers."""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import sys
from pathlib import Path
from typing import Any

PROG = "rome-jax"
EXIT_USAGE = 2
EXIT_REFUSED = 3
PPL_CORPUS = "ME-PPL_50"



class Parser(argparse.ArgumentParser):
    """argparse with one-line errors: ``rome-jax: error: <sub>: <message>``, exit status 2."""

    def error(self, message: str):
        where = self.prog.removeprefix(PROG).strip()
        text = f"{where}: {message}" if where else message
        self.exit(EXIT_USAGE, f"{PROG}: error: {one_line(text)} (see {self.prog} --help)\n")


def one_line(text: Any) -> str:
    return " ".join(str(text).split())


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- arguments


def template_lengths(text: str) -> tuple[tuple[int, int], ...]:
    try:
        pairs = tuple(tuple(int(x) for x in part.lower().split("x")) for part in
                      text.split(","))
        if not pairs or any(len(p) != 2 or p[0] < 1 or p[1] < 0 for p in pairs):
            raise ValueError
        return pairs
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not LENGTHxCOUNT[,LENGTHxCOUNT...] (e.g. 5x10,10x10)") from None


def number(parse, accept, requirement: str):
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


positive_float = number(float, lambda v: v > 0 and math.isfinite(v), "must be a positive number")
nonnegative_float = number(float, lambda v: v >= 0 and math.isfinite(v), "must be 0 or more")
positive_int = number(int, lambda v: v >= 1, "must be at least 1")
nonnegative_int = number(int, lambda v: v >= 0, "must be 0 or more")
ratio_above_one = number(float, lambda v: v > 1, "must be greater than 1")


def add_model_args(p: argparse.ArgumentParser, edits: bool = True) -> None:
    g = p.add_argument_group("model and ROME settings")
    g.add_argument("--model", metavar="PATH_OR_ID",
                   help="HF model directory or hub id (default: $ROME_JAX_DEFAULT_MODEL or the "
                        "embedded checkpoints/gpt2-cf-tiny)")
    g.add_argument("--layer", type=int, metavar="L",
                   help="edit layer (default: the model's preset; required for models without "
                        "one)")
    g.add_argument("--mom2-n-samples", type=positive_int, metavar="N",
                   help="key statistics from the first N WikiText texts only (default: all); "
                        "small values make statistics for tiny test models quick")
    if edits:
        g.add_argument("--v-steps", type=positive_int, metavar="N",
                       help="maximum optimisation steps for v* (default: the preset's, 20)")
        g.add_argument("--template-lengths", type=template_lengths, metavar="LxN,...",
                       help="context templates: N prefixes of L tokens each (default 5x10,10x10 "
                            "as ROME)")
        g.add_argument("--seed", type=int, default=0,
                       help="jax.random seed for the context templates (default 0)")


def add_guard_args(p: argparse.ArgumentParser, force: bool = True) -> None:
    g = p.add_argument_group("collapse guard")
    g.add_argument("--no-guard", action="store_true",
                   help="skip the collapse guard (no profile is built, nothing is refused)")
    if force:
        g.add_argument("--force", action="store_true",
                       help="apply edits the guard refuses, and keep edits that collapse "
                            "perplexity (the verdict is still reported)")
    g.add_argument("--guard-samples", type=positive_int, default=48, metavar="N",
                   help="normal CounterFact edits in the guard profile (default 48; computed "
                        "once, cached beside the key statistics)")
    g.add_argument("--guard-margin", type=positive_float, metavar="M",
                   help="refuse denominators below the normal 5%% quantile / M (default 3)")
    g.add_argument("--guard-k", type=positive_float, metavar="K",
                   help="refuse |Δ| above median·exp(K·1.4826·MAD) of normal log|Δ| "
                        "(default 2)")
    g.add_argument("--max-ppl-ratio", type=ratio_above_one, default=10.0, metavar="X",
                   help=f"roll back an edit that multiplies {PPL_CORPUS} perplexity by more "
                        "than X (default 10)")


def add_record_args(p: argparse.ArgumentParser, verb: str) -> None:
    """--n, --start, --case-ids: which CounterFact records (see ``counterfact_records``)."""
    p.add_argument("--n", type=positive_int, required=True, help=f"records to {verb}")
    p.add_argument("--start", type=int, default=0, metavar="K",
                   help="skip the first K CounterFact records (sorted by case id)")
    p.add_argument("--case-ids", metavar="FILE.json",
                   help=f"{verb} only these case ids (a JSON list, e.g. the default model's "
                        "training_case_ids.json); --start and --n then count within them")


# ----------------------------------------------------------------------------- shared setup


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
                       log=log)

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
            log(f"{PROG}: building the collapse-guard profile ({n} rome edits of CounterFact "
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


def probabilities(model, params, text: str, request) -> tuple[float, float | None]:
    from rome_jax.evaluation import target_probabilities

    return target_probabilities(model, text, request.target_new, request.target_true, params)


def hparams_dict(hparams) -> dict:
    out = dataclasses.asdict(hparams)
    out["context_template_length_params"] = [list(x) for x in
                                             out["context_template_length_params"]]
    return out


def fmt(x, spec: str = ".4g") -> str:
    return "-" if x is None else format(x, spec)


def counterfact_records(args) -> list[dict]:
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
                             f"({one_line(err)})") from None
        records = [r for r in records if r["case_id"] in wanted]
    chosen = records[args.start:args.start + args.n]
    if not chosen:
        raise ValueError(f"--start {args.start}: past the end of the {len(records)} records")
    return chosen
