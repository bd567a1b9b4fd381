"""Data sets (found locally, shipped with the embedded default, or downloaded and verified) and
padded token batches.

A data file is named by its path under a data folder (``counterfact.json``,
``me_ppl/ME-PPL_50.json``, ...) and looked up, in this order, in

1. ``$ROME_JAX_DATA``;
2. ``../shared/data`` beside a source checkout;
3. the user cache ``$ROME_JAX_CACHE/data`` (default ``~/.cache/rome_jax/data``);
4. the embedded default model's ``data/`` folder (``EMBEDDED``): ``me_ppl/ME-PPL_50.json``, a
   byte-identical copy of the pinned original, for any caller; and a CounterFact subset (the
   records the default model was trained and held out on, and its guard profile's), used only
   by ``counterfact_cases`` for case ids it holds when no folder above has ``counterfact.json``,
   so it never stands in for the full data set;
5. a download from the file's original URLs (or ``$ROME_JAX_DATA_URL``, a mirror of the
   original files) into the user cache, atomically, kept only if its sha256 is the one pinned in
   ``SOURCES``, or, for a file whose original hash is not known (zsRE), if it parses with the
   expected schema: its sha256 is then recorded beside it on first use, printed, and checked at
   every later use.

Local files of known subsets (``KNOWN``) are named as such by ``describe``. Files are read,
never unpickled.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import http.client
import json
import os
import sys
import tempfile
import urllib.request
import zipfile
from pathlib import Path
from typing import Callable

import numpy as np
from tqdm import tqdm

from rome_jax.hf import DEFAULT_MODEL

CHECKOUT = Path(__file__).resolve().parent.parent  # the repository root, in a source checkout
EMBEDDED = DEFAULT_MODEL / "data"  # data shipped with the embedded default model
EMBEDDED_COUNTERFACT = "counterfact.json.gz"  # its CounterFact subset, under EMBEDDED


def _json_records(keys: tuple[str, ...]) -> Callable[[Path], None]:
    """A schema check: the file is a non-empty JSON list of objects that all have ``keys``."""

    def check(path: Path) -> None:
        try:
            records = json.loads(path.read_bytes())
        except (ValueError, UnicodeDecodeError) as err:
            raise ValueError(f"not JSON ({err})") from None
        if not isinstance(records, list) or not records:
            raise ValueError("not a non-empty JSON list")
        for i, record in enumerate(records):
            missing = [k for k in keys if not isinstance(record, dict) or k not in record]
            if missing:
                raise ValueError(f"record {i} lacks {', '.join(missing)}")

    return check


@dataclasses.dataclass(frozen=True)
class Source:
    """Where a data file comes from: ``urls``, tried in order, serve bytes whose sha256 is
    ``sha256``. ``sha256`` None: the original's hash is not known here, so the first download
    is kept if ``schema`` accepts it (trust on first use: its sha256 is recorded beside it and
    checked at every later use). With ``member``, the bytes are a zip archive and the data file
    is that member's non-blank lines (kept byte for byte)."""

    urls: tuple[str, ...]
    sha256: str | None
    member: str | None = None
    schema: Callable[[Path], None] | None = None

    @property
    def url(self) -> str:
        return self.urls[0]


_ME_PPL = ("https://raw.githubusercontent.com/WanliYoung/Collapse-in-Model-Editing/"
           "ba8122e46ce31d3518a44e942540179cc7531f15/data/ME-PPL/")
ZSRE_KEYS = ("subject", "src", "rephrase", "alt", "answers", "loc", "loc_ans")
SOURCES = {
    # All 21,919 records; the second URL is the git-lfs object of scalable-model-editing/
    # rebuilding-rome's data/counterfact.json at commit 01d0c9f (its pointer names this sha256
    # and 45,108,470 bytes).
    "counterfact.json": Source(
        ("https://rome.baulab.info/data/dsets/counterfact.json",
         "https://media.githubusercontent.com/media/scalable-model-editing/rebuilding-rome/"
         "01d0c9f74f8effc6dc1c60ba77760722206d9a79/data/counterfact.json"),
        "d017056125178a13728594e66a801357a8db9ed7973a7425554bb4271de9fc6f"),
    "zsre_eval.json": Source(
        ("https://rome.baulab.info/data/dsets/zsre_mem_eval.json",), None,
        schema=_json_records(ZSRE_KEYS)),
    "me_ppl/ME-PPL.json": Source(
        (_ME_PPL + "ME-PPL.json",),
        "c09b3d8191ffad954bf3b5e96dac84a7caf83d57c15e262b1d81ef6590742fb4"),
    "me_ppl/ME-PPL_1k.json": Source(
        (_ME_PPL + "ME-PPL_1k.json",),
        "71e29fc5daf443b35ec16c8a9e91e1f4398b5b84ca7c25393639c066b65b5afb"),
    "me_ppl/ME-PPL_50.json": Source(
        (_ME_PPL + "ME-PPL_50.json",),
        "55f3b951d2c4287b90d9e511f256efb9d47461f0da408a17dac5ffcef685c4e4"),
    # The Salesforce release (s3://research.metamind.io, no longer served), as llama.cpp mirrors it.
    "corpus/wikitext2_raw_test.txt": Source(
        ("https://huggingface.co/datasets/ggml-org/ci/resolve/main/wikitext-2-raw-v1.zip",),
        "ef7edb566e3e2b2d31b29c1fdb0c89a4cc683597484c3dc2517919c615435a11",
        member="wikitext-2-raw/wiki.test.raw"),
}
# Local copies that are known subsets of a data set (sha256 -> what they are): ../shared/data's
# CounterFact, and the embedded default's (gunzipped).
KNOWN = {"counterfact.json": {
    "c72da2d8db4e194143402906e48016c7c53dba095be68721838727a2a3832a81":
        "subset: 17,000 of the 21,919 records"}}
