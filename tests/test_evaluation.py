"""CounterFact metrics, their summary and generation entropy (evaluation.py)."""

import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from conftest import tiny_gpt2
from rome_jax.evaluation import (continuation_nll, counterfact_metrics, counterfact_nll,
                                 counterfact_nlls, counterfact_prompts, generation_entropy,
                                 mean_sentence_perplexity, ngram_entropy, perplexity,
                                 summarize_counterfact, word_entropy)

@pytest.fixture(scope="module")
def model():
    return tiny_gpt2(n_layer=2, d_model=32, n_head=4, seq_len=64, seed=1, weight_scale=20)


nlls = lambda rows: arrays(np.float64, (rows, 2), elements=st.floats(0.01, 12))


def test_metrics_by_hand():
    nll = {"rewrite": np.array([[1.0, 2.0]]),                     # new more likely
           "paraphrase": np.array([[1.0, 2.0], [3.0, 0.5]]),      # one of two
           "neighborhood": np.array([[2.0, 1.0], [0.5, 4.0]])}    # true more likely in one
    m = counterfact_metrics(nll)
    assert (m["ES"], m["PS"], m["NS"]) == (1.0, 0.5, 0.5)
    assert m["EM"] == pytest.approx(math.exp(-1) - math.exp(-2))
    assert m["PM"] == pytest.approx(((math.exp(-1) - math.exp(-2)) +
                                     (math.exp(-3) - math.exp(-0.5))) / 2)
    assert m["NM"] == pytest.approx(((math.exp(-1) - math.exp(-2)) +
                                     (math.exp(-4) - math.exp(-0.5))) / 2)


@given(nlls(1), nlls(3), nlls(5))
def test_swapping_targets_mirrors_every_metric(rewrite, paraphrase, neighborhood):
    """Exchanging target_new and target_true turns each success rate s into 1 - s (ties aside)
    and negates each margin."""
    nll = {"rewrite": rewrite, "paraphrase": paraphrase, "neighborhood": neighborhood}
    swapped = {k: v[:, ::-1] for k, v in nll.items()}
    a, b = counterfact_metrics(nll), counterfact_metrics(swapped)
    for name, x in (("E", rewrite), ("P", paraphrase), ("N", neighborhood)):
        ties = float((x[:, 0] == x[:, 1]).mean())
        assert a[name + "S"] + b[name + "S"] == pytest.approx(1 - ties)
        assert a[name + "M"] == pytest.approx(-b[name + "M"], abs=1e-12)
        assert 0 <= a[name + "S"] <= 1 and -1 <= a[name + "M"] <= 1


def test_summary_is_the_harmonic_mean_of_success_rates():
    rows = [{"ES": 1.0, "PS": 0.5, "NS": 1.0, "EM": 0.2, "PM": 0.1, "NM": 0.3},
            {"ES": 1.0, "PS": 1.0, "NS": 0.5, "EM": 0.4, "PM": 0.3, "NM": math.nan}]
    s = summarize_counterfact(rows)
    assert (s["ES"], s["PS"], s["NS"], s["n"]) == (1.0, 0.75, 0.75, 2)
    assert s["NM"] == pytest.approx(0.3)  # NaN (a record without prompts) is skipped
    assert s["S"] == pytest.approx(3 / (1 / 1.0 + 1 / 0.75 + 1 / 0.75))
    assert summarize_counterfact([{**rows[0], "NS": 0.0}])["S"] == 0.0


def test_ngram_entropy():
    assert ngram_entropy("the the the the the the") == 0.0
    n = 12  # all words distinct: n-1 distinct bigrams, n-2 trigrams, uniform
    text = " ".join(f"w{i}" for i in range(n))
    assert ngram_entropy(text) == pytest.approx(
        np.mean([2 / 3 * math.log2(n - 1), 4 / 3 * math.log2(n - 2)]))
    assert ngram_entropy("Paris, Paris, Paris, Paris.") < ngram_entropy(
        "Paris is the capital of France, and Rome of Italy.")


