"""Statistics kernels for RoMA and robustness-distribution analysis (pure JAX, jittable, batched).

Every function that takes a sample takes an array of shape ``(..., n)``: the last axis is the sample,
leading axes are independent inputs (images) and are vmapped over. Results have shape ``(...)``
unless stated. ``n`` is static (it fixes critical values and iteration constants at trace time).
Computation is in the floating dtype of the input (float32 by default, float64 with
``jax_enable_x64``); integer input is promoted to the default float dtype.

Conventions shared with SciPy (the reference the tests compare against):

* :func:`anderson_normal` is ``scipy.stats.anderson(x, 'norm')``: σ with ddof=1, critical values
  ``round(A / (1 + 0.75/n + 2.25/n²), 3)``, significance levels 15, 10, 5, 2.5, 1 percent.
* :func:`boxcox_mle` / :func:`yeojohnson_mle` maximise ``scipy.stats.boxcox_llf`` /
  ``yeojohnson_llf``: a 17-point grid in the scale-free variable ``t = λ·std(log x)`` (|t| <= 25),
  then 8 safeguarded Newton steps on the analytic derivative inside the best grid cell (fixed
  iteration counts, so it vmaps). Yeo-Johnson λ is limited to SciPy's overflow-safe bounds for the
  dtype; for x >= 0 Yeo-Johnson is Box-Cox of 1 + x and is computed that way.
* Box-Cox needs positive data. Inside ``jit`` non-positive samples give ``λ = NaN``; called eagerly
  on concrete arrays the public Box-Cox functions raise :class:`~jaxrobust.errors.InputError`.

Numerics: Box-Cox is evaluated on centred logs, ``u = expm1(λ(log x − m) − c)/λ``, an affine image
of ``boxcox(x, λ)`` (``m`` = mean log, ``c`` shifts the exponent to avoid overflow), with Taylor
series near λ = 0; the Anderson-Darling statistic is summed as ``K(n) + 2 Σ KL(u_i ‖ F_i)``
(non-negative terms, ``K(n)`` in float64 at trace time). Against SciPy (float64 reference) float32
reaches A² to ~1e-5 relative and λ to ~2e-4 relative; float64 agrees to ~1e-12 and to SciPy's own
optimiser tolerance. Sorting goes through order-preserving integer keys (much faster on XLA:CPU).
"""
from __future__ import annotations

import enum
import math
from collections.abc import Callable
from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy.special import betainc, log_ndtr, ndtr

from ..errors import InputError

SIGNIFICANCE_LEVELS = (15.0, 10.0, 5.0, 2.5, 1.0)
"""Significance levels (percent) of :func:`anderson_normal`'s critical values, as in SciPy."""
_AD_NORMAL_A = np.array([0.561, 0.631, 0.752, 0.873, 1.035])
_GRID_T = 0.5 * np.sinh(np.linspace(-4.6, 4.6, 17))  # λ·scale grid, dense near 0, reaching ±25
_NEWTON_STEPS = 8
_EXP_SHIFT = 20.0  # exponents above this are shifted down before exp (overflow guard)


class RomaStatus(enum.IntEnum):
    """Outcome of the RoMA normality procedure, per input."""
    NORMAL = 0       # raw confidences pass Anderson-Darling
    BOXCOX = 1       # normal after Box-Cox with the MLE λ
    YEOJOHNSON = 2   # Box-Cox failed (or data not positive); normal after Yeo-Johnson
    FAIL = 3         # no transform made the sample normal: no parametric plr


# ----------------------------------------------------------------------------- helpers

def _as_float(x):
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        x = x.astype(jnp.result_type(float))
    return x


def _is_concrete(*xs) -> bool:
    return not any(isinstance(x, jax.core.Tracer) for x in xs)


def _check_sample(x, *, positive=False, min_n=2):
    if x.ndim < 1 or x.shape[-1] < min_n:
        raise InputError(f"sample must have shape (..., n) with n >= {min_n}, got {x.shape}")
    if _is_concrete(x):
        xv = np.asarray(x)
        if not np.all(np.isfinite(xv)):
            raise InputError("sample contains NaN or inf")
        if positive and not np.all(xv > 0):
            raise InputError("Box-Cox needs strictly positive data (got a value <= 0)")


