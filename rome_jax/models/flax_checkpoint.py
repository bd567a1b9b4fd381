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

Files are decoded by ``flax.serialization.msgpack_restore`` (arrays and nested maps only; nothing
is unpickled). Arrays over flax's chunk size are written and read in chunks by flax itself.
"""

from __future__ import annotations

from pathlib import Path
from types import ModuleType

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


def _leaves(tree: dict, file: Path, prefix: tuple[str, ...] = ()):
    """(key path, array) of every leaf of a nested msgpack map."""
    for key, value in tree.items():
        path = (*prefix, key)
        if not isinstance(key, str) or not key:
            raise ValueError(f"{file}: key {'/'.join(map(str, path))!r} is not a name "
                             "(a Flax params tree is a map of non-empty strings)")
        if isinstance(value, dict):
            yield from _leaves(value, file, path)
        elif isinstance(value, np.ndarray):
            yield path, value
        else:
            raise ValueError(f"{file}: {'/'.join(path)!r} holds a {type(value).__name__}, "
                             "not an array")


def read(file: Path, family: ModuleType) -> dict[str, tuple[str, np.ndarray]]:
    """HF tensor name -> (Flax key, array in HF's layout) of every leaf of ``file``.

    ValueError naming the file for an unreadable, truncated or corrupt file or one that is not
    a params tree, and naming the key for a leaf that is no array or a key whose leaf name is
    not where a ``family`` model keeps that tensor (``wte/kernel`` for ``wte/embedding``)."""
    try:
        tree = serialization.msgpack_restore(file.read_bytes())
    except OSError:
        raise
    except Exception as err:  # msgpack raises its own errors and ValueError for a cut file
        raise ValueError(f"{file}: not a readable Flax msgpack file, truncated or corrupt "
                         f"({type(err).__name__}: {err})") from None
    if not isinstance(tree, dict):
        raise ValueError(f"{file}: not a Flax params tree (a msgpack map of names), got a "
                         f"{type(tree).__name__}")
    out: dict[str, tuple[str, np.ndarray]] = {}
    for path, value in _leaves(tree, file):
        key = "/".join(path)
        torch_leaf = _TORCH_LEAF.get(path[-1])
        name = ".".join((*path[:-1], torch_leaf or path[-1]))
        expected = flax_key(name, value.ndim, family) if torch_leaf and len(path) > 1 else None
        if expected != key:
            raise ValueError(f"{file}: unexpected key {key!r} ({value.ndim}-D)"
                             + (f"; a {family.__name__.rsplit('.', 1)[-1]} model stores this "
                                f"tensor as {expected!r}" if expected else ""))
        out[name] = (key, value.T if path[-1] == "kernel" else value)
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
