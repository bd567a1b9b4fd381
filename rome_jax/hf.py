"""Hugging Face directories <-> Model.

Reads ``config.json`` and weights from ``model.safetensors``, sharded safetensors with
``model.safetensors.index.json``, a Flax ``flax_model.msgpack`` (or its shards with
``flax_model.msgpack.index.json``; ``models/flax_checkpoint.py``), or ``pytorch_model.bin``
(only through ``torch.load(weights_only=True, mmap=True)``, only when torch is installed;
nothing else is unpickled), plus the tokenizer files. A hub id is fetched with
``huggingface_hub.snapshot_download``. Exports write ``config.json``, ``model.safetensors`` (or
``flax_model.msgpack``) and the tokenizer into a temporary directory that is renamed into place,
so an export is never half-written.

With a ``mesh`` (``rome_jax.sharding``), safetensors, GGUF, Flax msgpack and
``pytorch_model.bin`` weights are read one tensor at a time (a GGUF tensor dequantized as it is
read; a ``.bin`` older than torch's zip format read whole first), each placed on the mesh's
devices as it is read (split over the model axis), and the params placed by the sharding rules;
an export gathers and writes one tensor at a time.
"""

from __future__ import annotations

import json
import os
import pickle
import struct
import zipfile
from pathlib import Path
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from safetensors import safe_open

from rome_jax.files import atomic_directory, overlap
from rome_jax.models import flax_checkpoint, gguf
from rome_jax.models.config import ModelConfig
from rome_jax.models.model import FAMILIES, Model, check_model
from rome_jax.models.tokenizer import Tokenizer
from rome_jax.sharding import make_mesh, shard_params


def _default_model() -> Path:
    """The embedded default model: ``rome_jax/checkpoints/gpt2-cf-tiny`` where the wheel
    installs it (pyproject.toml maps the repository's ``checkpoints/`` there), else
    ``checkpoints/gpt2-cf-tiny`` at the top of the checkout (a source tree or an editable
    install, whose ``rome_jax`` is the checkout's)."""
    package = Path(__file__).resolve().parent
    for root in (package, package.parent):
        if (root / "checkpoints" / "gpt2-cf-tiny" / "config.json").is_file():
            return root / "checkpoints" / "gpt2-cf-tiny"
    return package.parent / "checkpoints" / "gpt2-cf-tiny"


DEFAULT_MODEL = _default_model()
EXPORT_FORMATS = ("safetensors", "flax")  # save_hf's format, edit's --format
GGUF_ALIASES = {"smollm2-135m": gguf.smollm2_path, "gemma3-270m": gguf.gemma3_path}


def _named(path_or_id: str | os.PathLike | None) -> tuple[str, Path]:
    """A model argument as text (``None``: $ROME_JAX_DEFAULT_MODEL, else the embedded default
    model) and the local path it names: itself, or the embedded default model for its name
    "gpt2-cf-tiny" where no local path has that name. The path need not exist (a hub id)."""
    if path_or_id is None:
        path_or_id = os.environ.get("ROME_JAX_DEFAULT_MODEL", DEFAULT_MODEL)
    text, path = str(path_or_id), Path(path_or_id).expanduser()
    if text == DEFAULT_MODEL.name and not path.exists():
        path = DEFAULT_MODEL
    return text, path


def local_source(path_or_id: str | os.PathLike | None) -> Path | None:
    """The local folder or file a model argument names (``None``: the default model), or None
    for a hub id or alias (nothing local to protect)."""
    text, path = _named(path_or_id)
    return path if text not in GGUF_ALIASES and path.exists() else None


