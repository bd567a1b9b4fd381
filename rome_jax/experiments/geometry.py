"""Key geometry ("The Fall of ROME" Figures 1 and 2), by forward passes only (no edit).

For the collapse cases, the first-token records below the threshold and the first ``--n``
normal cases of a finished ``collapse`` run (``--baseline``: its folder; by default the one of
the same model, layer and start token), each record's keys at the edit layer: k^u (plain
prompt), k̄ (mean over the context templates), the key after each template's random prefix, and
C⁻¹k^u, C⁻¹k̄ (Cholesky solves with the key statistics). For ``--text-n`` ME-PPL_1k texts, the
key at the text's first token (after the start token, if any) and at ``--text-later`` evenly
spaced later positions among its first ``--text-tokens`` tokens.

Rows hold scalars (norms, cosines, the denominators kᵀC⁻¹k̄/‖C⁻¹k̄‖ of ``rome`` and ``c-rome``,
Mahalanobis norms √(kᵀC⁻¹k)); the vectors go to ``keys.npz`` beside ``rows.jsonl`` (see
:class:`VectorStore`), from which the report draws PCA and t-SNE maps of unit-length keys.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from rome_jax.experiments import collapse
from rome_jax.experiments.report import (Report, grouped, markdown_table, pyplot, run_label,
                                         save_figure, stats)

NAME = "geometry"
HELP = "key geometry: PCA / t-SNE of k^u, k̄, C⁻¹k̄ and first-token keys (Fall of ROME Figs 1-2)"
TEXT_CORPUS = "ME-PPL_1k"
TSNE_PERPLEXITY = 30.0  # capped at (n - 1) / 3 for a panel of n points
SEED = 0  # t-SNE random_state
RECORD_FIELDS = ("plain", "mean", "inv_plain", "inv_mean")  # + "prefixed" [N-1, F]
TEXT_FIELDS = ("first", "later")  # [F], [m, F]
# Table columns: (row field, heading).
RECORD_SCALARS = (
    ("cos_plain_mean", "cos(k^u, k̄)"), ("norm_ratio", "‖k^u‖/‖k̄‖"),
    ("relative_distance", "‖k^u−k̄‖/‖k̄‖"), ("cos_inv_mean_plain", "cos(C⁻¹k̄, k^u)"),
    ("cos_inv_plain_inv_mean", "cos(C⁻¹k^u, C⁻¹k̄)"), ("denominator_rome", "k^uᵀC⁻¹k̄/‖C⁻¹k̄‖"),
    ("denominator_c_rome", "k̄ᵀC⁻¹k̄/‖C⁻¹k̄‖"), ("mahalanobis_plain", "√(k^uᵀC⁻¹k^u)"),
    ("mahalanobis_mean", "√(k̄ᵀC⁻¹k̄)"), ("prefixed_cos_mean", "mean cos(k_prefix, k̄)"))
TEXT_SCALARS = (
    ("norm_first", "‖k_first‖"), ("norm_later", "mean ‖k_later‖"),
    ("cos_first_later", "cos(k_first, mean k_later)"), ("mahalanobis_first", "√(kᵀC⁻¹k) first"),
    ("mahalanobis_later", "mean √(kᵀC⁻¹k) later"))


def add_args(p) -> None:
    collapse.add_baseline_arg(p)
    p.add_argument("--n", type=int, default=100,
                   help="normal cases of the baseline (default 100); every collapse case and "
                        "first-token record is included")
    p.add_argument("--text-n", type=int, default=50,
                   help=f"{TEXT_CORPUS} texts for first-token vs later-token keys (default 50)")
    p.add_argument("--text-tokens", type=int, default=64,
                   help="read the first T tokens of each text (default 64)")
    p.add_argument("--text-later", type=int, default=4,
                   help="later-token keys per text, at evenly spaced positions (default 4)")


def settings(args) -> dict:
    for flag, value, least in (("--n", args.n, 0), ("--text-n", args.text_n, 0),
                               ("--text-tokens", args.text_tokens, 2),
                               ("--text-later", args.text_later, 1)):
        if value < least:
            raise ValueError(f"{flag}: must be {least} or more")
    return {"baseline": args.baseline, "text_corpus": TEXT_CORPUS,
            "text_n": args.text_n, "text_tokens": args.text_tokens,
            "text_later": args.text_later}


# ----------------------------------------------------------------------------- storage


class VectorStore:
    """The vectors of a run's rows in one ``.npz``: for a unit (a row's key) and a field, the
    unit directions as float16 ``"{unit}/{field}"`` [..., F] and the norms as float32
    ``"{unit}/{field}.norm"`` [...]. ``put`` rewrites the file atomically; a run puts a row's
    vectors before it appends the row, so every row has its vectors (extra units, of a row cut
    off by an interrupt, are dropped by ``keep_only``)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.arrays: dict[str, np.ndarray] = {}
        if self.path.exists():
            from rome_jax.files import read_npz

            try:
                self.arrays = read_npz(self.path)
            except ValueError as err:
                raise ValueError(f"{self.path}: not a vector store ({err}); delete it, or use "
                                 "--overwrite") from None

    def units(self) -> set[str]:
        return {name.split("/")[0] for name in self.arrays}

    def keep_only(self, units: set[str]) -> None:
        """Drop every unit not in ``units`` (rewrites the file when something goes)."""
        kept = {n: a for n, a in self.arrays.items() if n.split("/")[0] in units}
        if len(kept) != len(self.arrays):
            self.arrays = kept
            self._write()

    def put(self, unit: str, vectors: Mapping[str, np.ndarray]) -> None:
        for field, x in vectors.items():
            x = np.asarray(x, np.float64)
            norm = np.linalg.norm(x, axis=-1)
            self.arrays[f"{unit}/{field}"] = (x / np.where(norm > 0, norm, 1.0)[..., None]
                                              ).astype(np.float16)
            self.arrays[f"{unit}/{field}.norm"] = norm.astype(np.float32)
        self._write()

    def direction(self, unit: str, field: str) -> np.ndarray:
        """Unit vectors [..., F] float32 (float16 precision)."""
        return self.arrays[f"{unit}/{field}"].astype(np.float32)

    def vector(self, unit: str, field: str) -> np.ndarray:
        """The stored vector [..., F] float32: direction times norm."""
        return self.direction(unit, field) * self.arrays[f"{unit}/{field}.norm"][..., None]

    def _write(self) -> None:
        from rome_jax.files import write_npz_atomic

        write_npz_atomic(self.path, **self.arrays)


