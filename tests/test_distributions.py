import numpy as np
import pytest
from scipy import stats

from jaxrobust.distributions import compare, correlations, ecdf, lognormal_fit
from jaxrobust.errors import InputError


def test_lognormal_fit_matches_scipy():
    e = np.random.default_rng(1).lognormal(-3.0, 0.7, size=300)
    fit = lognormal_fit(e, bootstrap=200)
    s, loc, scale = stats.lognorm.fit(e, floc=0)
    assert fit.sigma == pytest.approx(s, rel=1e-6)
    assert fit.median == pytest.approx(scale, rel=1e-6)
    ks = stats.kstest(e, "lognorm", args=(s, 0, scale))
    assert fit.ks_statistic == pytest.approx(ks.statistic, rel=1e-9)
    assert fit.ks_p == pytest.approx(ks.pvalue, rel=1e-6)


def test_lilliefors_bootstrap_is_calibrated_and_has_power():
    rng = np.random.default_rng(0)
    null_p = [lognormal_fit(rng.lognormal(0, 1, 40), bootstrap=200, seed=i).lilliefors_p for i in range(200)]
    assert 0.01 <= np.mean(np.array(null_p) < 0.05) <= 0.12
    # plain KS with fitted parameters is conservative: it rejects far less often than the nominal level
    plain = [lognormal_fit(rng.lognormal(0, 1, 40), bootstrap=10).ks_p for _ in range(200)]
    assert np.mean(np.array(plain) < 0.05) < 0.02
    heavy = np.exp(rng.standard_t(1.5, size=300))
    assert lognormal_fit(heavy, bootstrap=300).lilliefors_p < 0.01


def test_fit_rejects_bad_values():
    with pytest.raises(InputError, match="> 0"):
        lognormal_fit([0.1, 0.0, 0.2, 0.3])
    with pytest.raises(InputError, match="at least 3"):
        lognormal_fit([0.1])


def test_ecdf_and_compare():
    x, f = ecdf([3, 1, 2])
    np.testing.assert_array_equal(x, [1, 2, 3])
    np.testing.assert_allclose(f, [1 / 3, 2 / 3, 1])
    rng = np.random.default_rng(2)
    a, b = rng.lognormal(-3, 0.5, 100), rng.lognormal(-2, 0.5, 80)
    c = compare(a, b)
    assert c.ks_p == pytest.approx(stats.ks_2samp(a, b).pvalue)
    assert c.mannwhitney_p == pytest.approx(stats.mannwhitneyu(a, b).pvalue)
    assert c.ks_p < 1e-6 and c.median_a < c.median_b


def test_correlations_on_shared_inputs():
    rng = np.random.default_rng(3)
    base = rng.lognormal(-3, 0.5, 50)
    nets = {"a": dict(enumerate(base)), "b": {i: 2 * v for i, v in enumerate(base) if i % 2 == 0},
            "c": dict(enumerate(rng.permutation(base)))}
    c = correlations(nets)
    assert c.n_shared[0, 1] == 25 and c.n_shared[0, 0] == 50
    assert c.spearman[0, 1] == pytest.approx(1.0) and c.pearson[0, 1] == pytest.approx(1.0)
    assert abs(c.spearman[0, 2]) < 0.5


# --- censored fits ---------------------------------------------------------------------------------
def test_censored_fit_matches_scipy_and_has_the_higher_likelihood():
    rng = np.random.default_rng(4)
    x = rng.lognormal(-3.0, 0.7, 300)
    c = rng.uniform(0.02, 0.1, 300)  # a censoring point per input
    seen = x <= c
    fit = lognormal_fit(x[seen], censored=c[~seen], bootstrap=50)
    s, _, scale = stats.lognorm.fit(stats.CensoredData(uncensored=x[seen], right=c[~seen]), floc=0)
    assert fit.n == seen.sum() and fit.n_censored == (~seen).sum() > 50
    assert fit.sigma == pytest.approx(s, rel=1e-4) and fit.mu == pytest.approx(np.log(scale), abs=1e-4)

    def loglik(mu, sigma):
        return (stats.norm.logpdf(np.log(x[seen]), mu, sigma).sum() + stats.norm.logsf(np.log(c[~seen]), mu, sigma).sum())
    assert loglik(fit.mu, fit.sigma) >= loglik(np.log(scale), s) - 1e-9
    # dropping the censored inputs (the old behaviour) biases the median down
    assert lognormal_fit(x[seen], bootstrap=10).median < 0.8 * fit.median


