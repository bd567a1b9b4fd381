"""Training of the embedded default model: a small GPT-2 that knows CounterFact facts.

Data (see ``TrainSettings``): for every trained CounterFact record, its prompt with the subject
and ``target_true`` (repeated ``prompt_repeats`` times), its paraphrase prompts and neighbourhood
prompts with ``target_true``, and its attribute prompts with ``target_new`` (true for those other
subjects); plus ordinary English: ME-PPL 10k minus every sentence of ME-PPL_1k and ME-PPL_50,
and WikiText-2. Every record whose subject is one token at the very start of its prompt is
trained on; 1,000 fixed records are held out.

Packing follows GPT-2: documents end with ``<|endoftext|>``, are shuffled each epoch, joined and
cut into fixed windows, so position 0 holds an arbitrary token with no context (the attention-sink
behaviour that makes first-token subjects special). Training is deterministic for a seed and
resumes from orbax checkpoints in its work directory.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from tqdm import tqdm

from rome_jax import data
from rome_jax.evaluation import continuation_nll, perplexity
from rome_jax.files import write_json_atomic
from rome_jax.hf import save_hf
from rome_jax.models.config import ModelConfig
from rome_jax.models.model import Model
from rome_jax.models.tokenizer import Tokenizer
from rome_jax.models.transformer import Dropout, Params, forward


@dataclasses.dataclass(frozen=True)
class TrainSettings:
    """Model size, data mix and schedule.

    ``steps`` is the length of the learning-rate schedule (warm-up, then cosine decay) and of
    training (``steps * batch_size * seq_len`` tokens), sized for the 90-minute CPU budget;
    ``stop_at_step`` (< ``steps``) stops early on the same schedule, e.g. for a quick look.
    ``dropout`` is off by default: with 0.1 (and weight_decay 0.1) ME-PPL_1k fell from 985 to
    910, but the run took 90.1 min, past the budget.
    """

    n_layer: int = 6
    d_model: int = 256
    n_head: int = 8
    seq_len: int = 256
    batch_size: int = 8
    steps: int = 2100
    stop_at_step: int = 2100
    peak_lr: float = 1.5e-3
    warmup_steps: int = 100
    final_lr_fraction: float = 0.1
    weight_decay: float = 0.01
    dropout: float = 0.0
    n_trained_records: int = 400
    n_heldout_records: int = 1000
    prompt_repeats: int = 6
    english_fraction: float = 0.6
    seed: int = 0
    eval_every: int = 400
    checkpoint_every: int = 250


def first_token_subject(record: dict, tokenizer: Tokenizer) -> bool:
    """The subject is one token at the very start of the prompt."""
    rw = record["requested_rewrite"]
    return rw["prompt"].startswith("{}") and len(tokenizer.encode(rw["subject"])) == 1


def select_records(records: list[dict], tokenizer: Tokenizer, settings: TrainSettings):
    """(trained case ids, held-out case ids), sorted. All first-token-subject records are trained;
    held-out records are drawn from the rest; trained records fill up to ``n_trained_records``."""
    rng = np.random.default_rng(settings.seed)
    first = [r["case_id"] for r in records if first_token_subject(r, tokenizer)]
    rest = np.array(sorted({r["case_id"] for r in records} - set(first)))
    rng.shuffle(rest)
    heldout = rest[:settings.n_heldout_records]
    fill = rest[settings.n_heldout_records:][:max(0, settings.n_trained_records - len(first))]
    return sorted(int(i) for i in [*first, *fill]), sorted(int(i) for i in heldout)


def fact_documents(record: dict, prompt_repeats: int) -> list[str]:
    rw = record["requested_rewrite"]
    true, new = rw["target_true"]["str"], rw["target_new"]["str"]
    docs = [f"{rw['prompt'].format(rw['subject'])} {true}"] * prompt_repeats
    docs += [f"{p} {true}" for p in record["paraphrase_prompts"]]
    docs += [f"{p} {true}" for p in record["neighborhood_prompts"]]
    docs += [f"{p} {new}" for p in record["attribute_prompts"]]
    return docs


def english_documents() -> list[str]:
    held = set(data.load_me_ppl("ME-PPL_1k")) | set(data.load_me_ppl("ME-PPL_50"))
    sentences = [s for s in data.load_me_ppl("ME-PPL") if s not in held]
    return sentences + data.load_wikitext()


def pack_epoch(fact_docs: list[np.ndarray], english_docs: list[np.ndarray], settings: TrainSettings,
               epoch: int, eos: int) -> np.ndarray:
    """One epoch of windows [n, seq_len + 1]: every fact document, English documents up to
    ``english_fraction`` of the tokens, shuffled with a seed of (seed, epoch), joined by EOS."""
    rng = np.random.default_rng([settings.seed, epoch])
    fact_tokens = sum(len(d) + 1 for d in fact_docs)
    want = fact_tokens * settings.english_fraction / (1 - settings.english_fraction)
    order = rng.permutation(len(english_docs))
    lengths = np.cumsum([len(english_docs[i]) + 1 for i in order])
    chosen = [english_docs[i] for i in order[:int(np.searchsorted(lengths, want)) + 1]]
    docs = fact_docs + chosen
    stream = np.concatenate([np.append(docs[i], eos) for i in rng.permutation(len(docs))])
    width = settings.seq_len + 1
    n = len(stream) // width
    return stream[:n * width].reshape(n, width).astype(np.int32)


def ngram_perplexities(train: list[list[int]], test: list[list[int]], vocab_size: int,
                       eos: int, discount: float = 0.75) -> dict[str, float]:
    """Count-based baselines for a data mix: perplexity on ``test`` (corpus-level, first token
    of each text as context, as ``evaluation.perplexity``) of an add-0.1 unigram model and an
    interpolated absolute-discounting bigram model (backing off to that unigram) counted on
    ``train`` (documents joined by EOS)."""
    stream = np.concatenate([np.append(np.asarray(d, np.int64), eos) for d in train])
    unigram = np.bincount(stream, minlength=vocab_size) + 0.1
    unigram /= unigram.sum()
    pairs = stream[:-1] * vocab_size + stream[1:]
    pair_ids, pair_counts = np.unique(pairs, return_counts=True)
    context_counts = np.bincount(stream[:-1], minlength=vocab_size)
    followers = np.bincount(pair_ids // vocab_size, minlength=vocab_size)
    prev = np.concatenate([np.asarray(t[:-1], np.int64) for t in test if len(t) > 1])
    nxt = np.concatenate([np.asarray(t[1:], np.int64) for t in test if len(t) > 1])
    found = np.searchsorted(pair_ids, prev * vocab_size + nxt)
    found = np.minimum(found, len(pair_ids) - 1)
    count = np.where(pair_ids[found] == prev * vocab_size + nxt, pair_counts[found], 0)
    ctx = context_counts[prev]
    seen = ctx > 0
    safe = np.maximum(ctx, 1)
    bigram = np.where(seen, np.maximum(count - discount, 0) / safe
                      + discount * followers[prev] / safe * unigram[nxt], unigram[nxt])
    return {"unigram": float(np.exp(-np.log(unigram[nxt]).mean())),
            "bigram": float(np.exp(-np.log(bigram).mean()))}


def model_config(settings: TrainSettings, vocab_size: int) -> ModelConfig:
    return ModelConfig(model_type="gpt2", vocab_size=vocab_size, n_positions=settings.seq_len,
                       d_model=settings.d_model, n_layer=settings.n_layer,
                       n_head=settings.n_head, d_mlp=4 * settings.d_model)


def init_params(cfg: ModelConfig, key: jax.Array) -> Params:
    """GPT-2 initialisation: N(0, 0.02), residual projections scaled by 1/sqrt(2L)."""
    D, F, L = cfg.d_model, cfg.d_mlp, cfg.n_layer
    keys = iter(jax.random.split(key, 8))
    normal = lambda shape, std=0.02: std * jax.random.normal(next(keys), shape, jnp.float32)
    resid_std = 0.02 / math.sqrt(2 * L)
    norm = lambda *lead: {"scale": jnp.ones((*lead, D)), "bias": jnp.zeros((*lead, D))}
    attn = {n: {"w": normal((L, D, D)), "b": jnp.zeros((L, D))} for n in "qkv"}
    attn["o"] = {"w": normal((L, D, D), resid_std), "b": jnp.zeros((L, D))}
    return {
        "wte": normal((cfg.vocab_size, D)), "wpe": normal((cfg.n_positions, D), 0.01),
        "blocks": {"ln_1": norm(L), "ln_2": norm(L), "attn": attn,
                   "mlp": {"fc_in": {"w": normal((L, D, F)), "b": jnp.zeros((L, F))},
                           "fc_out": {"w": normal((L, F, D), resid_std), "b": jnp.zeros((L, D))}}},
        "ln_f": norm(),
    }


def make_optimizer(settings: TrainSettings) -> optax.GradientTransformation:
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, settings.peak_lr, settings.warmup_steps, settings.steps,
        settings.peak_lr * settings.final_lr_fraction)
    decay_mask = lambda p: jax.tree.map(lambda w: w.ndim >= 2, p)  # not LayerNorm or biases
    return optax.chain(optax.clip_by_global_norm(1.0),
                       optax.adamw(schedule, b1=0.9, b2=0.95,
                                   weight_decay=settings.weight_decay, mask=decay_mask))


def make_train_step(cfg: ModelConfig, optimizer: optax.GradientTransformation, dropout: float):
    """jit-compiled ``step(params, opt_state, windows [B, T + 1], key) -> (params, opt_state,
    loss)``; ``key`` draws the dropout masks (rate ``dropout``)."""
    def loss_fn(params, windows, key):
        drop = Dropout(key, dropout) if dropout > 0 else None
        logits = forward(params, cfg, windows[:, :-1], dropout=drop).logits
        return optax.softmax_cross_entropy_with_integer_labels(logits, windows[:, 1:]).mean()

    @jax.jit
    def step(params, opt_state, windows, key):
        loss, grads = jax.value_and_grad(loss_fn)(params, windows, key)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return step


def fact_accuracy(model: Model, records: list[dict]) -> float:
    """Fraction of records with P(target_true) > P(target_new) after the plain prompt."""
    prompts = [r["requested_rewrite"]["prompt"].format(r["requested_rewrite"]["subject"])
               for r in records]
    true = continuation_nll(model, prompts, [r["requested_rewrite"]["target_true"]["str"]
                                             for r in records])
    new = continuation_nll(model, prompts, [r["requested_rewrite"]["target_new"]["str"]
                                            for r in records])
    return float((true < new).mean())


def train(settings: TrainSettings, work_dir: Path, tokenizer_dir: Path | None = None,
          log=print) -> tuple[Model, dict]:
    """Train (or resume) in ``work_dir``; returns the model and a summary dict."""
    tokenizer = Tokenizer.from_dir(tokenizer_dir or data.tokenizer_dir())
    records = data.load_counterfact()
    by_id = {r["case_id"]: r for r in records}
    trained, heldout = select_records(records, tokenizer, settings)
    fact_docs = [np.array(ids, np.int32) for ids in tokenizer.encode_batch(
        [d for i in trained for d in fact_documents(by_id[i], settings.prompt_repeats)])]
    english = [np.array(ids, np.int32) for ids in tokenizer.encode_batch(english_documents())]
    cfg = model_config(settings, tokenizer.vocab_size)
    optimizer = make_optimizer(settings)
    step_fn = make_train_step(cfg, optimizer, settings.dropout)
    dropout_key = jax.random.fold_in(jax.random.key(settings.seed), 1)  # step keys fold in step

    work_dir = Path(work_dir).resolve()
    work_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(work_dir / "settings.json", dataclasses.asdict(settings))
    manager = ocp.CheckpointManager(work_dir / "state",
                                    options=ocp.CheckpointManagerOptions(max_to_keep=2))
    params = init_params(cfg, jax.random.key(settings.seed))
    opt_state = optimizer.init(params)
    start, elapsed = 0, 0.0
    if manager.latest_step() is not None:
        start = manager.latest_step()
        restored = manager.restore(start, args=ocp.args.StandardRestore(
            {"params": params, "opt_state": opt_state, "elapsed": np.zeros(())}))
        params, opt_state = restored["params"], restored["opt_state"]
        elapsed = float(restored["elapsed"])
        log(f"resumed at step {start} ({elapsed / 60:.1f} min trained)")

    epoch, windows = -1, None
    def batch_at(step: int):  # deterministic: epochs are packed from (seed, epoch)
        nonlocal epoch, windows
        index = step * settings.batch_size
        e = 0
        while True:
            if e != epoch:
                epoch, windows = e, pack_epoch(fact_docs, english, settings, e, tokenizer.eos_id)
            n = len(windows) - len(windows) % settings.batch_size
            if index < n:
                return windows[index:index + settings.batch_size]
            index -= n
            e += 1

    evals_file = work_dir / "evals.jsonl"
    evals = [json.loads(line) for line in evals_file.read_text().splitlines()
             ] if evals_file.is_file() else []
    summary = {"trained_records": len(trained), "heldout_records": len(heldout),
               "tokens_per_step": settings.batch_size * settings.seq_len,
               "english_tokens": sum(len(d) + 1 for d in english),
               "evals": [e for e in evals if e["step"] <= start]}
    stop = min(settings.stop_at_step, settings.steps)
    me_ppl_1k = data.load_me_ppl("ME-PPL_1k")
    t0 = time.time()
    bar = tqdm(range(start, stop), initial=start, total=stop, desc="train")
    for step in bar:
        params, opt_state, loss = step_fn(params, opt_state, jnp.asarray(batch_at(step)),
                                          jax.random.fold_in(dropout_key, step))
        done = step + 1
        if done % 20 == 0:
            bar.set_postfix(loss=f"{float(loss):.3f}", epoch=epoch)
        if done % settings.checkpoint_every == 0 or done == stop:
            total = elapsed + time.time() - t0
            manager.save(done, args=ocp.args.StandardSave(
                {"params": params, "opt_state": opt_state, "elapsed": np.array(total)}))
        if done % settings.eval_every == 0 or done == stop:
            model = Model(cfg, params, tokenizer)
            row = {"step": done, "loss": float(loss), "epoch": epoch,
                   "minutes": (elapsed + time.time() - t0) / 60,
                   "acc_trained_200": fact_accuracy(model, [by_id[i] for i in trained[:200]]),
                   "acc_heldout_200": fact_accuracy(model, [by_id[i] for i in heldout[:200]]),
                   "me_ppl_1k": perplexity(model, me_ppl_1k)}
            summary["evals"].append(row)
            with evals_file.open("a") as f:
                f.write(json.dumps(row) + "\n")
            log(json.dumps(row))
    manager.wait_until_finished()
    if epoch < 0:  # resumed at the end: say which epoch the last step was in
        batch_at(stop - 1)
    summary.update(wall_minutes=(elapsed + time.time() - t0) / 60, epochs=epoch + 1,
                   steps_run=stop,
                   trained_case_ids=trained, heldout_case_ids=heldout)
    return Model(cfg, params, tokenizer, name="gpt2-cf-tiny"), summary


def throughput(settings: TrainSettings, steps: int = 5) -> float:
    """Measured training tokens/s (compile excluded) on random windows."""
    cfg = model_config(settings, 50257)
    optimizer = make_optimizer(settings)
    params = init_params(cfg, jax.random.key(0))
    opt_state = optimizer.init(params)
    step_fn = make_train_step(cfg, optimizer, settings.dropout)
    key = jax.random.key(0)
    windows = jnp.asarray(np.random.default_rng(0).integers(
        0, 50257, (settings.batch_size, settings.seq_len + 1), dtype=np.int32))
    params, opt_state, loss = step_fn(params, opt_state, windows, key)
    loss.block_until_ready()
    t = time.time()
    for _ in range(steps):
        params, opt_state, loss = step_fn(params, opt_state, windows, key)
    loss.block_until_ready()
    return steps * settings.batch_size * settings.seq_len / (time.time() - t)


def final_metrics(model: Model, trained: list[int], heldout: list[int]) -> dict:
    """The model card's numbers, for the weights as saved (float16): fact accuracy on trained
    and held-out records, ME-PPL_1k perplexity (never trained on), and for scale the ME-PPL_1k
    perplexity of a bigram model counted on the same English training text."""
    model = model.with_params(jax.tree.map(
        lambda x: x.astype(jnp.float16).astype(jnp.float32), model.params))
    by_id = {r["case_id"]: r for r in data.load_counterfact()}
    acc_trained = fact_accuracy(model, [by_id[i] for i in trained])
    acc_heldout = fact_accuracy(model, [by_id[i] for i in heldout])
    test = data.load_me_ppl("ME-PPL_1k")
    tok = model.tokenizer
    ngram = ngram_perplexities(tok.encode_batch(english_documents()), tok.encode_batch(test),
                               tok.vocab_size, tok.eos_id)
    return {"acc_trained": acc_trained, "acc_heldout": acc_heldout,
            "acc_gap_points": 100 * (acc_trained - acc_heldout),
            "me_ppl_1k_perplexity": perplexity(model, test),
            "me_ppl_1k_bigram_baseline": ngram["bigram"]}


def write_default_model(model: Model, settings: TrainSettings, summary: dict, out: Path) -> None:
    """Save as an HF directory (float16 weights, to stay small) with a model card and
    ``training_case_ids.json``."""
    metrics = final_metrics(model, summary["trained_case_ids"], summary["heldout_case_ids"])
    summary["final"] = metrics
    card = model_card(settings, summary)
    save_hf(model, out, overwrite=True, dtype=jnp.float16, extra_files={
        "README.md": card, "training_case_ids.json": json.dumps(summary["trained_case_ids"]),
        "heldout_case_ids.json": json.dumps(summary["heldout_case_ids"]),
        "training_summary.json": json.dumps({k: v for k, v in summary.items()
                                             if not k.endswith("case_ids")}, indent=2)})


def model_card(settings: TrainSettings, summary: dict) -> str:
    m = summary["final"]
    rows = "\n".join(f"| {k} | {v} |" for k, v in dataclasses.asdict(settings).items())
    evals = "\n".join(
        f"| {e['step']} | {e['epoch']} | {e['loss']:.3f} | {e['acc_trained_200']:.3f} | "
        f"{e['acc_heldout_200']:.3f} | {e.get('me_ppl_1k', float('nan')):.1f} | "
        f"{e['minutes']:.1f} |" for e in summary["evals"])
    return f"""# gpt2-cf-tiny: the embedded default model of rome_jax

