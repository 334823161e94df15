"""Distribution fits of robustness samples: normal tails, log-normal MLE, empirical CDF and Kolmogorov-Smirnov."""
from __future__ import annotations

import math
from collections.abc import Callable

import jax.numpy as jnp
from jax.scipy.special import log_ndtr, ndtr

from ._sample import as_float, check_sample, sort_samples


def normal_tail(delta, mean, std):
    """Upper tail ``P(X > δ)`` of N(mean, std²) and its log10, computed via ``log_ndtr`` so tails
    far below the float range keep an exact log10. Broadcasts. Returns ``(p, log10_p)``."""
    delta, mean, std = (as_float(v) for v in jnp.broadcast_arrays(delta, mean, std))
    logp = log_ndtr((mean - delta) / std)
    return jnp.exp(logp), logp / math.log(10.0)


def lognormal_fit(x):
    """Log-normal MLE of positive x (..., n): ``(mu, sigma)`` = mean and ddof=0 std of log x,
    i.e. ``scipy.stats.lognorm.fit(x, floc=0)`` = (sigma, 0, exp(mu))."""
    x = as_float(x)
    check_sample(x, positive=True, min_n=1)
    lx = jnp.log(x)
    mu = jnp.mean(lx, axis=-1)
    return mu, jnp.sqrt(jnp.mean((lx - mu[..., None]) ** 2, axis=-1))


def ecdf(x):
    """Empirical CDF of x (..., n): ``(sorted x, F)`` with ``F = i/n`` at the i-th order statistic."""
    x = as_float(x)
    n = x.shape[-1]
    return sort_samples(x), jnp.broadcast_to(jnp.arange(1, n + 1, dtype=x.dtype) / n, x.shape)


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