def test_counterfact_nll_matches_continuation_nll(model):
    record = {"requested_rewrite": {"prompt": "{} plays the", "subject": "Toko Yasuda",
                                    "target_new": {"str": "piano"},
                                    "target_true": {"str": "guitar"}},
              "paraphrase_prompts": ["Music. Toko Yasuda is known for the"],
              "neighborhood_prompts": ["Jimi Hendrix plays the", "Slash plays the"]}
    nll = counterfact_nll(model, record)
    assert {k: v.shape for k, v in nll.items()} == {"rewrite": (1, 2), "paraphrase": (1, 2),
                                                    "neighborhood": (2, 2)}
    direct = continuation_nll(model, ["Slash plays the"] * 2, ["piano", "guitar"])
    np.testing.assert_allclose(nll["neighborhood"][1], direct, rtol=1e-5)
    prompts = counterfact_prompts(record, prefix="Hello. ")
    assert prompts == {"rewrite": ["Hello. Toko Yasuda plays the"],
                       "paraphrase": record["paraphrase_prompts"],  # does not open with it
                       "neighborhood": record["neighborhood_prompts"]}  # never prefixed
    prefixed = counterfact_nll(model, record, prompts=prompts)
    np.testing.assert_allclose(prefixed["rewrite"][0], continuation_nll(
        model, ["Hello. Toko Yasuda plays the"] * 2, ["piano", "guitar"]), rtol=1e-5)
    both = counterfact_nlls(model, record,
                            [counterfact_prompts(record), prompts])
    assert both[0]["neighborhood"].tolist() == both[1]["neighborhood"].tolist()  # scored once
    assert both[0]["rewrite"].tolist() != both[1]["rewrite"].tolist()


def test_counterfact_prompts_prefix_paraphrases_that_open_with_the_subject():
    record = {"requested_rewrite": {"prompt": "The sport of {}", "subject": "Messi"},
              "paraphrase_prompts": ["Messi plays", "Sport. Messi plays"],
              "neighborhood_prompts": ["Messi-like players play"]}
    assert counterfact_prompts(record, "X. ") == {
        "rewrite": ["The sport of Messi"], "paraphrase": ["X. Messi plays", "Sport. Messi plays"],
        "neighborhood": ["Messi-like players play"]}


def test_word_entropy():
    assert word_entropy(["the the. The"]) == 0.0
    assert word_entropy(["a b", "c d"]) == pytest.approx(1.0)  # no word repeats
    # "a a b": p = (2/3, 1/3) over 2 distinct words
    assert word_entropy(["a a", "b."]) == pytest.approx(
        -(2 / 3 * math.log2(2 / 3) + 1 / 3 * math.log2(1 / 3)))
    assert math.isnan(word_entropy(["", " . "]))


def test_generation_entropy_is_seeded(model):
    import jax

    prompts = ["The capital of France is", "Toko Yasuda plays the"]
    a = generation_entropy(model, prompts, jax.random.key(3), max_new_tokens=8)
    b = generation_entropy(model, prompts, jax.random.key(3), max_new_tokens=8)
    assert a == b and a[0] > 0 and 0 < a[1] <= 1


def test_corpus_and_sentence_perplexity_agree_with_one_text_at_a_time(model):
    """Batching, padding and the length sort change nothing: each text alone gives its own
    perplexity, the corpus one weighs them by token count, the ME-PPL one does not."""
    texts = ["The Eiffel Tower is in Paris, France.", "Hello", "A much longer sentence about "
             "the history of the city and its many bridges over the river.", "Rome is old."]
    counts = [len(model.tokenizer.encode(t)) - 1 for t in texts]
    alone = [(perplexity(model, [t]), n) for t, n in zip(texts, counts) if n > 0]
    assert len(alone) == 3  # "Hello" is one token: nothing to predict
    with pytest.raises(ValueError, match="two or more tokens"):
        perplexity(model, ["Hello"])
    log_total = sum(math.log(p) * n for p, n in alone) / sum(n for _, n in alone)
    assert perplexity(model, texts, batch_size=3) == pytest.approx(math.exp(log_total), rel=1e-5)
    assert mean_sentence_perplexity(model, texts, batch_size=3) == pytest.approx(
        np.mean([p for p, _ in alone]), rel=1e-5)
