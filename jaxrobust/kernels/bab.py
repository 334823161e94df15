"""Linear bounds of a `ReluChain` over ReLU-split subdomains of an input box (β-CROWN), batched.

A subdomain of the box ``[lo, hi]`` is given by split states per hidden neuron: ``+1`` (``z >= 0``),
``-1`` (``z <= 0``) or ``0`` (free). Its output bound is CROWN's back-substitution with

* intermediate pre-activation bounds computed once for the box (`box_bounds`) and clamped by the
  splits (``+1``: ``l = max(l, 0)``; ``-1``: ``u = min(u, 0)``), so split neurons are linear;
* optimisable lower slopes ``alpha in [0, 1]`` of the unstable neurons (α-CROWN);
* Lagrange multipliers ``beta >= 0`` of the split constraints ``s z >= 0``: for any such ``beta``,
  ``min f >= min (f - beta s z)`` over the relaxation, which carries the splits of earlier layers
  into the bound (β-CROWN, Wang et al. 2021).

Both are optimised per subdomain with projected Adam; every iterate is a sound bound, so the best
one seen is returned. Bounds are widened by the round-off margin of `bounds.widen`
(``MARGIN_REL`` times the magnitude of the summed terms, plus ``MARGIN_ABS``).

Shapes: ``D`` subdomains, hidden widths ``n_1..n_{L-1}``, ``n_0`` inputs, ``n_L`` outputs.
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

from .bounds import MARGIN_ABS, MARGIN_REL
from .relu_chain import ReluChain


class DomainBounds(NamedTuple):
    """Per subdomain: ``lower (D,)`` sound lower bound of ``c . out``; ``x_star (D, n_0)`` the box point
    minimising the final linear bound (a counterexample candidate); ``branch (D,)`` the flat index of
    the free unstable neuron to split next (-1: none left); ``alpha, beta (D, H)`` the optimised
    slopes and multipliers over all ``H`` hidden neurons (a warm start for the children)."""
    lower: jax.Array
    x_star: jax.Array
    branch: jax.Array
    alpha: jax.Array
    beta: jax.Array


def box_bounds(chain: ReluChain, lo, hi, *, steps: int = 20, lr: float = 0.1):
    """Pre-activation bounds ``(lowers, uppers)`` of every hidden layer over the box ``lo, hi: (n_0,)``:
    layer 1 exactly, deeper layers by α-CROWN (``steps`` Adam iterations on per-bound slopes of the
    earlier layers; 0: adaptive slopes) intersected with interval arithmetic."""
    return _box_bounds(chain, lo, hi, steps, lr)


@functools.partial(jax.jit, static_argnums=(3,))
def _box_bounds(chain, lo, hi, steps, lr):
    lowers, uppers = [], []
    mid, rad = (lo + hi) / 2, (hi - lo) / 2
    for k in range(1, len(chain.weights)):
        w, b = chain.weights[k - 1], chain.biases[k - 1]
        if k == 1:
            c, r = w @ mid + b, jnp.abs(w) @ rad
            l, u = c - r, c + r
        else:
            pl, pu = jnp.maximum(lowers[-1], 0), jnp.maximum(uppers[-1], 0)
            c, r = w @ ((pl + pu) / 2) + b, jnp.abs(w) @ ((pu - pl) / 2)
            n = w.shape[0]
            eye = jnp.eye(n, dtype=w.dtype)
            lam = jnp.concatenate([eye, -eye])[None]
            ls_, us_ = [l_[None] for l_ in lowers], [u_[None] for u_ in uppers]

            def run(alphas, k=k, lam=lam, ls_=ls_, us_=us_):
                bound, mag, _, _ = _backward(chain, k, lam, lo[None], hi[None], ls_, us_, alphas, None)
                return bound[0] - (MARGIN_REL * mag[0] + MARGIN_ABS), None

            alphas = [jnp.broadcast_to(_adaptive(l_, u_), (1, 2 * n, l_.shape[-1])) for l_, u_ in zip(ls_, us_)]
            best, _, _ = _ascend(run, alphas, steps, optax.adam(lr), lambda a: [jnp.clip(x, 0, 1) for x in a])
            l = jnp.maximum(c - r, best[:n])
            u = jnp.minimum(c + r, -best[n:])
        lowers.append(l)
        uppers.append(u)
    return tuple(lowers), tuple(uppers)


def _adaptive(l, u):
    """CROWN's default lower slope: 1 where ``u >= -l`` (and the neuron can be active), else 0; ``(D, 1, n)``."""
    return ((u >= -l) & (u > 0)).astype(l.dtype)[:, None]


