#!/usr/bin/env bash
# The SmolLM2 collapse screens of the README (resumable: re-running skips finished records).
#   bash scripts/smollm2_screens.sh LAYER [LAYER ...]      (results in runs/, log on stderr)
# rome and c-rome at each layer on the 29 first-token records, then on the 100 others
# (benchmarks/smollm2_screen_case_ids.json), then both with --bos on the first-token records.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
ids=benchmarks/smollm2_screen_case_ids.json
first=benchmarks/smollm2_first_token_case_ids.json
screen() { .venv/bin/rome-jax screen --model smollm2-135m --threshold 10 "$@"; }
for group in "$first" "$ids"; do   # the first-token records first, then all 129
  for layer in "$@"; do
    for method in rome c-rome; do
      screen --layer "$layer" --method "$method" --n 129 --case-ids "$group" \
        --out "runs/smollm2_l${layer}_${method}.json"
    done
  done
done
for layer in "$@"; do
  for method in rome c-rome; do
    screen --layer "$layer" --method "$method" --n 29 --case-ids "$first" --bos \
      --out "runs/smollm2_l${layer}_${method}_bos.json"
  done
done
