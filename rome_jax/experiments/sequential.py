"""Sequential editing traces ("Rebuilding ROME", Tables 1, 2, 4 and Figures 3, 4, 6-9).

For each method of ``--methods``, ``--n`` CounterFact records (one seeded draw, the same records
in the same order for every method) are edited one after another, each edit on the result of the
previous one (C and the context templates stay the base model's, as in ROME). A row per (method,
step): ‖Δ‖_F of that update, its denominator (this project's uᵀk and the papers' kᵀu/‖u‖) and
ME-PPL_50 perplexity; at step 0 (unedited), every ``--every`` edits and at the last edit also
ME-PPL_1k perplexity and downstream accuracy (``rome_jax.downstream``: SST-2, MRPC, CoLA, RTE,
PIQA, zero- or few-shot per task, with 95% Wilson intervals beside the majority-class rate; the
unedited model is evaluated once, and an edited one only on the tasks where the unedited one is
above chance: a fall to chance could not show on the others, which the report names). A
non-finite update ends the method's trace with a row saying so (the model would be destroyed: a
result, not an error). After the last edit, a ``final`` row scores every edited record (ES EM
PS PM NS NM S) on the final params, and ``single`` rows score each record edited alone from the
base model with every method (``counterfact_eval.evaluate_record``), for the table beside it.

``--methods`` takes the ROME family (``rome``, ``c-rome`` = ``r-rome``, ``p-rome``, ``k2-rome``)
and the batch editors ``memit``, ``emmet`` and ``alphaedit`` (``editors.batch.edit_batch``),
mixed at will: a batch editor also edits one fact per update (the Butterfly study's setting),
with its preset for a window that ends at the edit layer (``--layer``; by the presets' rule
MEMIT's and AlphaEdit's five layers ending there, EMMET's that layer alone) and keys ``rome`` (MEMIT's own); its context
(templates, C per layer) is prepared once, and AlphaEdit's K_pᵀK_p is threaded through its
trace. Its row's ‖Δ‖_F is the largest layer's (each layer's in ``delta_norms``), with ‖δ‖ of
its v* as the residual norm and EMMET's ``denominator_min`` / ``denominator_condition``; the
ROME fields (denominators, key cosine) are absent. Its updates change blocks from the window's
first layer up, so its ME-PPL_50 probe and its ME-PPL_1k and downstream probes cache the
residual stream entering that layer (a probe at the edit layer would miss the lower layers'
changes). Its single edits are its one-request update of the base model, scored as
``evaluate_record`` scores (plain prompts, ME-PPL_50 ratio).

With ``--collapse-cases`` ("Rebuilding ROME" Figure 3, the Butterfly study's HardCF sequence),
the records come from a finished ``collapse`` run (``--baseline``; by default
``collapse-lLAYER`` beside this run; an explicit one may be of another layer of the same
weights, whose collapse cases are then edited at ``--layer``: issue 20's first-token subjects,
found at SmolLM2's layer 12, edited at layer 1): its first ``--n`` normal cases N, in the run's order, with
its C collapse cases inserted in the run's order at the 1-based edit positions
``collapse_positions``: p_j = ⌊(j + 1)(N + C)/(C + 1) + ½⌋, j = 0..C-1, evenly spaced over the
N + C edits (N = 100, C = 25: 5, 10, 14, 19, ...). Each method runs that sequence (trace
METHOD) and the normal cases alone in the same order (trace ``METHOD/control``). Every step
row then also names its edit's ``group`` ("collapse" or "normal"; the collapse positions are
the steps of the "collapse" rows) and the efficacy ES so far (P(new) > P(true) on the rewrite
prompt, ``evaluation.efficacy``) over the normal and over the collapse cases edited so far
(``es_normal``, ``es_collapse``; None before the first). The report's collapse table gives for
each trace the first step with ME-PPL_50 perplexity above ten times the unedited model's and
the first above 1000 (the Butterfly study's collapse criterion), its peak and last ratio
(recovery: last / peak) and the ES so far after the last edit; its figure a column per method
with its control: ME-PPL_50 ratio against the edit, the collapse positions marked, and the ES
so far of each group below.

Resumable: after every row the weights of the layers the method changes (ROME's layer, a batch
editor's window) and AlphaEdit's K_pᵀK_p are saved atomically as ``state-TRACE.npz`` with the
step (``experiments.state``, the format ``sequential-batch`` shares); a rerun continues from
it. Rows are written before their state, so a run cut between the two replays that one edit
(deterministic); a state ahead of the journal (a rows.jsonl restored from an older copy) is
not trusted: the method's edits are replayed from the base model, the rows already written
kept. Each step's update is journaled before its row (``updates/TRACE-STEP.npz``, committed
with the rows), so a fresh checkout without the state replays the steps done by adding them,
with no edit computed and nothing evaluated.
"""

from __future__ import annotations

import functools
import textwrap
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from rome_jax.experiments import collapse
from rome_jax.experiments.state import (drop_journal, load_update, resume, save_state,
                                        save_update, state_path)
