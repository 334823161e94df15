"""Branch and bound on the graph engine: every network family the bound propagation traces (ReLU, leaky ReLU,
sigmoid, tanh, max-pool, residual), sound subdomain bounds under random splits, verdicts against a dense grid,
neuron and input splitting."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrobust.kernels._walk import _forward
from jaxrobust.kernels.bab import Brancher, Splits, layout
from jaxrobust.kernels.bounds import _program
from jaxrobust.kernels.norms import row_norm
from jaxrobust.kernels.perturb import sample
from jaxrobust.network import from_function
from jaxrobust.oracles import ROBUST, UNKNOWN, VIOLATED
from jaxrobust.verify import VerifyConfig, robustness_specs, verify

CFG = VerifyConfig(timeout=10.0, batch=32, steps=5, root_steps=10, attack_steps=10, attack_targets=2)
ACTS = {"relu": jax.nn.relu, "leaky": lambda h: jnp.maximum(h, 0.1 * h), "sigmoid": jax.nn.sigmoid,
        "tanh": jnp.tanh}


def dense_net(act, n_in, widths=(12, 10), n_out=3, seed=0, residual=False, scale=2.0):
    """A random MLP ``n_in -> widths -> n_out``; ``residual``: the second hidden layer adds its input."""
    dims = (n_in,) + widths + (n_out,)
    keys = jax.random.split(jax.random.PRNGKey(seed), len(dims))
    params = [(scale * jax.random.normal(k, (a, b)) / np.sqrt(a), 0.3 * jax.random.normal(k, (b,)))
              for k, a, b in zip(keys, dims[:-1], dims[1:])]
    f = ACTS[act]

    def apply(p, x):
        h = f(x @ p[0][0] + p[0][1])
        for w, b in p[1:-1]:
            h = f(h @ w + b) + (h if residual and w.shape[0] == w.shape[1] else 0.0)
        return h @ p[-1][0] + p[-1][1]
    return from_function(apply, params, (n_in,), n_out, name=f"{act}{'-res' if residual else ''}")


def pool_net(seed=0):
    """conv 3x3 (2 channels) -> ReLU -> 2x2 max-pool -> dense, on 6x6x1 images."""
    k1, k2 = jax.random.split(jax.random.PRNGKey(seed))
    params = (jax.random.normal(k1, (3, 3, 1, 2)), jax.random.normal(k2, (2 * 2 * 2, 3)) / 2)

    def apply(p, x):
        h = jax.lax.conv_general_dilated(x, p[0], (1, 1), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC"))
        h = jax.lax.reduce_window(jax.nn.relu(h), -jnp.inf, jax.lax.max, (1, 2, 2, 1), (1, 2, 2, 1), "VALID")
        return h.reshape(len(x), -1) @ p[1]
    return from_function(apply, params, (6, 6, 1), 3, name="maxpool")


FAMILIES = {"relu": lambda n: dense_net("relu", n), "leaky": lambda n: dense_net("leaky", n, seed=1),
            "sigmoid": lambda n: dense_net("sigmoid", n, seed=2, scale=8.0),
            "tanh": lambda n: dense_net("tanh", n, seed=3, scale=4.0),
            "residual": lambda n: dense_net("relu", n, widths=(10, 10, 10), seed=4, residual=True)}


def var_values(net, x):
    """Value of every var of the bound graph at the points ``x: (N, *in)`` (zero-width interval propagation)."""
    prog = _program(net, net.input_shape, jnp.float32)
    one = lambda p: {v: iv.lo[0] for v, iv in _forward(prog.graph, prog.consts, p[None], p[None])[0].items()}
    return jax.jit(jax.vmap(one))(x)


@pytest.mark.parametrize("family", list(FAMILIES) + ["maxpool"])
@pytest.mark.slow
def test_subdomain_bounds_are_sound_under_random_splits(family):
    check_random_splits(family, "linf", 0.25)


@pytest.mark.parametrize("family,norm,eps", [("relu", "l2", 0.4), ("sigmoid", "l1", 0.6), ("maxpool", "l2", 0.8)])
@pytest.mark.slow
def test_subdomain_bounds_over_balls_are_sound_under_random_splits(family, norm, eps):
    check_random_splits(family, norm, eps)


def check_random_splits(family, norm, eps):
    """β-CROWN bounds of 24 randomly split subdomains of the ``norm`` ball of radius ``eps`` (L∞: the box) hold at
    the ball's sampled points inside each subdomain; the candidate points lie in the box (and the ball)."""
    net = pool_net() if family == "maxpool" else FAMILIES[family](5)
    shape = (1,) + net.input_shape
    key = jax.random.PRNGKey(1)
    x0 = jax.random.uniform(key, shape, minval=0.3, maxval=0.7)
    lo, hi = x0 - eps, x0 + eps
    ball = None if norm == "linf" else (x0, eps, norm)
    br = Brancher(net, net.input_shape)
    lay = layout(br.graph)
    assert lay.Hk + lay.Hi > 0
    root = br.root_bounds(lo, hi, ball=ball)
    D = 24
    anchors = sample(jax.random.PRNGKey(2), x0, eps, D, sampler=norm)[0]
    vals = var_values(net, anchors)
    sp = br.initial(root, D)
    s, ilo, ihi = sp.s.copy(), sp.ilo.copy(), sp.ihi.copy()
    rng = np.random.default_rng(0)
    for v, k, off, n in lay.kink:          # each subdomain keeps its anchor's side of ~40 % of the kinks
        z = np.asarray(vals[v]).reshape(D, -1) - np.asarray(br.consts[k]).reshape(-1)
        pick = rng.random((D, n)) < 0.4
        s[:, off:off + n] = np.where(pick, np.where(z >= 0, 1, -1), 0)
    for v, off, n in lay.interval:         # ... and a random interval around its anchor's value
        z = np.asarray(vals[v]).reshape(D, -1)
        w = (ihi[:, off:off + n] - ilo[:, off:off + n]) * rng.random((D, n)) * 0.5
        ilo[:, off:off + n] = np.maximum(ilo[:, off:off + n], z - w)
        ihi[:, off:off + n] = np.minimum(ihi[:, off:off + n], z + w)
    C, _ = robustness_specs(0, net.num_classes)
    c = C[np.arange(D) % len(C)]
    r = br.bound(root, lo, hi, jnp.asarray(c), Splits(*(jnp.asarray(a) for a in (s, ilo, ihi))), steps=10,
                 ball=ball)
    pts = sample(jax.random.PRNGKey(3), x0, eps, 20_000, sampler=norm)[0]
    pv = var_values(net, pts)
    out = np.asarray(net(pts), np.float64)
    checked = 0
    for d in range(D):
        inside = np.ones(len(pts), bool)
        for v, k, off, n in lay.kink:
            z = np.asarray(pv[v]).reshape(len(pts), -1) - np.asarray(br.consts[k]).reshape(-1)
            inside &= np.all((s[d, off:off + n] == 0) | (s[d, off:off + n] * z >= 0), axis=1)
        for v, off, n in lay.interval:
            z = np.asarray(pv[v]).reshape(len(pts), -1)
            inside &= np.all((z >= ilo[d, off:off + n]) & (z <= ihi[d, off:off + n]), axis=1)
        got = out[inside] @ c[d]
        checked += len(got)
        assert np.all(got >= float(r.lower[d])), (family, d, got.min(), float(r.lower[d]))
        xs = np.asarray(r.x_star[d]).reshape(shape[1:])
        assert np.all((xs >= np.asarray(lo[0]) - 1e-7) & (xs <= np.asarray(hi[0]) + 1e-7))
        assert float(row_norm(jnp.asarray(xs - x0[0])[None], norm)[0]) <= eps * (1 + 1e-6)
    assert checked > 200


