"""The unedited model's downstream accuracy per task and shot count, with its 95% Wilson
interval, the majority-class rate and the seconds per scored example: the data behind
``downstream.SHOTS`` and the ``--downstream-n`` default (EXPERIMENTS.md, "Downstream tasks on
SmolLM2, unedited").

Each (task, shots) gets its own ``DownstreamProbe`` at ``--layer`` (the blocks below it cached,
as in the sequential experiments; ``--layer`` left out: the full model). ``build s`` is the
probe's construction (tokens and the cached residual stream, once per run), ``first s`` its
first scoring (jit compilation included), ``s/example`` the second scoring divided by n (what
each evaluation of an edited model costs).

    python scripts/downstream_baseline.py --model smollm2-135m --layer 12 --n 100 --shots 0,3
    python scripts/downstream_baseline.py --model smollm2-135m --layer 12 --n 600 --shots default
"""

from __future__ import annotations

import argparse
import time

from rome_jax import downstream
from rome_jax.arguments import comma_list
from rome_jax.experiments.report import markdown_table
from rome_jax.hf import load_model


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="model path or alias (default: the default)")
    p.add_argument("--layer", type=int, default=None, help="probe layer (default: full model)")
    p.add_argument("--tasks", default=",".join(downstream.TASKS))
    p.add_argument("--n", type=int, default=100, help="scored examples per task (default 100)")
    p.add_argument("--shots", default="0,3",
                   help="shot counts, comma-separated, or 'default': each task's "
                        "downstream.SHOTS (default 0,3)")
    p.add_argument("--seed", type=int, default=0, help="numpy seed of the draw (default 0)")
    args = p.parse_args()
    model = load_model(args.model)
    rows = []
    for name in comma_list(args.tasks, "--tasks", known=downstream.TASKS):
        examples = downstream.load_examples(name)
        counts = ([downstream.SHOTS[name]] if args.shots == "default" else
                  comma_list(args.shots, "--shots", parse=int))
        for shots in counts:
            task = downstream.make_task(name, examples, args.n, shots, args.seed)
            t0 = time.perf_counter()
            probe = downstream.DownstreamProbe(model, [task], args.layer)
            t1 = time.perf_counter()
            probe(model.params)
            t2 = time.perf_counter()
            result = probe(model.params)[name]
            t3 = time.perf_counter()
            lo, hi = result["interval"]
            rows.append([name, shots, result["n"], result["accuracy"], f"[{lo:.3f}, {hi:.3f}]",
                         result["chance"], "yes" if lo > result["chance"] else "no",
                         t1 - t0, t2 - t1, (t3 - t2) / result["n"]])
            print(markdown_table(["task", "shots", "n", "accuracy", "95% interval", "majority",
                                  "above", "build s", "first s", "s/example"], rows[-1:]),
                  flush=True)
    print(f"\n{args.model or 'default model'}, probe layer {args.layer}, seed {args.seed}\n")
    print(markdown_table(["task", "shots", "n", "accuracy", "95% interval", "majority",
                          "above", "build s", "first s", "s/example"], rows))
    if len({r[0] for r in rows}) == len(rows):  # one shot count per task: one evaluation
        print(f"\none evaluation (after the first): {sum(r[2] * r[9] for r in rows):.0f} s on "
              f"every task, {sum(r[2] * r[9] for r in rows if r[6] == 'yes'):.0f} s on those "
              "above chance (an edited model's)")


if __name__ == "__main__":
    main()
