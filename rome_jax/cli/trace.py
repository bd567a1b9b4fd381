"""``rome-jax trace``: causal tracing heatmap (ROME §2.1)."""

from __future__ import annotations

import json
from pathlib import Path

from rome_jax.arguments import nonnegative_float
from rome_jax.cli.common import (PROG, add_model_source_args, check_inputs_apart, check_output,
                                load_cli_model, positive_int)


def add_parser(sub) -> None:
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
    p.add_argument("--samples", type=positive_int, default=10,
                   help="noise samples (default 10)")
    p.add_argument("--noise", type=nonnegative_float, default=3.0,
                   help="noise = NOISE × embedding std (default 3)")
    p.add_argument("--window", type=positive_int, default=10,
                   help="layers restored around each layer for mlp/attn (default 10)")
    p.add_argument("--std-subjects", type=int, default=500, metavar="N",
                   help="embedding std over the tokens of N CounterFact subjects drawn with "
                        "the seed (default 500; 0: over random token ids)")
    p.add_argument("--seed", type=int, default=0, help="jax.random seed (default 0)")
    add_model_source_args(p)
    p.add_argument("--out", metavar="FILE.png",
                   help="heatmap PNG (its grid is written beside it as .json unless --report)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing --out, its .json or --report")
    p.add_argument("--report", metavar="FILE.json", help="write the grid as JSON")
    p.add_argument("--json", action="store_true", help="print the grid as JSON")
    p.set_defaults(func=run)


def run(args) -> int:
    import jax
    import numpy as np

    from rome_jax.files import write_json_atomic
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
    report = args.report or (str(Path(args.out).with_suffix(".json")) if args.out else None)
    if args.out:
        check_output(args.out, "--out", args.overwrite)
        check_inputs_apart(args.out, "--out", args)
    if report:
        check_output(report, "--report" if args.report else "the grid of --out", args.overwrite)
        check_inputs_apart(report, "--report" if args.report else "the grid of --out", args)
    if args.out and report and Path(report).absolute() == Path(args.out).absolute():
        raise ValueError(f"--report {report}: is the --out file")
    if args.std_subjects < 0:
        raise ValueError("--std-subjects: must be 0 or more")
    model = load_cli_model(args)
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
