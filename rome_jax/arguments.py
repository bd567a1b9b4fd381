"""Argument types, argument files and the one-line log that the command line and the
experiments share (below both: the library never imports the CLI)."""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

PROG = "rome-jax"


def log(message: str) -> None:
    """One line on stderr, at once."""
    print(message, file=sys.stderr, flush=True)


def one_line(text) -> str:
    return " ".join(str(text).split())


def number(parse, accept, requirement: str):
    """An argparse type: ``parse`` the text, then require ``accept(value)``; a float must be
    finite (never NaN or infinity, which pass or fail comparisons silently)."""
    noun = "an integer" if parse is int else "a finite number"

    def convert(text: str):
        try:
            value = parse(text)
            if not math.isfinite(value):
                raise ValueError
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {noun}") from None
        if not accept(value):
            raise argparse.ArgumentTypeError(f"{text!r} {requirement}")
        return value

    return convert


positive_float = number(float, lambda v: v > 0, "must be a positive number")
nonnegative_float = number(float, lambda v: v >= 0, "must be 0 or more")
positive_int = number(int, lambda v: v >= 1, "must be at least 1")
nonnegative_int = number(int, lambda v: v >= 0, "must be 0 or more")
ratio_above_one = number(float, lambda v: v > 1, "must be greater than 1")


def comma_list(text: str, flag: str, parse=str, known=None) -> list:
    """``flag``'s comma-separated items, parsed by ``parse``, duplicates dropped, each one of
    ``known`` when given; ValueError naming ``flag`` for an empty list or an unknown item."""
    try:
        items = list(dict.fromkeys(parse(x.strip()) for x in text.split(",") if x.strip()))
    except ValueError:
        items = []
    if not items:
        raise ValueError(f"{flag}: give a comma-separated list, got {text!r}")
    unknown = [x for x in items if known is not None and x not in known]
    if unknown:
        raise ValueError(f"{flag}: {', '.join(map(str, unknown))} not one of "
                         f"{', '.join(known)}")
    return items


def read_case_ids(path: str) -> list:
    """The JSON list of case ids in ``path`` (``--case-ids``); ValueError naming the flag when
    the file cannot be read or parsed (the ids themselves are checked where they are used)."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError) as err:
        raise ValueError(f"--case-ids {path}: not a JSON list of case ids "
                         f"({one_line(err)})") from None


def batch_hparams(config, method: str, args, layers=None, keys: str = "rome", layer=None):
    """A batch editor's settings (``editors.hparams.resolve``) with the v* flags of ``args``
    (--mom2-samples, --mom2-corpus, --v-steps, --template-lengths, --context-templates;
    absent or None: the preset's); ValueError naming --layers."""
    from rome_jax.editors.hparams import resolve

    flags = {"mom2_n_samples": "mom2_n_samples", "mom2_corpus": "mom2_corpus",
             "v_num_grad_steps": "v_steps",
             "context_template_length_params": "template_lengths",
             "context_templates": "context_templates"}
    try:
        return resolve(config, method, layers, keys, layer,
                       **{field: getattr(args, flag, None) for field, flag in flags.items()})
    except ValueError as err:
        raise ValueError(f"--{err}" if str(err).startswith("layers:") else str(err)) from None
