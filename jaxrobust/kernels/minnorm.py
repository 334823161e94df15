"""Minimum-norm attack in L∞, L2 or L1: the closest counterexample found in one batched pass with an adaptive radius.

A variant of Fast Minimum-Norm (Pintor et al., NeurIPS 2021). Every row keeps a point ``x_t`` and a
radius ``eps_t``, starting from the first-order estimate of the distance to the decision boundary (the loss over
the dual norm of the gradient) and a uniform random point in that ball. Each step is a steepest-ascent step of
the norm (`norms.ascent`) of size ``a_t * eps_t`` projected onto the ``eps_t`` ball ∩ domain, after which the radius changes: while ``x_t`` is misclassified it shrinks by
``1 - gamma_t``; otherwise it grows by ``1 + gamma_t``, never beyond the closest counterexample found, or by
``1 + GROW`` while none was found (a row with a zero gradient and no counterexample restarts at a random
point). ``a_t`` and ``gamma_t`` decay along a half cosine to 1 % of their start. With ``targets = k > 0`` the
``k`` wrong classes whose decision boundaries are closest to ``x`` by a first-order estimate are attacked side
by side (loss ``logit_t - logit_y``) and each input keeps its closest counterexample over all of them.

Each returned point is projected onto the ``eps_max`` ball ∩ domain and re-checked by a plain forward
pass; its distance is measured at exactly that point.
"""
from __future__ import annotations

from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from ..errors import InputError
from .attacks import _bcast, _prepare, attack_loss, margin
from .norms import ascent, check_norm, dual_norm, project, row_norm
from .perturb import SAMPLERS

GROW = 0.15  # relative growth of the radius per step while no counterexample was found


class MinNormResult(NamedTuple):
    """Outcome of a minimum-norm attack on a batch.

    Attributes:
      x_adv: ``(B, *shape)`` closest misclassified point found (some point of the ball where none).
      success: ``(B,)`` bool, ``x_adv`` is misclassified (confirmed by a forward pass).
      distance: ``(B,)`` ``||x_adv - x||_p`` where ``success``, else ``inf``.
      margin: ``(B,)`` ``logit_y - max_{j != y} logit_j`` at ``x_adv``.
    """

    x_adv: jax.Array
    success: jax.Array
    distance: jax.Array
    margin: jax.Array


def min_norm(fn, x, y, eps_max, *, key, steps: int = 60, targets: int = 0, step_size: float = 0.25,
             gamma: float = 0.3, domain=None, unroll=None, norm: str = "linf") -> MinNormResult:
    """Closest counterexample in ``norm`` (``"linf"``, ``"l2"``, ``"l1"``) found within radius ``eps_max`` (scalar
    or ``(B,)``).

    Args:
      fn, x, y, domain: as for `kernels.attacks.pgd`.
      key: PRNG key of the random starts.
      steps: gradient steps.
      targets: ``0`` for the margin loss; ``k > 0`` attacks ``k`` wrong classes side by side (``k * B`` rows).
      step_size: initial step as a fraction of the current radius.
      gamma: initial relative change of the radius per step.
      unroll: as for `kernels.attacks.pgd`.
    Returns:
      `MinNormResult`; ``distance <= eps_max`` wherever ``success``.
    """
    apply, params, x, y, eps_max, domain, has_conv = _prepare(fn, x, y, eps_max, domain)
    steps, targets = int(steps), int(targets)
    if steps < 1 or targets < 0:
        raise InputError(f"steps must be >= 1 and targets >= 0, got steps={steps}, targets={targets}")
    if not (0 < step_size <= 1 and 0 < gamma < 1):
        raise InputError(f"step_size must lie in (0, 1] and gamma in (0, 1), got {step_size}, {gamma}")
    if unroll is None:
        unroll = steps if has_conv else 1
    return _min_norm(apply, params, x, y, eps_max, domain, key, steps, targets, float(step_size), float(gamma),
                     int(unroll), check_norm(norm))


def _cosine(start: float, t, steps: int):
    """``start`` decayed to ``start / 100`` along a half cosine over ``steps``."""
    return start * (0.01 + 0.99 * 0.5 * (1.0 + jnp.cos(jnp.pi * t / steps)))


