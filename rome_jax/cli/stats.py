"""``rome-jax stats``: build or inspect the cached key statistics (and guard profile)."""

from __future__ import annotations

import argparse
import json
import math

from rome_jax.cli.common import (PROG, Setup, add_model_args, log, one_line, positive_int,
                                template_lengths)


def add_parser(sub) -> None:
    p = sub.add_parser("stats", help="build or inspect the cached key statistics",
                       description="Build (or load from the cache) the key statistics "
                                   "C = E[k kᵀ] at the edit layer and show the token count, "
                                   "corpus, cache path and eigenvalue range; with --guard also "
                                   "the collapse guard's profile. Both are cached in the "
                                   "user cache, $ROME_JAX_CACHE/stats (default "
                                   "~/.cache/rome_jax/stats), keyed by a fingerprint of the "
                                   "weights, the layer, the corpus and the sample count.")
    add_model_args(p, edits=False)
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


def run(args) -> int:
    import numpy as np

    from rome_jax.rome.stats import (cache_path, find_key_stats, fingerprint, key_stats,
                                   resolve_corpus)

    s = Setup(args)
    hp = s.hparams
    corpus = resolve_corpus(hp.mom2_corpus, n_samples=hp.mom2_n_samples)
    path, stats, errors = find_key_stats(s.model, hp.layer, corpus)
    for err in errors:
        log(f"{PROG}: {one_line(err)}; rebuilding")
    if args.rebuild:  # into the user cache (a shipped copy is left as it is)
        stats, path = None, cache_path(s.model, hp.layer, corpus)
        path.unlink(missing_ok=True)
    cached = stats is not None
    how = "loaded"
    if not cached:
        built = []  # key_stats logs only when it computes (not when another process did)

        def note(message: str) -> None:
            built.append(message)
            log(f"{PROG}: {message}")

        stats = key_stats(s.model, hp.layer, hp.mom2_corpus, n_samples=hp.mom2_n_samples,
                          log=note, shipped=not args.rebuild)
        how = "built" if built else "loaded what another process built meanwhile"
    eig = np.linalg.eigvalsh(np.asarray(stats.moment, np.float64))
    info = {"path": str(path), "cached": how != "built", "layer": stats.layer,
            "corpus": stats.corpus, "corpus_digest": corpus.digest,
            "n_samples": hp.mom2_n_samples, "texts": stats.n_texts, "tokens": stats.count,
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
        found = sorted(path.parent.glob(f"{path.stem}.guard-n*.json"))
        if found:
            from rome_jax.guard import load_profile

            profile = load_profile(found[-1])
            if profile is not None:
                info["guard_profile"] = {**profile.summary(), "path": str(found[-1])}
    if args.json:
        print(json.dumps(info, indent=1))
        return 0
    print(f"{PROG} stats: {args.model or s.model.name}, layer {info['layer']}")
    rows = [("cache", f"{info['path']} ({how})"),
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
        print("  warning: C is not positive definite; use more samples (--mom2-n-samples)")
    return 0
