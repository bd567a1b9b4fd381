"""Key statistics tokens/s, one multi-layer pass against one pass per layer, and one c-rome
edit in bfloat16 against float32, on this machine (CPU).

    python benchmarks/bench_stats.py [--model PATH_OR_ID] [--tokens 20000] [--layers 0,1,2]
                                     [--case CASE_ID] [--matmul-n 1024]

On the first WikiText-2 texts that hold ``--tokens`` tokens (``bench_device.stats_selection``),
with ``compute_layer_stats``' default batching (16 texts a batch, sorted by length):

a. statistics at ROME's layer (the model's preset): two passes, the first with compilation
   (one program per padded batch shape), the second steady; tokens/s, and GFLOP/s from
   ``bench_device.stats_flops`` (the padded batches' dense FLOPs, attention and Σ k kᵀ) set
   against the measured float32 matmul rate;
b. ``--layers`` (default: MEMIT's window, ``editors.hparams.batch_preset``) in one pass against
   one pass per layer, all after (a), so with the programs compiled (the block programs take
   the layer as a traced argument: one compilation serves every layer);
c. one c-rome edit (``compute_edit``; keys, v* and the update) of the first CounterFact record
   that fits (or ``--case``), the statistics precomputed (from (a), float32, the same for
   both), with the model loaded in float32 and in bfloat16: first call (compilation) and steady.

Each timing records the 1-minute load average just before it (``os.getloadavg``): the machine
may be shared. Prints a Markdown table (paste into BENCHMARKS.md) and one JSON line. Fetches
nothing.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import time
from pathlib import Path

import jax
import jax.numpy as jnp

from bench_device import STATS_BATCH, matmul_rate, stats_flops, stats_selection, twice


def load_average() -> float:
    """The 1-minute load average of the machine now."""
    return round(os.getloadavg()[0], 2)


def stats_passes(model, layers: list[int], texts: list[str]) -> dict:
    """Two ``compute_layer_stats`` passes over ``texts`` at ``layers``: {first_s, steady_s,
    tokens, tokens_per_s, gflops (steady), load (before the first), stats}."""
    from rome_jax.rome.stats import compute_layer_stats

    load = load_average()
    first, steady, stats = twice(lambda: compute_layer_stats(model, layers, texts, "wikitext",
                                                             batch_size=STATS_BATCH))
    tokens = stats[layers[0]].count
    return {"first_s": first, "steady_s": steady, "tokens": tokens,
            "tokens_per_s": tokens / steady, "load": load, "stats": stats,
            "gflops": stats_flops(model, texts, layers) / steady / 1e9}


def one_pass(model, layers: list[int], texts: list[str]) -> dict:
    """One (steady) ``compute_layer_stats`` pass at ``layers``: {seconds, load, gflops}."""
    from rome_jax.rome.stats import compute_layer_stats

    load = load_average()
    start = time.perf_counter()
    compute_layer_stats(model, layers, texts, "wikitext", batch_size=STATS_BATCH)
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "load": load,
            "gflops": stats_flops(model, texts, layers) / seconds / 1e9}


def edit_times(model, request, hparams, stats, templates) -> dict:
    """First and steady seconds of one c-rome ``compute_edit`` of ``request`` on ``model``,
    with ``stats`` (precomputed) and ``templates`` given: {first_s, steady_s, load}."""
    from rome_jax.rome.edit import compute_edit, prepare

    context = prepare(model, hparams, templates=templates, stats=stats)
    load = load_average()
    first, steady, _ = twice(lambda: compute_edit(model, request, hparams, "c-rome",
                                                  context=context)[0])
    return {"first_s": first, "steady_s": steady, "load": load}


def first_request(model, hparams, templates, case: int | None):
    """The CounterFact record ``case`` (default: the first whose request fits the batch)."""
    from rome_jax import data
    from rome_jax.rome.edit import build_batch
    from rome_jax.rome.request import EditRequest

    for record in data.load_counterfact():
        if case is not None and record["case_id"] != case:
            continue
        request = EditRequest.from_dict(record)
        try:
            build_batch(model, request, templates, hparams.fact_token)
        except ValueError:
            if case is not None:
                raise
            continue
        return request
    raise ValueError(f"--case: no CounterFact record {case} in the data")


def table(name: str, rate: float, rome: dict, layer: int, window: list[int], together: dict,
          apart: dict[int, dict], edits: dict[str, dict]) -> str:
    """The Markdown table of (a), (b) and (c)."""
    pct = lambda g: f"{g:.1f} ({100 * g / rate:.0f}%)"
    span = f"{window[0]}-{window[-1]}" if len(window) > 1 else str(window[0])
    sum_apart = sum(r["seconds"] for r in apart.values())
    lines = ["| model | what | first (s) | steady (s) | tokens/s | GFLOP/s (% of matmul) | "
             "load |", "|---|---|---|---|---|---|---|",
             f"| {name} | statistics, layer {layer} ({rome['tokens']:,} tokens) | "
             f"{rome['first_s']:.2f} | {rome['steady_s']:.2f} | {rome['tokens_per_s']:,.0f} | "
             f"{pct(rome['gflops'])} | {rome['load']} |",
             f"| {name} | statistics, layers {span} in one pass | - | "
             f"{together['seconds']:.2f} | {rome['tokens'] / together['seconds']:,.0f} | "
             f"{pct(together['gflops'])} | {together['load']} |"]
    lines += [f"| {name} | statistics, layer {l} alone | - | {r['seconds']:.2f} | "
              f"{rome['tokens'] / r['seconds']:,.0f} | {pct(r['gflops'])} | {r['load']} |"
              for l, r in apart.items()]
    lines.append(f"| {name} | statistics, layers {span}, one pass per layer (sum) | - | "
                 f"{sum_apart:.2f} | {rome['tokens'] / sum_apart:,.0f} | - | - |")
    lines += [f"| {name} | c-rome edit, {dtype} (statistics given) | {r['first_s']:.2f} | "
              f"{r['steady_s']:.2f} | - | - | {r['load']} |" for dtype, r in edits.items()]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="default: the embedded default model")
    p.add_argument("--tokens", type=int, default=20_000)
    p.add_argument("--layers", default=None, help="comma-separated; default: MEMIT's window")
    p.add_argument("--case", type=int, default=None, help="CounterFact case_id of the edit")
    p.add_argument("--matmul-n", type=int, default=1024)
    args = p.parse_args()
    if args.tokens < 1:
        p.error(f"--tokens: {args.tokens} must be positive")
    if args.matmul_n < 1:
        p.error(f"--matmul-n: {args.matmul_n} must be positive")

    from rome_jax import data, load_model
    from rome_jax.editors.hparams import batch_preset
    from rome_jax.rome.edit import prepare
    from rome_jax.rome.hparams import preset_for

    model = load_model(args.model)
    hparams = preset_for(model.config)
    if args.layers is None:
        window = list(batch_preset(model.config, "memit").layers)
    else:
        try:
            window = sorted({int(x) for x in args.layers.split(",")})
        except ValueError:
            p.error(f"--layers: {args.layers!r} is not a comma-separated list of layers")
        for layer in window:
            if not 0 <= layer < model.config.n_layer:
                p.error(f"--layers: layer {layer} is outside 0-{model.config.n_layer - 1}")
    texts = stats_selection(model.tokenizer, data.load_wikitext(), args.tokens)
    rate = matmul_rate(args.matmul_n, jnp.float32)
    now = datetime.datetime.now(datetime.timezone.utc)
    header = (f"{model.name}: {jax.devices()[0].device_kind} ({os.cpu_count()} CPUs), jax "
              f"{jax.__version__}, {now:%Y-%m-%d %H:%M} UTC; float32 matmul "
              f"{args.matmul_n}^3: {rate:,.0f} GFLOP/s")
    print(header, flush=True)

    rome = stats_passes(model, [hparams.layer], texts)
    print("a.", {k: v for k, v in rome.items() if k != "stats"}, flush=True)
    together = one_pass(model, window, texts)
    apart = {layer: one_pass(model, [layer], texts) for layer in window}
    print("b.", together, apart, flush=True)

    stats = rome["stats"][hparams.layer]
    context = prepare(model, hparams, jax.random.key(0), stats=stats)
    request = first_request(model, hparams, context.templates, args.case)
    edits = {"float32": edit_times(model, request, hparams, stats, context.templates),
             "bfloat16": edit_times(load_model(args.model, dtype=jnp.bfloat16), request,
                                    hparams, stats, context.templates)}
    print("c.", edits, f"case {request.case_id}", flush=True)

    print("\n" + header + "\n")
    print(table(Path(model.name).name, rate, rome, hparams.layer, window, together, apart,
                edits))
    print(json.dumps({"header": header, "matmul_gflops": rate, "args": vars(args),
                      "case_id": request.case_id, "statistics": {
                          k: v for k, v in rome.items() if k != "stats"},
                      "one_pass": together, "per_layer": apart, "edits": edits}))


if __name__ == "__main__":
    main()
