"""Analysis of critical-ε distributions (Bosman et al., JAIR 2025), on host with scipy.

The inputs are critical-ε values of one network, data set and configuration: positive, finite numbers, and
right-censoring points for inputs whose search found no counterexample (their critical ε exceeds the point).
Misclassified and errored inputs are set aside and counted.
"""
from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import NamedTuple

import numpy as np
from scipy import stats

from .errors import InputError


class LognormalFit(NamedTuple):
    """MLE log-normal fit ``log ε ~ N(mu, sigma²)`` with goodness of fit.

    ``n`` observed values and ``n_censored`` right-censored ones (critical ε known only to exceed a point).
    ``ks_statistic`` is the KS distance of the Kaplan–Meier estimate (the ECDF when nothing is censored) to the
    fit; ``ks_p`` the plain KS p-value (too optimistic: the parameters were fitted on the same data; NaN with
    censoring); ``lilliefors_p`` the parametric-bootstrap p-value that accounts for the fit (and the censoring).
    """
    n: int
    mu: float
    sigma: float
    median: float
    ks_statistic: float
    ks_p: float
    lilliefors_p: float
    n_censored: int = 0


def _positive(eps, what="critical ε values", minimum=3) -> np.ndarray:
    e = np.asarray(eps, dtype=np.float64).ravel()
    if e.size < minimum:
        raise InputError(f"need at least {minimum} {what}, got {e.size}")
    if not np.all(np.isfinite(e)) or np.any(e <= 0):
        raise InputError(f"{what} must be finite and > 0 for a log-normal fit "
                         f"(got min {np.min(e):.4g}); drop misclassified inputs first")
    return e


def lognormal_fit(eps, *, censored=(), bootstrap: int = 1000, seed: int = 0) -> LognormalFit:
    """Fit a log-normal by maximum likelihood and test it.

    ``eps (n,)`` are observed critical ε values; ``censored (m,)`` right-censoring points (inputs whose critical
    ε exceeds the point: no counterexample up to it). With censoring the likelihood is the censored one
    (density of the observed, survival of the censored values) and the goodness of fit is the KS distance of the
    Kaplan–Meier estimate to the fit, its p-value by a parametric bootstrap whose replicates are censored at
    times drawn from the Kaplan–Meier estimate of the censoring distribution. Without, the fit is closed-form and the bootstrap the Lilliefors one (``bootstrap`` replicates).
    """
    e = _positive(eps)
    c = _positive(censored, "censoring points", minimum=0)
    rng = np.random.default_rng(seed)
    if c.size == 0:
        logs = np.log(e)
        mu, sigma = logs.mean(), logs.std()
        d, p = stats.kstest(logs, "norm", args=(mu, sigma))
        sims = rng.normal(size=(bootstrap, e.size))
        m, s = sims.mean(axis=1, keepdims=True), sims.std(axis=1, keepdims=True)
        d_boot = _ks_normal(np.sort((sims - m) / s, axis=1))
    else:
        logs, logc = np.log(e), np.log(c)
        pts = np.concatenate([logs, logc])
        observed = np.arange(pts.size) < logs.size
        mu, sigma = (float(v[0]) for v in _censored_mle(np.where(observed, pts, np.nan)[None],
                                                          np.where(observed, np.nan, pts)[None]))
        d, p = _km_distance(logs, logc, mu, sigma), np.nan
        # replicates from the fit, each censored at a time drawn from the Kaplan–Meier estimate of the censoring
        t = rng.normal(mu, sigma, (bootstrap, pts.size))
        when = _censoring_times(pts, ~observed, rng, t.shape)
        cens = t > when
        rl, rc = np.where(cens, np.nan, t), np.where(cens, when, np.nan)
        m, sd = _censored_mle(rl, rc, start=(np.full(bootstrap, mu), np.full(bootstrap, np.log(sigma))))
        d_boot = np.array([_km_distance(rl[r][~cens[r]], rc[r][cens[r]], m[r], sd[r]) for r in range(bootstrap)])
    lilliefors = (1 + np.sum(d_boot >= d)) / (bootstrap + 1)
    return LognormalFit(e.size, float(mu), float(sigma), float(np.exp(mu)), float(d), float(p), float(lilliefors),
                        int(c.size))


