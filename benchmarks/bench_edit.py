"""Wall time of one ROME edit on the default model, split into keys, v* and update.

    python benchmarks/bench_edit.py [--model PATH] [--layer L] [--method c-rome] [--case 0]
                                    [--repeats 5]

Compile time is measured apart (the first call of each jit-compiled phase). The FLOPs an edit
must do are counted analytically and set against the machine's measured float32 matmul rate.
Prints a Markdown table (paste into BENCHMARKS.md) and a JSON line.
"""

import argparse
import json
import platform
import statistics
import time

import jax
import jax.numpy as jnp

from bench_device import matmul_rate
from rome_jax import data, load_model
from rome_jax.models.transformer import residual_at, rome_weight
from rome_jax.rome.edit import build_batch, edit_core, prepare
from rome_jax.rome.hparams import RomeHParams, preset_for
from rome_jax.rome.keys import keys_from_residual
from rome_jax.rome.request import EditRequest
from rome_jax.editors.rome import rank_one_update
from rome_jax.rome.values import optimize_v


def timed(fn, *args, repeats: int):
    """(compile seconds, median run seconds, result)."""
    start = time.perf_counter()
    compiled = jax.jit(fn).lower(*args).compile()
    compile_s = time.perf_counter() - start
    jax.block_until_ready(compiled(*args))
    runs = []
    for _ in range(repeats):
        start = time.perf_counter()
        out = jax.block_until_ready(compiled(*args))
        runs.append(time.perf_counter() - start)
    return compile_s, statistics.median(runs), out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None)
    parser.add_argument("--layer", type=int, default=None, help="default: the model's preset")
    parser.add_argument("--method", default="c-rome")
    parser.add_argument("--case", type=int, default=0, help="CounterFact case_id")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    model = load_model(args.model)
    cfg, params = model.config, model.params
    hp = preset_for(cfg) if args.layer is None else RomeHParams(layer=args.layer).check(cfg)
    context = prepare(model, hp, jax.random.key(0))
    record = next(r for r in data.load_counterfact() if r["case_id"] == args.case)
    request = EditRequest.from_dict(record)
    batch = jax.tree.map(jnp.asarray, build_batch(model, request, context.templates,
                                                  hp.fact_token))
    layer = hp.layer
    n_rows = batch.ids.shape[0] - 1
    v_kwargs = dict(steps=hp.v_num_grad_steps, lr=hp.v_lr, weight_decay=hp.v_weight_decay,
                    kl_factor=hp.kl_factor, clamp_norm_factor=hp.clamp_norm_factor,
                    early_stop_loss=hp.early_stop_loss)

    def keys_phase(params, batch):
        residual = residual_at(params, cfg, batch.ids, batch.mask, layer)
        return residual, keys_from_residual(params, cfg, layer, residual, batch.mask,
                                            batch.lookup, n_rows)

    w, b = rome_weight(params, layer)
    c_keys, t_keys, (residual, keys) = timed(keys_phase, params, batch, repeats=args.repeats)
    v_init = keys.plain @ w + b
    c_v, t_v, values = timed(lambda p, b, r, v: optimize_v(p, cfg, layer, b, r, v, **v_kwargs),
                             params, batch, residual, v_init, repeats=args.repeats)
    c_u, t_u, _ = timed(lambda w, b, f, kp, km, vs: rank_one_update(w, b, f, kp, km, vs,
                                                                    args.method, layer),
                        w, b, context.factor, keys.plain, keys.mean,
                        values.v_star, repeats=args.repeats)
    full = lambda p, b, f: edit_core(p, cfg, layer, args.method, hp.v_num_grad_steps, b, f,
                                     hp.v_lr, hp.v_weight_decay, hp.kl_factor,
                                     hp.clamp_norm_factor, hp.early_stop_loss)
    c_all, t_all, _ = timed(full, params, batch, context.factor, repeats=args.repeats)

    # FLOPs per token and block: the q, k, v, o projections, the MLP (three F x D matrices when
    # gated), attention 4·T·H·hd; logits 2·D·V.
    D, V, L, F = cfg.d_model, cfg.vocab_size, cfg.n_layer, cfg.d_mlp
    R, T = batch.ids.shape
    W, P = batch.live_index.shape[1], batch.target_pos.shape[1]
    steps = int(values.steps)
    qo, kv = cfg.n_head * cfg.head_dim, cfg.n_kv_head * cfg.head_dim
    per_token = 4 * D * (qo + kv) + 2 * D * F * (3 if cfg.gated_mlp else 2)
    flops_keys = R * T * (layer + 1) * (per_token + 4 * T * qo)
    flops_cache = R * T * (L - layer) * (per_token + 4 * T * qo)
    flops_step = 3 * (R * W * (L - layer) * (per_token + 4 * (T + W) * qo) + 2 * R * P * D * V)
    flops_v = flops_cache + steps * flops_step
    flops_update = 2 * F * F + 4 * F * D
    rate = matmul_rate(1024, jnp.float32, repeats=10) * 1e9  # FLOP/s
    result = {
        "device": str(jax.devices()[0]), "cpu": platform.processor() or platform.machine(),
        "model": model.name, "method": args.method, "case_id": args.case,
        "rows": R, "seq": T, "live": W, "v_steps": steps,
        "compile_s": {"keys": c_keys, "v_star": c_v, "update": c_u, "edit": c_all},
        "run_s": {"keys": t_keys, "v_star": t_v, "update": t_u, "edit": t_all},
        "gflop": {"keys": flops_keys / 1e9, "v_star": flops_v / 1e9,
                  "update": flops_update / 1e9},
        "matmul_gflops": rate / 1e9,
    }
    total_gflop = (flops_keys + flops_v + flops_update) / 1e9
    print("| phase | compile (s) | run (s) | GFLOP | GFLOP/s achieved |")
    print("| --- | --- | --- | --- | --- |")
    for phase in ("keys", "v_star", "update"):
        g = result["gflop"][phase]
        print(f"| {phase} | {result['compile_s'][phase]:.2f} | {result['run_s'][phase]:.4f} | "
              f"{g:.3f} | {g / result['run_s'][phase]:.1f} |")
    print(f"| whole edit (one jit) | {c_all:.2f} | {t_all:.4f} | {total_gflop:.3f} | "
          f"{total_gflop / t_all:.1f} |")
    print(f"\nmeasured float32 matmul rate (1024³): {rate / 1e9:.1f} GFLOP/s; "
          f"{R} rows x {T} tokens, {W} live positions, {steps} v* steps, {jax.devices()[0]}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
