"""Key statistics C = E[k kᵀ] over a text corpus, their .npz cache, and solves with C.

The second moment is streamed: per batch, Σ k kᵀ over real tokens is formed on the device in
float32, and the batches are summed on the host in float64, with the token count; C is then
rounded to float32, as the cache stores it, so that a computed C and a cached one are the same.
The cache key names what C depends on: a fingerprint of the weights that produce the keys at the
layer (so an edit at that layer, which changes only its output projection, keeps the cache
valid), the layer, the corpus's name and content (a hash of the texts used), the sample count
and the start token. A cache that cannot be read, is of another format version or holds
non-finite values is rebuilt, never trusted.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
from pathlib import Path
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from rome_jax.data import bucket, cache_root, load_wikitext, local_file, pad_batch
from rome_jax.files import atomic_file, build_once
from rome_jax.hf import DEFAULT_MODEL
from rome_jax.models.config import ModelConfig
from rome_jax.models.model import Model, params_digest
from rome_jax.models.transformer import Params, key_weights, mlp_key

STATS_FORMAT = 2  # of the cache file; 1 was an orbax float64 directory keyed by corpus name


@dataclasses.dataclass(frozen=True, eq=False)
class KeyStats:
    """moment [F, F] = Σ k kᵀ / count over ``count`` tokens of ``n_texts`` texts of ``corpus``
    at ``layer`` (float32 when computed or cached; ``factor`` works in float64)."""

    moment: np.ndarray
    count: int
    layer: int
    corpus: str
    n_texts: int = 1

    def __post_init__(self):
        moment = np.asarray(self.moment)
        if (moment.ndim != 2 or moment.shape[0] != moment.shape[1] or self.count <= 0
                or self.n_texts <= 0 or self.layer < 0):
            raise ValueError(f"key statistics at layer {self.layer}: need a square moment, "
                             f"a positive count and text count, got shape {moment.shape}, count "
                             f"{self.count}, {self.n_texts} texts")
        if not np.isfinite(moment).all():
            raise ValueError(f"key statistics at layer {self.layer} are not finite (the model "
                             "has non-finite weights or overflows on the corpus)")

    def factor(self, ridge: float = 0.0) -> jax.Array:
        """Lower Cholesky factor of C + ridge·I (float32 [F, F]); solves never form C⁻¹."""
        c = np.asarray(self.moment, np.float64) + ridge * np.eye(len(self.moment))
        try:
            return jnp.asarray(np.linalg.cholesky(c), jnp.float32)
        except np.linalg.LinAlgError:
            raise ValueError(f"key statistics at layer {self.layer} are not positive definite "
                             f"({self.count} tokens); use more samples or a ridge > 0") from None


def solve(factor: jax.Array, k: jax.Array) -> jax.Array:
    """C⁻¹ k from the Cholesky factor L of C (C = L Lᵀ): two triangular solves. k [..., F]."""
    y = jax.scipy.linalg.solve_triangular(factor, k.T, lower=True)
    return jax.scipy.linalg.solve_triangular(factor.T, y, lower=False).T


@functools.partial(jax.jit, static_argnums=(1, 4))
def _batch_moment(params: Params, config: ModelConfig, ids, mask, layer: int):
    keys = mlp_key(params, config, ids, mask, layer) * mask[..., None]
    return jnp.einsum("btf,btg->fg", keys, keys)


def compute_key_stats(model: Model, layer: int, texts: list[str], corpus: str = "custom",
                      n_samples: int | None = None, batch_size: int = 16,
                      params: Params | None = None) -> KeyStats:
    """Stream ``texts`` (each one sample, read after the tokenizer's start token if any, which
    is then one of its tokens, and cut to the model's context) through blocks ≤ layer."""
    params = model.params if params is None else params
    model.config.check_layer(layer)
    n_start = len(model.tokenizer.start_ids)  # a text of the start token alone is no sample
    seqs = [s[:model.config.n_positions] for s in model.tokenizer.encode_sequences(list(texts))
            if len(s) > n_start][:n_samples]
    if not seqs:
        raise ValueError(f"corpus {corpus!r}: no text to compute key statistics from")
    seqs.sort(key=len)  # similar lengths share a batch: little padding, few shapes
    total = np.zeros((model.config.d_mlp,) * 2, np.float64)
    count = 0
    for start in tqdm(range(0, len(seqs), batch_size), desc=f"key stats layer {layer}",
                      unit="batch", leave=False):
        chunk = seqs[start:start + batch_size]
        ids, mask = pad_batch(chunk, model.tokenizer.pad_id, length=min(
            bucket(max(map(len, chunk)), 32), model.config.n_positions))
        total += np.asarray(_batch_moment(params, model.config, ids, mask, layer), np.float64)
        count += int(mask.sum())
    return KeyStats((total / count).astype(np.float32), count, layer, corpus, len(seqs))


def fingerprint(params: Params, layer: int) -> str:
    """sha256 over every weight that influences the keys at ``layer``."""
    return params_digest(key_weights(params, layer))


def texts_digest(texts: Sequence[str]) -> str:
    """sha256 (hex) of a list of texts (as JSON): the corpus content that keys a cache."""
    return hashlib.sha256(json.dumps(list(texts), ensure_ascii=False).encode()).hexdigest()


# texts_digest(load_wikitext()): WikiText-2's test split as the pinned download derives it
# (tests/test_rome_stats.py checks it against the shared copy). It names the cache of all of
# WikiText without reading the file, so the embedded default's shipped statistics are found on
# a machine that has no WikiText.
WIKITEXT_DIGEST = "728f88341ae184cde24f7f5d2f9fd004b8975a889842a18f401f1177c972141c"


@dataclasses.dataclass(frozen=True)
class Corpus:
    """The texts of key statistics: ``name`` (``wikitext``, a file's stem, or the caller's),
    ``digest`` (``texts_digest`` of the texts used: the first ``n_samples``) and the texts
    themselves, or None for WikiText not read yet (``texts_used`` loads it)."""

    name: str
    digest: str
    n_samples: int | None
    texts: tuple[str, ...] | None = None

    def texts_used(self) -> list[str]:
        if self.texts is not None:
            return list(self.texts)
        texts = load_wikitext()[:self.n_samples]
        if texts_digest(texts) != self.digest:
            raise ValueError(f"corpus: WikiText read after the cache key was made differs from "
                             f"it ({texts_digest(texts)[:16]} != {self.digest[:16]})")
        return texts


def resolve_corpus(corpus: str, texts: Sequence[str] | None = None,
                   n_samples: int | None = None) -> Corpus:
    """``corpus``: ``"wikitext"`` (WikiText-2, the default), the path of a text file (one sample
    per non-empty line), or a name for ``texts``; keyed by the content of the first
    ``n_samples`` texts. WikiText is read (and hashed) when a data folder holds it; without
    one, all of it is keyed by ``WIKITEXT_DIGEST`` and downloaded only if a cache is built."""
    if texts is None and corpus == "wikitext":
        if n_samples is None and local_file("corpus/wikitext2_raw_test.txt") is None:
            return Corpus("wikitext", WIKITEXT_DIGEST, None)
        texts = load_wikitext()
    elif texts is None:
        file = Path(corpus)
        if not file.is_file():
            raise ValueError(f"corpus: {corpus!r} is neither 'wikitext' nor a text file; pass "
                             "texts for other corpora")
        try:
            raw = file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as err:
            raise ValueError(f"corpus {file}: unreadable as UTF-8 text ({err})") from None
        texts = [line.strip() for line in raw.splitlines() if line.strip()]
        corpus = file.stem
    used = tuple(texts)[:n_samples]
    return Corpus(corpus, texts_digest(used), n_samples, used)


def default_cache_dir() -> Path:
    """``$ROME_JAX_CACHE/stats`` (default ``~/.cache/rome_jax/stats``), never a model's folder:
    the cache key (``cache_path``) names the weights, so models share it safely."""
    return cache_root() / "stats"


def shipped_cache_dir() -> Path:
    """The caches shipped with the embedded default model (read-only; see ``key_stats``)."""
    return DEFAULT_MODEL / "cache"


def cache_path(model: Model, layer: int, corpus: Corpus, cache_dir: Path | None = None) -> Path:
    """The cache of C, ``<fingerprint>-layer<L>-<corpus>-<digest>-<samples>[-bos<id>].npz``:
    named by the weights' fingerprint, the layer, the corpus's name and content (the first 16
    hex digits of its digest), the sample count and the start token."""
    if not isinstance(corpus, Corpus):
        raise TypeError(f"corpus: expected a Corpus (resolve_corpus), got "
                        f"{type(corpus).__name__}")
    bos = model.tokenizer.bos_id
    name = (f"{fingerprint(model.params, layer)}-layer{layer}-{corpus.name}-"
            f"{corpus.digest[:16]}-{corpus.n_samples or 'all'}"
            + ("" if bos is None else f"-bos{bos}"))
    return (cache_dir or default_cache_dir()) / f"{name}.npz"


def save_key_stats(stats: KeyStats, path: Path) -> None:
    """Write an ``.npz`` (format ``STATS_FORMAT``; the moment in float32, as computed) to a
    temporary sibling renamed to ``path``, so a reader never sees half a cache. Concurrent
    savers of one path serialise with ``files.file_lock(path)`` (``key_stats`` does, through
    ``files.build_once``)."""
    if not np.isfinite(stats.moment).all():
        raise ValueError(f"key statistics at layer {stats.layer} are not finite")
    with atomic_file(path, suffix=".npz") as tmp:
        np.savez_compressed(tmp, format=np.int64(STATS_FORMAT),
                            moment=np.asarray(stats.moment, np.float32),
                            count=np.int64(stats.count), layer=np.int64(stats.layer),
                            n_texts=np.int64(stats.n_texts), corpus=np.str_(stats.corpus))


def load_key_stats(path: Path, layer: int | None = None, dim: int | None = None) -> KeyStats:
    """Read a cache written by ``save_key_stats`` (never unpickled); ValueError if it is missing,
    corrupt, of another format version, not finite, or (when given) not of ``layer`` and
    ``dim`` x ``dim``."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as saved:
            version = int(saved["format"]) if "format" in saved else None
            if version != STATS_FORMAT:
                raise ValueError(f"format {version}, not {STATS_FORMAT}")
            moment = saved["moment"]
            if moment.dtype != np.float32:
                raise TypeError(f"moment stored as {moment.dtype}, not float32")
            stats = KeyStats(moment, int(saved["count"]), int(saved["layer"]),
                             str(saved["corpus"]), int(saved["n_texts"]))
        if layer is not None and stats.layer != layer:
            raise ValueError(f"layer {stats.layer}, not {layer}")
        if dim is not None and stats.moment.shape != (dim, dim):
            raise ValueError(f"shape {stats.moment.shape}, not {(dim, dim)}")
    except Exception as err:
        raise ValueError(f"{path}: key statistics cache unreadable ({type(err).__name__}: "
                         f"{err})") from None
    return stats


def find_key_stats(model: Model, layer: int, corpus: Corpus, cache_dir: Path | None = None,
                   shipped: bool = True) -> tuple[Path, KeyStats | None, list[ValueError]]:
    """The statistics in the cache (``cache_path``) or, when it has none and ``shipped``, in
    the embedded default's shipped caches (the same name, so the same weights, layer and corpus
    content): (the path they were read from, or the cache path when none was; the statistics or
    None; the errors of unreadable ones)."""
    path = cache_path(model, layer, corpus, cache_dir)
    errors: list[ValueError] = []
    for candidate in (path, shipped_cache_dir() / path.name)[:2 if shipped else 1]:
        if candidate.exists():
            try:
                return candidate, load_key_stats(candidate, layer, model.config.d_mlp), errors
            except ValueError as err:
                errors.append(err)
    return path, None, errors


def key_stats(model: Model, layer: int, corpus: str = "wikitext",
              texts: list[str] | None = None, n_samples: int | None = None,
              cache_dir: Path | None = None, log=None, shipped: bool = True) -> KeyStats:
    """Cached C for ``model`` at ``layer`` over ``corpus`` (see ``resolve_corpus``).

    A cache hit (in ``cache_dir``, default the user cache, else the shipped caches of the
    embedded default, unless not ``shipped``) is returned as stored; a missing or unreadable
    cache is (re)computed and saved in ``cache_dir``, with a line to ``log`` (called only
    then). Concurrent callers (threads or processes) for one cache build it once: the others
    wait for the lock, then load it.
    """
    source = resolve_corpus(corpus, texts, n_samples)
    errors: list[ValueError] = []

    def load() -> KeyStats | None:
        _, found, failed = find_key_stats(model, layer, source, cache_dir, shipped)
        errors[:] = failed
        return found

    def build() -> KeyStats:  # the only caller of ``log``: a caller learns that it built
        if log and errors:
            log(f"{errors[-1]}; rebuilding")
        if log:
            log(f"computing key statistics at layer {layer} -> {path}")
        stats = compute_key_stats(model, layer, source.texts_used(), source.name)
        save_key_stats(stats, path)
        return stats

    path = cache_path(model, layer, source, cache_dir)
    return build_once(path, load, build)
