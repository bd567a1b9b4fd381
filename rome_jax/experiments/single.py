"""Single edits scored on CounterFact, with and without the test-time prefix ("The Fall of ROME"
Tables 3-4, "Rebuilding ROME" Tables 1, 2, 4 and Figure 2).

The records of a finished ``collapse`` run (``--baseline``: its folder; by default the one of
the same model, layer and start token) are edited again, each once from the base model: every
collapse case, every first-token record below the threshold and the first ``--n`` normal cases
(by case id: a fixed random sample, the collapse run's draw). Keys and v* are solved once per
record; ``rome``, ``c-rome`` (= ``r-rome``) and ``p-rome`` each make their update from them
(``counterfact_eval.evaluate_record``). Every edited model, and the unedited one, is scored
with ROME's CounterFact metrics twice: plain, and with a random prefix (sampled apart from the
edit's context templates) in front of the rewrite and paraphrase prompts that open with the
subject ("The Fall of ROME"'s test-time fix; neighbourhood prompts are never prefixed, so
locality is the same both ways). Each row also holds the ME-PPL_50 perplexity ratio, ‖Δ‖ and
|Δ| of the update, and ROME's and "Rebuilding ROME"'s normalised generation entropy on
``--generation-prompts`` of the record's generation prompts.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from rome_jax.arguments import positive_int
from rome_jax.experiments import collapse
from rome_jax.experiments.report import (Report, grouped, markdown_table, pyplot, run_label,
                                         save_figure)

NAME = "single"
HELP = ("single edits: CounterFact metrics with/without the test-time prefix, |Δ| vs generation "
        "entropy (Fall of ROME T3-4, Rebuilding ROME T1-2, F2)")
METHODS = ("rome", "c-rome", "p-rome")
LABELS = {"none": "unedited", "rome": "rome", "c-rome": "r-rome (= c-rome)", "p-rome": "p-rome"}
SCORINGS = ("plain", "prefixed")


def add_args(p) -> None:
    collapse.add_baseline_arg(p)
    p.add_argument("--n", type=int, default=100,
                   help="normal cases of the baseline to edit (default 100); every collapse "
                        "case and first-token record is edited")
    p.add_argument("--generation-prompts", type=positive_int, default=5, metavar="G",
                   help="generation entropy on the first G generation prompts of each record "
                        "(default 5)")
    p.add_argument("--generation-tokens", type=positive_int, default=50, metavar="T",
                   help="new tokens per generation, top-5 sampling (default 50)")


def settings(args) -> dict:
    if args.n < 0:
        raise ValueError("--n: must be 0 or more")
    return {"methods": list(METHODS), "baseline": args.baseline,
            "generation_prompts": args.generation_prompts,
            "generation_tokens": args.generation_tokens}


def prefixed_prompts(record: Mapping, prefix: str) -> int:
    """How many of the record's rewrite and paraphrase prompts the test-time prefix changes."""
    from rome_jax.evaluation import counterfact_prompts

    plain, fixed = counterfact_prompts(record), counterfact_prompts(record, prefix)
    return sum(a != b for g in ("rewrite", "paraphrase") for a, b in zip(plain[g], fixed[g]))


def check_row(row: Mapping) -> None:
    """ValueError naming the first top-level field a row lacks."""
    from rome_jax.experiments.journal import require

    require(row, {"key": int, "case_id": int, "group": str, "first_token_subject": bool,
                  "prompts_prefixed": int, "before": dict, "edits": dict})


def run(s, args, journal, header: Mapping) -> None:
    from tqdm import tqdm

    from rome_jax.counterfact_eval import EvalSettings, evaluate_record, test_prefixes
    from rome_jax.data import counterfact_by_case_id, load_counterfact
    from rome_jax.experiments.records import with_solved

    st = header["settings"]
    base_header, base_rows = collapse.baseline(header, st["bos"])
    todo = [(g, i) for g, i, _ in collapse.chosen(base_header, base_rows, args.n)
            if i not in journal]
    if not todo:
        return
    records = {r["case_id"]: r for r in counterfact_by_case_id(load_counterfact(),
                                                               [i for _, i in todo])}
    evaluation = EvalSettings(methods=METHODS, test_prefix=True,
                              generation_prompts=st["generation_prompts"],
                              generation_tokens=st["generation_tokens"], seed=st["seed"])
    prefixes = test_prefixes(s.model, st["seed"])
    solved = with_solved(s, [records[i] for _, i in todo], args.batch)
    for (group, case_id), (record, keys_v) in tqdm(zip(todo, solved), total=len(todo),
                                                   desc=NAME, unit="record"):
        row = evaluate_record(s.model, record, s.hparams, s.context, s.probe, evaluation,
                              prefixes, keys_v)
        journal.append({"key": case_id, "group": group, **row,
                        "prompts_prefixed": prefixed_prompts(record, row["prefix"])})


