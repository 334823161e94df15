"""Exact binomial intervals: Beta quantiles, Clopper-Pearson bounds and the sample sizes they call for."""
from __future__ import annotations

import math
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy.special import betainc

from ...errors import InputError
from ._sample import as_float, is_concrete


def _beta_ppf(q, a, b):
    """Quantile of Beta(a, b) at q by bisection on logit(p); uses the upper tail
    ``I_{1-p}(b, a)`` when q > 1/2 so both small p and p near 1 stay accurate."""
    q = jnp.broadcast_to(q, jnp.broadcast_shapes(q.shape, a.shape, b.shape))
    dtype = q.dtype
    lim = -math.log(float(jnp.finfo(dtype).tiny))
    upper = q > 0.5
    target = jnp.where(upper, 1 - q, q)

    def body(_, lohi):
        lo, hi = lohi
        v = 0.5 * (lo + hi)
        p = jax.nn.sigmoid(v)
        pc = jax.nn.sigmoid(-v)
        val = jnp.where(upper, betainc(b, a, pc), betainc(a, b, p))
        below = jnp.where(upper, val > target, val < target)  # quantile lies above v
        return jnp.where(below, v, lo), jnp.where(below, hi, v)

    steps = int(jnp.finfo(dtype).nmant) + 40  # 2·lim / 2**steps is below the dtype's resolution
    lo, hi = jax.lax.fori_loop(0, steps, body, (jnp.full_like(q, -lim), jnp.full_like(q, lim)))
    return jax.nn.sigmoid(0.5 * (lo + hi))


def beta_ppf(q, a, b):
    """Quantile function of the Beta(a, b) distribution (``scipy.stats.beta.ppf``), broadcasting.
    Bisection on ``jax.scipy.special.betainc``; float32 accuracy is limited by betainc for large a+b."""
    q, a, b = (as_float(v) for v in jnp.broadcast_arrays(q, a, b))
    return _beta_ppf(q, a, b)


@partial(jax.jit, static_argnames="side")
def _cp_jit(k, n, confidence, side):
    alpha = 1 - confidence
    q_lo = alpha / 2 if side == "two-sided" else alpha
    q_hi = 1 - q_lo
    kk = jnp.clip(k, 1, n)  # placeholders keep betainc arguments valid on the k=0 / k=n edges
    lower = jnp.where(k > 0, _beta_ppf(q_lo, kk, n - kk + 1), 0.0)
    kk = jnp.clip(k, 0, n - 1)
    upper = jnp.where(k < n, _beta_ppf(q_hi, kk + 1, n - kk), 1.0)
    # closed forms where a Beta parameter is 1: I_p(1, b) = 1 − (1 − p)^b, I_p(a, 1) = p^a
    upper = jnp.where(k == 0, -jnp.expm1(jnp.log(q_lo) / n), upper)
    upper = jnp.where(k == n - 1, jnp.exp(jnp.log(q_hi) / n), upper)
    lower = jnp.where(k == 1, -jnp.expm1(jnp.log1p(-q_lo) / n), lower)
    lower = jnp.where(k == n, jnp.exp(jnp.log(q_lo) / n), lower)
    if side == "upper":
        lower = jnp.zeros_like(lower)
    elif side == "lower":
        upper = jnp.ones_like(upper)
    return lower, upper


def clopper_pearson(k, n, confidence: float = 0.95, side: str = "two-sided"):
    """Exact (Clopper-Pearson) binomial confidence interval for k successes in n trials.

    k, n broadcast (any shape). ``side``: "two-sided" (α/2 in each tail), "upper" (one-sided upper
    bound, interval ``[0, hi]``, SciPy's ``alternative='less'``) or "lower" (``[lo, 1]``,
    ``alternative='greater'``). Equal to ``scipy.stats.binomtest(k, n, alternative=...)
    .proportion_ci(confidence, method='exact')``. Returns ``(lower, upper)``. Concrete (host) counts are
    computed in float64, as numpy arrays (in float32 the Beta quantiles drift by 10 % and more once ``n``
    exceeds ~10^6); under tracing, in the default float dtype.
    """
    if side not in ("two-sided", "upper", "lower"):
        raise InputError(f"side must be 'two-sided', 'upper' or 'lower', got {side!r}")
    if not 0 < confidence < 1:
        raise InputError(f"confidence must be in (0, 1), got {confidence}")
    if is_concrete(k, n):
        k, n = np.broadcast_arrays(np.asarray(k, np.float64), np.asarray(n, np.float64))
        if not (np.all(n >= 1) and np.all((k >= 0) & (k <= n))):
            raise InputError("Clopper-Pearson needs n >= 1 and 0 <= k <= n")
        with jax.enable_x64(True):
            lo, hi = _cp_jit(jnp.asarray(k), jnp.asarray(n), jnp.asarray(confidence, jnp.float64), side)
            return np.asarray(lo), np.asarray(hi)
    k, n = (as_float(v) for v in jnp.broadcast_arrays(k, n))
    return _cp_jit(k, n, jnp.asarray(confidence, k.dtype), side)


