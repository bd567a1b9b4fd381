"""Where v* starts, per record group: why the test-time prefix helps one model and not another.

An edit writes v* = v_init + δ, with v_init = Wk^u + b the MLP output at the subject's last
token of the plain prompt and ‖δ‖ clamped to ``clamp_norm_factor``·‖v_init‖. For the
first-token records and the first ``--n-normal`` other records (by case id) of a finished
``collapse`` run, this solves each record's keys and v* (``rome.edit.solve``) and prints the
medians per group of ‖v_init‖, ‖Wk̄ + b‖ (the MLP output at the mean prefixed key, which
``c-rome`` overwrites with v*), ‖δ‖, ‖δ‖/‖v_init‖ (the clamp binds at the factor) and
‖v* − Wk̄ − b‖; with ``--out``, also a JSON file of the rows and medians.

    python scripts/value_norms.py --model smollm2-135m --layer 12 \\
        --baseline experiments/smollm2-135m/collapse-l12 --n-normal 20
"""

from __future__ import annotations

import argparse

import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from rome_jax.cli.common import Setup, add_model_args
from rome_jax.data import counterfact_by_case_id, load_counterfact
from rome_jax.experiments.journal import read_rows
from rome_jax.files import write_json_atomic
from rome_jax.models.transformer import rome_weight
from rome_jax.rome.edit import solve

COLUMNS = ("v_init", "W_kbar_b", "delta", "delta_over_v_init", "v_star_minus_W_kbar_b")


def norms(model, hparams, context, record) -> dict:
    """The COLUMNS of one record's solved edit."""
    solved = solve(model, record, hparams, context=context)
    w, b = rome_weight(model.params, hparams.layer)
    values, at_mean = solved.values, solved.keys.mean @ w + b
    n = lambda x: float(jnp.linalg.norm(x))
    return dict(zip(COLUMNS, (n(values.v_init), n(at_mean), n(values.delta),
                              n(values.delta) / n(values.v_init), n(values.v_star - at_mean))))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_model_args(parser)  # --model, --layer, ... as for rome-jax edit
    parser.add_argument("--baseline", required=True, help="folder of a finished collapse run")
    parser.add_argument("--n-normal", type=int, default=20)
    parser.add_argument("--out", default=None, help="JSON file for the rows and medians")
    args = parser.parse_args()
    s = Setup(args)
    _, rows = read_rows(f"{args.baseline}/rows.jsonl", "collapse")
    rows = [r for r in rows if "error" not in r]
    groups = {"first-token": [r["case_id"] for r in rows if r["first_token_subject"]],
              "other": sorted(r["case_id"] for r in rows
                              if not r["first_token_subject"])[:args.n_normal]}
    records = {r["case_id"]: r for r in counterfact_by_case_id(
        load_counterfact(), [i for ids in groups.values() for i in ids])}
    out = {}
    for group, ids in groups.items():
        measured = {i: norms(s.model, s.hparams, s.context, records[i])
                    for i in tqdm(ids, desc=group, unit="record")}
        medians = {c: float(np.median([m[c] for m in measured.values()])) for c in COLUMNS}
        out[group] = {"n": len(ids), "median": medians, "rows": measured}
        print(f"{group} (n={len(ids)}): " + ", ".join(f"{c} {v:.3g}" for c, v in medians.items()))
    if args.out:
        write_json_atomic(args.out, out)


if __name__ == "__main__":
    main()