def _over_rows(fn, x):
    """Apply ``fn(row)`` to every length-n row of ``x`` (..., n); outputs get x's leading shape."""
    lead = x.shape[:-1]
    out = jax.vmap(fn)(x.reshape((-1, x.shape[-1])))
    return jax.tree_util.tree_map(lambda o: o.reshape(lead + o.shape[1:]), out)


def _exprel_coefs(dtype, order):
    """Taylor coefficients of the ``order``-th derivative of exprel(t) = expm1(t)/t on |t| < 1/2."""
    terms = 10 if jnp.finfo(dtype).bits <= 32 else 18
    return [math.factorial(k + order) / (math.factorial(k) * math.factorial(k + order + 1)) for k in range(terms)]


def _poly(coefs, t):
    acc = jnp.zeros_like(t)
    for c in reversed(coefs):
        acc = acc * t + c
    return acc


def _pow_terms(kappa, L, c, order):
    """``v(κ) = (exp(κL − c) − 1)/κ`` elementwise (``L`` at κ = 0) and its κ-derivatives up to ``order``.

    Uses the Taylor series of exprel where ``|κL| < 1/2`` and ``c == 0`` (no cancellation near
    κ = 0), the closed forms ``v' = (L e − v)/κ``, ``v'' = (L² e − 2v')/κ`` elsewhere. Returns a tuple
    of ``order + 1`` arrays shaped like L.
    """
    t = kappa * L
    series = (jnp.abs(t) < 0.5) & (c == 0)
    ts = jnp.where(series, t, 0.0)
    k_s = jnp.where(series, 1.0, kappa)
    e = jnp.exp(jnp.where(series, 0.0, t - c))
    out, prev = [], None
    for j in range(order + 1):
        ser = L ** (j + 1) * _poly(_exprel_coefs(L.dtype, j), ts)
        if j == 0:
            cl = (e - 1.0) / k_s
        else:
            cl = (L ** j * e - j * prev) / k_s
        prev = jnp.where(series, 0.0, cl)
        out.append(jnp.where(series, ser, cl))
    return tuple(out)


def _log_var_derivs(ys, ref, scale, order):
    """log population variance of y (n,) and its first two λ-derivatives, given y and its derivatives
    ``ys`` = (y, y', y''); values are shifted by ``ref`` (≈ mean) and divided by ``scale`` first."""
    a = (ys[0] - ref[0]) / scale
    m0 = jnp.mean(a)
    v = jnp.mean(a * a) - m0 * m0
    logv = jnp.log(v) + 2 * jnp.log(scale)
    if order == 0:
        return logv, None, None
    a1 = (ys[1] - ref[1]) / scale
    a2 = (ys[2] - ref[2]) / scale
    m1, m2 = jnp.mean(a1), jnp.mean(a2)
    v1 = 2 * (jnp.mean(a * a1) - m0 * m1)
    v2 = 2 * (jnp.mean(a1 * a1 + a * a2) - m1 * m1 - m0 * m2)
    r = v1 / v
    return logv, r, v2 / v - r * r


