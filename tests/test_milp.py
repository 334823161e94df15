"""The MILP back-end against exhaustive ground truth on small networks and against the JAIR results."""
import itertools
import os
import threading
from concurrent.futures import ThreadPoolExecutor

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.optimize import linprog

from jaxrobust import milp as milp_mod
from jaxrobust.errors import InputError
from jaxrobust.kernels.relu_chain import ReluChain, forward
from jaxrobust.milp import layer_bounds, milp_verify, milp_verify_batch
from jaxrobust.network import from_function
from jaxrobust.oracles import ROBUST, UNKNOWN, VIOLATED


def random_chain(rng, widths) -> ReluChain:
    ws = tuple(jnp.asarray(rng.normal(size=(o, i)) / np.sqrt(i), jnp.float32) for i, o in itertools.pairwise(widths))
    bs = tuple(jnp.asarray(0.3 * rng.normal(size=(o,)), jnp.float32) for o in widths[1:])
    return ReluChain(ws, bs)


def instance(seed, widths=(3, 6, 6, 3)):
    """A random chain, a box around a random point of [0, 1]^n_0 and the label predicted at that point."""
    rng = np.random.default_rng(seed)
    chain = random_chain(rng, widths)
    x = rng.uniform(0, 1, widths[0]).astype(np.float32)
    eps = rng.uniform(0.2, 0.6)
    label = int(np.argmax(np.asarray(forward(chain, x[None]))[0]))
    return chain, np.clip(x - eps, 0, 1), np.clip(x + eps, 0, 1), label


def exact_min_margin(chain, lo, hi, label) -> float:
    """``min_x min_t z_label - z_t`` over the box, exactly: depth-first over the activation patterns with a
    non-empty region (one LP per split, skipped when a known point of the region decides it), then one LP per
    pattern and target."""
    ws = [np.asarray(w, np.float64) for w in chain.weights]
    bs = [np.asarray(b, np.float64) for b in chain.biases]
    box, best = list(zip(lo, hi)), [np.inf]
    targets = [t for t in range(ws[-1].shape[0]) if t != label]

    def lp(c, a_ub, b_ub):
        return linprog(c, A_ub=a_ub, b_ub=b_ub, bounds=box, method="highs")

    def rec(k, j, zm, zc, am, ac, a_ub, b_ub, point):
        # zm x + zc: pre-activations of hidden layer k; am x + ac: its activations for neurons < j
        if j == len(zc) and k == len(ws) - 2:
            om, oc = ws[-1] @ am, ws[-1] @ ac + bs[-1]
            for t in targets:
                best[0] = min(best[0], lp(om[label] - om[t], a_ub, b_ub).fun + oc[label] - oc[t])
        elif j == len(zc):
            zm2, zc2 = ws[k + 1] @ am, ws[k + 1] @ ac + bs[k + 1]
            rec(k + 1, 0, zm2, zc2, np.zeros_like(zm2), np.zeros_like(zc2), a_ub, b_ub, point)
        else:
            for active in (True, False):
                s = -1.0 if active else 1.0                       # active: -z <= 0, inactive: z <= 0
                na, nb = np.vstack([a_ub, s * zm[j]]), np.r_[b_ub, -s * zc[j]]
                p = point
                if (zm[j] @ point + zc[j] >= 0) != active:
                    r = lp(s * zm[j], na, nb)
                    if r.status != 0:
                        continue
                    p = r.x
                am2, ac2 = am.copy(), ac.copy()
                if active:
                    am2[j], ac2[j] = zm[j], zc[j]
                rec(k, j + 1, zm, zc, am2, ac2, na, nb, p)

    rec(0, 0, ws[0], bs[0], np.zeros_like(ws[0]), np.zeros_like(bs[0]), np.zeros((0, len(lo))), np.zeros(0),
        (lo + hi) / 2)
    return best[0]


def margins(chain, x, label):
    z = np.asarray(forward(chain, np.asarray(x, np.float32)[None]))[0]
    return z[label] - np.delete(z, label)