def store_path(header: Mapping) -> Path:
    return Path(header["out"]) / "keys.npz"


def unit_of(row: Mapping) -> str:
    return str(row["key"])


# ----------------------------------------------------------------------------- maths


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def record_geometry(keys, inv_plain: np.ndarray, inv_mean: np.ndarray) -> dict:
    """Scalars of one record's keys (``Keys``: plain [F], mean [F], all [N, F]) and their
    solves C⁻¹k^u, C⁻¹k̄ [F]. Denominators in the original code's units (kᵀu/‖u‖, u = C⁻¹k̄)."""
    plain, mean, every = keys
    prefixed = every[1:]
    unit_u = np.linalg.norm(inv_mean)
    return {"n_templates": int(len(every)),
            "norm_plain": float(np.linalg.norm(plain)), "norm_mean": float(np.linalg.norm(mean)),
            "norm_ratio": float(np.linalg.norm(plain) / np.linalg.norm(mean)),
            "distance": float(np.linalg.norm(plain - mean)),
            "relative_distance": float(np.linalg.norm(plain - mean) / np.linalg.norm(mean)),
            "cos_plain_mean": cosine(plain, mean),
            "cos_inv_mean_plain": cosine(inv_mean, plain),
            "cos_inv_mean_mean": cosine(inv_mean, mean),
            "cos_inv_plain_inv_mean": cosine(inv_plain, inv_mean),
            "denominator_rome": float(plain @ inv_mean / unit_u),
            "denominator_c_rome": float(mean @ inv_mean / unit_u),
            "mahalanobis_plain": float(math.sqrt(max(plain @ inv_plain, 0.0))),
            "mahalanobis_mean": float(math.sqrt(max(mean @ inv_mean, 0.0))),
            "prefixed_cos_mean": (float(np.mean([cosine(k, mean) for k in prefixed]))
                                  if len(prefixed) else None),
            "prefixed_cos_plain": (float(np.mean([cosine(k, plain) for k in prefixed]))
                                   if len(prefixed) else None)}


