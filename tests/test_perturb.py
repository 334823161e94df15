import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.tree_util import Partial
from scipy import stats

from jaxrobust.errors import InputError
from jaxrobust.kernels import perturb
from jaxrobust.network import from_function

KEY = jax.random.key(0)
X = jnp.asarray(np.random.default_rng(0).uniform(0, 1, (3, 6)), jnp.float32).at[0, :2].set(jnp.array([0.0, 1.0]))
EPS = jnp.array([0.05, 0.3, 0.0], jnp.float32)
TOL = 1e-6


@pytest.mark.parametrize("rng", perturb.RNGS)
@pytest.mark.parametrize("sampler", ["linf", "l2", "gaussian"])
def test_samples_inside_ball_and_domain_and_chunk_invariant(sampler, rng):
    s = np.asarray(perturb.sample(KEY, X, EPS, 200, sampler=sampler, domain=(0.0, 1.0), rng=rng))
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
    chunked = perturb.map_samples(lambda v: v, KEY, X, EPS, 200, 64, sampler=sampler, domain=(0.0, 1.0), rng=rng)
    np.testing.assert_array_equal(np.asarray(chunked), s)


@pytest.mark.parametrize("rng", perturb.RNGS)
@pytest.mark.parametrize("sampler", ["linf", "l2", "gaussian"])
def test_shaped_inputs_drawn_as_flat_vectors_bit_exact(sampler, rng):
    """map_samples draws elementwise samples on flattened inputs (and domain arrays): same values as per shape."""
    x = jnp.asarray(np.random.default_rng(4).uniform(0, 1, (2, 3, 4, 2)), jnp.float32)
    for domain in ((0.0, 1.0), (np.zeros((3, 4, 2)), np.linspace(0.3, 1.0, 24).reshape(3, 4, 2))):
        ref = perturb.sample(KEY, x, 0.2, 20, sampler=sampler, domain=domain, rng=rng)
        got = perturb.map_samples(lambda s: s, KEY, x, 0.2, 20, 8, sampler=sampler, domain=domain, rng=rng)
        assert got.shape == (2, 20, 3, 4, 2)
        np.testing.assert_array_equal(np.asarray(got), np.asarray(ref))


def test_custom_sampler_of_another_shape():
    """A sampler function may return samples of any shape; fn receives them as drawn."""
    def pair(key, x, eps, domain):
        return jnp.stack([x, x + eps * jax.random.uniform(key, x.shape)])

    out = perturb.map_samples(lambda s: s.sum((2, 3)), KEY, X, EPS, 10, 4, sampler=pair)
    assert out.shape == (3, 10)
    np.testing.assert_allclose(np.asarray(out)[2], 2 * np.asarray(X)[2].sum(), rtol=1e-6)  # eps = 0


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


def test_linf_is_the_clipped_affine_map_bit_for_bit():
    """Sample i of input b is clip(lo + u·(hi − lo), lo, hi) with u from fold_in(fold_in(key, b), i), also
    for inputs outside the domain (empty box: every sample is hi)."""
    x = jnp.asarray(np.random.default_rng(2).uniform(-0.5, 1.5, (4, 50)), jnp.float32)
    eps = jnp.array([0.02, 0.3, 0.0, 5.0], jnp.float32)

    @jax.jit
    def ref(x, eps):
        lo, hi = jnp.maximum(x - eps[:, None], 0.0), jnp.minimum(x + eps[:, None], 1.0)
        keys = jax.vmap(lambda b: jax.vmap(lambda i: jax.random.fold_in(jax.random.fold_in(KEY, b), i))(jnp.arange(64)))(
            jnp.arange(4))
        u = jax.vmap(jax.vmap(lambda k: perturb.random_uniform(k, (50,))))(keys)
        return jnp.clip(lo[:, None] + u * (hi - lo)[:, None], lo[:, None], hi[:, None])

    s = np.asarray(perturb.sample(KEY, x, eps, 64, domain=(0.0, 1.0)))
    np.testing.assert_array_equal(s.view(np.uint32), np.asarray(ref(x, eps)).view(np.uint32))
    empty = np.asarray(x) - np.asarray(eps)[:, None] > 1
    assert empty.any() and np.all(s.transpose(1, 0, 2)[:, empty] == 1.0)


def test_l2_radius_distribution():
    eps, d = 0.7, 20
    s = np.asarray(perturb.sample(KEY, jnp.zeros((1, d)), eps, 3000, sampler="l2"))[0].astype(np.float64)
    r = np.linalg.norm(s, axis=1)
    assert r.max() <= eps * (1 + 1e-6)
    # uniform in the ball <=> (r / eps)^d ~ U(0, 1); directions isotropic
    assert stats.kstest((r / eps) ** d, "uniform").pvalue > 1e-3
    assert np.abs((s / r[:, None]).mean(axis=0)).max() < 4 / np.sqrt(3000)


def test_reductions_match_per_sample_outputs():
    def fn(s):
        return {"v": s.sum(-1), "hit": s[..., 0] > 0.5}

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
    # each compiled stage holds one chunk: its memory does not depend on n (all samples would need 24 MB)
    fn, sampler, eps, b_idx = Partial(lambda s: s.sum(-1)), perturb._sampler_fn("linf"), jnp.full((2,), 0.4), jnp.arange(2)
    s = perturb._draw_chunk(sampler, KEY, x, eps, None, b_idx, 0, chunk, jnp.zeros((2, chunk, 3)))
    state = perturb._init_state(fn, jax.ShapeDtypeStruct(s.shape, s.dtype), (3,), 1_000_000, "max")
    for stage in (perturb._draw_chunk.lower(sampler, KEY, x, eps, None, b_idx, 0, chunk, s),
                  perturb._evaluate_chunk.lower(fn, s, state, 0, 1_000_000, (3,), "max")):
        m = stage.compile().memory_analysis()
        assert m.temp_size_in_bytes + m.argument_size_in_bytes + m.output_size_in_bytes < 2 * 1_000_000 * 3 * 4 / 20