def grid_min_margin(net, x, y, eps, n=301):
    """Smallest margin ``logit_y - max other`` over an ``n x n`` grid of the box around a 2-D ``x``."""
    g = np.linspace(-eps, eps, n)
    pts = (x[None] + np.stack(np.meshgrid(g, g), -1).reshape(-1, 2)).astype(np.float32)
    out = np.asarray(net(pts))
    return float(np.min(out[:, y] - np.max(np.delete(out, y, axis=1), axis=1)))


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("split", ["neurons", "inputs"])
@pytest.mark.slow
def test_verdicts_agree_with_a_dense_grid(family, split):
    net = FAMILIES[family](2)
    net = net.replace(domain=(-10.0, 10.0))
    xs = np.asarray(jax.random.uniform(jax.random.PRNGKey(4), (4, 2), minval=-1, maxval=1), np.float32)
    ys = np.asarray(net(xs)).argmax(-1)
    # decisive: input splitting everywhere, neuron splitting on the ReLU-like MLPs; elsewhere (smooth units,
    # residual nets at wide radii) neuron splitting may time out, but must stay sound
    decisive = split == "inputs" or family in ("relu", "leaky")
    seen, decided, total = set(), 0, 0
    for eps in (0.1, 0.5, 2.5):
        r = verify(net, xs, ys, eps, CFG._replace(split=split))
        for i in range(len(xs)):
            truth = grid_min_margin(net, xs[i], int(ys[i]), eps)
            seen.add(int(r.status[i]))
            total += 1
            decided += r.status[i] != UNKNOWN
            if r.status[i] == VIOLATED:
                cx = r.counterexample[i]
                assert np.all(np.abs(cx - xs[i]) <= eps + 1e-6)
                assert int(np.asarray(net(cx[None])).argmax()) != ys[i]
            elif r.status[i] == ROBUST:
                assert truth > 0, (family, split, i, eps, truth)
            elif decisive and abs(truth) > 1e-2:
                pytest.fail(f"{family}/{split}: query {i} at eps {eps} undecided ({r.stage[i]}), grid margin {truth}")
    assert seen >= {ROBUST, VIOLATED}
    if decisive:
        assert decided >= total - 1


