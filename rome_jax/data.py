"""Data sets (found locally, or downloaded from the original URLs) and padded token batches.

A data file is named by its path under a data folder (``counterfact.json``,
``me_ppl/ME-PPL_50.json``, ...) and looked up in ``$ROME_JAX_DATA``, then ``../shared/data``
beside a source checkout, then the user cache ``$ROME_JAX_CACHE/data`` (default
``~/.cache/rome_jax/data``). A file found nowhere is downloaded from its original URL (or from
``$ROME_JAX_DATA_URL``, a mirror of the original files) into the user cache, atomically, and
only if its sha256 is the one pinned in ``SOURCES``. Files are read, never unpickled.
"""

from __future__ import annotations

import dataclasses
import hashlib
import http.client
import json
import os
import tempfile
import urllib.request
import zipfile
from pathlib import Path
from typing import Callable

import numpy as np
from tqdm import tqdm

from rome_jax.hf import DEFAULT_MODEL

CHECKOUT = Path(__file__).resolve().parent.parent  # the repository root, in a source checkout


@dataclasses.dataclass(frozen=True)
class Source:
    """Where a data file comes from: ``url`` serves bytes whose sha256 is ``sha256``. With
    ``member``, those bytes are a zip archive and the data file is that member's non-blank
    lines (kept byte for byte)."""

    url: str
    sha256: str
    member: str | None = None


_ME_PPL = ("https://raw.githubusercontent.com/WanliYoung/Collapse-in-Model-Editing/"
           "ba8122e46ce31d3518a44e942540179cc7531f15/data/ME-PPL/")
SOURCES = {
    "counterfact.json": Source(
        "https://rome.baulab.info/data/dsets/counterfact.json",
        "c72da2d8db4e194143402906e48016c7c53dba095be68721838727a2a3832a81"),
    "zsre_eval.json": Source(
        "https://rome.baulab.info/data/dsets/zsre_mem_eval.json",
        "e6443926dbdb5a24a0aca67d12ee705a160f0959617d871bfb7018930a15c307"),
    "me_ppl/ME-PPL.json": Source(
        _ME_PPL + "ME-PPL.json",
        "c09b3d8191ffad954bf3b5e96dac84a7caf83d57c15e262b1d81ef6590742fb4"),
    "me_ppl/ME-PPL_1k.json": Source(
        _ME_PPL + "ME-PPL_1k.json",
        "71e29fc5daf443b35ec16c8a9e91e1f4398b5b84ca7c25393639c066b65b5afb"),
    "me_ppl/ME-PPL_50.json": Source(
        _ME_PPL + "ME-PPL_50.json",
        "55f3b951d2c4287b90d9e511f256efb9d47461f0da408a17dac5ffcef685c4e4"),
    # The Salesforce release (s3://research.metamind.io, no longer served), as llama.cpp mirrors it.
    "corpus/wikitext2_raw_test.txt": Source(
        "https://huggingface.co/datasets/ggml-org/ci/resolve/main/wikitext-2-raw-v1.zip",
        "ef7edb566e3e2b2d31b29c1fdb0c89a4cc683597484c3dc2517919c615435a11",
        member="wikitext-2-raw/wiki.test.raw"),
}


def cache_root() -> Path:
    """The user cache: ``$ROME_JAX_CACHE``, default ``~/.cache/rome_jax``; NotADirectoryError
    when it is a file, or lies below one."""
    root = Path(os.environ.get("ROME_JAX_CACHE") or Path.home() / ".cache" / "rome_jax"
                ).expanduser()
    existing = next(p for p in (root, *root.parents) if p.exists())
    if not existing.is_dir():
        raise NotADirectoryError(f"ROME_JAX_CACHE: the cache folder {root} cannot be made "
                                 f"({existing} is a file); set ROME_JAX_CACHE to a folder")
    return root


def data_dirs() -> list[Path]:
    """The folders searched for data files, in order (the user cache last)."""
    dirs = [Path(os.environ["ROME_JAX_DATA"]).expanduser()] if os.environ.get(
        "ROME_JAX_DATA") else []
    if (CHECKOUT / "pyproject.toml").is_file():
        dirs.append(CHECKOUT.parent / "shared" / "data")
    return [*dirs, cache_root() / "data"]


def tokenizer_dir() -> Path:
    """GPT-2's ``vocab.json`` and ``merges.txt``: ``tokenizer/gpt2`` beside a data folder that
    has them, else the embedded default model's (the same files)."""
    for folder in data_dirs():
        if (folder.parent / "tokenizer" / "gpt2" / "vocab.json").is_file():
            return folder.parent / "tokenizer" / "gpt2"
    return DEFAULT_MODEL


def data_file(name: str, base_url: str | None = None) -> Path:
    """The path of data file ``name``: the first data folder that holds it, else a download
    into the user cache (see ``download``)."""
    for folder in data_dirs():
        if (folder / name).is_file():
            return folder / name
    if name not in SOURCES:
        raise FileNotFoundError(f"{name}: data file missing (looked in "
                                f"{', '.join(map(str, data_dirs()))}); set ROME_JAX_DATA to the "
                                "folder that holds it")
    return download(name, cache_root() / "data", base_url)


