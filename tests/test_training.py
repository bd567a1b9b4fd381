"""The default model's training data: epoch packing and n-gram baselines."""

import math
from collections import Counter

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rome_jax import training
from rome_jax.training import TrainSettings


def test_pack_epoch_mixes_the_fraction_deterministically():
    rng = np.random.default_rng(0)
    docs = lambda n, lo, hi: [rng.integers(1, 1000, rng.integers(lo, hi)) for _ in range(n)]
    facts, english = docs(50, 5, 15), docs(400, 20, 60)
    s = TrainSettings(seq_len=32, english_fraction=0.6)
    windows = training.pack_epoch(facts, english, s, epoch=3, eos=0)
    assert windows.shape[1] == 33 and windows.dtype == np.int32
    np.testing.assert_array_equal(windows, training.pack_epoch(facts, english, s, 3, 0))
    assert not np.array_equal(windows, training.pack_epoch(facts, english, s, 4, 0))
    fact_tokens = sum(len(d) + 1 for d in facts)
    total = fact_tokens / 0.4  # facts are the other 40%
    assert abs(windows.size - total) < 60 + 33  # one English document and the cut tail
    stream = windows.ravel().tolist()
    cuts = [i for i, t in enumerate(stream) if t == 0]
    packed = {tuple(stream[a + 1:b]) for a, b in zip([-1, *cuts], cuts)}
    found = sum(tuple(d.tolist()) in packed for d in facts)
    assert found >= len(facts) - 32 // 6  # all, but for those in the cut tail (< 33 tokens)
    alone = training.pack_epoch(facts, english, TrainSettings(seq_len=32, english_fraction=0),
                                0, 0)
    assert abs(alone.size - fact_tokens) <= 33


def brute_force(train, test, vocab, eos, discount=0.75):
    stream = [t for d in train for t in [*d, eos]]
    uni = Counter(stream)
    total = len(stream) + 0.1 * vocab
    p_uni = lambda b: (uni[b] + 0.1) / total
    pairs = Counter(zip(stream[:-1], stream[1:]))
    ctx = Counter(stream[:-1])
    follow = Counter(a for a, _ in pairs)
    nll_u = nll_b = n = 0
    for sent in test:
        for a, b in zip(sent[:-1], sent[1:]):
            c = ctx[a]
            p = (max(pairs[(a, b)] - discount, 0) / c + discount * follow[a] / c * p_uni(b)
                 if c else p_uni(b))
            nll_u -= math.log(p_uni(b))
            nll_b -= math.log(p)
            n += 1
    return math.exp(nll_u / n), math.exp(nll_b / n)


tokens = st.lists(st.integers(0, 11), min_size=2, max_size=12)


@settings(max_examples=30)
@given(st.lists(tokens, min_size=1, max_size=6), st.lists(tokens, min_size=1, max_size=4))
def test_ngram_perplexities_match_counting_by_hand(train, test):
    got = training.ngram_perplexities(train, test, vocab_size=12, eos=0)
    unigram, bigram = brute_force(train, test, 12, 0)
    assert got["unigram"] == pytest.approx(unigram, rel=1e-9)
    assert got["bigram"] == pytest.approx(bigram, rel=1e-9)


def test_model_card_reports_the_summary():
    s = TrainSettings()
    summary = {"trained_records": 400, "heldout_records": 1000, "english_tokens": 538035,
               "wall_minutes": 80.5, "steps_run": 2100, "epochs": 15,
               "evals": [{"step": 400, "epoch": 2, "loss": 5.6, "acc_trained_200": 0.64,
                          "acc_heldout_200": 0.575, "me_ppl_1k": 1514.8, "minutes": 14.8}],
               "final": {"acc_trained": 0.955, "acc_heldout": 0.6, "acc_gap_points": 35.5,
                         "me_ppl_1k_perplexity": 987.6, "me_ppl_1k_bigram_baseline": 1091.2}}
    card = training.model_card(s, summary)
    for text in ("| 0.955 |", "| 35.5 |", "| 987.6 |", "| 1091.2 |", "538,035 tokens",
                 "80.5 min for 2100 steps", "| 400 | 2 | 5.600 | 0.640 | 0.575 | 1514.8 | 14.8 |",
                 f"| english_fraction | {s.english_fraction} |"):
        assert text in card, text


def test_train_step_is_reproducible_for_a_key():
    """The same key gives the same step bit for bit; the key only matters through dropout."""
    import jax
    settings_ = TrainSettings(n_layer=2, d_model=16, n_head=2, seq_len=8, batch_size=2)
    cfg = training.model_config(settings_, vocab_size=50)
    optimizer = training.make_optimizer(settings_)
    params = training.init_params(cfg, jax.random.key(0))
    windows = np.random.default_rng(0).integers(0, 50, (2, 9), dtype=np.int32)

    def one_step(dropout, key):
        step = training.make_train_step(cfg, optimizer, dropout)
        new, _, loss = step(params, optimizer.init(params), windows, jax.random.key(key))
        return np.asarray(new["wte"]), float(loss)

    np.testing.assert_array_equal(one_step(0.1, 0)[0], one_step(0.1, 0)[0])
    assert one_step(0.1, 0)[1] != one_step(0.1, 1)[1]
    np.testing.assert_array_equal(one_step(0.0, 0)[0], one_step(0.0, 1)[0])
