"""Key statistics at scale: one pass for a window of layers (equal, bit for bit, to one pass
per layer), checkpointed and resumed after a SIGKILL (equal, bit for bit, to a build never
stopped), split over devices, and the corpora (a user's text file, Hugging Face datasets)."""

import json
import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import tiny_gpt2

from rome_jax.rome import stats as stats_mod
from rome_jax.rome.stats import (compute_key_stats, compute_layer_stats, key_stats_layers,
                                 load_key_stats, resolve_corpus)

TESTS = Path(__file__).parent
WORDS = "the cat sat on a mat while Paris stood by the river of France in Europe".split()
# 60 texts of 1-16 words: 4 batches of 16, and tokens enough for a full-rank C at d_mlp 64
TEXTS = [" ".join(WORDS[(i * 7 + j) % len(WORDS)] for j in range(1 + i % 16)) + f" {i}."
         for i in range(60)]
MODEL = dict(n_layer=4, d_model=16, n_head=2, seq_len=32, seed=5)


@pytest.fixture(scope="module")
def model():
    return tiny_gpt2(**MODEL)


def test_one_pass_over_a_window_equals_one_pass_per_layer_and_stops_at_its_top(
        model, monkeypatch):
    run = []
    for name in ("_block", "_block_moment"):
        real = getattr(stats_mod, name)
        monkeypatch.setattr(stats_mod, name, lambda *a, real=real, name=name: run.append(
            (name, int(a[2]))) or real(*a))
    window = compute_layer_stats(model, [2, 1], TEXTS, "t", batch_size=16)
    assert sorted(window) == [1, 2]
    first_batch = run[:len(run) // 4]  # 4 batches, the same blocks each
    assert first_batch == [("_block", 0), ("_block_moment", 1), ("_block_moment", 2)]
    for layer in (1, 2):
        alone = compute_key_stats(model, layer, TEXTS, "t")
        np.testing.assert_array_equal(window[layer].moment, alone.moment)
        assert (window[layer].count, window[layer].n_texts) == (alone.count, alone.n_texts)


def test_prepare_batch_builds_the_window_in_one_pass(model, tmp_path, monkeypatch):
    """MEMIT's window over layers 1..3: one pass for the missing layers, one cache file per
    layer; a cached layer is loaded, not recomputed."""
    from rome_jax.editors.batch import prepare_batch
    from rome_jax.editors.hparams import BatchHParams
    from rome_jax.rome.hparams import RomeHParams

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(TEXTS))
    monkeypatch.setenv("ROME_JAX_CACHE", str(tmp_path / "cache"))
    hp = BatchHParams(layers=(1, 2, 3), v=RomeHParams(layer=3, mom2_corpus=str(corpus)))
    key_stats_layers(model, [2], str(corpus))  # layer 2 already cached
    passes = []
    real = stats_mod.compute_layer_stats
    monkeypatch.setattr(stats_mod, "compute_layer_stats",
                        lambda m, layers, *a, **k: passes.append(list(layers)) or real(
                            m, layers, *a, **k))
    context = prepare_batch(model, "memit", hp, templates=["{}"])
    assert passes == [[1, 3]]
    cache = tmp_path / "cache" / "stats"
    assert sorted(p.name for p in cache.iterdir()) == sorted(
        stats_mod.cache_path(model, layer, resolve_corpus(str(corpus)), cache).name
        for layer in (1, 2, 3))  # and no work folder left
    for layer in (1, 2, 3):
        np.testing.assert_array_equal(context.stats[layer].moment,
                                      compute_key_stats(model, layer, TEXTS, "t").moment)


KILLED = """
import json, os, signal, sys
from pathlib import Path
from conftest import tiny_gpt2
from rome_jax.rome import stats
cache, corpus = Path(sys.argv[1]), sys.argv[2]
model = tiny_gpt2(**json.loads(sys.argv[3]))
real_moment, real_save = stats._block_moment, stats.ocp.CheckpointManager.save
saved = []
def save(self, *args, **kwargs):  # a checkpoint, committed to disk
    out = real_save(self, *args, **kwargs)
    self.wait_until_finished()
    saved.append(args[0])
    return out
def moment(*args):  # SIGKILL mid-way through the batch after the first checkpoint
    if saved:
        os.kill(os.getpid(), signal.SIGKILL)
    return real_moment(*args)
stats._block_moment, stats.ocp.CheckpointManager.save = moment, save
stats.key_stats_layers(model, [1, 3], corpus, cache_dir=cache, reduce_every=1,
                       checkpoint_every=1)
"""


