"""Analysis of critical-ε distributions (Bosman et al., JAIR 2025), on host with scipy.

The inputs are critical-ε values of one network on one split: positive, finite numbers (inputs
misclassified at ε = 0, censored or errored searches are excluded by the caller and counted).
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import NamedTuple

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


def critical_value(rows: Mapping[str, np.ndarray]) -> np.ndarray:
    """The critical ε of each stored row: the proved ``eps_lower``, or ``eps_upper`` for attack-only rows
    (an upper bound). NaN for misclassified, errored and censored rows."""
    attack = rows["oracle"] == "attack"
    v = np.where(attack, rows["eps_upper"], rows["eps_lower"]).astype(float)
    bad = np.isin(rows["status"], ["misclassified", "error"]) | (attack & (rows["status"] == "censored"))
    return np.where(bad, np.nan, v)


def summarize(path, *, by: tuple = ("network_name", "split"), bootstrap: int = 1000, plot_dir=None) -> dict:
    """Analyse a ``critical_eps`` results file: per group (default network × split) status counts, medians,
    log-normal fit with KS and bootstrap p-values; train vs test comparison per network; correlation across
    networks on shared inputs. Writes ECDF, histogram and heat-map PNGs into ``plot_dir`` when given."""
    import h5py

    from . import plots
    from .critical_eps import TABLE, columns
    from .store import ResultStore
    with h5py.File(path, "r") as f:
        if TABLE not in f:
            raise InputError(f"{path} holds no critical-ε results (table {TABLE!r} missing)")
        shape = f[TABLE]["counterexample"].shape[1:]
    rows = ResultStore(path, TABLE, columns(shape)).read(
        ["network", "network_name", "dataset", "split", "index", "oracle", "status", "eps_lower", "eps_upper", "time_s"])
    value = critical_value(rows)
    keys = [tuple(str(rows[k][i]) for k in by) for i in range(len(value))]
    out = {"groups": [], "comparisons": [], "correlation": None}
    curves, fits, hists = {}, {}, {}
    for g in sorted(set(keys)):
        m = np.array([k == g for k in keys])
        v = value[m]
        pos = v[np.isfinite(v) & (v > 0)]
        st = rows["status"][m]
        entry = {**dict(zip(by, g)), "n": int(m.sum()),
                 "status": {s: int((st == s).sum()) for s in np.unique(st)},
                 "median_lower": _nanmedian(rows["eps_lower"][m]), "median_upper": _nanmedian(rows["eps_upper"][m]),
                 "median_time_s": _nanmedian(rows["time_s"][m]), "n_fit": int(pos.size)}
        if pos.size >= 3:
            entry["lognormal"] = lognormal_fit(pos, bootstrap=bootstrap)._asdict()
            fits["/".join(g)] = (entry["lognormal"]["mu"], entry["lognormal"]["sigma"])
        out["groups"].append(entry)
        ok = ~np.isin(st, ["misclassified", "error"])
        curves["/".join(g)] = (rows["eps_lower"][m][ok], rows["eps_upper"][m][ok])
        hists["/".join(g)] = v
    if "split" in by:
        others = [k for k in by if k != "split"]
        for g in sorted({tuple(dict(zip(by, k))[o] for o in others) for k in keys}):
            sel = {s: np.array([all(dict(zip(by, k))[o] == gv for o, gv in zip(others, g))
                                and dict(zip(by, k))["split"] == s for k in keys]) for s in ("train", "test")}
            a, b = value[sel["train"]], value[sel["test"]]
            a, b = a[np.isfinite(a)], b[np.isfinite(b)]
            if a.size >= 2 and b.size >= 2:
                out["comparisons"].append({**dict(zip(others, g)), "a": "train", "b": "test", **compare(a, b)._asdict()})
    by_net: dict[str, dict] = {}
    for i in range(len(value)):
        if np.isfinite(value[i]):
            key = f'{rows["dataset"][i]}/{rows["split"][i]}/{rows["index"][i]}'
            by_net.setdefault(str(rows["network_name"][i]), {})[key] = float(value[i])
    if len(by_net) >= 2:
        c = correlations(by_net)
        out["correlation"] = {"names": c.names, "n_shared": c.n_shared.tolist(),
                              "spearman": np.round(c.spearman, 4).tolist(), "pearson": np.round(c.pearson, 4).tolist()}
    if plot_dir is not None:
        out["plots"] = [str(plots.ecdf(curves, f"{plot_dir}/ecdf.png", fit=fits)),
                        str(plots.histogram(hists, f"{plot_dir}/histogram.png"))]
        if out["correlation"]:
            out["plots"].append(str(plots.heatmap(c.spearman, c.names, f"{plot_dir}/correlation.png")))
    return out


def _nanmedian(a) -> float | None:
    a = np.asarray(a, float)
    return float(np.nanmedian(a)) if np.isfinite(a).any() else None
