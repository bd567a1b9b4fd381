"""Flax ``flax_model.msgpack`` checkpoints <-> HF tensor names.

transformers before version 5 had a Flax twin of each torch model (``FlaxGPT2LMHeadModel``,
``FlaxGPTJForCausalLM``, ``FlaxLlamaForCausalLM``) whose ``save_pretrained`` wrote its params
tree with ``flax.serialization`` as msgpack; the hub holds such files for gpt2, gpt2-xl,
EleutherAI/gpt-j-6b and many more. The tree is the torch module path split at its dots
(``transformer/h/0/attn/c_attn/kernel`` holds ``transformer.h.0.attn.c_attn.weight``); only the
leaf names differ, by the kind of Flax module:

- ``kernel`` (2-D) is torch's ``weight`` transposed: a Flax ``Dense`` kernel is [in, out] where
  torch ``Linear`` is [out, in]; GPT-2's Flax ``Conv1D`` kernel is [out, in] where torch
  ``Conv1D`` is [in, out];
- ``embedding`` (``Embed``, [vocab or positions, d]) and ``scale`` (``LayerNorm``) are torch's
  ``weight`` as is;
- ``weight`` (Llama's RMSNorm) and ``bias`` keep their names and values.

So each family keeps its one HF name mapping (``import_weights`` / ``export_weights`` of
``models/gpt2.py``, ``gptj.py``, ``llama.py``) and this module only renames and transposes. The
family says which 2-D weights are embeddings (``FLAX_EMBEDDINGS``, name suffixes), what its
norms' 1-D weight is called (``FLAX_NORM``) and, for Flax Llama, which has no tied head and so
always holds ``lm_head/kernel``, the tensor a tied head copies (``FLAX_LM_HEAD``; loading ignores
that copy as it ignores a tied ``lm_head.weight`` in safetensors).

A file is one msgpack map (a map per module, nested) whose leaves are msgpack ext objects in
flax.serialization's format (read without flax): ext type 1 (``ndarray``) holds the msgpack array
``[shape (array of ints), dtype name (str: "float32", "bfloat16", ...), C-order bytes (bin)]``; an
array over flax's ``MAX_CHUNK_SIZE`` (2**30 bytes) is instead the map
``{"__msgpack_chunked_array__": true, "shape": {"0": d0, "1": d1, ...}, "chunks": {"0": ext,
"1": ext, ...}}`` whose 1-D ndarray chunks, joined, are the array's flat C-order elements. ``read``
memory-maps the file and walks its headers only, recording each leaf's key path, shape, dtype and
the byte span of its elements (of each chunk); an array is copied out of the map when its loader
is called (and the mapped pages let go of), so the host holds one decoded tensor at a time.
Numbers, strings, lists, other ext types (flax's 2, a complex, and 3, a numpy scalar) and
non-numeric dtypes are refused naming the key; nothing is unpickled. ``to_bytes`` writes with
``flax.serialization.msgpack_serialize``, which chunks large arrays itself.
"""

from __future__ import annotations

import dataclasses
import math
import mmap
import os
import struct
from pathlib import Path
from types import ModuleType
from typing import Callable

import jax.numpy as jnp
import numpy as np
from flax import serialization

FILE = "flax_model.msgpack"
INDEX = "flax_model.msgpack.index.json"
# Flax leaf -> torch leaf (module docstring).
_TORCH_LEAF = {"kernel": "weight", "embedding": "weight", "scale": "weight", "weight": "weight",
               "bias": "bias"}


def flax_key(name: str, ndim: int, family: ModuleType) -> str:
    """The Flax key (``transformer/wte/embedding``) of the HF tensor ``name``
    (``transformer.wte.weight``) with ``ndim`` dimensions in ``family``."""
    path, leaf = name.rsplit(".", 1)
    if leaf == "weight" and ndim == 2:
        leaf = "embedding" if name.endswith(family.FLAX_EMBEDDINGS) else "kernel"
    elif leaf == "weight" and ndim == 1:
        leaf = family.FLAX_NORM
    return f"{path.replace('.', '/')}/{leaf}"


