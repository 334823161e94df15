"""Anderson-Darling normality test against the normal with the sample's mean and ddof=1 std, equal to
``scipy.stats.anderson(x, 'norm')``: critical values ``round(A / (1 + 0.75/n + 2.25/n²), 3)`` at significance
levels 15, 10, 5, 2.5, 1 percent. A² is summed as ``K(n) + 2 Σ KL(u_i ‖ F_i)`` (non-negative terms, ``K(n)`` in
float64 at trace time); float32 reaches SciPy's A² to ~1e-5 relative.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy.special import log_ndtr

from ...errors import InputError
from ._sample import as_float, check_sample, over_rows, sort_samples

SIGNIFICANCE_LEVELS = (15.0, 10.0, 5.0, 2.5, 1.0)
"""Significance levels (percent) of :func:`anderson_normal`'s critical values, as in SciPy."""
_AD_NORMAL_A = np.array([0.561, 0.631, 0.752, 0.873, 1.035])


def _ad_constant(n: int) -> float:
    u = (2 * np.arange(1, n + 1) - 1) / (2.0 * n)
    return float(-n - 2 * np.sum(u * np.log(u) + (1 - u) * np.log1p(-u)))


def ad_critical(n: int, dtype):
    return jnp.asarray(np.around(_AD_NORMAL_A / (1.0 + 0.75 / n + 2.25 / n / n), 3), dtype)


def ad_sorted(ys):
    """A² of one ascending sample (n,) against the normal with sample mean and ddof=1 std."""
    n = ys.shape[-1]
    mu = jnp.mean(ys)
    d = ys - mu
    s = jnp.sqrt(jnp.sum(d * d) / (n - 1))
    w = d / s
    u = (2 * jnp.arange(1, n + 1, dtype=ys.dtype) - 1) / (2 * n)
    kl = u * (jnp.log(u) - log_ndtr(w)) + (1 - u) * (jnp.log1p(-u) - log_ndtr(-w))
    return _ad_constant(n) + 2 * jnp.sum(kl)


def level_index(significance: float) -> int:
    pct = 100.0 * float(significance)
    for i, lvl in enumerate(SIGNIFICANCE_LEVELS):
        if abs(pct - lvl) < 1e-9:
            return i
    raise InputError(f"significance must be one of {[v / 100 for v in SIGNIFICANCE_LEVELS]}, got {significance}")


@jax.jit
def _anderson_jit(x):
    return over_rows(ad_sorted, sort_samples(x))


def anderson_normal(x):
    """Anderson-Darling normality test, equal to ``scipy.stats.anderson(x, 'norm')``.

    x: (..., n). Returns ``(statistic (...), critical_values (5,), significance_levels (5,))``;
    levels are in percent (15, 10, 5, 2.5, 1). Reject normality at a level when statistic > value.
    """
    x = as_float(x)
    check_sample(x, min_n=3)
    n = x.shape[-1]
    return (_anderson_jit(x), ad_critical(n, x.dtype),
            jnp.asarray(SIGNIFICANCE_LEVELS, x.dtype))


def is_normal(x, significance: float = 0.05):
    """Anderson-Darling decision (...) bool: True where normality is *not* rejected at ``significance``
    (one of 0.15, 0.10, 0.05, 0.025, 0.01), i.e. ``statistic <= critical value``."""
    idx = level_index(significance)
    stat, crit, _ = anderson_normal(x)
    return stat <= crit[idx]