@pytest.mark.slow
def test_maxpool_network_gets_complete_verdicts():
    net = pool_net()
    x = np.asarray(jax.random.uniform(jax.random.PRNGKey(5), (6,) + net.input_shape, minval=0.2, maxval=0.8))
    y = np.asarray(net(x)).argmax(-1)
    for eps in (0.02, 0.1):
        r = verify(net, x, y, eps, CFG)
        assert np.mean(r.status != UNKNOWN) >= 5 / 6
        for i in np.flatnonzero(r.status == VIOLATED):
            assert int(np.asarray(net(r.counterexample[i][None])).argmax()) != y[i]
        # no point of a random sample contradicts a proof
        pts = np.clip(x[:, None] + np.random.default_rng(0).uniform(-eps, eps, (6, 4000) + net.input_shape), 0, 1)
        out = np.asarray(net(pts.reshape((-1,) + net.input_shape))).reshape(6, 4000, -1)
        wrong = (out.argmax(-1) != y[:, None]).any(1)
        assert not np.any(wrong & (r.status == ROBUST))


@pytest.mark.slow
def test_zoo_smooth_mlps_are_verified_by_the_graph_engine():
    """`zoo` MLPs with sigmoid / tanh hidden units (``--activation``) trace into interval branch units; ReLU
    MLPs keep the architecture dict (and content hash) they always had."""
    from jaxrobust import zoo
    from jaxrobust.errors import InputError
    assert "activation" not in zoo.arch("mlp", hidden=(8,))
    with pytest.raises(InputError, match="activation"):
        zoo.arch("mlp", hidden=(8,), activation="gelu")
    for act in ("sigmoid", "tanh"):
        a = zoo.arch("mlp", input_shape=(4,), num_classes=3, hidden=(6, 6), activation=act)
        net = zoo.init(a, jax.random.PRNGKey(0))
        assert zoo.describe(a) == f"mlp-6x2-{act}"
        lay = layout(Brancher(net, net.input_shape).graph)
        assert (lay.Hk, lay.Hi) == (0, 12)
        x = jnp.full((2, 4), 0.5)
        y = np.asarray(net(x)).argmax(-1)
        r = verify(net, x, y, 0.01, CFG._replace(split="neurons"))
        assert np.all(r.status == ROBUST)


def test_unsupported_onnx_node_is_named_before_any_work(tmp_path):
    """A softmax output layer (division by an input-dependent sum) is refused naming the ONNX node, when the
    complete oracle is made, before any attack runs."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from jaxrobust.errors import UnsupportedOpError
    from jaxrobust.onnx_import import load_onnx
    from jaxrobust.oracles import make_oracle
    w = numpy_helper.from_array(np.random.default_rng(0).normal(size=(4, 3)).astype(np.float32), "W")
    nodes = [helper.make_node("MatMul", ["x", "W"], ["h"], name="fc"),
             helper.make_node("Relu", ["h"], ["r"], name="act"),
             helper.make_node("Softmax", ["r"], ["y"], name="probs", axis=1)]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3])], [w])
    path = tmp_path / "softmax.onnx"
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)]), str(path))
    net = load_onnx(path)
    with pytest.raises(UnsupportedOpError, match="ONNX Softmax node 'probs'"):
        make_oracle(net, "complete")


def two_input_onnx(path):
    """An ONNX graph of two inputs, ``a: (1, 2)`` and ``b: (1, 1)``, concatenated into a ReLU MLP 3-10-3."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper
    rng = np.random.default_rng(3)
    inits = [numpy_helper.from_array(a.astype(np.float32), n) for n, a in
             (("W1", rng.normal(size=(10, 3)) * 1.5), ("b1", rng.normal(size=10) * 0.3),
              ("W2", rng.normal(size=(3, 10))), ("b2", rng.normal(size=3) * 0.1))]
    nodes = [helper.make_node("Concat", ["a", "b"], ["ab"], axis=1, name="join"),
             helper.make_node("Gemm", ["ab", "W1", "b1"], ["h"], transB=1),
             helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("Gemm", ["r", "W2", "b2"], ["y"], transB=1)]
    g = helper.make_graph(nodes, "two", [helper.make_tensor_value_info("a", TensorProto.FLOAT, [1, 2]),
                                         helper.make_tensor_value_info("b", TensorProto.FLOAT, [1, 1])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3])], inits)
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)]), str(path))


