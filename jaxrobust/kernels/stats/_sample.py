"""Sample plumbing shared by the statistics kernels: float promotion, validation, per-row vmapping, sorting."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from ...errors import InputError


def as_float(x):
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        x = x.astype(jnp.result_type(float))
    return x


def is_concrete(*xs) -> bool:
    return not any(isinstance(x, jax.core.Tracer) for x in xs)


def check_sample(x, *, positive=False, min_n=2):
    if x.ndim < 1 or x.shape[-1] < min_n:
        raise InputError(f"sample must have shape (..., n) with n >= {min_n}, got {x.shape}")
    if is_concrete(x):
        xv = np.asarray(x)
        if not np.all(np.isfinite(xv)):
            raise InputError("sample contains NaN or inf")
        if positive and not np.all(xv > 0):
            raise InputError("Box-Cox needs strictly positive data (got a value <= 0)")


def over_rows(fn, x):
    """Apply ``fn(row)`` to every length-n row of ``x`` (..., n); outputs get x's leading shape."""
    lead = x.shape[:-1]
    out = jax.vmap(fn)(x.reshape((-1, x.shape[-1])))
    return jax.tree_util.tree_map(lambda o: o.reshape(lead + o.shape[1:]), out)


def sort_samples(x):
    """Ascending sort along the last axis through order-preserving integer keys (XLA sorts integers
    several times faster than floats on CPU); NaN last."""
    ity = jnp.int32 if x.dtype.itemsize == 4 else jnp.int64
    if x.dtype.itemsize not in (4, 8):
        return jnp.sort(x, axis=-1)
    flip = jnp.asarray(np.iinfo(ity).max, ity)
    i = jax.lax.bitcast_convert_type(x, ity)
    i = jnp.where(i < 0, i ^ flip, i)
    i = jax.lax.sort(i, dimension=x.ndim - 1, is_stable=False)
    return jax.lax.bitcast_convert_type(jnp.where(i < 0, i ^ flip, i), x.dtype)