def _censored_mle(logs, logc, start=None, iterations: int = 50) -> tuple[np.ndarray, np.ndarray]:
    """``(mu, sigma)`` maximising the normal log-likelihood of observed and right-censored values, for ``R``
    samples at once: ``logs (R, n)`` with NaN where a value is censored, ``logc (R, n)`` censoring points with
    NaN where observed. Damped Newton steps in ``(mu, log sigma)`` from ``start`` (default: the moments of
    every point) -> ``mu (R,)``, ``sigma (R,)``."""
    from scipy.special import log_ndtr
    obs, cen = np.isfinite(logs), np.isfinite(logc)
    pts = np.where(obs, logs, logc)
    if start is None:
        start = (pts.mean(axis=1), np.log(np.maximum(pts.std(axis=1), 1e-3)))
    mu, tau = (np.array(v, np.float64).reshape(-1).copy() for v in start)

    def terms(mu, tau):
        s = np.exp(tau)[:, None]
        z = (pts - mu[:, None]) / s
        log_sf = log_ndtr(-z)
        ll = np.where(obs, -0.5 * z ** 2 - tau[:, None], np.where(cen, log_sf, 0.0)).sum(axis=1)
        h = np.where(cen, np.exp(-0.5 * z ** 2 - 0.5 * np.log(2 * np.pi) - log_sf), 0.0)
        k = h * (h - z)
        g = np.stack([(np.where(obs, z, h)).sum(1) / s[:, 0], np.where(obs, z ** 2 - 1, h * z).sum(1)], -1)
        h_mm = np.where(obs, -1.0, -k).sum(1) / s[:, 0] ** 2
        h_mt = np.where(obs, -2 * z, -(z * k + h)).sum(1) / s[:, 0]
        h_tt = np.where(obs, -2 * z ** 2, -(z ** 2 * k + h * z)).sum(1)
        return ll, g, np.stack([np.stack([h_mm, h_mt], -1), np.stack([h_mt, h_tt], -1)], -2)

    ll, g, hess = terms(mu, tau)
    for _ in range(iterations):
        step = -np.linalg.solve(hess, g[..., None])[..., 0]
        step *= np.minimum(1.0, 1.0 / np.maximum(np.abs(step).max(-1, keepdims=True), 1e-300))  # at most 1 per axis
        for _ in range(30):  # halve a step until the likelihood does not fall
            ll_new, g_new, h_new = terms(mu + step[:, 0], tau + step[:, 1])
            worse = ~(ll_new >= ll - 1e-12)
            if not worse.any():
                break
            step[worse] *= 0.5
        mu, tau, ll, g, hess = mu + step[:, 0], tau + step[:, 1], ll_new, g_new, h_new
        if np.abs(step).max() < 1e-12:
            break
    return mu, np.exp(tau)


def _censoring_times(t: np.ndarray, censored: np.ndarray, rng, shape) -> np.ndarray:
    """Draws ``shape`` from the Kaplan–Meier estimate of the censoring distribution of times ``t (n,)`` (the
    censored ones its events, the observed ones censored for it); mass past the last censoring is ``inf``."""
    order = np.lexsort((censored, t))  # at ties, observed times leave the risk set after the censorings
    ts, ev = t[order], censored[order]
    surv = np.cumprod(np.where(ev, 1 - 1 / (t.size - np.arange(t.size)), 1.0))
    jumps = -np.diff(np.concatenate([[1.0], surv]))
    support = np.append(ts, np.inf)
    return support[rng.choice(support.size, size=shape, p=np.append(jumps, max(surv[-1], 0.0)) /
                              (jumps.sum() + max(surv[-1], 0.0)))]


def _km_distance(logs: np.ndarray, logc: np.ndarray, mu: float, sigma: float) -> float:
    """KS distance between the Kaplan–Meier CDF of observed ``logs`` / right-censored ``logc`` and
    ``N(mu, sigma²)``, over the observed values (where the estimate jumps)."""
    t = np.concatenate([logs, logc])
    event = np.concatenate([np.ones(logs.size, bool), np.zeros(logc.size, bool)])
    order = np.lexsort((~event, t))  # at ties, events before censorings (the usual convention)
    t, event = t[order], event[order]
    at_risk = t.size - np.arange(t.size)
    surv = np.cumprod(np.where(event, 1 - 1 / at_risk, 1.0))
    after = 1 - surv[event]                              # KM CDF just after each observed value
    before = np.concatenate([[0.0], 1 - surv[:-1]])[event]  # and just before it
    cdf = stats.norm.cdf((t[event] - mu) / sigma)
    return float(max(np.max(np.abs(after - cdf)), np.max(np.abs(before - cdf))))


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


#: Rows of different networks (content hash), datasets or configurations (oracle, tolerance, grid, options)
#: never share a group, whatever ``by`` says.
ALWAYS_APART = ("network", "dataset", "config")
#: What each group's values bound: proof oracles give proved radii, the attack oracle counterexample radii.
BOUNDS = {"proved": "eps_lower: largest ε proved robust", "counterexample": "eps_upper: closest counterexample"}


