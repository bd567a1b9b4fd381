"""The BOS test ("The Fall of ROME" §3.3): the collapse experiment with a start token.

The records of a finished ``collapse`` run (``--baseline``: its folder; by default the one of
the same model and layer) are edited again, with ``rome`` and ``c-rome``, by the model with a
start token before every sequence it reads (``--bos``; default the document separator
``<|endoftext|>``, which is what SmolLM2 and GPT-2 were pretrained with): every first-token
record and the first ``--n`` normal cases. The tables put both runs side by side, in the groups
found without the start token: does the token the model was pretrained with keep a first-token
subject from collapsing?
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

from rome_jax.experiments import collapse
from rome_jax.experiments.report import Report, markdown_table

NAME = "bos"
HELP = "collapse vs normal cases with and without a start token (Fall of ROME §3.3)"


def add_args(p) -> None:
    p.add_argument("--baseline", metavar="DIR",
                   help="the collapse run without a start token (default "
                        "experiments/MODEL/collapse-lLAYER)")
    p.add_argument("--n", type=int, default=100,
                   help="normal cases of the baseline to edit again (default 100); every "
                        "first-token record is edited again")
    p.set_defaults(bos="<|endoftext|>")  # overrides --bos's own default (none)


def settings(args) -> dict:
    return {"methods": list(collapse.METHODS), "baseline": args.baseline}


def baseline_dir(header: Mapping, bos: int | None = None) -> Path:
    """The baseline's folder: ``--baseline``, else ``collapse-lLAYER`` (``-bos`` with a start
    token ``bos``) beside this run's."""
    given = header["settings"]["baseline"]
    return (Path(given) if given else Path(header["out"]).parent
            / f"collapse-l{header['settings']['layer']}{'' if bos is None else '-bos'}")


def baseline(header: Mapping, layer: int, bos: int | None = None) -> tuple[dict, list[dict]]:
    """(header, rows) of the finished collapse run made at ``layer`` with start token ``bos``
    (None: without one), found by ``baseline_dir``."""
    from rome_jax.experiments.journal import read_rows

    path = baseline_dir(header, bos) / "rows.jsonl"
    if not path.exists():
        start = "without --bos" if bos is None else "--bos"
        raise FileNotFoundError(f"--baseline: {path} does not exist; run `rome-jax experiment "
                                f"collapse` with the same model and layer ({start}) first")
    header, rows = read_rows(path, collapse.NAME)
    st = header["settings"]
    if st.get("bos") != bos or st["layer"] != layer:
        raise ValueError(f"--baseline {path.parent}: made at layer {st['layer']} with start "
                         f"token {st.get('bos')}; it must be layer {layer} with start token "
                         f"{bos}")
    return header, rows


def run(s, args, journal, header: Mapping) -> None:
    from rome_jax.data import counterfact_by_case_id, load_counterfact

    header, rows = baseline(header, s.hparams.layer)
    threshold = header["settings"]["threshold"]
    normal = [r["case_id"] for r in rows if collapse.group_of(r, threshold) == "normal"]
    ids = [r["case_id"] for r in rows if r.get("first_token_subject")] + normal[:args.n]
    collapse.run_rows(s, counterfact_by_case_id(load_counterfact(), ids), journal, threshold,
                      NAME)


def report(header: Mapping, rows: Sequence[Mapping]) -> Report:
    path = baseline_dir(header)
    base_header, base_rows = baseline(header, header["settings"]["layer"])
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
