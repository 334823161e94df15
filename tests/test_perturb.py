import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from jaxrobust.errors import InputError
from jaxrobust.kernels import perturb
from jaxrobust.network import from_function

KEY = jax.random.key(0)
X = jnp.asarray(np.random.default_rng(0).uniform(0, 1, (3, 6)), jnp.float32).at[0, :2].set(jnp.array([0.0, 1.0]))
EPS = jnp.array([0.05, 0.3, 0.0], jnp.float32)
TOL = 1e-6


@pytest.mark.parametrize("sampler", ["linf", "l2", "gaussian"])
def test_samples_inside_ball_and_domain_and_chunk_invariant(sampler):
    s = np.asarray(perturb.sample(KEY, X, EPS, 200, sampler=sampler, domain=(0.0, 1.0)))
    assert s.shape == (3, 200, 6)
    assert s.min() >= 0.0 and s.max() <= 1.0
    d = s - np.asarray(X)[:, None]
    if sampler == "linf":
        assert np.all(np.abs(d).max(axis=(1, 2)) <= np.asarray(EPS) + TOL)
    if sampler == "l2":
        assert np.all(np.linalg.norm(d, axis=2).max(axis=1) <= np.asarray(EPS) + TOL)
    assert np.all(d[2] == 0)  # eps = 0 leaves the input unchanged
    assert len(np.unique(s[1])) > 500  # actually random
    # chunks of 64 (200 = 3 * 64 + 8) reproduce the one-shot samples bit for bit
    chunked = perturb.map_samples(lambda v: v, KEY, X, EPS, 200, 64, sampler=sampler, domain=(0.0, 1.0))
    np.testing.assert_array_equal(np.asarray(chunked), s)


def test_sub_batch_with_offset_and_start_bit_exact():
    full = np.asarray(perturb.sample(KEY, X, EPS, 200, domain=(0.0, 1.0)))
    sub = perturb.sample(KEY, X[1:], EPS[1:], 100, domain=(0.0, 1.0), offset=1, start=100)
    np.testing.assert_array_equal(np.asarray(sub), full[1:, 100:])
    assert not np.array_equal(full, np.asarray(perturb.sample(jax.random.key(1), X, EPS, 200, domain=(0.0, 1.0))))


def test_linf_uniform_on_clipped_box():
    x = jnp.array([[0.02, 0.5]], jnp.float32)
    s = np.asarray(perturb.sample(KEY, x, 0.1, 4000, domain=(0.0, 1.0)))[0]
    assert stats.kstest(s[:, 0], stats.uniform(0.0, 0.12).cdf).pvalue > 1e-3
    assert stats.kstest(s[:, 1], stats.uniform(0.4, 0.2).cdf).pvalue > 1e-3


def test_l2_radius_distribution():
    eps, d = 0.7, 20
    s = np.asarray(perturb.sample(KEY, jnp.zeros((1, d)), eps, 3000, sampler="l2"))[0].astype(np.float64)
    r = np.linalg.norm(s, axis=1)
    assert r.max() <= eps * (1 + 1e-6)
    # uniform in the ball <=> (r / eps)^d ~ U(0, 1); directions isotropic
    assert stats.kstest((r / eps) ** d, "uniform").pvalue > 1e-3
    assert np.abs((s / r[:, None]).mean(axis=0)).max() < 4 / np.sqrt(3000)


def test_reductions_match_per_sample_outputs():
    fn = lambda s: {"v": s.sum(-1), "hit": s[..., 0] > 0.5}  # noqa: E731
    per = perturb.map_samples(fn, KEY, X, 0.2, 11, 4, domain=(0, 1))
    assert per["v"].shape == (3, 11) and per["hit"].dtype == jnp.bool_
    v, hit = np.asarray(per["v"]), np.asarray(per["hit"])
    out = perturb.map_samples(fn, KEY, X, 0.2, 11, 4, domain=(0, 1), reduce="max")  # 11 = 4 + 4 + 3
    np.testing.assert_array_equal(np.asarray(out["v"]), v.max(1))
    np.testing.assert_array_equal(np.asarray(out["hit"]), hit.max(1))


def test_chunked_driver_memory_bounded_1e5():
    W = jnp.array([[1.0, -1.0], [0.5, 0.2], [0.0, 1.0]], jnp.float32)
    net = from_function(lambda p, x: x @ p, W, (3,), 2)
    x = jnp.array([[0.5, 0.5, 0.5], [0.9, 0.1, 0.2]], jnp.float32)
    n, chunk = 100_000, 2_000
    frac = perturb.map_samples(lambda s: net(s.reshape(-1, 3)).argmax(-1).reshape(2, -1) == 1,
                               KEY, x, 0.4, n, chunk, domain=net.domain, reduce="mean")
    # class 1 wins iff 0.3*x1 - x0 + x2 > 0, estimated in closed form by Monte Carlo with numpy
    u = np.random.default_rng(1).uniform(size=(200_000, 3))
    ref = []
    for xb in np.asarray(x):
        lo, hi = np.maximum(xb - 0.4, 0), np.minimum(xb + 0.4, 1)
        s = lo + u * (hi - lo)
        ref.append(np.mean(s @ np.asarray(W)[:, 1] > s @ np.asarray(W)[:, 0]))
    np.testing.assert_allclose(np.asarray(frac), ref, atol=0.01)
    logits = perturb.map_samples(net, KEY, x, 0.4, 1000, 128)  # a Network yields per-sample logits
    assert logits.shape == (2, 1000, 2)
    # the compiled program never holds all samples: its scratch memory does not grow with n
    def temp_bytes(n):
        lowered = perturb._map_samples.lower(lambda s: s.sum(-1), perturb.uniform_linf, KEY, x,
                                             jnp.full((2,), 0.4), None, 0, n, chunk, "max")
        return lowered.compile().memory_analysis().temp_size_in_bytes

    assert temp_bytes(1_000_000) < 2 * 1_000_000 * 3 * 4 / 20  # all samples would need 24 MB


def test_input_errors():
    with pytest.raises(InputError, match=">= 0"):
        perturb.sample(KEY, X, -0.1, 4)
    with pytest.raises(InputError, match="finite"):
        perturb.sample(KEY, X, jnp.array([0.1, jnp.nan, 0.1]), 4)
    with pytest.raises(InputError, match="shape"):
        perturb.sample(KEY, X, jnp.ones(2), 4)
    with pytest.raises(InputError, match="NaN"):
        perturb.sample(KEY, X.at[1, 1].set(jnp.nan), 0.1, 4)
    with pytest.raises(InputError, match="sampler"):
        perturb.sample(KEY, X, 0.1, 4, sampler="l3")
    with pytest.raises(InputError, match="reduce"):
        perturb.map_samples(lambda s: s, KEY, X, 0.1, 4, 2, reduce="median")
    with pytest.raises(InputError, match="chunk"):
        perturb.map_samples(lambda s: s, KEY, X, 0.1, 4, 0)
    net = from_function(lambda p, x: x @ p, jnp.ones((5, 2)), (5,), 2)
    with pytest.raises(InputError, match="shape"):
        perturb.map_samples(net, KEY, X, 0.1, 4, 2)
