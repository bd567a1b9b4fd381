"""Fidelity to the original ROME code: its context templates (sampled from <|endoftext|>, special
tokens stripped) and its subject lookup at a last token merged with the punctuation after it."""

import jax
import numpy as np
import pytest
from conftest import tiny_gpt2

from rome_jax import data
from rome_jax.models.tokenizer import Tokenizer
from rome_jax.rome import templates as templates_module
from rome_jax.rome.hparams import RomeHParams
from rome_jax.rome.request import subject_token_index
from rome_jax.rome.templates import sample_context_templates


@pytest.fixture(scope="module")
def model():
    return tiny_gpt2(n_layer=2, d_model=32, n_head=4, seq_len=64, seed=5)


@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer.from_dir(data.tokenizer_dir())


def fake_generation(monkeypatch, model, pieces):
    """Make the sampler 'generate' ``pieces`` (text, or None for <|endoftext|>) for every row;
    returns the calls it saw as (sequences, n_new)."""
    tok = model.tokenizer
    ids = [i for p in pieces for i in ([tok.eos_id] if p is None else tok.encode(p))]
    calls = []

    def generate_ids(model, sequences, n_new, key=None, top_k=1, params=None):
        calls.append((sequences, n_new, top_k))
        return np.asarray([ids[:n_new]] * len(sequences))

    monkeypatch.setattr(templates_module, "generate_ids", generate_ids)
    return calls


def test_rome_templates_continue_the_separator_and_strip_it(monkeypatch, model):
    calls = fake_generation(monkeypatch, model,
                            ["I was created in Hamburg", None, " The New {Zealand}\n\nis"])
    n_new = len(model.tokenizer.encode("I was created in Hamburg The New {Zealand}\n\nis")) + 1
    out = sample_context_templates(model, jax.random.key(0), ((n_new + 1, 3), (3, 2)))
    eos = model.tokenizer.eos_id
    assert [(seqs, n) for seqs, n, _ in calls] == [([[eos]] * 3, n_new), ([[eos]] * 2, 2)]
    assert all(k == 5 for _, _, k in calls)
    assert out.templates[1:4] == ("I was created in Hamburg The New Zealand is. {}",) * 3
    assert out.templates[4:] == ("I was. {}",) * 2
    assert not any("<|endoftext|>" in t for t in out.templates)


def test_rome_templates_after_the_start_token(monkeypatch, model):
    calls = fake_generation(monkeypatch, model, ["Hello"])
    sample_context_templates(model.with_bos(), jax.random.key(0), ((2, 1),))
    eos = model.tokenizer.eos_id
    assert calls[0][0] == [[eos, eos]]


def test_memit_templates_open_with_memit_words(model):
    out = sample_context_templates(model, jax.random.key(1), ((4, 5),), style="memit")
    openings = ("The", "Therefore", "Because", "I", "You")
    assert all(t.startswith(w) for t, w in zip(out.templates[1:], openings, strict=True))


def test_sampled_templates_are_deterministic_and_clean(model):
    a = sample_context_templates(model, jax.random.key(3), ((5, 10), (10, 10)))
    assert a == sample_context_templates(model, jax.random.key(3), ((5, 10), (10, 10)))
    assert len(a.templates) == 21
    assert not any("<|endoftext|>" in t or "\n\n" in t for t in a.templates)


def test_template_style_is_checked(model):
    with pytest.raises(ValueError, match="context_templates"):
        sample_context_templates(model, jax.random.key(0), style="gpt")
    with pytest.raises(ValueError, match="context_templates"):
        RomeHParams(layer=0, context_templates="gpt").check(model.config)


def test_subject_merged_with_punctuation_is_looked_up_at_the_merged_token(tokenizer):
    """CounterFact case 1003: "Comic High!" then "," tokenises as ... " High", "!," (ROME edits
    at "!,", the last token of prefix + subject tokenised alone)."""
    record = next(r for r in data.load_counterfact() if r["case_id"] == 1003)
    rw = record["requested_rewrite"]
    ids, index = subject_token_index(tokenizer, rw["prompt"], rw["subject"])
    assert ids == tokenizer.encode(rw["prompt"].format(rw["subject"]))
    assert tokenizer.decode([ids[index]]) == "!,"
    # ROME's count: the tokens of the subject alone (no prefix here) minus one
    assert index == len(tokenizer.encode(rw["subject"])) - 1
    _, first = subject_token_index(tokenizer, rw["prompt"], rw["subject"], "subject_first")
    assert first == 0


def test_subject_must_start_on_a_token_boundary(tokenizer):
    with pytest.raises(ValueError, match="does not start on a token boundary"):
        subject_token_index(tokenizer, "In{} is a country", "dia")
