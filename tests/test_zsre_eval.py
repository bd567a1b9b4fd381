"""zsRE scoring (``rome_jax.zsre_eval``): the token accuracy against an independent per-token
argmax loop, ROME's request construction on real records, and records that are skipped."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny_gpt2

import rome_jax
from rome_jax.data import counterfact_by_case_id, load_counterfact, load_zsre
from rome_jax.hf import DEFAULT_MODEL
from rome_jax.models.model import logits
from rome_jax.rome.hparams import RomeHParams
from rome_jax.zsre_eval import (METRICS, TokenAccuracy, evaluate_record, metric_pairs,
                                token_accuracy, zsre_record, zsre_scores)


@pytest.fixture(scope="module")
def model():
    return rome_jax.load_model()  # trained on CounterFact: it knows some facts, so hits vary


@pytest.fixture(scope="module")
def pairs(model):
    """Facts the default model was trained on, with the true object (often predicted) and the
    new one (rarely), and a long prompt; one target of several tokens."""
    import json

    ids = json.loads((DEFAULT_MODEL / "training_case_ids.json").read_text())[:3]
    prompts, targets = [], []
    for r in counterfact_by_case_id(load_counterfact(), ids):
        rw = r["requested_rewrite"]
        for target in (rw["target_true"]["str"], rw["target_new"]["str"]):
            prompts.append(rw["prompt"].format(rw["subject"]))
            targets.append(target)
    prompts.append("nq question: who wrote the song that was played at the very end?")
    targets.append("Ludwig van Beethoven and the Berlin Philharmonic")
    return prompts, targets


def argmax_loop(model, params, prompt: str, target: str) -> list[bool]:
    """Each target token against the argmax of a full forward on the prompt and the target
    tokens before it, one sequence at a time."""
    tok = model.tokenizer
    prompt_ids, target_ids = tok.encode_sequence(prompt), tok.encode(" " + target.strip())
    out = []
    for j, wanted in enumerate(target_ids):
        ids = jnp.asarray([prompt_ids + target_ids[:j]])
        out.append(int(np.argmax(np.asarray(logits(model.with_params(params), ids))[0, -1]))
                   == wanted)
    return out


def test_token_accuracy_equals_a_per_token_argmax_loop(model, pairs):
    prompts, targets = pairs
    expected = [argmax_loop(model, model.params, p, t) for p, t in zip(prompts, targets)]
    flat = [h for row in expected for h in row]
    assert any(flat) and not all(flat)  # the comparison can tell hits from misses
    assert max(map(len, expected)) > 3
    for batch_size in (2, 32):  # several padded batches, and one
        got = TokenAccuracy(model, prompts, targets, batch_size=batch_size)(model.params)
        assert [list(map(bool, g)) for g in got] == expected
    np.testing.assert_allclose(token_accuracy(model, prompts, targets, batch_size=3),
                               [np.mean(e) for e in expected])


def test_cached_residual_scores_edited_params_as_a_full_forward(model, pairs):
    """With ``layer``, params changed at blocks >= layer score as without the cache."""
    prompts, targets = pairs
    layer = 2
    noise = lambda w: w.at[layer:].add(0.05 * jax.random.normal(jax.random.key(0), w[layer:].shape))
    changed = {**model.params, "blocks": jax.tree.map(noise, model.params["blocks"])}
    cached = TokenAccuracy(model, prompts, targets, layer=layer, batch_size=4)(changed)
    full = TokenAccuracy(model, prompts, targets)(changed)
    assert [list(c) for c in cached] == [list(f) for f in full]
    expected = [argmax_loop(model, changed, p, t) for p, t in zip(prompts[:2], targets[:2])]
    assert [list(map(bool, c)) for c in cached[:2]] == expected


def test_token_accuracy_refuses_what_does_not_fit():
    short = tiny_gpt2(n_layer=2, d_model=16, n_head=2, seq_len=16, seed=0)
    with pytest.raises(ValueError, match="prompt: .* more than the model's 16 positions"):
        TokenAccuracy(short, ["a b c d e f g h i j k l m n o p"], ["q r"])
    with pytest.raises(ValueError, match="prompt: '' has no tokens"):
        TokenAccuracy(short, [""], ["q"])
    with pytest.raises(ValueError, match="targets: need one per prompt"):
        TokenAccuracy(short, ["a", "b"], ["q"])


def test_requests_are_romes_on_real_records():
    raw = load_zsre()
    assert len(raw) == 19086
    first = zsre_record(raw[0], 0)
    rw = first["requested_rewrite"]
    assert rw == {"prompt": "The designer for {} was?", "subject": "Life Electric",
                  "target_new": {"str": "Daniel Libeskind"}}  # answers[0], not alt nor pred
    assert raw[0]["alt"] != "Daniel Libeskind" != raw[0]["pred"]
    for i in range(0, len(raw), 97):  # a spread of real records
        record = zsre_record(raw[i], i)
        rw = record["requested_rewrite"]
        assert record["case_id"] == i and rw["prompt"].count("{}") == 1
        assert rw["subject"] not in rw["prompt"].replace("{}", "")
        assert rw["prompt"].format(rw["subject"]) == raw[i]["src"]
        prompts, targets = metric_pairs(record)
        assert prompts == [raw[i]["src"], raw[i]["rephrase"], raw[i]["loc"] + "?"]
        assert targets == [raw[i]["answers"][0]] * 2 + [raw[i]["loc_ans"]]
        assert prompts[2].startswith("nq question: ")


def test_zsre_scores_are_means_over_tokens():
    hits = [np.array([True, False, True, True]), np.array([False]), np.array([True, True])]
    assert zsre_scores(hits) == dict(zip(METRICS, (0.75, 0.0, 1.0)))


def test_a_record_that_cannot_be_edited_is_skipped_with_the_reason():
    raw = dict(load_zsre()[0])
    with pytest.raises(ValueError, match="subject: 'Nowhere' is not in the question"):
        zsre_record({**raw, "subject": "Nowhere"}, 0)
    with pytest.raises(ValueError, match="answers: zsRE record 7 needs a non-empty list"):
        zsre_record({**raw, "answers": []}, 7)
    with pytest.raises(ValueError, match="loc_ans: missing from zsRE record 3"):
        zsre_record({k: v for k, v in raw.items() if k != "loc_ans"}, 3)
    short = tiny_gpt2(n_layer=2, d_model=16, n_head=2, seq_len=16, seed=0)
    hparams = RomeHParams(layer=1)
    # both fail before anything is edited: neither context nor probe is needed
    row = evaluate_record(short, {**raw, "subject": "Nowhere"}, 5, hparams, None, None,
                          ["rome"])
    assert row == {"case_id": 5, "subject": "Nowhere",
                   "error": "subject: 'Nowhere' is not in the question 'The designer for "
                            "Life Electric was?'"}
    long = {**raw, "loc": "nq question: " + "why " * 20}
    row = evaluate_record(short, long, 6, hparams, None, None, ["rome"])
    assert set(row) == {"case_id", "subject", "error"} and "16 positions" in row["error"]
