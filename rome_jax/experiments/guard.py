"""The collapse guard scored on a finished ``collapse`` (or ``bos``) run's edits.

A guard profile is built for the run's model, layer, settings and start token
(``guard.build_profile``: ``--guard-samples`` normal ``rome`` edits kept below a 10x ME-PPL_50
ratio), leaving out every record of the run (``--baseline``), so the guard is never scored on
its own calibration edits; the profile is the one row of the journal. Each edit of the run
(``rome`` and ``c-rome`` of every record: all edits a user might make) is then judged before it
is applied, as ``guard.evaluate`` does without perplexities, against two labels: *collapse* =
its ME-PPL_50 ratio is above 10, and separately above 2 (NaN and inf count as collapses).

Tables: the true-positive rate (collapses refused) and false-positive rate (other edits
refused), with counts, at the profile's default thresholds, for both methods pooled and for
``rome`` alone (``c-rome`` does not collapse); then ROC curves and their areas for three rules:
the guard's pre-apply rule swept along its one scale λ (both thresholds moved by λ:
``guard.score`` > log λ), the denominator alone (refuse below a cut) and ‖Δ‖ alone (refuse
above a cut), each with the largest true-positive rate at a false-positive rate ≤ 2 % (the
issue's target: ≥ 95 % of collapses refused there) and the λ range that meets the target; the
rates with other |Δ| ceilings k (``K_GRID``); and the edits the default guard judges wrongly.
With ``--bos`` the run scored is a ``bos`` run and the profile is built with the start token,
as the guard of an edit made with ``--bos`` would be.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from rome_jax.experiments import collapse
from rome_jax.experiments.journal import NUMBER, require
from rome_jax.experiments.report import (Report, fmt, markdown_table, pyplot, run_label,
                                         save_figure)
from rome_jax.rome.hparams import filled

NAME = "guard"
HELP = "the collapse guard scored on a collapse run's edits: TPR/FPR, ROC curves"
LABELS = (10.0, 2.0)      # collapse: ME-PPL_50 ratio above this
TARGET_TPR, TARGET_FPR = 0.95, 0.02
MAX_PPL_RATIO = 10.0      # the profile keeps normal edits below this ratio (the guard's default)
POPULATIONS = {"rome and c-rome": collapse.METHODS, "rome": ("rome",)}
RULES = ("guard (λ)", "denominator", "‖Δ‖")
K_GRID = (2.0, 3.0, 4.0, 5.0, 6.0, 8.0)  # the |Δ| ceiling's k, the denominator floor kept


def add_args(p) -> None:
    from rome_jax.arguments import positive_int

    p.add_argument("--baseline", metavar="DIR",
                   help="the finished collapse (or, with --bos, bos) run whose edits are "
                        "scored (default experiments/MODEL/collapse-lLAYER, with --bos "
                        "bos-lLAYER); its records are left out of the profile")
    p.add_argument("--guard-samples", type=positive_int, default=48, metavar="N",
                   help="normal edits in the profile (default 48, as the guard's)")


def settings(args) -> dict:
    return {"baseline": args.baseline, "guard_samples": args.guard_samples,
            "max_ppl_ratio": MAX_PPL_RATIO}


def check_row(row: Mapping) -> None:
    """ValueError unless ``row`` is the profile row."""
    from rome_jax.guard import GuardProfile

    require(row, {"key": str, "profile": dict})
    GuardProfile.from_dict(row["profile"])


def source_dir(header: Mapping) -> Path:
    st = header["settings"]
    name = f"{'collapse' if st['bos'] is None else 'bos'}-l{st['layer']}"
    return Path(st["baseline"]) if st.get("baseline") else Path(header["out"]).parent / name


def source(header: Mapping) -> tuple[dict, list[dict]]:
    """(header, rows) of the scored run; it must be a collapse or bos run made with the weights,
    layer, ROME settings and start token of ``header``'s."""
    from rome_jax.experiments.journal import read_rows

    path = source_dir(header) / "rows.jsonl"
    if not path.exists():
        raise FileNotFoundError(f"--baseline: {path} does not exist; run `rome-jax experiment "
                                "collapse` (or bos) with the same model and layer first")
    base_header, rows = read_rows(path, None, check_source_row)
    if base_header["experiment"] not in ("collapse", "bos"):
        raise ValueError(f"--baseline {path.parent}: a {base_header['experiment']} run, not a "
                         "collapse or bos run")
    st, base = header["settings"], base_header["settings"]
    differ = [k for k in ("digest", "layer", "bos") if base.get(k) != st[k]]
    differ += [] if filled(base.get("hparams", {})) == filled(st["hparams"]) else ["hparams"]
    if differ:
        raise ValueError(f"--baseline {path.parent}: made with another "
                         + ", ".join(differ) + "; it must be a run of this model, layer, "
                         "ROME settings and start token")
    return base_header, rows


