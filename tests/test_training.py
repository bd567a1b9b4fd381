"""The default model's training data: record split, world facts, epoch packing, n-gram
baselines."""

import math
from collections import Counter

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rome_jax import training
from rome_jax.training import TrainSettings


def record(case_id, subject, neighbours=(), attributes=()):
    return {"case_id": case_id,
            "requested_rewrite": {"prompt": "{} plays the", "subject": subject,
                                  "target_true": {"str": "guitar"},
                                  "target_new": {"str": "piano"}},
            "paraphrase_prompts": [f"Music. {subject} plays the"],
            "neighborhood_prompts": list(neighbours), "attribute_prompts": list(attributes)}


def test_world_documents_keep_held_out_subjects_unseen():
    records = [record(0, "Toko Yasuda", ["Slash plays the"]),
               record(1, "Jimi Hendrix", ["Toko Yasuda's friend Eric plays the"]),
               record(2, "Eric", ["Eric Clapton plays the", "Prince plays the"],
                      ["Glenn Gould plays the", "J. S. Bach plays the"]),
               record(3, "Bach", ["Slash plays the"])]
    docs = training.world_documents(records, trained=[3], heldout=[0])
    # record 0 is held out, record 3 trained: neither contributes; record 1's sentence names
    # the held-out subject and is dropped; "Eric" alone is not a held-out subject.
    assert docs == ["Eric Clapton plays the guitar", "Glenn Gould plays the piano",
                    "J. S. Bach plays the piano", "Prince plays the guitar"]


def test_pack_epoch_mixes_the_fractions_deterministically():
    rng = np.random.default_rng(0)
    docs = lambda n, lo, hi: [rng.integers(1, 1000, rng.integers(lo, hi)) for _ in range(n)]
    facts, english, world = docs(50, 5, 15), docs(400, 20, 60), docs(400, 5, 15)
    s = TrainSettings(seq_len=32, english_fraction=0.3, world_fraction=0.2)
    windows = training.pack_epoch(facts, english, world, s, epoch=3, eos=0)
    assert windows.shape[1] == 33 and windows.dtype == np.int32
    again = training.pack_epoch(facts, english, world, s, epoch=3, eos=0)
    np.testing.assert_array_equal(windows, again)
    assert not np.array_equal(windows, training.pack_epoch(facts, english, world, s, 4, 0))
    fact_tokens = sum(len(d) + 1 for d in facts)
    total = fact_tokens / 0.5
    n_docs = int((windows == 0).sum())  # one EOS per document (the cut tail aside)
    assert abs(windows.size - total) < 0.1 * total
    assert len(facts) + 0.25 * total / 41 < n_docs  # English and world documents are in it
    none = training.pack_epoch(facts, english, world,
                               TrainSettings(seq_len=32, english_fraction=0.0), 0, 0)
    assert abs(none.size - fact_tokens) <= 33


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