def text_positions(n_tokens: int, n_start: int, n_later: int) -> tuple[int, list[int]]:
    """(the text's first position, ``n_later`` evenly spaced later positions, distinct) for a
    sequence of ``n_tokens`` whose first ``n_start`` are start tokens."""
    later = np.unique(np.linspace(n_start + 1, n_tokens - 1, n_later).round().astype(int))
    return n_start, [int(p) for p in later]


def text_geometry(first: np.ndarray, later: np.ndarray, inv_first: np.ndarray,
                  inv_later: np.ndarray) -> dict:
    """Scalars of a text's first-token key [F] and later keys [m, F] with their solves."""
    return {"norm_first": float(np.linalg.norm(first)),
            "norm_later": float(np.linalg.norm(later, axis=-1).mean()),
            "cos_first_later": cosine(first, later.mean(0)),
            "mahalanobis_first": float(math.sqrt(max(first @ inv_first, 0.0))),
            "mahalanobis_later": float(np.mean(np.sqrt(np.maximum(
                np.einsum("mf,mf->m", later, inv_later), 0.0))))}


def tsne_perplexity(n: int) -> float:
    """The t-SNE perplexity for ``n`` points: ``TSNE_PERPLEXITY``, at most (n - 1) / 3."""
    return float(min(TSNE_PERPLEXITY, max((n - 1) / 3, 1.0)))


def project(points: np.ndarray, method: str) -> np.ndarray:
    """2-D coordinates [n, 2] of ``points`` [n, F] scaled to unit length: ``"pca"`` or
    ``"tsne"`` (perplexity ``tsne_perplexity(n)``, PCA start, random_state ``SEED``)."""
    from sklearn.decomposition import PCA
    from sklearn.manifold import TSNE

    points = np.asarray(points, np.float64)
    if points.ndim != 2 or len(points) < 3:
        raise ValueError(f"points: need [n >= 3, F], got shape {points.shape}")
    points = points / np.linalg.norm(points, axis=1, keepdims=True)
    if method == "pca":
        return PCA(n_components=2).fit_transform(points)
    if method == "tsne":
        return TSNE(n_components=2, perplexity=tsne_perplexity(len(points)), init="pca",
                    random_state=SEED).fit_transform(points)
    raise ValueError(f"method: 'pca' or 'tsne', not {method!r}")


# ----------------------------------------------------------------------------- run


def check_row(row: Mapping) -> None:
    """ValueError naming the first field a record or text row lacks (of those the report
    reads)."""
    from rome_jax.experiments.journal import NUMBER, require

    if "text_index" in row:
        require(row, {"key": str, "text_index": int, "n_tokens": int, "positions": list,
                      **{f: NUMBER for f, _ in TEXT_SCALARS}})
    else:
        require(row, {"key": int, "case_id": int, "group": str, "first_token_subject": bool,
                      **{f: NUMBER for f, _ in RECORD_SCALARS}})


def text_key(i: int) -> str:
    return f"text{i}"