def resolve(path_or_id: str | os.PathLike | None) -> Path:
    """A local directory, the embedded default model by its name "gpt2-cf-tiny" (where no
    local directory has that name), or a hub id downloaded to the HF cache (its config,
    tokenizer and safetensors weights; its Flax msgpack weights where it has no safetensors).
    ``None``: the default model ($ROME_JAX_DEFAULT_MODEL, else the embedded one)."""
    text, path = _named(path_or_id)
    if path.is_dir():
        return path
    if path.exists() or text.startswith((".", "/", "~")) or text.count("/") > 1:
        raise FileNotFoundError(f"{text}: no such model directory")
    from huggingface_hub import snapshot_download

    try:
        for weights in (["*.safetensors", "*.safetensors.index.json"],
                        ["flax_model*.msgpack", flax_checkpoint.INDEX]):
            snapshot = Path(snapshot_download(text, allow_patterns=[
                "config.json", "tokenizer.json", "vocab.json", "merges.txt", *weights]))
            if any(snapshot.glob(weights[0])):
                break
        return snapshot
    except Exception as err:
        raise FileNotFoundError(f"{text}: not a local directory, and the hub download failed "
                                f"({type(err).__name__}: {err})") from None


def _read_config(path: Path) -> ModelConfig:
    file = path / "config.json"
    if not file.is_file():
        raise FileNotFoundError(f"{file}: missing (every model directory needs config.json)")
    try:
        hf = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{file}: not valid JSON ({err})") from None
    return ModelConfig.from_hf(hf, source=str(file))


def _weight_files(path: Path) -> tuple[list[Path], Path]:
    """The weight files of the directory ``path``, and the file errors name (the index of
    shards); the first of safetensors (sharded or not), Flax msgpack (sharded or not) and
    ``pytorch_model.bin`` that is there."""
    for index, single in (("model.safetensors.index.json", "model.safetensors"),
                          (flax_checkpoint.INDEX, flax_checkpoint.FILE)):
        if (path / index).is_file():
            return _shards(path / index), path / index
        if (path / single).is_file():
            return [path / single], path / single
    if (path / "pytorch_model.bin").is_file():
        return [path / "pytorch_model.bin"], path / "pytorch_model.bin"
    raise FileNotFoundError(f"{path}: no weights (model.safetensors, "
                            "model.safetensors.index.json, flax_model.msgpack, "
                            "flax_model.msgpack.index.json or pytorch_model.bin)")


