"""Collapse cases vs normal cases ("The Fall of ROME", Tables 1 and 2).

Every CounterFact record whose subject is one token at the start of its prompt (for this
model's tokenizer), and ``--n`` records drawn from the rest, are edited once each from the base
model with ``rome`` and ``c-rome`` (``screening.screen_record``: ME-PPL_50 perplexity, update
diagnostics, efficacy). A record is a *collapse case* when its ``rome`` edit multiplies
perplexity by more than ``--threshold`` (the HardCF analogue for this model); the *normal
cases* are the drawn records that do not collapse; first-token records below the threshold are
a third group. Table 1 gives each group's mean numerator ‖v* − W k − b‖ and mean |denominator|
kᵀu/‖u‖ in the original code's units (u = C⁻¹k̄ for ``rome``), Table 2 the largest perplexity
after each method beside the unedited model's.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from rome_jax.experiments.journal import NUMBER, require
from rome_jax.experiments.report import (Report, grouped, markdown_table, pyplot, run_label,
                                         save_figure, stats)

NAME = "collapse"
HELP = "collapse vs normal cases: numerator, denominator, max perplexity (Fall of ROME T1-2)"
METHODS = ("rome", "c-rome")
GROUPS = ("collapse", "normal", "first-token, below threshold")


def add_args(p) -> None:
    from rome_jax.arguments import ratio_above_one

    add_record_args(p)
    p.add_argument("--threshold", type=ratio_above_one, default=10.0, metavar="X",
                   help="a collapse case: rome multiplies ME-PPL_50 perplexity by more than X "
                        "(default 10)")


def add_record_args(p) -> None:
    p.add_argument("--n", type=int, default=100,
                   help="records drawn from those whose subject is not the first token "
                        "(default 100); every first-token record is edited too")
    p.add_argument("--max-first", type=int, metavar="K",
                   help="edit only the first K first-token records (default: all)")
    p.add_argument("--sample-seed", type=int, default=0,
                   help="numpy seed of the drawn records (default 0)")
    p.add_argument("--case-ids", metavar="FILE.json",
                   help="edit these case ids instead (a JSON list)")


def settings(args) -> dict:
    return {"methods": list(METHODS), "threshold": args.threshold,
            "sample_seed": args.sample_seed}


EDIT_FIELDS = {"residual_norm": NUMBER, "denominator_unit_u": NUMBER, "delta_norm": NUMBER,
               "perplexity": NUMBER, "ratio": NUMBER, "success": bool}


def check_group_row(row: Mapping) -> None:
    """ValueError naming the first field that ``group_of`` and ``chosen`` need and a row
    lacks (what other experiments read of a baseline)."""
    require(row, {"key": int, "case_id": int})
    if "error" not in row:
        require(row, {"first_token_subject": bool, "rome": {"ratio": NUMBER}})


def check_row(row: Mapping) -> None:
    """ValueError naming the first field a row of ``compute_row``'s shape lacks."""
    check_group_row(row)
    if "error" not in row:
        require(row, {"base_perplexity": NUMBER, **{m: EDIT_FIELDS for m in METHODS}})


def chosen_records(s, args) -> list[dict]:
    """The records to edit, first-token records first (see the module docstring)."""
    from rome_jax.arguments import read_case_ids
    from rome_jax.data import counterfact_by_case_id, load_counterfact
    from rome_jax.experiments.records import first_token_and_sample
    from rome_jax.training import first_token_subject

    if args.n < 0 or (args.max_first is not None and args.max_first < 0):
        raise ValueError("--n and --max-first: must be 0 or more")
    records = load_counterfact()
    if args.case_ids:
        chosen = counterfact_by_case_id(records, read_case_ids(args.case_ids))
        first = [r for r in chosen if first_token_subject(r, s.model.tokenizer)]
        return first[:args.max_first] + [r for r in chosen if r not in first]
    first, others = first_token_and_sample(records, s.model.tokenizer, args.n, args.sample_seed)
    if not first[:args.max_first] + others:
        raise ValueError(f"--n {args.n} and --max-first {args.max_first}: select no records")
    return counterfact_by_case_id(records, first[:args.max_first] + others)


