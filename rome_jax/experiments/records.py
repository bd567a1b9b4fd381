"""Which CounterFact records an experiment edits: fixed by the tokenizer and a seed."""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

from rome_jax.training import first_token_subject


def first_token_and_sample(records: Sequence[Mapping], tokenizer, n_others: int,
                           seed: int = 0) -> tuple[list[int], list[int]]:
    """(case ids of every record whose subject is one token at the very start of its prompt
    for ``tokenizer``, the first ``n_others`` case ids of the rest shuffled with numpy seed
    ``seed``), each sorted: the collapse candidates and the normal sample of the collapse
    experiments. A larger ``n_others`` keeps the records of a smaller one."""
    first = sorted(int(r["case_id"]) for r in records if first_token_subject(r, tokenizer))
    rest = np.array(sorted({int(r["case_id"]) for r in records} - set(first)))
    if n_others > len(rest):
        raise ValueError(f"n_others: {n_others} asked, only {len(rest)} records are left")
    others = np.random.default_rng(seed).permutation(rest)[:n_others]
    return first, sorted(int(i) for i in others)
