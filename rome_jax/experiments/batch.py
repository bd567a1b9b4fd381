"""Batch editing: one MEMIT / EMMET / AlphaEdit update of 1, 10, 100, … CounterFact facts.

For each method of ``--methods`` and each size n of ``--sizes``, the first n records of one
seeded draw (the same records for every method; a larger n extends the smaller ones) are written
into the base model in ONE update (``editors.batch.edit_batch``, the method's preset layers, key
convention ``--keys``). A row per (method, n): the edited records' CounterFact scores on the
plain prompts (ES PS NS, EM PM NM, S), ME-PPL_1k perplexity, ‖Δw‖ per layer, the wall time of
the v* solves and of the keys and closed forms apart, and the process's peak resident memory
so far (``ru_maxrss``: a high-water mark of the whole run, not of the row alone). ``none`` rows
score the same records unedited.

The v* targets depend on the request and the z settings alone, not on the method or on n, so
each record is solved once per z setting (``hparams.v`` and the templates): the sizes are run
smallest first, every method of a size sharing its targets, which the next size extends; a
row's ``seconds_solve`` is the shared solves' time scaled to its n (``solves_shared``). The
targets are saved in the run directory (``targets-HASH.npz``) every ``SAVE_EVERY`` requests, so
a killed run resumes its solves. The table puts MEMIT's published GPT-J numbers (10,000
CounterFact edits) beside.
"""

from __future__ import annotations

import hashlib
import resource
import time
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from rome_jax.experiments.report import Report, markdown_table, pyplot, run_label, save_figure

NAME = "batch"
HELP = "one MEMIT / EMMET / AlphaEdit update of 1, 10, 100, ... CounterFact facts"
METHODS = ("memit", "emmet", "alphaedit")
SCORES = ("ES", "PS", "NS", "EM", "PM", "NM", "S")
# MEMIT's paper, GPT-J, 10,000 CounterFact edits (as quoted in zjunlp/EasyEdit#125):
# efficacy, generalisation (paraphrase), specificity (neighbourhood) success in percent.
MEMIT_GPTJ_10K = {"ES": 98.9, "PS": 88.6, "NS": 73.7}
SAVE_EVERY = 256  # requests solved between two saves of the shared v* targets


def add_args(p) -> None:
    p.add_argument("--methods", default=",".join(METHODS), metavar="M,M",
                   help=f"batch editors, comma-separated (default {','.join(METHODS)})")
    p.add_argument("--sizes", default="1,10,100,1000", metavar="N,N",
                   help="facts per update, comma-separated (default 1,10,100,1000)")
    p.add_argument("--keys", default="rome", choices=("rome", "c-rome", "p-rome"),
                   help="key convention (default rome: MEMIT's)")
    p.add_argument("--sample-seed", type=int, default=0,
                   help="numpy seed of the drawn records (default 0)")
    p.add_argument("--ppl-texts", type=int, default=1000, metavar="N",
                   help="ME-PPL_1k texts in the perplexity (default all 1000)")
    p.add_argument("--chunk", type=int, default=32, metavar="B",
                   help="requests per compiled step of the v* solves and keys (default 32)")


def settings(args) -> dict:
    from rome_jax.arguments import comma_list

    sizes = comma_list(args.sizes, "--sizes", int)
    if min(sizes) < 1:
        raise ValueError("--sizes: every size must be 1 or more")
    if args.ppl_texts < 1 or args.chunk < 1:
        raise ValueError(f"--{'ppl-texts' if args.ppl_texts < 1 else 'chunk'}: must be 1 or "
                         "more")
    return {"methods": comma_list(args.methods, "--methods", known=METHODS),
            "sizes": sorted(sizes), "keys": args.keys, "sample_seed": args.sample_seed,
            "ppl_texts": args.ppl_texts}


def _targets_path(out: Path, hparams, context) -> Path:
    """The run directory's file of v* targets for one z setting (``hparams.v``, templates)."""
    digest = hashlib.sha256(repr((hparams.v, context.templates)).encode()).hexdigest()[:16]
    return Path(out) / f"targets-{digest}.npz"