class _Corrupt(Exception):
    """The bytes are no msgpack or not flax's layout of an array (``read`` names the file)."""


@dataclasses.dataclass(frozen=True)
class _Head:
    """The header of the msgpack object at some byte: ``kind`` (the Python type it decodes to:
    dict, list, str, bytes, int, float, bool, NoneType; ``ext`` for an ext object), ``size``
    (entries of a dict or list, bytes of a str, bytes or ext's data, else 0), ``start`` (the byte
    where its entries or data begin; a scalar's end), an ext's type ``code``, a scalar's
    ``value``."""

    kind: str
    size: int
    start: int
    code: int = 0
    value: object = None

    def __str__(self) -> str:  # a map key that is no string or number, in errors
        return f"<{self.kind}>"


@dataclasses.dataclass(frozen=True)
class _Array:
    """A leaf located in the file: its ``shape``, ``dtype`` and the (byte offset, element count)
    of its flat C-order elements, one span per chunk (one for an array flax did not chunk)."""

    shape: tuple[int, ...]
    dtype: np.dtype
    spans: tuple[tuple[int, int], ...]


# msgpack's first bytes (https://github.com/msgpack/msgpack/blob/master/spec.md) other than the
# fix* ranges: the kind and the struct format of the size (or value) that follows.
_SIZED = {0xc4: ("bytes", ">B"), 0xc5: ("bytes", ">H"), 0xc6: ("bytes", ">I"),
          0xc7: ("ext", ">B"), 0xc8: ("ext", ">H"), 0xc9: ("ext", ">I"),
          0xd9: ("str", ">B"), 0xda: ("str", ">H"), 0xdb: ("str", ">I"),
          0xdc: ("list", ">H"), 0xdd: ("list", ">I"), 0xde: ("dict", ">H"), 0xdf: ("dict", ">I")}
_NUMBERS = {0xca: ("float", ">f"), 0xcb: ("float", ">d"), 0xcc: ("int", ">B"),
            0xcd: ("int", ">H"), 0xce: ("int", ">I"), 0xcf: ("int", ">Q"), 0xd0: ("int", ">b"),
            0xd1: ("int", ">h"), 0xd2: ("int", ">i"), 0xd3: ("int", ">q")}
_CONSTANTS = {0xc0: ("NoneType", None), 0xc2: ("bool", False), 0xc3: ("bool", True)}
_FIXEXT = {0xd4: 1, 0xd5: 2, 0xd6: 4, 0xd7: 8, 0xd8: 16}  # data bytes
# flax.serialization's ext types (_MsgpackExtType), and the marker of a chunked array.
_NDARRAY, _COMPLEX, _NPSCALAR = 1, 2, 3
_CHUNKED = "__msgpack_chunked_array__"


def _take(buf, at: int, n: int, end: int) -> bytes:
    if at + n > end:
        raise _Corrupt(f"an object at byte {at} runs past byte {end}")
    return bytes(buf[at:at + n])


