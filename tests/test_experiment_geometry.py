"""``rome-jax experiment geometry`` on the embedded default model, in-process, against a
hand-written collapse baseline (one collapse case, one first-token record below the threshold,
two normal cases, one skipped record): the vectors in ``keys.npz`` and the rows' scalars agree
with rome_jax's own keys, solves and update diagnostics; resume keeps rows and vectors in step;
the report's group means are the rows'."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from rome_jax import cli
from rome_jax.experiments import geometry
from rome_jax.experiments.journal import Journal, read_rows
from rome_jax.experiments.records import first_token_and_sample

pytest.importorskip("sklearn")

SMALL = ["--mom2-n-samples", "200", "--template-lengths", "5x3"]
TEXT = ["--text-n", "3", "--text-tokens", "24", "--text-later", "3"]


def run(*args) -> int:
    return cli.main(["experiment", "geometry", *SMALL, *map(str, args)])


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """The run's ``Setup`` (same model, hparams and templates), with a private cache for the
    whole module."""
    from rome_jax.cli.common import Setup

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ROME_JAX_CACHE", str(tmp_path_factory.mktemp("cache")))
        mp.setenv("TQDM_DISABLE", "1")
        s = Setup(cli.build_parser().parse_args(["experiment", "geometry", *SMALL]))
        s.context  # noqa: B018 (builds the key statistics in the private cache)
        yield s


def write_baseline(path: Path, s, digest: str | None = None) -> dict[str, list[int]]:
    """A collapse journal of two first-token records (ratio 50: collapse; 1: below the
    threshold), two normal records and one with an error; returns the case ids by group."""
    from rome_jax.data import load_counterfact

    first, others = first_token_and_sample(load_counterfact(), s.model.tokenizer, 3, seed=1)
    settings = s.result_settings(seed=0, methods=["rome", "c-rome"], threshold=10.0,
                                 sample_seed=1)
    if digest is not None:
        settings["digest"] = digest
    edit = lambda ratio: {"ratio": ratio, "denominator_unit_u": 1.0}
    with Journal(path / "rows.jsonl", "collapse", settings, overwrite=True) as journal:
        for case_id, ratio, is_first in ((first[0], 50.0, True), (first[1], 1.0, True),
                                         (others[0], 1.0, False), (others[1], 1.2, False)):
            journal.append({"key": case_id, "case_id": case_id, "subject": "?",
                            "first_token_subject": is_first, "rome": edit(ratio),
                            "c-rome": edit(1.0)})
        journal.append({"key": others[2], "case_id": others[2], "subject": "?",
                        "first_token_subject": False, "error": "does not fit"})
    return {"collapse": [first[0]], "first-token, below threshold": [first[1]],
            "normal": [others[0]]}  # --n 1: only the first normal case


@pytest.fixture(scope="module")
def finished(setup, tmp_path_factory):
    """(out folder, case ids by group) of a finished run with ``--n 1``."""
    root = tmp_path_factory.mktemp("geometry")
    (root / "base").mkdir()
    groups = write_baseline(root / "base", setup)
    assert run("--baseline", root / "base", "--n", 1, *TEXT, "--out", root / "out") == 0
    return root, groups


def rows_of(out: Path) -> list[dict]:
    return read_rows(out / "rows.jsonl", "geometry")[1]


def test_groups_follow_the_baseline(finished):
    root, groups = finished
    rows = [r for r in rows_of(root / "out") if not geometry.is_text(r)]
    assert {g: [r["case_id"] for r in rows if r["group"] == g] for g in groups} == groups
    assert len(rows) == 3  # the skipped record and the second normal case are left out


def library_keys(s, record):
    """k^u, k̄, all [N, F] as an edit computes them (``solve_core``: the residual at the layer,
    then ``keys_from_residual`` on the edit's batch, whose last row is the KL prompt)."""
    from rome_jax.models.transformer import residual_at
    from rome_jax.rome.edit import build_batch
    from rome_jax.rome.keys import keys_from_residual
    from rome_jax.rome.request import EditRequest

    batch = build_batch(s.model, EditRequest.from_dict(record), s.context.templates,
                        s.hparams.fact_token)
    layer = s.hparams.layer
    residual = residual_at(s.model.params, s.model.config, batch.ids, batch.mask, layer)
    return keys_from_residual(s.model.params, s.model.config, layer, residual, batch.mask,
                              batch.lookup, n_rows=batch.ids.shape[0] - 1)


def test_vectors_and_scalars_agree_with_the_library(setup, finished):
    import jax.numpy as jnp

    from rome_jax.data import counterfact_by_case_id, load_counterfact, load_me_ppl
    from rome_jax.models.transformer import mlp_key, rome_weight
    from rome_jax.rome.stats import solve
    from rome_jax.editors.rome import rank_one_update

    root, _ = finished
    store = geometry.VectorStore(root / "out" / "keys.npz")
    rows = rows_of(root / "out")
    factor, layer = setup.context.factor, setup.hparams.layer
    w, b = rome_weight(setup.model.params, layer)
    close = lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-3, atol=2e-3 * np.abs(b).max())
    records = [r for r in rows if not geometry.is_text(r)]
    by_id = counterfact_by_case_id(load_counterfact(), [r["case_id"] for r in records])
    for row, record in zip(records, by_id):
        keys = library_keys(setup, record)
        unit = geometry.unit_of(row)
        close(store.vector(unit, "plain"), np.asarray(keys.plain))
        close(store.vector(unit, "mean"), np.asarray(keys.mean))
        close(store.vector(unit, "inv_mean"), np.asarray(solve(factor, keys.mean)))
        close(store.vector(unit, "inv_plain"), np.asarray(solve(factor, keys.plain)))
        assert (f"{unit}/prefixed" in store.arrays) == (row["group"] != "normal")
        if row["group"] != "normal":
            close(store.vector(unit, "prefixed"), np.asarray(keys.all[1:]))
        assert row["n_templates"] == len(setup.context.templates.templates) == len(keys.all)
        np.testing.assert_allclose(row["norm_plain"], np.linalg.norm(keys.plain), rtol=1e-4)
        for method in ("rome", "c-rome"):  # the denominators do not depend on v*
            diagnostics = rank_one_update(w, b, factor, keys.plain, keys.mean,
                                          jnp.zeros_like(b), method)[1]
            np.testing.assert_allclose(row[f"denominator_{method.replace('-', '_')}"],
                                       float(diagnostics.denominator_unit_u), rtol=1e-3,
                                       atol=1e-4)
    texts = load_me_ppl(geometry.TEXT_CORPUS)
    tok = setup.model.tokenizer
    text_rows = [r for r in rows if geometry.is_text(r)]
    assert [r["text_index"] for r in text_rows] == [0, 1, 2]
    for row in text_rows:
        ids = tok.encode_sequence(texts[row["text_index"]])[:24]
        assert row["n_tokens"] == len(ids) and row["positions"][0] == len(tok.start_ids)
        assert len(set(row["positions"])) == len(row["positions"]) <= 4
        keys = np.asarray(mlp_key(setup.model.params, setup.model.config, jnp.asarray([ids]),
                                  None, setup.hparams.layer)[0], np.float64)
        close(store.vector(geometry.unit_of(row), "first"), keys[row["positions"][0]])
        close(store.vector(geometry.unit_of(row), "later"), keys[row["positions"][1:]])