def _maximise(fgh, lo, hi, grid):
    """Maximise a smooth scalar function on the points ``grid`` (K,), then Newton on f' in the best cell.

    ``fgh(λ, order)`` returns (f, f', f'') (derivatives None for order 0). Safeguarded: each step
    keeps a bracket ``[a, b]`` (f' > 0 at a, < 0 at b) and bisects when the Newton step leaves it or
    the curvature is not negative. ``lo``/``hi`` clip the answer.
    """
    vals = jax.vmap(lambda l: fgh(l, 0)[0])(grid)
    vals = jnp.where(jnp.isfinite(vals), vals, -jnp.inf)  # var underflow to 0 gives +inf: discard
    x0 = grid[jnp.argmax(vals)]
    # nearest distinct grid points around x0 (a clipped grid repeats its end points)
    a = jnp.max(jnp.where(grid < x0, grid, -jnp.inf))
    b = jnp.min(jnp.where(grid > x0, grid, jnp.inf))
    a = jnp.where(jnp.isfinite(a), a, x0)
    b = jnp.where(jnp.isfinite(b), b, x0)

    def step(state, _):
        x, a, b = state
        # one materialised (g, h): XLA may otherwise recompute g per consumer with different
        # rounding, and near the root inconsistent signs would corrupt the bracket
        g, h = jax.lax.optimization_barrier(fgh(x, 2)[1:])
        a = jnp.where(g > 0, x, a)
        b = jnp.where(g > 0, b, x)
        dx = g / h
        xn = x - dx
        ok = (h < 0) & (xn >= a) & (xn <= b)  # inclusive: a converged x sits on a bracket end
        done = (h < 0) & (jnp.abs(dx) <= 8 * jnp.finfo(x.dtype).eps * (1 + jnp.abs(x)))
        return (jnp.where(ok, xn, jnp.where(done, x, 0.5 * (a + b))), a, b), None

    (x, _, _), _ = jax.lax.scan(step, (x0, a, b), length=_NEWTON_STEPS)
    return jnp.clip(x, lo, hi)


def _sort(x):
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


# ----------------------------------------------------------------------------- Anderson-Darling

def _ad_constant(n: int) -> float:
    u = (2 * np.arange(1, n + 1) - 1) / (2.0 * n)
    return float(-n - 2 * np.sum(u * np.log(u) + (1 - u) * np.log1p(-u)))


def _ad_critical(n: int, dtype):
    return jnp.asarray(np.around(_AD_NORMAL_A / (1.0 + 0.75 / n + 2.25 / n / n), 3), dtype)


def _ad_sorted(ys):
    """A² of one ascending sample (n,) against the normal with sample mean and ddof=1 std."""
    n = ys.shape[-1]
    mu = jnp.mean(ys)
    d = ys - mu
    s = jnp.sqrt(jnp.sum(d * d) / (n - 1))
    w = d / s
    u = (2 * jnp.arange(1, n + 1, dtype=ys.dtype) - 1) / (2 * n)
    kl = u * (jnp.log(u) - log_ndtr(w)) + (1 - u) * (jnp.log1p(-u) - log_ndtr(-w))
    return _ad_constant(n) + 2 * jnp.sum(kl)


def _level_index(significance: float) -> int:
    pct = 100.0 * float(significance)
    for i, lvl in enumerate(SIGNIFICANCE_LEVELS):
        if abs(pct - lvl) < 1e-9:
            return i
    raise InputError(f"significance must be one of {[v / 100 for v in SIGNIFICANCE_LEVELS]}, got {significance}")


@jax.jit
def _anderson_jit(x):
    return _over_rows(_ad_sorted, _sort(x))


def anderson_normal(x):
    """Anderson-Darling normality test, equal to ``scipy.stats.anderson(x, 'norm')``.

    x: (..., n). Returns ``(statistic (...), critical_values (5,), significance_levels (5,))``;
    levels are in percent (15, 10, 5, 2.5, 1). Reject normality at a level when statistic > value.
    """
    x = _as_float(x)
    _check_sample(x, min_n=3)
    n = x.shape[-1]
    return (_anderson_jit(x), _ad_critical(n, x.dtype),
            jnp.asarray(SIGNIFICANCE_LEVELS, x.dtype))


def is_normal(x, significance: float = 0.05):
    """Anderson-Darling decision (...) bool: True where normality is *not* rejected at ``significance``
    (one of 0.15, 0.10, 0.05, 0.025, 0.01), i.e. ``statistic <= critical value``."""
    idx = _level_index(significance)
    stat, crit, _ = anderson_normal(x)
    return stat <= crit[idx]


# ----------------------------------------------------------------------------- Box-Cox