def shared_targets(model, requests: Sequence, hparams, context, out: Path, chunk: int,
                   ) -> tuple[list, float]:
    """The v* targets (``VResult``) of ``requests`` on the base model, resumed from and saved to
    the run directory (atomically) every ``SAVE_EVERY`` requests rounded up to whole ``chunk``s,
    so a resumed run solves the same compiled chunks as an uninterrupted one and gets the same
    targets bit for bit; (targets, seconds spent solving them, summed over resumed runs)."""
    from tqdm import tqdm

    from rome_jax.editors.batch import solve_targets
    from rome_jax.files import read_npz, write_npz_atomic
    from rome_jax.rome.values import VResult

    path = _targets_path(out, hparams, context)
    fields, seconds = {name: [] for name in VResult._fields}, 0.0
    if path.exists():
        try:
            saved = read_npz(path)
            fields = {name: list(saved[name]) for name in VResult._fields}
            seconds = float(saved["seconds"])
        except (ValueError, KeyError) as err:
            raise ValueError(f"{path}: unreadable v* targets ({' '.join(str(err).split())}); "
                             "use --overwrite to start over") from None
    done = len(fields["delta"])
    with tqdm(total=len(requests), initial=min(done, len(requests)), desc="v* targets",
              unit="fact") as bar:
        every = -(-SAVE_EVERY // chunk) * chunk
        for start in range(done, len(requests), every):
            piece = requests[start:start + every]
            began = time.perf_counter()
            solved = solve_targets(model, piece, hparams, context, chunk=chunk)
            seconds += time.perf_counter() - began
            for t in solved:
                for name in VResult._fields:
                    fields[name].append(np.asarray(getattr(t, name)))
            write_npz_atomic(path, seconds=seconds,
                             **{k: np.stack(v) for k, v in fields.items()})
            bar.update(len(piece))
    targets = [VResult(*(fields[name][i] for name in VResult._fields))
               for i in range(len(requests))]
    return targets, seconds * len(requests) / max(len(fields["delta"]), 1)


def _mean_scores(scores: Sequence[Mapping]) -> dict:
    from rome_jax.evaluation import summarize_counterfact

    return {k: v for k, v in summarize_counterfact(scores).items() if k in SCORES}


def check_row(row: Mapping) -> None:
    """ValueError naming the first field a row lacks."""
    from rome_jax.experiments.journal import NUMBER, require

    require(row, {"key": str, "method": str, "n": int, "ppl": NUMBER,
                  **{k: NUMBER for k in SCORES}})
    if row["method"] != "none":
        require(row, {"layers": list, "update": list, "seconds_solve": NUMBER,
                      "seconds_update": NUMBER})


def run(s, args, journal, header: Mapping) -> None:
    from rome_jax.data import load_me_ppl
    from rome_jax.editors.batch import edit_batch, prepare_batch
    from rome_jax.editors.delta import apply_edit
    from rome_jax.arguments import batch_hparams
    from rome_jax.evaluation import counterfact_scores, perplexity
    from rome_jax.experiments.sequential import chosen_records
    from rome_jax.rome.request import EditRequest

    import jax

    st = header["settings"]
    records = chosen_records(s, {"case_ids": None, "n": max(st["sizes"]),
                                 "sample_seed": st["sample_seed"]})
    texts = load_me_ppl("ME-PPL_1k")[:st["ppl_texts"]]
    if not journal.rows:  # a new or --overwrite run: targets left behind may be another model's
        for stale in Path(header["out"]).glob("targets-*.npz"):
            stale.unlink()
    base_ppl = None
    hparams = {m: batch_hparams(s.model.config, m, args, keys=st["keys"], layer=s.hparams.layer)
               for m in st["methods"]}
    contexts, targets = {}, {}
    for n in st["sizes"]:  # smallest first: a run stopped early has its small sizes done
        requests = [EditRequest.from_dict(r) for r in records[:n]]
        if f"none/{n}" not in journal:
            base_ppl = base_ppl or perplexity(s.model, texts)
            scores = counterfact_scores(s.model, records[:n])
            journal.append({"key": f"none/{n}", "method": "none", "n": n,
                            **_mean_scores(scores), "ppl": base_ppl})
        for method in st["methods"]:
            if f"{method}/{n}" in journal:
                continue
            hp = hparams[method]
            if method not in contexts:
                contexts[method] = prepare_batch(s.model, method, hp,
                                                 jax.random.key(st.get("seed", 0)))
            z = _targets_path(header["out"], hp, contexts[method]).name
            if len(targets.get(z, ((), 0))[0]) < n:  # extend the shared targets to n requests
                targets[z] = shared_targets(s.model, requests, hp, contexts[method],
                                            header["out"], args.chunk)
            solved, seconds = targets[z]
            result = edit_batch(s.model, requests, method, hp, context=contexts[method],
                                chunk=args.chunk, targets=solved[:n])
            params = apply_edit(s.model.params, result.edit)
            scores = counterfact_scores(s.model, records[:n], params)
            report = result.report
            journal.append({
                "key": f"{method}/{n}", "method": method, "n": n, "layers": list(hp.layers),
                **_mean_scores(scores), "ppl": perplexity(s.model, texts, params=params),
                "seconds_solve": seconds * n / len(solved), "solves_shared": True,
                "seconds_update": report.seconds_update,
                "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                "update": report.layers,
                "v_loss_median": float(np.median(report.v_losses))})


def report(header: Mapping, rows: Sequence[Mapping]) -> Report:
    st = header["settings"]
    by_key = {r["key"]: r for r in rows}
    table_rows = []
    for method in ("none", *st["methods"]):
        for n in st["sizes"]:
            r = by_key.get(f"{method}/{n}")
            if r is None:
                continue
            base = by_key.get(f"none/{n}", {})
            seconds = (r.get("seconds_solve", np.nan), r.get("seconds_update", np.nan))
            delta = max((layer["update.delta_norm"] for layer in r.get("update", [])),
                        default=None)
            table_rows.append([method, f"{n:,}", *(r[k] for k in SCORES), r["ppl"],
                               r["ppl"] / base["ppl"] if base else None, delta, *seconds,
                               (seconds[0] + seconds[1]) / n if method != "none" else None,
                               r.get("peak_rss_mb")])
    header_cells = ["method", "n", *SCORES, "ME-PPL_1k", "x base", "max ‖Δw‖_F",
                    "v* solves (s)", "keys + closed form (s)", "s / fact", "peak RSS (MB)"]
    published = markdown_table(["", "ES", "PS", "NS"],
                               [["MEMIT, GPT-J, 10,000 edits (paper, %)",
                                 *(MEMIT_GPTJ_10K[k] for k in ("ES", "PS", "NS"))]])
    markdown = (f"# Batch editing ({run_label(st)}; key convention {st['keys']}; sizes "
                f"{st['sizes']}; seed {st['sample_seed']})\n\n"
                + markdown_table(header_cells, table_rows) + "\n\nPublished:\n\n" + published
                + "\n")
    summary = {"settings": st, "rows": {r["key"]: {k: v for k, v in r.items() if k != "key"}
                                        for r in rows}}

    def figure(path) -> None:
        plt = pyplot()
        fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
        for method in ("none", *st["methods"]):
            points = [by_key[f"{method}/{n}"] for n in st["sizes"] if f"{method}/{n}" in by_key]
            if not points:
                continue
            ns = [p["n"] for p in points]
            axes[0].plot(ns, [p["ES"] for p in points], "o-", label=method)
            axes[1].plot(ns, [p["S"] for p in points], "o-", label=method)
            axes[2].plot(ns, [p["ppl"] for p in points], "o-", label=method)
        paper = {k: v / 100 for k, v in MEMIT_GPTJ_10K.items()}
        paper_s = 3 / sum(1 / v for v in paper.values())  # S as evaluation.summarize_counterfact
        for ax, value in zip(axes[:2], (paper["ES"], paper_s)):
            ax.plot([10_000], [value], "k*", markersize=9, label="MEMIT, GPT-J (paper)")
        for ax, title in zip(axes, ("ES (efficacy)", "S (harmonic mean of ES PS NS)",
                                    "ME-PPL_1k perplexity")):
            ax.set_xscale("log")
            ax.set_xlabel("facts in the update")
            ax.set_title(title, fontsize=9)
        axes[2].set_yscale("log")  # a collapse spans decades
        axes[0].legend(fontsize=8)
        save_figure(fig, path, f"Batch editing, {run_label(st)}")

    return Report(summary, markdown, figure)
