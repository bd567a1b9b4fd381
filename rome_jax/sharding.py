"""Where parameters and batches live: one ``Mesh`` over the devices with a ``data`` and a
``model`` axis, and rules on the params' names that place each weight on it.

The mesh: ``make_mesh("data=D,model=M")`` (the CLI's ``--mesh``) arranges ``jax.devices()`` as
a D x M grid; the default (``None``) is every device on ``data`` (M = 1: parameters replicated,
as on one device). Batches of independent rows (the requests of many v* solves, the texts of
the key statistics) are split over ``data``; weights are split over ``model`` by ``RULES``,
ordered regular expressions over a leaf's path (``blocks/mlp/fc_in/w``), the first match
wins, anything unmatched replicated:

    wte                      [V, D]        vocabulary rows
    lm_head/w, lm_head/b     [D, V], [V]   vocabulary columns
    blocks/attn/{q,k,v}/w,b  [L, D, H*hd]  attention heads (output units)
    blocks/attn/o/w          [L, H*hd, D]  attention heads (input units)
    blocks/mlp/{gate,fc_in}/w,b [L, D, F]  MLP hidden units
    blocks/mlp/fc_out/w      [L, F, D]     MLP hidden units (ROME's W, as Wᵀ)
    everything else          replicated    norms, wpe, o's and fc_out's biases

A named dimension is split only when its size is divisible by the model axis's size; otherwise
that weight is replicated (so any model runs on any mesh, at the cost of memory). The jitted
forward, keys, v*, statistics and closed forms take such params as they are: XLA's SPMD
partitioner inserts the collectives, and results equal the unsharded ones to float32 rounding
(the sums are split differently).

Multi-host: ``initialize_distributed`` calls ``jax.distributed.initialize`` when
``JAX_COORDINATOR_ADDRESS`` is set (with ``JAX_NUM_PROCESSES`` and ``JAX_PROCESS_ID``); then
``jax.devices()`` spans every host and the same mesh spans them all.
"""

from __future__ import annotations

import os
import re
from typing import Mapping

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

AXES = ("data", "model")

# (pattern on a leaf's path, the mesh axis of each of its dimensions), first match wins.
RULES: tuple[tuple[str, tuple[str | None, ...]], ...] = (
    (r"wte", ("model", None)),
    (r"lm_head/w", (None, "model")),
    (r"lm_head/b", ("model",)),
    (r"blocks/attn/(q|k|v)/w", (None, None, "model")),
    (r"blocks/attn/(q|k|v)/b", (None, "model")),
    (r"blocks/attn/o/w", (None, "model", None)),
    (r"blocks/mlp/(gate|fc_in)/w", (None, None, "model")),
    (r"blocks/mlp/(gate|fc_in)/b", (None, "model")),
    (r"blocks/mlp/fc_out/w", (None, "model", None)),
)


def parse_mesh(spec: str | Mapping[str, int] | None, n_devices: int) -> dict[str, int]:
    """{"data": D, "model": M} from ``"data=D,model=M"`` (either may be left out: it takes the
    rest of the devices), a mapping, or None (every device on data). ValueError naming
    ``mesh`` unless D * M is ``n_devices``."""
    if spec is None:
        return {"data": n_devices, "model": 1}
    if isinstance(spec, str):
        sizes = {}
        for part in filter(None, (p.strip() for p in spec.split(","))):
            name, sep, value = part.partition("=")
            if not sep or not value.strip().isdigit():
                raise ValueError(f"mesh: {spec!r} is not data=D,model=M (positive integers)")
            sizes[name.strip()] = int(value)
    elif isinstance(spec, Mapping):
        sizes = dict(spec)
    else:
        raise TypeError(f"mesh: expected 'data=D,model=M', a mapping or None, got "
                        f"{type(spec).__name__}")
    unknown = sorted(set(sizes) - set(AXES))
    if unknown or not sizes:
        raise ValueError(f"mesh: axes are data and model, got {', '.join(unknown) or 'none'}")
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in sizes.values()):
        raise ValueError(f"mesh: axis sizes must be positive integers, got {sizes}")
    for axis, other in (("data", "model"), ("model", "data")):
        if axis not in sizes:
            sizes[axis] = max(n_devices // sizes[other], 1)
    if sizes["data"] * sizes["model"] != n_devices:
        raise ValueError(f"mesh: data={sizes['data']} x model={sizes['model']} is "
                         f"{sizes['data'] * sizes['model']} devices, but there are {n_devices}")
    return {axis: sizes[axis] for axis in AXES}


def make_mesh(spec: str | Mapping[str, int] | Mesh | None = None,
              devices: list | None = None) -> Mesh:
    """The ("data", "model") mesh of ``spec`` (see ``parse_mesh``; a Mesh with both axes is
    returned as is) over ``devices`` (default ``jax.devices()``), model the faster axis."""
    if isinstance(spec, Mesh):
        if tuple(spec.axis_names) != AXES:
            raise ValueError(f"mesh: expected axes {AXES}, got {tuple(spec.axis_names)}")
        return spec
    devices = jax.devices() if devices is None else list(devices)
    if not devices:
        raise ValueError("devices: empty; give at least one device")
    sizes = parse_mesh(spec, len(devices))
    return Mesh(np.asarray(devices).reshape(sizes["data"], sizes["model"]), AXES)


def leaf_name(path) -> str:
    """``blocks/mlp/fc_out/w`` for a tree path (``jax.tree_util`` keys)."""
    return "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k))))
                    for k in path)