def _bc_shift(lam, dmin, dmax):
    return jax.lax.stop_gradient(jnp.maximum(jnp.maximum(lam * dmax, lam * dmin) - _EXP_SHIFT, 0.0))


def _bc_fgh(lam, d, order):
    """Box-Cox log-likelihood plus ``n·mean(log x)`` (d = centred logs, (n,)) and its λ-derivatives.

    Evaluated on ``u = expm1(λd − c)/λ``: ``boxcox_llf = −n·m − n·c − (n/2)·log var(u)``."""
    c = _bc_shift(lam, jnp.min(d), jnp.max(d))
    ys = _pow_terms(lam, d, c, order)
    ref = _pow_terms(lam, jnp.zeros((1,), d.dtype), c, order)
    n = d.shape[-1]
    logv, r, rr = _log_var_derivs(ys, ref, 1.0, order)
    if order == 0:
        return -n * c - 0.5 * n * logv, None, None
    return -n * c - 0.5 * n * logv, -0.5 * n * r, -0.5 * n * rr


def _power_mle(logs, lo, hi):
    """(λ, m, d): maximiser of the power-transform likelihood of ``exp(logs)`` (Box-Cox of x for
    logs = log x; Yeo-Johnson of x >= 0 for logs = log1p x), its mean log and centred logs (n,).
    NaN λ when logs are not finite or constant."""
    m = jnp.mean(logs)
    d = logs - m
    s = jnp.sqrt(jnp.mean(d * d))
    ok = jnp.isfinite(s) & (s > 0)
    s_safe = jnp.where(ok, s, 1.0)
    d_safe = jnp.where(ok, d, jnp.linspace(-1.0, 1.0, d.shape[-1], dtype=d.dtype))
    grid = jnp.clip(jnp.asarray(_GRID_T, logs.dtype) / s_safe, lo, hi)
    lam = _maximise(lambda l, o: _bc_fgh(l, d_safe, o), lo, hi, grid)
    return jnp.where(ok, lam, jnp.nan), m, d


def _bc_mle_1d(x):
    lam, m, d = _power_mle(jnp.log(x), -jnp.inf, jnp.inf)
    return jnp.where(jnp.all(x > 0), lam, jnp.nan), m, d


@jax.jit
def _boxcox_mle_jit(x):
    return _over_rows(lambda r: _bc_mle_1d(r)[0], x)


def boxcox_mle(x):
    """Maximum-likelihood Box-Cox λ (...) of positive samples x (..., n), equal to
    ``scipy.stats.boxcox(x)[1]``. NaN for a sample with a non-positive value or constant data."""
    x = _as_float(x)
    _check_sample(x, positive=True)
    return _boxcox_mle_jit(x)


@jax.jit
def _boxcox_llf_jit(lam, x):
    logx = jnp.log(x)
    m = jnp.mean(logx, axis=-1)
    d = logx - m[..., None]
    flat = jax.vmap(lambda l, r: _bc_fgh(l, r, 0)[0])(lam.reshape(-1), d.reshape((-1, x.shape[-1])))
    return flat.reshape(x.shape[:-1]) - x.shape[-1] * m


def boxcox_llf(lmbda, x):
    """Box-Cox log-likelihood ``scipy.stats.boxcox_llf(λ, x)``: λ broadcastable to (...), x (..., n)."""
    x = _as_float(x)
    _check_sample(x, positive=True)
    return _boxcox_llf_jit(jnp.broadcast_to(jnp.asarray(lmbda, x.dtype), x.shape[:-1]), x)


def boxcox(x, lmbda):
    """Box-Cox transform ``(x**λ − 1)/λ`` (``log x`` at λ = 0) of positive x (..., n);
    λ broadcastable to x's leading shape (...). Equal to ``scipy.special.boxcox``."""
    x = _as_float(x)
    _check_sample(x, positive=True, min_n=1)
    lam = jnp.asarray(lmbda, x.dtype)[..., None]
    return _pow_terms(lam, jnp.log(x), 0.0, 0)[0]


# ----------------------------------------------------------------------------- Yeo-Johnson