def critical_value(rows: Mapping[str, np.ndarray], eps_max=None) -> tuple[np.ndarray, np.ndarray]:
    """``(value (N,), censored_at (N,))`` of stored rows: the proved ``eps_lower`` (proof oracles) or the
    counterexample radius ``eps_upper`` (attack oracle), NaN where the row is censored; for a censored row
    (no counterexample up to ``eps_max``) the point its critical ε is known to exceed — the proved radius,
    or ``eps_max (N,)`` for the attack oracle — NaN elsewhere. Both NaN for misclassified and errored rows."""
    attack = rows["oracle"] == "attack"
    status = rows["status"]
    v = np.where(attack, rows["eps_upper"], rows["eps_lower"]).astype(float)
    at = np.where(attack, np.nan if eps_max is None else eps_max, rows["eps_lower"]).astype(float)
    cens = status == "censored"
    bad = np.isin(status, ["misclassified", "error"])
    return np.where(bad | cens, np.nan, v), np.where(cens & ~bad, at, np.nan)


def read_results(path) -> tuple[dict, dict]:
    """The rows (every column but counterexamples, ``{column: (N,)}``) and configurations of a ``critical_eps``
    results file; `FileFormatError` for a directory, a missing, non-HDF5 or unreadable file."""
    import h5py

    from .critical_eps import TABLE, columns
    from .errors import FileFormatError
    from .store import ResultStore
    p = Path(path)
    if p.is_dir():
        raise FileFormatError(f"{path} is a directory, not an HDF5 results file written by critical-eps")
    if not p.is_file():
        raise FileFormatError(f"no results file {path}")
    if not h5py.is_hdf5(p):
        raise FileFormatError(f"{path} is not an HDF5 file (expected the --out file of critical-eps)")
    try:
        with h5py.File(p, "r") as f:
            if TABLE not in f:
                raise InputError(f"{path} holds no critical-ε results (table {TABLE!r} missing)")
            shape = f[TABLE]["counterexample"].shape[1:]
        store = ResultStore(p, TABLE, columns(shape))
        names = [c for c in store.columns if c != "counterexample"]
        return store.read(names), store.configs()
    except (OSError, KeyError, ValueError) as e:
        if isinstance(e, InputError):
            raise
        raise FileFormatError(f"{path}: unreadable results file ({type(e).__name__}: {e})") from None


def describe_config(config: Mapping) -> str:
    """A short name of a stored critical-ε configuration, e.g. ``crown tol=0.001 eps_max=0.5`` (``crown L2 ...``
    for another norm than L∞)."""
    step = (f"grid {config['grid'][0]:g}..{config['grid'][-1]:g}" if config.get("grid")
            else f"tol={config.get('tol', float('nan')):g}")
    norm = (config.get("options") or {}).get("norm", "linf")
    return (f"{config.get('oracle', '?')}{'' if norm == 'linf' else ' ' + norm.upper()} {step} "
            f"eps_max={config.get('eps_max', float('nan')):g}")


