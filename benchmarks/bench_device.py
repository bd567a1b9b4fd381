"""ROME and MEMIT at the seeds' scale on one accelerator: random bf16 weights shaped as
GPT-2-XL, GPT-J-6B and Llama-2-7B; statistics tokens/s, one ROME edit, one MEMIT batch.

    python benchmarks/bench_device.py [--models gpt2-xl,gpt-j-6b,llama-2-7b] [--batch 1000]
                                      [--stats-tokens 100000] [--budget-s 600] [--scale 1]
                                      [--v-steps N] [--chunk 32] [--dtype bfloat16]
                                      [--matmul-n N]
    python benchmarks/bench_device.py --scale 0.02 --batch 8 --stats-tokens 2000 --v-steps 2
                                      # a CPU smoke test of the same code (not a benchmark)

Weights: random (normal, std 0.02; norm scales 1, biases 0), created on the device in
``--dtype`` one tensor at a time (stacked tensors one layer at a time), never as a host copy.
Shapes: the HF configs below (GPT-2-XL; GPT-J-6B; Llama-2-7B with vocab 50257 instead of 32000,
since its requests and texts are read with GPT-2's tokenizer, the embedded default model's:
the embedding and LM head have 18,257 more rows than the real model's, +2.3% of its weights).
``--scale s`` < 1 shrinks each family keeping its structure: s·heads heads (at least 1) of the
real head size, the MLP in proportion, s·layers layers (at least 6) and the edit layers mapped
proportionally (same vocabulary, positions, rotary and norms).

Per model, in order (the whole run stops starting new work at ``--budget-s`` and says what it
skipped; phase B runs after phase A of every model, so the cheap numbers always come first):

A. statistics: ``compute_layer_stats`` at ROME's layer over the first WikiText-2 texts of
   ``--stats-tokens`` tokens, twice (the first pass compiles one program per batch shape; the
   second is steady: tokens/s, and GFLOP/s from an analytic count of the padded batches'
   dense FLOPs, attention and the key moments), then once over MEMIT's window (one pass);
   ROME: ``prepare`` (C's Cholesky factor, float64 on the host), the keys (``residual_at`` +
   ``keys_from_residual``, jitted), keys + v* (``rome.edit.solve``) and the c-rome update
   (``compute_edit(..., solved=...)``) on the first CounterFact record that fits, each called
   twice: first call (compilation + run) and steady run, ``block_until_ready``.
B. MEMIT (``editors.hparams.batch_preset``; Llama-2-7B: the rule window 4-8, ROME at 5, 25
   v* steps, as EasyEdit's llama-7b hparams): a warm-up ``edit_batch`` of ``--chunk`` records (compiles),
   a steady probe of the same chunk (``solve_targets``, then ``edit_batch(targets=...)``), and
   the batch of ``--batch`` records when the probe's estimate fits the budget
   (``seconds_solve``, ``seconds_update`` of its report).

Context templates come from WikiText (the first tokens of texts, of ROME's and MEMIT's
lengths) instead of sampling them from the random model: same row counts and similar lengths,
no generation to compile. Also printed: the device, the JAX version, the date, the measured
``--dtype`` and float32 matmul rates (an n x n product; float32 at JAX's default precision,
which may use TF32 on a GPU) as the limit, and the device's peak memory. Prints a Markdown
table (paste into BENCHMARKS.md) and one JSON line. Fetches nothing.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import math
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np

# The real models' HF configs (what their config.json files say that ModelConfig reads).
CONFIGS = {
    "gpt2-xl": {"model_type": "gpt2", "n_embd": 1600, "n_layer": 48, "n_head": 25,
                "vocab_size": 50257, "n_positions": 1024, "activation_function": "gelu_new",
                "layer_norm_epsilon": 1e-5},
    "gpt-j-6b": {"model_type": "gptj", "n_embd": 4096, "n_layer": 28, "n_head": 16,
                 "rotary_dim": 64, "vocab_size": 50400, "n_positions": 2048,
                 "activation_function": "gelu_new", "layer_norm_epsilon": 1e-5},
    # vocab_size 32000 in the real model; 50257 for GPT-2's token ids (module docstring).
    "llama-2-7b": {"model_type": "llama", "hidden_size": 4096, "intermediate_size": 11008,
                   "num_hidden_layers": 32, "num_attention_heads": 32,
                   "num_key_value_heads": 32, "vocab_size": 50257,
                   "max_position_embeddings": 4096, "rms_norm_eps": 1e-5,
                   "rope_theta": 10000.0, "hidden_act": "silu", "tie_word_embeddings": False},
}
# EasyEdit's hparams/ROME/llama-7b.yaml (layer 5) and hparams/MEMIT/llama-7b.yaml (layers 4-8),
# both with 25 v* steps; the other settings are rome_jax's defaults.
LLAMA_ROME_LAYER, LLAMA_MEMIT_TOP, LLAMA_V_STEPS = 5, 8, 25
MIN_LAYERS = 6  # of a scaled model: room for MEMIT's window below the top layers
STATS_BATCH = 16  # compute_layer_stats' default batch size
RIDGE = 1e-2  # C + RIDGE · mean(diag C) · I for the edits (see ``ridged``)


def scaled_config(name: str, scale: float):
    """(ModelConfig of ``name`` shrunk by ``scale``, the real model's ModelConfig)."""
    from rome_jax.models.config import ModelConfig

    hf = dict(CONFIGS[name])
    full = ModelConfig.from_hf(hf, source=name)
    if scale == 1:
        return full, full
    heads = max(1, round(full.n_head * scale))
    d_model = heads * full.head_dim
    d_mlp = max(8, 8 * round(full.d_mlp * d_model / full.d_model / 8))
    layers = min(full.n_layer, max(MIN_LAYERS, round(full.n_layer * scale)))
    if full.model_type == "llama":
        hf.update(hidden_size=d_model, intermediate_size=d_mlp, num_hidden_layers=layers,
                  num_attention_heads=heads, num_key_value_heads=heads)
    else:
        hf.update(n_embd=d_model, n_inner=d_mlp, n_layer=layers, n_head=heads)
    return ModelConfig.from_hf(hf, source=f"{name} x{scale}"), full


def hparams_for(name: str, cfg, full, v_steps: int | None):
    """(ROME's RomeHParams, MEMIT's BatchHParams) of the real model, their layers mapped onto
    ``cfg``'s depth, with ``v_steps`` v* steps when given."""
    from rome_jax.editors.hparams import batch_preset, rule_preset
    from rome_jax.rome.hparams import RomeHParams, preset_for

    if full.model_type == "llama":
        rome = RomeHParams(layer=LLAMA_ROME_LAYER, v_num_grad_steps=LLAMA_V_STEPS)
        memit = rule_preset(full, "memit", LLAMA_MEMIT_TOP)
        memit = memit.replace(v=memit.v.replace(v_num_grad_steps=LLAMA_V_STEPS))
    else:
        rome, memit = preset_for(full), batch_preset(full, "memit")
    to = lambda layer: min(cfg.n_layer - 1, round(layer * (cfg.n_layer - 1) / (full.n_layer - 1)))
    top = to(memit.layers[-1])
    memit = memit.with_layers(range(max(0, top - len(memit.layers) + 1), top + 1))
    rome = rome.replace(layer=to(rome.layer))
    if v_steps is not None:
        rome = rome.replace(v_num_grad_steps=v_steps)
        memit = memit.replace(v=memit.v.replace(v_num_grad_steps=v_steps))
    return rome.check(cfg), memit.check(cfg)


@functools.partial(jax.jit, static_argnums=(1, 2, 3, 4))
def _leaf(key, shape: tuple, dtype, kind: str, stacked: bool):
    """One params tensor on the device: ones, zeros or normal(0, 0.02), drawn in float32 one
    layer at a time when ``stacked`` (so the float32 draw never spans the whole tensor)."""
    if kind != "normal":
        return (jnp.ones if kind == "ones" else jnp.zeros)(shape, dtype)
    draw = lambda k, s: (0.02 * jax.random.normal(k, s, jnp.float32)).astype(dtype)
    if stacked:
        return jax.lax.map(lambda k: draw(k, shape[1:]), jax.random.split(key, shape[0]))
    return draw(key, shape)


def random_params(cfg, key, dtype):
    """Random params of a ``cfg`` model in ``dtype``, tensor by tensor on the default device."""
    from rome_jax.models.model import FAMILIES

    tree = jax.eval_shape(lambda: FAMILIES[cfg.model_type].import_weights(
        lambda name, shape: jnp.zeros(shape, dtype), cfg))
    leaves, treedef = jax.tree_util.tree_flatten_with_path(tree)
    out = []
    for i, (path, leaf) in enumerate(leaves):
        name = path[-1].key
        kind = "ones" if name == "scale" else "zeros" if name in ("b", "bias") else "normal"
        out.append(_leaf(jax.random.fold_in(key, i), tuple(leaf.shape), dtype, kind,
                         path[0].key == "blocks"))
    return jax.block_until_ready(treedef.unflatten(out))


def ridged(stats):
    """``stats`` with RIDGE · mean(diag C) added to C's diagonal. Random weights and a corpus
    of 1e5 tokens leave C near-singular at the low layers (a key that is mostly a function of
    the token, fewer distinct tokens than F), and MEMIT's float32 Cholesky of λC + KᵀK then
    gives NaN, which ``edit_batch`` refuses; the ridge changes no shape and no timing."""
    import dataclasses

    moment = np.asarray(stats.moment, np.float32)
    ridge = RIDGE * float(np.mean(np.diag(moment)))
    return dataclasses.replace(stats, moment=moment + np.float32(ridge) * np.eye(
        len(moment), dtype=np.float32))


def wikitext_templates(tok, texts: list[str], lengths, openings=()):
    """ContextTemplates of the row counts and token lengths ``lengths`` ((length, count)
    pairs, as ``context_template_length_params``) from the first tokens of ``texts``: each
    prefix is ``length - 1`` tokens of one text (after an opening word, cycling through
    ``openings``, as MEMIT's), then ``". {}"``."""
    from rome_jax.rome.templates import ContextTemplates

    out, texts = ["{}"], iter(texts)
    for length, count in lengths:
        for j in range(count):
            words = tok.decode(tok.encode(next(texts))[:length - 1])
            if openings:
                words = f"{openings[j % len(openings)]} {words.strip()}"
            out.append(words.replace("{", "").replace("}", "").strip() + ". {}")
    return ContextTemplates(tuple(out))


def matmul_rate(n: int, dtype, repeats: int = 5) -> float:
    """Measured n x n x n product rate in GFLOP/s."""
    a = jax.random.normal(jax.random.key(1), (n, n), jnp.float32).astype(dtype)
    mm = jax.jit(lambda x: x @ x)
    mm(a).block_until_ready()
    start = time.perf_counter()
    for _ in range(repeats):
        out = mm(a)
    out.block_until_ready()
    return repeats * 2 * n ** 3 / (time.perf_counter() - start) / 1e9


def per_token_flops(cfg) -> int:
    """Dense FLOPs of one block per token: q, k, v, o and the MLP (three F x D when gated)."""
    qo, kv = cfg.n_head * cfg.head_dim, cfg.n_kv_head * cfg.head_dim
    return 4 * cfg.d_model * (qo + kv) + 2 * cfg.d_model * cfg.d_mlp * (3 if cfg.gated_mlp
                                                                        else 2)


def stats_flops(model, texts: list[str], layers: list[int]) -> float:
    """FLOPs of one statistics pass as ``compute_layer_stats`` batches the texts (its own
    ``token_batches``; one device): every padded token through blocks 0..max(layers) (dense +
    attention 4·T·H·hd) and Σ k kᵀ (2·F²) at each asked layer."""
    from rome_jax.data import bucket
    from rome_jax.rome.stats import token_batches

    cfg = model.config
    qo = cfg.n_head * cfg.head_dim
    batches, _ = token_batches(model, texts, None, STATS_BATCH, "wikitext")
    total = 0.0
    for chunk in batches:
        t = min(bucket(max(map(len, chunk)), 32), cfg.n_positions)
        tokens = len(chunk) * t
        total += tokens * ((max(layers) + 1) * (per_token_flops(cfg) + 4 * t * qo)
                           + len(layers) * 2 * cfg.d_mlp ** 2)
    return total


def twice(fn):
    """(first call seconds, second call seconds, second result), each to block_until_ready."""
    times, out = [], None
    for _ in range(2):
        start = time.perf_counter()
        out = jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return times[0], times[1], out


def peak_memory() -> dict | None:
    """The device's memory statistics in GB (None where the backend has none, e.g. CPU)."""
    stats = jax.devices()[0].memory_stats()
    if not stats:
        return None
    return {k: round(stats[k] / 1e9, 2) for k in ("peak_bytes_in_use", "bytes_in_use",
                                                  "bytes_limit") if k in stats}


class Budget:
    """Seconds left of ``--budget-s`` since the script started; records what it skipped."""

    def __init__(self, seconds: float):
        self.end = time.perf_counter() + seconds
        self.skipped: list[str] = []

    def left(self) -> float:
        return self.end - time.perf_counter()

    def allows(self, what: str, estimate: float) -> bool:
        if estimate <= self.left():
            return True
        self.skipped.append(f"{what}: needs about {estimate:.0f} s, {max(0, self.left()):.0f} s "
                            "left")
        print("skipped", self.skipped[-1], flush=True)
        return False


class Bench:
    """One model's shapes, settings and rows; ``phase_a`` / ``phase_b`` rebuild the same
    random weights from the same key, so nothing of a model stays on the device between."""

    def __init__(self, name, args, tokenizer, texts, stats_texts, records):
        from rome_jax.rome.templates import DEFAULT_LENGTHS, MEMIT_OPENINGS

        self.name, self.args, self.tokenizer = name, args, tokenizer
        self.cfg, full = scaled_config(name, args.scale)
        self.rome_hp, self.memit_hp = hparams_for(name, self.cfg, full, args.v_steps)
        self.stats_texts, self.records = stats_texts, records
        self.rome_templates = wikitext_templates(tokenizer, texts, DEFAULT_LENGTHS)
        self.memit_templates = wikitext_templates(
            tokenizer, texts, self.memit_hp.v.context_template_length_params, MEMIT_OPENINGS)
        self.window_stats = None
        self.rows: list[dict] = []

    def row(self, phase: str, first: float | None = None, steady: float | None = None,
            **notes):
        self.rows.append({"model": self.name, "phase": phase, "first_s": first,
                          "steady_s": steady, **notes})
        print(json.dumps(self.rows[-1]), flush=True)

    def model(self):
        from rome_jax.models.model import Model

        start = time.perf_counter()
        params = random_params(self.cfg, jax.random.key(0), jnp.dtype(self.args.dtype))
        seconds = time.perf_counter() - start
        size = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(params)) / 1e9
        model = Model(self.cfg, params, self.tokenizer,
                      name=f"random {self.name} x{self.args.scale:g}")
        return model, seconds, size

    def requests(self, model, n: int):
        """The first ``n`` CounterFact records whose requests fit ROME's and MEMIT's batches."""
        from rome_jax.rome.edit import build_batch
        from rome_jax.rome.request import EditRequest

        out = []
        for record in self.records:
            request = EditRequest.from_dict(record)
            try:
                build_batch(model, request, self.rome_templates, self.rome_hp.fact_token)
                build_batch(model, request, self.memit_templates, self.memit_hp.v.fact_token)
            except ValueError:
                continue
            out.append(request)
            if len(out) == n:
                break
        return out

    def phase_a(self) -> None:
        """Statistics and one ROME edit."""
        from rome_jax.models.transformer import residual_at
        from rome_jax.rome.edit import build_batch, compute_edit, prepare, solve
        from rome_jax.rome.keys import keys_from_residual
        from rome_jax.rome.stats import compute_layer_stats

        model, seconds, size = self.model()
        cfg, hp = model.config, self.rome_hp
        self.row("random weights", seconds, None, gb=round(size, 2), dtype=self.args.dtype,
                 d_model=cfg.d_model, d_mlp=cfg.d_mlp, n_layer=cfg.n_layer, n_head=cfg.n_head,
                 vocab=cfg.vocab_size)
        layer = hp.layer
        run = lambda layers: compute_layer_stats(model, layers, self.stats_texts, "wikitext",
                                                 batch_size=STATS_BATCH)
        first, steady, stats = twice(lambda: run([layer]))
        tokens = stats[layer].count
        self.row(f"statistics, layer {layer}", first, steady, tokens=tokens,
                 tokens_per_s=round(tokens / steady),
                 gflops=round(stats_flops(model, self.stats_texts, [layer]) / steady / 1e9, 1))
        if self.args.batch:
            window = list(self.memit_hp.layers)
            start = time.perf_counter()
            self.window_stats = {k: ridged(v) for k, v in run(window).items()}
            seconds = time.perf_counter() - start
            self.row(f"statistics, layers {window[0]}-{window[-1]} (one pass)", None, seconds,
                     tokens=tokens, tokens_per_s=round(tokens / seconds),
                     gflops=round(stats_flops(model, self.stats_texts, window) / seconds / 1e9,
                                  1))
        layer_stats = ridged(stats[layer])
        start = time.perf_counter()
        context = prepare(model, hp, templates=self.rome_templates, stats=layer_stats)
        self.row("ROME prepare (C's Cholesky, float64 on the host)", None,
                 time.perf_counter() - start)
        request = self.requests(model, 1)[0]
        batch = jax.tree.map(jnp.asarray, build_batch(model, request, context.templates,
                                                      hp.fact_token))
        keys_jit = jax.jit(lambda p, b: keys_from_residual(
            p, cfg, layer, residual_at(p, cfg, b.ids, b.mask, layer), b.mask, b.lookup,
            b.ids.shape[0] - 1))
        first, steady, _ = twice(lambda: keys_jit(model.params, batch))
        self.row("ROME keys", first, steady, rows=int(batch.ids.shape[0]),
                 seq=int(batch.ids.shape[1]), case_id=request.case_id)
        first, steady, solved = twice(lambda: solve(model, request, hp, context=context))
        self.row("ROME keys + v*", first, steady, v_steps=int(solved.values.steps),
                 live=int(batch.live_index.shape[1]))
        first, steady, _ = twice(lambda: compute_edit(model, request, hp, "c-rome",
                                                      context=context, solved=solved)[0])
        self.row("ROME c-rome update", first, steady)
        if peak_memory():  # None on CPU
            self.row("device memory after phase A", memory_gb=peak_memory())

    def phase_b(self, budget: Budget) -> None:
        """One MEMIT batch of ``--batch`` records, if the probe says it fits."""
        from tqdm import tqdm

        from rome_jax.editors.batch import edit_batch, prepare_batch, solve_targets
        from rome_jax.rome.edit import build_batch, stack_batches

        args, hp = self.args, self.memit_hp
        model, _, _ = self.model()
        requests = self.requests(model, args.batch)
        if len(requests) < args.batch:
            raise ValueError(f"--batch {args.batch}: only {len(requests)} CounterFact records "
                             "fit")
        chunk = min(args.chunk, args.batch)
        start = time.perf_counter()
        context = prepare_batch(model, "memit", hp, templates=self.memit_templates,
                                stats=self.window_stats)
        self.row("MEMIT prepare (C per layer to the device)", None,
                 time.perf_counter() - start)
        edit = functools.partial(edit_batch, model, method="memit", hparams=hp,
                                 context=context, chunk=chunk)
        start = time.perf_counter()
        warm = edit(requests[:chunk])
        jax.block_until_ready(warm.edit)
        warm_s = time.perf_counter() - start
        start = time.perf_counter()
        targets = jax.block_until_ready(solve_targets(model, requests[:chunk], hp, context,
                                                      chunk=chunk))
        solve_s = time.perf_counter() - start
        probe = edit(requests[:chunk], targets=targets)
        jax.block_until_ready(probe.edit)
        update_s = probe.report.seconds_update
        self.row(f"MEMIT {chunk} records (warm-up, then steady)", warm_s, solve_s + update_s,
                 solve_s=round(solve_s, 3), update_s=round(update_s, 3),
                 solve_s_per_fact=round(solve_s / chunk, 4))
        # Each chunk of v* solves is one program per padded shape (compiled inside the batch's
        # seconds_solve when new); the batch's keys and closed forms compile once more for B.
        shape = lambda rs: tuple(x.shape for x in stack_batches(model, [
            build_batch(model, r, context.templates, hp.v.fact_token) for r in rs]))
        shapes = {shape(requests[i:i + chunk]) for i in range(0, args.batch, chunk)}
        new_shapes = len(shapes - {shape(requests[:chunk])})
        compile_solve = max(0.0, warm.report.seconds_solve - solve_s)
        compile_update = max(0.0, warm.report.seconds_update - update_s)
        estimate = (math.ceil(args.batch / chunk) * (solve_s + update_s)
                    + new_shapes * compile_solve + compile_update)
        if not budget.allows(f"{self.name} MEMIT batch of {args.batch}", estimate):
            return
        start = time.perf_counter()
        result = edit(requests, progress=lambda xs: tqdm(xs, total=args.batch, leave=False,
                                                         desc="MEMIT v*"))
        jax.block_until_ready(result.edit)
        wall = time.perf_counter() - start
        report = result.report
        self.row(f"MEMIT batch of {args.batch} (layers {hp.layers[0]}-{hp.layers[-1]})", None,
                 wall, solve_s=round(report.seconds_solve, 2),
                 update_s=round(report.seconds_update, 2),
                 s_per_fact=round(wall / args.batch, 4), chunk_shapes=len(shapes),
                 estimate_s=round(estimate, 1), v_steps=hp.v.v_num_grad_steps)
        if peak_memory():  # None on CPU
            self.row("device memory after phase B", memory_gb=peak_memory())


