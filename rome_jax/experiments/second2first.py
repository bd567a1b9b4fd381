"""Second2First: the position embedding's share in the first-token anomaly ("The Fall of ROME",
the slides' "Impact of position embedding").

A first-token subject differs from a later one in two ways: at position 0 a token attends only
to itself, and (in a model with learned positions) it carries position 0's own embedding. The
Second2First model keeps the first and removes the second: its learned position embedding
``wpe`` [P, D] gets row 1 in row 0 (:func:`second_to_first`), so the first token reads the
second position's vector and everything else is unchanged.

The first-token records of a finished ``collapse`` run (``--baseline``: its folder; by default
the one of the same model and layer) are edited once each, from the original model and from
the Second2First model, with ``rome`` and ``c-rome`` (``collapse.compute_row``: the update's
numerator and denominator, ME-PPL_50 perplexity after the edit and its ratio to the unedited
model's, efficacy). Beside each edit, the keys' anomaly of the same solve
(``geometry.record_geometry``): cos(k^u, k̄), ‖k^u‖/‖k̄‖ and the denominators
k^uᵀC⁻¹k̄/‖C⁻¹k̄‖ (``rome``) and k̄ᵀC⁻¹k̄/‖C⁻¹k̄‖ (``c-rome``). Both models use the original
model's context templates (so only the position vector differs in the keys' inputs); each has
its own key statistics C (over the same corpus and samples) and its own unedited perplexity.

Models without learned positions are refused: with rotary embeddings (GPT-J, Llama, SmolLM2…)
position 0 turns q and k by the identity, and a token alone at position 0 attends to itself
with weight 1 whatever the rotation, so there is no position-0 vector to move.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from rome_jax.experiments import collapse, geometry
from rome_jax.experiments.journal import NUMBER, require
from rome_jax.experiments.report import (Report, fmt, grouped, markdown_table, pyplot,
                                         run_label, save_figure, stats)

NAME = "second2first"
HELP = ("Second2First: first-token records edited with position 1's embedding at position 0 "
        "(Fall of ROME slides)")
VARIANTS = ("original", "second2first")
ALL = "all first-token records"
# Table columns of the keys' anomaly: (row field, heading).
KEY_SCALARS = (("cos_plain_mean", "cos(k^u, k̄)"), ("norm_ratio", "‖k^u‖/‖k̄‖"),
               ("denominator_rome", "k^uᵀC⁻¹k̄/‖C⁻¹k̄‖"),
               ("denominator_c_rome", "k̄ᵀC⁻¹k̄/‖C⁻¹k̄‖"))


def second_to_first(params: Mapping[str, Any], config) -> dict:
    """A new params tree whose learned position embedding has position 1's row at position 0:
    ``wpe'[0] = wpe[1]``, ``wpe'[p] = wpe[p]`` for p ≥ 1 (``wpe`` [P, D]); ``params`` is not
    changed. ValueError naming ``model`` for a model without learned positions (rotary
    embeddings have no position-0 vector: the rotation at position 0 is the identity)."""
    if config.rotary_dim is not None or "wpe" not in params:
        raise ValueError(
            f"model: Second2First moves a learned position embedding (wpe), and this "
            f"{config.model_type} model has rotary position embeddings instead: the rotation "
            "at position 0 is the identity, so there is no position-0 vector to move")
    wpe = params["wpe"]
    if wpe.shape[0] < 2:
        raise ValueError(f"model: Second2First needs 2 positions, wpe has {wpe.shape[0]}")
    return {**params, "wpe": wpe.at[0].set(wpe[1])}


def add_args(p) -> None:
    collapse.add_baseline_arg(p, default_bos=" (made without --bos)")


def settings(args) -> dict:
    return {"methods": list(collapse.METHODS), "baseline": args.baseline,
            "variants": list(VARIANTS), "second2first": "wpe[0] := wpe[1]",
            "templates": "the original model's", "key_statistics": "each model's own"}


# ----------------------------------------------------------------------------- run


@dataclasses.dataclass(frozen=True)
class Variant:
    """What ``collapse.compute_row`` and ``records.with_solved`` read of a setup, for one
    model: ``model``, ``hparams``, ``context`` (templates, C) and ``probe`` (ME-PPL_50)."""

    model: Any
    hparams: Any
    context: Any
    probe: Any


def second2first_variant(s) -> Variant:
    """The Second2First model of ``s.model`` with the original context templates, its own key
    statistics (cached under its own weights' digest) and its own ME-PPL_50 probe."""
    from rome_jax.data import load_me_ppl
    from rome_jax.guard import PerplexityProbe
    from rome_jax.rome.edit import prepare

    model = s.model.with_params(second_to_first(s.model.params, s.model.config))
    context = prepare(model, s.hparams, templates=s.context.templates)
    return Variant(model, s.hparams, context, PerplexityProbe(model, load_me_ppl(),
                                                              s.hparams.layer))


def row_key(variant: str, case_id: int) -> str:
    return f"{variant}/{case_id}"


def key_row(variant: Variant, solved) -> dict:
    """The keys' anomaly (``geometry.record_geometry``) of a solve's keys under ``variant``'s C."""
    import jax.numpy as jnp

    from rome_jax.rome.stats import solve

    keys = tuple(np.asarray(k, np.float64) for k in solved.keys)
    inverse = lambda k: np.asarray(solve(variant.context.factor, jnp.asarray(k, jnp.float32)),
                                   np.float64)
    return geometry.record_geometry(keys, inverse(keys[0]), inverse(keys[1]))


def check_row(row: Mapping) -> None:
    """ValueError naming the first field a row lacks (of those the report reads)."""
    require(row, {"key": str, "case_id": int, "variant": str, "group": str})
    if "error" not in row:
        require(row, {"base_perplexity": NUMBER, **{f: NUMBER for f, _ in KEY_SCALARS},
                      **{m: collapse.EDIT_FIELDS for m in collapse.METHODS}})


def first_token_records(base_header: Mapping, base_rows: Sequence[Mapping]
                        ) -> list[tuple[str, int]]:
    """(group, case id) of every first-token record of a collapse run, in its order."""
    return [(g, i) for g, i, first in collapse.chosen(base_header, base_rows, 0) if first]


def run(s, args, journal, header: Mapping) -> None:
    from tqdm import tqdm

    from rome_jax.data import counterfact_by_case_id, load_counterfact
    from rome_jax.experiments.records import with_solved

    if s.model.tokenizer.bos_id is not None:
        raise ValueError("--bos: Second2First moves the position of the text's first token; "
                         "with a start token there it is the start token's")
    second_to_first(s.model.params, s.model.config)  # refuse a rotary model before any work
    base_header, base_rows = collapse.baseline(header, None)
    chosen = first_token_records(base_header, base_rows)
    if not chosen:
        raise ValueError(f"--baseline {collapse.baseline_dir(header, None)}: has no "
                         "first-token record")
    threshold = base_header["settings"]["threshold"]
    group = {i: g for g, i in chosen}
    builders = {"original": lambda: s, "second2first": lambda: second2first_variant(s)}
    for name in VARIANTS:
        todo = [i for _, i in chosen if row_key(name, i) not in journal]
        if not todo:
            continue
        variant = builders[name]()
        records = counterfact_by_case_id(load_counterfact(), todo)
        for record, solved in tqdm(with_solved(variant, records, args.batch), total=len(todo),
                                   desc=f"{NAME} ({name})", unit="record"):
            row = collapse.compute_row(variant, record, threshold, solved)
            case_id = row["case_id"]
            row.update(key=row_key(name, case_id), variant=name, group=group[case_id])
            if "error" not in row:
                row.update(key_row(variant, solved))
            journal.append(row)


# ----------------------------------------------------------------------------- report


def variant_summary(rows: Sequence[Mapping], threshold: float) -> dict:
    """Over ``rows`` (one variant's edits of one group): the keys' anomaly, and per method the
    ME-PPL_50 perplexity after the edit and its ratio, how many ratios pass ``threshold``, and
    efficacy (``collapse.group_summary``)."""
    out = {"n": len(rows), "case_ids": [r["case_id"] for r in rows],
           "base_perplexity": rows[0]["base_perplexity"],
           **{f: stats([r[f] for r in rows]) for f, _ in KEY_SCALARS},
           "negative_rome_denominators": sum(r["denominator_rome"] < 0 for r in rows),
           **collapse.group_summary(rows)}
    for m in collapse.METHODS:
        out[m]["above_threshold"] = sum(not r[m]["ratio"] <= threshold for r in rows)
    return out


def summarize(rows: Sequence[Mapping], threshold: float) -> dict:
    ok = [r for r in rows if "error" not in r]
    by_variant = grouped(ok, lambda r: r["variant"])
    groups: dict[str, dict] = {}
    for g in (*collapse.GROUPS, ALL):
        for name in VARIANTS:
            grows = [r for r in by_variant.get(name, []) if g in (ALL, r["group"])]
            if grows:
                groups.setdefault(g, {})[name] = variant_summary(grows, threshold)
    pairs = paired(ok)
    factor = lambda get: stats([get(b) / get(a) for a, b in pairs])
    return {"threshold": threshold, "groups": groups,
            "skipped": sorted({r["case_id"] for r in rows if "error" in r}),
            "paired": {"n": len(pairs),
                       "rome_ratio_lower_after_second2first":
                           sum(b["rome"]["ratio"] < a["rome"]["ratio"] for a, b in pairs),
                       "cos_higher_after_second2first":
                           sum(b["cos_plain_mean"] > a["cos_plain_mean"] for a, b in pairs),
                       "abs_rome_denominator_larger_after_second2first":
                           sum(abs(b["denominator_rome"]) > abs(a["denominator_rome"])
                               for a, b in pairs),
                       "rome_ratio_factor": factor(lambda r: r["rome"]["ratio"]),
                       "abs_rome_denominator_factor":
                           factor(lambda r: abs(r["denominator_rome"]))}}


def paired(rows: Sequence[Mapping]) -> list[tuple[Mapping, Mapping]]:
    """(original row, Second2First row) of every record with both, in case-id order."""
    by = {(r["variant"], r["case_id"]): r for r in rows}
    ids = sorted({i for v, i in by if v == VARIANTS[0]} & {i for v, i in by if v == VARIANTS[1]})
    return [(by[VARIANTS[0], i], by[VARIANTS[1], i]) for i in ids]


def tables(summary: Mapping, title: str) -> str:
    t1, t2 = [], []
    for g, variants in summary["groups"].items():
        for name, v in variants.items():
            t1.append([g, name, v["n"], *(v[f]["mean"] for f, _ in KEY_SCALARS),
                       v["rome"]["abs_denominator"]["mean"], v["negative_rome_denominators"]])
            r, c = v["rome"], v["c-rome"]
            t2.append([g, name, v["n"], v["base_perplexity"], r["perplexity"]["min"],
                       r["perplexity"]["mean"], r["perplexity"]["max"], r["ratio"]["median"],
                       r["ratio"]["max"], r["above_threshold"], c["ratio"]["median"],
                       c["ratio"]["max"], r["efficacy"], c["efficacy"]])
    th = summary["threshold"]
    md1 = markdown_table(["cases", "model", "n", *(f"mean {h}" for _, h in KEY_SCALARS),
                          "mean abs k^uᵀu/‖u‖ (rome edit)", "negative"], t1)
    md2 = markdown_table(["cases", "model", "n", "unedited", "min after rome",
                          "avg after rome", "max after rome", "median ratio rome",
                          "max ratio rome", f"rome > {th:g}x", "median ratio c-rome",
                          "max ratio c-rome", "efficacy rome", "efficacy c-rome"], t2)
    p = summary["paired"]
    pairs = (f"Paired over the {p['n']} records: after Second2First the rome ratio is lower for "
             f"{p['rome_ratio_lower_after_second2first']} (median factor "
             f"{fmt(p['rome_ratio_factor']['median'])}), cos(k^u, k̄) higher for "
             f"{p['cos_higher_after_second2first']} and |k^uᵀC⁻¹k̄|/‖C⁻¹k̄‖ larger for "
             f"{p['abs_rome_denominator_larger_after_second2first']} (median factor "
             f"{fmt(p['abs_rome_denominator_factor']['median'])}).")
    skipped = (f"\n\nSkipped (the request does not fit the model): {summary['skipped']}"
               if summary["skipped"] else "")
    return (f"{title}\n\nTable 1: the keys' anomaly (means; u = C⁻¹k̄ with each model's own C; "
            f"the rome edit's denominator is the same k^uᵀu/‖u‖).\n\n{md1}\n\nTable 2: ME-PPL_50 "
            f"perplexity after one edit (min / avg / max as in the slides) and its ratio to the "
            f"same model unedited; groups as found by the collapse run (threshold {th:g}x)."
            f"\n\n{md2}\n\n{pairs}{skipped}")


def figure(pairs: Sequence[tuple[Mapping, Mapping]], threshold: float, title: str):
    def draw(path: Path) -> None:
        plt = pyplot()

        fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4.4))
        colours = dict(zip(collapse.GROUPS, ("tab:red", "tab:blue", "tab:orange")))
        for ax, get, label, log in (
                (left, lambda r: r["cos_plain_mean"], "cos(k^u, k̄)", False),
                (right, lambda r: r["rome"]["ratio"], "rome: ME-PPL_50 after / before", True)):
            by_group = grouped(pairs, lambda p: p[0]["group"])
            for g, ps in ((g, by_group[g]) for g in collapse.GROUPS if g in by_group):
                ax.scatter([get(a) for a, _ in ps], [get(b) for _, b in ps], s=14,
                           c=colours.get(g, "grey"), label=g)
            values = [get(r) for p in pairs for r in p]
            lo, hi = min(values), max(values)
            ax.plot([lo, hi], [lo, hi], color="grey", lw=0.8, ls="--")
            if log:
                ax.set(xscale="log", yscale="log")
                ax.axhline(threshold, color="grey", lw=0.6, ls=":")
                ax.axvline(threshold, color="grey", lw=0.6, ls=":")
            ax.set(xlabel=f"{label}, original", ylabel=f"{label}, Second2First", title=label)
            ax.legend(fontsize=8)
        save_figure(fig, path, title)
    return draw


def report(header: Mapping, rows: Sequence[Mapping]) -> Report:
    threshold = collapse.baseline(header, None)[0]["settings"]["threshold"]
    summary = summarize(rows, threshold)
    summary["baseline"] = str(collapse.baseline_dir(header, None))
    title = (f"Second2First (wpe[0] := wpe[1]): {run_label(header['settings'])}, the first-token "
             f"records of {summary['baseline']}.")
    pairs = paired([r for r in rows if "error" not in r])
    return Report(summary, tables(summary, title),
                  figure(pairs, threshold, title) if pairs else None)
