"""Sequential batch editing (AlphaEdit's setting): ``--n`` facts in batches of ``--batch-size``,
each batch one MEMIT / EMMET / AlphaEdit update of the result of the previous ones.

For each method of ``--methods`` the same seeded draw of CounterFact records is edited in order,
``--batch-size`` at a time, batch by batch with every method in turn, so a run stopped early
has every method equally far (the fold of ``editors.batch.edit_batches``: C and the templates
stay the base model's; AlphaEdit's K_pᵀK_p of the earlier batches is threaded through it). A
row per (method, batches done), the first one unedited (evaluated once, shared by the
methods): ME-PPL_1k perplexity, downstream accuracy (``sequential.Evaluators``: after an edit,
only on the tasks where the unedited model is above chance), the efficacy ES (P(new) > P(true)
on the rewrite prompt) of every fact edited so far and of the last batch alone, and each
layer's ‖Δw‖_F of the batch's update. One more row (key ``UNEDITED_FACTS``) holds each drawn
fact's P(new) and P(true) on the unedited model (NaN without a true object), so every ES so far
has beside it the unedited model's ES of the same facts, by the same ``evaluation.efficacy`` (a
small model already prefers some new objects: ES so far means nothing without it).

Resumable: after every row the window's weights (the only ones that change) and AlphaEdit's
``preserved`` are saved as ``state-METHOD.npz`` with the batch count (``experiments.state``, the
format ``sequential`` shares); a rerun continues from it, and replays a method whose state is
ahead of its rows from the base model. Each batch's v* targets are journaled before its update
(``vstar/METHOD-BATCH.npz``, committed with the rows), so a fresh checkout without the state
replays the batches done from them: keys and closed forms only, no v* solve, no evaluation.
"""

from __future__ import annotations

import time
from pathlib import Path
from types import SimpleNamespace
from typing import Mapping, Sequence

import numpy as np

from rome_jax.experiments.report import (Report, accuracy_axis, accuracy_trace, markdown_table,
                                         perplexity_axis, pyplot, run_label, save_figure)

NAME = "sequential-batch"
HELP = ("sequential batch edits (MEMIT, EMMET, AlphaEdit): ME-PPL_1k, downstream accuracy and "
        "the efficacy of all facts edited so far after every batch")
METHODS = ("memit", "emmet", "alphaedit")
UNEDITED_FACTS = ["unedited", "facts"]  # the row of the draw's per-fact unedited P(new), P(true)


def add_args(p) -> None:
    from rome_jax.arguments import positive_int
    from rome_jax.experiments.sequential import add_evaluation_args

    p.add_argument("--methods", default=",".join(METHODS), metavar="M,M",
                   help=f"batch editors, comma-separated (default {','.join(METHODS)})")
    p.add_argument("--n", type=positive_int, default=1000, help="facts per method (default 1000)")
    p.add_argument("--batch-size", type=positive_int, default=100, metavar="B",
                   help="facts per update (default 100, AlphaEdit's)")
    p.add_argument("--keys", default="rome", choices=("rome", "c-rome", "p-rome"),
                   help="key convention (default rome: MEMIT's)")
    add_evaluation_args(p)


def settings(args) -> dict:
    from rome_jax.arguments import comma_list
    from rome_jax.experiments.sequential import evaluation_settings

    return {"methods": comma_list(args.methods, "--methods", known=METHODS), "n": args.n,
            "batch_size": args.batch_size, "keys": args.keys, **evaluation_settings(args)}


def _probabilities(model, records: Sequence[Mapping], params):
    """P(new), P(true) [N] on each record's rewrite prompt on ``params`` (NaN: no true)."""
    from rome_jax.evaluation import request_probabilities
    from rome_jax.rome.request import EditRequest

    return request_probabilities(model, [EditRequest.from_dict(r) for r in records], params)


def _efficacy(model, records: Sequence[Mapping], params) -> float:
    """Share of ``records`` whose rewrite prompt gives P(new) > P(true) on ``params``."""
    from rome_jax.evaluation import efficacy

    return efficacy(*_probabilities(model, records, params))


def unedited_es_so_far(facts: Mapping, edited: int) -> float | None:
    """The unedited model's ES of the draw's first ``edited`` facts, from the ``UNEDITED_FACTS``
    row ``facts`` (``evaluation.efficacy``: None where none has a true object)."""
    from rome_jax.evaluation import efficacy

    return efficacy(*(np.asarray(facts[k][:edited], dtype=float) for k in ("p_new", "p_true")))


