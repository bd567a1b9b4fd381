"""Independent edits of the default model: one sharded program against single edits.

    python benchmarks/bench_independent.py [--devices 1,4] [--n 64] [--method c-rome]
                                           [--model PATH] [--repeats 2]

For each device count (forced CPU devices, ``XLA_FLAGS=--xla_force_host_platform_device_count``,
so each count runs in a child process of this script) it edits the first ``--n`` CounterFact
records of ``checkpoints/gpt2-cf-tiny/training_case_ids.json`` whose requests fit the model:

- sharded: ``edit_independent`` on all of them (one vmapped program, the request axis sharded
  over the devices); the first call compiles, the next ``--repeats`` are timed;
- single: ``compute_edit`` on each in turn; the first pass compiles each shape bucket, the
  next ``--repeats`` passes are timed.

Compile time is the first call (pass) minus the median timed one. Prints a Markdown table
(paste into BENCHMARKS.md) and one JSON line per device count. Fetches nothing.
"""

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CASE_IDS = REPO / "checkpoints" / "gpt2-cf-tiny" / "training_case_ids.json"


def measure(args) -> dict:
    """Runs in the child, after XLA_FLAGS is set: the timings for this process's devices."""
    import statistics

    import jax

    from rome_jax import data, load_model
    from rome_jax.rome.edit import build_batch, compute_edit, edit_independent, prepare
    from rome_jax.rome.hparams import preset_for
    from rome_jax.rome.request import EditRequest

    model = load_model(args.model)
    hparams = preset_for(model.config)
    context = prepare(model, hparams, jax.random.key(0))
    by_id = {r["case_id"]: r for r in data.load_counterfact()}
    requests, case_ids = [], []
    for case_id in json.loads(CASE_IDS.read_text()):
        request = EditRequest.from_dict(by_id[case_id])
        try:
            build_batch(model, request, context.templates, hparams.fact_token)
        except ValueError:
            continue
        requests.append(request)
        case_ids.append(case_id)
        if len(requests) == args.n:
            break

    def seconds(fn):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        return time.perf_counter() - start

    sharded = lambda: edit_independent(model, requests, hparams, args.method,
                                       context=context)[0]
    single = lambda: [compute_edit(model, r, hparams, args.method, context=context)[0]
                      for r in requests]
    result = {"devices": len(jax.devices()), "device": str(jax.devices()[0]),
              "model": model.name, "method": args.method, "n": len(requests),
              "case_ids": case_ids}
    for name, fn in (("sharded", sharded), ("single", single)):
        first = seconds(fn)
        runs = [seconds(fn) for _ in range(args.repeats)]
        steady = statistics.median(runs)
        result[name] = {"first_s": first, "runs_s": runs, "compile_s": first - steady,
                        "edits_per_s": len(requests) / steady}
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--devices", default="1,4", help="comma-separated CPU device counts")
    parser.add_argument("--n", type=int, default=64)
    parser.add_argument("--method", default="c-rome")
    parser.add_argument("--model", default=None)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args)))
        return

    results = []
    for count in (int(c) for c in args.devices.split(",")):
        env = {**os.environ, "JAX_PLATFORMS": "cpu",
               "XLA_FLAGS": f"--xla_force_host_platform_device_count={count}"}
        child = [sys.executable, __file__, "--child", "--n", str(args.n), "--method",
                 args.method, "--repeats", str(args.repeats)]
        if args.model:
            child += ["--model", args.model]
        out = subprocess.run(child, env=env, check=True, capture_output=True, text=True).stdout
        results.append(json.loads(out.strip().splitlines()[-1]))
        print(json.dumps(results[-1]), file=sys.stderr, flush=True)  # progress, one per count
    print("| CPU devices | way | first call (s) | compile (s) | steady run (s) | edits/s |")
    print("| --- | --- | --- | --- | --- | --- |")
    for r in results:
        for name, way in (("sharded", f"{r['n']} edits, one sharded program"),
                          ("single", f"{r['n']} single `compute_edit` calls")):
            t = r[name]
            steady = r["n"] / t["edits_per_s"]
            print(f"| {r['devices']} | {way} | {t['first_s']:.1f} | {t['compile_s']:.1f} | "
                  f"{steady:.1f} | {t['edits_per_s']:.2f} |")
    for r in results:
        print(json.dumps(r))


if __name__ == "__main__":
    main()
