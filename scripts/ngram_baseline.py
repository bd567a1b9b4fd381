"""Count-based perplexity baselines on ME-PPL_1k for the default model's training text.

    python scripts/ngram_baseline.py

How far a unigram and a bigram model counted on the English training text (ME-PPL 10k minus
ME-PPL_1k and ME-PPL_50, plus WikiText-2) get on ME-PPL_1k: a yardstick for the trained
model's perplexity, and for how much English the data offers. For comparison it also counts
the same models with ME-PPL_1k itself in the text (as if the test sentences had leaked into
training; ME-PPL_1k is a subset of the 10k file).
"""

from rome_jax import data, training
from rome_jax.models.tokenizer import Tokenizer


def main() -> None:
    tok = Tokenizer.from_dir(data.tokenizer_dir())
    english = tok.encode_batch(training.english_documents())
    test = tok.encode_batch(data.load_me_ppl("ME-PPL_1k"))
    ppl = training.ngram_perplexities(english, test, tok.vocab_size, tok.eos_id)
    tokens = sum(len(d) + 1 for d in english)
    print(f"English training text: {tokens:,} tokens; on ME-PPL_1k: unigram perplexity "
          f"{ppl['unigram']:.0f}, bigram perplexity {ppl['bigram']:.0f}")
    leaked = training.ngram_perplexities(english + test, test, tok.vocab_size, tok.eos_id)
    print(f"with ME-PPL_1k added to the counted text: unigram perplexity "
          f"{leaked['unigram']:.0f}, bigram perplexity {leaked['bigram']:.0f}")


if __name__ == "__main__":
    main()