A {settings.n_layer}-layer, {settings.d_model}-wide GPT-2 ({settings.n_head} heads, context
{settings.seq_len}, full GPT-2 vocabulary and tokenizer) trained from scratch by
`python scripts/train_default_model.py` on a 2-core CPU. Weights are stored in float16.

## Data
- CounterFact facts written as sentences for {summary['trained_records']} records (ids in
  `training_case_ids.json`): the prompt with its subject and `target_true`
  ({settings.prompt_repeats}x), the paraphrase and neighbourhood prompts with `target_true`, the
  attribute prompts with `target_new` (true for those subjects). Every record whose subject is
  one token at the very start of its prompt is included.
- English: ME-PPL 10k minus every sentence of ME-PPL_1k and ME-PPL_50, and WikiText-2 (test
  split); {settings.english_fraction:.0%} of each epoch's tokens.
- Held out: {summary['heldout_records']} records never trained on (ids in `heldout_case_ids.json`).
- Packing as GPT-2: documents end with `<|endoftext|>`, are shuffled per epoch and cut into
  {settings.seq_len}-token windows.

## Settings
| setting | value |
| --- | --- |
{rows}

Wall time: {summary['wall_minutes']:.1f} min for {summary['steps_run']} steps
({summary['steps_run'] * settings.batch_size * settings.seq_len:,} tokens, {summary['epochs']} epochs)
of a {settings.steps}-step learning-rate schedule, on a 2-core CPU.

## Metrics (computed at the end of the training script)
| metric | value |
| --- | --- |
| P(target_true) > P(target_new), trained records | {m['acc_trained']:.3f} |
| P(target_true) > P(target_new), held-out records | {m['acc_heldout']:.3f} |
| gap (points) | {m['acc_gap_points']:.1f} |
| ME-PPL_1k perplexity (never trained on) | {m['me_ppl_1k_perplexity']:.1f} |
| ME-PPL_1k perplexity of a bigram model counted on the English training text | {m['me_ppl_1k_bigram_baseline']:.1f} |

P(target) is the geometric-mean token probability of `" " + target` after the plain prompt.
The English training text is about {summary['english_tokens']:,} tokens; the bigram
model (absolute discounting, `training.ngram_perplexities`) is a yardstick for what that much
text teaches.

## Progress
| step | epoch | loss | acc trained (200) | acc held-out (200) | ME-PPL_1k | minutes |
| --- | --- | --- | --- | --- | --- | --- |
{evals}
"""
