"""Measure the first-token effect on the default model and add it to its model card.

    python scripts/default_model_report.py [--model DIR] [--n-later 200]

At the edit layer: mean cos(k^u, k̄) for single-token subjects at position 0 against subjects
later in the prompt, and the median ratio of the consistent to the original denominator.
Writes first_token_effect.json beside the model and a section of its README.md.
"""

import argparse
import json
import os
from pathlib import Path

import jax
import numpy as np

from rome_jax import data, load_model
from rome_jax.diagnostics import key_geometry, summarize_geometry
from rome_jax.hf import DEFAULT_MODEL
from rome_jax.rome.edit import prepare
from rome_jax.rome.hparams import preset_for
from rome_jax.rome.request import EditRequest
from rome_jax.training import first_token_subject

BEGIN, END = "<!-- first-token-effect -->", "<!-- /first-token-effect -->"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL,
                        help="model directory (default: the embedded default model)")
    parser.add_argument("--n-later", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    model = load_model(args.model)
    hparams = preset_for(model.config)
    context = prepare(model, hparams, jax.random.key(args.seed), log=print)
    trained = set(json.loads((args.model / "training_case_ids.json").read_text()))
    records = [r for r in data.load_counterfact() if r["case_id"] in trained]
    first = [r for r in records if first_token_subject(r, model.tokenizer)]
    later = [r for r in records if not r["requested_rewrite"]["prompt"].startswith("{}")]
    later = [later[i] for i in np.random.default_rng(args.seed).permutation(len(later))[
        :args.n_later]]
    rows = key_geometry(model, [EditRequest.from_dict(r) for r in first + later],
                        context.templates, hparams.layer, context.factor, hparams.fact_token)
    summary = summarize_geometry(rows)
    result = {"layer": hparams.layer, "summary": summary, "rows": rows,
              "templates": list(context.templates.templates)}
    out = args.model / "first_token_effect.json"
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=2))
    os.replace(tmp, out)

    s_first, s_later = summary["subject_first"], summary["subject_later"]
    section = f"""{BEGIN}
## First-token effect (`python scripts/default_model_report.py`)
At the edit layer {hparams.layer}, over the trained records, with the 21 context templates
sampled from the model with `jax.random.key({args.seed})`:

| subjects | n | mean cos(k^u, k̄) | median (C⁻¹k̄)ᵀk̄ / (C⁻¹k̄)ᵀk^u | median (C⁻¹k̄)ᵀk^u |
| --- | --- | --- | --- | --- |
| single token at position 0 | {s_first['n']} | {s_first['mean_cosine']:.3f} | {s_first['median_denominator_ratio']:.2f} | {s_first['median_denominator_rome']:.3g} |
| later in the prompt | {s_later['n']} | {s_later['mean_cosine']:.3f} | {s_later['median_denominator_ratio']:.2f} | {s_later['median_denominator_rome']:.3g} |

Per-record numbers: `first_token_effect.json`.
{END}
"""
    card_path = args.model / "README.md"
    card = card_path.read_text()
    if BEGIN in card:
        card = card[:card.index(BEGIN)] + section + card[card.index(END) + len(END) + 1:]
    else:
        card = card.rstrip() + "\n\n" + section
    tmp = card_path.with_suffix(".md.tmp")
    tmp.write_text(card)
    os.replace(tmp, card_path)
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