def compute_row(s, record: Mapping, threshold: float, solved=None) -> dict:
    """One record edited with each method: ``{key, case_id, subject, first_token_subject,
    rome: screen row, c-rome: screen row}`` (an ``error`` instead when it does not fit). The
    keys and v* are solved once (or given: ``solved``) and shared by the methods."""
    from rome_jax.rome.edit import solve
    from rome_jax.rome.request import EditRequest
    from rome_jax.screening import screen_record

    row = {"key": int(record["case_id"]), "case_id": int(record["case_id"])}
    if solved is None:
        try:
            solved = solve(s.model, EditRequest.from_dict(record), s.hparams,
                           context=s.context)
        except ValueError:  # the request does not fit: screen_record says why, in the row
            pass
    for method in METHODS:
        screened = screen_record(s.model, record, s.hparams, s.context, s.probe, method,
                                 threshold, solved=solved)
        row.update(subject=screened["subject"],
                   first_token_subject=screened["first_token_subject"])
        if "error" in screened:
            return {**row, "error": screened["error"]}
        row[method] = {k: v for k, v in screened.items()
                       if k not in ("case_id", "subject", "prompt", "target_new",
                                    "first_token_subject", "subject_first")}
    row["base_perplexity"] = s.probe.base
    return row


def run_rows(s, records: Sequence[Mapping], journal, threshold: float, desc: str,
             batch: int) -> None:
    """A row per record not yet in ``journal``, keys and v* solved ``batch`` at a time."""
    from tqdm import tqdm

    from rome_jax.experiments.records import with_solved

    todo = [r for r in records if int(r["case_id"]) not in journal]
    for record, solved in tqdm(with_solved(s, todo, batch), total=len(todo), desc=desc,
                               unit="record"):
        journal.append(compute_row(s, record, threshold, solved))


def run(s, args, journal, header: Mapping) -> None:
    run_rows(s, chosen_records(s, args), journal, args.threshold, NAME, args.batch)


# ----------------------------------------------------------------------------- as a baseline


def add_baseline_arg(p, default_bos: str = "[-bos]", any_layer: bool = False) -> None:
    """--baseline: the finished collapse run that another experiment starts from (of the
    same layer unless ``any_layer``)."""
    p.add_argument("--baseline", metavar="DIR",
                   help="the finished collapse run of the same model"
                        + (", any layer" if any_layer else " and layer")
                        + f" (default experiments/MODEL/collapse-lLAYER{default_bos})")


def baseline_dir(header: Mapping, bos: int | None) -> Path:
    """The folder of the collapse run an experiment starts from: its ``--baseline``, else
    ``collapse-lLAYER`` (``-bos`` when made with start token ``bos``) beside its own."""
    st = header["settings"]
    return (Path(st["baseline"]) if st.get("baseline") else Path(header["out"]).parent
            / f"collapse-l{st['layer']}{'' if bos is None else '-bos'}")


def baseline(header: Mapping, bos: int | None, full: bool = False, any_layer: bool = False
             ) -> tuple[dict, list[dict]]:
    """(header, rows) of that collapse run; it must have been made with the weights and layer
    of ``header``'s run (any layer with ``any_layer``: for an experiment that takes only the
    records' groups, which are properties of the records at the baseline's layer) and with
    start token ``bos`` (None: without one). Its rows must have what grouping needs, or
    (``full``) every field of a collapse row."""
    from rome_jax.experiments.journal import read_rows

    path = baseline_dir(header, bos) / "rows.jsonl"
    if not path.exists():
        start = "without --bos" if bos is None else "with --bos"
        raise FileNotFoundError(f"--baseline: {path} does not exist; run `rome-jax experiment "
                                f"collapse` with the same model and layer ({start}) first")
    base_header, rows = read_rows(path, NAME, check_row if full else check_group_row)
    st, base = header["settings"], base_header["settings"]
    try:
        require(base, {"threshold": NUMBER, "sample_seed": int})
    except ValueError as err:
        raise ValueError(f"--baseline {path}: settings.{err}") from None
    want = {"digest": st["digest"], "bos": bos, **({} if any_layer else {"layer": st["layer"]})}
    differ = [k for k, v in want.items() if base.get(k) != v]
    if differ:
        raise ValueError(f"--baseline {path.parent}: made with another "
                         + ", ".join(f"{k} ({base.get(k)}, not {want[k]})" for k in differ)
                         + "; it must be the collapse run of this model"
                         + ("" if any_layer else " and layer"))
    return base_header, rows


def chosen(base_header: Mapping, base_rows: Sequence[Mapping], n_normal: int
           ) -> list[tuple[str, int, bool]]:
    """(group, case id, first-token subject) of every collapse case and first-token record of
    a collapse run and of its first ``n_normal`` normal cases, in the run's order."""
    threshold = base_header["settings"]["threshold"]
    out, normal = [], 0
    for r in base_rows:
        g = group_of(r, threshold)
        if g is None or (g == "normal" and normal >= n_normal):
            continue
        normal += g == "normal"
        out.append((g, int(r["case_id"]), bool(r["first_token_subject"])))
    return out


# ----------------------------------------------------------------------------- report


def group_of(row: Mapping, threshold: float) -> str | None:
    if "error" in row:
        return None
    if not row["rome"]["ratio"] <= threshold:  # NaN and inf collapse too
        return "collapse"
    return "first-token, below threshold" if row["first_token_subject"] else "normal"


