"""Key statistics C = E[k kᵀ] over a text corpus, their .npz cache, and solves with C.

The second moment is streamed in one pass for every layer asked (``compute_layer_stats``: each
batch goes once through the blocks up to the top layer): per batch and layer, Σ k kᵀ over real
tokens is formed in float32 on the devices, each summing its own rows of the batch; every N
batches one reduction adds the per-device sums up and into the host's float64 running sums,
with the token count, and an orbax checkpoint of those lets a killed build resume; C is then
rounded to float32, as the cache stores it, so that a computed C and a cached one are the same.
The cache key names what C depends on: a fingerprint of the weights that produce the keys at the
layer (so an edit at that layer, which changes only its output projection, keeps the cache
valid), the layer, the corpus's name and content (a hash of the texts used), the sample count
and the start token. A cache that cannot be read, is of another format version or holds
non-finite values is rebuilt, never trusted. One cache file per layer, whichever pass built it.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import re
import shutil
from pathlib import Path
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from tqdm import tqdm

from rome_jax.data import (HF_CORPORA, bucket, cache_root, load_wikitext, local_file,
                           pad_batch, stream_hf_texts)
from rome_jax.files import atomic_file, file_locks, write_json_atomic
from rome_jax.hf import DEFAULT_MODEL
from rome_jax.models.config import ModelConfig
from rome_jax.models.model import Model, params_digest
from rome_jax.models.transformer import Params, block, embed, key_weights, make_context
from rome_jax.sharding import make_mesh, mesh_of, shard_params

STATS_FORMAT = 2  # of the cache file; 1 was an orbax float64 directory keyed by corpus name
# Batches between the reductions of a statistics pass (per-device float32 sums -> the host's
# float64 sums): few enough float32 additions, few enough host transfers of L x F x F.
REDUCE_EVERY = 16


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


@functools.partial(jax.jit, static_argnums=(1,))
def _embed(params: Params, config: ModelConfig, ids, mask) -> jax.Array:
    """The residual stream entering block 0: [B, T, D]."""
    return embed(params, config, ids, make_context(ids.shape, mask, params["wte"].dtype))


def _layer(params: Params, config: ModelConfig, layer, h, mask):
    """Block ``layer`` (traced: one compilation serves every layer) on h [B, T, D]."""
    ctx = make_context(h.shape[:2], mask, params["wte"].dtype)
    return block(jax.tree.map(lambda w: w[layer], params["blocks"]), config, h, ctx,
                 layer=layer)


@functools.partial(jax.jit, static_argnums=(1,))
def _block(params: Params, config: ModelConfig, layer, h, mask) -> jax.Array:
    """Block ``layer`` below the asked layers: h [B, T, D] -> h [B, T, D]."""
    return _layer(params, config, layer, h, mask).h


@functools.partial(jax.jit, static_argnums=(1,), donate_argnums=(5,))
def _block_moment(params: Params, config: ModelConfig, layer, h, mask, sums):
    """Block ``layer`` and its keys' second moment added to the per-device sums: (h [B, T, D],
    sums [N, F, F] + Σ k kᵀ of each device's B/N rows, products summed in float32 whatever
    the keys' dtype). The rows of device n are the n-th B/N, so with the batch sharded over
    N devices each sums its own rows, no communication."""
    out = _layer(params, config, layer, h, mask)
    h, keys = out.h, out.key
    keys = (keys * mask[..., None].astype(keys.dtype)).reshape(sums.shape[0], -1,
                                                                keys.shape[-1])
    return h, sums + jnp.einsum("ntf,ntg->nfg", keys, keys, preferred_element_type=sums.dtype)


def _pass(params: Params, config: ModelConfig, layers: list[int], ids, mask,
          sums: list[jax.Array]) -> list[jax.Array]:
    """One batch through blocks 0..max(layers): ``sums`` (per layer, [N, F, F]) + its keys'
    per-device moments at each of ``layers`` (ascending)."""
    h = _embed(params, config, ids, mask)
    sums = list(sums)
    for layer in range(layers[-1] + 1):
        if layer in layers:
            slot = layers.index(layer)
            h, sums[slot] = _block_moment(params, config, layer, h, mask, sums[slot])
        else:
            h = _block(params, config, layer, h, mask)
    return sums


@dataclasses.dataclass(frozen=True)
class Checkpoints:
    """Where and how often a statistics build saves its running sums: every ``every`` batches
    (a multiple of the build's reduction interval) into ``work_dir`` (orbax), resumed from
    there by the next build of the same statistics."""

    work_dir: Path
    every: int = 256

    def __post_init__(self):
        if not isinstance(self.every, int) or self.every < 1:
            raise ValueError(f"checkpoint every: must be a positive number of batches, got "
                             f"{self.every!r}")


def data_mesh(mesh: Mesh | None = None, params: Params | None = None) -> Mesh:
    """``mesh`` (it must have a ``data`` axis), else the mesh ``params`` lie on, else every
    device on the data axis (``sharding.make_mesh``)."""
    if mesh is None:
        return mesh_of(params) or make_mesh()
    if "data" not in mesh.axis_names:
        raise ValueError(f"mesh: key statistics split batches over a 'data' axis; this mesh "
                         f"has {mesh.axis_names}")
    return mesh


def token_batches(model: Model, texts: list[str], n_samples: int | None, batch_size: int,
                  corpus: str) -> tuple[list[list[np.ndarray]], int]:
    """The batches ``compute_layer_stats`` reads ``texts`` in, and how many texts they hold.

    Each batch is a list of up to ``batch_size`` int32 token arrays ``[T_i]`` (unpadded): each
    text read after the start token (if any; a text of the start token alone is dropped) and
    cut to the model's context (``T_i <= n_positions``), the first ``n_samples`` (None: all),
    sorted by length (similar lengths share a batch: little padding, few shapes). Encoded
    1,024 texts at a time, so long documents are never all held whole. ValueError naming
    ``corpus`` when no text is left."""
    n_start = len(model.tokenizer.start_ids)  # a text of the start token alone is no sample
    seqs: list[np.ndarray] = []
    for start in range(0, len(texts), 1024):
        seqs += [np.asarray(s[:model.config.n_positions], np.int32) for s in
                 model.tokenizer.encode_sequences(list(texts[start:start + 1024]))
                 if len(s) > n_start]
    seqs = seqs[:n_samples]
    if not seqs:
        raise ValueError(f"corpus {corpus!r}: no text to compute key statistics from")
    seqs.sort(key=len)
    return [seqs[i:i + batch_size] for i in range(0, len(seqs), batch_size)], len(seqs)


@jax.jit
def _reduce(sums: jax.Array) -> jax.Array:
    """The per-device sums [N, F, F] added over the devices (one all-reduce): [F, F]."""
    return sums.sum(0)


def _resume(checkpoints: Checkpoints | None, settings: dict, shape: tuple[int, ...], log):
    """(manager or None, first batch, float64 sums, token count): from the latest checkpoint
    of a build with these ``settings``; a work folder of other settings is cleared."""
    total, count = np.zeros(shape, np.float64), 0
    if checkpoints is None:
        return None, 0, total, count
    work = Path(checkpoints.work_dir)
    recorded = work / "settings.json"
    if work.exists() and (not recorded.is_file() or _read_settings(recorded) != settings):
        if log:
            log(f"{work}: checkpoints of another build (other texts, layers or settings); "
                "starting afresh")
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    write_json_atomic(recorded, settings)
    manager = ocp.CheckpointManager(work / "sums",
                                    options=ocp.CheckpointManagerOptions(max_to_keep=1))
    step = manager.latest_step()
    if step is None:
        return manager, 0, total, count
    saved = manager.restore(step, args=ocp.args.StandardRestore(
        {"total": total, "count": np.zeros((), np.int64)}))
    if log:
        log(f"resuming key statistics at batch {step} of {settings['batches']} from {work}")
    return manager, step, np.asarray(saved["total"], np.float64), int(saved["count"])


def _read_settings(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def compute_layer_stats(model: Model, layers: Sequence[int], texts: list[str],
                        corpus: str = "custom", n_samples: int | None = None,
                        batch_size: int = 16, params: Params | None = None,
                        mesh: Mesh | None = None, reduce_every: int = REDUCE_EVERY,
                        checkpoints: Checkpoints | None = None,
                        log=None) -> dict[int, KeyStats]:
    """C at each of ``layers`` in one pass over ``texts``: {layer: KeyStats}.

    Each batch (``batch_size`` texts, see ``token_batches``) goes once through the blocks up
    to the top layer; at each asked layer l the keys' Σ k kᵀ [F, F] over real tokens is added,
    in float32 on the device, to per-device sums [N, F, F], the batch's rows split over the N
    devices of ``mesh``'s ``data`` axis (default: all devices). Every ``reduce_every`` batches
    (and at the end) one reduction adds the per-device sums over the devices (float32) and
    those to the host's running sums (float64); ``checkpoints`` (if given; its interval a
    multiple of ``reduce_every``) saves those and the token count with orbax, and a build of
    the same statistics started after a kill resumes there and gives the same C, bit for bit,
    as one never stopped (the reductions fall on the same batches). C = sum / count, rounded
    to float32. Its last bits depend on the device count, ``batch_size`` and
    ``reduce_every`` (the order of the float32 sums), not on the checkpoints nor on the
    layers asked with it: layer l's C is the same from a pass over a window as from a pass
    for l alone. A progress bar shows tokens/s and the time left.
    Precision: the forward in the params' dtype, the moments in float32, their sum in float64.
    """
    params = model.params if params is None else params
    layers = sorted(set(int(layer) for layer in layers))
    if not layers:
        raise ValueError("layers: give at least one layer for key statistics")
    for layer in layers:
        model.config.check_layer(layer)
    if not isinstance(reduce_every, int) or reduce_every < 1:
        raise ValueError(f"reduce every: must be a positive number of batches, got "
                         f"{reduce_every!r}")
    if checkpoints is not None and checkpoints.every % reduce_every:
        raise ValueError(f"checkpoint every: {checkpoints.every} batches is not a multiple of "
                         f"the reduction interval, {reduce_every} batches")
    mesh = data_mesh(mesh, params)
    n_dev = mesh.shape["data"]
    batches, n_texts = token_batches(model, texts, n_samples, batch_size, corpus)
    f = model.config.d_mlp
    digest = hashlib.sha256()
    for seq in (seq for chunk in batches for seq in chunk):
        digest.update(np.int64(len(seq)).tobytes() + seq.tobytes())
    settings = {"format": STATS_FORMAT, "tokens": digest.hexdigest(), "layers": layers,
                "batches": len(batches), "texts": n_texts, "batch_size": batch_size,
                "devices": n_dev, "reduce_every": reduce_every}
    manager, first, total, count = _resume(checkpoints, settings, (len(layers), f, f), log)
    rows = NamedSharding(mesh, PartitionSpec("data"))
    params = shard_params(params, mesh)  # by the rules: replicated without a model axis

    def zeros():
        return [jnp.zeros((n_dev, f, f), jnp.float32, device=rows) for _ in layers]

    sums = zeros()
    tokens = [sum(map(len, chunk)) for chunk in batches]
    bar = tqdm(total=sum(tokens), initial=sum(tokens[:first]), unit="tok", unit_scale=True,
               desc=f"key stats layer{'s' * (len(layers) > 1)} {','.join(map(str, layers))}",
               leave=False)
    for index in range(first, len(batches)):
        chunk = batches[index]
        ids, mask = pad_batch(chunk + [[]] * (-len(chunk) % n_dev),  # empty rows fill devices
                              model.tokenizer.pad_id, length=min(
                                  bucket(max(map(len, chunk)), 32), model.config.n_positions))
        sums = _pass(params, model.config, layers, jax.device_put(ids, rows),
                     jax.device_put(mask, rows), sums)
        count += tokens[index]
        bar.update(tokens[index])
        done = index + 1
        if done % reduce_every == 0 or done == len(batches):  # the one reduction
            total = total + np.stack([np.asarray(_reduce(s), np.float64) for s in sums])
            sums = zeros()
            if manager is not None and done % checkpoints.every == 0 and done < len(batches):
                manager.save(done, args=ocp.args.StandardSave(
                    {"total": total, "count": np.asarray(count, np.int64)}))
    bar.close()
    if manager is not None:
        manager.wait_until_finished()
        manager.close()
    return {layer: KeyStats((total[i] / count).astype(np.float32), count, layer, corpus,
                            n_texts) for i, layer in enumerate(layers)}


def compute_key_stats(model: Model, layer: int, texts: list[str], corpus: str = "custom",
                      n_samples: int | None = None, batch_size: int = 16,
                      params: Params | None = None) -> KeyStats:
    """C at one layer: ``compute_layer_stats`` of ``[layer]``, without checkpoints."""
    return compute_layer_stats(model, [layer], texts, corpus, n_samples, batch_size,
                               params)[layer]


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
    """``corpus``: ``"wikitext"`` (WikiText-2's test split, the default, local), a Hugging Face
    corpus read by the ``datasets`` library, streamed (``"wikitext-103"``, ``"wikipedia"``:
    ``data.HF_CORPORA``, or ``"hf:<path>[:<configuration>][@<split>]"``, split ``train`` by
    default, ``path`` a dataset's name or a local folder of data files; its ``text`` field), the
    path of a text file (one sample per non-empty line), or a name for ``texts``; keyed by the
    content of the first ``n_samples`` texts (all when None). WikiText is read (and hashed) when
    a data folder holds it; without one, all of it is keyed by ``WIKITEXT_DIGEST`` and
    downloaded only if a cache is built."""
    if texts is None and corpus == "wikitext":
        if n_samples is None and local_file("corpus/wikitext2_raw_test.txt") is None:
            return Corpus("wikitext", WIKITEXT_DIGEST, None)
        texts = load_wikitext()
    elif texts is None and (corpus in HF_CORPORA or corpus.startswith("hf:")):
        path, config, split = HF_CORPORA.get(corpus) or _hf_spec(corpus)
        texts = stream_hf_texts(path, config, split, n_samples)
        if corpus not in HF_CORPORA:  # a name fit for a file name; the digest keys the content
            corpus = "hf-" + re.sub(r"[^A-Za-z0-9._-]+", "_", corpus[3:]).strip("_.")[-48:]
    elif texts is None:
        file = Path(corpus)
        if not file.is_file():
            raise ValueError(f"corpus: {corpus!r} is neither 'wikitext', "
                             f"{', '.join(map(repr, HF_CORPORA))}, 'hf:<dataset>' nor a text "
                             "file; pass texts for other corpora")
        try:
            raw = file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as err:
            raise ValueError(f"corpus {file}: unreadable as UTF-8 text ({err})") from None
        texts = [line.strip() for line in raw.splitlines() if line.strip()]
        corpus = file.stem
    used = tuple(texts)[:n_samples]
    return Corpus(corpus, texts_digest(used), n_samples, used)


def _hf_spec(corpus: str) -> tuple[str, str | None, str]:
    """``hf:<path>[:<configuration>][@<split>]`` -> (path, configuration or None, split)."""
    spec, _, split = corpus[3:].partition("@")
    path, _, config = spec.partition(":")
    if not path:
        raise ValueError(f"corpus: {corpus!r} names no dataset; write "
                         "hf:<path>[:<configuration>][@<split>]")
    return path, config or None, split or "train"


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
    savers of one path serialise with ``files.file_lock(path)`` (``key_stats_layers`` does)."""
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


def key_stats_layers(model: Model, layers: Sequence[int], corpus: str | Corpus = "wikitext",
                     texts: list[str] | None = None, n_samples: int | None = None,
                     cache_dir: Path | None = None, log=None, shipped: bool = True,
                     mesh: Mesh | None = None, reduce_every: int = REDUCE_EVERY,
                     checkpoint_every: int = 256) -> dict[int, KeyStats]:
    """Cached C for ``model`` at each of ``layers`` over ``corpus`` (see ``resolve_corpus``, or
    a ``Corpus`` it made, so a streamed corpus is read once): {layer: KeyStats}, one cache file
    per layer (``cache_path``).

    Cache hits (in ``cache_dir``, default the user cache, else the shipped caches of the
    embedded default, unless not ``shipped``) are returned as stored; the missing or unreadable
    ones are computed in one pass (``compute_layer_stats``, up to the highest of them) and
    saved in ``cache_dir``, with lines to ``log`` (called only then). The pass (over ``mesh``,
    reducing every ``reduce_every`` batches) checkpoints every ``checkpoint_every`` batches in
    ``.<name>.work/`` beside the caches, resumed by the next build of the same layers after a
    kill and removed when the caches are written.
    Concurrent callers (threads or processes) build each cache once: a builder holds the locks
    of its missing caches (``files.file_locks``), and the others wait, then load them.
    """
    source = corpus if isinstance(corpus, Corpus) else resolve_corpus(corpus, texts, n_samples)
    layers = sorted(set(int(layer) for layer in layers))
    found: dict[int, KeyStats] = {}
    errors: list[ValueError] = []

    def load(todo) -> list[int]:  # the layers still missing
        for layer in todo:
            _, stats, failed = find_key_stats(model, layer, source, cache_dir, shipped)
            errors.extend(failed)
            if stats is not None:
                found[layer] = stats
        return [layer for layer in todo if layer not in found]

    missing = load(layers)
    if not missing:
        return found
    paths = {layer: cache_path(model, layer, source, cache_dir) for layer in missing}
    with file_locks(list(paths.values())):
        errors.clear()
        missing = load(missing)
        if missing:
            top = paths[missing[-1]]
            work = top.parent / (f".{top.stem}-with-{'-'.join(map(str, missing))}.work"
                                 if len(missing) > 1 else f".{top.stem}.work")
            for err in errors if log else ():
                log(f"{err}; rebuilding")
            if log:
                log(f"computing key statistics at layer{'s' * (len(missing) > 1)} "
                    f"{', '.join(map(str, missing))} -> {top.parent}")
            try:
                built = compute_layer_stats(model, missing, source.texts_used(), source.name,
                                            mesh=mesh, reduce_every=reduce_every, log=log,
                                            checkpoints=Checkpoints(work, checkpoint_every))
            except ValueError:  # a refused result (not finite): nothing worth resuming
                shutil.rmtree(work, ignore_errors=True)
                raise
            for layer, stats in built.items():
                save_key_stats(stats, paths[layer])
            shutil.rmtree(work, ignore_errors=True)
            found.update(built)
    return {layer: found[layer] for layer in layers}


def key_stats(model: Model, layer: int, corpus: str = "wikitext",
              texts: list[str] | None = None, n_samples: int | None = None,
              cache_dir: Path | None = None, log=None, shipped: bool = True) -> KeyStats:
    """Cached C for ``model`` at ``layer`` over ``corpus``: ``key_stats_layers`` of one layer.

    A cache hit is returned as stored; a missing or unreadable cache is (re)computed and saved
    in ``cache_dir``, with a line to ``log`` (called only then). Concurrent callers for one
    cache build it once: the others wait for the lock, then load it.
    """
    return key_stats_layers(model, [layer], corpus, texts, n_samples, cache_dir, log,
                            shipped)[layer]