def test_stages_compiled_once_per_shape():
    """Bound data (a `Partial`'s arguments, the samples' range) does not recompile the stages."""
    def fn(w, s):
        return s @ w

    for n, w in ((100, jnp.ones(6)), (333, jnp.arange(6.0))):
        out = perturb.map_samples(Partial(fn, w), KEY, X, 0.1, n, 32, reduce="sum")
        ref = perturb.sample(KEY, X, 0.1, n) @ w
        np.testing.assert_allclose(np.asarray(out), np.asarray(ref).sum(1), rtol=1e-5)
    sizes = perturb._draw_chunk._cache_size(), perturb._evaluate_chunk._cache_size()
    perturb.map_samples(Partial(fn, -w), KEY, X + 0.01, 0.2, 50, 32, reduce="sum", offset=5)
    assert (perturb._draw_chunk._cache_size(), perturb._evaluate_chunk._cache_size()) == sizes


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
    with pytest.raises(InputError, match="rng"):
        perturb.sample(KEY, X, 0.1, 4, rng="mt19937")
    with pytest.raises(InputError, match="reduce"):
        perturb.map_samples(lambda s: s, KEY, X, 0.1, 4, 2, reduce="median")
    with pytest.raises(InputError, match="chunk"):
        perturb.map_samples(lambda s: s, KEY, X, 0.1, 4, 0)
    net = from_function(lambda p, x: x @ p, jnp.ones((5, 2)), (5,), 2)
    with pytest.raises(InputError, match="shape"):
        perturb.map_samples(net, KEY, X, 0.1, 4, 2)


# --- statistical quality of the default counter-based hash generator --------------------------------
def _hash_samples(n=4000, b=3, d=16):
    """Uniform [0, 1) draws ``(b, n, d)``: the linf sampler around 0.5 with radius 0.5."""
    s = perturb.sample(KEY, jnp.full((b, d), 0.5), 0.5, n, offset=7)
    return np.asarray(s, np.float64)


def test_hash_uniform_per_coordinate_and_pooled():
    u = _hash_samples()
    assert u.min() >= 0.0 and u.max() < 1.0
    p = [stats.kstest(u[b, :, j], "uniform").pvalue for b in range(u.shape[0]) for j in range(u.shape[2])]
    assert min(p) > 1e-4  # 48 tests: family-wise false alarm ~0.5%
    assert stats.kstest(u.ravel(), "uniform").pvalue > 1e-3
    # 23-bit resolution: 192,000 draws collide ~1.1% of the time by chance, not more
    assert len(np.unique(u)) > 0.98 * u.size


def test_hash_independence_between_coordinates_samples_and_inputs():
    u = _hash_samples() - 0.5
    b, n, d = u.shape
    tol = 5 / np.sqrt(n)  # |corr| of independent uniforms ~ N(0, 1/n)
    for i in range(b):
        c = np.corrcoef(u[i].T)  # coordinates within a sample
        assert np.abs(c[~np.eye(d, dtype=bool)]).max() < tol
        lag = [np.corrcoef(u[i, :-k].ravel(), u[i, k:].ravel())[0, 1] for k in (1, 2, 64)]  # neighbouring samples
        assert np.abs(lag).max() < tol
    across = [np.corrcoef(u[i].ravel(), u[j].ravel())[0, 1] for i in range(b) for j in range(i + 1, b)]  # inputs
    assert np.abs(across).max() < tol
    # neighbouring coordinates of one sample are not in lockstep (pairs fill the unit square)
    h, _, _ = np.histogram2d(u[0, :, 0], u[0, :, 1], bins=8)
    assert stats.chisquare(h.ravel()).pvalue > 1e-4


def test_hash_normal_for_gaussian_and_l2_samplers():
    z = np.asarray(perturb.sample(KEY, jnp.zeros((2, 8)), 1.0, 3000, sampler="gaussian", rng="hash"), np.float64)
    assert np.all(np.isfinite(z)) and np.abs(z).max() < 5.5
    assert stats.kstest(z.ravel(), "norm").pvalue > 1e-3
    s = np.asarray(perturb.sample(KEY, jnp.zeros((1, 20)), 0.7, 3000, sampler="l2", rng="hash"))[0]
    assert stats.kstest((np.linalg.norm(s.astype(np.float64), axis=1) / 0.7) ** 20, "uniform").pvalue > 1e-3


@pytest.mark.slow
def test_chunk_and_batch_invariance_bit_exact_both_rngs():
    x = jnp.asarray(np.random.default_rng(3).uniform(0, 1, (5, 7)), jnp.float32)
    ids = jnp.array([4, 11, 0, 2, 9])
    for rng in perturb.RNGS:
        ref = np.asarray(perturb.map_samples(lambda s: s, KEY, x, 0.1, 37, 37, offset=ids, rng=rng))
        for chunk in (1, 5, 16):
            np.testing.assert_array_equal(
                np.asarray(perturb.map_samples(lambda s: s, KEY, x, 0.1, 37, chunk, offset=ids, rng=rng)), ref)
        # any sub-batch, in any order, with the same global ids reproduces the rows
        sub = perturb.map_samples(lambda s: s, KEY, x[np.array([3, 1])], 0.1, 37, 8, offset=ids[np.array([3, 1])], rng=rng)
        np.testing.assert_array_equal(np.asarray(sub), ref[[3, 1]])
    assert not np.array_equal(ref, np.asarray(perturb.map_samples(lambda s: s, KEY, x, 0.1, 37, 37, offset=ids)))