def _head(buf, at: int, end: int) -> _Head:
    """The header of the object at byte ``at`` of ``buf``, which must end by byte ``end``."""
    byte = _take(buf, at, 1, end)[0]
    if byte <= 0x7f or byte >= 0xe0:  # positive / negative fixint
        return _Head("int", 0, at + 1, value=byte if byte <= 0x7f else byte - 0x100)
    if byte <= 0xbf:  # fixmap, fixarray, fixstr
        kind, size = (("dict", byte & 0x0f) if byte <= 0x8f else ("list", byte & 0x0f)
                      if byte <= 0x9f else ("str", byte & 0x1f))
        head = _Head(kind, size, at + 1)
    elif byte in _CONSTANTS:
        return _Head(_CONSTANTS[byte][0], 0, at + 1, value=_CONSTANTS[byte][1])
    elif byte in _NUMBERS:
        kind, fmt = _NUMBERS[byte]
        width = struct.calcsize(fmt)
        return _Head(kind, 0, at + 1 + width,
                     value=struct.unpack(fmt, _take(buf, at + 1, width, end))[0])
    elif byte in _FIXEXT:
        head = _Head("ext", _FIXEXT[byte], at + 2,
                     code=struct.unpack(">b", _take(buf, at + 1, 1, end))[0])
    elif byte in _SIZED:
        kind, fmt = _SIZED[byte]
        width = struct.calcsize(fmt)
        size = struct.unpack(fmt, _take(buf, at + 1, width, end))[0]
        start = at + 1 + width + (kind == "ext")
        code = struct.unpack(">b", _take(buf, start - 1, 1, end))[0] if kind == "ext" else 0
        head = _Head(kind, size, start, code=code)
    else:
        raise _Corrupt(f"byte {at} (0x{byte:02x}) starts no msgpack object")
    if head.kind in ("str", "bytes", "ext") and head.start + head.size > end:
        raise _Corrupt(f"an object at byte {at} runs past byte {end}")
    return head


def _skip(buf, at: int, end: int) -> int:
    """The byte after the object at byte ``at`` (its entries' data never read)."""
    remaining = 1
    while remaining:
        head = _head(buf, at, end)
        remaining += head.size * {"dict": 2, "list": 1}.get(head.kind, 0) - 1
        at = head.start + (head.size if head.kind in ("str", "bytes", "ext") else 0)
    return at


def _text(buf, head: _Head) -> str:
    try:
        return bytes(buf[head.start:head.start + head.size]).decode()
    except UnicodeDecodeError as err:
        raise _Corrupt(f"a string at byte {head.start} is not UTF-8 ({err})") from None


def _entries(buf, at: int, end: int) -> tuple[list[tuple[object, int]], int]:
    """(key, byte where its value starts) of each entry of the map at byte ``at``, and the byte
    after the map. A key that is no string is its value (a number) or its _Head."""
    head = _head(buf, at, end)
    entries, at = [], head.start
    for _ in range(head.size):
        key = _head(buf, at, end)
        value = _skip(buf, at, end)
        entries.append((_text(buf, key) if key.kind == "str" else key.value
                        if key.kind in ("int", "float", "bool", "NoneType") else key, value))
        at = _skip(buf, value, end)
    return entries, at


def _what(head: _Head) -> str:
    """What a leaf that is no array holds, for errors."""
    if head.kind != "ext":
        return head.kind
    return {_NDARRAY: "ndarray", _COMPLEX: "complex", _NPSCALAR: "numpy scalar"}.get(
        head.code, f"msgpack ext of type {head.code}")


def _walk(buf, entries: list[tuple[object, int]], prefix: tuple[str, ...], file: Path,
          leaves: dict[tuple[str, ...], _Array]) -> None:
    """Add (key path -> _Array) of every leaf under the map of ``entries`` to ``leaves``."""
    for key, at in entries:
        path = (*prefix, key)
        if not isinstance(key, str) or not key:
            raise ValueError(f"{file}: key {'/'.join(map(str, path))!r} is not a name "
                             "(a Flax params tree is a map of non-empty strings)")
        head = _head(buf, at, len(buf))
        if head.kind == "dict":
            sub = _entries(buf, at, len(buf))[0]
            if any(k == _CHUNKED for k, _ in sub):
                leaves[path] = _chunked(buf, dict(sub), "/".join(path), file)
            else:
                _walk(buf, sub, path, file, leaves)
        elif head.kind == "ext" and head.code == _NDARRAY:
            leaves[path] = _ndarray(buf, head, "/".join(path), file)
        else:
            raise ValueError(f"{file}: {'/'.join(path)!r} holds a {_what(head)}, not an array")