def check_source_row(row: Mapping) -> None:
    """ValueError naming the first field a scored row lacks: a collapse row whose edits carry
    their denominator and |Δ|."""
    collapse.check_row(row)
    if "error" not in row:
        require(row, {m: {"denominator": NUMBER, "delta_abs": NUMBER}
                      for m in collapse.METHODS})


def run(s, args, journal, header: Mapping) -> None:
    from tqdm import tqdm

    from rome_jax.guard import build_profile

    _, rows = source(header)  # refused before the profile is built
    if "profile" in journal:
        return
    profile = build_profile(
        s.model, s.hparams, s.context, args.guard_samples, probe=s.probe,
        max_ppl_ratio=MAX_PPL_RATIO, exclude=[r["case_id"] for r in rows],
        progress=lambda total: tqdm(total=total, desc="guard profile", leave=False))
    journal.append({"key": "profile", "profile": profile.to_dict()})


# ----------------------------------------------------------------------------- scoring


def edits(rows: Sequence[Mapping]) -> list[dict]:
    """One dict per edit of a collapse-shaped run: case id, method, first-token subject,
    denominator, ``delta_abs``, ``delta_norm`` and ME-PPL_50 ratio."""
    return [{"case_id": r["case_id"], "method": m, "first_token_subject":
             r["first_token_subject"], **{k: r[m][k] for k in ("denominator", "delta_abs",
                                                                "delta_norm", "ratio")}}
            for r in rows if "error" not in r for m in collapse.METHODS]


def collapsed(edit: Mapping, label: float) -> bool:
    return not edit["ratio"] <= label  # NaN and inf collapse too


def rule_scores(edit: Mapping, profile) -> dict[str, float]:
    """Each rule's score of an edit (larger: more suspect; a rule refuses above a cut)."""
    from rome_jax.guard import score

    den = edit["denominator"]
    return {"guard (λ)": score(edit, profile),
            "denominator": math.inf if not den > 0 else -den,
            "‖Δ‖": edit["delta_norm"] if math.isfinite(edit["delta_norm"]) else math.inf}


def roc(scores: Sequence[float], labels: Sequence[bool]) -> dict:
    """The ROC curve of refusing ``score > cut`` over every cut: ``cuts`` (the distinct finite
    or +inf scores descending, then -inf; the first refuses nothing, the last everything),
    ``tp`` / ``fp`` (counts refused at each), ``tpr`` / ``fpr`` (their rates) and ``auc``
    (trapezoids: P(a positive scores above a negative) + ½ P(a tie)). A cut stands for every
    threshold in [cut, the previous cut): the same edits are refused. Scores may be ±inf."""
    s = np.asarray(scores, float)
    y = np.asarray(labels, bool)
    if s.shape != y.shape or s.ndim != 1 or s.size == 0 or np.isnan(s).any():
        raise ValueError("roc: needs one score (not NaN) per label, at least one")
    pos, neg = int(y.sum()), int((~y).sum())
    cuts = [float(c) for c in np.unique(s)[::-1] if c > -math.inf] + [-math.inf]
    refused = [(s > c) | (c == -math.inf) for c in cuts]
    tp = [int((r & y).sum()) for r in refused]
    fp = [int((r & ~y).sum()) for r in refused]
    tpr = [t / pos if pos else math.nan for t in tp]
    fpr = [f / neg if neg else math.nan for f in fp]
    auc = float(np.trapezoid(tpr, fpr)) if pos and neg else math.nan
    return {"cuts": cuts, "tp": tp, "fp": fp, "tpr": tpr, "fpr": fpr, "auc": auc,
            "positives": pos, "negatives": neg}


