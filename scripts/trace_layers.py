"""Average causal trace over CounterFact records a model knows: where to edit (ROME §2.1).

For the first ``--n`` records (by case id) whose clean greedy next token is the first token of
``target_true``, the subject is corrupted and each MLP output (window of 10 blocks) is restored
(``rome_jax.trace.trace``, kind ``mlp``). The indirect effect of a restoration is the restored
probability of the true token minus the corrupted one; its mean over records, at the first and
last subject token and at the last prompt token, is plotted per layer. ROME edits the layer
where the MLP's effect at the last subject token peaks.

    python scripts/trace_layers.py --model smollm2-135m --n 20 --out docs/trace_smollm2.png
    python scripts/trace_layers.py --model gemma3-270m --bos "<bos>" --out docs/trace_gemma3.png

``--bos TOKEN`` prepends a start token to every sequence, as the CLI's ``--bos`` (Gemma needs its
``<bos>``: without it the model is broken).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from rome_jax import load_model
from rome_jax.data import load_counterfact
from rome_jax.files import atomic_file, write_json_atomic
from rome_jax.models.model import logits
from rome_jax.models.tokenizer import EOS_TOKEN
from rome_jax.rome.request import EditRequest
from rome_jax.trace import trace

POSITIONS = ("first subject token", "last subject token", "last token")


def known_records(model, records, n: int) -> list[dict]:
    """The first ``n`` records whose greedy next token starts ``target_true``."""
    tok, chosen = model.tokenizer, []
    for record in records:
        request = EditRequest.from_dict(record)
        ids = tok.encode_sequence(request.text)
        top = int(jnp.argmax(logits(model, jnp.asarray([ids]))[0, -1]))
        if top == tok.encode(" " + request.target_true.strip())[0]:
            chosen.append(record)
            if len(chosen) == n:
                break
    return chosen


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--n", type=int, default=20)
    parser.add_argument("--samples", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--bos", nargs="?", const=EOS_TOKEN, default=None, metavar="TOKEN")
    parser.add_argument("--out", default="docs/trace_smollm2.png")
    args = parser.parse_args()
    model = load_model(args.model)
    model = model if args.bos is None else model.with_bos(args.bos)
    records = known_records(model, load_counterfact(), args.n)
    subjects = [r["requested_rewrite"]["subject"] for r in load_counterfact()[:500]]
    rows = []
    for i, record in enumerate(tqdm(records, desc="trace", unit="record")):
        rw = record["requested_rewrite"]
        result = trace(model, rw["prompt"], rw["subject"], rw["target_true"]["str"],
                       key=jax.random.fold_in(jax.random.key(args.seed), i),
                       samples=args.samples, kinds=("mlp",), std_subjects=subjects)
        grid = result.scores["mlp"] - result.low_score          # [tokens, layers]
        first, end = result.subject_range
        rows.append({"case_id": record["case_id"], "subject": rw["subject"],
                     "high": result.high_score, "low": result.low_score,
                     "effects": {name: grid[t].tolist() for name, t in zip(
                         POSITIONS, (first, end - 1, grid.shape[0] - 1))}})
    mean = {name: np.mean([r["effects"][name] for r in rows], 0) for name in POSITIONS}
    peak = int(np.argmax(mean["last subject token"]))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out.with_suffix(".json"), {
        "model": args.model, "bos": args.bos, "n": len(rows), "samples": args.samples,
        "seed": args.seed,
        "mean_effect": {k: v.tolist() for k, v in mean.items()},
        "peak_layer_last_subject_token": peak, "records": rows})

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.2))
    for name in POSITIONS:
        ax.plot(mean[name], marker="o", ms=3, label=name)
    ax.axvline(peak, color="grey", ls=":", lw=1)
    ax.set_xlabel("layer (centre of 10 restored MLPs)")
    ax.set_ylabel("mean indirect effect on p(true)")
    ax.set_title(f"{args.model}: restoring MLP outputs, {len(rows)} known facts", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_file(out, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=110)
    print(f"{len(rows)} records; peak MLP effect at the last subject token: layer {peak}; "
          f"wrote {out} and {out.with_suffix('.json')}")


if __name__ == "__main__":
    main()