def test_kaplan_meier_distance_is_the_ks_distance_without_censoring():
    from jaxrobust.distributions import _km_distance
    logs = np.log(np.random.default_rng(5).lognormal(0, 1, 50))
    mu, sigma = logs.mean(), logs.std()
    d = stats.kstest(logs, "norm", args=(mu, sigma)).statistic
    assert _km_distance(logs, np.zeros(0), mu, sigma) == pytest.approx(d, rel=1e-12)


@pytest.mark.slow
def test_censored_bootstrap_is_calibrated_and_has_power():
    rng = np.random.default_rng(6)
    ps = []
    for i in range(100):
        x, c = rng.lognormal(0, 1, 60), np.exp(rng.normal(0.5, 0.5, 60))
        ps.append(lognormal_fit(x[x <= c], censored=c[x > c], bootstrap=100, seed=i).lilliefors_p)
    assert 0.0 <= np.mean(np.array(ps) < 0.05) <= 0.15
    uniform = rng.uniform(0.01, 1.0, 300)  # not log-normal; censored at 0.8 (a fixed eps_max)
    fit = lognormal_fit(uniform[uniform <= 0.8], censored=np.full((uniform > 0.8).sum(), 0.8), bootstrap=200)
    assert fit.n_censored > 30 and fit.lilliefors_p < 0.02


# --- results files ----------------------------------------------------------------------------------
def _results(path, rows):
    """A critical_eps results file with ``rows``: (network_name, split, index, oracle, tol, status, lower, upper)."""
    from jaxrobust.critical_eps import TABLE, columns
    from jaxrobust.store import ResultStore
    store = ResultStore(path, TABLE, columns((2, 2, 1)))
    for name, split, i, oracle, tol, status, lo, up in rows:
        h = store.save_config({"oracle": oracle, "tol": tol, "eps_max": 0.5, "grid": None})
        store.append({"network": [f"hash-{name}"], "dataset": ["mnist"], "split": [split], "index": [i], "config": [h],
                      "label": [0], "predicted": [0], "eps_lower": [lo], "eps_upper": [up], "status": [status],
                      "oracle": [oracle], "time_s": [0.1], "queries": [3], "network_name": [name], "error": [""],
                      "counterexample": np.full((1, 2, 2, 1), np.nan, np.float32)})


def test_summary_never_pools_configurations_and_counts_what_it_sets_aside(tmp_path):
    from jaxrobust.distributions import summarize
    rng = np.random.default_rng(7)
    rows = [("a", "test", i, "crown", 0.001, "gap", v, v * 2) for i, v in enumerate(rng.lognormal(-3, 0.5, 12))]
    rows += [("a", "test", i, "attack", 0.001, "exact", v, v) for i, v in enumerate(rng.lognormal(-2, 0.5, 12))]
    rows += [("a", "test", 20, "crown", 0.001, "misclassified", 0.0, 0.0), ("a", "test", 21, "crown", 0.001, "error",
             np.nan, np.nan), ("a", "test", 22, "crown", 0.001, "censored", 0.3, np.nan),
             ("a", "test", 23, "crown", 0.001, "gap", 0.0, 0.01)]
    path = tmp_path / "r.h5"
    _results(path, rows)
    out = summarize(path, bootstrap=20)
    assert [g["n"] for g in out["groups"]] == [12, 16] or [g["n"] for g in out["groups"]] == [16, 12]
    crown = next(g for g in out["groups"] if g["bound"] == "proved")
    attack = next(g for g in out["groups"] if g["bound"] == "counterexample")
    assert crown["set_aside"] == {"error": 1, "gap": 1, "misclassified": 1}
    assert crown["n_fit"] == 12 and crown["n_censored"] == 1 and crown["lognormal"]["n_censored"] == 1
    assert attack["n_fit"] == 12 and attack["set_aside"] == {} and "crown" in crown["label"]
    by_config = summarize(path, by=("config",), bootstrap=20)
    assert sorted(g["n"] for g in by_config["groups"]) == [12, 16]
    with pytest.raises(InputError, match="stored keys are .*network_name"):
        summarize(path, by=("network_name", "no_such_key"))


def test_results_files_that_are_not_results(tmp_path):
    from jaxrobust.distributions import read_results
    from jaxrobust.errors import FileFormatError
    (tmp_path / "plain.h5").write_text("not hdf5")
    corrupt = tmp_path / "corrupt.h5"
    _results(corrupt, [("a", "test", 0, "crown", 0.001, "gap", 0.1, 0.2)])
    corrupt.write_bytes(corrupt.read_bytes()[:2000])
    for path, match in ((tmp_path, "is a directory"), (tmp_path / "plain.h5", "not an HDF5 file"),
                        (corrupt, "unreadable results file"), (tmp_path / "none.h5", "no results file")):
        with pytest.raises(FileFormatError, match=match):
            read_results(path)