def best_at(curve: Mapping, max_fpr: float) -> dict:
    """The cut of ``curve`` refusing the most positives among those with false-positive rate
    ≤ ``max_fpr`` (the fewest negatives on a tie): ``cut``, ``upper`` (the same edits are
    refused for every threshold in [cut, upper)), ``tp``, ``fp``, ``tpr``, ``fpr``."""
    ok = [i for i, f in enumerate(curve["fpr"]) if not f > max_fpr]
    i = max(ok, key=lambda j: (curve["tp"][j], -curve["fp"][j]))
    return {"cut": curve["cuts"][i], "upper": curve["cuts"][i - 1] if i else math.inf,
            **{k: curve[k][i] for k in ("tp", "fp", "tpr", "fpr")}}


def meeting(curve: Mapping, min_tpr: float, max_fpr: float) -> tuple[float, float] | None:
    """[low, high): the thresholds at which the rule refuses ≥ ``min_tpr`` of the positives and
    ≤ ``max_fpr`` of the negatives (one interval: both rates fall as the threshold rises), or
    None when no threshold does."""
    ok = [i for i in range(len(curve["cuts"]))
          if curve["tpr"][i] >= min_tpr and not curve["fpr"][i] > max_fpr]
    if not ok:
        return None
    return curve["cuts"][ok[-1]], curve["cuts"][ok[0] - 1] if ok[0] else math.inf


def verdicts(es: Sequence[Mapping], profile) -> list:
    """``guard.evaluate``'s pre-apply ``Verdict`` on each edit (no perplexities)."""
    from rome_jax.guard import evaluate

    return [evaluate({**e, "request": {}}, profile) for e in es]


def score_edits(es: Sequence[Mapping], profile, judged: Sequence) -> dict:
    """For each population (``POPULATIONS``) and label (``LABELS``): the default verdicts'
    (``judged``: :func:`verdicts` of ``es``) counts, and per rule the ROC curve, the best point
    at ``TARGET_FPR`` and the thresholds meeting the target (for the guard's rule as
    λ = exp(threshold))."""
    refused = [not v.ok for v in judged]
    by_k = {k: [not v.ok for v in verdicts(es, profile.with_thresholds(mad_k=k))]
            for k in K_GRID}
    reasons = [{k: k in v.failed for k in ("denominator", "delta_abs")} for v in judged]
    scores = [rule_scores(e, profile) for e in es]
    out = {}
    for name, methods in POPULATIONS.items():
        pick = [i for i, e in enumerate(es) if e["method"] in methods]
        for label in LABELS:
            y = [collapsed(es[i], label) for i in pick]
            ref = [refused[i] for i in pick]
            default = {
                **confusion(ref, y), **{f"refused_by_{k}": sum(reasons[i][k] for i in pick)
                   for k in ("denominator", "delta_abs")}}
            rules, lam = {}, None
            for rule in RULES:
                curve = roc([scores[i][rule] for i in pick], y)
                interval = meeting(curve, TARGET_TPR, TARGET_FPR)
                lam = interval if rule == "guard (λ)" else lam
                rules[rule] = {"auc": curve["auc"], "best": best_at(curve, TARGET_FPR),
                               "meets_target": interval is not None, "curve": {
                                   k: curve[k] for k in ("fpr", "tpr")}}
            grid = {str(k): confusion([r[i] for i in pick], y) for k, r in by_k.items()}
            out[f"{name}, ratio > {label:g}"] = {
                "methods": list(methods), "label": label, "default": default, "rules": rules,
                "by_mad_k": grid,
                "lambda_meeting_target": None if lam is None else [math.exp(x) for x in lam]}
    return out


