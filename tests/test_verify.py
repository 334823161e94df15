"""Complete verification of ReLU networks: dense ReLU chains (the MILP's form), branch and bound against exhaustive
enumeration and the MILP, budgets, VNN-LIB."""
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.optimize import linprog

from jaxrobust import vnnlib
from jaxrobust.errors import InputError, UnsupportedOpError
from jaxrobust.kernels.relu_chain import forward, pre_activations, relu_chain
from jaxrobust.network import from_function
from jaxrobust.oracles import ROBUST, UNKNOWN, VIOLATED, make_oracle
from jaxrobust.verify import VerifyConfig, robustness_specs, verify, verify_property

SMALL = VerifyConfig(timeout=30.0, batch=16, steps=5, root_steps=10, attack_steps=10, attack_targets=2,
                     split="neurons")


def mlp(seed, widths, scale=1.0):
    """A random ReLU MLP ``widths[0] -> ... -> widths[-1]`` on the domain [0, 1]."""
    keys = jax.random.split(jax.random.PRNGKey(seed), len(widths) - 1)
    params = [(scale * jax.random.normal(k, (a, b)) / np.sqrt(a), 0.3 * jax.random.normal(k, (b,)))
              for k, a, b in zip(keys, widths[:-1], widths[1:])]

    def apply(p, x):
        h = x.reshape(len(x), -1)
        for i, (w, b) in enumerate(p):
            h = h @ w + b
            if i < len(p) - 1:
                h = jax.nn.relu(h)
        return h
    return from_function(apply, params, (widths[0],), widths[-1], name=f"mlp{seed}")


def exhaustive_min_margins(net, x, y, eps):
    """Exact ``min_x logit_y - logit_j`` per ``j != y`` over the box, by one LP per activation pattern."""
    ch = relu_chain(net, net.input_shape)
    lo, hi = np.clip(x - eps, 0, 1).astype(np.float64), np.clip(x + eps, 0, 1).astype(np.float64)
    ws = [np.asarray(w, np.float64) for w in ch.weights]
    bs = [np.asarray(b, np.float64) for b in ch.biases]
    hidden = sum(w.shape[0] for w in ws[:-1])
    C, _ = robustness_specs(y, net.num_classes)
    best = np.full(len(C), np.inf)
    for pattern in itertools.product([0, 1], repeat=hidden):
        A, a0, rows, rhs, k = np.eye(len(lo)), np.zeros(len(lo)), [], [], 0
        for w, b in zip(ws[:-1], bs[:-1]):
            A, a0 = w @ A, w @ a0 + b
            on = np.array(pattern[k:k + len(b)], bool)
            k += len(b)
            sign = np.where(on, -1.0, 1.0)          # on: z >= 0, off: z <= 0
            rows.append(sign[:, None] * A)
            rhs.append(-sign * a0)
            A, a0 = A * on[:, None], a0 * on
        A, a0 = ws[-1] @ A, ws[-1] @ a0 + bs[-1]
        for t, c in enumerate(C.astype(np.float64)):
            r = linprog(c @ A, A_ub=np.concatenate(rows), b_ub=np.concatenate(rhs),
                        bounds=np.stack([lo, hi], 1), method="highs")
            if r.status == 0:
                best[t] = min(best[t], r.fun + c @ a0)
    return best


@pytest.fixture(scope="module")
def tiny():
    return mlp(4, (3, 4, 4, 3), scale=2.0)


@pytest.fixture(scope="module")
def medium():
    return mlp(5, (8, 16, 12, 4))


