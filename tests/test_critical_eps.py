import jax.numpy as jnp
import numpy as np
import pytest

from jaxrobust import from_function
from jaxrobust.critical_eps import SearchConfig, run, search
from jaxrobust.data import from_arrays
from jaxrobust.errors import InputError
from jaxrobust.oracles import Oracle, make_oracle


def linear_net(seed=0, d=6, c=3):
    rng = np.random.default_rng(seed)
    w, b = rng.normal(size=(d, c)).astype(np.float32), rng.normal(size=c).astype(np.float32)
    return from_function(lambda p, x: x @ p["w"] + p["b"], {"w": jnp.asarray(w), "b": jnp.asarray(b)}, (d,), c,
                         domain=(-10.0, 10.0), name="linear"), w, b


def true_critical(w, b, x, y):
    """For a linear classifier in an unclipped box: min_j (z_y - z_j) / ||w_y - w_j||_1."""
    z = x @ w + b
    return np.array([min((z[i, y[i]] - z[i, j]) / np.abs(w[:, y[i]] - w[:, j]).sum()
                         for j in range(w.shape[1]) if j != y[i]) for i in range(len(x))])


@pytest.fixture(scope="module")
def problem():
    net, w, b = linear_net()
    x = np.random.default_rng(1).uniform(-1, 1, size=(12, 6)).astype(np.float32)
    y = np.asarray(net(x)).argmax(-1)
    y[0] = (y[0] + 1) % 3  # one misclassified input
    return net, w, b, x, y


def test_bisection_brackets_the_analytic_critical_eps(problem):
    net, w, b, x, y = problem
    r = search(net, make_oracle(net, "crown"), x, y, SearchConfig(eps_max=3.0, tol=1e-3))
    star = true_critical(w, b, x, y)
    assert r.status[0] == "misclassified" and r.eps_lower[0] == 0 and r.eps_upper[0] == 0
    ok = slice(1, None)
    assert np.all(r.eps_lower[ok] <= star[ok] + 1e-6)          # proofs are sound
    assert np.all(r.eps_upper[ok] >= star[ok] - 1e-6)          # counterexamples are real
    assert np.all(star[ok] - r.eps_lower[ok] <= 1e-3)           # CROWN is exact on a linear model
    exact = r.status[ok] == "exact"
    assert exact.mean() >= 0.6                                   # PGD near the boundary may leave a gap
    assert np.all((r.eps_upper[ok] - r.eps_lower[ok] <= 1e-3 + 1e-6) == exact)
    pred = np.asarray(net(r.counterexample[ok])).argmax(-1)
    assert np.all(pred != y[ok])
    assert np.all(np.abs(r.counterexample[ok] - x[ok]).max(axis=1) <= r.eps_upper[ok] + 1e-6)


def test_grid_search_returns_adjacent_grid_values(problem):
    net, w, b, x, y = problem
    grid = tuple(np.round(np.arange(1, 151) * 0.02, 6))
    r = search(net, make_oracle(net, "crown"), x[1:], y[1:], SearchConfig(grid=grid))
    star = true_critical(w, b, x[1:], y[1:])
    g = np.asarray(grid)
    assert np.all(np.isin(r.eps_lower[r.eps_lower > 0], g))
    assert np.all(r.eps_lower <= star + 1e-6) and np.all(r.eps_upper >= star - 1e-6)
    exact = r.status == "exact"
    assert exact.mean() >= 0.6
    # exact on a grid: no grid value lies strictly between the proved and the refuted radius
    for lo, up in zip(r.eps_lower[exact], r.eps_upper[exact]):
        assert not np.any((g > lo) & (g < up))