def download(name: str, folder: Path, base_url: str | None = None,
             source: Source | None = None) -> Path:
    """Fetch data file ``name`` into ``folder / name`` and return that path.

    From ``source.url`` (default ``SOURCES[name]``), or from ``<base_url>/<file name of the
    url>`` (default ``$ROME_JAX_DATA_URL``). The bytes go to a temporary folder beside the
    target, which receives the file by a rename only when the download is complete and has the
    pinned sha256: ``OSError`` for a failed or cut download, ``ValueError`` for a wrong hash, and
    nothing is left behind either way.
    """
    source = source or SOURCES[name]
    base_url = base_url or os.environ.get("ROME_JAX_DATA_URL")
    url = f"{base_url.rstrip('/')}/{source.url.rsplit('/', 1)[1]}" if base_url else source.url
    target = Path(folder) / name
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=f".{target.name}.") as tmp:
        fetched = Path(tmp) / "download"
        digest = _fetch(url, fetched, name)
        if digest != source.sha256:
            raise ValueError(f"{url}: sha256 {digest} is not the pinned {source.sha256} of "
                             f"{name}; the download was discarded")
        if source.member:
            fetched = _nonblank_lines(fetched, source.member, Path(tmp) / "member")
        os.replace(fetched, target)
    return target


def _fetch(url: str, path: Path, name: str) -> str:
    """Stream ``url`` into ``path`` with a progress bar; the sha256 (hex) of what came."""
    digest, size = hashlib.sha256(), 0
    try:
        with urllib.request.urlopen(url, timeout=60) as response, open(path, "wb") as out:
            length = response.headers.get("Content-Length")
            expected = int(length) if length else None
            with tqdm(total=expected, unit="B", unit_scale=True,
                      desc=f"downloading {name}") as bar:
                while chunk := response.read(1 << 20):
                    out.write(chunk)
                    digest.update(chunk)
                    size += len(chunk)
                    bar.update(len(chunk))
    except (OSError, http.client.HTTPException) as err:
        raise OSError(f"{url}: download of {name} failed ({err or type(err).__name__})") from None
    if expected is not None and size != expected:
        raise OSError(f"{url}: download of {name} cut off after {size} of {expected} bytes")
    return digest.hexdigest()


def _nonblank_lines(archive: Path, member: str, out: Path) -> Path:
    """Write ``member`` of a zip ``archive`` without its blank lines to ``out``."""
    try:
        with zipfile.ZipFile(archive) as zipped, zipped.open(member) as lines, \
                open(out, "wb") as dest:
            dest.writelines(line for line in lines if line.strip())
    except (zipfile.BadZipFile, KeyError) as err:
        raise ValueError(f"{archive}: no {member} in the archive ({err})") from None
    return out


def _read_json(name: str) -> tuple[Path, object]:
    """Data file ``name`` (see ``data_file``) and its parsed JSON; ValueError naming the file
    when it is not UTF-8 JSON (a truncated download, say)."""
    path = data_file(name)
    try:
        return path, json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: not valid JSON, the file is truncated or corrupt "
                         f"({err})") from None


def _check_records(path: Path, data, checks: dict[str, Callable[[object], bool]],
                   what: dict[str, str]) -> list[dict]:
    """``data`` as a list of JSON objects whose fields pass ``checks`` (field -> predicate,
    described by ``what[field]``); ValueError naming the file, the record and the field."""
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a JSON list of records, got {type(data).__name__}")
    for i, record in enumerate(data):
        if not isinstance(record, dict):
            raise ValueError(f"{path}: record {i}: expected a JSON object, got "
                             f"{type(record).__name__}")
        for field, ok in checks.items():
            if field not in record:
                raise ValueError(f"{path}: record {i}: {field}: missing")
            if not ok(record[field]):
                raise ValueError(f"{path}: record {i}: {field}: expected {what[field]}, got "
                                 f"{json.dumps(record[field])[:80]}")
    return data


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_texts(x) -> bool:
    return isinstance(x, list) and all(isinstance(t, str) for t in x)


def _is_target(x) -> bool:
    return isinstance(x, dict) and isinstance(x.get("str"), str)


def _is_rewrite(x) -> bool:
    return (isinstance(x, dict) and isinstance(x.get("prompt"), str)
            and isinstance(x.get("subject"), str) and _is_target(x.get("target_new"))
            and _is_target(x.get("target_true")))


_PROMPTS = ("paraphrase_prompts", "neighborhood_prompts", "attribute_prompts",
            "generation_prompts")
_COUNTERFACT_CHECKS = {"case_id": _is_int, "requested_rewrite": _is_rewrite,
                       **{name: _is_texts for name in _PROMPTS}}
_COUNTERFACT_WHAT = {"case_id": "an integer",
                     "requested_rewrite": 'an object with string "prompt" and "subject" and '
                                          '{"str": ...} "target_new" and "target_true"',
                     **{name: "a list of strings" for name in _PROMPTS}}


def load_counterfact() -> list[dict]:
    """CounterFact records (ROME schema), sorted by case_id. ValueError naming the file, the
    record and the field for a file that is not JSON or a record without an integer
    ``case_id``, a ``requested_rewrite`` or the four prompt lists."""
    path, data = _read_json("counterfact.json")
    return _check_records(path, data, _COUNTERFACT_CHECKS, _COUNTERFACT_WHAT)


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


def load_zsre() -> list[dict]:
    """zsRE edit-evaluation records (``zsre_mem_eval`` schema: ``subject, src, pred, rephrase,
    alt, answers, loc, loc_ans, cond``), in file order: a record's index is its case id, as in
    ROME's ``MENDQADataset`` (``zsre_eval.zsre_record`` makes the edit request)."""
    path, data = _read_json("zsre_eval.json")
    return _check_records(path, data, {}, {})


def load_me_ppl(name: str = "ME-PPL_50") -> list[str]:
    """ME-PPL sentences: ``ME-PPL`` (10k), ``ME-PPL_1k`` or ``ME-PPL_50``."""
    path, data = _read_json(f"me_ppl/{name}.json")
    return [r["Text"] for r in _check_records(path, data, {"Text": lambda t: isinstance(t, str)},
                                              {"Text": "a string"})]


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
