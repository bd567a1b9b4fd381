"""``rome-jax stats``: build or inspect the cached key statistics (and guard profile)."""

from __future__ import annotations

import argparse
import json
import math

from rome_jax.cli.batch import layer_range
from rome_jax.cli.common import (PROG, Setup, add_model_args, log, one_line, positive_int,
                                template_lengths)


def add_parser(sub) -> None:
    p = sub.add_parser("stats", help="build or inspect the cached key statistics",
                       description="Build (or load from the cache) the key statistics "
                                   "C = E[k kᵀ] at the edit layer (or at --layers, in one "
                                   "pass that a killed build resumes) and show the token count, "
                                   "corpus, cache path and eigenvalue range; with --guard also "
                                   "the collapse guard's profile. Both are cached in the "
                                   "user cache, $ROME_JAX_CACHE/stats (default "
                                   "~/.cache/rome_jax/stats), keyed by a fingerprint of the "
                                   "weights, the layer, the corpus and the sample count.")
    add_model_args(p, edits=False)
    p.add_argument("--layers", type=layer_range, metavar="L1-L2|L1,L2,...",
                   help="build (or load) C at these layers in one pass (e.g. MEMIT's window, "
                        "3-8) instead of at --layer alone (--layer, or the model's preset, "
                        "stays the guard's)")
    p.add_argument("--checkpoint-every", type=checkpoint_interval, default=256, metavar="N",
                   help="save the running sums every N batches (a multiple of 16; default "
                        "256) beside the cache, so a build that is killed resumes there")
    p.add_argument("--rebuild", action="store_true", help="recompute even if cached")
    p.add_argument("--guard", action="store_true",
                   help="also build (or load) the guard profile (uses the edit settings)")
    p.add_argument("--guard-samples", type=positive_int, default=48, metavar="N",
                   help="normal edits in the guard profile (default 48)")
    p.add_argument("--v-steps", type=positive_int, metavar="N", help=argparse.SUPPRESS)
    p.add_argument("--template-lengths", type=template_lengths, help=argparse.SUPPRESS)
    p.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--json", action="store_true", help="print as JSON")
    p.set_defaults(func=run)


def checkpoint_interval(text: str) -> int:
    """``--checkpoint-every``: a positive multiple of the pass's reduction interval."""
    from rome_jax.rome.stats import REDUCE_EVERY

    every = positive_int(text)
    if every % REDUCE_EVERY:
        raise argparse.ArgumentTypeError(f"{every} is not a multiple of {REDUCE_EVERY} (the "
                                         "batches between the pass's reductions)")
    return every


def run(args) -> int:
    from rome_jax.rome.stats import cache_path, find_key_stats, key_stats_layers, resolve_corpus

    s = Setup(args)
    hp = s.hparams
    layers = list(args.layers or [hp.layer])
    for layer in layers:
        try:
            s.model.config.check_layer(layer)
        except ValueError as err:
            raise ValueError(f"--layers: {str(err).removeprefix('layer: ')}") from None
    corpus = resolve_corpus(hp.mom2_corpus, n_samples=hp.mom2_n_samples)
    paths, how = {}, {}
    for layer in layers:
        paths[layer], found, errors = find_key_stats(s.model, layer, corpus)
        for err in errors:
            log(f"{PROG}: {one_line(err)}; rebuilding")
        if args.rebuild:  # into the user cache (a shipped copy is left as it is)
            found, paths[layer] = None, cache_path(s.model, layer, corpus)
            paths[layer].unlink(missing_ok=True)
        how[layer] = "loaded" if found is not None else None
    built = []  # key_stats_layers logs only when it computes (not when another process did)

    def note(message: str) -> None:
        built.append(message)
        log(f"{PROG}: {message}")

    all_stats = key_stats_layers(s.model, layers, corpus, log=note, shipped=not args.rebuild,
                                 checkpoint_every=args.checkpoint_every)
    infos = []
    for layer in layers:
        stats = all_stats[layer]
        how[layer] = how[layer] or ("built" if built else
                                    "loaded what another process built meanwhile")
        infos.append(_info(s, args, corpus, stats, paths[layer], how[layer]))
    if args.json:
        print(json.dumps(infos[0] if args.layers is None else {"layers": infos}, indent=1))
        return 0
    for info in infos:
        _print(args, s, info, corpus)
    return 0


def _info(s, args, corpus, stats, path, how: str) -> dict:
    """The JSON-ready summary of ``stats`` (and, at the edit layer, of the guard profile)."""
    import numpy as np

    from rome_jax.rome.stats import fingerprint

    hp, layer = s.hparams, stats.layer
    eig = np.linalg.eigvalsh(np.asarray(stats.moment, np.float64))
    info = {"path": str(path), "cached": how != "built", "how": how, "layer": stats.layer,
            "corpus": stats.corpus, "corpus_digest": corpus.digest,
            "n_samples": hp.mom2_n_samples, "texts": stats.n_texts, "tokens": stats.count,
            "dim": int(stats.moment.shape[0]),
            "fingerprint": fingerprint(s.model.params, layer),
            "eigenvalue_min": float(eig[0]), "eigenvalue_max": float(eig[-1]),
            "condition_number": float(eig[-1] / eig[0]) if eig[0] > 0 else math.inf,
            "positive_definite": bool(eig[0] > 0), "guard_profile": None}
    if layer != hp.layer:
        return info
    if args.guard:
        from rome_jax.guard import profile_path

        info["guard_profile"] = {**s.profile().summary(), "path": str(
            profile_path(s.model, hp, args.guard_samples))}
    else:
        found = sorted(path.parent.glob(f"{path.stem}.guard-n*.json"))
        if found:
            from rome_jax.guard import load_profile

            profile = load_profile(found[-1])
            if profile is not None:
                info["guard_profile"] = {**profile.summary(), "path": str(found[-1])}
    return info


def _print(args, s, info: dict, corpus) -> None:
    print(f"{PROG} stats: {args.model or s.model.name}, layer {info['layer']}")
    rows = [("cache", f"{info['path']} ({info['how']})"),
            ("corpus", f"{info['corpus']} ({info['texts']:,} texts, content sha256 "
                       f"{corpus.digest[:16]}…)"),
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
        print("  warning: C is not positive definite; use more samples (--mom2-samples)")
