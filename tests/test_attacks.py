import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrobust.errors import InputError
from jaxrobust.kernels import attacks, min_norm
from jaxrobust.kernels.perturb import sample
from jaxrobust.network import from_function

KEY = jax.random.key(3)
D, B = 12, 6
_rng = np.random.default_rng(0)
W = jnp.asarray(_rng.normal(size=(D, 2)), jnp.float32)
BIAS = jnp.asarray(_rng.normal(size=2), jnp.float32)
# a linear 2-class model on a wide domain: the minimal perturbation is known in closed form
NET = from_function(lambda p, x: x @ p[0] + p[1], (W, BIAS), (D,), 2, domain=(-10.0, 10.0))
X = jnp.asarray(_rng.uniform(-1, 1, (B, D)), jnp.float32)
Y = jnp.argmax(NET(X), axis=1)
_M = np.abs(np.asarray(attacks.margin(NET(X), Y)))
_WD = np.asarray(W[:, 0] - W[:, 1])
EPS_LINF = jnp.asarray(_M / np.abs(_WD).sum(), jnp.float32)  # eps* = margin / ||w_0 - w_1||_1
EPS_L2 = jnp.asarray(_M / np.linalg.norm(_WD), jnp.float32)  # eps* = margin / ||w_0 - w_1||_2


def check_result(res, x, eps, norm, domain, net=NET, y=Y):
    x_adv, d = np.asarray(res.x_adv), np.asarray(res.x_adv - x).reshape(len(x), -1)
    size = np.abs(d).max(1) if norm == "linf" else np.linalg.norm(d, axis=1)
    assert np.all(size <= np.asarray(eps) * (1 + 1e-5) + 1e-6)
    assert x_adv.min() >= domain[0] and x_adv.max() <= domain[1]
    m = np.asarray(attacks.margin(net(res.x_adv), y))  # plain forward re-check
    np.testing.assert_allclose(np.asarray(res.margin), m, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(res.success), m < 0)


@pytest.mark.parametrize("norm,eps_star", [("linf", EPS_LINF), ("l2", EPS_L2)])
def test_pgd_finds_exactly_above_critical_eps(norm, eps_star):
    above = attacks.pgd(NET, X, Y, eps_star * 1.02, key=KEY, steps=20, norm=norm)
    assert above.success.all()
    check_result(above, X, eps_star * 1.02, norm, NET.domain)
    below = attacks.pgd(NET, X, Y, eps_star * 0.98, key=KEY, steps=20, norm=norm)
    assert not below.success.any()
    check_result(below, X, eps_star * 0.98, norm, NET.domain)


def test_pgd_options_ce_restarts_schedules():
    for schedule in ("cosine", "step"):
        res = attacks.pgd(NET, X, Y, EPS_LINF * 1.05, key=KEY, steps=10, restarts=3, loss="ce",
                          schedule=schedule, step_size=0.5 * EPS_LINF)
        assert res.success.all()
        check_result(res, X, EPS_LINF * 1.05, "linf", NET.domain)


def test_pgd_domain_clipping_and_generic_callable():
    x = jnp.clip(X, 0.0, 1.0)
    y = jnp.argmax(NET(x), axis=1)
    fn = lambda v: NET(v)
    res = attacks.pgd(fn, x, y, 0.8, key=KEY, steps=10, domain=(0.0, 1.0))
    check_result(res, x, 0.8, "linf", (0.0, 1.0), y=y)
    assert np.asarray(res.x_adv == 0.0).any() or np.asarray(res.x_adv == 1.0).any()


