"""An edit as a value: per-layer deltas of the MLP output projection, low-rank where possible.

With the model's orientation ``out = k @ w + b`` (w [F, D] = ROME's Wᵀ, see
``models.transformer.rome_weight``), an ``Edit`` maps a layer to its Δw, kept as ``Factors``
(Δw = left @ right, left [F, r], right [r, D]) when the method gives a rank r (ROME r = 1,
MEMIT / EMMET / AlphaEdit r ≤ the batch size) and that is smaller than the dense [F, D], else as
the dense Δw. ``apply_edit`` adds every delta to a copy of the params; nothing is mutated. An
``Edit`` is a pytree (the layers are its static structure), so it can be vmapped (stacked
edits of independent requests carry a leading axis on every leaf), summed by ``combine`` and
saved by ``save_edit`` (one .npz of plain arrays; ``load_edit`` never unpickles).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from rome_jax.files import read_npz, write_npz_atomic
from rome_jax.models.transformer import Params, widened
from rome_jax.sharding import keep_placement


@struct.dataclass
class Factors:
    """Δw = left @ right: left [..., F, r], right [..., r, D]."""

    left: jax.Array
    right: jax.Array

    @property
    def rank(self) -> int:
        return self.left.shape[-1]

    def dense(self) -> jax.Array:
        """Δw [..., F, D]."""
        return self.left @ self.right


def compact(left: jax.Array, right: jax.Array) -> Factors | jax.Array:
    """``Factors(left, right)``, or the dense Δw [F, D] where it holds fewer numbers
    (r (F + D) > F D)."""
    f, r = left.shape[-2:]
    d = right.shape[-1]
    return Factors(left, right) if r * (f + d) <= f * d else left @ right


def dense(delta: Factors | jax.Array) -> jax.Array:
    """The Δw [F, D] of one layer's delta."""
    return delta.dense() if isinstance(delta, Factors) else delta


@struct.dataclass
class Edit:
    """``deltas``: {layer: Factors | Δw [F, D]} for the MLP output projections."""

    deltas: dict

    @property
    def layers(self) -> tuple[int, ...]:
        return tuple(sorted(self.deltas))

    def weight_delta(self, layer: int | None = None) -> jax.Array:
        """Δw [F, D] at ``layer`` (the only layer when None)."""
        if layer is None:
            if len(self.deltas) != 1:
                raise ValueError(f"layer: the edit spans layers {self.layers}; name one")
            (layer,) = self.deltas
        return dense(self.deltas[layer])

    def is_finite(self) -> bool:
        return all(bool(jnp.isfinite(x).all()) for x in jax.tree.leaves(self))


def rank_one(key_dir: jax.Array, value_delta: jax.Array, layer: int) -> Edit:
    """ROME's Δw = key_dir ⊗ value_delta (key_dir [..., F], value_delta [..., D]) at ``layer``."""
    return Edit({layer: Factors(key_dir[..., :, None], value_delta[..., None, :])})


def apply_edit(params: Params, edit: Edit) -> Params:
    """New params with every delta of ``edit`` added; the input params are not touched.

    Each layer's sum w + Δw is formed in float32 (or wider: the wider of the two dtypes) and
    rounded once to the weights' dtype: a bfloat16 / float16 model stays in its dtype, and
    keeps of Δw what that dtype can hold beside w. A weight on a mesh stays placed as it was."""
    if not isinstance(edit, Edit):
        raise TypeError(f"edit: expected an Edit, got {type(edit).__name__}")
    fc_out = params["blocks"]["mlp"]["fc_out"]
    w = fc_out["w"]
    for layer in edit.layers:
        total = widened(w[layer]) + widened(dense(edit.deltas[layer]))
        w = w.at[layer].set(total.astype(w.dtype))
    mlp = {**params["blocks"]["mlp"], "fc_out": {**fc_out, "w": keep_placement(w, fc_out["w"])}}
    return {**params, "blocks": {**params["blocks"], "mlp": mlp}}


