"""Where a box meets a domain: properties are verified over exactly their box, bounds refuse inputs they
cannot contain, labels and dtypes are checked, and the bounds work under ``jax_enable_x64``."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrobust import vnnlib
from jaxrobust.errors import InputError
from jaxrobust.kernels import crown, ibp, margin_bounds, robustness_spec
from jaxrobust.network import from_function
from jaxrobust.verify import VerifyConfig, verify_property

from .test_verify import SMALL, mlp

PROPERTY = """
(declare-const X_0 Real)
(declare-const Y_0 Real)
(declare-const Y_1 Real)
(assert (>= X_0 {lo}))
(assert (<= X_0 {hi}))
(assert (>= Y_1 Y_0))
"""


@pytest.fixture(scope="module")
def ramp():
    """Two logits ``[relu(x + 0.1), 0]``: class 1 (a tie) only below x = -0.1, outside the domain [0, 1]."""
    def apply(p, x):
        return jax.nn.relu(x[:, :1] + p) @ jnp.array([[1.0, 0.0]])
    return from_function(apply, jnp.float32(0.1), (1,), 2, name="ramp")


@pytest.mark.parametrize("attack_steps", [0, 10])
def test_property_box_outside_the_domain_is_verified_as_written(ramp, attack_steps):
    cfg = SMALL._replace(attack_steps=attack_steps)
    r = verify_property(ramp, vnnlib.parse(PROPERTY.format(lo=-0.5, hi=0.5)), cfg)
    assert r.result == "sat"
    assert -0.5 <= r.x[0] < -0.1 and r.y[1] >= r.y[0]
    assert verify_property(ramp, vnnlib.parse(PROPERTY.format(lo=-0.05, hi=0.5)), cfg).result == "unsat"
    assert verify_property(ramp, vnnlib.parse(PROPERTY.format(lo=-2.0, hi=-1.0)), cfg).result == "sat"


def test_property_without_float32_point_is_refused(ramp):
    prop = vnnlib.parse(PROPERTY.format(lo="0.10000000001", hi="0.10000000002"))
    with pytest.raises(InputError, match="X_0"):
        verify_property(ramp, prop, SMALL)


@pytest.mark.slow
def test_mnist_property_below_zero_is_sat(shared):
    """MNIST test image 6 at ε = 0.02 on mnist-net_256x2, the box not clipped to [0, 1]: a counterexample
    exists with pixels below 0 (onnxruntime: Y_4 = 0.427 < 0.511)."""
    from jaxrobust.onnx_import import load_onnx
    net = load_onnx(shared("networks", "mnist", "vnncomp2021_mnistfc", "mnist-net_256x2.onnx"))
    d = np.load(shared("data", "mnist.npz"))
    x, y = d["x_test"][6].reshape(-1) / 255.0, int(d["y_test"][6])
    A = np.zeros((9, 10))
    A[np.arange(9), y] = 1.0
    A[np.arange(9), [j for j in range(10) if j != y]] = -1.0
    prop = vnnlib.Property(x - 0.02, x + 0.02, [(a[None], np.zeros(1)) for a in A], 10)
    r = verify_property(net, prop, VerifyConfig(timeout=60))
    assert r.result == "sat"
    assert np.all(r.x >= x - 0.02 - 1e-7) and np.all(r.x <= x + 0.02 + 1e-7) and r.x.min() < 0
    assert np.delete(r.y, y).max() >= r.y[y]


def test_labels_out_of_range_are_refused():
    net = mlp(1, (4, 6, 3))
    x = np.full((1, 4), 0.5, np.float32)
    for bad in ([3], [-1]):
        with pytest.raises(InputError, match="labels"):
            margin_bounds(net, x, 0.1, labels=np.array(bad))
        with pytest.raises(InputError, match="labels"):
            robustness_spec(np.array(bad), 3)
    with pytest.raises(InputError, match="labels"):
        robustness_spec(np.array([0.5]), 3)


def test_inputs_outside_the_domain_and_integer_images_are_refused():
    net = mlp(2, (4, 6, 3))
    x = np.full((1, 4), 0.5, np.float32)
    x[0, 1] = 20.0
    with pytest.raises(InputError, match="domain"):
        margin_bounds(net, x, 0.001, method="crown")
    with pytest.raises(InputError, match="uint8"):
        margin_bounds(net, np.full((1, 4), 128, np.uint8), 0.01)
    lower = margin_bounds(net, np.full((1, 4), 0.5, np.float32), 0.01, method="crown")
    assert lower.shape == (1, 2)


def test_bounds_under_x64_with_float32_weights_contain_the_box():
    """A float32 convolutional network given a float64 box under ``jax_enable_x64``: the box is rounded
    outward to float32, and bounds equal those of the float32 box."""
    k = jax.random.normal(jax.random.PRNGKey(0), (3, 3, 1, 2), jnp.float32)
    w = jax.random.normal(jax.random.PRNGKey(1), (2 * 4 * 4, 3), jnp.float32)

    def apply(p, x):
        h = jax.lax.conv_general_dilated(x, p[0], (1, 1), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return jax.nn.relu(h).reshape(len(x), -1) @ p[1]
    net = from_function(apply, (k, w), (6, 6, 1), 3)
    x = np.random.default_rng(0).uniform(0.2, 0.8, (2, 6, 6, 1))
    with jax.enable_x64(True):
        lo, hi = x - 0.01, x + 0.01
        b_ibp, b_crown = ibp(net, lo, hi), crown(net, lo, hi)
        lo32 = np.asarray(jnp.nextafter(jnp.asarray(lo, jnp.float32), -np.inf))
        assert b_crown.lower.dtype == jnp.float32
    ref = crown(net, np.minimum(lo.astype(np.float32), lo32), np.asarray(hi, np.float32))
    assert np.all(np.asarray(b_crown.lower) <= np.asarray(ref.lower) + 1e-5)
    assert np.all(np.asarray(b_ibp.lower) <= np.asarray(b_crown.upper))