def stats_selection(tok, texts: list[str], n_tokens: int) -> list[str]:
    """The first ``texts`` that hold ``n_tokens`` tokens (all of them if fewer)."""
    total = 0
    for i, ids in enumerate(tok.encode_sequences(texts)):
        total += len(ids)
        if total >= n_tokens:
            return texts[:i + 1]
    return texts


def table(rows: list[dict]) -> str:
    lines = ["| model | phase | first call (s) | steady (s) | notes |", "|---|---|---|---|---|"]
    fmt = lambda x: "-" if x is None else f"{x:.3f}" if x < 10 else f"{x:.1f}"
    for r in rows:
        notes = ", ".join(f"{k}={v}" for k, v in r.items()
                          if k not in ("model", "phase", "first_s", "steady_s"))
        lines.append(f"| {r['model']} | {r['phase']} | {fmt(r['first_s'])} | "
                     f"{fmt(r['steady_s'])} | {notes} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="gpt2-xl,gpt-j-6b,llama-2-7b")
    p.add_argument("--batch", type=int, default=1000,
                   help="MEMIT batch size (0: no MEMIT)")
    p.add_argument("--stats-tokens", type=int, default=100_000)
    p.add_argument("--budget-s", type=float, default=600.0)
    p.add_argument("--scale", type=float, default=1.0)
    p.add_argument("--v-steps", type=int, default=None, help="default: the presets'")
    p.add_argument("--chunk", type=int, default=32, help="MEMIT's requests per program")
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    p.add_argument("--matmul-n", type=int, default=None,
                   help="matmul size (default 8192 on an accelerator, 1024 on CPU)")
    args = p.parse_args()
    names = args.models.split(",")
    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        p.error(f"--models: unknown {', '.join(unknown)} (known: {', '.join(CONFIGS)})")
    if not 0 < args.scale <= 1:
        p.error(f"--scale: {args.scale} must be in (0, 1]")
    for flag in ("batch", "stats_tokens", "chunk", "v_steps", "matmul_n"):
        value = getattr(args, flag)
        if value is not None and value < (0 if flag == "batch" else 1):
            p.error(f"--{flag.replace('_', '-')}: {value} is out of range")

    budget = Budget(args.budget_s)
    from rome_jax import data, load_model

    device = jax.devices()[0]
    n = args.matmul_n or (1024 if device.platform == "cpu" else 8192)
    rates = {args.dtype: matmul_rate(n, jnp.dtype(args.dtype)),
             "float32": matmul_rate(n, jnp.float32)}
    header = (f"device: {device.device_kind} ({device.platform}, {jax.device_count()} "
              f"device(s)); jax {jax.__version__}; "
              f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; matmul "
              f"{n}^3: " + ", ".join(f"{k} {v:,.0f} GFLOP/s" for k, v in rates.items()))
    print(header, flush=True)
    tokenizer = load_model().tokenizer  # GPT-2's, from the embedded default model
    texts = data.load_wikitext()
    stats_texts = stats_selection(tokenizer, texts, args.stats_tokens)
    records = data.load_counterfact()
    benches = [Bench(name, args, tokenizer, texts, stats_texts, records) for name in names]
    for phase in ("A", "B"):
        for bench in benches:
            if phase == "B" and not args.batch:
                continue
            if not budget.allows(f"{bench.name} phase {phase}", 90.0 if phase == "A" else 60.0):
                continue
            try:
                bench.phase_a() if phase == "A" else bench.phase_b(budget)
            except Exception as err:  # one model's failure must not cost the others' numbers
                traceback.print_exc()
                bench.row(f"phase {phase} failed", error=f"{type(err).__name__}: {err}")
    rows = [r for bench in benches for r in bench.rows]
    print("\n" + header + "\n")
    print(table(rows))
    if budget.skipped:
        print("\nskipped (--budget-s):\n" + "\n".join(f"- {line}" for line in budget.skipped))
    print(json.dumps({"header": header, "matmul_gflops": rates, "args": vars(args),
                      "rows": rows, "skipped": budget.skipped}))


if __name__ == "__main__":
    main()
