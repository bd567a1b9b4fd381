"""Key statistics: exact second moment, Cholesky solves, the cache (round trip, keyed by the
corpus content, rebuilt when unreadable, of another format or not finite)."""

import numpy as np
import pytest
from conftest import tiny_gpt2

from rome_jax.models.transformer import mlp_key
from rome_jax.rome import stats as stats_mod
from rome_jax.rome.stats import (STATS_FORMAT, KeyStats, compute_key_stats, key_stats,
                                 load_key_stats, resolve_corpus, save_key_stats, solve)

TEXTS = ["The cat sat on the mat.", "Paris is the capital of France, a country in Europe.",
         "One", "Rank-one model editing changes a single fact in a language model."]


@pytest.fixture(scope="module")
def model():
    return tiny_gpt2(n_layer=2, d_model=16, n_head=2, seq_len=32, seed=5, name="tiny-test-model")


def test_moment_equals_brute_force(model):
    stats = compute_key_stats(model, 1, TEXTS, "four", batch_size=3)
    keys = [np.asarray(mlp_key(model.params, model.config, np.array([ids]), None, 1))[0]
            for ids in model.tokenizer.encode_batch(TEXTS)]
    keys = np.concatenate(keys).astype(np.float64)
    assert stats.count == len(keys)
    np.testing.assert_allclose(stats.moment, keys.T @ keys / len(keys), rtol=1e-5, atol=1e-7)


def test_solve_matches_numpy():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(6, 12))
    stats = KeyStats(a @ a.T / 12, 12, 0, "x")
    k = rng.normal(size=6)
    np.testing.assert_allclose(solve(stats.factor(), k), np.linalg.solve(stats.moment, k),
                               rtol=1e-4)
    ridge = np.linalg.solve(stats.moment + 0.5 * np.eye(6), k)
    np.testing.assert_allclose(solve(stats.factor(0.5), k), ridge, rtol=1e-4)


def test_singular_statistics_are_refused():
    with pytest.raises(ValueError, match="positive definite"):
        KeyStats(np.zeros((3, 3)), 1, 0, "x").factor()


def test_cache_round_trip_is_exact_float32(tmp_path):
    rng = np.random.default_rng(1)
    moment = (rng.normal(size=(5, 5)) * 1e3 + np.pi).astype(np.float32)
    save_key_stats(KeyStats(moment, 17, 2, "wiki", 3), tmp_path / "c.npz")
    back = load_key_stats(tmp_path / "c.npz")
    assert (back.count, back.layer, back.corpus, back.n_texts) == (17, 2, "wiki", 3)
    assert back.moment.dtype == np.float32
    np.testing.assert_array_equal(back.moment, moment)


def test_key_stats_caches_and_rebuilds_a_corrupt_cache(model, tmp_path, monkeypatch):
    first = key_stats(model, 1, "four", texts=TEXTS, cache_dir=tmp_path)
    path = stats_mod.cache_path(model, 1, resolve_corpus("four", TEXTS), tmp_path)
    assert path.is_file()
    calls = []
    real = stats_mod.compute_layer_stats
    monkeypatch.setattr(stats_mod, "compute_layer_stats",
                        lambda *a, **k: calls.append(1) or real(*a, **k))
    again = key_stats(model, 1, "four", texts=TEXTS, cache_dir=tmp_path)
    assert calls == [] and np.array_equal(again.moment, first.moment)
    # corrupt: emptied -> rebuilt, not trusted
    path.write_bytes(b"")
    messages = []
    rebuilt = key_stats(model, 1, "four", texts=TEXTS, cache_dir=tmp_path, log=messages.append)
    assert calls == [1] and messages and "rebuilding" in messages[0]
    np.testing.assert_array_equal(rebuilt.moment, first.moment)


def test_cache_key_changes_with_weights_below_the_layer_only(model, tmp_path):
    corpus = resolve_corpus("c", TEXTS)
    base = stats_mod.cache_path(model, 1, corpus, tmp_path)
    fc_out = model.params["blocks"]["mlp"]["fc_out"]
    edited_here = {**model.params, "blocks": {**model.params["blocks"], "mlp": {
        **model.params["blocks"]["mlp"], "fc_out": {**fc_out, "w": fc_out["w"].at[1].add(1.0)}}}}
    edited_below = {**model.params, "wte": model.params["wte"] + 1.0}
    assert stats_mod.cache_path(model.with_params(edited_here), 1, corpus, tmp_path) == base
    assert stats_mod.cache_path(model.with_params(edited_below), 1, corpus, tmp_path) != base