def param_spec(name: str, shape: tuple[int, ...], mesh: Mesh) -> PartitionSpec:
    """The PartitionSpec of the leaf ``name`` of ``shape`` on ``mesh`` by ``RULES`` (a
    dimension the model axis does not divide stays whole; on a mesh without a model axis,
    everything is replicated)."""
    for pattern, axes in RULES:
        if re.fullmatch(pattern, name) and len(axes) == len(shape):
            return PartitionSpec(*(
                axis if axis in mesh.shape and size % mesh.shape[axis] == 0 else None
                for size, axis in zip(shape, axes)))
    return PartitionSpec()


def param_shardings(params, mesh: Mesh):
    """The NamedSharding of every leaf of ``params`` (arrays or anything with ``.shape``, e.g.
    ``jax.eval_shape``'s) on ``mesh``, as a tree of the same structure."""
    return jax.tree_util.tree_map_with_path(
        lambda path, leaf: NamedSharding(mesh, param_spec(leaf_name(path), tuple(leaf.shape),
                                                          mesh)), params)


def shard_params(params, mesh: Mesh):
    """``params`` placed on ``mesh`` by ``RULES`` (leaves already placed so are kept)."""
    return jax.device_put(params, param_shardings(params, mesh))


def mesh_of(params) -> Mesh | None:
    """The ("data", "model") mesh ``params`` are placed on, or None (not placed on one)."""
    leaves = jax.tree.leaves(params)
    mesh = getattr(getattr(leaves[0], "sharding", None), "mesh", None) if leaves else None
    return mesh if isinstance(mesh, Mesh) and tuple(mesh.axis_names) == AXES else None


def keep_placement(new: jax.Array, old: jax.Array) -> jax.Array:
    """``new`` placed as ``old`` where ``old`` lies on a mesh (an edited weight stays sharded as
    the weight it replaces); otherwise ``new`` as it is."""
    sharding = getattr(old, "sharding", None)
    return jax.device_put(new, sharding) if isinstance(sharding, NamedSharding) else new


def initialize_distributed(environ: Mapping[str, str] | None = None) -> bool:
    """``jax.distributed.initialize`` when ``JAX_COORDINATOR_ADDRESS`` (host:port of process
    0) is set, with ``JAX_NUM_PROCESSES`` and ``JAX_PROCESS_ID`` where set (else JAX detects
    them from SLURM, Open MPI, ...); True when it ran. Call it before anything touches the
    devices; every host runs the same command, and ``make_mesh`` then spans all their
    devices. ValueError naming the variable for a count or id that is not an integer."""
    environ = os.environ if environ is None else environ
    address = environ.get("JAX_COORDINATOR_ADDRESS")
    if not address:
        return False
    counts = {}
    for name, argument in (("JAX_NUM_PROCESSES", "num_processes"),
                           ("JAX_PROCESS_ID", "process_id")):
        value = environ.get(name)
        if value is not None:
            if not value.strip().isdigit():
                raise ValueError(f"{name}: {value!r} is not a non-negative integer")
            counts[argument] = int(value)
    jax.distributed.initialize(address, **counts)
    return True