def _ndarray(buf, ext: _Head, key: str, file: Path) -> _Array:
    """The array of a flax ndarray ext: msgpack ``[shape, dtype name, bytes]``."""
    end = ext.start + ext.size
    items = _head(buf, ext.start, end)
    dims = _head(buf, items.start, end) if items.kind == "list" and items.size == 3 else None
    if dims is None or dims.kind != "list":
        raise _Corrupt(f"{key!r} is no [shape, dtype, bytes] array")
    shape, at = [], dims.start
    for _ in range(dims.size):
        dim = _head(buf, at, end)
        shape.append(_size(dim, key))
        at = dim.start
    name = _head(buf, at, end)
    if name.kind not in ("str", "bytes"):
        raise _Corrupt(f"{key!r}: its dtype is a {name.kind}, not a name")
    dtype = _dtype(_text(buf, name), key, file)
    data = _head(buf, name.start + name.size, end)
    count = math.prod(shape)
    if data.kind != "bytes" or data.start + data.size != end \
            or data.size != count * dtype.itemsize:
        raise _Corrupt(f"{key!r}: {data.size if data.kind == 'bytes' else 'no'} bytes for shape "
                       f"{tuple(shape)} {dtype}")
    return _Array(tuple(shape), dtype, ((data.start, count),))


def _size(dim: _Head, key: str) -> int:
    """The size a dimension of ``key``'s shape holds."""
    if dim.kind != "int" or dim.value < 0:
        raise _Corrupt(f"{key!r}: its shape holds "
                       f"{dim.value if dim.kind == 'int' else 'a ' + dim.kind}, not a size")
    return dim.value


def _dtype(name: str, key: str, file: Path) -> np.dtype:
    """The dtype flax wrote as ``name`` (``arr.dtype.name``): numeric, or bfloat16."""
    try:
        dtype = np.dtype(jnp.bfloat16 if name == "bfloat16" else name)
    except Exception:  # numpy raises TypeError, and others for odd strings
        dtype = None
    if dtype is None or (dtype.kind not in "biufc" and name != "bfloat16"):
        raise ValueError(f"{file}: {key!r} has dtype {name!r}, not a numeric one")
    return dtype


def _chunked(buf, fields: dict, key: str, file: Path) -> _Array:
    """The array of flax's chunked layout (module docstring)."""
    if set(fields) != {_CHUNKED, "shape", "chunks"}:
        raise _Corrupt(f"{key!r}: a chunked array has the keys {sorted(map(str, fields))}, not "
                       f"{sorted([_CHUNKED, 'shape', 'chunks'])}")
    shape = [_size(_head(buf, at, len(buf)), key) for at in _numbered(buf, fields["shape"], key)]
    chunks = []
    for at in _numbered(buf, fields["chunks"], key):
        head = _head(buf, at, len(buf))
        if head.kind != "ext" or head.code != _NDARRAY:
            raise _Corrupt(f"{key!r}: a chunk holds a {_what(head)}, not an array")
        chunks.append(_ndarray(buf, head, key, file))
    if not chunks or any(c.dtype != chunks[0].dtype or len(c.shape) != 1 for c in chunks) \
            or sum(c.shape[0] for c in chunks) != math.prod(shape):
        raise _Corrupt(f"{key!r}: its chunks are not 1-D arrays of one dtype holding the "
                       f"{math.prod(shape)} elements of shape {tuple(shape)}")
    return _Array(tuple(shape), chunks[0].dtype, tuple(c.spans[0] for c in chunks))


def _numbered(buf, at: int, key: str) -> list[int]:
    """Where the values of the map ``{"0": v0, "1": v1, ...}`` at byte ``at`` start, in order
    (flax's tuple as a map)."""
    if _head(buf, at, len(buf)).kind != "dict":
        raise _Corrupt(f"{key!r}: a chunked array's shape and chunks must be maps")
    entries = dict(_entries(buf, at, len(buf))[0])
    if set(entries) != {str(i) for i in range(len(entries))}:
        raise _Corrupt(f"{key!r}: a chunked array's map has the keys "
                       f"{sorted(entries, key=str)}, not 0, 1, ...")
    return [entries[str(i)] for i in range(len(entries))]


