"""The BOS test ("The Fall of ROME" §3.3): the collapse experiment with a start token.

The records of a finished ``collapse`` run (``--baseline``: its folder; by default the one of
the same model and layer) are edited again, with ``rome`` and ``c-rome``, by the model with a
start token before every sequence it reads (``--bos``; default the document separator
``<|endoftext|>``, which is what SmolLM2 and GPT-2 were pretrained with): every collapse case
and first-token record, and the first ``--n`` normal cases. The tables put both runs side by
side, in the groups found without the start token: does the token the model was pretrained with
keep a first-token subject from collapsing?
"""

from __future__ import annotations

from typing import Mapping, Sequence

from rome_jax.experiments import collapse
from rome_jax.experiments.report import Report, markdown_table

NAME = "bos"
check_row = collapse.check_row  # its rows are collapse rows
HELP = "collapse vs normal cases with and without a start token (Fall of ROME §3.3)"


def add_args(p) -> None:
    collapse.add_baseline_arg(p, default_bos=" (made without --bos)")
    p.add_argument("--n", type=int, default=100,
                   help="normal cases of the baseline to edit again (default 100); every "
                        "first-token record is edited again")
    p.set_defaults(bos="<|endoftext|>")  # overrides --bos's own default (none)


def settings(args) -> dict:
    return {"methods": list(collapse.METHODS), "baseline": args.baseline}


def run(s, args, journal, header: Mapping) -> None:
    from rome_jax.data import counterfact_by_case_id, load_counterfact

    base_header, base_rows = collapse.baseline(header, None, full=True)
    ids = [i for _, i, _ in collapse.chosen(base_header, base_rows, args.n)]
    if not ids:
        raise ValueError(f"--n {args.n}: selects no record of the baseline "
                         f"{collapse.baseline_dir(header, None)}")
    collapse.run_rows(s, counterfact_by_case_id(load_counterfact(), ids), journal,
                      base_header["settings"]["threshold"], NAME, args.batch)


def report(header: Mapping, rows: Sequence[Mapping]) -> Report:
    path = collapse.baseline_dir(header, None)
    base_header, base_rows = collapse.baseline(header, None, full=True)
    threshold = base_header["settings"]["threshold"]
    group = {r["case_id"]: collapse.group_of(r, threshold) for r in base_rows}
    done = {r["case_id"] for r in rows}
    before = [r for r in base_rows if r["case_id"] in done]
    with_bos = [{**r, "group": group.get(r["case_id"])} for r in rows]
    table = []
    summary = {"threshold": threshold, "baseline": str(path), "groups": {}}
    for g in collapse.GROUPS:
        pair = {"without": [r for r in before if group[r["case_id"]] == g],
                "with": [r for r in with_bos if r["group"] == g and "error" not in r]}
        if not pair["without"]:
            continue
        summary["groups"][g] = {}
        for when, rs in pair.items():
            if not rs:
                continue
            v = collapse.group_summary(rs)
            summary["groups"][g][when] = {"n": len(rs), **v}
            table += [[g, when, len(rs), m, v[m]["ratio"]["median"], v[m]["ratio"]["max"],
                       sum(1 for r in rs if not r[m]["ratio"] <= threshold),
                       v[m]["abs_denominator"]["mean"], v[m]["numerator"]["mean"],
                       v[m]["delta_norm"]["mean"], v[m]["efficacy"]] for m in collapse.METHODS]
    title = (f"The BOS test: {collapse.describe(header, threshold)}, against the same records "
             f"without it ({path}); groups as found without the start token.")
    md = markdown_table(["cases", "start token", "n", "method", "median ratio", "max ratio",
                         f"> {threshold:g}x", "mean abs kᵀu/‖u‖", "mean ‖v*−Wk−b‖", "mean ‖Δ‖",
                         "efficacy"], table)
    return Report(summary, f"{title}\n\n{md}")