def samples_needed(p_max, confidence: float = 0.95, k: int = 0):
    """Smallest n such that observing ``k`` failures in n samples gives a one-sided Clopper-Pearson
    upper bound ``<= p_max`` at ``confidence``.

    For k = 0 this is exact in closed form, ``n = ceil(ln(1-conf) / ln(1-p_max))``, slightly below
    the rule-of-three bound ``ln(1/(1-conf))/p_max`` (≈ 3/p at 95 %). For k > 0, integer bisection
    on n. p_max broadcasts; returns float counts (integers; exact below 2**24 in float32).
    """
    p = as_float(p_max)
    if is_concrete(p) and not np.all((np.asarray(p) > 0) & (np.asarray(p) < 1)):
        raise InputError("p_max must be in (0, 1)")
    if not 0 < confidence < 1 or int(k) != k or k < 0:
        raise InputError("confidence must be in (0, 1) and k a non-negative integer")
    return _samples_needed_jit(p, jnp.asarray(confidence, p.dtype), int(k))


@partial(jax.jit, static_argnames="k")
def _samples_needed_jit(p, conf, k):
    n0 = jnp.ceil(jnp.log1p(-conf) / jnp.log1p(-p))
    if k == 0:
        return n0

    def hi_of(nn):
        return _beta_ppf(jnp.broadcast_to(conf, nn.shape), k + 1.0 + 0 * nn, nn - k)

    lo = jnp.full_like(p, float(k))   # upper bound at n = k is 1 > p_max
    hi = jnp.maximum(n0 * (k + 1) * 4, k + 1.0)

    def body(_, lohi):
        lo, hi = lohi
        mid = jnp.floor(0.5 * (lo + hi))
        good = hi_of(mid) <= p
        return jnp.where(good, lo, mid), jnp.where(good, mid, hi)

    _, hi = jax.lax.fori_loop(0, 64, body, (lo, hi))
    return hi


def samples_needed_half_width(p, half_width, confidence: float = 0.95):
    """Smallest n whose two-sided Clopper-Pearson interval at observed proportion ``p`` (k = p·n,
    continuous) has half-width ``(upper − lower)/2 <= half_width``. Broadcasts; returns float counts."""
    p, h = (as_float(v) for v in jnp.broadcast_arrays(p, half_width))
    if is_concrete(p, h) and not (np.all((np.asarray(p) >= 0) & (np.asarray(p) <= 1)) and np.all(np.asarray(h) > 0)):
        raise InputError("p must be in [0, 1] and half_width > 0")
    return _half_width_jit(p, h, jnp.asarray(confidence, p.dtype))


@jax.jit
def _half_width_jit(p, h, conf):
    def width(nn):
        lo, hi = _cp_jit(p * nn, nn, conf, "two-sided")
        return 0.5 * (hi - lo)

    lo = jnp.zeros_like(p)
    hi = jnp.full_like(p, 2.0 ** min(jnp.finfo(p.dtype).nmant + 1, 40))

    def body(_, lohi):
        lo, hi = lohi
        mid = jnp.floor(0.5 * (lo + hi))
        good = width(jnp.maximum(mid, 1.0)) <= h
        return jnp.where(good, lo, mid), jnp.where(good, mid, hi)

    _, hi = jax.lax.fori_loop(0, 48, body, (lo, hi))
    return jnp.maximum(hi, 1.0)
