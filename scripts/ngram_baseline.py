"""Count-based perplexity baselines on ME-PPL_1k for the default model's training text.

    python scripts/ngram_baseline.py

How far a unigram and a bigram model counted on the English training text (ME-PPL 10k minus
ME-PPL_1k and ME-PPL_50, plus WikiText-2), and on that text plus the world facts, get on
ME-PPL_1k: a yardstick for the trained model's perplexity.
"""

from rome_jax import data, training
from rome_jax.models.tokenizer import Tokenizer


def main() -> None:
    tok = Tokenizer.from_dir(data.tokenizer_dir())
    records = data.load_counterfact()
    trained, heldout = training.select_records(records, tok, training.TrainSettings())
    english = tok.encode_batch(training.english_documents())
    world = tok.encode_batch(training.world_documents(records, trained, heldout))
    test = tok.encode_batch(data.load_me_ppl("ME-PPL_1k"))
    print("| training text | tokens | unigram ppl | bigram ppl |\n| --- | --- | --- | --- |")
    for name, docs in (("English", english), ("English + world facts", english + world)):
        ppl = training.ngram_perplexities(docs, test, tok.vocab_size, tok.eos_id)
        tokens = sum(len(d) + 1 for d in docs)
        print(f"| {name} | {tokens:,} | {ppl['unigram']:.0f} | {ppl['bigram']:.0f} |")


if __name__ == "__main__":
    main()