from rome_jax.experiments.report import (Report, accuracy_axis, accuracy_trace, fmt,
                                         markdown_table, perplexity_axis, pyplot, run_label,
                                         save_figure)

NAME = "sequential"
HELP = ("sequential edits: |Δ|, ME-PPL_1k perplexity and downstream accuracy every k edits, "
        "final CounterFact scores (Rebuilding ROME)")
METHODS = ("rome", "c-rome", "p-rome")
LABELS = {"c-rome": "r-rome = c-rome"}
SCORES = ("ES", "EM", "PS", "PM", "NS", "NM", "S")
CONTROL = "/control"  # a method's trace of the normal cases alone (--collapse-cases)
BUTTERFLY_PPL = 1000.0  # "The Butterfly Effect of Model Editing": collapsed past this perplexity


def label(trace: str) -> str:
    """A trace's name for tables: its method's label, and ", control" for a control trace."""
    method, control, _ = trace.partition(CONTROL)
    return LABELS.get(method, method) + (", control" if control else "")


def add_args(p) -> None:
    from rome_jax.arguments import positive_int

    p.add_argument("--methods", default=",".join(METHODS), metavar="M,M",
                   help=f"methods, comma-separated (default {','.join(METHODS)}; r-rome is "
                        "c-rome; also k2-rome and the batch editors memit, emmet, alphaedit, "
                        "one fact per update over their window ending at --layer)")
    p.add_argument("--n", type=positive_int, default=100, help="edits per method (default 100)")
    p.add_argument("--every", type=positive_int, default=10, metavar="K",
                   help="ME-PPL_1k perplexity and downstream accuracy every K edits (and at "
                        "step 0 and the last edit; default 10)")
    add_evaluation_args(p)
    p.add_argument("--case-ids", metavar="FILE.json",
                   help="edit these case ids, in this order, instead of a drawn sample")
    p.add_argument("--collapse-cases", action="store_true",
                   help="edit --n normal cases of a collapse run with its collapse cases "
                        "inserted at evenly spaced positions, and the normal cases alone as "
                        "each method's control (see the module docstring)")
    collapse.add_baseline_arg(p, any_layer=True)


def add_evaluation_args(p) -> None:
    """The records' draw and the evaluation after the edits, shared with ``sequential-batch``:
    --sample-seed, --tasks, --downstream-n, --shots, --ppl-texts."""
    from rome_jax.arguments import positive_int
    from rome_jax.downstream import DOWNSTREAM_N, SHOTS, TASKS

    p.add_argument("--sample-seed", type=int, default=0,
                   help="numpy seed of the drawn records and of the downstream examples "
                        "(default 0)")
    p.add_argument("--tasks", default=",".join(TASKS), metavar="T,T",
                   help=f"downstream tasks (default {','.join(TASKS)}); an edited model is "
                        "scored only on those where the unedited one is above chance")
    p.add_argument("--downstream-n", type=positive_int, default=DOWNSTREAM_N, metavar="N",
                   help=f"scored examples per downstream task, at most all but the "
                        f"demonstrations (default {DOWNSTREAM_N}: PIQA's 95%% interval about "
                        "±4 points; each GLUE sample has 200 examples, about ±7 points)")
    p.add_argument("--shots", type=int, default=None, metavar="K",
                   help="few-shot demonstrations before each downstream example, for every "
                        "task (default per task: "
                        + ", ".join(f"{t} {k}" for t, k in SHOTS.items()) + ")")
    p.add_argument("--ppl-texts", type=positive_int, default=1000, metavar="N",
                   help="ME-PPL_1k texts in the perplexity (default all 1000)")


def evaluation_settings(args) -> dict:
    """The settings of ``add_evaluation_args``'s flags (``shots`` per task); ValueError naming
    the flag."""
    from rome_jax.arguments import comma_list
    from rome_jax.downstream import SHOTS, TASKS

    if args.shots is not None and args.shots < 0:
        raise ValueError("--shots: must be 0 or more")
    tasks = comma_list(args.tasks, "--tasks", known=TASKS)
    return {"sample_seed": args.sample_seed, "tasks": tasks, "downstream_n": args.downstream_n,
            "shots": {t: SHOTS[t] if args.shots is None else args.shots for t in tasks},
            "ppl_texts": args.ppl_texts}


def downstream_columns(unedited: Mapping[str, Mapping]) -> tuple[list[str], str]:
    """The tasks of the unedited model's downstream ``unedited`` results that the traces show
    (``downstream.above_chance``), and a sentence naming the others ("" when none)."""
    from rome_jax.downstream import above_chance

    kept = [t for t, r in unedited.items() if above_chance(r)]
    dropped = [f"{t} {accuracy_cell(r)} against a majority rate of {r['chance']:.3g}"
               for t, r in unedited.items() if t not in kept]
    note = ("Dropped from the traces, because the unedited model's 95% interval is not above "
            "the majority-class rate (a fall to chance could not show): "
            + "; ".join(dropped) + "." if dropped else "")
    return kept, note