def test_encoding_contains_every_network_point():
    rng = np.random.default_rng(0)
    chain = random_chain(rng, (4, 8, 8, 3))
    lo, hi = np.full(4, 0.1), np.full(4, 0.8)
    ws = [np.asarray(w, np.float64) for w in chain.weights]
    bs = [np.asarray(b, np.float64) for b in chain.biases]
    bounds = layer_bounds(chain, lo, hi, lp=True)
    assert any(((l < 0) & (u > 0)).any() for l, u in bounds)
    enc = milp_mod._Encoding(ws, bs, bounds, lo, hi)
    for x in rng.uniform(lo, hi, (200, 4)):
        v, a = [x], x
        for (l, u), w, b in zip(bounds, ws, bs):
            z = w @ a + b
            assert np.all(z >= l - 1e-9) and np.all(z <= u + 1e-9)
            a = np.maximum(z, 0)
            v += [a[u > 0], (z[(u > 0) & (l < 0)] > 0).astype(float)]
        v = np.concatenate(v)
        assert np.all(v >= enc.bounds.lb - 1e-9) and np.all(v <= enc.bounds.ub + 1e-9)
        av = enc.a @ v
        assert np.all(av >= enc.r_lo - 1e-9) and np.all(av <= enc.r_hi + 1e-9)


# robust: 13, 21, 57, 61 (the last two with margins near 0.02); violated: 2, 3, 41, 46
@pytest.mark.parametrize("seed", [0, 2, 3, 13, 21, 41, 46, 57, 61])
@pytest.mark.slow
def test_agrees_with_exhaustive_enumeration(seed, monkeypatch):
    solves = []
    solve = milp_mod._Encoding.solve
    monkeypatch.setattr(milp_mod._Encoding, "solve", lambda self, *a: solves.append(solve(self, *a)) or solves[-1])
    chain, lo, hi, label = instance(seed)
    exact = exact_min_margin(chain, lo, hi, label)
    assert abs(exact) > 1e-3    # the instances are far from ties
    for alone in (False, True):
        if alone:   # no margin bound proves anything, only the box centre is a candidate: the MILP decides
            monkeypatch.setattr(milp_mod, "_candidates",
                                lambda net, x, c, lo, hi: (np.tile((lo + hi) / 2, (len(x), 1)), np.zeros(len(x))))
            margins_of = milp_mod._Engine.margins
            monkeypatch.setattr(milp_mod._Engine, "margins",
                                lambda self, *a: (np.full(len(a[0]), -np.inf), margins_of(self, *a)[1]))
            solves.clear()
        r = milp_verify(chain, lo, hi, label, time_limit=30)
        if exact > 0:
            assert r.status == ROBUST and r.counterexample is None
            assert 0 < r.min_margin <= exact + 1e-6
        else:
            assert r.status == VIOLATED
            x = r.counterexample
            assert x.dtype == np.float32 and x.shape == lo.shape
            assert np.all(x >= lo) and np.all(x <= hi)
            assert exact - 1e-5 <= r.min_margin < 0
            assert r.min_margin == pytest.approx(margins(chain, x, label).min())
    if exact > 0:
        assert len(solves) == chain.widths[-1] - 1 and all(s.infeasible for s in solves)
    elif margins(chain, (lo + hi) / 2, label).min() > 0:
        assert solves and solves[-1].x is not None


def test_tie_is_unknown():
    """Two identical output rows: the margin to that class is 0 everywhere, so neither proof nor counterexample."""
    rng = np.random.default_rng(1)
    chain = random_chain(rng, (3, 5, 3))
    w, b = np.array(chain.weights[-1]), np.array(chain.biases[-1])
    w[1], b[1] = w[0], b[0]
    chain = ReluChain(chain.weights[:-1] + (jnp.asarray(w),), chain.biases[:-1] + (jnp.asarray(b),))
    r = milp_verify(chain, np.full(3, 0.2), np.full(3, 0.4), 0, targets=[1])
    assert r.status == UNKNOWN and r.counterexample is None
    assert r.min_margin <= 0


