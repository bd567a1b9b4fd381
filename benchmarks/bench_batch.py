"""One MEMIT batch against as many single ROME edits, per fact, v* solves and closed form apart.

    python benchmarks/bench_batch.py [--model PATH_OR_ID] [--sizes 100,1000] [--single 100]
                                     [--chunk 32] [--mom2-n-samples N]

On the first ``max(--sizes)`` CounterFact records (in file order) whose requests fit the model:

- MEMIT (the model's batch preset): ``edit_batch`` on the first n records for each n of
  ``--sizes``, after a warm-up batch of ``--chunk`` records that compiles the chunked programs;
  ``seconds_solve`` (the v* solves) and ``seconds_update`` (keys of every window layer,
  residuals and closed forms) from its report, each per fact;
- ROME (c-rome at the model's ROME layer): ``compute_edit`` on the first ``--single`` records,
  each applied before the next (a sequential run), after one warm-up edit; seconds per fact;
- the float32 matmul rate of this machine (a 2048² product), the limit of both.

Prints a Markdown table (paste into BENCHMARKS.md) and one JSON line. Key statistics come from
the cache (or are built first, untimed). Fetches nothing.
"""

import argparse
import json
import time


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None)
    p.add_argument("--sizes", default="100,1000")
    p.add_argument("--single", type=int, default=100)
    p.add_argument("--chunk", type=int, default=32)
    p.add_argument("--mom2-n-samples", type=int, default=None)
    args = p.parse_args()

    import jax

    from rome_jax import data, load_model
    from rome_jax.editors.batch import edit_batch, prepare_batch
    from rome_jax.editors.delta import apply_edit
    from rome_jax.editors.hparams import batch_preset
    from rome_jax.rome.edit import build_batch, compute_edit, prepare
    from rome_jax.rome.hparams import preset_for
    from rome_jax.rome.request import EditRequest

    sizes = sorted(int(x) for x in args.sizes.split(","))
    model = load_model(args.model)
    rome_hp = preset_for(model.config).replace(mom2_n_samples=args.mom2_n_samples)
    memit_hp = batch_preset(model.config, "memit")
    memit_hp = memit_hp.replace(v=memit_hp.v.replace(mom2_n_samples=args.mom2_n_samples))
    rome_ctx = prepare(model, rome_hp, jax.random.key(0))
    memit_ctx = prepare_batch(model, "memit", memit_hp, jax.random.key(0))
    requests = []
    for record in data.load_counterfact():
        request = EditRequest.from_dict(record)
        try:
            build_batch(model, request, memit_ctx.templates, memit_hp.v.fact_token)
            build_batch(model, request, rome_ctx.templates, rome_hp.fact_token)
        except ValueError:
            continue
        requests.append(request)
        if len(requests) == max(sizes) + args.chunk:
            break

    n = 2048
    a = jax.random.normal(jax.random.key(1), (n, n))
    mm = jax.jit(lambda x: x @ x)
    mm(a).block_until_ready()
    start = time.perf_counter()
    for _ in range(5):
        mm(a).block_until_ready()
    gflops = 5 * 2 * n ** 3 / (time.perf_counter() - start) / 1e9

    edit_batch(model, requests[-args.chunk:], "memit", memit_hp, context=memit_ctx,
               chunk=args.chunk)                                        # compiles
    rows = []
    for size in sizes:
        report = edit_batch(model, requests[:size], "memit", memit_hp, context=memit_ctx,
                            chunk=args.chunk).report
        rows.append({"method": "memit", "n": size, "solve_per_fact": report.seconds_solve / size,
                     "update_per_fact": report.seconds_update / size})
    params = model.params
    update, _ = compute_edit(model, requests[-1], rome_hp, "c-rome", context=rome_ctx)
    start = time.perf_counter()
    for request in requests[:args.single]:
        update, _ = compute_edit(model, request, rome_hp, "c-rome", context=rome_ctx,
                                 params=params)
        params = apply_edit(params, update)
    jax.block_until_ready(params)
    rows.append({"method": "c-rome (single edits)", "n": args.single,
                 "total_per_fact": (time.perf_counter() - start) / args.single})
    print("| model | method | facts | v* solves s/fact | keys + closed form s/fact | "
          "total s/fact |\n|---|---|---|---|---|---|")
    for r in rows:
        total = r.get("total_per_fact", r.get("solve_per_fact", 0) + r.get("update_per_fact", 0))
        print(f"| {model.name} | {r['method']} | {r['n']} | {r.get('solve_per_fact', '-')!s:.6} "
              f"| {r.get('update_per_fact', '-')!s:.6} | {total:.4g} |")
    print(f"\nfloat32 matmul ({n}x{n}): {gflops:.1f} GFLOP/s; devices: {jax.devices()}")
    print(json.dumps({"model": model.name, "rows": rows, "matmul_gflops": gflops,
                      "layers": list(memit_hp.layers), "rome_layer": rome_hp.layer}))


if __name__ == "__main__":
    main()
