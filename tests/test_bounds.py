"""Soundness and tightness of `jaxrobust.kernels` bound propagation (IBP, CROWN, alpha-CROWN)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jax import lax

from jaxrobust import zoo
from jaxrobust.errors import InputError, UnsupportedOpError
from jaxrobust.kernels import (
    _graph,
    _walk,
    bounds,
    crown,
    ibp,
    margin_bounds,
    robustness_spec,
    spec_interval,
)

ACTS = {
    "relu": jax.nn.relu,
    "leaky": lambda x: jax.nn.leaky_relu(x, 0.1),
    "leaky_max": lambda x: jnp.maximum(x, 0.2 * x),
    "sigmoid": jax.nn.sigmoid,
    "tanh": jnp.tanh,
}


def _dense(key, n_in, n_out):
    k1, k2 = jax.random.split(key)
    return (jax.random.normal(k1, (n_in, n_out)) / np.sqrt(n_in), 0.1 * jax.random.normal(k2, (n_out,)))


def make_mlp(seed, act):
    """Dense -> act -> residual dense block -> act -> dense; input (5,), 3 outputs."""
    ks = jax.random.split(jax.random.PRNGKey(seed), 4)
    (w1, b1), (w2, b2), (w3, b3) = _dense(ks[0], 5, 8), _dense(ks[1], 8, 8), _dense(ks[2], 8, 3)
    f = ACTS[act]

    def fn(x):
        h = f(x @ w1 + b1)
        h = f(h + h @ w2 + b2)
        return h @ w3 + b3

    return fn, (5,)


def make_cnn(seed, act, pool):
    """Conv -> act -> pool -> strided conv -> relu -> transpose/flatten -> dense; NHWC (6, 6, 2) input."""
    ks = jax.random.split(jax.random.PRNGKey(seed), 3)
    c1 = jax.random.normal(ks[0], (3, 3, 2, 3)) / 4
    c2 = jax.random.normal(ks[1], (3, 3, 3, 4)) / 5
    dn = ("NHWC", "HWIO", "NHWC")
    f = ACTS[act]
    n_flat = 36
    wd, bd = _dense(ks[2], n_flat, 3)

    def fn(x):
        h = f(lax.conv_general_dilated(x, c1, (1, 1), "SAME", dimension_numbers=dn) + 0.05)
        if pool == "max":
            h = lax.reduce_window(h, -jnp.inf, lax.max, (1, 2, 2, 1), (1, 1, 1, 1), "VALID")
        else:
            h = lax.reduce_window(h, 0.0, lax.add, (1, 2, 2, 1), (1, 2, 2, 1), "VALID") / 4.0
        h = jax.nn.relu(lax.conv_general_dilated(h, c2, (2, 2) if pool == "max" else (1, 1), "SAME",
                                                 dimension_numbers=dn))
        h = jnp.transpose(h, (0, 3, 1, 2)).reshape(x.shape[0], -1)
        return h @ wd + bd

    return fn, (6, 6, 2)


def boxes(seed, in_shape, n=2, eps=0.15):
    x = jax.random.uniform(jax.random.PRNGKey(seed + 1000), (n,) + in_shape, minval=-1, maxval=1)
    return x - eps, x + eps


def extreme_points(fn, lo, hi, key, n_random=100_000, pgd_steps=20):
    """Outputs ``(P, B, C)`` at random points, corners and gradient-ascent points of each box.

    The gradient ascent runs one sign-gradient search per output coordinate and direction.
    """
    B, C = lo.shape[0], fn(lo).shape[-1]
    u = jax.random.uniform(key, (n_random,) + lo.shape)
    corners = jax.random.bernoulli(jax.random.fold_in(key, 1), 0.5, (64,) + lo.shape)
    direction = jnp.concatenate([jnp.eye(C), -jnp.eye(C)])            # (2C, C)

    @jax.jit
    def ascend(z):
        objective = lambda z: jnp.sum(jax.vmap(fn)(z) * direction[:, None, :])
        step = lambda _, z: jnp.clip(z + 0.1 * (hi - lo) * jnp.sign(jax.grad(objective)(z)), lo, hi)
        return lax.fori_loop(0, pgd_steps, step, z)

    z0 = lo + jax.random.uniform(jax.random.fold_in(key, 2), (2 * C,) + lo.shape) * (hi - lo)
    pts = jnp.concatenate([lo + u * (hi - lo), lo[None], hi[None], jnp.where(corners, hi, lo), ascend(z0)])
    return jax.jit(jax.vmap(fn))(pts).reshape(len(pts), B, -1)


def assert_inside(y, b):
    lower, upper = b.lower.reshape(b.lower.shape[0], -1), b.upper.reshape(b.upper.shape[0], -1)
    assert bool(jnp.all(y >= lower[None])), float(jnp.max(lower[None] - y))
    assert bool(jnp.all(y <= upper[None])), float(jnp.max(y - upper[None]))


def random_spec(seed, B, K, C):
    return jax.random.normal(jax.random.PRNGKey(seed + 7), (B, K, C))


NETS = st.one_of(
    st.tuples(st.just("mlp"), st.integers(0, 10_000), st.sampled_from(sorted(ACTS)), st.just(None)),
    st.tuples(st.just("cnn"), st.integers(0, 10_000), st.sampled_from(sorted(ACTS)), st.sampled_from(["max", "avg"])),
)


def build(arch):
    kind, seed, act, pool = arch
    return make_mlp(seed, act) if kind == "mlp" else make_cnn(seed, act, pool)


@settings(max_examples=2, deadline=None)
@given(arch=NETS)
@pytest.mark.slow
def test_bounds_contain_sampled_and_attacked_outputs(arch):
    fn, in_shape = build(arch)
    lo, hi = boxes(arch[1], in_shape)
    y = extreme_points(fn, lo, hi, jax.random.PRNGKey(arch[1]))
    assert_inside(y, ibp(fn, lo, hi))
    assert_inside(y, crown(fn, lo, hi))
    spec = random_spec(arch[1], lo.shape[0], 4, y.shape[-1])
    ys = jnp.einsum("bkc,pbc->pbk", spec, y)
    assert_inside(ys, crown(fn, lo, hi, spec, intermediate="ibp"))
    assert_inside(ys, crown(fn, lo, hi, spec, alpha=True, alpha_steps=3))


@settings(max_examples=2, deadline=None)
@given(seed=st.integers(0, 10_000), kind=st.sampled_from(["mlp", "cnn"]))
@pytest.mark.slow
def test_crown_never_looser_than_ibp_and_alpha_never_looser_than_crown(seed, kind):
    fn, in_shape = build((kind, seed, "relu", "max"))
    lo, hi = boxes(seed, in_shape, eps=0.1)
    b_ibp = ibp(fn, lo, hi, sound_margin=False)
    b_crown = crown(fn, lo, hi, sound_margin=False)
    tol = 1e-5 * (1 + jnp.abs(b_ibp.lower).max())
    assert bool(jnp.all(b_crown.lower >= b_ibp.lower - tol)) and bool(jnp.all(b_crown.upper <= b_ibp.upper + tol))
    spec = random_spec(seed, lo.shape[0], 5, 3)
    s_ibp = spec_interval(spec, b_ibp.lower, b_ibp.upper)
    s_crown = crown(fn, lo, hi, spec, sound_margin=False)
    s_alpha = crown(fn, lo, hi, spec, alpha=True, alpha_steps=5, sound_margin=False)
    tol = 1e-5 * (1 + jnp.abs(s_ibp.lower).max())
    assert bool(jnp.all(s_crown.lower >= s_ibp.lower - tol)) and bool(jnp.all(s_crown.upper <= s_ibp.upper + tol))
    assert bool(jnp.all(s_alpha.lower >= s_crown.lower - tol)) and bool(jnp.all(s_alpha.upper <= s_crown.upper + tol))


def make_stacking(seed, act):
    """Two branches of the input combined by stack (with a constant operand), concatenate, tile,
    split and unstack -> act -> dense; input (5,), 3 outputs."""
    ks = jax.random.split(jax.random.PRNGKey(seed), 4)
    (w1, b1), (w2, b2), (w3, b3) = _dense(ks[0], 5, 8), _dense(ks[1], 5, 8), _dense(ks[2], 16, 3)
    const = jax.random.normal(ks[3], (8,))
    f = ACTS[act]

    def fn(x):
        h, g = f(x @ w1 + b1), jnp.tanh(x @ w2 + b2)
        s = jnp.stack([h, g - h, jnp.broadcast_to(const, h.shape)], axis=-1)           # (B, 8, 3)
        c = jnp.concatenate([s.reshape(len(x), -1), jnp.tile(x, (1, 2)), h], axis=1)  # (B, 42)
        a, b = jnp.split(c, [26], axis=1)
        u = sum(jnp.unstack(a[:, :24].reshape(len(x), 8, 3), axis=-1))               # (B, 8)
        return f(jnp.concatenate([u, b[:, 8:]], axis=1)) @ w3 + b3

    return fn, (5,)


@settings(max_examples=2, deadline=None)
@given(seed=st.integers(0, 10_000), act=st.sampled_from(sorted(ACTS)))
@pytest.mark.slow
def test_bounds_through_stack_concatenate_split_contain_samples(seed, act):
    fn, in_shape = make_stacking(seed, act)
    lo, hi = boxes(seed, in_shape)
    y = extreme_points(fn, lo, hi, jax.random.PRNGKey(seed), n_random=20_000, pgd_steps=10)
    assert_inside(y, ibp(fn, lo, hi))
    assert_inside(y, crown(fn, lo, hi))


def test_crown_exact_on_linear_network():
    k1, k2 = jax.random.split(jax.random.PRNGKey(3))
    (w1, b1), (w2, b2) = _dense(k1, 6, 7), _dense(k2, 7, 4)
    fn = lambda x: (x @ w1 + b1) @ w2 + b2
    lo, hi = boxes(3, (6,), n=3)
    a = w1 @ w2
    center = ((lo + hi) / 2) @ a + (b1 @ w2 + b2)
    radius = ((hi - lo) / 2) @ jnp.abs(a)
    raw = crown(fn, lo, hi, sound_margin=False)
    np.testing.assert_allclose(raw.lower, center - radius, atol=1e-5)
    np.testing.assert_allclose(raw.upper, center + radius, atol=1e-5)
    sound = crown(fn, lo, hi)
    assert bool(jnp.all(sound.lower <= center - radius)) and bool(jnp.all(sound.upper >= center + radius))


@pytest.mark.parametrize("arch", [("mlp", 1, "tanh", None), ("cnn", 2, "leaky", "max")])
def test_zero_width_box_collapses_to_forward_pass(arch):
    fn, in_shape = build(arch)
    x, _ = boxes(arch[1], in_shape, eps=0.0)
    y = fn(x)
    for b in (ibp(fn, x, x), crown(fn, x, x)):
        assert bool(jnp.all(b.lower <= y)) and bool(jnp.all(y <= b.upper))
        np.testing.assert_allclose(b.lower, y, atol=1e-4)
        np.testing.assert_allclose(b.upper, y, atol=1e-4)


def test_unsupported_primitive_is_named():
    fn = lambda x: jnp.sin(x) @ jnp.ones((3, 2))
    with pytest.raises(UnsupportedOpError, match="sin"):
        ibp(fn, jnp.zeros((1, 3)), jnp.ones((1, 3)))


def test_invalid_boxes_are_rejected():
    fn, in_shape = build(("mlp", 0, "relu", None))
    lo, hi = boxes(0, in_shape)
    for bad_lo, bad_hi in ((hi, lo), (lo.at[0, 0].set(jnp.nan), hi), (lo, hi.at[1, 2].set(jnp.inf))):
        for method in (ibp, crown):
            with pytest.raises(InputError, match="lo <= hi with finite entries"):
                method(fn, bad_lo, bad_hi)
    with pytest.raises(InputError, match="same shape"):
        ibp(fn, lo, hi[:1])
    assert bool(jnp.all(jax.jit(lambda a, b: ibp(fn, a, b).lower)(lo, hi) == ibp(fn, lo, hi).lower))


def test_robustness_spec_rows():
    spec = robustness_spec(jnp.array([0, 2]), 3)
    np.testing.assert_array_equal(spec[0], [[1, -1, 0], [1, 0, -1]])
    np.testing.assert_array_equal(spec[1], [[-1, 0, 1], [0, -1, 1]])


@pytest.mark.slow
def test_shared_network_bounds_contain_samples(shared):
    from jaxrobust.onnx_import import load_onnx
    net = load_onnx(shared("networks", "mnist", "vnncomp2021_mnistfc", "mnist-net_256x2.onnx"))
    mnist = np.load(shared("data", "mnist.npz"))
    x = jnp.asarray(mnist["x_test"][:3].reshape((3,) + net.input_shape) / 255.0, jnp.float32)
    eps = 0.02
    lo, hi = jnp.clip(x - eps, 0, 1), jnp.clip(x + eps, 0, 1)
    y = extreme_points(net, lo, hi, jax.random.PRNGKey(0), n_random=20_000, pgd_steps=10)
    b_ibp, b_crown = ibp(net, lo, hi), crown(net, lo, hi)
    assert_inside(y, b_ibp)
    assert_inside(y, b_crown)
    assert bool(jnp.all(b_crown.upper - b_crown.lower <= b_ibp.upper - b_ibp.lower + 1e-4))
    m = margin_bounds(net, x, eps, "crown", labels=jnp.asarray(mnist["y_test"][:3]))
    spec = robustness_spec(jnp.asarray(mnist["y_test"][:3]), net.num_classes)
    assert m.shape == (3, net.num_classes - 1)
    assert bool(jnp.all(m[None] <= jnp.einsum("bkc,pbc->pbk", spec, y)))


@pytest.mark.slow
def test_same_architecture_shares_one_compiled_program():
    a = zoo.arch("mlp", input_shape=(5,), num_classes=3, hidden=(7, 6))
    nets = [zoo.init(a, jax.random.PRNGKey(s)) for s in (0, 1)]
    progs = [bounds._program(n, (5,), jnp.float32) for n in nets]
    assert progs[0].crown is progs[1].crown and progs[0].ibp is progs[1].ibp
    lo, hi = boxes(4, (5,), eps=0.1)
    sizes = []
    for net in nets:
        ibp(net, lo, hi), crown(net, lo, hi, intermediate="ibp")
        sizes.append((progs[0].ibp._cache_size(), progs[0].crown._cache_size()))
    assert sizes[0] == sizes[1]
    b0, b1 = crown(nets[0], lo, hi), crown(nets[1], lo, hi)
    assert not np.allclose(b0.lower, b1.lower)
    for net, b in zip(nets, (b0, b1)):
        assert_inside(extreme_points(net, lo, hi, jax.random.PRNGKey(0), n_random=5_000, pgd_steps=5), b)
    bounds._compiled.cache_clear()
    fresh = crown(lambda x: nets[1](x), lo, hi)
    np.testing.assert_array_equal(b1.lower, fresh.lower)
    np.testing.assert_array_equal(b1.upper, fresh.upper)


@pytest.mark.slow
def test_unit_blocks_and_chunks_do_not_change_crown_bounds(monkeypatch):
    """Refining unstable units in coarse and fine blocks, over sorted chunks of examples, gives the
    bounds of refining every unit at once in one chunk."""
    net = zoo.init(zoo.arch("mlp", input_shape=(6,), num_classes=3, hidden=(24, 24, 24)), jax.random.PRNGKey(3))
    fn = lambda z: net(z)  # noqa: E731  (a plain function: compiled afresh for each setting)
    x = jax.random.uniform(jax.random.PRNGKey(4), (7, 6), minval=-1, maxval=1)
    eps = jnp.linspace(0.002, 0.1, 7)[:, None]  # from 1/8 to all units unstable
    prog = bounds._program(fn, (6,), jnp.float32)
    per_example = bounds._bytes_per_example(prog.graph, 6, prog.prefixes(), 0)

    def run(**config):
        for k, v in config.items():
            monkeypatch.setattr(bounds if k == "MEMORY_BUDGET" else _walk, k, v)
        bounds._compiled.cache_clear()
        bounds._CACHE.clear()
        return crown(fn, x - eps, x + eps)

    whole = run(BLOCKS=1, COARSE=1, MEMORY_BUDGET=2 ** 30)
    # blocks of 1 unit, coarse blocks of 5, chunks of 3 examples
    blocked = run(BLOCKS=24, BLOCK_FLOATS=1, COARSE=5, MEMORY_BUDGET=3 * per_example)
    np.testing.assert_allclose(blocked.lower, whole.lower, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(blocked.upper, whole.upper, rtol=1e-5, atol=1e-5)


def test_rows_of_one_unit_and_identity_prefixes_in_pieces_do_not_change_crown_bounds(monkeypatch):
    """CROWN rows of a var without a kink (a sigmoid's input) back-substituted one unit at a time, the
    identity prefixes built 5 rows at a time and the one left implicit (``max(|d|, 0.5)``: its input is
    the output of a non-monotone unit) give the bounds of all rows at once."""
    ks = jax.random.split(jax.random.PRNGKey(8), 3)
    (w1, b1), (w2, b2), (w3, b3) = _dense(ks[0], 6, 12), _dense(ks[1], 12, 12), _dense(ks[2], 12, 3)
    fn = lambda z: jnp.maximum(jnp.abs(jax.nn.sigmoid(z @ w1 + b1) @ w2 + b2), 0.5) @ w3 + b3  # noqa: E731
    x = jax.random.uniform(jax.random.PRNGKey(9), (3, 6), minval=-1, maxval=1)
    g = bounds._program(fn, (6,), jnp.float32).graph
    assert any(_walk._prefix_end(g, v) == g.producer_index(v) for v in _walk._bounded_vars(g))

    def run(**config):
        for k, v in config.items():
            monkeypatch.setattr(_walk, k, v)
        bounds._compiled.cache_clear()
        bounds._CACHE.clear()
        return crown(lambda z: fn(z), x - 0.3, x + 0.3)

    whole = run(BLOCKS=1, COARSE=1, PREFIX_ROWS=10 ** 6)
    pieces = run(BLOCKS=1, COARSE=1, BLOCK_MAX_FLOATS=1, PREFIX_ROWS=5)
    np.testing.assert_allclose(pieces.lower, whole.lower, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(pieces.upper, whole.upper, rtol=1e-5, atol=1e-5)
    y = np.asarray(fn(x))
    assert np.all(np.asarray(whole.lower) <= y) and np.all(y <= np.asarray(whole.upper))


def test_outputs_of_monotone_units_are_left_to_their_intervals():
    """Max-pooling and sigmoid / ReLU outputs get no CROWN rows (their intervals are exact given their
    inputs' bounds); a non-monotone unit's output (``|x|``) does."""
    fn, shape = make_cnn(0, "sigmoid", "max")
    g = bounds._program(fn, shape, jnp.float32).graph
    kinds = {v: n.kind for n in g.nodes for v in n.outs}
    assert {kinds[v] for v in g.images} == {"sshape", "maxpool", "pwl"}
    assert g.images & g.needs_bounds and not g.images & _walk._bounded_vars(g)
    w = jax.random.normal(jax.random.PRNGKey(0), (4, 4))
    g = bounds._program(lambda z: jax.nn.relu(jnp.abs(z @ w) - 1.0), (4,), jnp.float32).graph
    absolute, relu = (n.outs[0] for n in g.nodes if n.kind in ("abs", "pwl"))
    assert absolute not in g.images and relu in g.images


@pytest.mark.parametrize("act", ["relu", "sigmoid", "leaky"])
def test_crown_rows_of_monotone_outputs_would_not_tighten_the_bounds(monkeypatch, act):
    """Skipping the CROWN rows of max-pooling and monotone outputs (their kinks refined at every unit
    instead) loses nothing against bounding them by CROWN as well."""
    fn, shape = make_cnn(1, act, "max")
    lo, hi = boxes(2, shape, n=3)

    def run(images):
        if not images:
            monkeypatch.setattr(_graph, "_monotone_images", lambda nodes, consts: set())
        bounds._compiled.cache_clear()
        bounds._CACHE.clear()
        return crown(lambda z: fn(z), lo, hi, sound_margin=False)

    skipped, rows = run(True), run(False)
    assert np.all(np.asarray(skipped.lower) >= np.asarray(rows.lower) - 1e-5)
    assert np.all(np.asarray(skipped.upper) <= np.asarray(rows.upper) + 1e-5)


def test_crown_under_jit_with_a_traced_slope():
    """A leaky-ReLU slope traced by ``jax.jit`` cannot be shown >= 0 when the graph is built: its output
    keeps its CROWN rows, and the bounds are those of the concrete slope."""
    w = jax.random.normal(jax.random.PRNGKey(0), (4, 3))
    lo, hi = jnp.zeros((1, 4)), jnp.ones((1, 4))
    bound = lambda a: crown(lambda z: jax.nn.leaky_relu(z @ w, a) @ w.T, lo, hi).lower  # noqa: E731
    np.testing.assert_allclose(jax.jit(bound)(0.1), bound(0.1), rtol=1e-5, atol=1e-6)