def test_time_limit_gives_unknown(monkeypatch):
    chain, lo, hi, label = instance(13)
    margins_of = milp_mod._Engine.margins     # bounds that prove nothing leave the MILP, out of time
    monkeypatch.setattr(milp_mod._Engine, "margins", lambda self, *a: (np.full(len(a[0]), -np.inf),
                                                                        margins_of(self, *a)[1]))
    r = milp_verify(chain, lo, hi, label, time_limit=1e-6)
    assert r.status == UNKNOWN and r.counterexample is None


def _mlp_net():
    k1, k2 = jax.random.split(jax.random.PRNGKey(3))
    params = (jax.random.normal(k1, (4, 8)) / 2, jax.random.normal(k2, (8, 3)) / 3)
    return from_function(lambda p, x: jax.nn.relu(x.reshape(len(x), -1) @ p[0] - 0.3) @ p[1], params, (2, 2), 3)


def test_batch():
    net = _mlp_net()
    x = jax.random.uniform(jax.random.PRNGKey(4), (6, 2, 2))
    y = np.asarray(jnp.argmax(net(x), axis=1))
    eps = np.array([0.0, 0.01, 0.05, 0.2, 0.5, 1.0])
    r = milp_verify_batch(net, x, y, eps, time_limit=30)
    assert r.status.dtype == np.int8 and r.status.shape == (6,)
    assert r.counterexample.shape == (6, 2, 2) and r.counterexample.dtype == np.float32
    assert r.min_margin.shape == r.time_s.shape == (6,)
    assert r.status[0] == ROBUST and r.status[-1] == VIOLATED
    assert np.all(r.status != UNKNOWN)
    bad = r.status == VIOLATED
    assert np.all(np.isnan(r.counterexample[~bad]))
    cex = r.counterexample[bad]
    assert np.all(np.abs(cex - np.asarray(x)[bad]).reshape(len(cex), -1).max(axis=1) <= eps[bad].astype(np.float32))
    assert np.all((cex >= 0) & (cex <= 1))
    assert np.all(np.asarray(jnp.argmax(net(cex), axis=1)) != y[bad])
    # robust at a radius implies robust at every smaller one
    assert np.all(np.diff(r.status.astype(int)) <= 0)


def test_input_errors():
    chain, lo, hi, label = instance(0)
    with pytest.raises(InputError, match="label"):
        milp_verify(chain, lo, hi, 3)
    with pytest.raises(InputError, match="NaN"):
        milp_verify(chain, np.r_[np.nan, lo[1:]], hi, label)
    with pytest.raises(InputError, match="empty"):
        milp_verify(chain, hi + 0.1, hi, label)
    with pytest.raises(InputError, match="shape"):
        milp_verify(chain, lo[:2], hi[:2], label)
    with pytest.raises(InputError, match="targets"):
        milp_verify(chain, lo, hi, label, targets=[label])
    net = _mlp_net()
    x = np.full((2, 2, 2), 0.5, np.float32)
    with pytest.raises(InputError, match="eps"):
        milp_verify_batch(net, x, [0, 1], -0.1)
    with pytest.raises(InputError, match="NaN"):
        milp_verify_batch(net, np.where(np.eye(2, dtype=bool)[None], np.nan, x), [0, 1], 0.1)
    with pytest.raises(InputError, match="labels"):
        milp_verify_batch(net, x, [0, 3], 0.1)


@pytest.mark.slow
def test_sound_against_jair(shared):
    from jaxrobust.data import load_dataset
    from jaxrobust.kernels.relu_chain import relu_chain
    from jaxrobust.onnx_import import load_onnx
    from jaxrobust.reference import load_jair

    net = load_onnx(shared("networks", "mnist", "vnncomp2021_mnistfc", "mnist-net_256x2.onnx"))
    ref = load_jair(shared("reference", "jair", "results_JAIR_fomlas.csv"), "mnist-net_256x2.onnx", "test")
    data = load_dataset(f"mnist:{shared('data', 'mnist.npz')}", "test")
    chain = relu_chain(net, net.input_shape)
    for i in (0, 4):    # images decided within a few seconds at both radii
        x = data.x[i].reshape(-1).astype(np.float64)
        assert ref[i].label == data.y[i]
        for eps, forbidden in ((ref[i].certified, VIOLATED), (ref[i].counterexample, ROBUST)):
            r = milp_verify(chain, np.maximum(x - eps, 0), np.minimum(x + eps, 1), int(data.y[i]), time_limit=60)
            assert r.status == -forbidden, (i, eps, r)