def _rows(fn, x, y, targets, domain, norm):
    """``(targets (R*B,) or None for the margin loss, R)``: row ``r * B + b`` attacks the wrong class of input
    ``b`` with the ``r``-th smallest first-order estimate of the distance to its decision boundary."""
    if targets == 0:
        return None, 1
    z, vjp = jax.vjp(fn, x)
    C = z.shape[-1]
    onehot = jax.nn.one_hot(y, C, dtype=z.dtype)
    gaps = jax.vmap(lambda j: jax.nn.one_hot(jnp.full(y.shape, j), C, dtype=z.dtype) - onehot)(jnp.arange(C))
    grads = jax.vmap(lambda c: vjp(c)[0])(gaps)  # (C, B, *shape): gradients of logit_j - logit_y
    est = jax.vmap(lambda g, c: _boundary(g, jnp.sum(c * z, axis=-1), x, domain, norm))(grads, gaps)  # (C, B)
    est = jnp.where(onehot.T > 0, jnp.inf, est)
    order = jnp.argsort(est, axis=0)
    k = min(targets, C - 1)
    return jnp.concatenate([order[r] for r in range(k)]), k


@partial(jax.jit, static_argnames=("apply", "steps", "targets", "step_size", "gamma", "unroll", "norm"))
def _min_norm(apply, params, x, y, eps_max, domain, key, steps, targets, step_size, gamma, unroll, norm):
    fn = partial(apply, params)
    B = x.shape[0]
    tr, R = _rows(fn, x, y, targets, domain, norm)
    tile = lambda a: jnp.concatenate([a] * R, axis=0)
    xr, yr, cap = tile(x), tile(y), tile(eps_max)
    loss = "margin" if tr is None else "targeted"

    def objective(xa):
        z = fn(xa)
        l = attack_loss(z, yr, loss, tr)
        return jnp.sum(l), (z, l)

    grad_fn = jax.grad(objective, has_aux=True)
    g, (_, l) = grad_fn(xr)
    e = jnp.minimum(cap, _boundary(g, l, xr, domain, norm))
    sampler = SAMPLERS[norm]

    def start(k, e):
        if norm == "linf":      # the uniform start L∞ runs have always had (their results unchanged)
            u = jax.random.uniform(k, xr.shape, xr.dtype, -1.0, 1.0)
            return project(xr + _bcast(e, xr) * u, xr, e, "linf", domain)
        return jax.vmap(lambda i, xb, eb: sampler(jax.random.fold_in(k, i), xb, eb, domain))(
            jnp.arange(xr.shape[0]), xr, e)

    def body(t, carry):
        xa, e, best_x, best_d = carry
        g, (z, _) = grad_fn(xa)
        adv = margin(z, yr) < 0
        best_x, best_d = _record(adv, xa, e, best_x, best_d)
        gam = _cosine(gamma, t, steps)
        grow = jnp.where(jnp.isfinite(best_d), jnp.minimum(e * (1 + gam), best_d), e * (1 + GROW))
        e = jnp.minimum(jnp.where(adv, e * (1 - gam), grow), cap)
        xa = project(xa + _bcast(_cosine(step_size, t, steps) * e, xa) * ascent(g, norm, xa, domain), xr, e, norm,
                     domain)
        stuck = ~jnp.isfinite(best_d) & ~jnp.any((g != 0).reshape(g.shape[0], -1), axis=1)
        xa = lax.cond(jnp.any(stuck), lambda: jnp.where(_bcast(stuck, xa), start(jax.random.fold_in(key, t), e), xa),
                      lambda: xa)
        return xa, e, best_x, best_d

    init = (start(key, e), e, xr, jnp.full(cap.shape, jnp.inf, cap.dtype))
    xa, e, best_x, best_d = lax.fori_loop(0, steps, body, init, unroll=unroll)
    best_x, best_d = _record(margin(fn(xa), yr) < 0, xa, e, best_x, best_d)
    pick = jnp.argmin(best_d.reshape(R, B), axis=0)  # (B,)
    best_x = project(best_x.reshape((R, B) + x.shape[1:])[pick, jnp.arange(B)], x, eps_max, norm, domain)
    m = margin(fn(best_x), y)
    dist = row_norm(best_x - x, norm)
    return MinNormResult(best_x, m < 0, jnp.where(m < 0, dist, jnp.inf), m)


def _record(adv, xa, e, best_x, best_d):
    """Keep ``xa: (R*B, *shape)`` where it is misclassified (``adv: (R*B,)``) within a radius ``e`` smaller
    than the best so far."""
    better = adv & (e < best_d)
    return jnp.where(_bcast(better, xa), xa, best_x), jnp.where(better, e, best_d)


def _boundary(g, loss, x, domain, norm):
    """``(R*B,)`` first-order estimate of the ``norm`` distance to the decision boundary from ``x``: the loss over
    the dual norm of the gradient (coordinates the domain blocks in the gradient's direction excluded)."""
    free = jnp.ones_like(g, bool) if domain is None else jnp.where(g > 0, x < domain[1], x > domain[0])
    gq = dual_norm(jnp.where(free, g, 0.0).reshape(g.shape[0], -1), norm)
    return jnp.maximum(-loss, 0.0) / jnp.maximum(gq, 1e-12)