def _yj_terms(x, lam, order):
    """Yeo-Johnson transform of x and its λ-derivatives up to ``order``."""
    pos = x >= 0
    vs = _pow_terms(jnp.where(pos, lam, 2 - lam), jnp.log1p(jnp.abs(x)), 0.0, order)
    sign = (1, 1, 1)[: order + 1], (-1, 1, -1)[: order + 1]
    return tuple(jnp.where(pos, p * v, q * v) for p, q, v in zip(*sign, vs))


def _yj_fgh(lam, x, xref, slog, order):
    ys = _yj_terms(x, lam, order)
    ref = _yj_terms(xref, lam, order)
    ext = _yj_terms(jnp.stack([jnp.min(x), jnp.max(x)]), lam, 0)[0]
    scale = jax.lax.stop_gradient(jnp.max(jnp.abs(ext - ref[0])))
    n = x.shape[-1]
    logv, r, rr = _log_var_derivs(ys, ref, jnp.where(scale > 0, scale, 1.0), order)
    f = -0.5 * n * logv + (lam - 1) * slog
    if order == 0:
        return f, None, None
    return f, -0.5 * n * r + slog, -0.5 * n * rr


def _yj_bounds(x):
    """SciPy's overflow-safe λ interval for the dtype and max|x|."""
    fi = jnp.finfo(x.dtype)
    log_eps = math.log(float(fi.eps))
    lo_f = (math.log(float(fi.tiny)) - log_eps) / 2
    hi_f = (math.log(float(fi.max)) + log_eps) / 2
    l1 = jnp.log1p(20 * jnp.max(jnp.abs(x)))
    lb, ub = lo_f / l1, hi_f / l1
    all_neg = jnp.all(x < 0)
    any_neg = jnp.any(x < 0)
    lb2 = jnp.where(all_neg, 2 - ub, jnp.where(any_neg, jnp.maximum(2 - ub, lb), lb))
    ub2 = jnp.where(all_neg, 2 - lb, jnp.where(any_neg, jnp.minimum(2 - lb, ub), ub))
    return lb2, ub2


def _yj_mle_1d(x):
    """General Yeo-Johnson MLE of one real sample (n,)."""
    lb, ub = _yj_bounds(x)
    z = jnp.sign(x) * jnp.log1p(jnp.abs(x))
    s = jnp.std(z)
    s = jnp.where(s > 0, s, 1.0)
    grid = jnp.clip(1.0 + jnp.asarray(_GRID_T, x.dtype) / s, lb, ub)
    xref = jnp.mean(x, keepdims=True)
    lam = _maximise(lambda l, o: _yj_fgh(l, x, xref, jnp.sum(z), o), lb, ub, grid)
    return jnp.where(jnp.all(x == 0), 1.0, lam)


def _yj_mle_nonneg_1d(x):
    """Yeo-Johnson MLE of one sample with x >= 0: the Box-Cox MLE of 1 + x (centred, cancellation-free)."""
    lam = _power_mle(jnp.log1p(x), *_yj_bounds(x))[0]
    return jnp.where(jnp.all(x == 0), 1.0, lam)


@jax.jit
def _yj_mle_jit(x):
    return jax.lax.cond(jnp.all(x >= 0), lambda v: _over_rows(_yj_mle_nonneg_1d, v),
                        lambda v: _over_rows(_yj_mle_1d, v), x)


def yeojohnson_mle(x):
    """Maximum-likelihood Yeo-Johnson λ (...) of real samples x (..., n), equal to
    ``scipy.stats.yeojohnson(x)[1]`` (λ limited to SciPy's overflow-safe bounds for the dtype)."""
    x = _as_float(x)
    _check_sample(x)
    return _yj_mle_jit(x)


@jax.jit
def _yj_llf_jit(lam, x):
    def one(l, r):
        return _yj_fgh(l, r, jnp.mean(r, keepdims=True), jnp.sum(jnp.sign(r) * jnp.log1p(jnp.abs(r))), 0)[0]
    return jax.vmap(one)(lam.reshape(-1), x.reshape((-1, x.shape[-1]))).reshape(x.shape[:-1])