def test_refined_bounds_are_sound_and_tighter():
    """MILP-refined hidden-layer bounds of a deep chain contain every pre-activation of 2000 random points and
    the exact extremes found by PGD-like vertex search, and never widen the engine's bounds."""
    from jaxrobust.kernels.relu_chain import pre_activations
    from jaxrobust.milp import refine_bounds
    rng = np.random.default_rng(5)
    chain = random_chain(rng, (4, 12, 12, 12, 12, 3))
    lo, hi = np.full(4, 0.2), np.full(4, 0.7)
    before = layer_bounds(chain, lo, hi)
    after = refine_bounds(chain, before, lo, hi, layers=3, deadline=float("inf"), solve_limit=5.0)
    assert sum(int(((l < 0) & (u > 0)).sum()) for l, u in after) < sum(int(((l < 0) & (u > 0)).sum())
                                                                        for l, u in before)
    pts = np.concatenate([rng.uniform(lo, hi, (2000, 4)),
                          np.array(list(itertools.product(*zip(lo, hi))))]).astype(np.float32)
    for (l0, u0), (l, u), z in zip(before, after, pre_activations(chain, pts)):
        z = np.asarray(z, np.float64)
        assert np.all(l >= l0) and np.all(u <= u0)
        assert np.all(z >= l - 1e-5) and np.all(z <= u + 1e-5)


def test_intersect_root_rounds_outward():
    """float64 hidden-layer bounds intersected into float32 root bounds are rounded outward by at most one float32
    step, never leave the root, keep its shapes and leave other vars alone; wider bounds change nothing."""
    from jaxrobust.milp import hidden_bounds, intersect_root
    rng = np.random.default_rng(0)
    root = {"a": (jnp.full((1, 5), -1.0), jnp.full((1, 5), 1.0)), "b": (jnp.zeros((1, 2)), jnp.ones((1, 2)))}
    l, u = rng.uniform(-1.5, -0.5, 5) + 1e-9, rng.uniform(0.5, 1.5, 5) + 1e-9
    out = intersect_root(root, ["a"], [(l, u)])
    assert out["b"] is root["b"] and out["a"][0].shape == (1, 5) and out["a"][0].dtype == jnp.float32
    (lo, hi), = hidden_bounds(out, ["a"])
    want_lo, want_hi = np.maximum(l, -1.0), np.minimum(u, 1.0)
    step = float(np.spacing(np.float32(2)))
    assert np.all(lo <= want_lo) and np.all(lo >= want_lo - step)
    assert np.all(hi >= want_hi) and np.all(hi <= want_hi + step)
    wide = intersect_root(root, ["a"], [(np.full(5, -5.0), np.full(5, 5.0))])
    np.testing.assert_array_equal(hidden_bounds(wide, ["a"])[0], hidden_bounds(root, ["a"])[0])


def test_solver_output_on_stdout_is_silenced_and_stdout_restored(monkeypatch, capfd):
    entered, first_done = [threading.Event() for _ in range(2)], threading.Event()

    def noisy(which, **kwargs):        # what HiGHS does: writes to file descriptor 1 from C, whatever its options
        if which == 1:
            entered[0].wait(10)
        os.write(1, b"HighsMipSolverData::transformNewIntegerFeasibleSolution tmpSolver.run();\n")
        entered[which].set()
        if which == 0:                 # the first solve leaves while the second is still writing
            entered[1].wait(10)
        else:
            first_done.wait(10)
            os.write(1, b"HighsMip again\n")
        return which

    monkeypatch.setattr(milp_mod, "_scipy_milp", noisy)
    with ThreadPoolExecutor(2) as pool:
        first, second = pool.submit(milp_mod._milp, 0), pool.submit(milp_mod._milp, 1)
        assert first.result(10) == 0
        first_done.set()
        assert second.result(10) == 1
    print("after")
    out = capfd.readouterr().out
    assert "HighsMip" not in out and "after" in out
