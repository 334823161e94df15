import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from jaxrobust import from_function
from jaxrobust.data import from_arrays
from jaxrobust.errors import InputError
from jaxrobust.kernels import perturb
from jaxrobust.roma import (
    CSV_COLUMNS,
    RomaConfig,
    categorical,
    compare_models,
    confidences,
    roma,
    run,
    wrong_label_confidence,
)


@pytest.fixture(scope="module")
def net():
    rng = np.random.default_rng(0)
    w1 = jnp.asarray(rng.normal(size=(16, 12)) / 2, jnp.float32)
    w2 = jnp.asarray(rng.normal(size=(12, 4)), jnp.float32)
    return from_function(lambda p, x: jnp.tanh(x.reshape(x.shape[0], -1) @ p["w1"]) @ p["w2"],
                         {"w1": w1, "w2": w2}, (4, 4, 1), 4, name="tiny")


@pytest.fixture(scope="module")
def data(net):
    x = np.random.default_rng(1).uniform(0, 1, size=(6, 4, 4, 1)).astype(np.float32)
    return x, np.asarray(net(x)).argmax(-1)


def test_wrong_label_confidence(net, data):
    x, y = data
    f = wrong_label_confidence(net)
    c = np.asarray(f(jnp.asarray(x)[:, None], jnp.asarray(y)))[:, 0]
    p = np.array(jax.nn.softmax(net(x)))
    p[np.arange(len(y)), y] = -1
    np.testing.assert_allclose(c, p.max(axis=1), rtol=1e-6)


@pytest.mark.slow
def test_confidences_do_not_depend_on_chunk_or_batch(net, data):
    x, y = data
    a = confidences(net, x, y, RomaConfig(eps=0.1, samples=300, chunk=300))
    b = confidences(net, x, y, RomaConfig(eps=0.1, samples=300, chunk=77))
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5)  # same samples; matmul blocking differs
    cfg = RomaConfig(eps=0.1, samples=300)
    r2 = roma(net, x, y, cfg, batch=2)
    r8 = roma(net, x, y, cfg, batch=8)
    np.testing.assert_array_equal(r2.n_adversarial, r8.n_adversarial)
    np.testing.assert_allclose(r2.lmbda, r8.lmbda, rtol=1e-4, atol=1e-5)
    some = roma(net, x[[5, 1]], y[[5, 1]], cfg, indices=[5, 1], batch=2)  # ids, not positions, seed the samples
    np.testing.assert_allclose(some.lmbda, r2.lmbda[[5, 1]], rtol=1e-4, atol=1e-5)


def test_batches_reuse_the_compiled_stages(net, data):
    """Labels, ids and inputs are arguments of the compiled sampling and evaluation stages, not constants."""
    x, y = data
    cfg = RomaConfig(eps=0.1, samples=300)
    roma(net, x, y, cfg, batch=2)
    sizes = perturb._draw_chunk._cache_size(), perturb._evaluate_chunk._cache_size()
    roma(net, x[::-1], y[::-1], cfg, indices=np.arange(10, 16), batch=2)
    assert (perturb._draw_chunk._cache_size(), perturb._evaluate_chunk._cache_size()) == sizes


def test_statistics_agree_with_scipy(net, data):
    x, y = data
    cfg = RomaConfig(eps=0.3, delta=0.5, samples=300)
    conf = np.asarray(confidences(net, x, y, cfg), np.float64)
    r = roma(net, x, y, cfg)
    for i in range(len(x)):
        assert r.ad_before[i] == pytest.approx(_anderson(conf[i]), rel=2e-3)
        _, lam = stats.boxcox(conf[i])
        assert r.lmbda[i] == pytest.approx(lam, rel=2e-3, abs=2e-3)
        assert r.n_adversarial[i] == int((conf[i] > 0.5).sum())
        if r.status[i] == "normal after Box-Cox":
            z = stats.boxcox(conf[i], lam)
            d = (0.5 ** lam - 1) / lam
            p = stats.norm.sf(d, z.mean(), z.std(ddof=1))
            assert r.plr[i] == pytest.approx(1 - p, abs=1e-4)
    upper = stats.beta.ppf(0.95, r.n_adversarial + 1, cfg.samples - r.n_adversarial)
    np.testing.assert_allclose(r.mc_upper, upper, rtol=1e-3)
    assert np.all(r.mc_upper >= r.mc_estimate)


def _anderson(x):
    """Anderson–Darling A² for normality with estimated mean and ddof=1 standard deviation."""
    z = np.sort((x - x.mean()) / x.std(ddof=1))
    n = len(z)
    i = np.arange(1, n + 1)
    return -n - np.mean((2 * i - 1) * (stats.norm.logcdf(z) + stats.norm.logsf(z[::-1])))


def test_bad_input(net, data):
    x, y = data
    with pytest.raises(InputError, match="delta"):
        roma(net, x, y, RomaConfig(delta=0.0))
    with pytest.raises(InputError, match="eps"):
        roma(net, x, y, RomaConfig(eps=-0.1))
    with pytest.raises(InputError, match="labels"):
        roma(net, x, y + 10)
    with pytest.raises(InputError, match="NaN"):
        roma(net, np.full_like(x, np.nan), y)