TRUSTED = ".sha256"  # suffix of the hash recorded on a trust-on-first-use download


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


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def local_file(name: str) -> Path | None:
    """Data file ``name`` in the first data folder that holds it (``data_dirs``), else None. A
    trust-on-first-use download in the user cache is checked against its recorded sha256
    (ValueError when it changed)."""
    for folder in data_dirs():
        path = folder / name
        if path.is_file():
            if folder == cache_root() / "data" and name in SOURCES and \
                    SOURCES[name].sha256 is None:
                _verify_recorded(path)
            return path
    return None


def _verify_recorded(path: Path) -> None:
    record = path.with_name(path.name + TRUSTED)
    try:
        recorded = record.read_text().split()[0]
    except (OSError, IndexError):
        raise ValueError(f"{path}: no sha256 recorded beside it ({record.name}); delete it to "
                         "download it again") from None
    actual = sha256_file(path)
    if actual != recorded:
        raise ValueError(f"{path}: sha256 {actual} is not {recorded}, recorded when it was "
                         "downloaded; the file changed: delete it (and "
                         f"{record.name}) to download it again")


def data_file(name: str, base_url: str | None = None) -> Path:
    """The path of data file ``name``: the first data folder that holds it, else the embedded
    copy of a file shipped whole, else a download into the user cache (see ``download``)."""
    path = local_file(name)
    if path is not None:
        return path
    if (EMBEDDED / name).is_file():
        return EMBEDDED / name
    if name not in SOURCES:
        raise FileNotFoundError(f"{name}: data file missing (looked in "
                                f"{', '.join(map(str, data_dirs()))}); set ROME_JAX_DATA to the "
                                "folder that holds it")
    return download(name, cache_root() / "data", base_url)


def describe(path: Path, name: str | None = None) -> str:
    """``path``, and what it is when its sha256 is known: the pinned original, or a subset."""
    name = name or path.name
    known = KNOWN.get(name, {})
    source = SOURCES.get(name)
    if not known and (source is None or source.sha256 is None or source.member):
        return str(path)
    digest = sha256_file(path)
    if source is not None and digest == source.sha256:
        return f"{path} (the original, sha256 verified)"
    if digest in known:
        return f"{path} ({known[digest]})"
    return (f"{path} (a local copy, sha256 {digest[:16]}…: neither the original nor a known "
            "subset)")


def download(name: str, folder: Path, base_url: str | None = None,
             source: Source | None = None) -> Path:
    """Fetch data file ``name`` into ``folder / name`` and return that path.

    From ``source.urls`` (default ``SOURCES[name]``) in order until one serves the pinned file,
    or from ``<base_url>/<file name of the first url>`` (default ``$ROME_JAX_DATA_URL``). The
    bytes go to a temporary folder beside the target, which receives the file by a rename only
    when the download is complete and has the pinned sha256, or, for a source without a pin,
    passes its schema (its sha256 is then written to ``<name>.sha256`` first, and printed):
    ``OSError`` for failed or cut downloads, ``ValueError`` for a wrong hash or schema, and
    nothing is left behind either way.
    """
    source = source or SOURCES[name]
    base_url = base_url or os.environ.get("ROME_JAX_DATA_URL")
    urls = ([f"{base_url.rstrip('/')}/{source.url.rsplit('/', 1)[1]}"] if base_url
            else list(source.urls))
    target = Path(folder) / name
    target.parent.mkdir(parents=True, exist_ok=True)
    errors: list[Exception] = []
    for url in urls:
        with tempfile.TemporaryDirectory(dir=target.parent, prefix=f".{target.name}.") as tmp:
            fetched = Path(tmp) / "download"
            try:
                digest = _fetch(url, fetched, name)
                if source.sha256 is not None and digest != source.sha256:
                    raise ValueError(f"{url}: sha256 {digest} is not the pinned "
                                     f"{source.sha256} of {name}; the download was discarded")
                if source.member:
                    fetched = _nonblank_lines(fetched, source.member, Path(tmp) / "member")
                if source.sha256 is None:
                    _trust_on_first_use(name, url, fetched, digest, source, target)
            except (OSError, ValueError) as err:
                errors.append(err)
                continue
            os.replace(fetched, target)
            return target
    if len(errors) == 1:
        raise errors[0]
    kind = ValueError if any(isinstance(e, ValueError) for e in errors) else OSError
    raise kind("; ".join(str(e) for e in errors))


