"""Data parallelism within one batch over local devices with `jax.sharding` (Mesh + NamedSharding).

Kernels are written for one global batch; placing their batched arguments with `shard_batch`
lets `jit` split the work over the devices (GSPMD) with no hand-written parallel code. Batches
are padded to a multiple of the device count by repeating the last row (so padded rows are valid
inputs, labels and radii) and the padding is cut off again with `unpad`. Random kernels
(`perturb`, `attacks`) derive randomness from each input's global batch index, so a sharded run
draws the same samples and random starts as a single-device run. Results agree with it to float
rounding, not bit for bit: each device runs the program on ``B / D`` rows, and XLA's matrix products
round by shape (on CPU, rows of a 784x256 product differ in the last bits between 16 and 64 rows).
The drivers therefore never split a batch: `runner` runs whole chunks, one per device.

    mesh = batch_mesh()
    (xs, ys), n = shard_batch((x, y), mesh)
    res = unpad(pgd(net, xs, ys, 0.1, key=key), n)
or in one call: ``res = map_sharded(lambda x, y: pgd(net, x, y, 0.1, key=key), x, y)``.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from ..errors import InputError

AXIS = "batch"


def batch_mesh(devices=None, axis: str = AXIS) -> Mesh:
    """1-d mesh named ``axis`` over ``devices`` (default: all local devices)."""
    devs = jax.local_devices() if devices is None else list(devices)
    if not devs:
        raise InputError("batch_mesh needs at least one device")
    return Mesh(np.asarray(devs), (axis,))


def batch_sharding(mesh: Mesh, axis: str = AXIS) -> NamedSharding:
    """Sharding that splits the leading dimension over ``axis`` and replicates the rest."""
    return NamedSharding(mesh, PartitionSpec(axis))


def replicate(tree: Any, mesh: Mesh | None = None) -> Any:
    """Place every leaf of ``tree`` (e.g. network parameters) fully replicated on ``mesh``."""
    mesh = batch_mesh() if mesh is None else mesh
    return jax.device_put(tree, NamedSharding(mesh, PartitionSpec()))


def shard_batch(tree: Any, mesh: Mesh | None = None, axis: str = AXIS) -> tuple[Any, int]:
    """Pad and shard the leading (batch) dimension of every leaf over the mesh.

    Args:
      tree: array or pytree of arrays sharing the batch size ``B`` as leading dimension.
      mesh: mesh to shard over (default `batch_mesh()`); its ``axis`` has ``D`` devices.
    Returns:
      ``(sharded_tree, B)``: leaves padded to ``ceil(B / D) * D`` rows by repeating the last row,
      laid out with ``NamedSharding(mesh, P(axis))``; ``B`` for `unpad`.
    """
    mesh = batch_mesh(axis=axis) if mesh is None else mesh
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    leaves = [jnp.asarray(a) for a in leaves]
    sizes = {a.shape[0] if a.ndim else None for a in leaves}
    if len(sizes) != 1 or None in sizes or 0 in sizes:
        raise InputError(f"shard_batch needs leaves with one common non-empty batch dimension, got leading "
                         f"dims {sorted(map(str, sizes))}")
    n = sizes.pop()
    d = mesh.shape[axis]
    padded = -(-n // d) * d
    sh = batch_sharding(mesh, axis)
    out = [jax.device_put(_pad(a, padded), sh) for a in leaves]
    return jax.tree_util.tree_unflatten(treedef, out), n


def _pad(a: jax.Array, rows: int) -> jax.Array:
    if a.shape[0] == rows:
        return a
    return jnp.concatenate([a, jnp.repeat(a[-1:], rows - a.shape[0], axis=0)], axis=0)


def unpad(tree: Any, n: int) -> Any:
    """Keep the first ``n`` rows of every leaf (undo the padding of `shard_batch`)."""
    return jax.tree_util.tree_map(lambda a: a[:n], tree)


def map_sharded(fn: Callable[..., Any], *batched: Any, mesh: Mesh | None = None) -> Any:
    """Run ``fn(*batched)`` with every batched argument sharded over ``mesh``; return unpadded outputs.

    ``batched`` are arrays or pytrees with a common leading batch size ``B``; every output leaf must
    have the (padded) batch as leading dimension.
    """
    sharded, n = shard_batch(tuple(batched), mesh)
    return unpad(fn(*sharded), n)