def accuracy_cell(result: Mapping) -> str:
    """"0.62 [0.55, 0.68]": a downstream ``result``'s accuracy and its 95% Wilson interval."""
    from rome_jax.downstream import wilson_interval

    lo, hi = wilson_interval(result["accuracy"], result["n"])
    return f"{result['accuracy']:.2f} [{lo:.2f}, {hi:.2f}]"


def shots_text(shots: int | Mapping[str, int]) -> str:
    """A run's ``shots`` setting for titles (a journal before per-task shots has one count)."""
    if isinstance(shots, int):
        return f"{shots}-shot"
    return ", ".join(f"{t} {k}-shot" for t, k in shots.items())


def settings(args) -> dict:
    from rome_jax.arguments import comma_list, read_case_ids
    from rome_jax.editors.hparams import BATCH_METHODS
    from rome_jax.editors.rome import METHODS as ROME_METHODS, canonical_method

    known = (*ROME_METHODS, *BATCH_METHODS)
    methods = list(dict.fromkeys(m if m in BATCH_METHODS else canonical_method(m)
                                 for m in comma_list(args.methods, "--methods", known=known)))
    case_ids = read_case_ids(args.case_ids) if args.case_ids else None
    if args.collapse_cases and case_ids is not None:
        raise ValueError("--case-ids: not with --collapse-cases (the records come from "
                         "--baseline)")
    if args.baseline and not args.collapse_cases:
        raise ValueError("--baseline: only with --collapse-cases")
    extra = {"collapse_cases": True, "baseline": args.baseline} if args.collapse_cases else {}
    return {"methods": methods, "n": args.n, "every": args.every, "case_ids": case_ids,
            **extra, **evaluation_settings(args)}


def check_row(row: Mapping) -> None:
    """ValueError naming the first field that a step, ``final`` or ``single`` row lacks."""
    from rome_jax.experiments.journal import NUMBER, require

    key = row["key"]
    if not (isinstance(key, list) and len(key) == 2 and isinstance(key[0], str)
            and (type(key[1]) is int or key[1] == "final")):
        raise ValueError("key: expected [METHOD, STEP or \"final\"] or [\"single\", CASE_ID]")
    if key[0] == "single":
        require(row, {"case_id": int, "before": dict, "edits": dict})
        return
    require(row, {"method": str, "step": int})
    if key[1] == "final":
        require(row, {"case_ids": list, "records": list, "summary": dict})
    elif row.get("ended"):
        require(row, {"error": str})
    elif key[1] != 0:
        require(row, {"case_id": int, "delta_norm": NUMBER, "ppl50": NUMBER})
    if "ppl1k" in row:
        require(row, {"ppl1k": NUMBER, "downstream": dict})


def chosen_records(s, st: Mapping) -> list[dict]:
    """The records edited, in order: ``case_ids``, else the first ``n`` of a numpy
    permutation (seed ``sample_seed``) of CounterFact whose request fits the model."""
    from rome_jax.data import counterfact_by_case_id, load_counterfact
    from rome_jax.rome.edit import build_batch
    from rome_jax.rome.request import EditRequest

    records = load_counterfact()
    if st["case_ids"] is not None:
        chosen = counterfact_by_case_id(records, st["case_ids"])
        if len(chosen) < st["n"]:
            raise ValueError(f"--case-ids: {len(chosen)} records, --n asks for {st['n']}")
        return chosen[:st["n"]]
    chosen = []
    for i in np.random.default_rng(st["sample_seed"]).permutation(len(records)):
        record = records[int(i)]
        try:
            build_batch(s.model, EditRequest.from_dict(record), s.context.templates,
                        s.hparams.fact_token)
        except ValueError:  # too long for the model with its templates
            continue
        chosen.append(record)
        if len(chosen) == st["n"]:
            return chosen
    raise ValueError(f"--n: only {len(chosen)} CounterFact records fit the model")