def _decode(buf, array: _Array) -> np.ndarray:
    """``array``'s elements copied out of ``buf`` (the mapped file) into a new array. The pages
    copied are then let go of (``MADV_DONTNEED``; the kernel's page cache may keep them), so
    the process does not hold the file's pages as it goes through them."""
    out = np.empty(sum(count for _, count in array.spans), array.dtype)
    at = 0
    for offset, count in array.spans:
        out[at:at + count] = np.frombuffer(buf, array.dtype, count, offset)
        at += count
        if count and hasattr(mmap, "MADV_DONTNEED"):  # not on Windows
            start = offset - offset % mmap.PAGESIZE
            buf.madvise(mmap.MADV_DONTNEED, start, offset + count * array.dtype.itemsize - start)
    return out.reshape(array.shape)


def _loader(buf, array: _Array, transposed: bool) -> Callable[[], np.ndarray]:
    def load() -> np.ndarray:
        value = _decode(buf, array)
        return value.T if transposed else value

    return load


def read(file: Path, family: ModuleType) -> dict[str, tuple[str, Callable[[], np.ndarray]]]:
    """HF name -> (Flax key, loader of the array in HF's layout) of every leaf of ``file``.

    The file is memory-mapped and only its headers are read now (every leaf's place, shape and
    dtype checked); each loader copies its array out of the map when called, so call each once
    and leave the file unchanged meanwhile. ValueError naming the file for an unreadable,
    truncated or corrupt file or one that is not a params tree, and naming the key for a leaf
    that is no array (or one of a non-numeric dtype) or a key whose leaf name is not where a
    ``family`` model keeps that tensor (``wte/kernel`` for ``wte/embedding``)."""
    with open(file, "rb") as handle:
        size = os.fstat(handle.fileno()).st_size
        buf = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) if size else b""
    try:
        top = _head(buf, 0, len(buf))
        if top.kind != "dict":
            raise ValueError(f"{file}: not a Flax params tree (a msgpack map of names), got a "
                             f"{_what(top)}")
        entries, end = _entries(buf, 0, len(buf))
        if end != len(buf):
            raise _Corrupt(f"{len(buf) - end} bytes after the params tree")
        leaves: dict[tuple[str, ...], _Array] = {}
        _walk(buf, entries, (), file, leaves)
    except (_Corrupt, RecursionError) as err:
        raise ValueError(f"{file}: not a readable Flax msgpack file, truncated or corrupt "
                         f"({err})") from None
    out: dict[str, tuple[str, Callable[[], np.ndarray]]] = {}
    for path, array in leaves.items():
        key = "/".join(path)
        ndim = len(array.shape)
        torch_leaf = _TORCH_LEAF.get(path[-1])
        name = ".".join((*path[:-1], torch_leaf or path[-1]))
        expected = flax_key(name, ndim, family) if torch_leaf and len(path) > 1 else None
        if expected != key:
            raise ValueError(f"{file}: unexpected key {key!r} ({ndim}-D)"
                             + (f"; a {family.__name__.rsplit('.', 1)[-1]} model stores this "
                                f"tensor as {expected!r}" if expected else ""))
        out[name] = (key, _loader(buf, array, path[-1] == "kernel"))
    return out


def to_bytes(weights: dict[str, np.ndarray], family: ModuleType, tied_lm_head: bool) -> bytes:
    """The msgpack of the Flax params tree holding HF-named ``weights`` (``export_weights``),
    as transformers' Flax class of ``family`` keeps them."""
    if tied_lm_head and family.FLAX_LM_HEAD:
        weights = {**weights, "lm_head.weight": weights[family.FLAX_LM_HEAD]}
    tree: dict = {}
    for name, value in weights.items():
        value = np.asarray(value)
        *path, leaf = flax_key(name, value.ndim, family).split("/")
        node = tree
        for part in path:
            node = node.setdefault(part, {})
        node[leaf] = np.ascontiguousarray(value.T if leaf == "kernel" else value)
    return serialization.msgpack_serialize(tree)
