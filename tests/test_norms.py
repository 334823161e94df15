"""L2 and L1 balls: norms, exact ball sampling, dual-norm CROWN bounds, attacks and critical ε in every norm."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats

from jaxrobust import load_network
from jaxrobust.critical_eps import SearchConfig, search
from jaxrobust.data import load_dataset, to_network_input
from jaxrobust.errors import InputError
from jaxrobust.kernels import attacks, crown, margin_bounds, min_norm, perturb, robustness_spec
from jaxrobust.kernels.norms import ascent, check_norm, dual_norm, l1_ball, project, row_norm, unit_maximiser
from jaxrobust.oracles import distance, make_oracle
from jaxrobust.verdict import ROBUST, UNKNOWN, VIOLATED
from jaxrobust.verify import verify

from .test_bounds import ACTS, assert_inside, make_cnn, make_mlp, random_spec

DOMAIN = (-1.0, 1.0)


def ball_points(fn, x, eps, norm, key, n_random=100_000, steps=20):
    """Outputs ``(P, B, C)`` at exact uniform samples of the ball ∩ domain around every ``x: (B, *in)`` and at
    points that ascend / descend each output by steepest ``norm`` steps projected onto ball ∩ domain."""
    B = x.shape[0]
    e = jnp.full((B,), eps)
    s = perturb.sample(key, x, e, n_random, sampler=norm, domain=DOMAIN)          # (B, n, *in)
    pts = jnp.moveaxis(s, 1, 0)                                                     # (n, B, *in)
    C = fn(x).shape[-1]
    direction = jnp.concatenate([jnp.eye(C), -jnp.eye(C)])

    @jax.jit
    def ascend(z):                                                                  # (2C, B, *in)
        def step(_, z):
            g = jax.grad(lambda z: jnp.sum(jax.vmap(fn)(z) * direction[:, None, :]))(z)
            flat = lambda a: a.reshape((2 * C * B,) + x.shape[1:])
            moved = flat(z) + 0.1 * eps * ascent(flat(g), norm, flat(z), DOMAIN)
            return project(moved, flat(jnp.broadcast_to(x, z.shape)), jnp.full(2 * C * B, eps), norm,
                           DOMAIN).reshape(z.shape)
        return jax.lax.fori_loop(0, steps, step, z)

    pts = jnp.concatenate([pts, ascend(jnp.broadcast_to(pts[0], (2 * C,) + pts.shape[1:]))])
    d = row_norm((pts - x[None]).reshape((-1,) + x.shape[1:]), norm)
    assert float(d.max()) <= eps * (1 + 1e-5)
    return jax.jit(jax.vmap(fn))(pts).reshape(len(pts), B, -1)


def hull(x, eps):
    return jnp.clip(x - eps, *DOMAIN), jnp.clip(x + eps, *DOMAIN)


NETS = st.one_of(
    st.tuples(st.just("mlp"), st.integers(0, 10_000), st.sampled_from(sorted(ACTS)), st.just(None)),
    st.tuples(st.just("cnn"), st.integers(0, 10_000), st.sampled_from(sorted(ACTS)), st.sampled_from(["max", "avg"])),
)


@settings(max_examples=2, deadline=None)
@given(arch=NETS, norm=st.sampled_from(["l2", "l1"]))
@pytest.mark.slow
def test_ball_bounds_contain_exact_ball_samples_and_attacks(arch, norm):
    kind, seed, act, pool = arch
    fn, in_shape = make_mlp(seed, act) if kind == "mlp" else make_cnn(seed, act, pool)
    x = jax.random.uniform(jax.random.PRNGKey(seed + 1000), (2,) + in_shape, minval=-0.9, maxval=0.9)
    eps = 0.4 if norm == "l2" else 0.8
    y = ball_points(fn, x, eps, norm, jax.random.PRNGKey(seed))
    lo, hi = hull(x, eps)
    ball = (x, eps, norm)
    assert_inside(y, crown(fn, lo, hi, ball=ball))
    spec = random_spec(seed, 2, 4, y.shape[-1])
    ys = jnp.einsum("bkc,pbc->pbk", spec, y)
    assert_inside(ys, crown(fn, lo, hi, spec, intermediate="ibp", ball=ball))
    assert_inside(ys, crown(fn, lo, hi, spec, alpha=True, alpha_steps=3, ball=ball))


@pytest.mark.parametrize("norm,q", [("l2", 2), ("l1", np.inf), ("linf", 1)])
def test_crown_is_exact_on_a_linear_function_over_a_ball(norm, q):
    w = jax.random.normal(jax.random.PRNGKey(0), (6, 3))
    fn = lambda x: x @ w  # noqa: E731
    x = jnp.asarray([[0.1, -0.2, 0.3, 0.0, 0.05, -0.1]])
    eps = 0.05                                       # the ball stays inside the box hull's domain: no clipping
    b = crown(fn, x - eps, x + eps, ball=(x, eps, norm))
    exact = np.asarray(x @ w)[0] - eps * np.linalg.norm(np.asarray(w), q, axis=0)
    np.testing.assert_allclose(np.asarray(b.lower)[0], exact, rtol=1e-4, atol=1e-5)


def test_ball_bounds_are_tighter_than_the_box_hull():
    fn, in_shape = make_mlp(3, "relu")
    x = jax.random.uniform(jax.random.PRNGKey(4), (8,) + in_shape, minval=-0.5, maxval=0.5)
    for norm in ("l2", "l1"):
        lo, hi = hull(x, 0.4)
        box, ball = crown(fn, lo, hi), crown(fn, lo, hi, ball=(x, 0.4, norm))
        assert float(jnp.mean(ball.upper - ball.lower)) < 0.9 * float(jnp.mean(box.upper - box.lower))


def test_ball_arguments_are_checked():
    fn, in_shape = make_mlp(0, "relu")
    x = jnp.zeros((2,) + in_shape)
    with pytest.raises(InputError, match="norm"):
        crown(fn, x - 0.1, x + 0.1, ball=(x, 0.1, "l3"))
    with pytest.raises(InputError, match="center"):
        crown(fn, x - 0.1, x + 0.1, ball=(x[:1], 0.1, "l2"))
    with pytest.raises(InputError, match="eps"):
        crown(fn, x - 0.1, x + 0.1, ball=(x, np.full(3, 0.1), "l2"))
    with pytest.raises(InputError, match="eps"):
        crown(fn, x - 0.1, x + 0.1, ball=(x, -0.1, "l1"))
    b = crown(fn, x - 0.1, x + 0.1, ball=(x, np.array([0.1, 0.05]), "l2"))
    assert b.lower.shape[0] == 2


# --- norms ------------------------------------------------------------------------------------------------------
def test_norm_names():
    assert [check_norm(n) for n in ("inf", "2", "1", "linf", "L2", "l1")] == ["linf", "l2", "l1", "linf", "l2", "l1"]
    with pytest.raises(InputError, match="norm"):
        check_norm("0")


@pytest.mark.parametrize("norm", ["linf", "l2", "l1"])
def test_unit_maximiser_attains_the_dual_norm(norm):
    rows = jax.random.normal(jax.random.PRNGKey(5), (6, 3, 4))
    d = unit_maximiser(rows, norm)
    assert bool(jnp.all(row_norm(d, norm) <= 1 + 1e-6))
    np.testing.assert_allclose(jnp.sum((rows * d).reshape(6, -1), 1), dual_norm(rows.reshape(6, -1), norm),
                               rtol=1e-5)


def test_l1_projection_is_the_euclidean_projection():
    d = jax.random.normal(jax.random.PRNGKey(0), (5, 40))
    eps = jnp.asarray([0.5, 2.0, 10.0, 40.0, 1e-3])
    p = np.asarray(project(d, jnp.zeros_like(d), eps, "l1"))
    for b in range(5):
        a = np.abs(np.asarray(d[b]))
        if a.sum() <= eps[b]:
            np.testing.assert_array_equal(p[b], np.asarray(d[b]))
            continue
        lo, hi = 0.0, a.max()                 # the soft threshold that leaves L1 norm eps, by bisection
        for _ in range(200):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if np.maximum(a - mid, 0).sum() > eps[b] else (lo, mid)
        np.testing.assert_allclose(p[b], np.sign(d[b]) * np.maximum(a - hi, 0), atol=1e-5)


@pytest.mark.parametrize("norm", ["linf", "l2", "l1"])
def test_projection_lands_in_ball_and_domain(norm):
    x = jax.random.uniform(jax.random.PRNGKey(1), (16, 30), minval=-1, maxval=1)
    z = x + 3 * jax.random.normal(jax.random.PRNGKey(2), x.shape)
    eps = jnp.linspace(0.01, 2.0, 16)
    p = project(z, x, eps, norm, DOMAIN)
    assert bool(jnp.all(row_norm(p - x, norm) <= eps * (1 + 1e-6)))
    assert bool(jnp.all((p >= -1) & (p <= 1)))


def test_l1_ball_samples_are_uniform():
    n = 20
    z = jax.random.normal(jax.random.PRNGKey(0), (40_000, n + 1))
    u = np.asarray(l1_ball(z))
    r = np.abs(u).sum(1)
    assert r.max() <= 1 + 1e-6
    # uniform in the ball: P(||u||_1 <= t) = t^n, and the signs are fair coins
    assert stats.kstest(r ** n, "uniform").pvalue > 1e-3
    assert abs(np.mean(u > 0) - 0.5) < 0.01
    s = perturb.sample(jax.random.PRNGKey(3), jnp.zeros((1, n)), 0.5, 1000, sampler="l1")
    assert float(row_norm(s[0], "l1").max()) <= 0.5 * (1 + 1e-6)


# --- attacks and critical ε on a trained network --------------------------------------------------------------
@pytest.fixture(scope="module")
def mlp():
    """The bundled MNIST MLP and the first 12 bundled test images it classifies correctly."""
    net = load_network("mnist-mlp")
    ds = load_dataset("mnist", "test")
    x = np.asarray(net.check_inputs(to_network_input(ds.x[:16], net.input_shape)), np.float32)
    y = np.asarray(ds.y[:16])
    ok = np.asarray(net(jnp.asarray(x))).argmax(-1) == y
    return net, x[ok][:12], y[ok][:12]


@pytest.mark.parametrize("norm", ["l2", "l1"])
def test_attacks_stay_in_the_ball_and_above_the_certified_radius(mlp, norm):
    net, x, y = mlp
    eps_max = 4.0 if norm == "l2" else 20.0
    r = min_norm(net, x, y, eps_max, key=jax.random.PRNGKey(0), steps=80, norm=norm)
    ok = np.asarray(r.success)
    assert ok.sum() >= 10
    d = np.asarray(row_norm(r.x_adv - x, norm))
    np.testing.assert_allclose(np.asarray(r.distance)[ok], d[ok], rtol=1e-6)
    assert np.all(np.asarray(net(r.x_adv)).argmax(-1)[ok] != y[ok])
    assert np.all(np.asarray(r.x_adv) >= 0) and np.all(np.asarray(r.x_adv) <= 1)
    proved = np.asarray(margin_bounds(net, x, np.asarray(r.distance) * 0.999, "crown", labels=y, norm=norm))
    assert not np.any(np.all(proved > 0, axis=1) & ok)       # no proof beyond a counterexample
    p = attacks.pgd(net, x, y, eps_max, key=jax.random.PRNGKey(1), steps=40, norm=norm)
    assert np.all(np.asarray(row_norm(p.x_adv - x, norm)) <= eps_max * (1 + 1e-6))
    assert np.asarray(p.success).sum() >= ok.sum() - 1


@pytest.mark.parametrize("norm", ["l2", pytest.param("l1", marks=pytest.mark.slow)])
def test_critical_eps_brackets_in_other_norms(mlp, norm):
    net, x, y = mlp
    eps_max = 4.0 if norm == "l2" else 20.0
    oracle = make_oracle(net, "crown", norm=norm, attack_steps=20, targets=2)
    r = search(net, oracle, x, y, SearchConfig(eps_max=eps_max, tol=0.01))
    found = ~np.isnan(r.eps_upper)
    assert found.sum() >= 10 and np.all(r.eps_lower[found] <= r.eps_upper[found])
    np.testing.assert_allclose(distance(r.counterexample[found], x[found], norm), r.eps_upper[found], rtol=1e-6)
    assert np.all(np.asarray(net(jnp.asarray(r.counterexample[found]))).argmax(-1) != y[found])
    spec = robustness_spec(jnp.asarray(y), 10)
    lower = margin_bounds(net, x, r.eps_lower, "crown", labels=y, norm=norm)
    assert spec.shape[1] == lower.shape[1] and bool(jnp.all((lower > 0) | (r.eps_lower[:, None] == 0)))
    assert oracle.norm == norm and all(a.endswith(norm) for a in oracle.attacks)


# --- complete verification over L2 and L1 balls -----------------------------------------------------------------
def sampled_min_margins(net, x, y, eps, norm, n=200_000):
    """Smallest margin ``logit_y - max_j logit_j`` at exact uniform samples of the ball ∩ [0, 1]^n (an upper bound
    of the true minimum: negative proves a counterexample exists)."""
    s = perturb.sample(jax.random.PRNGKey(11), jnp.asarray(x)[None], eps, n, sampler=norm, domain=(0.0, 1.0))[0]
    return float(jnp.min(attacks.margin(net(s), jnp.full(n, y))))


@pytest.mark.slow
@pytest.mark.parametrize("split,norm,radii", [("neurons", "l2", (0.2, 0.4)), ("neurons", "l1", (0.3, 0.6)),
                                              ("inputs", "l2", (0.3,))])
def test_complete_verdicts_over_balls_agree_with_dense_sampling(split, norm, radii):
    from .test_verify import SMALL
    from .test_verify import mlp as random_mlp
    net = random_mlp(4, (3, 4, 4, 3), scale=2.0)
    xs = np.asarray(jax.random.uniform(jax.random.PRNGKey(7), (5, 3)))
    ys = np.asarray(net(jnp.asarray(xs))).argmax(-1)
    decided = total = 0
    for eps in radii:
        r = verify(net, xs, ys, eps, SMALL._replace(attack_steps=0, split=split), norm=norm)
        for i in range(len(xs)):
            total += 1
            decided += r.status[i] != UNKNOWN
            if r.status[i] == VIOLATED:
                cx = r.counterexample[i]
                assert float(row_norm(jnp.asarray(cx - xs[i])[None], norm)[0]) <= eps
                assert np.all((cx >= 0) & (cx <= 1))
                assert int(np.asarray(net(jnp.asarray(cx[None]))).argmax()) != ys[i]
            elif r.status[i] == ROBUST:
                assert sampled_min_margins(net, xs[i], ys[i], eps, norm) > 0, (norm, eps, i)
    assert decided >= 0.8 * total, (decided, total)


@pytest.mark.slow
def test_complete_critical_eps_in_l2_narrows_the_crown_bracket(mlp):
    net, x, y = mlp
    x, y = x[:1], y[:1]
    cfg = SearchConfig(eps_max=4.0, tol=0.05)
    crown_r = search(net, make_oracle(net, "crown", norm="l2", targets=2), x, y, cfg)
    full = search(net, make_oracle(net, "complete", norm="l2", targets=2, timeout=2.0), x, y, cfg)
    assert np.all(full.eps_lower > crown_r.eps_lower)
    assert np.all(full.eps_lower <= full.eps_upper)
    np.testing.assert_allclose(distance(full.counterexample, x, "l2"), full.eps_upper, rtol=1e-6)