def _shards(index: Path) -> list[Path]:
    """The files an index of shards (safetensors' or Flax's: the same JSON) names."""
    try:
        parsed = json.loads(index.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{index}: not an index of shards ({err})") from None
    weight_map = parsed.get("weight_map") if isinstance(parsed, dict) else None
    if not isinstance(weight_map, dict) or not all(
            isinstance(name, str) and name and Path(name).name == name
            for name in weight_map.values()):
        raise ValueError(f"{index}: weight_map must be a JSON object of tensor name -> "
                         "file name in this directory")
    return [index.parent / name for name in sorted(set(weight_map.values()))]


def _tensor_readers(files: list[Path], family) -> tuple[dict[str, Callable[[], np.ndarray]],
                                                        dict[str, str]]:
    """HF name (``transformer.`` prefix stripped) -> loader, lazy per tensor except in a pre-zip
    ``pytorch_model.bin`` (decoded whole); and HF name -> Flax key of the tensors read from
    msgpack files."""
    readers: dict[str, Callable[[], np.ndarray]] = {}
    flax_keys: dict[str, str] = {}
    for file in files:
        if not file.is_file():
            raise FileNotFoundError(f"{file}: weight file missing")
        if file.suffix == ".msgpack":
            for name, (key, load) in flax_checkpoint.read(file, family).items():
                readers[name.removeprefix("transformer.")] = load
                flax_keys[name.removeprefix("transformer.")] = key
            continue
        if file.suffix == ".bin":
            try:
                import torch
            except ImportError:
                raise ValueError(f"{file}: pytorch_model.bin needs torch installed "
                                 "(or convert the model to safetensors)") from None
            try:
                # mmap: the file is mapped, each tensor's bytes paged in when its reader
                # converts it. torch maps only the zip format (torch.save's since torch 1.6);
                # an older file is read whole.
                state = torch.load(file, map_location="cpu", weights_only=True,
                                   mmap=zipfile.is_zipfile(file))
            except pickle.UnpicklingError:
                state = None
            except Exception as err:
                raise ValueError(f"{file}: cannot read ({type(err).__name__}: "
                                 f"{str(err).splitlines()[0]})") from None
            if not isinstance(state, dict) or not all(
                    isinstance(t, torch.Tensor) for t in state.values()):
                raise ValueError(f"{file}: holds objects other than tensors (a pickle can run "
                                 "code when loaded); rome_jax never unpickles them. Convert the "
                                 "weights to safetensors with a tool you trust")
            for name, tensor in state.items():
                readers[name.removeprefix("transformer.")] = lambda t=tensor: _numpy(t)
            continue
        try:
            handle = safe_open(str(file), framework="flax")
            names = list(handle.keys())
        except Exception as err:
            raise ValueError(f"{file}: not a readable safetensors file, truncated or corrupt "
                             f"({type(err).__name__}: {err})") from None
        for name in names:
            readers[name.removeprefix("transformer.")] = (
                lambda h=handle, n=name, f=file: _get(h, n, f))
    return readers, flax_keys


def _numpy(tensor) -> np.ndarray:
    """A torch tensor as numpy in its own dtype (bfloat16 through its bits)."""
    import torch

    if tensor.dtype == torch.bfloat16:
        return tensor.view(torch.int16).numpy().view(jnp.bfloat16)
    return tensor.numpy()


def _get(handle, name: str, file: Path):
    try:
        return handle.get_tensor(name)
    except Exception as err:
        raise ValueError(f"{file}: tensor {name!r} cannot be read, the file is truncated or "
                         f"corrupt ({type(err).__name__}: {err})") from None


def load_model(path_or_id: str | os.PathLike | None = None, dtype=jnp.float32,
               mesh: str | Mesh | dict | None = None) -> Model:
    """Load an HF GPT-2 / GPT-J / Llama directory or hub id (``None``: the embedded default
    model, also named "gpt2-cf-tiny"), or a ``*.gguf`` file / GGUF alias (``GGUF_ALIASES``:
    "smollm2-135m", "gemma3-270m").

    Computation is in ``dtype``; the dtype the floating weights are stored in is kept as
    ``Model.source_dtype`` (the widest when they differ), which ``save_hf`` exports by default.
    ``mesh`` (``"data=D,model=M"``, a mapping or a ``sharding.make_mesh`` Mesh) places the
    params on the devices by ``sharding.RULES`` as they are read; None (the default) leaves
    them unplaced, as on one device (every device on the data axis).
    Raises FileNotFoundError / ValueError naming the file and tensor for a missing config or
    weights, an unknown architecture, a missing tensor, a wrong shape, a non-finite value or a
    truncated file.
    """
    if path_or_id is not None and not isinstance(path_or_id, (str, os.PathLike)):
        raise TypeError(f"load_model: path_or_id must be a path, hub id or GGUF alias (str or "
                        f"os.PathLike) or None, got {type(path_or_id).__name__}")
    mesh = None if mesh is None else make_mesh(mesh)
    if str(path_or_id) in GGUF_ALIASES or Path(str(path_or_id)).suffix == ".gguf":
        return _load_gguf(path_or_id, dtype, mesh)
    path = resolve(path_or_id)
    config = _read_config(path)
    tokenizer = Tokenizer.from_dir(path, config.token_ids)
    source = "tokenizer.json" if "tokenizer.json" in tokenizer.files else "vocab.json"
    _check_vocab(tokenizer, config, f"{path / source} and {path / 'config.json'}")
    files, where = _weight_files(path)
    family = FAMILIES[config.model_type]
    readers, flax_keys = _tensor_readers(files, family)
    label = _flax_label(flax_keys, family) if flax_keys else None
    params, source_dtype = _import_params(config, readers, where, dtype, label, mesh)
    return Model(config, params, tokenizer, name=str(path_or_id or path),
                 source_dtype=source_dtype)


def _flax_label(flax_keys: dict[str, str], family) -> Callable[[str, int | None],
                                                                 tuple[str, bool]]:
    """How errors name a tensor of a Flax file: by its Flax key (``flax_key`` for a missing
    one), with its shape as the file holds it (a ``kernel`` transposed)."""

    def label(name: str, ndim: int | None) -> tuple[str, bool]:
        key = flax_keys.get(name) or flax_checkpoint.flax_key(name, ndim, family)
        return key, key.endswith("/kernel")

    return label


def _check_vocab(tokenizer: Tokenizer, config: ModelConfig, where: str) -> None:
    """Refuse a tokenizer that makes ids the embedding has no row for (they would be clamped
    silently into other tokens' rows)."""
    if tokenizer.vocab_size > config.vocab_size:
        raise ValueError(f"{where}: the tokenizer has {tokenizer.vocab_size} tokens but the "
                         f"embedding has only {config.vocab_size} rows (vocab_size); a token "
                         "id past the last row would read another token's embedding")


def _load_gguf(path_or_id: str | os.PathLike, dtype, mesh: Mesh | None) -> Model:
    """A GGUF file through ``models.gguf.read_gguf`` (HF config dict and HF-named tensors,
    each dequantized when ``_import_params`` reads it)."""
    alias = GGUF_ALIASES.get(str(path_or_id))
    path = alias() if alias else Path(path_or_id).expanduser()
    read = gguf.read_gguf(path)
    config = ModelConfig.from_hf(read.config, source=str(path))
    _check_vocab(read.tokenizer, config,
                 f"{path} (tokenizer.ggml.tokens, {read.architecture}.vocab_size)")
    params, source_dtype = _import_params(config, read.tensors.readers, path, dtype, mesh=mesh)
    return Model(config, params, read.tokenizer, name=str(path_or_id), source_dtype=source_dtype)


def _import_params(config: ModelConfig, readers: dict[str, Callable[[], np.ndarray]],
                   where: Path, dtype,
                   label: Callable[[str, int | None], tuple[str, bool]] | None = None,
                   mesh: Mesh | None = None) -> tuple[dict, str | None]:
    """The family's params from HF-named tensor loaders (every loader must be used), and the
    widest floating dtype they were stored in. ``label(name, ndim)``: the name errors give a
    tensor (``ndim`` None for one the file holds), and whether the file holds it transposed
    (default: the HF name, as is). With a ``mesh`` each tensor goes to the devices as it is
    read (``_staging``) and the params are placed by the sharding rules."""
    family = FAMILIES[config.model_type]
    used: set[str] = set()
    stored: set[np.dtype] = set()
    label = label or (lambda name, ndim: (name, False))

    def read(name: str, shape: tuple) -> jnp.ndarray:
        shown, transposed = label(name, len(shape))
        if name not in readers:
            raise ValueError(f"{where}: missing tensor {shown!r} "
                             f"(a {config.model_type} with {config.n_layer} layers needs it)")
        raw = readers[name]()
        value = jnp.asarray(raw, dtype=dtype)
        if mesh is not None:
            value = jax.device_put(value, _staging(value.shape, mesh))
        if tuple(value.shape) != tuple(shape):
            got, want = tuple(value.shape), tuple(shape)
            if transposed:
                got, want = got[::-1], want[::-1]
            raise ValueError(f"{where}: tensor {shown!r} has shape {got}, expected {want} from "
                             "config.json")
        if jnp.issubdtype(raw.dtype, jnp.floating):
            stored.add(np.dtype(raw.dtype))
            if not bool(jnp.isfinite(value).all()):
                raise ValueError(f"{where}: tensor {shown!r} holds NaN or infinite values")
        used.add(name)
        return value

    params = family.import_weights(read, config)
    if mesh is not None:
        params = shard_params(params, mesh)
    unexpected = [label(n, None)[0] for n in readers
                  if n not in used and not n.endswith(family.IGNORED_SUFFIXES)]
    if unexpected:
        raise ValueError(f"{where}: unexpected tensors {unexpected[:5]} for a "
                         f"{config.model_type} with {config.n_layer} layers")
    return params, (max(stored, key=lambda d: d.itemsize).name if stored else None)


def _staging(shape: tuple[int, ...], mesh: Mesh) -> NamedSharding:
    """Where a tensor goes as it is read, before the family stacks and transposes it into its
    leaf: split over the model axis along its first dimension that axis divides (a weight
    replicated by the rules is gathered once it is placed), else replicated."""
    for axis, size in enumerate(shape):
        if size % mesh.shape["model"] == 0:
            spec = [None] * len(shape)
            spec[axis] = "model"
            return NamedSharding(mesh, PartitionSpec(*spec))
    return NamedSharding(mesh, PartitionSpec())


# numpy dtype -> safetensors' name (the dtypes a model's weights can have)
_SAFETENSORS_DTYPES = {"float64": "F64", "float32": "F32", "float16": "F16", "bfloat16": "BF16",
                       "int64": "I64", "int32": "I32"}


def write_safetensors(file: Path, tensors: dict[str, jax.Array], metadata: dict[str, str]
                      ) -> None:
    """``tensors`` as one safetensors file, each gathered to the host and written in turn:
    the host holds one tensor at a time. A gather is ``np.asarray`` of a device copy (sharded
    as the tensor), dropped after its write: ``np.asarray`` of a sharded ``jax.Array`` keeps
    the host copy cached on the array, so gathering the tensors themselves would leave every
    sharded one on the host (the whole model, and the embedding for as long as the model
    lives). The header (names, dtypes, shapes, offsets in name order) comes first, padded to
    8 bytes as safetensors writes it."""
    header: dict = {"__metadata__": metadata}
    offset = 0
    for name in sorted(tensors):
        x = tensors[name]
        size = int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize
        header[name] = {"dtype": _SAFETENSORS_DTYPES[np.dtype(x.dtype).name],
                        "shape": list(x.shape), "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    with open(file, "wb") as out:
        out.write(struct.pack("<Q", len(text)) + text)
        for name in sorted(tensors):
            out.write(np.ascontiguousarray(np.asarray(jnp.array(tensors[name]))).tobytes())


def save_hf(model: Model, out_dir: str | os.PathLike, *, overwrite: bool = False,
            dtype=None, extra_files: dict[str, str | bytes] | None = None,
            format: str = "safetensors") -> Path:
    """Write ``model`` as an HF directory that ``transformers.AutoModelForCausalLM`` loads
    (``format="safetensors"``), or, with ``format="flax"``, whose weights are one
    ``flax_model.msgpack`` as transformers' Flax classes (before version 5) wrote and read it.

    ``dtype`` casts the saved weights (default: ``model.source_dtype``, the dtype the model
    was loaded from, else as they are); ``extra_files`` maps a file name to text or bytes
    written beside them (a model card, say).
    """
    check_model(model)
    if format not in EXPORT_FORMATS:
        raise ValueError(f"save_hf: format must be one of {', '.join(EXPORT_FORMATS)}, got "
                         f"{format!r}")
    if not isinstance(out_dir, (str, os.PathLike)):
        raise TypeError(f"save_hf: out_dir must be a path (str or os.PathLike), got "
                        f"{type(out_dir).__name__}")
    source = local_source(model.name) if model.name else None
    where = source and overlap(out_dir, source)
    if where:
        raise ValueError(f"{out_dir}: {where} the model's source {source}; save elsewhere")
    dtype = model.source_dtype if dtype is None else dtype
    family = FAMILIES[model.config.model_type]
    weights = family.export_weights(model.params, model.config)
    weights = {k: v if dtype is None else v.astype(dtype) for k, v in weights.items()}
    bad = [k for k, v in weights.items() if not bool(jnp.isfinite(v).all())]
    if bad:
        raise ValueError(f"refusing to save non-finite weights: {bad[:5]}")

    def write(tmp: Path) -> None:
        config = model.config.to_hf()
        config["torch_dtype"] = str(next(iter(weights.values())).dtype)
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
        if format == "flax":
            (tmp / flax_checkpoint.FILE).write_bytes(flax_checkpoint.to_bytes(
                weights, family, model.config.tied_lm_head))
        else:
            try:
                write_safetensors(tmp / "model.safetensors", weights, {"format": "pt"})
            except OSError as err:  # a full disk, say
                raise OSError(f"{out_dir}: writing model.safetensors failed ({err}); nothing "
                              "was written") from None
        model.tokenizer.save(tmp, model.config.n_positions)
        for name, content in (extra_files or {}).items():
            data = content.encode() if isinstance(content, str) else content
            (tmp / name).write_bytes(data)

    return atomic_directory(out_dir, overwrite, write)