def check_row(row: Mapping) -> None:
    """ValueError naming the first field a row lacks."""
    from rome_jax.experiments.journal import NUMBER, require

    if row.get("key") == UNEDITED_FACTS:
        require(row, {"case_ids": list, "p_new": list, "p_true": list})
        for k in ("p_new", "p_true"):
            if len(row[k]) != len(row["case_ids"]):
                raise ValueError(f"{k}: one per case_ids entry expected, got {len(row[k])} "
                                 f"for {len(row['case_ids'])}")
        return
    require(row, {"key": list, "method": str, "batches": int, "edited": int, "ppl1k": NUMBER,
                  "downstream": dict})
    if row["batches"] > 0:
        require(row, {"es_so_far": NUMBER, "es_batch": NUMBER, "delta_norm": list})


def run(s, args, journal, header: Mapping) -> None:
    from tqdm import tqdm

    from rome_jax.editors.batch import edit_batch, prepare_batch, solve_targets
    from rome_jax.editors.delta import apply_edit
    from rome_jax.arguments import batch_hparams
    from rome_jax.experiments.sequential import Evaluators, chosen_records
    from rome_jax.experiments.state import (drop_journal, load_targets, resume, save_state,
                                            save_targets, state_path)
    from rome_jax.rome.request import EditRequest

    import jax

    st = header["settings"]
    out = Path(header["out"])
    records = chosen_records(s, {"case_ids": None, "n": st["n"],
                                 "sample_seed": st["sample_seed"]})
    size = st["batch_size"]
    n_batches = -(-len(records) // size)
    runs = {}  # method -> its fold's state: batches done, params, preserved, ...
    for method in st["methods"]:
        hparams = batch_hparams(s.model.config, method, args, keys=st["keys"],
                                layer=s.hparams.layer)
        evaluate = Evaluators(s, st, journal, layer=hparams.layers[0])
        if [method, 0] not in journal:
            state_path(out, method).unlink(missing_ok=True)  # an --overwrite left them behind
            drop_journal(out, method)
            journal.append({"key": [method, 0], "method": method, "batches": 0, "edited": 0,
                            **evaluate.unedited()})
        written = max(r["batches"] for r in journal.rows if r.get("method") == method)
        done, params, preserved = resume(out, method, s.model.params, hparams.layers, written,
                                         journal.path)
        context = (prepare_batch(s.model, method, hparams, jax.random.key(st.get("seed", 0)))
                   if done < n_batches else None)
        runs[method] = SimpleNamespace(hparams=hparams, evaluate=evaluate, done=done,
                                       params=params, preserved=preserved, context=context)
    if UNEDITED_FACTS not in journal:
        p_new, p_true = _probabilities(s.model, records, s.model.params)
        journal.append({"key": UNEDITED_FACTS, "case_ids": [int(x["case_id"]) for x in records],
                        "p_new": p_new.tolist(), "p_true": p_true.tolist()})
    first = min(r.done for r in runs.values())
    for b in tqdm(range(first + 1, n_batches + 1), initial=first, total=n_batches,
                  desc="batches", unit="batch"):
        batch = records[(b - 1) * size:b * size]
        requests = [EditRequest.from_dict(x) for x in batch]  # one parse, every method
        case_ids = [int(x["case_id"]) for x in batch]
        for method, r in runs.items():
            if r.done >= b:
                continue
            journaled = load_targets(out, method, b, case_ids)
            if journaled is None:
                start = time.perf_counter()
                targets = solve_targets(s.model, requests, r.hparams, r.context,
                                        params=r.params)
                seconds_solve = time.perf_counter() - start
                save_targets(out, method, b, case_ids, targets, seconds_solve)
            else:
                targets, seconds_solve = journaled
            result = edit_batch(s.model, requests, method, r.hparams, context=r.context,
                                params=r.params, preserved=r.preserved, targets=targets)
            params, preserved = apply_edit(r.params, result.edit), result.preserved
            if [method, b] not in journal:
                journal.append({
                    "key": [method, b], "method": method, "batches": b,
                    "edited": min(b * size, len(records)),
                    "es_so_far": _efficacy(s.model, records[:b * size], params),
                    "es_batch": _efficacy(s.model, batch, params),
                    "delta_norm": [layer["update.delta_norm"] for layer in result.report.layers],
                    "seconds_solve": seconds_solve,
                    "seconds_update": result.report.seconds_update, **r.evaluate(params)})
            save_state(out, method, b, params, r.hparams.layers, preserved)
            r.done, r.params, r.preserved = b, params, preserved


def _traces(rows: Sequence[Mapping]) -> dict[str, list[Mapping]]:
    """Each method's rows in batch order, with ``es_so_far_unedited`` (the unedited model's ES
    of the same facts; None in a run journaled before ``UNEDITED_FACTS`` was)."""
    facts = next((r for r in rows if r["key"] == UNEDITED_FACTS), None)
    out: dict[str, list[Mapping]] = {}
    for r in rows:
        if r["key"] != UNEDITED_FACTS:
            out.setdefault(r["method"], []).append(
                {**r, "es_so_far_unedited": None if facts is None or not r["edited"]
                 else unedited_es_so_far(facts, r["edited"])})
    return {m: sorted(rs, key=lambda r: r["batches"]) for m, rs in out.items()}


def report(header: Mapping, rows: Sequence[Mapping]) -> Report:
    from rome_jax.experiments.sequential import accuracy_cell, downstream_columns, shots_text

    st = header["settings"]
    traces = _traces(rows)
    unedited = next((t[0]["downstream"] for t in traces.values() if t[0]["batches"] == 0), {})
    tasks, dropped = downstream_columns(unedited)
    table_rows = []
    for method, trace in traces.items():
        for r in trace:
            acc = r.get("downstream", {})
            table_rows.append([method, r["batches"], f"{r['edited']:,}", r.get("es_so_far"),
                               r["es_so_far_unedited"], r.get("es_batch"), r["ppl1k"],
                               *(accuracy_cell(acc[t]) if t in acc else None for t in tasks)])
    markdown = (f"# Sequential batch editing ({run_label(st)}; {st['n']} facts in batches of "
                f"{st['batch_size']}; keys {st['keys']}; downstream {st['downstream_n']} "
                f"examples per task at most, {shots_text(st['shots'])}, accuracy [95% "
                "interval])\n\n"
                + markdown_table(["method", "batches", "edited", "ES so far",
                                  "ES so far, unedited", "ES last batch", "ME-PPL_1k", *tasks],
                                 table_rows)
                + ("\n\nMajority-class rates: "
                   + ", ".join(f"{t} {unedited[t]['chance']:.3g}" for t in tasks) if tasks
                   else "") + (f"\n\n{dropped}" if dropped else "") + "\n")
    summary = {"settings": st, "traces": {m: [{k: v for k, v in r.items() if k != "key"}
                                               for r in t] for m, t in traces.items()}}

    def figure(path) -> None:
        plt = pyplot()
        fig, axes = plt.subplots(1, 2 + len(tasks), figsize=(4.2 * (2 + len(tasks)), 3.6))
        for method, trace in traces.items():
            edited = [r["edited"] for r in trace]
            line, = axes[0].plot(edited, [r["ppl1k"] for r in trace], "o-", ms=3, label=method)
            axes[1].plot(edited[1:], [r["es_so_far"] for r in trace[1:]], "o-", ms=3,
                         color=line.get_color(), label=method)
            for ax, t in zip(axes[2:], tasks):
                accuracy_trace(ax, edited, [r["downstream"][t] for r in trace],
                               color=line.get_color(), label=method)
        longest = max(traces.values(), key=len, default=[])
        base = [(r["edited"], r["es_so_far_unedited"]) for r in longest
                if r["es_so_far_unedited"] is not None]
        if base:
            axes[1].plot(*zip(*base), "k--", lw=1, label="unedited, same facts")
        perplexity_axis(axes[0], [r["ppl1k"] for t in traces.values() for r in t],
                        title="ME-PPL_1k perplexity")
        axes[1].set(title="ES of all facts edited so far", ylim=(-0.02, 1.02))
        for ax, t in zip(axes[2:], tasks):
            accuracy_axis(ax, t, unedited[t]["chance"])
        for ax in axes:
            ax.set_xlabel("facts edited")
        axes[0].legend(fontsize=8)
        axes[1].legend(fontsize=8)
        save_figure(fig, path, f"Sequential batch editing, {run_label(st)}")

    return Report(summary, markdown, figure)
