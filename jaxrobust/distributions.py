"""Analysis of critical-ε distributions (Bosman et al., JAIR 2025), on host with scipy.

The inputs are critical-ε values of one network on one split: positive, finite numbers (inputs
misclassified at ε = 0, censored or errored searches are excluded by the caller and counted).
"""
from __future__ import annotations

from typing import Mapping, NamedTuple

import numpy as np
from scipy import stats

from .errors import InputError


class LognormalFit(NamedTuple):
    """MLE log-normal fit ``log ε ~ N(mu, sigma²)`` with goodness of fit.

    ``ks_p`` is the plain KS p-value (too optimistic: the parameters were fitted on the same data);
    ``lilliefors_p`` is the parametric-bootstrap p-value that accounts for the fit.
    """
    n: int
    mu: float
    sigma: float
    median: float
    ks_statistic: float
    ks_p: float
    lilliefors_p: float


def _positive(eps, what="critical ε values") -> np.ndarray:
    e = np.asarray(eps, dtype=np.float64).ravel()
    if e.size < 3:
        raise InputError(f"need at least 3 {what}, got {e.size}")
    if not np.all(np.isfinite(e)) or np.any(e <= 0):
        raise InputError(f"{what} must be finite and > 0 for a log-normal fit "
                         f"(got min {np.min(e):.4g}); drop misclassified/censored inputs first")
    return e


def lognormal_fit(eps, *, bootstrap: int = 1000, seed: int = 0) -> LognormalFit:
    """Fit a log-normal by MLE and test it (KS, and a Lilliefors-style bootstrap with ``bootstrap`` replicates)."""
    e = _positive(eps)
    logs = np.log(e)
    mu, sigma = logs.mean(), logs.std()
    d, p = stats.kstest(logs, "norm", args=(mu, sigma))
    rng = np.random.default_rng(seed)
    sims = rng.normal(size=(bootstrap, e.size))
    m, s = sims.mean(axis=1, keepdims=True), sims.std(axis=1, keepdims=True)
    d_boot = _ks_normal(np.sort((sims - m) / s, axis=1))
    lilliefors = (1 + np.sum(d_boot >= d)) / (bootstrap + 1)
    return LognormalFit(e.size, float(mu), float(sigma), float(np.exp(mu)), float(d), float(p), float(lilliefors))


def _ks_normal(z_sorted: np.ndarray) -> np.ndarray:
    """KS distance of each sorted row of standardised samples to N(0, 1): ``(R, n) -> (R,)``."""
    n = z_sorted.shape[-1]
    cdf = stats.norm.cdf(z_sorted)
    i = np.arange(1, n + 1)
    return np.maximum((i / n - cdf).max(axis=-1), (cdf - (i - 1) / n).max(axis=-1))


def ecdf(eps) -> tuple[np.ndarray, np.ndarray]:
    """Empirical CDF: sorted values ``(n,)`` and cumulative fractions ``(n,)``."""
    e = np.sort(np.asarray(eps, dtype=np.float64).ravel())
    return e, np.arange(1, e.size + 1) / e.size


class TwoSample(NamedTuple):
    n_a: int
    n_b: int
    median_a: float
    median_b: float
    ks_statistic: float
    ks_p: float
    mannwhitney_u: float
    mannwhitney_p: float


def compare(a, b) -> TwoSample:
    """Two-sample KS and Mann–Whitney U tests (e.g. train vs test, standard vs adversarially trained)."""
    a = np.asarray(a, np.float64).ravel()
    b = np.asarray(b, np.float64).ravel()
    if a.size < 2 or b.size < 2:
        raise InputError(f"each sample needs at least 2 values (got {a.size} and {b.size})")
    ks = stats.ks_2samp(a, b)
    mw = stats.mannwhitneyu(a, b, alternative="two-sided")
    return TwoSample(a.size, b.size, float(np.median(a)), float(np.median(b)), float(ks.statistic),
                     float(ks.pvalue), float(mw.statistic), float(mw.pvalue))


class Correlation(NamedTuple):
    names: list
    n_shared: np.ndarray      # (K, K) number of inputs both networks have a value for
    spearman: np.ndarray      # (K, K)
    pearson: np.ndarray       # (K, K)


def correlations(by_network: Mapping[str, Mapping[int, float]]) -> Correlation:
    """Pairwise Spearman and Pearson correlation of critical ε across networks on their shared inputs.

    ``by_network`` maps a network name to ``{input index: critical ε}``.
    """
    names = list(by_network)
    k = len(names)
    n = np.zeros((k, k), int)
    rho, r = np.full((k, k), np.nan), np.full((k, k), np.nan)
    for i in range(k):
        for j in range(k):
            shared = sorted(set(by_network[names[i]]) & set(by_network[names[j]]))
            n[i, j] = len(shared)
            if len(shared) >= 3:
                a = np.array([by_network[names[i]][s] for s in shared])
                b = np.array([by_network[names[j]][s] for s in shared])
                if np.ptp(a) > 0 and np.ptp(b) > 0:
                    rho[i, j] = stats.spearmanr(a, b).statistic
                    r[i, j] = stats.pearsonr(a, b).statistic
    return Correlation(names, n, rho, r)