def _trust_on_first_use(name: str, url: str, fetched: Path, digest: str, source: Source,
                        target: Path) -> None:
    """Check ``source.schema`` on a download with no pinned hash, record its sha256 beside
    ``target`` (before the file itself is moved there) and print it."""
    if source.schema is not None:
        try:
            source.schema(fetched)
        except ValueError as err:
            raise ValueError(f"{url}: {name} does not have the expected schema ({err}); the "
                             "download was discarded") from None
    record = target.with_name(target.name + TRUSTED)
    with tempfile.NamedTemporaryFile("w", dir=target.parent, delete=False,
                                     prefix=f".{record.name}.") as out:
        out.write(f"{digest}  {url}\n")
    os.replace(out.name, record)
    print(f"{name}: downloaded from {url}, sha256 {digest} (no pinned hash is known: recorded "
          f"in {record} on this first use and checked at every later use)", file=sys.stderr)


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


def _embedded_counterfact() -> tuple[dict, ...]:
    path = EMBEDDED / EMBEDDED_COUNTERFACT
    return tuple(json.loads(gzip.decompress(path.read_bytes()))) if path.is_file() else ()


def counterfact_cases(case_ids) -> tuple[list[dict], str]:
    """The CounterFact records with these case ids, in the order given, and where they came
    from (``describe``): ``counterfact.json`` of a data folder; without one, the embedded
    default's subset when it holds every id; else a download of the full data set. ValueError
    as ``counterfact_by_case_id``."""
    path = local_file("counterfact.json")
    if path is None:
        embedded = _embedded_counterfact()
        ids = {r["case_id"] for r in embedded}
        if isinstance(case_ids, list) and case_ids and all(
                isinstance(i, int) and i in ids for i in case_ids):
            return (counterfact_by_case_id(list(embedded), case_ids),
                    f"{EMBEDDED / EMBEDDED_COUNTERFACT} (the embedded default model's subset: "
                    f"{len(embedded)} records)")
        path = data_file("counterfact.json")
    return (counterfact_by_case_id(json.loads(path.read_text()), case_ids),
            describe(path, "counterfact.json"))


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


# Corpora of key statistics read through the Hugging Face ``datasets`` library (streamed):
# name -> (dataset path, configuration, split). ROME's ``layer_stats`` reads the same two.
HF_CORPORA = {"wikitext-103": ("Salesforce/wikitext", "wikitext-103-raw-v1", "train"),
              "wikipedia": ("wikimedia/wikipedia", "20231101.en", "train")}


def stream_hf_texts(path: str, config: str | None = None, split: str = "train",
                    n: int | None = None) -> list[str]:
    """The first ``n`` (all when None) non-blank ``text`` fields of a Hugging Face dataset,
    streamed (``datasets.load_dataset(path, config, split=split, streaming=True)``), so only
    what is read is downloaded; ``path`` may be a local folder of data files. Needs the optional
    ``datasets`` package (``pip install 'rome_jax[corpora]'``)."""
    try:
        import datasets
    except ImportError:
        raise ValueError(f"corpus {path!r}: reading it needs the Hugging Face 'datasets' "
                         "package (pip install datasets, or 'rome_jax[corpora]')") from None
    try:
        rows = datasets.load_dataset(path, config, split=split, streaming=True)
        texts = []
        for row in rows:
            if n is not None and len(texts) >= n:
                break
            text = row.get("text") if isinstance(row, dict) else None
            if not isinstance(text, str):
                raise ValueError(f"a row without a 'text' string (fields: {sorted(row)})")
            if text.strip():
                texts.append(text.strip())
    except Exception as err:  # the library's many error types: one line naming the corpus
        raise ValueError(f"corpus {path!r} ({config or 'default'}, {split}): cannot be read "
                         f"({type(err).__name__}: {err})") from None
    return texts


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
