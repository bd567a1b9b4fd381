"""Which CounterFact records an experiment edits (fixed by the tokenizer and a seed), and
their keys and v*, solved many at a time."""

from __future__ import annotations

from typing import Callable, Iterator, Mapping, Sequence

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


def with_solved(s, records: Sequence, batch: int,
                request: Callable[[object], object] = lambda record: record
                ) -> Iterator[tuple[object, object]]:
    """(record, its ``rome.edit.Solved`` or None) for each of ``records`` in order: the keys
    and v* of ``request(record)`` (an EditRequest or CounterFact dict; None or a ValueError
    when it cannot be built), solved ``batch`` at a time as one program sharded over the
    devices (``rome.edit.solve_many``). None where the request does not fit the model: the
    caller's own ``solve`` then raises, and its row says why."""
    from rome_jax.rome.edit import Solved, solve_many

    def built(record):
        try:
            return request(record)
        except ValueError:
            return None

    solved = solve_many(s.model, [built(r) for r in records], s.hparams, context=s.context,
                        batch=batch)
    for record, result in zip(records, solved):
        yield record, result if isinstance(result, Solved) else None