def test_cosines_are_cosines_and_norms_positive(finished):
    root, _ = finished
    for row in rows_of(root / "out"):
        for field, value in row.items():
            if "cos" in field and value is not None:
                assert -1 - 1e-9 <= value <= 1 + 1e-9, (field, value)
            if field.startswith(("norm", "mahalanobis")):
                assert value > 0, (field, value)


def test_projection_shape_and_determinism():
    points = np.random.default_rng(0).normal(size=(12, 40))
    for method in ("pca", "tsne"):
        xy = geometry.project(points, method)
        assert xy.shape == (12, 2) and np.isfinite(xy).all()
        np.testing.assert_array_equal(xy, geometry.project(points, method))
    assert geometry.tsne_perplexity(12) == pytest.approx(11 / 3)
    assert geometry.tsne_perplexity(1000) == geometry.TSNE_PERPLEXITY
    with pytest.raises(ValueError, match="points"):
        geometry.project(points[:2], "pca")
    with pytest.raises(ValueError, match="method"):
        geometry.project(points, "umap")


def test_panels_hold_every_row_vector(finished):
    root, _ = finished
    rows = rows_of(root / "out")
    sets = geometry.panels(rows, geometry.VectorStore(root / "out" / "keys.npz"))
    assert [s["title"] for s in sets] == ["k̄ vs k^u", "C⁻¹k̄ vs k^u",
                                          "keys in text: first vs later token",
                                          "collapse subjects: prefix vs none"]
    n_records = sum(not geometry.is_text(r) for r in rows)
    assert [len(s["points"]) for s in sets[:2]] == [2 * n_records] * 2
    n_text = sum(len(r["positions"]) for r in rows if geometry.is_text(r))
    assert len(sets[2]["points"]) == len(sets[2]["labels"]) == n_text
    assert len(sets[3]["points"]) == len([r for r in rows if r.get("group") == "collapse"]) * \
        next(r["n_templates"] for r in rows if not geometry.is_text(r))
    for s in sets:
        assert s["points"].shape[1] == 1024
        np.testing.assert_allclose(np.linalg.norm(s["points"], axis=1), 1, atol=2e-3)


