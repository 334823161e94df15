"""Random affine data augmentation (rotation, shear, shift, zoom) of image batches, in JAX.

Every image gets its own random transform, applied by bilinear resampling about the image centre
with zero fill outside (the background of MNIST-like data). All functions are pure and jittable.
"""
from __future__ import annotations

from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from .errors import InputError


class AffineRange(NamedTuple):
    """Half-widths of the uniform ranges of a random affine transform.

    Attributes:
      rotation: degrees, angle in ``[-rotation, rotation]``.
      shear: degrees, shear angle in ``[-shear, shear]``.
      shift: fraction of height / width, translation in ``[-shift, shift] * size`` per axis.
      zoom: scale factor in ``[1 - zoom, 1 + zoom]``.
    """

    rotation: float = 10.0
    shear: float = 10.0
    shift: float = 0.1
    zoom: float = 0.1


def affine_matrices(key, n: int, ranges: AffineRange = AffineRange()) -> tuple[jax.Array, jax.Array]:
    """``n`` random transforms as ``(A: (n, 2, 2), t: (n, 2))`` mapping output to input pixel offsets
    (relative to the centre, in pixels for ``t`` per unit of image size, i.e. multiply by ``(H, W)``)."""
    kr, ks, kt, kz = jax.random.split(key, 4)
    u = lambda k, s, h: jax.random.uniform(k, s, minval=-h, maxval=h)  # noqa: E731
    theta = jnp.deg2rad(u(kr, (n,), ranges.rotation))
    shear = jnp.tan(jnp.deg2rad(u(ks, (n,), ranges.shear)))
    zoom = 1.0 + u(kz, (n, 2), ranges.zoom)
    c, s = jnp.cos(theta), jnp.sin(theta)
    rot = jnp.stack([jnp.stack([c, -s], -1), jnp.stack([s, c], -1)], -2)
    sh = jnp.stack([jnp.stack([jnp.ones(n), shear], -1), jnp.stack([jnp.zeros(n), jnp.ones(n)], -1)], -2)
    a = rot @ sh / zoom[:, None, :]
    return a, u(kt, (n, 2), ranges.shift)


def warp(images: jax.Array, a: jax.Array, t: jax.Array) -> jax.Array:
    """Resample ``images: (N, H, W, C)``: output pixel ``p`` reads input ``A (p - centre) + centre - t * (H, W)``
    (bilinear, zero outside); ``a: (N, 2, 2)``, ``t: (N, 2)``."""
    n, h, w, ch = images.shape
    rows, cols = jnp.meshgrid(jnp.arange(h, dtype=jnp.float32), jnp.arange(w, dtype=jnp.float32), indexing="ij")
    centre = jnp.array([(h - 1) / 2, (w - 1) / 2], jnp.float32)
    grid = jnp.stack([rows, cols], -1).reshape(-1, 2) - centre  # (HW, 2)

    def one(img, a1, t1):
        src = grid @ a1.T + centre - t1 * jnp.array([h, w], jnp.float32)  # (HW, 2)
        sample = lambda chan: jax.scipy.ndimage.map_coordinates(  # noqa: E731
            chan, [src[:, 0], src[:, 1]], order=1, mode="constant", cval=0.0)
        return jax.vmap(sample, in_axes=2, out_axes=1)(img).reshape(h, w, ch)

    return jax.vmap(one)(images, a, t)


@partial(jax.jit, static_argnames=("ranges",))
def random_affine(key, images: jax.Array, ranges: AffineRange = AffineRange()) -> jax.Array:
    """Each of ``images: (N, H, W, C)`` under its own random affine transform drawn from ``ranges``."""
    a, t = affine_matrices(key, images.shape[0], ranges)
    return warp(images, a, t)


def augmented_copies(key, x, y, *, copies: int = 1, ranges: AffineRange = AffineRange(),
                     batch_size: int = 2048) -> tuple[np.ndarray, np.ndarray]:
    """The augmented training set: ``x: (N, H, W, C)`` followed by ``copies`` randomly transformed copies.

    Returns ``(x': ((copies + 1) N, H, W, C) float32, y': ((copies + 1) N,))`` as numpy arrays.
    """
    x = np.asarray(x, np.float32)
    y = np.asarray(y)
    if x.ndim != 4 or len(y) != len(x):
        raise InputError(f"images must be (N, H, W, C) with one label each, got {x.shape} and {y.shape}")
    if copies < 0:
        raise InputError(f"copies must be >= 0, got {copies}")
    out = [x]
    for c in range(copies):
        kc = jax.random.fold_in(key, c)
        out.append(np.concatenate([np.asarray(random_affine(jax.random.fold_in(kc, i), x[i:i + batch_size], ranges))
                                   for i in range(0, len(x), batch_size)]))
    return np.concatenate(out), np.tile(y, copies + 1)