def test_pgd_conv_net_unrolled():
    k = jnp.asarray(_rng.normal(size=(3, 3, 1, 2)), jnp.float32)
    Wd = jnp.asarray(_rng.normal(size=(2 * 4 * 4, 3)), jnp.float32)

    def apply(p, x):
        h = jax.lax.conv_general_dilated(x, p[0], (1, 1), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return jax.nn.relu(h).reshape(x.shape[0], -1) @ p[1]

    net = from_function(apply, (k, Wd), (6, 6, 1), 3)
    assert attacks._signature(net.apply, net.params, (4, 6, 6, 1), jnp.float32) == (3, True)
    x = jnp.asarray(_rng.uniform(0, 1, (4, 6, 6, 1)), jnp.float32)
    y = jnp.argmax(net(x), axis=1)
    res = attacks.pgd(net, x, y, 0.3, key=KEY, steps=5)
    check_result(res, x, 0.3, "linf", net.domain, net=net, y=y)
    assert res.success.any()


def test_pgd_keep_best_or_final_iterate():
    """keep_best=False returns the final iterate (checked against a plain loop from the documented
    random start); keep_best=True the lowest-margin iterate, strictly better where steps overshoot."""
    w = jnp.asarray(_rng.normal(size=D), jnp.float32)
    net = from_function(lambda p, x: jnp.stack([jnp.cos(3 * x @ p) + 1.5, jnp.zeros(len(x))], 1), w, (D,), 2,
                        domain=(-10.0, 10.0))
    y = jnp.zeros(B, jnp.int32)
    eps, alpha, steps = 1.0, 0.3, 6
    last = attacks.pgd(net, X, y, eps, key=KEY, steps=steps, step_size=alpha, keep_best=False)
    best = attacks.pgd(net, X, y, eps, key=KEY, steps=steps, step_size=alpha)
    for res in (last, best):
        check_result(res, X, eps, "linf", net.domain, net=net, y=y)
    assert np.all(np.asarray(best.margin) <= np.asarray(last.margin) + 1e-6)
    assert np.any(np.asarray(best.margin) < np.asarray(last.margin) - 1e-3)
    xa = sample(jax.random.fold_in(KEY, 0), X, eps, 1, domain=net.domain)[:, 0]
    loss = lambda v: -jnp.sum(attacks.margin(net(v), y))  # noqa: E731
    for _ in range(steps):
        xa = attacks.project(xa + alpha * jnp.sign(jax.grad(loss)(xa)), X, jnp.full(B, eps), "linf", net.domain)
    np.testing.assert_allclose(np.asarray(last.x_adv), np.asarray(xa), atol=1e-6)


def test_fgsm_sanity():
    res = attacks.fgsm(NET, X, Y, EPS_LINF * 1.02)  # exact on a linear 2-class model
    assert res.success.all()
    check_result(res, X, EPS_LINF * 1.02, "linf", NET.domain)
    assert not attacks.fgsm(NET, X, Y, EPS_LINF * 0.98).success.any()
    assert not attacks.fgsm(NET, X, Y, 0.0).success.any()


def test_random_search_above_and_below_critical_eps():
    res = attacks.random_search(NET, X, Y, EPS_LINF * 1.1, key=KEY, queries=300)
    assert res.success.all()
    check_result(res, X, EPS_LINF * 1.1, "linf", NET.domain)
    below = attacks.random_search(NET, X, Y, EPS_LINF * 0.98, key=KEY, queries=300)
    assert not below.success.any()


def test_input_errors():
    with pytest.raises(InputError, match=">= 0"):
        attacks.pgd(NET, X, Y, -0.1, key=KEY)
    with pytest.raises(InputError, match="finite"):
        attacks.fgsm(NET, X, Y, jnp.full((B,), jnp.nan))
    with pytest.raises(InputError, match=">= 0"):  # checked on the device
        attacks.pgd(NET, X, Y, jnp.full((B,), -0.1), key=KEY)
    with pytest.raises(InputError, match="finite"):  # checked on the host
        attacks.fgsm(NET, X, Y, np.full((B,), np.inf))
    with pytest.raises(InputError, match="domain must satisfy"):
        attacks.pgd(NET, X, Y, 0.1, key=KEY, domain=(1.0, 0.0))
    with pytest.raises(InputError, match="NaN"):
        attacks.pgd(NET, X.at[0, 0].set(jnp.nan), Y, 0.1, key=KEY)
    with pytest.raises(InputError, match=r"labels must lie in \[0, 2\)"):
        attacks.pgd(NET, X, Y.at[0].set(2), 0.1, key=KEY)
    with pytest.raises(InputError, match="labels"):
        attacks.pgd(NET, X, Y[:3], 0.1, key=KEY)
    with pytest.raises(InputError, match="shape"):
        attacks.pgd(NET, X[:, :5], Y, 0.1, key=KEY)
    with pytest.raises(InputError, match="shape"):
        attacks.random_search(NET, X, Y, jnp.ones(B + 1), key=KEY)
    with pytest.raises(InputError, match="domain"):
        attacks.pgd(NET, X + 20.0, Y, 0.1, key=KEY)
    with pytest.raises(InputError, match="norm"):
        attacks.pgd(NET, X, Y, 0.1, key=KEY, norm="l3")
    with pytest.raises(InputError, match="schedule"):
        attacks.pgd(NET, X, Y, 0.1, key=KEY, schedule="linear")


# --- minimum-norm attack ------------------------------------------------------------------------------
MN_KEY = jax.random.key(5)


def check_min_norm(res, net, x, y, eps_max):
    """Counterexamples are misclassified by a plain forward pass, lie in the domain and within the reported
    distance (<= eps_max); failures report an infinite distance."""
    x_adv, ok = np.asarray(res.x_adv), np.asarray(res.success)
    m = np.asarray(attacks.margin(net(res.x_adv), y))
    np.testing.assert_array_equal(ok, m < 0)
    d = np.abs(x_adv - np.asarray(x)).reshape(len(x), -1).max(1)
    np.testing.assert_allclose(np.asarray(res.distance)[ok], d[ok], rtol=1e-6)
    assert np.all(d[ok] <= np.broadcast_to(eps_max, d.shape)[ok] + 1e-6)
    assert np.all(np.isinf(np.asarray(res.distance)[~ok]))
    assert x_adv.min() >= net.domain[0] and x_adv.max() <= net.domain[1]


def test_min_norm_finds_the_analytic_distance_on_a_linear_model():
    res = min_norm(NET, X, Y, 5.0, key=MN_KEY, steps=60)
    check_min_norm(res, NET, X, Y, 5.0)
    assert res.success.all()
    d, star = np.asarray(res.distance), np.asarray(EPS_LINF)
    assert np.all(d >= star * (1 - 1e-5)) and np.all(d <= star * 1.02)


def test_min_norm_respects_eps_max():
    cap = np.asarray(EPS_LINF) * np.where(np.arange(len(X)) % 2, 0.9, 1.5)
    res = min_norm(NET, X, Y, cap, key=MN_KEY, steps=40)
    check_min_norm(res, NET, X, Y, cap)
    np.testing.assert_array_equal(np.asarray(res.success), np.arange(len(X)) % 2 == 0)


def test_min_norm_misclassified_input_has_distance_zero():
    res = min_norm(NET, X[:2], 1 - Y[:2], 1.0, key=MN_KEY, steps=5)
    assert res.success.all() and np.all(np.asarray(res.distance) == 0)


def relu_net(seed=0, d=20, h=24, c=4):
    rng = np.random.default_rng(seed)
    p = [jnp.asarray(rng.normal(size=s) / np.sqrt(s[0]), jnp.float32) for s in ((d, h), (h, h), (h, c))]
    apply = lambda p, x: jax.nn.relu(jax.nn.relu(x @ p[0]) @ p[1]) @ p[2]
    return from_function(apply, p, (d,), c, domain=(0.0, 1.0))


@pytest.mark.parametrize("targets", [0, 3])
def test_min_norm_not_much_worse_than_bisection_with_pgd(targets):
    net = relu_net()
    x = jnp.asarray(np.random.default_rng(1).uniform(0.2, 0.8, (16, 20)), jnp.float32)
    y = jnp.argmax(net(x), axis=1)
    res = min_norm(net, x, y, 1.0, key=MN_KEY, steps=60, targets=targets)
    check_min_norm(res, net, x, y, 1.0)
    grid = np.linspace(0.002, 0.5, 250)
    lo, hi = np.zeros(len(x), int), np.full(len(x), len(grid) - 1)
    for _ in range(8):  # per-input bisection over the grid with PGD-40
        mid = (lo + hi) // 2
        ok = np.asarray(attacks.pgd(net, x, y, grid[mid], key=KEY, steps=40).success)
        hi, lo = np.where(ok, mid, hi), np.where(ok, lo, mid + 1)
    d, bisection = np.asarray(res.distance), grid[hi]
    assert res.success.all() and np.all(d <= 2 * bisection)   # a random ReLU net has several local optima
    assert np.mean(d <= bisection + 0.002) >= 0.75


def test_min_norm_input_errors():
    with pytest.raises(InputError, match="steps"):
        min_norm(NET, X, Y, 1.0, key=MN_KEY, steps=0)
    with pytest.raises(InputError, match="gamma"):
        min_norm(NET, X, Y, 1.0, key=MN_KEY, gamma=1.5)
    with pytest.raises(InputError, match=">= 0"):
        min_norm(NET, X, Y, -1.0, key=MN_KEY)
