"""RoMA per-input statistics: Anderson-Darling on the raw confidences, then after Box-Cox, then after Yeo-Johnson,
and the normal tail beyond the threshold δ in the first space found normal."""
from __future__ import annotations

import enum
import math
from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy.special import log_ndtr

from ...errors import InputError
from ._normality import ad_critical, ad_sorted, level_index
from ._power import bc_shift, pow_terms, power_mle, yj_bounds
from ._sample import as_float, check_sample, is_concrete, sort_samples


class RomaStatus(enum.IntEnum):
    """Outcome of the RoMA normality procedure, per input."""
    NORMAL = 0       # raw confidences pass Anderson-Darling
    BOXCOX = 1       # normal after Box-Cox with the MLE λ
    YEOJOHNSON = 2   # Box-Cox failed (or data not positive); normal after Yeo-Johnson
    FAIL = 3         # no transform made the sample normal: no parametric plr


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
    lam, m, d = power_mle(logs, lo, hi)
    c = bc_shift(lam, d[0], d[-1])
    u = pow_terms(lam, d, c, 0)[0]
    u_delta = pow_terms(lam, log_delta - m, c, 0)[0]
    mu_u, sd_u = _mean_std(u)
    scale = jnp.exp(lam * m + c)
    offset = pow_terms(lam, m, -c, 0)[0]  # (exp(λm + c) − 1)/λ
    return lam, ad_sorted(u), mu_u, sd_u, u_delta, scale * mu_u + offset, scale * sd_u


@partial(jax.jit, static_argnames="level")
def _roma_jit(conf, delta, level):
    n = conf.shape[-1]
    crit = ad_critical(n, conf.dtype)[level]
    cs = sort_samples(conf)
    n_adv = jnp.sum(conf > delta[:, None], axis=-1).astype(jnp.int32)
    ad0 = jax.vmap(ad_sorted)(cs)
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
        return jax.vmap(lambda r, dl: _roma_power_row(jnp.log1p(r), jnp.log1p(dl), *yj_bounds(r)))(*args)

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
    level = level_index(significance)
    conf = as_float(conf)
    check_sample(conf, min_n=3)
    lead = conf.shape[:-1]
    delta = jnp.broadcast_to(jnp.asarray(delta, conf.dtype), lead)
    if is_concrete(delta) and not np.all(np.asarray(delta) > 0):
        raise InputError("delta must be > 0")
    out = _roma_jit(conf.reshape((-1, conf.shape[-1])), delta.reshape(-1), level)
    return RomaStats(*(f.reshape(lead) for f in out))