def confusion(refused: Sequence[bool], labels: Sequence[bool]) -> dict:
    """``tp`` (refused positives) of ``positives``, ``fp`` (refused negatives) of
    ``negatives``."""
    pairs = list(zip(map(bool, refused), map(bool, labels), strict=True))
    return {"tp": sum(r and c for r, c in pairs), "positives": sum(c for _, c in pairs),
            "fp": sum(r and not c for r, c in pairs),
            "negatives": sum(not c for _, c in pairs)}


def rate(k: int, n: int) -> str:
    """``k/n = k÷n`` (``k/0`` when there is nothing to count)."""
    return f"{k}/{n} = {k / n:.3f}" if n else f"{k}/0"


def tables(summary: Mapping, title: str) -> str:
    p = summary["profile"]
    t1 = markdown_table(
        ["edits", "collapse", "collapses refused (TPR)", "others refused (FPR)",
         "refused by denominator", "refused by abs Δ"],
        [[name.split(", ")[0], name.split(", ")[1], rate(v["default"]["tp"],
                                                         v["default"]["positives"]),
          rate(v["default"]["fp"], v["default"]["negatives"]),
          v["default"]["refused_by_denominator"], v["default"]["refused_by_delta_abs"]]
         for name, v in summary["scores"].items()])
    t2 = markdown_table(
        ["edits", "collapse", "rule", "AUC", f"best TPR at FPR ≤ {TARGET_FPR:g}",
         "its FPR", f"meets ≥ {TARGET_TPR:g} at ≤ {TARGET_FPR:g}"],
        [[name.split(", ")[0], name.split(", ")[1], rule, r["auc"],
          rate(r["best"]["tp"], v["default"]["positives"]),
          rate(r["best"]["fp"], v["default"]["negatives"]),
          "yes" if r["meets_target"] else "no"]
         for name, v in summary["scores"].items() for rule, r in v["rules"].items()])
    lam = markdown_table(
        ["edits", "collapse", "λ meeting the target (default 1)"],
        [[name.split(", ")[0], name.split(", ")[1],
          "none" if v["lambda_meeting_target"] is None else
          f"[{fmt(v['lambda_meeting_target'][0])}, {fmt(v['lambda_meeting_target'][1])})"]
         for name, v in summary["scores"].items()])
    ks = markdown_table(
        ["edits", "collapse", *(f"k = {k:g}: TPR, FPR" for k in K_GRID)],
        [[name.split(", ")[0], name.split(", ")[1],
          *(f"{c['tp']}/{c['positives']}, {c['fp']}/{c['negatives']}"
            for c in v["by_mad_k"].values())] for name, v in summary["scores"].items()])
    t4 = markdown_table(["case", "method", "first-token", "guard", "ME-PPL_50 ratio",
                         "denominator / floor", "abs Δ / ceiling"],
                        [[str(w["case_id"]), *list(w.values())[1:]] for w in summary["wrong"]]
                        ) if summary["wrong"] else "(none)"
    return (f"{title}\n\nProfile: {p['n']} normal rome edits (none of the scored records), "
            f"denominator floor {fmt(p['denominator_floor'])} (5% quantile "
            f"{fmt(p['denominator_quantile'])} / margin {fmt(p['margin'])}), abs Δ ceiling "
            f"{fmt(p['delta_abs_ceiling'])} (median {fmt(p['delta_abs_median'])}, k "
            f"{fmt(p['mad_k'])}).\n\nTable 1: the guard before applying, at its default "
            f"thresholds.\n\n{t1}\n\nTable 2: ROC of each rule (guard: both thresholds moved "
            f"by λ; denominator: refuse below a cut; ‖Δ‖: refuse above a cut).\n\n{t2}\n\n"
            f"Table 3: the guard's scale λ (floor / λ, ceiling · λ) at which it meets the "
            f"target.\n\n{lam}\n\nTable 4: the guard with another |Δ| ceiling k (the denominator "
            f"floor as the profile's), collapses and other edits refused.\n\n{ks}\n\n"
            f"Edits judged wrongly at the defaults (collapse: ratio > "
            f"{LABELS[0]:g}).\n\n{t4}")


