"""Falsifiers: counterexamples behind inactive ReLU units, which gradient attacks cannot see, found from the
minimisers of the bound engine's linear lower bounds."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrobust.falsify import attack_falsifier, guided_falsifier, guided_ladder, guided_minimizer, leaky_minimizer
from jaxrobust.kernels.surrogate import kinks, leaky_gradients
from jaxrobust.network import from_function
from jaxrobust.oracles import make_oracle
from jaxrobust.verdict import UNKNOWN, VIOLATED

from .conftest import shared_path


def corner_net():
    """Class 0 everywhere on [0, 1]^2 except near the corner (1, 1), where a unit that is off elsewhere turns
    on: ``logits = (1, 20 relu(10 (x1 + x2) - 19.5))``. Around (0.8, 0.8) every gradient is 0."""
    def apply(p, x):
        h = jax.nn.relu(x.reshape(len(x), -1) @ p[0] + p[1])
        return jnp.concatenate([jnp.ones_like(h), 20.0 * h], axis=1)
    return from_function(apply, (jnp.full((2, 1), 10.0), jnp.full((1,), -19.5)), (2,), 2, name="corner")


def test_guided_attack_finds_what_gradients_cannot_see():
    net = corner_net()
    x, y, eps = np.full((1, 2), 0.8, np.float32), np.zeros(1, np.int64), np.full(1, 0.2, np.float32)
    key = jax.random.PRNGKey(0)
    assert attack_falsifier(net)(x, y, eps, key).status[0] == UNKNOWN
    for falsify in (guided_falsifier(net), guided_minimizer(net)):
        v = falsify(x, y, eps, key)
        assert v.status[0] == VIOLATED
        cex = v.counterexample[0]
        assert np.all(np.abs(cex - x[0]) <= eps[0] + 1e-7) and np.all((cex >= 0) & (cex <= 1))
        assert np.asarray(net(cex[None])).argmax() != 0
    # no counterexample exists below the radius 0.175 (x1 + x2 > 1.95 needs both coordinates at 0.975)
    assert guided_falsifier(net)(x, y, np.full(1, 0.17, np.float32), key).status[0] == UNKNOWN


def test_min_norm_ladder_brackets_the_smallest_radius():
    net = corner_net()
    x, y = np.full((1, 2), 0.8, np.float32), np.zeros(1, np.int64)
    found, point = guided_ladder(net)(x[0], y[0], 0.5)
    assert found and np.asarray(net(point[None])).argmax() != 0
    d = np.max(np.abs(point - x[0]))
    assert 0.175 <= d <= 0.175 + 0.125 / 16 + 1e-6    # within 1/16 of the rung [0.125, 0.25] that first held one
    v = guided_minimizer(net)(x, y, np.full(1, 0.5, np.float32), jax.random.PRNGKey(0))
    assert v.status[0] == VIOLATED and np.max(np.abs(v.counterexample[0] - point)) == 0
    oracle = make_oracle(net, "attack")
    assert oracle.attacks == ("min-norm", "min-norm-leaky", "bound-guided") and oracle.last_resort is not None
    assert make_oracle(net, "crown", guided=False).attacks[-1] == "min-norm-leaky"
    assert make_oracle(net, "crown", guided=False, leaky=False).last_resort is None
    assert make_oracle(net, "complete").warm.attacks == ("min-norm", "min-norm-leaky")
    assert make_oracle(net, "complete", leaky=False).warm.attacks == ("min-norm",)


def test_leaky_gradients_keep_values_and_pass_through_inactive_units():
    """The rewritten network computes the same logits; its gradient through a ReLU that is off is ``slope`` times
    the one through an active unit, including ReLUs inside nested calls (``jax.nn.relu`` is a custom_jvp
    call) and clipping by ``min``; at slope 0 the gradients are the network's own."""
    def apply(p, x):
        h = jax.jit(jax.nn.relu)(x @ p)
        return jnp.stack([jnp.minimum(h[:, 0], 0.5) + h[:, 1], -h[:, 1]], axis=1)
    net = from_function(apply, jnp.eye(2), (2,), 2, name="two-relus")
    assert kinks(net) == 2
    leaky = leaky_gradients(net, 0.1)
    x = jnp.array([[-1.0, 2.0], [0.2, -0.3], [0.7, 0.1]])
    np.testing.assert_array_equal(np.asarray(leaky(x)), np.asarray(net(x)))
    g = np.asarray(jax.grad(lambda v: leaky(v)[:, 0].sum())(x))
    # d/dx0: relu(x0) off -> 0.1; on and below the clip -> 1; on and above the clip (x0 = 0.7) -> 0.1
    np.testing.assert_allclose(g[:, 0], [0.1, 1.0, 0.1], rtol=1e-6)
    np.testing.assert_allclose(g[:, 1], [1.0, 0.1, 1.0], rtol=1e-6)
    g0 = jax.grad(lambda v: leaky_gradients(net, 0.0)(v)[:, 0].sum())(x)
    np.testing.assert_array_equal(np.asarray(g0), np.asarray(jax.grad(lambda v: net(v)[:, 0].sum())(x)))
    assert kinks(from_function(lambda p, v: v @ p, jnp.eye(2), (2,), 2)) == 0


def test_leaky_minimizer_sees_the_unit_that_is_off():
    """At (0.8, 0.8) of the corner network every gradient is 0; through the leaky gradient the minimum-norm
    attack walks to the corner, and its counterexample is confirmed by the network itself."""
    net = corner_net()
    x, y = np.full((1, 2), 0.8, np.float32), np.zeros(1, np.int64)
    v = leaky_minimizer(net)(x, y, np.full(1, 0.5, np.float32), jax.random.PRNGKey(0))
    assert v.status[0] == VIOLATED
    cex = v.counterexample[0]
    assert np.max(np.abs(cex - x[0])) <= 0.5 + 1e-7 and np.asarray(net(cex[None])).argmax() == 1


@pytest.mark.slow
def test_mnist_images_whose_counterexamples_hide_from_pgd():
    """mnist-net_256x2 test images 61 and 84: 3-4 of 256 first-layer units active; branch and bound finds
    counterexamples at 0.038 and 0.061 where PGD and the minimum-norm attack fail up to 0.5; the minimum-norm
    attack on leaky gradients finds them within 30 % of those radii, the bound-guided attack within 10 %."""
    from jaxrobust.critical_eps import SearchConfig, search
    from jaxrobust.onnx_import import load_onnx
    net = load_onnx(shared_path("networks", "mnist", "vnncomp2021_mnistfc", "mnist-net_256x2.onnx"))
    d = np.load(shared_path("data", "mnist.npz"))
    x = (d["x_test"][[61, 84]].reshape(-1, 784, 1) / 255.0).astype(np.float32)
    y = d["y_test"][[61, 84]].astype(np.int64)
    for options, slack in (({"guided": False}, 1.3), ({"leaky": False}, 1.1)):
        # the leaky-gradient attack alone, then the bound-guided attack alone: each finds both
        r = search(net, make_oracle(net, "attack", **options), x, y, SearchConfig(eps_max=0.5, tol=1e-3))
        assert list(r.status) == ["gap", "gap"]        # an upper bound, no longer censored (no prover here)
        assert np.all(r.eps_upper <= np.array([0.038, 0.061]) * slack)
        with jax.default_matmul_precision("highest"):
            assert np.all(np.asarray(net(jnp.asarray(r.counterexample))).argmax(-1) != y)