def test_key_stats_from_a_text_file(model, tmp_path):
    corpus = tmp_path / "my corpus.txt"
    corpus.write_text("\n".join(TEXTS) + "\n\n")
    from_file = key_stats(model, 1, str(corpus), cache_dir=tmp_path / "cache")
    from_list = compute_key_stats(model, 1, TEXTS, "list")
    np.testing.assert_allclose(from_file.moment, from_list.moment, rtol=1e-6)
    assert from_file.corpus == "my corpus" and from_file.n_texts == len(TEXTS)
    assert len(list((tmp_path / "cache").iterdir())) == 1
    with pytest.raises(ValueError, match="corpus"):
        key_stats(model, 1, str(tmp_path / "missing.txt"), cache_dir=tmp_path / "cache")


RACER = """
import hashlib, json, sys, time
from pathlib import Path
from conftest import tiny_gpt2
from rome_jax.rome import stats
cache, go, ready = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
texts = json.loads(sys.argv[4])
model = tiny_gpt2(n_layer=2, d_model=16, n_head=2, seq_len=32, seed=5)
real = stats.compute_layer_stats
def slow(*args, **kwargs):  # a build that takes a while, as on a real model
    out = real(*args, **kwargs)
    time.sleep(1.0)
    return out
stats.compute_layer_stats = slow
ready.touch()
while not go.exists():
    time.sleep(0.005)
result = stats.key_stats(model, 1, "four", texts=texts, cache_dir=cache)
print(json.dumps({"sha": hashlib.sha256(result.moment.tobytes()).hexdigest(),
                  "count": result.count}))
"""


def test_two_processes_building_the_same_missing_cache(model, tmp_path):
    """Two processes start building one missing cache at the same moment: both finish with the
    same statistics, the cache loads, and nothing temporary is left beside it."""
    import hashlib
    import json
    import os
    import subprocess
    import sys
    import time
    from pathlib import Path

    cache, go = tmp_path / "cache", tmp_path / "go"
    tests = Path(__file__).parent
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(tests.parent), str(tests), os.environ.get("PYTHONPATH", "")]))
    ready = [tmp_path / f"ready{i}" for i in range(2)]
    racers = [subprocess.Popen([sys.executable, "-c", RACER, str(cache), str(go), str(r),
                                json.dumps(TEXTS)], env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True) for r in ready]
    while not all(r.exists() for r in ready) and all(p.poll() is None for p in racers):
        time.sleep(0.01)
    go.touch()
    outputs = [p.communicate(timeout=300) for p in racers]
    for p, (out, err) in zip(racers, outputs):
        assert p.returncode == 0, err[-2000:]
    results = [json.loads(out.strip().splitlines()[-1]) for out, _ in outputs]
    assert results[0] == results[1]
    path = stats_mod.cache_path(model, 1, resolve_corpus("four", TEXTS), cache)
    assert [p.name for p in cache.iterdir()] == [path.name]  # no temp dir, no lock left
    loaded = load_key_stats(path)
    assert hashlib.sha256(loaded.moment.tobytes()).hexdigest() == results[0]["sha"]
    assert loaded.count == results[0]["count"]
    np.testing.assert_array_equal(loaded.moment, compute_key_stats(model, 1, TEXTS).moment)


def test_non_finite_statistics_are_never_saved(model, tmp_path):
    broken = model.with_params({**model.params, "wte": model.params["wte"] * np.nan})
    with pytest.raises(ValueError, match="layer 1 are not finite"):
        key_stats(broken, 1, "four", texts=TEXTS, cache_dir=tmp_path)
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ValueError, match="not finite"):
        save_key_stats(KeyStats(np.full((3, 3), np.inf), 4, 0, "x"), tmp_path / "c.npz")
    assert list(tmp_path.iterdir()) == []


