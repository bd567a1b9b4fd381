"""Case ids for a collapse screen: every CounterFact record whose subject is one token at the
start of the prompt for this model's tokenizer, then ``--others`` other records drawn with
``--seed`` (numpy), first-token records first; both groups sorted by case id.

    python scripts/screen_case_ids.py --model smollm2-135m --others 100 \
        --out benchmarks/smollm2_screen_case_ids.json
"""

from __future__ import annotations

import argparse

import numpy as np

from rome_jax import load_model
from rome_jax.data import load_counterfact
from rome_jax.files import write_json_atomic
from rome_jax.training import first_token_subject


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--others", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    tokenizer = load_model(args.model).tokenizer
    records = load_counterfact()
    first = sorted(r["case_id"] for r in records if first_token_subject(r, tokenizer))
    rest = np.array(sorted({r["case_id"] for r in records} - set(first)))
    others = sorted(np.random.default_rng(args.seed).choice(rest, args.others, replace=False))
    write_json_atomic(args.out, first + [int(i) for i in others])
    print(f"{len(first)} first-token records and {len(others)} others -> {args.out}")


if __name__ == "__main__":
    main()