@pytest.mark.parametrize("min_norm_steps", [60, 0])  # one minimum-norm query, or bisection with PGD
def test_attack_only_gives_upper_bounds(problem, min_norm_steps):
    net, w, b, x, y = problem
    oracle = make_oracle(net, "attack", min_norm_steps=min_norm_steps)
    r = search(net, oracle, x[1:], y[1:], SearchConfig(eps_max=3.0, tol=1e-3))
    star = true_critical(w, b, x[1:], y[1:])
    assert np.all(r.eps_lower == 0) and np.all(r.eps_upper >= star - 1e-6)
    assert np.median(r.eps_upper - star) <= 2e-3
    assert np.all(r.status == "gap") and np.all((r.queries == 1) == (min_norm_steps > 0))
    assert np.all(np.asarray(net(r.counterexample)).argmax(-1) != y[1:])
    np.testing.assert_allclose(np.abs(r.counterexample - x[1:]).max(axis=1), r.eps_upper, rtol=1e-6)


def test_minimum_norm_attack_on_a_grid(problem):
    net, w, b, x, y = problem
    grid = np.round(np.arange(1, 151) * 0.02, 6)
    r = search(net, make_oracle(net, "attack"), x, y, SearchConfig(grid=tuple(grid)))
    star = true_critical(w, b, x[1:], y[1:])
    assert r.status[0] == "misclassified" and r.eps_upper[0] == 0 and r.queries[0] == 0
    up, d = r.eps_upper[1:], np.abs(r.counterexample[1:] - x[1:]).max(axis=1)
    assert np.all(np.isin(up, grid)) and np.all(up >= star - 1e-6)
    assert np.all((d <= up + 1e-6) & (d > up - 0.02 - 1e-6))   # the smallest grid value holding the counterexample
    assert np.median(up - star) <= 0.02 + 1e-6  # the margin loss may aim at a farther class
    censored = search(net, make_oracle(net, "attack"), x[1:3], y[1:3], SearchConfig(grid=(1e-4, 2e-4)))
    assert np.all(censored.status == "censored") and np.all(np.isnan(censored.eps_upper))


def test_censored_when_no_counterexample_below_eps_max(problem):
    net, _w, _b, x, y = problem
    r = search(net, make_oracle(net, "crown"), x[1:3], y[1:3], SearchConfig(eps_max=1e-4, tol=1e-5))
    assert np.all(r.status == "censored") and np.all(np.isnan(r.eps_upper))


def test_oracle_failure_is_error_never_zero(problem):
    net, _w, _b, x, y = problem

    def broken(x, y, eps, key):
        raise FloatingPointError("solver crashed")

    r = search(net, Oracle("broken", broken, broken), x[1:4], y[1:4], SearchConfig(eps_max=1.0))
    assert np.all(r.status == "error") and np.all(np.isnan(r.eps_lower)) and np.all(np.isnan(r.eps_upper))
    assert "solver crashed" in r.errors[0]


def test_bad_input(problem):
    net, _w, _b, x, y = problem
    o = make_oracle(net, "attack")
    with pytest.raises(InputError, match="labels"):
        search(net, o, x, y + 5)
    with pytest.raises(InputError, match="NaN"):
        search(net, o, np.full_like(x, np.nan), y)
    with pytest.raises(InputError, match="> 0"):
        search(net, o, x, y, SearchConfig(eps_max=-1.0))
    with pytest.raises(InputError, match="oracle"):
        make_oracle(net, "magic")


def test_run_stores_rows_and_resumes(problem, tmp_path):
    net, _w, _b, x, y = problem
    ds = from_arrays(np.clip((x + 1) / 2, 0, 1).reshape(12, 1, 6, 1), y, "toy", num_classes=3)
    cfg = SearchConfig(eps_max=3.0, tol=1e-2)
    out = tmp_path / "r.h5"
    store = run(net, ds, range(5), "ibp", cfg, out, chunk=2, progress=False)
    assert len(store) == 5
    with pytest.raises(InputError, match="resume"):
        run(net, ds, range(5), "ibp", cfg, out, progress=False)
    store = run(net, ds, range(12), "ibp", cfg, out, resume=True, chunk=4, progress=False)
    rows = store.read()
    assert sorted(rows["index"].tolist()) == list(range(12))
    direct = search(net, make_oracle(net, "ibp"), np.clip((x + 1) / 2, 0, 1), y, cfg, indices=np.arange(12))
    order = np.argsort(rows["index"])
    np.testing.assert_allclose(rows["eps_lower"][order], direct.eps_lower)
    assert list(rows["status"][order]) == list(direct.status)
