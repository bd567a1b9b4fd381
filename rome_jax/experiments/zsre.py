"""zsRE: ROME's zsRE metrics for each edit method on a fixed sample (ROME's zsRE table).

``--n`` zsRE records (the first ``--n`` of a permutation of the whole file drawn with numpy
seed ``--sample-seed``, so a larger ``--n`` extends the same sample) are each edited once from
the base model with each of ``--methods``; the keys and v* of a record are solved once and
shared by the methods. Each record is scored before and after every edit with ROME's token
accuracies (``zsre_eval``): efficacy (the question), paraphrase (the rephrased question) and
specificity (an unrelated Natural Questions prompt), with the edit's |Δ| and the ME-PPL_50
perplexity ratio. The table gives, per method, each metric's mean ± 95% confidence interval
over records in percent, as ROME prints it, for all records and split by whether the subject is
one token at the start of the question.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from rome_jax.experiments.report import (Report, grouped, markdown_table, pyplot, run_label,
                                         save_figure, stats)

NAME = "zsre"
HELP = "zsRE efficacy, paraphrase and specificity (token accuracy) per method (ROME)"
GROUPS = ("all", "first-token subject", "other subjects")


def add_args(p) -> None:
    p.add_argument("--n", type=int, default=100,
                   help="zsRE records to edit (default 100): the first N of a seeded "
                        "permutation, so a larger N extends the same sample")
    p.add_argument("--sample-seed", type=int, default=0,
                   help="numpy seed of the permutation (default 0)")
    p.add_argument("--methods", default="rome,c-rome,p-rome",
                   help="comma-separated methods (default rome,c-rome,p-rome; r-rome is c-rome)")


def methods_of(text: str) -> list[str]:
    """The methods of ``--methods``, canonical (r-rome is c-rome), each once, in order."""
    from rome_jax.editors.rome import canonical_method

    out = []
    for name in (m.strip() for m in text.split(",")):
        try:
            method = canonical_method(name)
        except ValueError as err:
            raise ValueError(f"--methods: {err}") from None
        if method not in out:
            out.append(method)
    if not out:
        raise ValueError("--methods: give at least one method")
    return out


def settings(args) -> dict:
    if args.n < 1:
        raise ValueError("--n: must be 1 or more")
    return {"methods": methods_of(args.methods), "sample_seed": args.sample_seed}


def sample_ids(n_records: int, n: int, seed: int) -> list[int]:
    """The first ``n`` case ids (indices into the zsRE file) of a permutation drawn with numpy
    seed ``seed``, in that order."""
    if n > n_records:
        raise ValueError(f"--n: {n} asked, the zsRE file has {n_records} records")
    return [int(i) for i in np.random.default_rng(seed).permutation(n_records)[:n]]


def check_row(row: Mapping) -> None:
    """ValueError naming the first top-level field a row lacks."""
    from rome_jax.experiments.journal import require

    require(row, {"key": int, "case_id": int})
    if "error" not in row:
        require(row, {"first_token_subject": bool, "none": dict})


def run(s, args, journal, header: Mapping) -> None:
    from tqdm import tqdm

    from rome_jax.data import load_zsre
    from rome_jax.experiments.records import with_solved
    from rome_jax.zsre_eval import evaluate_record, zsre_record

    st = header["settings"]
    records = load_zsre()
    todo = [i for i in sample_ids(len(records), args.n, st["sample_seed"]) if i not in journal]
    solved = with_solved(s, todo, args.batch, lambda i: zsre_record(records[i], i))
    for case_id, keys_v in tqdm(solved, total=len(todo), desc=NAME, unit="record"):
        row = evaluate_record(s.model, records[case_id], case_id, s.hparams, s.context,
                              s.probe, st["methods"], keys_v)
        journal.append({"key": case_id, **row})


def mean_ci95(values: Sequence[float]) -> dict:
    """Mean and the half-width of its normal-approximation 95% confidence interval,
    1.96 · sd / √n (sample sd; NaN for fewer than two values), and n."""
    x = np.asarray(values, dtype=float)
    mean = float(x.mean()) if x.size else math.nan
    half = float(1.96 * x.std(ddof=1) / math.sqrt(x.size)) if x.size > 1 else math.nan
    return {"mean": mean, "ci95": half, "n": int(x.size)}


def group_of(row: Mapping) -> str | None:
    if "error" in row:
        return None
    return "first-token subject" if row["first_token_subject"] else "other subjects"


def group_summary(rows: Sequence[Mapping], methods: Sequence[str]) -> dict:
    """Per method ("none": unedited): each metric's mean ± 95% CI over the rows where it has
    no error, how many edits failed, and for edits the perplexity ratio and |Δ|."""
    from rome_jax.zsre_eval import METRICS

    out = {}
    for method in ("none", *methods):
        scored = [r[method] for r in rows if "error" not in r[method]]
        out[method] = {m: mean_ci95([s[m] for s in scored]) for m in METRICS}
        out[method]["failed"] = len(rows) - len(scored)
        if method != "none":
            out[method]["ppl_ratio"] = stats([s["ppl_ratio"] for s in scored])
            out[method]["delta_abs"] = stats([s["delta_abs"] for s in scored])
    return out


def summarize(rows: Sequence[Mapping], methods: Sequence[str]) -> dict:
    edited = [r for r in rows if "error" not in r]
    groups = {"all": edited, **grouped(edited, group_of)}
    return {"methods": list(methods),
            "base_perplexity": edited[0]["none"]["perplexity"] if edited else None,
            "skipped": [{"case_id": r["case_id"], "error": r["error"]}
                        for r in rows if "error" in r],
            "groups": {g: {"n": len(groups[g]), **group_summary(groups[g], methods)}
                       for g in GROUPS if groups.get(g)}}


def percent(cell: Mapping) -> str:
    """ROME's "mean (± CI)" in percent."""
    if not cell["n"]:
        return "-"
    ci = "" if math.isnan(cell["ci95"]) else f" ± {100 * cell['ci95']:.1f}"
    return f"{100 * cell['mean']:.1f}{ci}"