def _ascend(run, params, steps, opt, project):
    """Projected gradient ascent on ``sum(run(params)[0])``; every iterate is sound, so the elementwise best
    values seen are returned with the aux of the iterate that gave them (leading axes as the values)
    and the final params: ``(best, aux, params)``."""
    best, aux = run(params)
    if not steps:
        return best, aux, params

    def pick(better, new, old):
        return jnp.where(better.reshape(better.shape + (1,) * (new.ndim - better.ndim)), new, old)

    def step(carry, _):
        p, state, best, aux = carry
        (_, (val, a)), grad = jax.value_and_grad(lambda q: _sum_aux(run(q)), has_aux=True)(p)
        better = val > best
        aux = jax.tree_util.tree_map(functools.partial(pick, better), a, aux)
        upd, state = opt.update(jax.tree_util.tree_map(jnp.negative, grad), state, p)
        return (project(optax.apply_updates(p, upd)), state, jnp.maximum(best, val), aux), None

    (params, _, best, aux), _ = lax.scan(step, (params, opt.init(params), best, aux), None, length=steps)
    val, a = run(params)
    better = val > best
    return jnp.maximum(best, val), jax.tree_util.tree_map(functools.partial(pick, better), a, aux), params


def clamp(lowers, uppers, splits):
    """Intermediate bounds restricted to the subdomains: per layer ``(D, n_i)`` from ``(n_i,)`` and splits."""
    ls = tuple(jnp.where(s > 0, jnp.maximum(l, 0), l) for l, s in zip(lowers, splits))
    us = tuple(jnp.where(s < 0, jnp.minimum(u, 0), u) for u, s in zip(uppers, splits))
    return ls, us


def _relaxation(l, u):
    """Upper line ``a <= us z + ui`` of ReLU on ``[l, u]`` and the unstable mask (all ``(D, n)``)."""
    unstable = (l < 0) & (u > 0)
    us = jnp.where(unstable, u / jnp.where(unstable, u - l, 1), (l >= 0).astype(l.dtype))
    ui = jnp.where(unstable, -l * us, 0)
    return us, ui, unstable


def _backward(chain: ReluChain, k, lam, lo, hi, ls, us, alphas, betas_s):
    """Lower bounds ``(D, R)`` of ``lam[d, r] . z_k`` (``lam: (D, R, n_k)``, 1-based layer ``k``).

    ``ls, us``: bounds ``(D, n_i)`` of hidden layers ``i < k``; ``alphas``: lower slopes of unstable
    neurons, broadcastable to ``(D, R, n_i)``; ``betas_s``: ``beta * split`` per layer or None.
    Returns ``(bound, mag, lam_x, lam_as)``: ``mag (D, R)`` the magnitude of the summed terms (for the
    round-off margin), ``lam_x (D, R, n_0)`` and the coefficients ``lam_as`` on each ReLU output.
    """
    w, b = chain.weights[k - 1], chain.biases[k - 1]
    bias = lam @ b
    mag = jnp.abs(bias)
    lam_as = [None] * (k - 1)
    lam = lam @ w
    for i in range(k - 1, 0, -1):
        l, u = ls[i - 1][:, None], us[i - 1][:, None]
        upper_slope, upper_icpt, unstable = _relaxation(l, u)
        lower_slope = jnp.where(unstable, alphas[i - 1], (l >= 0).astype(l.dtype))
        lam_as[i - 1] = lam
        pos, neg = jnp.maximum(lam, 0), jnp.minimum(lam, 0)
        lam = pos * lower_slope + neg * upper_slope
        t = jnp.sum(neg * upper_icpt, axis=-1)
        if betas_s is not None:
            lam = lam - betas_s[i - 1]
        bb = lam @ chain.biases[i - 1]
        bias, mag = bias + t + bb, mag + jnp.abs(t) + jnp.abs(bb)
        lam = lam @ chain.weights[i - 1]
    mid, rad = ((lo + hi) / 2)[:, None], ((hi - lo) / 2)[:, None]
    lin = jnp.sum(lam * mid, -1) - jnp.sum(jnp.abs(lam) * rad, -1)
    return bias + lin, mag + jnp.sum(jnp.abs(lam) * (jnp.abs(mid) + rad), -1), lam, lam_as