def summarize(path, *, by: tuple = ("network_name", "split"), bootstrap: int = 1000, plot_dir=None) -> dict:
    """Analyse a ``critical_eps`` results file, one group per value of the ``by`` columns (any stored column)
    refined by `ALWAYS_APART`, so different networks, data sets or configurations are never pooled.

    Per group: status counts, how many rows of each status were set aside (misclassified, errors, radii of 0),
    medians, and the log-normal fit of the observed critical ε with censored inputs as right-censored
    observations (KS / bootstrap p-values); train vs test comparison of groups that differ only in the
    split; Spearman/Pearson correlation across groups on shared inputs. With ``plot_dir``, ECDF, histogram and
    heat-map figures (PNG and PDF) are written there. Returns a JSON-able dict.
    """
    from . import plots
    rows, configs = read_results(path)
    by = tuple(by)
    unknown = [k for k in by if k not in rows]
    if unknown or not by:
        raise InputError(f"cannot group by {','.join(unknown) or 'nothing'}: the stored keys are {', '.join(rows)}")
    keys = by + tuple(k for k in ALWAYS_APART if k not in by)
    eps_max = np.array([configs.get(c, {}).get("eps_max", np.nan) for c in rows["config"]], float)
    value, cens_at = critical_value(rows, eps_max)
    row_keys = [tuple(str(rows[k][i]) for k in keys) for i in range(len(value))]
    groups = sorted(set(row_keys))
    labels = _labels(groups, keys, by, configs)
    out = {"by": list(by), "groups": [], "comparisons": [], "correlation": None, "bounds": BOUNDS}
    curves, fits, hists, members = {}, {}, {}, {}
    for g in groups:
        m = np.array([k == g for k in row_keys])
        v, c, st = value[m], cens_at[m], rows["status"][m]
        obs, cen = np.isfinite(v) & (v > 0), np.isfinite(c) & (c > 0)
        kind = "counterexample" if set(rows["oracle"][m]) == {"attack"} else "proved"
        entry = {**dict(zip(keys, g)), "label": labels[g], "config_name": describe_config(configs.get(g[-1], {})),
                 "bound": kind, "n": int(m.sum()),
                 "status": {str(s): int((st == s).sum()) for s in np.unique(st)},
                 "set_aside": {str(s): int((st[~obs & ~cen] == s).sum()) for s in np.unique(st[~obs & ~cen])},
                 "median_lower": _nanmedian(rows["eps_lower"][m]), "median_upper": _nanmedian(rows["eps_upper"][m]),
                 "median_time_s": _nanmedian(rows["time_s"][m]), "n_fit": int(obs.sum()), "n_censored": int(cen.sum())}
        if obs.sum() >= 3:
            entry["lognormal"] = lognormal_fit(v[obs], censored=c[cen], bootstrap=bootstrap)._asdict()
            fits[labels[g]] = (entry["lognormal"]["mu"], entry["lognormal"]["sigma"])
        out["groups"].append(entry)
        ok = ~np.isin(st, ["misclassified", "error"])
        curves[labels[g]] = (rows["eps_lower"][m][ok], rows["eps_upper"][m][ok], kind)
        hists[labels[g]] = v[obs]
        members[g] = {f"{rows['dataset'][i]}/{rows['split'][i]}/{rows['index'][i]}": float(value[i])
                      for i in np.flatnonzero(m) if np.isfinite(value[i])}
    out["comparisons"] = _train_vs_test(groups, keys, labels, members)
    if len(groups) >= 2:
        c = correlations({labels[g]: members[g] for g in groups})
        if np.any(c.n_shared[~np.eye(len(groups), dtype=bool)] >= 3):
            out["correlation"] = {"names": c.names, "n_shared": c.n_shared.tolist(),
                                  "spearman": np.round(c.spearman, 4).tolist(), "pearson": np.round(c.pearson, 4).tolist()}
    if plot_dir is not None:
        out["plots"] = [str(q) for q in plots.ecdf(curves, f"{plot_dir}/ecdf.png", fit=fits)]
        out["plots"] += [str(q) for q in plots.histogram(hists, f"{plot_dir}/histogram.png",
                                                         bound=_bound_name({k for *_, k in curves.values()}))]
        if out["correlation"]:
            out["plots"] += [str(q) for q in plots.heatmap(c.spearman, c.names, f"{plot_dir}/correlation.png",
                                                           n_shared=c.n_shared)]
    return out


def _bound_name(kinds) -> str:
    return kinds.pop() if len(kinds) == 1 else "proved / counterexample"


def _labels(groups, keys, by, configs) -> dict:
    """Readable group names: the ``by`` values, plus the data set and configuration where several occur, plus
    the network hash where two groups would otherwise share a name."""
    shown = [i for i, k in enumerate(keys) if k in by and k not in ("config", "network")]
    several = {k: len({g[keys.index(k)] for g in groups}) > 1 for k in ALWAYS_APART}
    out = {}
    for g in groups:
        parts = ["/".join(g[i] for i in shown)]
        if several["dataset"] and "dataset" not in by:
            parts.append(g[keys.index("dataset")])
        if several["config"] or "config" in by:
            parts.append(f"[{describe_config(configs.get(g[keys.index('config')], {}))}]")
        out[g] = " ".join(p for p in parts if p)
    names = list(out.values())
    for g in groups:
        if names.count(out[g]) > 1 or "network" in by:
            out[g] += f" @{g[keys.index('network')][:6]}"
    return out


def _train_vs_test(groups, keys, labels, members) -> list:
    """KS and Mann–Whitney tests of each pair of groups equal but for the split (train vs test)."""
    if "split" not in keys:
        return []
    s = keys.index("split")
    out = []
    for g in groups:
        if g[s] != "train":
            continue
        other = g[:s] + ("test",) + g[s + 1:]
        a, b = list(members[g].values()), list(members.get(other, {}).values())
        if other in members and len(a) >= 2 and len(b) >= 2:
            out.append({"train": labels[g], "test": labels[other], "a": "train", "b": "test",
                        **compare(np.array(a), np.array(b))._asdict()})
    return out


def _nanmedian(a) -> float | None:
    a = np.asarray(a, float)
    return float(np.nanmedian(a)) if np.isfinite(a).any() else None