@pytest.mark.slow
def test_chain_matches_network_and_rejects_other_architectures():
    net = mlp(0, (6, 7, 5, 4))
    ch = relu_chain(net, net.input_shape)
    assert ch.widths == (6, 7, 5, 4)
    x = jax.random.uniform(jax.random.PRNGKey(1), (9, 6))
    np.testing.assert_allclose(forward(ch, x), net(x), atol=1e-5)
    assert [z.shape for z in pre_activations(ch, x)] == [(9, 7), (9, 5)]

    def conv(p, x):
        h = jax.lax.conv_general_dilated(x, p[0], (1, 1), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return jax.nn.relu(h).reshape(len(x), -1) @ p[1]
    k = jax.random.PRNGKey(2)
    cnn = from_function(conv, (jax.random.normal(k, (3, 3, 1, 2)), jax.random.normal(k, (2 * 4 * 4, 3))),
                        (6, 6, 1), 3)
    xc = jax.random.uniform(k, (4, 6, 6, 1))
    np.testing.assert_allclose(forward(relu_chain(cnn, cnn.input_shape), xc.reshape(4, -1)), cnn(xc), atol=1e-5)

    skip = from_function(lambda p, x: jax.nn.relu(x @ p) @ p.T + x, jnp.eye(3), (3,), 3)
    with pytest.raises(UnsupportedOpError, match="previous layer"):
        relu_chain(skip, (3,))
    smooth = from_function(lambda p, x: jnp.tanh(x @ p), jnp.eye(3), (3,), 3)
    with pytest.raises(UnsupportedOpError, match="tanh"):
        relu_chain(smooth, (3,))


@pytest.mark.slow
def test_verdicts_agree_with_exhaustive_enumeration(tiny):
    xs = jax.random.uniform(jax.random.PRNGKey(7), (5, 3))
    ys = np.asarray(tiny(xs)).argmax(-1)
    seen = set()
    for eps in (0.15, 0.3, 0.45):                # no attack: counterexamples come from the subdomains
        r = verify(tiny, xs, ys, eps, SMALL._replace(attack_steps=0))
        for i in range(len(xs)):
            seen.add(int(r.status[i]))
            if r.status[i] == VIOLATED:          # a counterexample is its own ground truth
                cx = r.counterexample[i]
                assert np.all(np.abs(cx - np.asarray(xs[i])) <= eps + 1e-6)
                assert int(np.asarray(tiny(cx[None])).argmax()) != ys[i]
                continue
            truth = exhaustive_min_margins(tiny, np.asarray(xs[i]), int(ys[i]), eps).min()
            if r.status[i] == ROBUST:
                assert truth > 0, (i, eps, truth)
            else:                                # clear cases must be decided
                assert abs(truth) <= 1e-3, (i, eps, truth, r.stage[i])
    assert seen == {ROBUST, VIOLATED}
    assert {"bab", "lp"} & set(r.stage[r.status == VIOLATED])


@pytest.mark.slow
def test_budgets_and_determinism(medium):
    cfg = SMALL._replace(attack_steps=0)
    grid = np.linspace(0.3, 0.5, 6)
    x = jnp.full((len(grid), 8), 0.5)
    y = np.asarray(medium(x)).argmax(-1)
    sweep = verify(medium, x, y, grid, cfg)
    hard = np.flatnonzero((sweep.status == ROBUST) & (sweep.stage != "crown"))
    assert len(hard), "no query needed branch and bound"
    i = hard[-1]
    a, b = (verify(medium, x[i:i + 1], y[i:i + 1], grid[i], cfg) for _ in range(2))
    assert a.status[0] == ROBUST and a.domains[0] > 2
    assert (a.domains[0], a.bound_evals[0], a.stage[0]) == (b.domains[0], b.bound_evals[0], b.stage[0])
    capped = verify(medium, x[i:i + 1], y[i:i + 1], grid[i], cfg._replace(max_domains=1))
    assert capped.status[0] == UNKNOWN and capped.stage[0] == "domains"
    late = verify(medium, x[i:i + 1], y[i:i + 1], grid[i], cfg._replace(timeout=1e-9))
    assert late.status[0] == UNKNOWN and late.stage[0] == "timeout"


def test_bad_input(tiny):
    x = jnp.full((2, 3), 0.5)
    with pytest.raises(InputError, match="eps"):
        verify(tiny, x, [0, 0], -0.1)
    with pytest.raises(InputError):
        verify(tiny, x, [0, 5], 0.1)
    with pytest.raises(InputError, match="timeout"):
        verify(tiny, x, [0, 0], 0.1, VerifyConfig(timeout=0))
    with pytest.raises(InputError, match="batch"):
        verify(tiny, x, [0, 0], 0.1, VerifyConfig(batch=7))


PROPERTY = """
(declare-const X_0 Real)
(declare-const X_1 Real)
(declare-const X_2 Real)
(declare-const Y_0 Real)
(declare-const Y_1 Real)
(declare-const Y_2 Real)
(assert (>= X_0 {l0})) (assert (<= X_0 {u0}))
(assert (>= X_1 {l1})) (assert (<= X_1 {u1}))
(assert (>= X_2 {l2})) (assert (<= X_2 {u2}))
(assert (or (and (>= Y_{a} Y_{y})) (and (>= Y_{b} Y_{y}))))
"""


def test_vnnlib_property_matches_robustness_query(tiny):
    x = np.array([0.3, 0.6, 0.5], np.float32)
    y = int(np.asarray(tiny(x[None])).argmax())
    a, b = [j for j in range(3) if j != y]
    for eps in (0.02, 0.3):
        text = PROPERTY.format(y=y, a=a, b=b, **{f"l{i}": x[i] - eps for i in range(3)},
                               **{f"u{i}": x[i] + eps for i in range(3)})
        r = verify_property(tiny, vnnlib.parse(text), SMALL)
        q = verify(tiny, x[None], [y], eps, SMALL)
        assert r.result == {ROBUST: "unsat", VIOLATED: "sat", UNKNOWN: "unknown"}[int(q.status[0])]
        if r.result == "sat":
            assert np.all((r.x >= x - eps - 1e-6) & (r.x <= x + eps + 1e-6))
            np.testing.assert_allclose(r.y, np.asarray(tiny(r.x[None]))[0], atol=1e-6)
            assert max(r.y[a], r.y[b]) >= r.y[y]


@pytest.mark.slow
def test_complete_oracle_closes_the_bisection(tiny):
    from jaxrobust.critical_eps import SearchConfig, search
    x = jax.random.uniform(jax.random.PRNGKey(11), (3, 3))
    y = np.asarray(tiny(x)).argmax(-1)
    oracle = make_oracle(tiny, "complete", attack_steps=10, targets=2, timeout=30.0, batch=16, steps=5,
                         root_steps=10)
    cfg = SearchConfig(eps_max=0.6, tol=0.01)
    r = search(tiny, oracle, x, y, cfg)
    assert set(r.status) <= {"exact", "censored"}
    for i in range(3):
        if r.status[i] == "exact":
            m = exhaustive_min_margins(tiny, np.asarray(x[i]), int(y[i]), r.eps_lower[i]).min()
            assert m > 0
    # warm start: the complete search starts from CROWN's proofs and the minimum-norm attack's counterexamples
    assert oracle.warm is not None and oracle.attacks[0] == "min-norm"
    w = search(tiny, oracle.warm, x, y, cfg)
    assert np.all(r.eps_lower >= w.eps_lower)
    assert np.all((r.eps_upper <= w.eps_upper) | np.isnan(w.eps_upper))
    assert np.all(r.queries >= w.queries)


@pytest.mark.slow
def test_jair_reference_256x2(shared):
    from jaxrobust.data import load_dataset, to_network_input
    from jaxrobust.onnx_import import load_onnx
    from jaxrobust.reference import load_jair
    net = load_onnx(shared("networks", "mnist", "vnncomp2021_mnistfc", "mnist-net_256x2.onnx"))
    ref = load_jair(shared("reference", "jair", "results_JAIR_fomlas.csv"), "mnist-net_256x2.onnx")
    ds = load_dataset(f"mnist:{shared('data', 'mnist.npz')}", "test")
    ids = [0, 2, 4]
    x = to_network_input(ds.x[ids], net.input_shape)
    cfg = VerifyConfig(timeout=20.0)
    certified = verify(net, x, ds.y[ids], np.array([ref[i].certified for i in ids]), cfg)
    assert not np.any(certified.status == VIOLATED)
    assert np.mean(certified.status == ROBUST) >= 2 / 3
    sat = verify(net, x, ds.y[ids], np.array([ref[i].counterexample for i in ids]), cfg)
    assert not np.any(sat.status == ROBUST)


def test_cli_verify_vnncomp_property(shared, capsys, tmp_path):
    from jaxrobust.cli import main
    folder = shared("networks", "mnist", "vnncomp2021_mnistfc")
    out = tmp_path / "result.txt"
    assert main(["verify", str(folder / "mnist-net_256x2.onnx"), str(folder / "prop_2_0.03.vnnlib"),
                 "--timeout", "30", "--out", str(out)]) == 0
    assert capsys.readouterr().out.strip() == "unsat" == out.read_text().strip()
    assert main(["verify", str(folder / "mnist-net_256x2.onnx"), str(tmp_path / "missing.vnnlib")]) == 2


@pytest.mark.slow
def test_verdicts_agree_with_milp(medium):
    from jaxrobust.milp import milp_verify_batch
    x = jax.random.uniform(jax.random.PRNGKey(3), (4, 8))
    y = np.asarray(medium(x)).argmax(-1)
    for eps in (0.3, 0.45):
        r = verify(medium, x, y, eps, SMALL._replace(attack_steps=0))
        m = milp_verify_batch(medium, x, y, eps, time_limit=20.0)
        both = (r.status != UNKNOWN) & (m.status != UNKNOWN)
        assert both.sum() >= 3
        np.testing.assert_array_equal(r.status[both], m.status[both])


def test_refined_root_is_sound_and_tighter():
    """The MILP-refined root bounds of a deep ReLU MLP lie inside the engine's, tighten some, and contain every
    pre-activation of random points and vertices of the box."""
    import time

    from jaxrobust.box_search import _refined_root
    from jaxrobust.kernels.bab import network_brancher
    net = mlp(7, (4, 12, 12, 12, 12, 3))
    brancher = network_brancher(net)
    lo, hi = jnp.full((1, 4), 0.2), jnp.full((1, 4), 0.7)
    root = brancher.root_bounds(lo, hi, SMALL.intermediate_steps)
    refined = _refined_root(net, brancher, root, lo, hi, SMALL._replace(refine=0.5, refine_layers=3),
                            time.perf_counter() + 60)
    assert refined is not None
    kink = [v for v, _, _, _ in brancher.layout.kink]
    rng = np.random.default_rng(7)
    pts = np.concatenate([rng.uniform(0.2, 0.7, (2000, 4)),
                          np.array(list(itertools.product((0.2, 0.7), repeat=4)))]).astype(np.float32)
    tighter = 0
    for v, z in zip(kink, pre_activations(relu_chain(net, net.input_shape), pts)):
        (l0, u0), (l, u) = ((np.asarray(b).reshape(-1) for b in r[v]) for r in (root, refined))
        assert np.all(l >= l0) and np.all(u <= u0)
        assert np.all(np.asarray(z) >= l - 1e-5) and np.all(np.asarray(z) <= u + 1e-5)
        tighter += int(np.sum((l > l0) | (u < u0)))
    assert tighter > 0