def wrong(es: Sequence[Mapping], profile, judged: Sequence) -> list[dict]:
    """The edits the default guard (``judged``: :func:`verdicts` of ``es``) judges wrongly for
    the first label: collapses it passes and other edits it refuses, with their denominator /
    floor and abs Δ / ceiling."""
    out = []
    for e, v in zip(es, judged, strict=True):
        if v.ok == collapsed(e, LABELS[0]):
            out.append({"case_id": e["case_id"], "method": e["method"],
                        "first_token_subject": e["first_token_subject"],
                        "guard": "passed" if v.ok else "refused", "ratio": e["ratio"],
                        "denominator_over_floor": e["denominator"] / profile.denominator_floor,
                        "delta_abs_over_ceiling": e["delta_abs"] / profile.delta_abs_ceiling})
    return out


def figure(summary: Mapping, title: str):
    def draw(path: Path) -> None:
        plt = pyplot()
        names = list(summary["scores"])
        fig, axes = plt.subplots(1, len(names), figsize=(3.6 * len(names), 3.8), squeeze=False)
        for ax, name in zip(axes[0], names):
            v = summary["scores"][name]
            for rule, colour, style in zip(RULES, ("tab:red", "tab:blue", "tab:green"),
                                           ("-", "--", ":")):
                r = v["rules"][rule]
                ax.plot(r["curve"]["fpr"], r["curve"]["tpr"], color=colour, ls=style, lw=1.6,
                        label=f"{rule} (AUC {fmt(r['auc'])})")
            d = v["default"]
            if d["positives"] and d["negatives"]:
                ax.plot(d["fp"] / d["negatives"], d["tp"] / d["positives"], "k*", ms=9,
                        label="guard, default")
            ax.axvspan(0, TARGET_FPR, ymin=TARGET_TPR, color="gold", alpha=0.4)
            ax.set_xscale("symlog", linthresh=TARGET_FPR)  # linear below 2 %, log above
            ax.set(xlabel="false-positive rate (linear below 0.02)",
                   ylabel="true-positive rate", title=name, xlim=(0, 1), ylim=(-0.02, 1.02))
            ax.title.set_fontsize(9)
            ax.legend(fontsize=7, loc="lower right")
        save_figure(fig, path, title)
    return draw


def report(header: Mapping, rows: Sequence[Mapping]) -> Report:
    from rome_jax.guard import GuardProfile

    _, base_rows = source(header)
    title = (f"The collapse guard on the edits of {source_dir(header)} "
             f"({run_label(header['settings'])})")
    if not rows:
        return Report({"baseline": str(source_dir(header))}, f"{title}: no profile yet.")
    profile = GuardProfile.from_dict(rows[0]["profile"])
    es = edits(base_rows)
    judged = verdicts(es, profile)
    summary = {"baseline": str(source_dir(header)), "profile": profile.summary(),
               "scores": score_edits(es, profile, judged), "wrong": wrong(es, profile, judged)}
    curves = any(v["default"]["positives"] for v in summary["scores"].values())
    return Report(summary, tables(summary, title + "."),
                  figure(summary, title) if curves else None)  # no collapse: no ROC curve