def combine(first: Edit, second: Edit) -> Edit:
    """One edit with both edits' deltas (factors concatenated along the rank where both are
    factors, else summed densely): applying it equals applying both."""
    deltas = dict(first.deltas)
    for layer, delta in second.deltas.items():
        if layer not in deltas:
            deltas[layer] = delta
        elif isinstance(delta, Factors) and isinstance(deltas[layer], Factors):
            deltas[layer] = compact(jnp.concatenate([deltas[layer].left, delta.left], -1),
                                    jnp.concatenate([deltas[layer].right, delta.right], -2))
        else:
            deltas[layer] = dense(deltas[layer]) + dense(delta)
    return Edit(deltas)


def edit_arrays(edit: Edit) -> dict[str, np.ndarray]:
    """``edit`` as plain arrays named ``layer<L>.left/right`` or ``layer<L>.dense``."""
    arrays = {}
    for layer, delta in edit.deltas.items():
        if isinstance(delta, Factors):
            arrays[f"layer{layer}.left"] = np.asarray(delta.left)
            arrays[f"layer{layer}.right"] = np.asarray(delta.right)
        else:
            arrays[f"layer{layer}.dense"] = np.asarray(delta)
    return arrays


def save_edit(edit: Edit, path: str | os.PathLike) -> None:
    """Write ``edit`` as one .npz of its ``edit_arrays`` (atomically: a temporary sibling
    renamed into place)."""
    write_npz_atomic(path, **edit_arrays(edit))


def load_edit(path: str | os.PathLike) -> Edit:
    """Read an edit written by ``save_edit``; ValueError naming the file when it is not one (not
    an .npz, pickled objects, or not ``edit_from_arrays``' arrays)."""
    path = Path(path)
    try:
        arrays = read_npz(path)
    except ValueError as err:
        raise ValueError(f"{path}: not an edit file ({err})") from None
    return edit_from_arrays(arrays, path)


def edit_from_arrays(arrays: dict[str, np.ndarray], path: str | os.PathLike) -> Edit:
    """The edit of ``edit_arrays``' form; ValueError naming ``path`` for an array name other
    than ``layer<L>.left/right/dense``, a factor without its partner, or shapes that do not
    multiply: left [..., F, r] @ right [..., r, D], dense [..., F, D] (the leading axes are those
    of stacked edits, as ``edit_independent``'s)."""
    parts: dict[int, dict[str, np.ndarray]] = {}
    for name, array in arrays.items():
        match = re.fullmatch(r"layer(\d+)\.(left|right|dense)", name)
        if match is None:
            raise ValueError(f"{path}: not an edit file (array {name!r}; expected "
                             "layer<L>.left, layer<L>.right or layer<L>.dense)")
        if array.ndim < 2 or not np.issubdtype(array.dtype, np.floating):
            raise ValueError(f"{path}: not an edit file (array {name!r} is {array.dtype} of "
                             f"shape {array.shape}; expected a float array of 2 or more axes)")
        parts.setdefault(int(match[1]), {})[match[2]] = array
    deltas = {}
    for layer, kinds in sorted(parts.items()):
        if set(kinds) == {"dense"}:
            deltas[layer] = jnp.asarray(kinds["dense"])
        elif (set(kinds) == {"left", "right"}
              and kinds["left"].shape[:-2] == kinds["right"].shape[:-2]
              and kinds["left"].shape[-1] == kinds["right"].shape[-2]):
            deltas[layer] = Factors(jnp.asarray(kinds["left"]), jnp.asarray(kinds["right"]))
        else:
            shapes = {k: v.shape for k, v in sorted(kinds.items())}
            raise ValueError(f"{path}: not an edit file (layer {layer} has {shapes}; expected "
                             "left [..., F, r] with right [..., r, D], or dense [..., F, D])")
    return Edit(deltas)