@functools.partial(jax.jit, static_argnames=("steps",))
def domain_bounds(chain: ReluChain, lo, hi, lowers, uppers, splits, c, init=None, *, steps: int = 20,
                  lr_alpha: float = 0.1, lr_beta: float = 0.05) -> DomainBounds:
    """β-CROWN lower bounds of ``c[d] . out`` over subdomains ``d`` of the box ``lo, hi: (n_0,)``.

    ``lowers, uppers``: box pre-activation bounds per hidden layer ``(n_i,)`` (`box_bounds`);
    ``splits``: per hidden layer ``(D, n_i)`` int8 in {-1, 0, 1}; ``c: (D, n_L)``; ``init``: None
    (adaptive slopes, zero multipliers) or ``(alpha, beta)``, each ``(D, H)``, to start from.
    ``steps = 0`` evaluates the starting point only (plain CROWN without ``init``).
    """
    D = c.shape[0]
    ls, us = clamp(lowers, uppers, splits)
    empty = functools.reduce(jnp.logical_or, [jnp.any(l > u, axis=-1) for l, u in zip(ls, us)])
    ls = tuple(jnp.minimum(l, u) for l, u in zip(ls, us))
    sf = [s.astype(c.dtype)[:, None] for s in splits]
    lam0 = c[:, None, :]
    L = len(chain.weights)
    lo_b, hi_b = jnp.broadcast_to(lo, (D,) + lo.shape), jnp.broadcast_to(hi, (D,) + hi.shape)

    def run(params):
        alphas, betas = params
        bs = [jnp.maximum(bt, 0) * s for bt, s in zip(betas, sf)]
        bound, mag, lam_x, _ = _backward(chain, L, lam0, lo_b, hi_b, ls, us, alphas, bs)
        return bound[:, 0] - (MARGIN_REL * mag[:, 0] + MARGIN_ABS), lam_x[:, 0]

    widths = [l.shape[-1] for l in ls]
    if init is None:
        alphas = [_adaptive(l, u) for l, u in zip(ls, us)]
        betas = [jnp.zeros_like(a) for a in alphas]
    else:
        alphas, betas = ([p[:, None] for p in _split(a.astype(c.dtype), widths)] for a in init)
    opt = optax.multi_transform({"a": optax.adam(lr_alpha), "b": optax.adam(lr_beta)}, ("a", "b"))
    project = lambda p: ([jnp.clip(x, 0, 1) for x in p[0]], [jnp.maximum(x, 0) for x in p[1]])
    best, lam_x, params = _ascend(run, (alphas, betas), steps, opt, project)
    bs = [jnp.maximum(bt, 0) * s for bt, s in zip(params[1], sf)]
    lam_as = _backward(chain, L, lam0, lo_b, hi_b, ls, us, params[0], bs)[3]
    best = jnp.where(empty, jnp.inf, best)
    x_star = jnp.where(lam_x >= 0, lo_b, hi_b)
    scores = jnp.concatenate([_scores(la[:, 0], l, u, a[:, 0], s[:, 0])
                              for la, l, u, a, s in zip(lam_as, ls, us, params[0], sf)], axis=-1)
    branch = jnp.where(jnp.max(scores, -1) > -jnp.inf, jnp.argmax(scores, -1), -1)
    flat = lambda ps: jnp.concatenate([p[:, 0] for p in ps], axis=-1)
    return DomainBounds(best, x_star, branch.astype(jnp.int32), flat(params[0]), flat(params[1]))


def _split(a, widths):
    """``(D, H) -> [(D, n_i)]``."""
    return jnp.split(a, list(np.cumsum(widths)[:-1]), axis=-1)


def _sum_aux(out):
    val, aux = out
    return jnp.sum(val), (val, aux)


def _scores(lam_a, l, u, alpha, s):
    """Branching scores ``(D, n)`` (BaBSR-like): how much the relaxation of each free unstable neuron
    loosens the bound, ``-inf`` for neurons that cannot be split."""
    unstable = (l < 0) & (u > 0) & (s == 0)
    gap_u = jnp.where(unstable, u * -l / jnp.where(unstable, u - l, 1), 0)
    gap_l = jnp.minimum((1 - alpha) * u, -alpha * l)
    sc = jnp.maximum(-lam_a, 0) * gap_u + jnp.maximum(lam_a, 0) * jnp.where(unstable, gap_l, 0)
    return jnp.where(unstable, sc, -jnp.inf)