@pytest.mark.parametrize("split", ["inputs", "neurons"])
@pytest.mark.slow
def test_two_input_graph_verdicts_agree_with_a_dense_grid(tmp_path, split):
    """A VNN-LIB property over a two-input ONNX graph: the inputs are numbered in the graph's order (X_0, X_1
    from ``a``, X_2 from ``b``); outputs match onnxruntime and verdicts agree with a 41^3 grid."""
    import onnxruntime as ort

    from jaxrobust import vnnlib
    from jaxrobust.onnx_import import load_onnx
    from jaxrobust.verify import verify_property
    two_input_onnx(tmp_path / "two.onnx")
    net = load_onnx(tmp_path / "two.onnx", domain=(-5.0, 5.0))
    assert net.input_shape == (3,)
    sess = ort.InferenceSession(str(tmp_path / "two.onnx"))
    pts = np.random.default_rng(0).uniform(-1, 1, (20, 3)).astype(np.float32)
    ref = np.concatenate([sess.run(None, {"a": p[None, :2], "b": p[None, 2:]})[0] for p in pts])
    np.testing.assert_allclose(np.asarray(net(pts)), ref, atol=1e-5)
    x = np.array([-1.0, 0.5, 1.0], np.float32)
    y = int(np.asarray(net(x[None])).argmax())
    other = [j for j in range(3) if j != y]
    seen = set()
    for eps in (0.05, 0.3, 1.0):
        g = np.linspace(-eps, eps, 41)
        grid = (x + np.stack(np.meshgrid(g, g, g), -1).reshape(-1, 3)).astype(np.float32)
        out = np.asarray(net(grid))
        truth = np.min(out[:, y] - np.max(out[:, other], axis=1))
        text = "".join(f"(declare-const X_{i} Real)\n" for i in range(3)) + \
            "".join(f"(declare-const Y_{j} Real)\n" for j in range(3)) + \
            "".join(f"(assert (>= X_{i} {x[i] - eps:.6f}))\n(assert (<= X_{i} {x[i] + eps:.6f}))\n" for i in range(3)) + \
            "(assert (or " + " ".join(f"(and (>= Y_{j} Y_{y}))" for j in other) + "))\n"
        r = verify_property(net, vnnlib.parse(text), CFG._replace(split=split))
        seen.add(r.result)
        if r.result == "sat":
            assert np.all(np.abs(r.x - x) <= eps + 1e-5)
            assert np.asarray(net(r.x[None].astype(np.float32)))[0, y] <= np.max(np.asarray(net(r.x[None]))[0, other])
        else:
            assert r.result == "unsat" and truth > 0, (eps, r.result, truth)
    assert seen == {"sat", "unsat"}


@pytest.mark.parametrize("family,big", [("residual", 2.5), ("sigmoid", 0.55)])
@pytest.mark.slow
def test_resumed_pools_agree_with_a_dense_grid(family, big, monkeypatch):
    """Queries stopped by their subdomain budget keep their pools; queries over smaller boxes of the same inputs
    resume from them (a larger box starts afresh) and agree with a dense grid."""
    from jaxrobust import box_search
    from jaxrobust.subdomains import PendingStore
    net = FAMILIES[family](2).replace(domain=(-10.0, 10.0))
    xs = np.asarray(jax.random.uniform(jax.random.PRNGKey(4), (6, 2), minval=-1, maxval=1), np.float32)
    ys = np.asarray(net(xs)).argmax(-1)
    cfg = CFG._replace(split="neurons", attack_steps=0, timeout=60.0)
    resumed, real = [], box_search.resume_pool
    monkeypatch.setattr(box_search, "resume_pool", lambda p, *a: resumed.append(len(p.pool["t"])) or real(p, *a))
    store = PendingStore()
    first = verify(net, xs, ys, big, cfg._replace(max_domains=12), pending=store)
    kept = int(np.sum(first.stage == "domains"))
    assert kept and len(store._items) == kept
    verify(net, xs, ys, big * 1.1, cfg._replace(max_domains=12), pending=store)    # larger: not resumed
    assert not resumed
    r = verify(net, xs, ys, 0.5, cfg, pending=store)
    assert len(resumed) >= 1 and max(resumed) > 1
    for i in range(len(xs)):
        truth = grid_min_margin(net, xs[i], int(ys[i]), 0.5)
        if r.status[i] == VIOLATED:
            assert int(np.asarray(net(r.counterexample[i][None])).argmax()) != ys[i]
        elif r.status[i] == ROBUST:
            assert truth > 0, (family, i, truth)
        else:
            assert abs(truth) < 1e-2, (family, i, truth, r.stage[i])
