"""The BOS switch: ``Model.with_bos`` puts a start token before every sequence the model reads
(prompts, templates, the KL prompt, corpus and perplexity texts), never before continuations;
checked against hand computations with ``forward`` on ``[bos] + ids``."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny_gpt2

from rome_jax import data, guard
from rome_jax.evaluation import continuation_nll, perplexity
from rome_jax.models.generate import generate
from rome_jax.models.model import logits
from rome_jax.models.transformer import forward
from rome_jax.rome.edit import prepare, solve
from rome_jax.rome.hparams import RomeHParams
from rome_jax.rome.request import EditRequest, subject_token_index
from rome_jax.rome.stats import cache_path, compute_key_stats, resolve_corpus

HP = RomeHParams(layer=1, v_num_grad_steps=3, v_lr=0.1,
                 context_template_length_params=((4, 3), (6, 2)))
REQUEST = EditRequest("{} plays the", "Lionel Messi", "piano", "football")
TEXTS = ["The quick brown fox jumps over the lazy dog.", "Paris", "Hello world, again and again"]


@pytest.fixture(scope="module")
def model():
    return tiny_gpt2(n_layer=3, d_model=32, n_head=4, seq_len=64, seed=3, weight_scale=4)


@pytest.fixture(scope="module")
def bos_model(model):
    return model.with_bos()


def test_with_bos_defaults_to_the_document_separator_and_is_pure(model, bos_model):
    assert bos_model.tokenizer.bos_id == model.tokenizer.eos_id == 50256
    assert model.tokenizer.bos_id is None and bos_model.params is model.params
    assert model.with_bos("Hello").tokenizer.bos_id == model.tokenizer.encode("Hello")[0]
    assert bos_model.with_bos(None).tokenizer.bos_id is None
    with pytest.raises(ValueError, match="bos: the tokenizer has no token '<s>'"):
        model.with_bos("<s>")
    assert bos_model.tokenizer.encode(" piano") == model.tokenizer.encode(" piano")
    assert bos_model.tokenizer.encode_sequence("Hi") == [50256] + model.tokenizer.encode("Hi")


def test_subject_lookup_is_shifted_to_the_same_token(model, bos_model):
    ids, index = subject_token_index(model.tokenizer, REQUEST.prompt, REQUEST.subject)
    bos_ids, bos_index = subject_token_index(bos_model.tokenizer, REQUEST.prompt,
                                             REQUEST.subject)
    assert bos_ids == [50256] + ids and bos_index == index + 1
    assert bos_ids[bos_index] == ids[index] == model.tokenizer.encode(" Messi")[0]
    last = subject_token_index(bos_model.tokenizer, REQUEST.prompt, REQUEST.subject, "last")
    assert last == (bos_ids, len(bos_ids) - 1)


def hand_key(model, bos: int, text: str, subject_end: str) -> np.ndarray:
    """The key at the subject's last token of ``[bos] + encode(text)``; the subject ends the
    prefix ``subject_end`` of ``text`` (ROME's count: tokens of that prefix, minus one)."""
    ids = [bos] + model.tokenizer.encode(text)
    index = len(model.tokenizer.encode(subject_end))  # + 1 for the BOS, - 1 for the last
    out = forward(model.params, model.config, jnp.asarray([ids]), layer=HP.layer,
                  token_index=jnp.asarray([index]))
    return np.asarray(out.key[0])


def test_edit_keys_with_bos_equal_keys_of_forward_on_bos_ids(model, bos_model):
    stats = compute_key_stats(bos_model, HP.layer, data.load_wikitext()[:40], "wiki40")
    context = prepare(bos_model, HP, jax.random.key(0), stats=stats)
    solved = solve(bos_model, REQUEST, HP, context=context)
    bos = bos_model.tokenizer.bos_id
    # REQUEST's prompt opens with its subject: in a template it ends at prefix + subject
    keys = [hand_key(model, bos, t.replace("{}", REQUEST.text),
                     t.replace("{}", "") + REQUEST.subject)
            for t in context.templates.templates]
    np.testing.assert_allclose(np.asarray(solved.keys.plain), keys[0], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.asarray(solved.keys.mean), np.mean(keys, 0), rtol=1e-4,
                               atol=1e-5)
    plain = forward(model.params, model.config, jnp.asarray([model.tokenizer.encode(
        REQUEST.text)]), layer=HP.layer, token_index=jnp.asarray([1])).key[0]
    assert not np.allclose(np.asarray(solved.keys.plain), np.asarray(plain), atol=1e-3)


def test_perplexity_with_bos_by_hand(model, bos_model):
    """Every real token is predicted (the first from the BOS); the BOS itself never is."""
    bos, total, count = bos_model.tokenizer.bos_id, 0.0, 0
    for text in TEXTS:
        ids = [bos] + model.tokenizer.encode(text)
        logp = jax.nn.log_softmax(np.asarray(logits(model, jnp.asarray([ids])), np.float64)[0])
        total -= sum(float(logp[t, ids[t + 1]]) for t in range(len(ids) - 1))
        count += len(ids) - 1
    assert perplexity(bos_model, TEXTS) == pytest.approx(np.exp(total / count), rel=1e-4)
    assert count == sum(len(model.tokenizer.encode(t)) for t in TEXTS)  # "Paris" counts too


def test_continuation_nll_with_bos_by_hand(model, bos_model):
    prompt, target = "Lionel Messi plays the", "piano"
    ids = [bos_model.tokenizer.bos_id] + model.tokenizer.encode(prompt)
    target_ids = model.tokenizer.encode(" piano")
    logp = jax.nn.log_softmax(np.asarray(logits(model, jnp.asarray([ids + target_ids])),
                                         np.float64)[0])
    hand = -np.mean([logp[len(ids) - 1 + j, t] for j, t in enumerate(target_ids)])
    got = continuation_nll(bos_model, [prompt], [target])[0]
    assert got == pytest.approx(hand, rel=1e-4)
    assert got != pytest.approx(continuation_nll(model, [prompt], [target])[0], rel=1e-4)


def test_generation_with_bos_is_greedy_after_bos(model, bos_model):
    ids = [bos_model.tokenizer.bos_id] + model.tokenizer.encode("Hello")
    for _ in range(3):
        ids.append(int(np.argmax(np.asarray(logits(model, jnp.asarray([ids])))[0, -1])))
    assert generate(bos_model, ["Hello"], 3) == [model.tokenizer.decode(ids[-3:])]


def test_statistics_with_bos_read_it_and_have_their_own_cache(model, bos_model, tmp_path):
    texts = data.load_wikitext()[:12]
    with_bos = compute_key_stats(bos_model, HP.layer, texts, "wiki12")
    without = compute_key_stats(model, HP.layer, texts, "wiki12")
    lengths = [len(model.tokenizer.encode(t)) for t in texts]
    n = model.config.n_positions
    assert without.count == sum(min(k, n) for k in lengths)
    assert with_bos.count == sum(min(k + 1, n) for k in lengths)
    assert not np.allclose(with_bos.moment, without.moment)
    corpus = resolve_corpus("wiki12", texts)
    plain = cache_path(model, HP.layer, corpus, tmp_path)
    assert cache_path(bos_model, HP.layer, corpus, tmp_path) != plain
    assert cache_path(model.with_bos("Hello"), HP.layer, corpus, tmp_path) not in (
        plain, cache_path(bos_model, HP.layer, corpus, tmp_path))
    assert guard.profile_path(bos_model, HP, 8, tmp_path) != guard.profile_path(model, HP, 8,
                                                                                tmp_path)


def test_generation_is_the_same_in_any_batch(model):
    """Prompts are left-padded to a bucketed width: a prompt's greedy continuation does not
    depend on the other prompts of its batch (nor on the padding), and equals the argmax loop."""
    prompts = ["Hello", "The Eiffel Tower is located in the city of",
               "Danielle Darrieux's mother tongue is"]
    together = generate(model, prompts, 4)
    assert together == [generate(model, [p], 4)[0] for p in prompts]
    ids = model.tokenizer.encode(prompts[1])
    for _ in range(4):
        ids.append(int(np.argmax(np.asarray(logits(model, jnp.asarray([ids])))[0, -1])))
    assert together[1] == model.tokenizer.decode(ids[-4:])
