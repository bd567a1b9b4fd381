"""Key statistics C = E[k kᵀ] over a text corpus, their orbax cache, and solves with C.

The second moment is streamed: per batch, Σ k kᵀ over real tokens is formed on the device in
float32, and the batches are summed on the host in float64, with the token count. The cache key
names what C depends on: a fingerprint of the weights that produce the keys at the layer (so an
edit at that layer, which changes only its output projection, keeps the cache valid), the layer,
the corpus, the sample count and the start token. A cache that cannot be read is rebuilt, never
trusted.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from rome_jax.data import bucket, cache_root, load_wikitext, pad_batch
from rome_jax.files import atomic_directory, build_once
from rome_jax.models.config import ModelConfig
from rome_jax.models.model import Model, params_digest
from rome_jax.models.transformer import Params, key_weights, mlp_key


@dataclasses.dataclass(frozen=True, eq=False)
class KeyStats:
    """moment [F, F] float64 = Σ k kᵀ / count over ``count`` tokens of ``corpus`` at ``layer``."""

    moment: np.ndarray
    count: int
    layer: int
    corpus: str

    def __post_init__(self):
        moment = np.asarray(self.moment)
        if moment.ndim != 2 or moment.shape[0] != moment.shape[1] or self.count <= 0:
            raise ValueError(f"key statistics at layer {self.layer}: need a square moment and "
                             f"a positive count, got shape {moment.shape}, count {self.count}")
        if not np.isfinite(moment).all():
            raise ValueError(f"key statistics at layer {self.layer} are not finite (the model "
                             "has non-finite weights or overflows on the corpus)")

    def factor(self, ridge: float = 0.0) -> jax.Array:
        """Lower Cholesky factor of C + ridge·I (float32 [F, F]); solves never form C⁻¹."""
        c = self.moment + ridge * np.eye(len(self.moment))
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
    return KeyStats(total / count, count, layer, corpus)


def fingerprint(params: Params, layer: int) -> str:
    """sha256 over every weight that influences the keys at ``layer``."""
    return params_digest(key_weights(params, layer))


def default_cache_dir() -> Path:
    """``$ROME_JAX_CACHE/stats`` (default ``~/.cache/rome_jax/stats``), never a model's folder:
    the cache key (``cache_path``) names the weights, so models share it safely."""
    return cache_root() / "stats"


def cache_path(model: Model, layer: int, corpus: str, n_samples: int | None,
               cache_dir: Path | None = None) -> Path:
    """The cache of C: named by the weights' fingerprint, layer, corpus, sample count and the
    start token (``-bos<id>`` when the model reads one)."""
    bos = model.tokenizer.bos_id
    name = (f"{fingerprint(model.params, layer)}-layer{layer}-{corpus}-{n_samples or 'all'}"
            + ("" if bos is None else f"-bos{bos}"))
    return (cache_dir or default_cache_dir()) / name


def save_key_stats(stats: KeyStats, path: Path) -> None:
    """Write with orbax into a fresh temporary sibling that is renamed to ``path`` (replacing
    it), so that a reader never sees half a cache. Concurrent savers of one path serialise with
    ``files.file_lock(path)`` (as ``key_stats`` does through ``files.build_once``)."""
    import orbax.checkpoint as ocp

    tree = {"moment": np.asarray(stats.moment, np.float64),
            "count": np.array(stats.count, np.int64), "layer": np.array(stats.layer, np.int32)}

    def write(tmp: Path) -> None:
        with ocp.StandardCheckpointer() as checkpointer:  # force: tmp exists (and is empty)
            checkpointer.save(tmp, tree, force=True)
        (tmp / "corpus.txt").write_text(stats.corpus)

    atomic_directory(Path(path).resolve(), True, write)


def load_key_stats(path: Path) -> KeyStats:
    """Read a cache written by ``save_key_stats``; ValueError if it is missing or corrupt."""
    import orbax.checkpoint as ocp

    path = Path(path).resolve()
    try:
        with ocp.StandardCheckpointer() as checkpointer:
            tree = checkpointer.restore(path)
        moment = np.asarray(tree["moment"])
        if moment.dtype != np.float64:
            raise TypeError(f"moment stored as {moment.dtype}, not float64")
        stats = KeyStats(moment, int(tree["count"]), int(tree["layer"]),
                         (path / "corpus.txt").read_text())
    except Exception as err:
        raise ValueError(f"{path}: key statistics cache unreadable ({type(err).__name__}: "
                         f"{err})") from None
    return stats


def key_stats(model: Model, layer: int, corpus: str = "wikitext",
              texts: list[str] | None = None, n_samples: int | None = None,
              cache_dir: Path | None = None, log=None) -> KeyStats:
    """Cached C for ``model`` at ``layer`` over ``corpus``: ``"wikitext"`` (WikiText-2, the
    default), the path of a text file (one sample per non-empty line), or a name for ``texts``.

    A cache hit is returned as stored; a missing or unreadable cache is (re)computed and saved,
    with a line to ``log`` (called only then). Concurrent callers (threads or processes) for one
    cache build it once: the others wait for the lock, then load it.
    """
    if texts is None and corpus != "wikitext":
        file = Path(corpus)
        if not file.is_file():
            raise ValueError(f"corpus: {corpus!r} is neither 'wikitext' nor a text file; pass "
                             "texts for other corpora")
        raw = file.read_bytes()
        texts = [line.strip() for line in raw.decode("utf-8").splitlines() if line.strip()]
        corpus = f"{file.stem}-{hashlib.sha256(raw).hexdigest()[:12]}"
    path = cache_path(model, layer, corpus, n_samples, cache_dir)
    unreadable: list[ValueError] = []

    def load() -> KeyStats | None:
        if not path.exists():
            return None
        try:
            return load_key_stats(path)
        except ValueError as err:
            unreadable.append(err)
            return None

    def build() -> KeyStats:  # the only caller of ``log``: a caller learns that it built
        if log and unreadable:
            log(f"{unreadable[-1]}; rebuilding")
        if log:
            log(f"computing key statistics at layer {layer} -> {path}")
        stats = compute_key_stats(model, layer, load_wikitext() if texts is None else texts,
                                  corpus, n_samples)
        save_key_stats(stats, path)
        return stats

    return build_once(path, load, build)