def summarize(rows: Sequence[Mapping]) -> dict:
    """Per group: n, case ids, how many prompts the prefix changed, and per scoring the
    ``counterfact_eval.summarize`` of each method and the unedited model."""
    from rome_jax.counterfact_eval import summarize as summarize_methods

    out = {}
    for g, rs in grouped(rows, lambda r: r["group"]).items():
        out[g] = {"n": len(rs), "case_ids": [r["case_id"] for r in rs],
                  "prompts_prefixed": sum(r["prompts_prefixed"] for r in rs),
                  **{scoring: summarize_methods(rs, METHODS, prefixed=scoring == "prefixed")
                     for scoring in SCORINGS}}
    return {g: out[g] for g in collapse.GROUPS if g in out}


def tables(groups: Mapping, title: str, sample: str) -> str:
    t3 = markdown_table(
        ["cases", "n", "test prefix", "prompts prefixed", "efficacy (ES)",
         "generalization (PS)", "locality (NS)", "S", "EM", "PM", "NM", "median ‖δ‖",
         "median ‖v*−Wk̄−b‖"],
        [[g, v["n"], "with" if prefixed else "without", v["prompts_prefixed"] if prefixed else 0,
          m["ES"], m["PS"], m["NS"], m["S"], m["EM"], m["PM"], m["NM"],
          v["plain"]["rome"]["residual_norm_median"], m["residual_norm_median"]]
         for g, v in groups.items() for scoring in SCORINGS
         for prefixed, m in [(scoring == "prefixed", v[scoring]["c-rome"])]])
    t1 = markdown_table(
        ["cases", "n", "method", "ES", "EM", "PS", "PM", "NS", "NM", "S", "median ppl ratio",
         "max ppl ratio", "median abs Δ", "mean GE", "mean GE norm", "failed"],
        [[g, v["n"], LABELS[method], m["ES"], m["EM"], m["PS"], m["PM"], m["NS"], m["NM"],
          m["S"], m["ppl_ratio_median"], m["ppl_ratio_max"], m.get("delta_abs_median"),
          m.get("GE"), m.get("GE_norm"), m["failed"]]
         for g, v in groups.items() for method, m in v["plain"].items()])
    return (f"{title}\n\nTable A (\"The Fall of ROME\" Tables 3-4): r-rome (= c-rome) edits, "
            "scored plain and with the test-time prefix in front of the rewrite and paraphrase "
            "prompts that open with the subject (\"prompts prefixed\" counts them; the others, "
            "and the neighbourhood prompts, score the same both ways). δ = v* − v_init is what "
            "the edit adds to the plain prompt's MLP output v_init = Wk^u + b (clamped to "
            "‖δ‖ ≤ clamp_norm_factor·‖v_init‖); c-rome writes v* at k̄, where the model had "
            "Wk̄ + b.\n\n"
            f"{t3}\n\nTable B (\"Rebuilding ROME\" Tables 1, 2, 4): every method, plain "
            f"scoring; |Δ| = ‖Δ‖_F / (F·D); GE: ROME's n-gram entropy (bits), GE norm: the "
            f"normalised word entropy (0-1). {sample}\n\n{t1}")


def figure(rows: Sequence[Mapping], title: str):
    def draw(path: Path) -> None:
        plt = pyplot()

        fig, axes = plt.subplots(1, len(METHODS), figsize=(4 * len(METHODS), 4), sharey=True,
                                 sharex=True)
        unedited = [r["before"]["GE_norm"] for r in rows]
        for ax, method in zip(axes, METHODS):
            for first, colour, label in ((True, "tab:red", "first-token subject"),
                                         (False, "tab:blue", "other subjects")):
                edits = [r["edits"][method] for r in rows
                         if bool(r["first_token_subject"]) == first
                         and "error" not in r["edits"][method]]
                ax.scatter([e["GE_norm"] for e in edits], [e["delta_abs"] for e in edits],
                           s=14, c=colour, label=f"{label} ({len(edits)})", alpha=0.8)
            ax.axvline(float(np.nanmean(unedited)), color="grey", lw=0.8, ls="--")
            ax.set(yscale="log", xlabel="normalised generation entropy", title=LABELS[method])
            ax.legend(fontsize=8)
        axes[0].set_ylabel("|Δ| of the update")
        save_figure(fig, path, title + " (dashed: unedited model's mean)")
    return draw


def report(header: Mapping, rows: Sequence[Mapping]) -> Report:
    st = header["settings"]
    base_header, base_rows = collapse.baseline(header, st["bos"])
    drawn = sum(1 for r in base_rows if not r.get("first_token_subject"))
    sample = (f"Normal cases: the first (by case id) of the {drawn} records that the collapse "
              f"run {collapse.baseline_dir(header, st['bos'])} drew with numpy seed "
              f"{base_header['settings']['sample_seed']} from those whose subject is not the "
              f"first token, less those that collapse.")
    groups = summarize(rows)
    title = (f"Single edits: {run_label(st)}; groups of the collapse "
             f"run (threshold {base_header['settings']['threshold']:g}x).")
    summary = {"baseline": str(collapse.baseline_dir(header, st["bos"])),
               "normal_sample": sample, "groups": groups}
    return Report(summary, tables(groups, title, sample),
                  figure(rows, title) if rows else None)