def yeojohnson_llf(lmbda, x):
    """Yeo-Johnson log-likelihood ``scipy.stats.yeojohnson_llf(λ, x)``: λ (...), x (..., n)."""
    x = _as_float(x)
    _check_sample(x)
    return _yj_llf_jit(jnp.broadcast_to(jnp.asarray(lmbda, x.dtype), x.shape[:-1]), x)


def yeojohnson(x, lmbda):
    """Yeo-Johnson transform of x (..., n) with λ broadcastable to (...); equal to
    ``scipy.stats.yeojohnson(x, λ)``."""
    x = _as_float(x)
    return _yj_terms(x, jnp.asarray(lmbda, x.dtype)[..., None], 0)[0]


# ----------------------------------------------------------------------------- normal tail

def normal_tail(delta, mean, std):
    """Upper tail ``P(X > δ)`` of N(mean, std²) and its log10, computed via ``log_ndtr`` so tails
    far below the float range keep an exact log10. Broadcasts. Returns ``(p, log10_p)``."""
    delta, mean, std = (_as_float(v) for v in jnp.broadcast_arrays(delta, mean, std))
    logp = log_ndtr((mean - delta) / std)
    return jnp.exp(logp), logp / math.log(10.0)


# ----------------------------------------------------------------------------- Clopper-Pearson

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
    q, a, b = (_as_float(v) for v in jnp.broadcast_arrays(q, a, b))
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
    .proportion_ci(confidence, method='exact')``. Returns ``(lower, upper)``.
    """
    if side not in ("two-sided", "upper", "lower"):
        raise InputError(f"side must be 'two-sided', 'upper' or 'lower', got {side!r}")
    if not 0 < confidence < 1:
        raise InputError(f"confidence must be in (0, 1), got {confidence}")
    k, n = (_as_float(v) for v in jnp.broadcast_arrays(k, n))
    if _is_concrete(k, n) and not (np.all(np.asarray(n) >= 1) and np.all((np.asarray(k) >= 0) & (np.asarray(k) <= np.asarray(n)))):
        raise InputError("Clopper-Pearson needs n >= 1 and 0 <= k <= n")
    return _cp_jit(k, n, jnp.asarray(confidence, k.dtype), side)


def samples_needed(p_max, confidence: float = 0.95, k: int = 0):
    """Smallest n such that observing ``k`` failures in n samples gives a one-sided Clopper-Pearson
    upper bound ``<= p_max`` at ``confidence``.

    For k = 0 this is exact in closed form, ``n = ceil(ln(1-conf) / ln(1-p_max))``, slightly below
    the rule-of-three bound ``ln(1/(1-conf))/p_max`` (≈ 3/p at 95 %). For k > 0, integer bisection
    on n. p_max broadcasts; returns float counts (integers; exact below 2**24 in float32).
    """
    p = _as_float(p_max)
    if _is_concrete(p) and not np.all((np.asarray(p) > 0) & (np.asarray(p) < 1)):
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
    p, h = (_as_float(v) for v in jnp.broadcast_arrays(p, half_width))
    if _is_concrete(p, h) and not (np.all((np.asarray(p) >= 0) & (np.asarray(p) <= 1)) and np.all(np.asarray(h) > 0)):
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


# ----------------------------------------------------------------------------- distribution fits

def lognormal_fit(x):
    """Log-normal MLE of positive x (..., n): ``(mu, sigma)`` = mean and ddof=0 std of log x,
    i.e. ``scipy.stats.lognorm.fit(x, floc=0)`` = (sigma, 0, exp(mu))."""
    x = _as_float(x)
    _check_sample(x, positive=True, min_n=1)
    lx = jnp.log(x)
    mu = jnp.mean(lx, axis=-1)
    return mu, jnp.sqrt(jnp.mean((lx - mu[..., None]) ** 2, axis=-1))


def ecdf(x):
    """Empirical CDF of x (..., n): ``(sorted x, F)`` with ``F = i/n`` at the i-th order statistic."""
    x = _as_float(x)
    n = x.shape[-1]
    return _sort(x), jnp.broadcast_to(jnp.arange(1, n + 1, dtype=x.dtype) / n, x.shape)


def ks_statistic(x, cdf: Callable):
    """One-sample Kolmogorov-Smirnov D = max(D+, D−) of x (..., n) against ``cdf``, which is applied
    elementwise to the sorted sample (..., n) (close over per-row parameters as (..., 1) arrays).
    Equal to ``scipy.stats.kstest(x, cdf).statistic``."""
    xs, f_hi = ecdf(x)
    n = xs.shape[-1]
    f = cdf(xs)
    return jnp.maximum(jnp.max(f_hi - f, axis=-1), jnp.max(f - (f_hi - 1.0 / n), axis=-1))


def ks_lognormal(x):
    """KS statistic (...) of positive x (..., n) against its fitted log-normal (:func:`lognormal_fit`);
    returns ``(D, mu, sigma)``."""
    mu, sigma = lognormal_fit(x)
    d = ks_statistic(x, lambda xs: ndtr((jnp.log(xs) - mu[..., None]) / sigma[..., None]))
    return d, mu, sigma


# ----------------------------------------------------------------------------- RoMA

class RomaStats(NamedTuple):
    """Per-input RoMA statistics; every field has the leading shape (...) of the confidences.

    ad_before, normal_before: A² of the raw confidences and the decision (A² <= critical value).
    lmbda, ad_after, normal_after: Box-Cox MLE λ, A² and decision after Box-Cox (NaN/NaN/False when
        a confidence is <= 0, so Box-Cox is inapplicable).
    lmbda_yj, ad_yj: Yeo-Johnson λ and A² after it; NaN unless the input reached that step (status >= 2).
    status: :class:`RomaStatus` code (int32): first of raw / Box-Cox / Yeo-Johnson found normal, else FAIL.
    mean, std: of the normal fitted in the accepted space (raw confidences, ``boxcox(c, lmbda)`` or
        ``yeojohnson(c, lmbda_yj)``), std with ddof=1; NaN for FAIL. In the Box-Cox space they may be
        ±inf for extreme λ; plr is computed in a centred, overflow-free space and is unaffected.
    plr: 1 − P(C > δ) under that normal (δ transformed by the same map); NaN for FAIL.
    log10_tail: log10 P(C > δ), finite even when plr rounds to 1 (−inf if the transformed δ overflows).
    n_adversarial: number of samples whose highest wrong-label confidence is strictly greater than δ.
    """
    ad_before: jax.Array
    normal_before: jax.Array
    lmbda: jax.Array
    ad_after: jax.Array
    normal_after: jax.Array
    lmbda_yj: jax.Array
    ad_yj: jax.Array
    status: jax.Array
    mean: jax.Array
    std: jax.Array
    plr: jax.Array
    log10_tail: jax.Array
    n_adversarial: jax.Array


def _mean_std(y):
    mu = jnp.mean(y)
    return mu, jnp.sqrt(jnp.sum((y - mu) ** 2) / (y.shape[-1] - 1))


def _roma_power_row(logs, log_delta, lo, hi):
    """Box-Cox (logs = log c) or Yeo-Johnson (logs = log1p c) stage for one ascending sample:
    λ, A², (mean, std) and image of δ in the centred space, (mean, std) in transform coordinates."""
    lam, m, d = _power_mle(logs, lo, hi)
    c = _bc_shift(lam, d[0], d[-1])
    u = _pow_terms(lam, d, c, 0)[0]
    u_delta = _pow_terms(lam, log_delta - m, c, 0)[0]
    mu_u, sd_u = _mean_std(u)
    scale = jnp.exp(lam * m + c)
    offset = _pow_terms(lam, m, -c, 0)[0]  # (exp(λm + c) − 1)/λ
    return lam, _ad_sorted(u), mu_u, sd_u, u_delta, scale * mu_u + offset, scale * sd_u


@partial(jax.jit, static_argnames="level")
def _roma_jit(conf, delta, level):
    n = conf.shape[-1]
    crit = _ad_critical(n, conf.dtype)[level]
    cs = _sort(conf)
    n_adv = jnp.sum(conf > delta[:, None], axis=-1).astype(jnp.int32)
    ad0 = jax.vmap(_ad_sorted)(cs)
    mu0, sd0 = jax.vmap(_mean_std)(cs)
    pos = cs[:, 0] > 0
    lam, ad1, mu_u, sd_u, u_delta, mu1, sd1 = jax.vmap(
        lambda r, dl: _roma_power_row(jnp.log(r), jnp.log(dl), -jnp.inf, jnp.inf))(jnp.where(pos[:, None], cs, 1.0), delta)
    nan = jnp.full_like(ad0, jnp.nan)
    lam, ad1 = jnp.where(pos, lam, nan), jnp.where(pos, ad1, nan)
    normal0 = ad0 <= crit
    normal1 = ad1 <= crit
    need_yj = ~normal0 & ~normal1

    def yj_branch(args):  # confidences are >= 0: Yeo-Johnson is Box-Cox of 1 + c
        return jax.vmap(lambda r, dl: _roma_power_row(jnp.log1p(r), jnp.log1p(dl), *_yj_bounds(r)))(*args)

    def skip_branch(_):
        return (nan,) * 7

    lam2, ad2, mu_v, sd_v, v_delta, mu2, sd2 = jax.lax.cond(jnp.any(need_yj), yj_branch, skip_branch, (cs, delta))
    lam2, ad2 = jnp.where(need_yj, lam2, nan), jnp.where(need_yj, ad2, nan)
    normal2 = need_yj & (ad2 <= crit)
    status = jnp.where(normal0, 0, jnp.where(normal1, 1, jnp.where(normal2, 2, 3))).astype(jnp.int32)

    def pick(a0, a1, a2):
        return jnp.where(status == 0, a0, jnp.where(status == 1, a1, jnp.where(status == 2, a2, nan)))

    # tail in the space where the fit was accepted (centred space for Box-Cox)
    log_tail = log_ndtr(pick((mu0 - delta) / sd0, (mu_u - u_delta) / sd_u, (mu_v - v_delta) / sd_v))
    return RomaStats(ad0, normal0, lam, ad1, normal1, lam2, ad2, status,
                     pick(mu0, mu1, mu2), pick(sd0, sd1, sd2), -jnp.expm1(log_tail),
                     log_tail / math.log(10.0), n_adv)


def roma_statistics(conf, delta=0.5, significance: float = 0.05) -> RomaStats:
    """RoMA per-input statistics for confidences ``conf`` (..., n), vectorised over inputs.

    ``conf[..., i]`` is the highest wrong-label softmax confidence of sample i, in (0, 1]; no shift
    is applied (a confidence that underflowed to 0 makes Box-Cox inapplicable for that input, which
    then goes to Yeo-Johnson). ``delta`` (scalar or (...)) is the confidence threshold: an
    adversarial sample is one with ``c > δ``. Procedure per input: Anderson-Darling at
    ``significance``; if rejected, Box-Cox with the MLE λ and re-test; if rejected, Yeo-Johnson and
    re-test. plr = 1 − P(C > δ) from the normal fitted in the first accepted space, with δ mapped by
    the same monotone transform. Returns :class:`RomaStats`.
    """
    level = _level_index(significance)
    conf = _as_float(conf)
    _check_sample(conf, min_n=3)
    lead = conf.shape[:-1]
    delta = jnp.broadcast_to(jnp.asarray(delta, conf.dtype), lead)
    if _is_concrete(delta) and not np.all(np.asarray(delta) > 0):
        raise InputError("delta must be > 0")
    out = _roma_jit(conf.reshape((-1, conf.shape[-1])), delta.reshape(-1), level)
    return RomaStats(*(f.reshape(lead) for f in out))