def run(s, args, journal, header: Mapping) -> None:
    import jax.numpy as jnp
    from tqdm import tqdm

    from rome_jax.data import counterfact_by_case_id, load_counterfact, load_me_ppl
    from rome_jax.diagnostics import edit_keys, sequence_keys
    from rome_jax.rome.request import EditRequest
    from rome_jax.rome.stats import solve

    base_header, base_rows = collapse.baseline(header, header["settings"]["bos"])
    store = VectorStore(store_path(header))
    done = {unit_of(r) for r in journal.rows}
    missing = done - store.units()
    if missing:
        raise ValueError(f"{store.path}: lacks the vectors of {len(missing)} finished rows "
                         f"(e.g. {sorted(missing)[0]}); use --overwrite to start over")
    store.keep_only(done)
    layer, factor = s.hparams.layer, s.context.factor
    inverse = lambda k: np.asarray(solve(factor, jnp.asarray(k, jnp.float32)), np.float64)

    chosen = [c for c in collapse.chosen(base_header, base_rows, args.n) if c[1] not in journal]
    records = (counterfact_by_case_id(load_counterfact(), [c[1] for c in chosen])
               if chosen else [])
    for (group, case_id, first), record in tqdm(list(zip(chosen, records)), desc=NAME,
                                                unit="record"):
        request = EditRequest.from_dict(record)
        keys = edit_keys(s.model, request, s.context.templates, layer, s.hparams.fact_token)
        inv_plain, inv_mean = inverse(keys.plain), inverse(keys.mean)
        vectors = dict(zip(RECORD_FIELDS, (keys.plain, keys.mean, inv_plain, inv_mean)))
        if group != "normal":  # the prefixed keys of collapse candidates only (size)
            vectors["prefixed"] = keys.all[1:]
        store.put(str(case_id), vectors)
        journal.append({"key": case_id, "case_id": case_id, "subject": request.subject,
                        "group": group, "first_token_subject": first,
                        **record_geometry(keys, inv_plain, inv_mean)})

    tok = s.model.tokenizer
    n_start = len(tok.start_ids)
    limit = min(args.text_tokens, s.model.config.n_positions)
    texts = load_me_ppl(TEXT_CORPUS)[:args.text_n] if args.text_n else []
    todo = [i for i in range(len(texts)) if text_key(i) not in journal]
    for i in tqdm(todo, desc=f"{NAME} texts", unit="text"):
        ids = tok.encode_sequence(texts[i])[:limit]
        if len(ids) < n_start + 2:
            continue  # no later token: nothing to compare (never a row, so never retried)
        first_pos, later_pos = text_positions(len(ids), n_start, args.text_later)
        keys = sequence_keys(s.model, ids, [first_pos, *later_pos], layer)
        first, later = keys[0], keys[1:]
        inv_first, inv_later = inverse(first), inverse(later)
        store.put(text_key(i), {"first": first, "later": later})
        journal.append({"key": text_key(i), "text_index": i, "n_tokens": len(ids),
                        "positions": [first_pos, *later_pos],
                        **text_geometry(first, later, inv_first, inv_later)})


# ----------------------------------------------------------------------------- report


def is_text(row: Mapping) -> bool:
    return "text_index" in row


def panels(rows: Sequence[Mapping], store: VectorStore) -> list[dict]:
    """The figure's point sets: ``{title, points [n, F], labels [n]}`` for k̄ vs k^u,
    C⁻¹k̄ vs k^u (labels "group: vector"), first vs later keys in text, and the keys of collapse
    subjects (first-token records when there is none) after each random prefix vs without.
    Sets of fewer than 3 points are left out."""
    missing = {unit_of(r) for r in rows} - store.units()
    if missing:
        raise ValueError(f"{store.path}: lacks the vectors of {len(missing)} rows (e.g. "
                         f"{sorted(missing)[0]}); rerun the experiment with --overwrite")
    records = [r for r in rows if not is_text(r)]
    texts = [r for r in rows if is_text(r)]
    out = []
    for name, field in (("k̄", "mean"), ("C⁻¹k̄", "inv_mean")):
        points, labels = [], []
        for r in records:
            for vec, label in ((field, name), ("plain", "k^u")):
                points.append(store.direction(unit_of(r), vec))
                labels.append(f"{r['group']}: {label}")
        out.append({"title": f"{name} vs k^u", "points": points, "labels": labels})

    def one_against_many(members, one: str, one_label: str, many: str, many_label: str
                         ) -> dict:
        """Each member's vector ``one`` and its vectors ``many`` [m, F], labelled."""
        points, labels = [], []
        for r in members:
            points.append(store.direction(unit_of(r), one))
            labels.append(one_label)
            extra = store.direction(unit_of(r), many)
            points += list(extra)
            labels += [many_label] * len(extra)
        return {"points": points, "labels": labels}

    out.append({"title": "keys in text: first vs later token",
                **one_against_many(texts, "first", "first token", "later", "later token")})
    subjects, who = [r for r in records if r["group"] == "collapse"], "collapse"
    if not subjects:  # the baseline has none
        subjects, who = [r for r in records if r["group"] != "normal"], "first-token"
    out.append({"title": f"{who} subjects: prefix vs none",
                **one_against_many(subjects, "plain", "no prefix (k^u)", "prefixed",
                                   "after a random prefix")})
    return [dict(p, points=np.asarray(p["points"])) for p in out if len(p["points"]) >= 3]