def test_run_resume_and_csv(net, data, tmp_path):
    x, y = data
    ds = from_arrays(x, y, "toy", num_classes=4)
    cfg = RomaConfig(eps=0.1, samples=300)
    out = tmp_path / "roma.h5"
    run(net, ds, range(4), cfg, out, chunk=2, progress=False)
    with pytest.raises(InputError, match="resume"):
        run(net, ds, range(4), cfg, out, progress=False)
    store = run(net, ds, range(6), cfg, out, resume=True, progress=False)
    rows = store.read()
    assert sorted(rows["index"].tolist()) == list(range(6))
    direct = roma(net, x, y, cfg)
    order = np.argsort(rows["index"])
    np.testing.assert_array_equal(rows["n_adversarial"][order], direct.n_adversarial)
    store.to_csv(tmp_path / "r.csv", CSV_COLUMNS)
    header = (tmp_path / "r.csv").read_text().splitlines()[0].split(",")
    assert header[:8] == ["index", "label", "plr", "log10_tail", "lambda", "status", "n_adversarial", "mc_upper"]


def test_categorical_and_comparison():
    rng = np.random.default_rng(0)
    labels = np.repeat([0, 1, 2], 40)
    plr = np.concatenate([rng.normal(0.99, 0.005, 40), rng.normal(0.90, 0.02, 40), rng.normal(0.99, 0.005, 40)])
    status = np.where(np.arange(120) % 10 == 0, "FAIL", "normal after Box-Cox")
    status[40:80] = "FAIL"  # class 1 fits rarely
    status[40:50] = "normal"
    rows = categorical(labels, plr, status, np.full(120, 1e-3))
    by = {r.label: r for r in rows}
    assert by[1].complete == pytest.approx(0.25) and by[1].binom_p < 1e-3
    assert by[0].complete == pytest.approx(0.9)
    assert by[1].plr_mean == pytest.approx(plr[40:50].mean())
    assert by[1].t_p < 1e-3 and by[0].n == 40
    c = compare_models(plr[:40], plr[:40] - 0.01)
    assert c["n"] == 40 and c["wilcoxon_p"] < 1e-6 and c["mean_a"] > c["mean_b"]


def test_misclassified_inputs_stay_out_of_plr(net, data):
    x, y = data
    wrong = y.copy()
    wrong[[0, 3]] = (y[[0, 3]] + 1) % 4
    r = roma(net, x, wrong, RomaConfig(eps=0.1, samples=300))
    assert list(r.status[[0, 3]]) == ["misclassified"] * 2 and np.all(np.isnan(r.plr[[0, 3]]))
    assert np.all(np.isnan(r.log10_tail[[0, 3]])) and not r.tail_bound[[0, 3]].any()
    assert "misclassified" not in set(r.status[[1, 2, 4, 5]]) and np.all(np.isfinite(r.plr[[1, 2, 4, 5]]))
    rows = {c.label: c for c in categorical(wrong, r.plr, r.status, r.mc_upper)}
    assert sum(c.misclassified for c in rows.values()) == 2 and sum(c.n for c in rows.values()) == 6
    assert all(np.isfinite(c.plr_mean) for c in rows.values() if c.n > c.misclassified)


def test_tail_beyond_the_samples_is_a_flagged_bound(net, data):
    x, y = data
    cfg = RomaConfig(eps=0.01, samples=300)
    r = roma(net, x, y, cfg)
    conf = np.asarray(confidences(net, x, y, cfg))
    fit = r.status != "FAIL"
    assert np.all(conf.max(1) < cfg.delta) and fit.sum() >= 4  # no sample near δ: the fit extrapolates
    assert r.tail_bound[fit].all() and not r.tail_bound[~fit].any()
    np.testing.assert_allclose(r.log10_tail[fit], -np.log10(300))
    np.testing.assert_allclose(r.plr[fit], 1 - 1 / 300)
    wide = roma(net, x, y, RomaConfig(eps=0.2, delta=0.3, samples=300))  # samples reach δ: fitted tails stand
    resolved = ~wide.tail_bound & (wide.status != "FAIL")
    assert resolved.sum() >= 3 and np.all(wide.log10_tail[resolved] > -np.log10(300))
    assert np.all(wide.log10_tail[wide.tail_bound] == np.float32(-np.log10(300)))


def test_degenerate_balls_warn_and_scipy_stays_quiet(net, data):
    x, y = data
    with pytest.warns(UserWarning, match="eps = 0"):
        roma(net, x[:2], y[:2], RomaConfig(eps=0.0, samples=10))
    with pytest.warns(UserWarning, match="as wide as the domain"):
        roma(net, x[:2], y[:2], RomaConfig(eps=0.5, samples=10))
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        rows = categorical(np.repeat([0, 1], 3), np.ones(6), np.full(6, "normal"), np.zeros(6))
        compare_models(np.ones(3), np.ones(3) - [0, 0, 1e-3])
    assert np.isnan(rows[0].t_p) and rows[0].plr_mean == 1.0