def group_summary(rows: Sequence[Mapping]) -> dict:
    """Per method: the update's numerator and |denominator| in the original code's units,
    ‖Δ‖, perplexity and its ratio, and efficacy over ``rows``."""
    out = {}
    for m in METHODS:
        edits = [r[m] for r in rows]
        out[m] = {"numerator": stats([e["residual_norm"] for e in edits]),
                  "abs_denominator": stats([abs(e["denominator_unit_u"]) for e in edits]),
                  "negative_denominators": sum(e["denominator_unit_u"] < 0 for e in edits),
                  "delta_norm": stats([e["delta_norm"] for e in edits]),
                  "perplexity": stats([e["perplexity"] for e in edits]),
                  "ratio": stats([e["ratio"] for e in edits]),
                  "efficacy": float(np.mean([bool(e["success"]) for e in edits]))}
    return out


def summarize(rows: Sequence[Mapping], threshold: float) -> dict:
    groups = grouped(rows, lambda r: group_of(r, threshold))
    base = [r["base_perplexity"] for r in rows if "error" not in r]
    return {"threshold": threshold, "base_perplexity": base[0] if base else None,
            "skipped": [r["case_id"] for r in rows if "error" in r],
            "groups": {g: {"n": len(groups[g]), "case_ids": [r["case_id"] for r in groups[g]],
                           **group_summary(groups[g])} for g in GROUPS if g in groups}}


def tables(summary: Mapping, title: str) -> str:
    groups = summary["groups"]
    t1 = markdown_table(
        ["cases", "n", "method", "mean ‖v*−Wk−b‖", "mean abs kᵀu/‖u‖", "negative", "mean ‖Δ‖",
         "efficacy"],
        [[g, v["n"], m, v[m]["numerator"]["mean"], v[m]["abs_denominator"]["mean"],
          v[m]["negative_denominators"], v[m]["delta_norm"]["mean"], v[m]["efficacy"]]
         for g, v in groups.items() for m in METHODS])
    t2 = markdown_table(
        ["cases", "n", "unedited", "max after rome", "max after c-rome", "max ratio rome",
         "max ratio c-rome", "median ratio rome", "median ratio c-rome"],
        [[g, v["n"], summary["base_perplexity"], v["rome"]["perplexity"]["max"],
          v["c-rome"]["perplexity"]["max"], v["rome"]["ratio"]["max"],
          v["c-rome"]["ratio"]["max"], v["rome"]["ratio"]["median"],
          v["c-rome"]["ratio"]["median"]] for g, v in groups.items()])
    skipped = (f"\n\nSkipped (the request does not fit the model): {summary['skipped']}"
               if summary["skipped"] else "")
    return (f"{title}\n\nTable 1: the update's numerator and denominator (original code's "
            f"units), per group.\n\n{t1}\n\nTable 2: ME-PPL_50 perplexity, largest after one "
            f"edit, per group.\n\n{t2}{skipped}")


def figure(rows: Sequence[Mapping], threshold: float, title: str):
    def draw(path: Path) -> None:
        plt = pyplot()

        fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
        colours = dict(zip(GROUPS, ("tab:red", "tab:blue", "tab:orange")))
        groups = grouped(rows, lambda r: group_of(r, threshold))
        for g, rs in groups.items():
            left.scatter([abs(r["rome"]["denominator_unit_u"]) for r in rs],
                         [r["rome"]["ratio"] for r in rs], s=14, c=colours[g], label=g)
        left.axhline(threshold, color="grey", lw=0.8, ls="--")
        left.set(xscale="log", yscale="log", xlabel="|kᵀu|/‖u‖ of the rome edit",
                 ylabel="perplexity after / before", title="rome: denominator vs perplexity")
        left.legend(fontsize=8)
        names = [g for g in GROUPS if g in groups]
        data = [[r[m]["ratio"] for r in groups[g]] for g in names for m in METHODS]
        right.boxplot(data, showfliers=True)
        right.set_xticks(range(1, len(data) + 1),
                         [f"{g.split(',')[0]}\n{m}" for g in names for m in METHODS], fontsize=8)
        right.set(yscale="log", ylabel="perplexity after / before",
                  title="perplexity ratio per group and method")
        save_figure(fig, path, title)
    return draw


def describe(header: Mapping, threshold: float) -> str:
    return f"{run_label(header['settings'])}, threshold {threshold:g}x"


def report(header: Mapping, rows: Sequence[Mapping]) -> Report:
    threshold = header["settings"]["threshold"]
    summary = summarize(rows, threshold)
    title = f"Collapse vs normal cases: {describe(header, threshold)}."
    return Report(summary, tables(summary, title),
                  figure(rows, threshold, title) if any("error" not in r for r in rows)
                  else None)
