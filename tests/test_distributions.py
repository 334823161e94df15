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