def collapse_positions(n: int, c: int) -> list[int]:
    """The 1-based edit positions of ``c`` collapse cases among ``n`` ≥ 1 normal ones:
    p_j = ⌊(j + 1)(n + c)/(c + 1) + ½⌋ for j = 0..c-1, distinct, increasing, in [1, n + c - 1]
    (the spacing (n + c)/(c + 1) is at least 1)."""
    return [(2 * (j + 1) * (n + c) + c + 1) // (2 * (c + 1)) for j in range(c)]


def collapse_sequence(header: Mapping) -> tuple[list[dict], list[str]]:
    """(records, group of each) for ``--collapse-cases``: the baseline collapse run's first
    ``n`` normal cases with its collapse cases at ``collapse_positions``, in the run's order.
    ValueError naming --n or --baseline when the baseline has too few of either."""
    from rome_jax.data import counterfact_by_case_id, load_counterfact

    st = header["settings"]
    base_header, base_rows = collapse.baseline(header, st["bos"], any_layer=True)
    picked = collapse.chosen(base_header, base_rows, st["n"])
    normal = [c for g, c, _ in picked if g == "normal"]
    cases = [c for g, c, _ in picked if g == "collapse"]
    where = collapse.baseline_dir(header, st["bos"])
    if len(normal) < st["n"]:
        raise ValueError(f"--n: {where} has {len(normal)} normal cases, --n asks for {st['n']}")
    if not cases:
        raise ValueError(f"--baseline: {where} has no collapse case")
    positions = set(collapse_positions(len(normal), len(cases)))
    normal_left, cases_left = iter(normal), iter(cases)
    groups = ["collapse" if p in positions else "normal"
              for p in range(1, len(normal) + len(cases) + 1)]
    ids = [next(cases_left if g == "collapse" else normal_left) for g in groups]
    try:
        return counterfact_by_case_id(load_counterfact(), ids), groups
    except ValueError as err:
        raise ValueError(f"--baseline: {where}: {err}") from None


def efficacy_so_far(model, records: Sequence[Mapping], groups: Sequence[str], params) -> dict:
    """``es_normal`` and ``es_collapse``: the efficacy on ``params`` of the ``records`` of each
    group (None for a group without any)."""
    from rome_jax.evaluation import efficacy, request_probabilities
    from rome_jax.rome.request import EditRequest

    p_new, p_true = request_probabilities(model, [EditRequest.from_dict(r) for r in records],
                                          params)
    g = np.asarray(groups)
    return {f"es_{k}": efficacy(p_new[g == k], p_true[g == k]) if (g == k).any() else None
            for k in ("normal", "collapse")}


# ----------------------------------------------------------------------------- run


class Evaluators:
    """ME-PPL_1k perplexity and downstream accuracy of params that differ from the base only
    at blocks ≥ ``layer`` (default the edit layer), built on first use (a resumed run that
    needs neither builds neither). The unedited model is evaluated once per run: ``unedited``
    takes a step-0 row of ``journal`` (any method's) when there is one. An edited model is
    scored only on the tasks where the unedited one is above chance (``downstream_columns``)."""

    def __init__(self, s, st: Mapping, journal, layer: int | None = None):
        self.s, self.st, self.journal = s, st, journal
        self.layer = s.hparams.layer if layer is None else layer
        self._ppl = self._downstream = None

    def unedited(self) -> dict:
        """``ppl1k`` and ``downstream`` (every task) of the base model."""
        base = next((r for r in self.journal.rows if r["key"][1:] == [0] and "ppl1k" in r),
                    None)
        if base is not None:
            return {k: base[k] for k in ("ppl1k", "downstream")}
        return self._evaluate(self.s.model.params, self.st["tasks"])

    def __call__(self, params) -> dict:
        """``ppl1k`` and ``downstream`` (the tasks where the base model is above chance) of
        edited ``params``."""
        kept, _ = downstream_columns(self.unedited()["downstream"])
        return self._evaluate(params, kept)

    def _evaluate(self, params, tasks: Sequence[str]) -> dict:
        from rome_jax import downstream
        from rome_jax.data import load_me_ppl
        from rome_jax.guard import PerplexityProbe

        s, st = self.s, self.st
        if self._ppl is None:
            self._ppl = PerplexityProbe(s.model, load_me_ppl("ME-PPL_1k")[:st["ppl_texts"]],
                                        self.layer)
            self._downstream = downstream.DownstreamProbe(s.model, downstream.load_tasks(
                tasks, st["downstream_n"], st["shots"], st["sample_seed"]), self.layer)
        return {"ppl1k": self._ppl(params), "downstream": self._downstream(params, tasks)}


def _row(journal, key: list) -> dict | None:
    return next((r for r in journal.rows if r["key"] == key), None) if key in journal else None


class Editor:
    """One method's edit of one record on the params so far, and what measures it: ``layers``,
    the layers its updates change (ROME's layer, or a batch method's window ending there), and
    ``probe`` (ME-PPL_50) and ``evaluate`` (ME-PPL_1k, downstream; shared by the methods whose
    window starts at the same layer), exact for params changed at blocks >= ``layers[0]``. A
    batch method's context (templates, C of each window layer) is prepared once, on first use,
    for all its edits: its trace, its control and its single edits."""

    def __init__(self, s, method: str, hparams, evaluate: Evaluators, seed: int):
        from rome_jax.editors.hparams import BATCH_METHODS

        self.s, self.method, self.hparams, self.evaluate = s, method, hparams, evaluate
        self.batch = method in BATCH_METHODS
        self.layers = edit_layers(method, hparams)
        self.seed = seed

    @property
    def probe(self):
        return self.s.probe_at(self.layers[0])

    @functools.cached_property
    def context(self):
        import jax

        from rome_jax.editors.batch import prepare_batch

        if not self.batch:
            return self.s.context
        return prepare_batch(self.s.model, self.method, self.hparams, jax.random.key(self.seed))

    def edit(self, record: Mapping, params, preserved: Mapping
             ) -> tuple[object, dict, dict, dict]:
        """(the update of ``params`` that writes ``record``, the step row's fields, AlphaEdit's
        ``preserved`` after it, and the keys it grew by: {layer: K [1, F]}, empty for the other
        methods). ROME's fields: ‖Δ‖_F, |Δ|, its denominators, residual norm and
        key cosine; a batch method's: the largest layer's ‖Δw‖_F and |Δ| (``delta_norm``,
        ``delta_abs``), each layer's ‖Δw‖_F (``delta_norms``), ‖δ‖ of its v* (the residual the
        window writes: ``residual_norm``) and EMMET's ``denominator_min`` and
        ``denominator_condition`` per layer. ValueError saying "non-finite" for a refused
        update."""
        from rome_jax.editors.batch import edit_batch
        from rome_jax.rome.edit import compute_edit
        from rome_jax.rome.request import EditRequest

        request = EditRequest.from_dict(record)
        if not self.batch:
            update, r = compute_edit(self.s.model, request, self.hparams, self.method,
                                     context=self.context, params=params)
            return update, {"delta_norm": r.delta_norm, "delta_abs": r.delta_abs,
                            "denominator": r.denominator,
                            "denominator_unit_u": r.denominator_unit_u,
                            "residual_norm": r.residual_norm, "key_cosine": r.key_cosine
                            }, preserved, {}
        result = edit_batch(self.s.model, [request], self.method, self.hparams,
                            context=self.context, params=params, preserved=preserved)
        layers = result.report.layers
        norms = [x["update.delta_norm"] for x in layers]
        fields = {"delta_norm": max(norms), "delta_abs": max(x["delta_abs"] for x in layers),
                  "delta_norms": norms, "residual_norm": result.report.v_delta_norms[0]}
        if self.method == "emmet":
            fields.update({k: [x[k] for x in layers]
                           for k in ("denominator_min", "denominator_condition")})
        return (result.edit, fields, result.preserved,
                result.keys if self.method == "alphaedit" else {})


def edit_layers(method: str, hparams) -> list[int]:
    """The layers ``method``'s updates change: a batch editor's window, ROME's one layer."""
    from rome_jax.editors.hparams import BATCH_METHODS

    return list(hparams.layers) if method in BATCH_METHODS else [hparams.layer]


def editors(s, args, st: Mapping, journal) -> dict[str, Editor]:
    """An ``Editor`` per method of the run: a batch method's settings are its preset for a
    window that ends at the edit layer, keys ``rome`` (MEMIT's own)."""
    from rome_jax.arguments import batch_hparams
    from rome_jax.editors.hparams import BATCH_METHODS

    evaluators, out = {}, {}
    for method in st["methods"]:
        hparams = (batch_hparams(s.model.config, method, args, keys="rome",
                                 layer=s.hparams.layer)
                   if method in BATCH_METHODS else s.hparams)
        first = edit_layers(method, hparams)[0]
        if first not in evaluators:
            evaluators[first] = Evaluators(s, st, journal, layer=first)
        out[method] = Editor(s, method, hparams, evaluators[first], st.get("seed", 0))
    return out


def run_method(s, editor: Editor, records: Sequence[Mapping], journal, out: Path, st: Mapping,
               groups: Sequence[str] | None = None, trace: str | None = None) -> None:
    """One method's trace (named ``trace``, default the method: the rows' key) from its saved
    state, then its ``final`` row; with ``groups`` (one per record), each step row names its
    edit's group and the efficacy so far per group (``efficacy_so_far``)."""
    from tqdm import tqdm

    import jax.numpy as jnp

    from rome_jax.counterfact_eval import summarize_counterfact
    from rome_jax.editors.alphaedit import accumulate_preserved
    from rome_jax.editors.delta import apply_edit
    from rome_jax.evaluation import counterfact_metrics, counterfact_nll

    method, n, layers = editor.method, len(records), editor.layers
    trace = trace or method
    if _row(journal, [trace, "final"]) is not None:
        return
    if _row(journal, [trace, 0]) is None:
        state_path(out, trace).unlink(missing_ok=True)  # an --overwrite left them behind
        drop_journal(out, trace)
        journal.append({"key": [trace, 0], "method": method, "step": 0, "layers": layers,
                        "ppl50": editor.probe.base, "ppl50_ratio": 1.0,
                        **editor.evaluate.unedited()})
    written = max(r["step"] for r in journal.rows if r["key"][0] == trace
                  and r["key"][1] != "final")
    step, params, preserved = resume(out, trace, s.model.params, layers, written, journal.path)
    for i in tqdm(range(step + 1, n + 1), initial=step, total=n, desc=label(trace),
                  unit="edit"):
        done = _row(journal, [trace, i])
        if done is not None and done.get("ended"):
            break
        record = records[i - 1]
        case_id = int(record["case_id"])
        head = {"key": [trace, i], "method": method, "step": i, "case_id": case_id,
                **({"group": groups[i - 1]} if groups is not None else {})}
        journaled = load_update(out, trace, i, case_id) if done is not None else None
        if journaled is not None:  # a checkout without the state: replay the step
            update, keys = journaled
            preserved = {**preserved, **{layer: accumulate_preserved(
                preserved.get(layer), jnp.asarray(k)) for layer, k in keys.items()}}
        else:
            try:
                update, fields, preserved, keys = editor.edit(record, params, preserved)
            except ValueError as err:
                if "non-finite" not in str(err):
                    raise
                journal.append({**head, "ended": True, "error": " ".join(str(err).split())})
                break
            save_update(out, trace, i, case_id, update, keys)
        params = apply_edit(params, update)
        if done is None:
            ppl50 = editor.probe(params)
            row = {**head, **fields, "ppl50": ppl50, "ppl50_ratio": ppl50 / editor.probe.base}
            if groups is not None:
                row.update(efficacy_so_far(s.model, records[:i], groups[:i], params))
            if i % st["every"] == 0 or i == n:
                row.update(editor.evaluate(params))
            journal.append(row)
        save_state(out, trace, i, params, layers, preserved)
        step = i
    per_record = [counterfact_metrics(counterfact_nll(s.model, r, params))
                  for r in tqdm(records[:step], desc=f"{label(trace)}: final scores",
                                unit="record", leave=False)]
    journal.append({"key": [trace, "final"], "method": method, "step": step,
                    "case_ids": [int(r["case_id"]) for r in records[:step]],
                    "records": per_record, "summary": summarize_counterfact(per_record)})


def single_row(s, record: Mapping, solved, edit_by: Mapping[str, Editor]) -> dict:
    """The ``single`` row of ``record``: its scores before editing and edited alone from the
    base model by each method. The ROME methods' from ``counterfact_eval.evaluate_record``
    (``solved``: their shared keys and v*); a batch method's from its one-request update
    (``Editor.edit``), scored as evaluate_record scores (``evaluation.counterfact_metrics`` of
    the plain prompts, ME-PPL_50 perplexity and ratio) with its ``Editor.edit`` fields, or
    {"error"} for a non-finite update."""
    from rome_jax.counterfact_eval import EvalSettings, evaluate_record
    from rome_jax.editors.delta import apply_edit
    from rome_jax.evaluation import counterfact_metrics, counterfact_nll

    def scores(params, probe) -> dict:
        ppl = probe(params)
        return {**counterfact_metrics(counterfact_nll(s.model, record, params)),
                "perplexity": ppl, "ppl_ratio": ppl / probe.base}

    rome = tuple(m for m, e in edit_by.items() if not e.batch)
    row = (evaluate_record(s.model, record, s.hparams, s.context, s.probe,
                           EvalSettings(methods=rome), solved=solved) if rome else
           {"case_id": int(record["case_id"]), "before": scores(s.model.params, s.probe),
            "edits": {}})
    for method, editor in edit_by.items():
        if editor.batch:
            try:
                update, fields, *_ = editor.edit(record, s.model.params, {})
            except ValueError as err:
                if "non-finite" not in str(err):
                    raise
                row["edits"][method] = {"error": " ".join(str(err).split())}
                continue
            row["edits"][method] = {**scores(apply_edit(s.model.params, update), editor.probe),
                                    **fields}
    return {"key": ["single", int(record["case_id"])], **row,
            "edits": {m: row["edits"][m] for m in edit_by}}


def run(s, args, journal, header: Mapping) -> None:
    from tqdm import tqdm

    from rome_jax.experiments.records import with_solved

    st = header["settings"]
    out = Path(header["out"])
    edit_by = editors(s, args, st, journal)
    if st.get("collapse_cases"):
        records, groups = collapse_sequence(header)
        normal = [r for r, g in zip(records, groups) if g == "normal"]
        for method, editor in edit_by.items():
            run_method(s, editor, records, journal, out, st, groups)
            run_method(s, editor, normal, journal, out, st, ["normal"] * len(normal),
                       trace=method + CONTROL)
    else:
        records = chosen_records(s, st)
        for editor in edit_by.values():
            run_method(s, editor, records, journal, out, st)
    todo = [r for r in records if ["single", int(r["case_id"])] not in journal]
    solved = (with_solved(s, todo, args.batch) if any(not e.batch for e in edit_by.values())
              else ((r, None) for r in todo))
    for record, solved_record in tqdm(solved, total=len(todo), desc="single edits",
                                      unit="record"):
        journal.append(single_row(s, record, solved_record, edit_by))


# ----------------------------------------------------------------------------- report


def traces(rows: Sequence[Mapping]) -> dict[str, list[dict]]:
    """Each trace's step rows (edits and the one that ended the trace), by step; a trace is
    a method, or with ``--collapse-cases`` also a method's control."""
    out: dict[str, list[dict]] = {}
    for r in rows:
        if isinstance(r.get("step"), int) and r["key"][1] != "final":
            out.setdefault(r["key"][0], []).append(r)
    return {m: sorted(rs, key=lambda r: r["step"]) for m, rs in out.items()}


def summarize(header: Mapping, rows: Sequence[Mapping]) -> dict:
    from rome_jax.counterfact_eval import summarize as summarize_single

    st = header["settings"]
    finals = {r["key"][0]: r for r in rows if r["key"][1] == "final"}
    singles = [r for r in rows if r["key"][0] == "single"]
    single = summarize_single(singles, st["methods"]) if singles else {}
    base = next((r["downstream"] for r in rows if r["key"][1:] == [0] and "ppl1k" in r), {})
    tasks, dropped = downstream_columns(base)
    out = {"methods": {}, "tasks": tasks, "dropped": dropped, "unedited": single.get("none")}
    for method, trace in traces(rows).items():
        ended = [r for r in trace if r.get("ended")]
        edits = [r for r in trace if r["step"] > 0 and not r.get("ended")]
        out["methods"][method] = {
            "label": label(method), "edits": len(edits),
            "ended_at": ended[0]["step"] if ended else None,
            "case_ids": [r["case_id"] for r in edits],
            "delta_norm": [r["delta_norm"] for r in edits],
            "evaluated": [{"step": r["step"], "ppl1k": r["ppl1k"],
                           "downstream": r["downstream"]} for r in trace if "ppl1k" in r],
            "sequential": finals[method]["summary"] if method in finals else None,
            "single": single.get(method)}
        if st.get("collapse_cases"):
            out["methods"][method]["collapse"] = collapse_trace(trace)
    return out


def collapse_trace(trace: Sequence[Mapping]) -> dict:
    """What the collapse table and figure show of one trace's step rows (``--collapse-cases``):
    per edit its ``group``, ME-PPL_50 perplexity and ratio and ES so far; the collapse
    ``positions``; the first step past ten times the unedited perplexity (``first_x10``) and
    past ``BUTTERFLY_PPL`` (``first_1000``), None if never; the ``peak`` ratio and its step, the
    ``last`` ratio and ``recovery`` = last / peak."""
    edits = [r for r in trace if r["step"] > 0 and not r.get("ended")]
    ratio = [r["ppl50_ratio"] for r in edits]
    out = {"steps": [r["step"] for r in edits], "group": [r["group"] for r in edits],
           "ppl50": [r["ppl50"] for r in edits], "ppl50_ratio": ratio,
           "es_normal": [r["es_normal"] for r in edits],
           "es_collapse": [r["es_collapse"] for r in edits],
           "positions": [r["step"] for r in edits if r["group"] == "collapse"],
           "first_x10": next((r["step"] for r in edits if not r["ppl50_ratio"] <= 10), None),
           "first_1000": next((r["step"] for r in edits if not r["ppl50"] <= BUTTERFLY_PPL),
                              None)}
    if edits:
        peak = int(np.nanargmax(ratio)) if not np.isnan(ratio).all() else 0
        out.update(peak=ratio[peak], peak_step=edits[peak]["step"], last=ratio[-1],
                   recovery=ratio[-1] / ratio[peak])
    return out


def collapse_table(summary: Mapping) -> str:
    """Each trace of a ``--collapse-cases`` run: where ME-PPL_50 first crossed ×10 and 1000,
    its peak and last ratio, and the ES so far of each group after the last edit."""
    rows, unedited = [], None
    for trace, v in summary["methods"].items():
        c = v.get("collapse")
        if not c or not c["steps"]:
            continue
        unedited = c["ppl50"][0] / c["ppl50_ratio"][0]
        rows.append([label(trace), len(c["steps"]), len(c["positions"]), c["first_x10"],
                     c["first_1000"], c["peak"], c["peak_step"], c["last"], c["recovery"],
                     c["es_normal"][-1], c["es_collapse"][-1]])
    return ("Sequential editing through collapse cases: the first edit after which ME-PPL_50 "
            "perplexity is above ten times the unedited model's and above "
            f"{BUTTERFLY_PPL:g} (the Butterfly study's collapse criterion; - never; the "
            f"unedited model's is {fmt(unedited)}), its "
            "peak and last ratio to the unedited model's (recovery = last / peak) and the "
            "efficacy ES so far of the normal and of the collapse cases edited, after the "
            "last edit.\n\n"
            + markdown_table(["trace", "edits", "collapse cases", "first ×10",
                              f"first > {BUTTERFLY_PPL:g}", "peak ratio", "at edit",
                              "last ratio", "last / peak", "ES normal", "ES collapse"], rows))


def collapse_figure(summary: Mapping, title: str):
    """A column per method, with its control: ME-PPL_50 ratio (log) against the edit, the
    collapse positions marked (top), and the ES so far of each group (bottom)."""
    def draw(path: Path) -> None:
        plt = pyplot()

        methods = [m for m in summary["methods"] if CONTROL not in m]
        width = 4.6 * len(methods)
        fig, axes = plt.subplots(2, len(methods), figsize=(width, 6.4), squeeze=False,
                                 sharex="col")
        for (top, bottom), method in zip(axes.T, methods):
            for trace, style in ((method, "-"), (method + CONTROL, "--")):
                c = summary["methods"].get(trace, {}).get("collapse")
                if not c or not c["steps"]:
                    continue
                line, = top.plot([0, *c["steps"]], [1.0, *c["ppl50_ratio"]], style, lw=1,
                                 label=label(trace))
                for group, marker in (("normal", None), ("collapse", "x")):
                    es = [np.nan if e is None else e for e in c[f"es_{group}"]]
                    if not np.isnan(es).all():
                        bottom.plot(c["steps"], es, style, lw=1, marker=marker, ms=3,
                                    color=line.get_color(),
                                    label=f"{label(trace)}: {group} cases")
            c = summary["methods"][method].get("collapse") or {"positions": []}
            for ax in (top, bottom):
                for i, p in enumerate(c["positions"]):
                    ax.axvline(p, color="tab:red", lw=0.6, alpha=0.4,
                               label="collapse case" if i == 0 and ax is top else None)
            top.axhline(10, color="grey", lw=0.8, ls=":", label="×10")
            top.set(yscale="log", ylabel="ME-PPL_50 / unedited", title=label(method))
            bottom.set(xlabel="edit", ylabel="ES so far", ylim=(-0.02, 1.02))
            top.legend(fontsize=7)
            bottom.legend(fontsize=6)
        save_figure(fig, path, textwrap.fill(title, int(15 * width)), fontsize=9)
    return draw


def tables(summary: Mapping, title: str) -> str:
    tasks = summary["tasks"]
    parts = [title]
    for method, v in summary["methods"].items():
        evaluated = v["evaluated"]
        if not evaluated:
            continue
        chance = evaluated[0]["downstream"]
        ended = f"; ended at step {v['ended_at']} (non-finite update)" if v["ended_at"] else ""
        parts.append(f"{label(method)}: ME-PPL_1k perplexity and downstream accuracy [95% "
                     f"interval] after each evaluated step ({v['edits']} edits{ended}).\n\n"
                     + markdown_table(
                         ["step", "ME-PPL_1k", *tasks],
                         [[e["step"], e["ppl1k"], *(accuracy_cell(e["downstream"][t])
                                                    for t in tasks)] for e in evaluated]
                         + [["chance", None, *(chance[t]["chance"] for t in tasks)]]))
    if summary["dropped"]:
        parts.append(summary["dropped"])
    if any("collapse" in v for v in summary["methods"].values()):
        parts.append(collapse_table(summary))
    final = []
    if summary["unedited"]:
        final.append(["unedited", "-", summary["unedited"]["n"],
                      *(summary["unedited"][k] for k in SCORES)])
    for method, v in summary["methods"].items():
        for kind in ("single", "sequential"):
            if v[kind]:
                final.append([label(method), kind, v[kind]["n"], *(v[kind][k] for k in SCORES)])
    if final:
        parts.append("CounterFact scores of the edited records: each edited alone from the "
                     "base model (single) and all of them on the final params of the "
                     "sequential run (sequential).\n\n"
                     + markdown_table(["method", "edits", "n", *SCORES], final))
    return "\n\n".join(parts)


def figure(summary: Mapping, title: str):
    def draw(path: Path) -> None:
        plt = pyplot()

        tasks = summary["tasks"]
        cols = 2 + len(tasks)
        ncols = min(cols, 4)
        fig, axes = plt.subplots(-(-cols // ncols), ncols, figsize=(3.6 * ncols,
                                                                      3.0 * -(-cols // ncols)),
                                 squeeze=False)
        axes = axes.ravel()
        for method, v in summary["methods"].items():
            steps = np.arange(1, len(v["delta_norm"]) + 1)
            axes[0].plot(steps, v["delta_norm"], lw=1, label=label(method))
            ev = v["evaluated"]
            x = [e["step"] for e in ev]
            axes[1].plot(x, [e["ppl1k"] for e in ev], marker="o", ms=3, label=label(method))
            for ax, t in zip(axes[2:], tasks):
                accuracy_trace(ax, x, [e["downstream"][t] for e in ev], label=label(method))
        axes[0].set(yscale="log", xlabel="edit", ylabel="‖Δ‖_F (a batch editor's largest layer)",
                    title="update norm")
        perplexity_axis(axes[1], [e["ppl1k"] for v in summary["methods"].values()
                                  for e in v["evaluated"]],
                        xlabel="edits", ylabel="perplexity", title="ME-PPL_1k")
        first = next((v["evaluated"][0] for v in summary["methods"].values()
                      if v["evaluated"]), None)
        for ax, t in zip(axes[2:], tasks):
            accuracy_axis(ax, t, None if first is None else first["downstream"][t]["chance"])
        for ax in axes[cols:]:
            ax.axis("off")
        axes[0].legend(fontsize=7)
        axes[2 if tasks else 1].legend(fontsize=7)
        save_figure(fig, path, title)
    return draw


def report(header: Mapping, rows: Sequence[Mapping]) -> Report:
    st = header["settings"]
    summary = summarize(header, rows)
    records = (f"{st['n']} normal cases of the collapse run "
               f"{collapse.baseline_dir(header, st.get('bos')).name}, its collapse cases "
               "inserted at evenly spaced positions, and the normal cases alone (control)"
               if st.get("collapse_cases") else
               f"{st['n']} CounterFact records (sample seed {st['sample_seed']})")
    title = (f"Sequential editing: {run_label(st)}; {records}, evaluated every "
             f"{st['every']} edits; downstream {st['downstream_n']} examples per task at "
             f"most, {shots_text(st['shots'])}; ME-PPL_1k on {st['ppl_texts']} texts.")
    has_trace = any(v["delta_norm"] or v["evaluated"] for v in summary["methods"].values())
    draw = collapse_figure if st.get("collapse_cases") else figure
    return Report(summary, tables(summary, title), draw(summary, title) if has_trace else None)
