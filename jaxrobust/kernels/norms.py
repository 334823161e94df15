"""Lp balls of perturbations: the norms' names, distances, dual norms, projections, ascent steps, ball sampling.

A perturbation ball is ``{x' : ||x' - x||_p <= eps} ∩ domain`` for ``p`` in `NORMS` (``"linf"``, ``"l2"``,
``"l1"``; the command line also takes ``inf``, ``2``, ``1``). Every ball lies in the L∞ box of the same radius
(``||d||_inf <= ||d||_p``), its *box hull*, which interval bounds use; linear bounds concretise over the ball
itself with the dual norm: ``min over the ball of a . x' = a . x - eps ||a||_q``, ``1/p + 1/q = 1``.

Shapes: batches ``(B, *shape)`` with radii ``eps: (B,)``; coefficient rows ``(R, n)``.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy.special import log_ndtr

from ..errors import InputError

NORMS = ("linf", "l2", "l1")
_ALIASES = {"inf": "linf", "linf": "linf", "2": "l2", "l2": "l2", "1": "l1", "l1": "l1"}
DUAL = {"linf": "l1", "l2": "l2", "l1": "linf"}


def check_norm(norm) -> str:
    """The canonical name (`NORMS`) of ``norm`` (``"inf"``, ``"linf"``, ``"2"``, ``"l2"``, ``"1"``, ``"l1"``)."""
    name = _ALIASES.get(str(norm).lower())
    if name is None:
        raise InputError(f"unknown norm {norm!r}; choose inf, 2 or 1")
    return name


def row_norm(d, norm: str) -> jax.Array:
    """``||d[b]||_p`` per row of ``d: (B, *shape)`` -> ``(B,)`` (numpy in numpy's precision for a numpy array)."""
    xp = np if isinstance(d, np.ndarray) else jnp
    flat = xp.abs(d.reshape(d.shape[0], -1))
    if norm == "linf":
        return xp.max(flat, axis=1, initial=0.0)
    if norm == "l2":
        return xp.sqrt(xp.sum(flat * flat, axis=1))
    return xp.sum(flat, axis=1)


def dual_norm(rows, norm: str) -> jax.Array:
    """``||rows[r]||_q`` for the dual ``q`` of ``norm`` -> ``(R,)``: the largest ``a . d`` over ``||d||_p <= 1``."""
    return row_norm(rows, DUAL[norm])


def _bcast(v, like):
    return v.reshape(v.shape + (1,) * (like.ndim - 1))


def project(x_adv, x, eps, norm: str = "linf", domain=None) -> jax.Array:
    """``x_adv: (B, *shape)`` projected onto the ``norm`` ball of radius ``eps: (B,)`` around ``x``, then clipped to
    the domain box. Clipping only moves coordinates toward ``x`` (inside the domain), so the result stays in the
    ball; for L∞ and L2 it is the exact projection onto the ball (L∞: onto ball ∩ domain)."""
    if norm == "linf":
        e = _bcast(eps, x)
        out = jnp.clip(x_adv, x - e, x + e)
    else:
        d = x_adv - x
        if norm == "l2":
            d = d * _bcast(jnp.minimum(1.0, eps / jnp.maximum(row_norm(d, "l2"), 1e-30)), x)
        else:
            d = _project_l1(d, eps)
        n = row_norm(d, norm)  # round-off can leave the norm an ulp or a few above eps: pull those inside
        out = x + d * _bcast(jnp.where(n > eps, eps / jnp.maximum(n, 1e-30) * (1 - 2 ** -20), 1.0), x)
    return out if domain is None else jnp.clip(out, domain[0], domain[1])


def _project_l1(d, eps):
    """Euclidean projection of every row of ``d: (B, *shape)`` onto the L1 ball of radius ``eps: (B,)`` (Duchi et
    al., ICML 2008: soft-thresholding at the level that leaves L1 norm ``eps``)."""
    flat = d.reshape(d.shape[0], -1)
    a = jnp.abs(flat)
    u = -jnp.sort(-a, axis=1)
    css = jnp.cumsum(u, axis=1)
    j = jnp.arange(1, flat.shape[1] + 1, dtype=flat.dtype)
    rho = jnp.sum(u - (css - eps[:, None]) / j > 0, axis=1)
    theta = (jnp.take_along_axis(css, jnp.maximum(rho - 1, 0)[:, None], axis=1)[:, 0] - eps) / jnp.maximum(rho, 1)
    inside = jnp.sum(a, axis=1) <= eps
    out = jnp.sign(flat) * jnp.maximum(a - jnp.where(inside, 0.0, theta)[:, None], 0.0)
    return out.reshape(d.shape)


def unit_maximiser(rows, norm: str) -> jax.Array:
    """The point ``d`` of the unit ``norm`` ball maximising ``rows[r] . d`` (its value the dual norm), per row of
    ``rows: (R, *shape)``: ``sign(rows)`` (L∞), ``rows / ||rows||_2`` (L2), the signed basis vector of the
    largest ``|rows|`` (L1, a vertex)."""
    if norm == "linf":
        return jnp.sign(rows)
    if norm == "l2":
        return rows / _bcast(jnp.maximum(row_norm(rows, "l2"), 1e-30), rows)
    flat = rows.reshape(rows.shape[0], -1)
    j = jnp.argmax(jnp.abs(flat), axis=1)
    vertex = jax.nn.one_hot(j, flat.shape[1], dtype=flat.dtype) * jnp.sign(jnp.take_along_axis(flat, j[:, None], 1))
    return vertex.reshape(rows.shape)


def ascent(g, norm: str, x=None, domain=None, sparsity: float = 0.01) -> jax.Array:
    """Steepest-ascent direction of unit ``norm`` for gradients ``g: (B, *shape)``: ``sign(g)`` (L∞), ``g / ||g||_2``
    (L2), or for L1 the signs of the largest ``sparsity`` share of the coordinates, scaled to L1 norm 1 (a
    sparse L1 step, as SLIDE takes; the single largest coordinate alone stalls on saturated pixels). With
    ``x`` and ``domain``, L1 steps skip the coordinates the domain blocks in the gradient's direction."""
    if norm != "l1":
        return unit_maximiser(g, norm)
    flat = g.reshape(g.shape[0], -1)
    a = jnp.abs(flat)
    if domain is not None and x is not None:
        xf = x.reshape(flat.shape)
        lo = jnp.broadcast_to(domain[0], x.shape).reshape(flat.shape)
        hi = jnp.broadcast_to(domain[1], x.shape).reshape(flat.shape)
        a = jnp.where(jnp.where(flat > 0, xf >= hi, xf <= lo), 0.0, a)
    k = max(1, int(round(sparsity * flat.shape[1])))
    kth = jax.lax.top_k(a, k)[0][:, -1:]
    pick = (a >= kth) & (a > 0)
    d = jnp.where(pick, jnp.sign(flat), 0.0)
    return (d / jnp.maximum(jnp.sum(jnp.abs(d), axis=1, keepdims=True), 1.0)).reshape(g.shape)


def l1_ball(z) -> jax.Array:
    """Points ``(N, n)`` uniform in the unit L1 ball from standard normal latents ``z: (N, n + 1)``: Laplace
    coordinates ``L_i`` and an exponential ``E`` (by their quantile functions), ``L / (||L||_1 + E)``."""
    lap = -jnp.sign(z[:, :-1]) * (jnp.log(2.0) + log_ndtr(-jnp.abs(z[:, :-1])))
    e = -log_ndtr(z[:, -1:])
    return lap / (jnp.sum(jnp.abs(lap), axis=1, keepdims=True) + e)