def test_a_build_killed_mid_way_resumes_and_equals_an_uninterrupted_one(model, tmp_path,
                                                                        monkeypatch):
    corpus, cache = tmp_path / "corpus.txt", tmp_path / "cache"
    corpus.write_text("\n".join(TEXTS))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(TESTS.parent), str(TESTS), os.environ.get("PYTHONPATH", "")]))
    killed = subprocess.run([sys.executable, "-c", KILLED, str(cache), str(corpus),
                             json.dumps(MODEL)], env=env, capture_output=True, text=True,
                            timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    work = [p for p in cache.iterdir() if p.name.endswith(".work")]
    assert len(work) == 1 and not any(cache.glob("*.npz"))
    batches, lines = [], []
    real = stats_mod._embed
    monkeypatch.setattr(stats_mod, "_embed", lambda *a: batches.append(1) or real(*a))
    resumed = key_stats_layers(model, [1, 3], str(corpus), cache_dir=cache, reduce_every=1,
                               checkpoint_every=1, log=lines.append)
    assert f"resuming key statistics at batch 1 of 4 from {work[0]}" in lines
    assert len(batches) == 3  # the rest only
    assert not work[0].exists()  # removed once the caches are written
    whole = key_stats_layers(model, [1, 3], str(corpus), cache_dir=tmp_path / "whole",
                             reduce_every=1, checkpoint_every=2)
    assert len(batches) == 3 + 4
    source = resolve_corpus(str(corpus))
    for layer in (1, 3):
        saved = load_key_stats(stats_mod.cache_path(model, layer, source, cache))
        for got in (saved, resumed[layer]):
            np.testing.assert_array_equal(got.moment, whole[layer].moment)
            assert got.count == whole[layer].count
    # and neither knows it was built beside another layer
    np.testing.assert_array_equal(whole[3].moment, compute_layer_stats(
        model, [3], TEXTS, "t", reduce_every=1)[3].moment)


def test_a_checkpoint_of_other_settings_is_not_resumed(model, tmp_path):
    work = stats_mod.Checkpoints(tmp_path / "work", every=1)
    first = compute_layer_stats(model, [1], TEXTS[:40], "t", reduce_every=1, checkpoints=work)
    lines = []
    again = compute_layer_stats(model, [1], TEXTS[20:], "t", reduce_every=1, checkpoints=work,
                                log=lines.append)
    assert lines == [f"{work.work_dir}: checkpoints of another build (other texts, layers or "
                     "settings); starting afresh"]  # other texts: not resumed
    np.testing.assert_array_equal(again[1].moment, compute_layer_stats(
        model, [1], TEXTS[20:], "t", reduce_every=1)[1].moment)
    assert first[1].count != again[1].count
    with pytest.raises(ValueError, match="positive number of batches"):
        stats_mod.Checkpoints(tmp_path / "w", every=0)
    with pytest.raises(ValueError, match="not a multiple"):
        compute_layer_stats(model, [1], TEXTS, reduce_every=2,
                            checkpoints=stats_mod.Checkpoints(tmp_path / "w", every=3))


SPLIT = """
import json, sys
import jax
import numpy as np
from conftest import tiny_gpt2
from rome_jax.rome import stats
assert len(jax.devices()) == 4
model = tiny_gpt2(**json.loads(sys.argv[1]))
texts = json.loads(sys.argv[2])
sums = []
real = stats._block_moment
def moment(*args):
    h, out = real(*args)
    sums.append(sorted(s.data.shape for s in out.addressable_shards))
    return h, out
stats._block_moment = moment
four = stats.compute_layer_stats(model, [1, 2], texts, "t", batch_size=7)
one = stats.compute_layer_stats(model, [1, 2], texts, "t", batch_size=7,
                                mesh=jax.sharding.Mesh(np.asarray(jax.devices()[:1]), ("data",)))
print(json.dumps({"shards": sums[0], "count": [four[1].count, one[1].count],
                  "error": max(float(np.abs(four[l].moment - one[l].moment).max()
                                     / np.abs(one[l].moment).max()) for l in (1, 2))}))
"""


def test_the_pass_splits_each_batch_over_the_devices(tmp_path):
    """4 forced CPU devices: each holds the sums of its own rows ([1, F, F] of the [4, F, F]
    per-device sums; batches of 7 texts padded to 8 rows) and C equals one device's to float32
    rounding."""
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4",
               PYTHONPATH=os.pathsep.join([str(TESTS.parent), str(TESTS),
                                           os.environ.get("PYTHONPATH", "")]))
    done = subprocess.run([sys.executable, "-c", SPLIT, json.dumps(MODEL), json.dumps(TEXTS)],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    out = json.loads(done.stdout.splitlines()[-1])
    d_mlp = 4 * MODEL["d_model"]
    assert out["shards"] == [[1, d_mlp, d_mlp]] * 4
    assert out["count"][0] == out["count"][1]
    assert out["error"] < 1e-6


def test_a_text_file_corpus(model, tmp_path):
    corpus = tmp_path / "notes.txt"
    corpus.write_text("\n\n".join(TEXTS[:30]) + "\n")
    got = key_stats_layers(model, [1, 2], str(corpus), cache_dir=tmp_path / "c", n_samples=20)
    for layer in (1, 2):
        np.testing.assert_array_equal(got[layer].moment, compute_key_stats(
            model, layer, TEXTS[:20], "t").moment)
        assert (got[layer].corpus, got[layer].n_texts) == ("notes", 20)


class FakeDatasets:
    """Stands for the ``datasets`` package: load_dataset streams the rows it was given."""

    def __init__(self, rows):
        self.rows, self.calls = rows, []

    def load_dataset(self, path, name=None, split=None, streaming=False):
        self.calls.append((path, name, split, streaming))
        return iter(self.rows)


def test_hugging_face_corpora_are_streamed_through_datasets(model, tmp_path, monkeypatch):
    rows = [{"text": ""}, *({"text": f" {t}\n", "id": i} for i, t in enumerate(TEXTS))]
    fake = FakeDatasets(rows)
    monkeypatch.setitem(sys.modules, "datasets", fake)
    corpus = resolve_corpus("wikipedia", n_samples=25)
    assert fake.calls == [("wikimedia/wikipedia", "20231101.en", "train", True)]
    assert corpus.texts == tuple(TEXTS[:25]) and corpus.name == "wikipedia"
    assert resolve_corpus("wikitext-103", n_samples=3).texts == tuple(TEXTS[:3])
    assert fake.calls[-1] == ("Salesforce/wikitext", "wikitext-103-raw-v1", "train", True)
    other = resolve_corpus("hf:some/data:cfg@validation", n_samples=2)
    assert fake.calls[-1] == ("some/data", "cfg", "validation", True)
    assert other.name == "hf-some_data_cfg_validation"
    monkeypatch.setitem(sys.modules, "datasets", FakeDatasets([{"title": "x"}]))
    with pytest.raises(ValueError, match="'text'"):
        resolve_corpus("wikipedia")
    monkeypatch.setitem(sys.modules, "datasets", None)  # not installed
    with pytest.raises(ValueError, match="pip install datasets"):
        resolve_corpus("wikipedia")
    with pytest.raises(ValueError, match="names no dataset"):
        resolve_corpus("hf:@train")


def test_a_local_dataset_read_by_the_datasets_library(model, tmp_path, monkeypatch):
    """The real ``datasets`` library (the ``test`` extra) streams a local folder, offline: a
    name look-up or connection (a download, a hub query) fails the test."""
    pytest.importorskip("datasets")

    def offline(*args, **kwargs):
        raise AssertionError("datasets went online (a name look-up or a connection)")

    monkeypatch.setattr(socket, "getaddrinfo", offline)
    monkeypatch.setattr(socket.socket, "connect", offline)
    folder = tmp_path / "corpus"
    folder.mkdir()
    (folder / "train.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    got = key_stats_layers(model, [1], f"hf:{folder}", n_samples=40, cache_dir=tmp_path / "c")
    np.testing.assert_array_equal(got[1].moment, compute_key_stats(model, 1, TEXTS[:40],
                                                                   "t").moment)


def test_the_stats_command_builds_a_window_in_one_pass(tiny_model, tmp_path, capsys):
    """`rome-jax stats --layers 0-1 --mom2-corpus FILE --mom2-samples N`: one pass, one cache
    per layer, loaded by the next run; --checkpoint-every must be a multiple of 16."""
    from conftest import in_process_env

    from rome_jax import cli as rome_cli

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(TEXTS))
    args = ["stats", "--model", str(tiny_model), "--layer", "1", "--layers", "0-1",
            "--mom2-corpus", str(corpus), "--mom2-samples", "30", "--json"]
    with in_process_env(tmp_path):
        assert rome_cli.main(args) == 0
        out, err = capsys.readouterr()
        first = json.loads(out)["layers"]
        assert "computing key statistics at layers 0, 1" in err
        # the progress bar: the window, tokens/s and the time left ("<" then the estimate)
        bar = err[err.index("key stats layers 0,1"):]
        assert re.search(r"tok/s", bar) and re.search(r"<\d\d:\d\d", bar), bar[-500:]
        assert rome_cli.main(args) == 0
        again = json.loads(capsys.readouterr().out)["layers"]
        with pytest.raises(SystemExit):
            rome_cli.main([*args, "--checkpoint-every", "24"])
        assert "24 is not a multiple of 16" in capsys.readouterr().err
    assert [(i["layer"], i["how"], i["texts"], i["corpus"]) for i in first] == [
        (0, "built", 30, "corpus"), (1, "built", 30, "corpus")]
    assert [i["how"] for i in again] == ["loaded", "loaded"]
    assert [i["path"] for i in again] == [i["path"] for i in first]