def figure(sets: Sequence[dict], title: str):
    def draw(path: Path) -> None:
        plt = pyplot()

        colours = {"collapse": "tab:red", "normal": "tab:blue",
                   "first-token, below threshold": "tab:orange", "first token": "tab:red",
                   "later token": "tab:blue", "no prefix (k^u)": "tab:red",
                   "after a random prefix": "tab:blue"}
        fig, axes = plt.subplots(2, len(sets), figsize=(3.6 * len(sets), 7), squeeze=False)
        for col, panel in enumerate(sets):
            labels = np.asarray(panel["labels"])
            for row, method in enumerate(("pca", "tsne")):
                ax = axes[row, col]
                xy = project(panel["points"], method)
                for label in dict.fromkeys(labels):
                    group, _, vec = label.partition(": ")
                    pick = labels == label
                    ax.scatter(xy[pick, 0], xy[pick, 1], s=9, c=colours.get(group, "grey"),
                               marker="x" if vec == "k^u" else "o", alpha=0.7, linewidths=0.8,
                               label=label)
                extra = (f", perplexity {tsne_perplexity(len(labels)):.3g}"
                         if method == "tsne" else "")
                ax.set_title(f"{panel['title']}\n{method.upper()}{extra}", fontsize=8)
                ax.set_xticks([])
                ax.set_yticks([])
                ax.legend(fontsize=6, loc="best")
        save_figure(fig, path, title, fontsize=9, dpi=72)
    return draw


def summarize(rows: Sequence[Mapping]) -> dict:
    records = grouped([r for r in rows if not is_text(r)], lambda r: r["group"])
    texts = [r for r in rows if is_text(r)]
    summary = {"groups": {g: {"n": len(records[g]), "case_ids": [r["case_id"] for r in records[g]],
                              **{f: stats([r[f] for r in records[g] if r[f] is not None])
                                 for f, _ in RECORD_SCALARS}}
                          for g in collapse.GROUPS if g in records},
               "texts": {"n": len(texts), **{f: stats([r[f] for r in texts])
                                             for f, _ in TEXT_SCALARS}},
               "tsne": {"perplexity": TSNE_PERPLEXITY, "capped_at": "(n - 1) / 3",
                        "random_state": SEED, "init": "pca"}}
    return summary


def report(header: Mapping, rows: Sequence[Mapping]) -> Report:
    summary = summarize(rows)
    summary["baseline"] = str(collapse.baseline_dir(header, header["settings"]["bos"]))
    groups = summary["groups"]
    t1 = markdown_table(["cases", "n", *(h for _, h in RECORD_SCALARS)],
                        [[g, v["n"], *(v[f]["mean"] for f, _ in RECORD_SCALARS)]
                         for g, v in groups.items()])
    t2 = markdown_table(["texts", *(h for _, h in TEXT_SCALARS)],
                        [[summary["texts"]["n"], *(summary["texts"][f]["mean"]
                                                  for f, _ in TEXT_SCALARS)]])
    none = ("" if "collapse" in groups else
            "\n\nThe baseline has no collapse case: normal cases and first-token records only.")
    title = f"Key geometry: {run_label(header['settings'])}."
    md = (f"{title}\n\nTable 1: mean key geometry per group (baseline {summary['baseline']}; "
          f"denominators in the original code's units, u = C⁻¹k̄).{none}\n\n{t1}\n\n"
          f"Table 2: first-token vs later-token keys in {header['settings']['text_corpus']} "
          f"texts (means).\n\n{t2}\n\nFigure: PCA and t-SNE (scikit-learn, perplexity "
          f"{TSNE_PERPLEXITY:g} capped at (n − 1)/3, PCA start, random_state {SEED}) of "
          "unit-length vectors from keys.npz.")
    store = VectorStore(store_path(header))
    sets = panels(rows, store) if rows else []
    return Report(summary, md, figure(sets, title) if sets else None)
