"""Data sets from ``../shared/data`` (or the original URLs) and padded token batches.

Files are read, never unpickled. Paths default to ``$ROME_JAX_DATA`` or the ``shared/data``
folder beside the repository.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
ORIGINAL_URLS = {
    "counterfact.json": "https://rome.baulab.info/data/dsets/counterfact.json",
    "zsre_eval.json": "https://rome.baulab.info/data/dsets/zsre_mem_eval.json",
    "me_ppl/ME-PPL.json": "https://raw.githubusercontent.com/WanliYoung/Collapse-in-Model-Editing/main/data/ME-PPL/ME-PPL.json",
}


def data_dir() -> Path:
    return Path(os.environ.get("ROME_JAX_DATA", REPO.parent / "shared" / "data"))


def tokenizer_dir() -> Path:
    return data_dir().parent / "tokenizer" / "gpt2"


def data_file(name: str) -> Path:
    """A data file by its name under the data dir; says where to get it when it is missing."""
    path = data_dir() / name
    if not path.is_file():
        hint = f" (download it from {ORIGINAL_URLS[name]})" if name in ORIGINAL_URLS else ""
        raise FileNotFoundError(f"{path}: data file missing{hint}; set ROME_JAX_DATA to the "
                                "folder that holds it")
    return path


def load_counterfact() -> list[dict]:
    """CounterFact records (ROME schema), sorted by case_id."""
    return json.loads(data_file("counterfact.json").read_text())


def counterfact_by_case_id(records: list[dict], case_ids) -> list[dict]:
    """The records with these case ids, in the order given. ValueError unless ``case_ids`` is a
    non-empty list of integers that all name a record (the unknown ones are listed)."""
    if not isinstance(case_ids, list) or not case_ids:
        raise ValueError(f"case_ids: expected a non-empty list of integers, got "
                         f"{type(case_ids).__name__}{'' if case_ids else ' (empty)'}")
    bad = [i for i in case_ids if not isinstance(i, int) or isinstance(i, bool)]
    if bad:
        raise ValueError(f"case_ids: not integers: {', '.join(map(repr, bad[:10]))}")
    by_id = {r["case_id"]: r for r in records}
    unknown = [i for i in case_ids if i not in by_id]
    if unknown:
        more = f" and {len(unknown) - 20} more" if len(unknown) > 20 else ""
        raise ValueError(f"case_ids: no record with case id {', '.join(map(str, unknown[:20]))}"
                         f"{more}")
    return [by_id[i] for i in case_ids]


def load_me_ppl(name: str = "ME-PPL_50") -> list[str]:
    """ME-PPL sentences: ``ME-PPL`` (10k), ``ME-PPL_1k`` or ``ME-PPL_50``."""
    return [r["Text"] for r in json.loads(data_file(f"me_ppl/{name}.json").read_text())]


def load_wikitext() -> list[str]:
    """WikiText-2 raw test split, one non-empty paragraph per item (headings included)."""
    lines = data_file("corpus/wikitext2_raw_test.txt").read_text().splitlines()
    return [line.strip() for line in lines if line.strip()]


def bucket(length: int, multiple: int = 16) -> int:
    """Round a length up so that jit sees few distinct shapes."""
    return max(multiple, -(-length // multiple) * multiple)


def pad_batch(seqs: list[list[int]], pad_id: int, side: str = "right",
              length: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Pad token lists to ``[B, T]`` (T = ``length`` or the bucketed longest).

    Returns (input_ids int32 [B, T], attention_mask int32 [B, T]).
    """
    if side not in ("left", "right"):
        raise ValueError(f"side: {side!r} is not 'left' or 'right'")
    width = length or bucket(max(len(s) for s in seqs))
    ids = np.full((len(seqs), width), pad_id, np.int32)
    mask = np.zeros((len(seqs), width), np.int32)
    for row, seq in enumerate(seqs):
        if len(seq) > width:
            raise ValueError(f"sequence of {len(seq)} tokens is longer than {width}")
        cols = slice(0, len(seq)) if side == "right" else slice(width - len(seq), width)
        ids[row, cols] = seq
        mask[row, cols] = 1
    return ids, mask