def test_cache_is_keyed_by_corpus_content_and_counts_the_texts_used(model, tmp_path,
                                                                     monkeypatch):
    """Issue 23, item 4: a 5-line wikitext2_raw_test.txt in $ROME_JAX_DATA builds its own cache
    (the key names the content of the texts used), which a run on other WikiText never loads,
    and the statistics say 5 texts were used, not the 400 asked for."""
    from rome_jax import data

    short = tmp_path / "short" / "corpus" / "wikitext2_raw_test.txt"
    short.parent.mkdir(parents=True)
    short.write_text("\n".join(TEXTS + ["A fifth text."]) + "\n")
    cache = tmp_path / "cache"
    monkeypatch.setenv("ROME_JAX_DATA", str(short.parents[1]))
    small = key_stats(model, 1, n_samples=400, cache_dir=cache)
    assert small.n_texts == 5
    assert small.count == sum(len(ids) for ids in model.tokenizer.encode_batch(
        TEXTS + ["A fifth text."]))
    other = short.parent.parent.parent / "other" / "corpus" / "wikitext2_raw_test.txt"
    other.parent.mkdir(parents=True)
    other.write_text("\n".join(TEXTS[::-1] + ["Another fifth text, longer."]) + "\n")
    monkeypatch.setenv("ROME_JAX_DATA", str(other.parents[1]))
    again = key_stats(model, 1, n_samples=400, cache_dir=cache)
    assert again.count != small.count and len(list(cache.glob("*.npz"))) == 2
    assert resolve_corpus("wikitext", n_samples=3).digest == stats_mod.texts_digest(
        data.load_wikitext()[:3])


def test_wikitext_digest_is_that_of_the_pinned_file():
    from rome_jax import data

    path = data.local_file("corpus/wikitext2_raw_test.txt")
    if path is None:
        pytest.skip("no local WikiText")
    if data.sha256_file(path) != ("4f3e427e4aff23acff917a8a51aeae21bf12832256e26914c8fc250dcef"
                                  "4103c"):
        pytest.skip(f"{path} is not the file the pinned download derives")
    assert stats_mod.texts_digest(data.load_wikitext()) == stats_mod.WIKITEXT_DIGEST


@pytest.mark.parametrize("change", ["format", "nan", "layer", "float64"])
def test_a_cache_of_another_format_or_out_of_range_is_rebuilt(model, tmp_path, change):
    """A cache written by another version of the code (format), holding a NaN, or for another
    layer or dtype is rebuilt, never used (issue 23: Also, and item 3)."""
    first = key_stats(model, 1, "four", texts=TEXTS, cache_dir=tmp_path)
    path = stats_mod.cache_path(model, 1, resolve_corpus("four", TEXTS), tmp_path)
    with np.load(path) as saved:
        fields = dict(saved)
    if change == "format":
        fields["format"] = np.int64(STATS_FORMAT - 1)
    elif change == "nan":
        fields["moment"] = fields["moment"].copy()
        fields["moment"][0, 0] = np.nan
    elif change == "layer":
        fields["layer"] = np.int64(0)
    else:
        fields["moment"] = fields["moment"].astype(np.float64) * 2
    with open(path, "wb") as out:
        np.savez(out, **fields)
    with pytest.raises(ValueError, match="cache unreadable"):
        load_key_stats(path, 1, model.config.d_mlp)
    messages = []
    rebuilt = key_stats(model, 1, "four", texts=TEXTS, cache_dir=tmp_path, log=messages.append)
    assert messages and "rebuilding" in messages[0]
    np.testing.assert_array_equal(rebuilt.moment, first.moment)
    assert load_key_stats(path, 1, model.config.d_mlp).count == first.count


def test_stats_command_reports_the_texts_used_and_never_reuses_another_corpus(env, tiny_model,
                                                                              tmp_path):
    """Issue 23, item 4, as a user runs it: `stats --mom2-n-samples 400` over a 5-line
    WikiText in $ROME_JAX_DATA says 5 texts; a later run on the real WikiText builds its own
    statistics instead of loading those."""
    import json

    from conftest import assert_ok, cli

    short = tmp_path / "data" / "corpus" / "wikitext2_raw_test.txt"
    short.parent.mkdir(parents=True)
    short.write_text("\n".join(TEXTS + ["A fifth text."]) + "\n")
    run_env = {**env, "ROME_JAX_CACHE": str(tmp_path / "cache")}
    args = ["stats", "--model", tiny_model, "--layer", "1", "--mom2-n-samples", "400"]
    small = cli({**run_env, "ROME_JAX_DATA": str(short.parents[1])}, *args)
    assert_ok(small)
    assert "wikitext (5 texts, content sha256" in small.stdout and "(built)" in small.stdout
    real = cli({k: v for k, v in run_env.items() if k != "ROME_JAX_DATA"}, *args, "--json")
    assert_ok(real)
    info = json.loads(real.stdout)
    assert info["cached"] is False and info["texts"] == 400