def table(summary: Mapping, title: str) -> str:
    from rome_jax.zsre_eval import METRICS

    groups = summary["groups"]
    rows = []
    for g, v in groups.items():
        if g != "all" and v["n"] == groups["all"]["n"]:
            continue  # the split is one-sided: its rows would repeat "all"
        for method in ("none", *summary["methods"]):
            cell = v[method]
            rows.append([g, "unedited" if method == "none" else method, v["n"] - cell["failed"],
                         *(percent(cell[m]) for m in METRICS),
                         cell["ppl_ratio"]["median"] if method != "none" else None,
                         cell["ppl_ratio"]["max"] if method != "none" else None,
                         cell["delta_abs"]["median"] if method != "none" else None])
    md = markdown_table(["subjects", "method", "n", "Efficacy", "Paraphrase", "Specificity",
                         "median ppl ratio", "max ppl ratio", "median abs Δ"], rows)
    skipped = "".join(f"\n- {r['case_id']}: {r['error']}" for r in summary["skipped"])
    first = groups.get("first-token subject", {}).get("n", 0)
    return (f"{title}\n\nToken accuracy in percent, mean ± 95% CI over records (ROME's zsRE "
            f"table); ME-PPL_50 perplexity ratio after / before the edit. First-token "
            f"subjects: {first} of {groups.get('all', {}).get('n', 0)} edited records.\n\n{md}"
            + (f"\n\nSkipped records:{skipped}" if skipped else ""))


def figure(summary: Mapping, title: str):
    from rome_jax.zsre_eval import METRICS

    def draw(path: Path) -> None:
        plt = pyplot()

        v = summary["groups"]["all"]
        methods = ["none", *summary["methods"]]
        fig, ax = plt.subplots(figsize=(7.5, 4))
        width = 0.8 / len(methods)
        for i, method in enumerate(methods):
            cells = [v[method][m] for m in METRICS]
            ax.bar(np.arange(len(METRICS)) + (i - (len(methods) - 1) / 2) * width,
                   [100 * c["mean"] for c in cells], width,
                   yerr=[0 if math.isnan(c["ci95"]) else 100 * c["ci95"] for c in cells],
                   capsize=3, label="unedited" if method == "none" else method)
        ax.set_xticks(range(len(METRICS)), [m.capitalize() for m in METRICS])
        ax.set(ylabel="token accuracy (%)", ylim=(0, 100),
               title=f"all {v['n']} records, mean ± 95% CI")
        ax.legend(fontsize=8)
        save_figure(fig, path, title)
    return draw


def report(header: Mapping, rows: Sequence[Mapping]) -> Report:
    st = header["settings"]
    summary = summarize(rows, st["methods"])
    title = (f"zsRE: {run_label(st)}, {len(rows)} records (sample seed "
             f"{st['sample_seed']}).")
    return Report(summary, table(summary, title),
                  figure(summary, title) if "all" in summary["groups"] else None)