def test_report_means_equal_the_rows(finished):
    root, groups = finished
    out = root / "out"
    rows = rows_of(out)
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["groups"]) == set(groups)
    for g, v in summary["groups"].items():
        mine = [r for r in rows if r.get("group") == g]
        assert v["n"] == len(mine)
        for field, _ in geometry.RECORD_SCALARS:
            assert v[field]["mean"] == pytest.approx(np.mean([r[field] for r in mine]))
    texts = [r for r in rows if geometry.is_text(r)]
    for field, _ in geometry.TEXT_SCALARS:
        assert summary["texts"][field]["mean"] == pytest.approx(np.mean([r[field]
                                                                         for r in texts]))
    table = (out / "table.md").read_text()
    assert "perplexity 30" in table and "no collapse case" not in table
    assert 0 < (out / "figure.png").stat().st_size < 400_000
    assert (out / "keys.npz").stat().st_size < 1_000_000


def test_report_without_collapse_cases_says_so(finished):
    root, _ = finished
    header, rows = read_rows(root / "out" / "rows.jsonl", "geometry")
    header["out"] = str(root / "out")
    report = geometry.report(header, [r for r in rows if r.get("group") != "collapse"])
    assert "no collapse case" in report.markdown and "collapse" not in report.summary["groups"]


def test_resume_keeps_rows_and_vectors_in_step(finished, tmp_path):
    root, _ = finished
    out = tmp_path / "out"
    shutil.copytree(root / "out", out)
    before = rows_of(out)
    # an interrupt after the vectors of the last row were stored, before its row was written
    lines = (out / "rows.jsonl").read_text().splitlines(keepends=True)
    (out / "rows.jsonl").write_text("".join(lines[:-2]))
    assert run("--baseline", root / "base", "--n", 1, *TEXT, "--out", out) == 0
    after = rows_of(out)
    assert [r["key"] for r in after] == [r["key"] for r in before]
    for a, b in zip(after, before):
        assert a.keys() == b.keys()
        for k in a:
            assert a[k] == (pytest.approx(b[k], rel=1e-5) if isinstance(b[k], float)
                            else b[k]), k
    store = geometry.VectorStore(out / "keys.npz")
    assert store.units() == {geometry.unit_of(r) for r in after}
    # a rerun with other settings is refused
    assert run("--baseline", root / "base", "--n", 1, "--text-n", 1, "--out", out) == 2


def test_larger_n_extends_the_run(finished, tmp_path):
    root, groups = finished
    out = tmp_path / "out"
    shutil.copytree(root / "out", out)
    before = rows_of(out)
    assert run("--baseline", root / "base", "--n", 2, *TEXT, "--out", out) == 0
    after = rows_of(out)
    assert after[:len(before)] == before  # the finished rows are kept, not recomputed
    added = [r["case_id"] for r in after[len(before):]]
    assert len(added) == 1 and added[0] not in {c for ids in groups.values() for c in ids}


def test_store_round_trip_and_keep_only(tmp_path):
    path = tmp_path / "keys.npz"
    store = geometry.VectorStore(path)
    x = np.random.default_rng(0).normal(size=(3, 8)) * 100
    store.put("7", {"plain": x[0], "prefixed": x})
    store.put("text0", {"first": x[1]})
    again = geometry.VectorStore(path)
    assert again.units() == {"7", "text0"}
    np.testing.assert_allclose(again.vector("7", "prefixed"), x, rtol=1e-3)
    assert again.arrays["7/plain"].dtype == np.float16
    np.testing.assert_allclose(np.linalg.norm(again.direction("7", "prefixed"), axis=1), 1,
                               atol=1e-3)
    again.keep_only({"7"})
    assert geometry.VectorStore(path).units() == {"7"}


def test_baseline_of_other_weights_is_refused(setup, tmp_path, capsys):
    (tmp_path / "base").mkdir()  # an --out inside --baseline is refused (issue 23, 2)
    write_baseline(tmp_path / "base", setup, digest="other")
    assert run("--baseline", tmp_path / "base", *TEXT, "--out", tmp_path / "out") == 2
    assert "digest" in capsys.readouterr().err
    assert run("--baseline", tmp_path / "nowhere", "--out", tmp_path / "out2") == 2


def test_a_corrupt_store_is_refused_in_one_line_naming_it(tmp_path):
    path = tmp_path / "keys.npz"
    path.write_bytes(b"not a zip")
    with pytest.raises(ValueError) as err:
        geometry.VectorStore(path)
    assert str(err.value).startswith(f"{path}: not a vector store (")
    assert "\n" not in str(err.value)
    assert path.read_bytes() == b"not a zip"  # nothing is lost
