"""Soundness and tightness of forward-mode linear bounds (`jaxrobust.kernels.forward_bounds`)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings

from jaxrobust.errors import InputError
from jaxrobust.kernels import forward_bounds, forward_linear, ibp
from jaxrobust.kernels.bounds import _program

from .test_bounds import NETS, assert_inside, boxes, build, extreme_points, random_spec


@settings(max_examples=2, deadline=None)
@given(arch=NETS)
@pytest.mark.slow
def test_forward_bounds_contain_sampled_and_attacked_outputs_and_beat_ibp(arch):
    fn, in_shape = build(arch)
    lo, hi = boxes(arch[1], in_shape)
    y = extreme_points(fn, lo, hi, jax.random.PRNGKey(arch[1]), n_random=20_000)
    b, box = forward_linear(fn, lo, hi), ibp(fn, lo, hi)
    assert_inside(y, b)
    assert bool(jnp.all(b.lower >= box.lower)) and bool(jnp.all(b.upper <= box.upper))
    spec = random_spec(arch[1], lo.shape[0], 4, y.shape[-1])
    assert_inside(jnp.einsum("bkc,pbc->pbk", spec, y), forward_linear(fn, lo, hi, spec))


def _latent_net(seed=0, latent=3):
    """A generator-like map from a 3-d latent through a wide tanh layer into a small classifier."""
    ks = jax.random.split(jax.random.PRNGKey(seed), 4)
    w1 = jax.random.normal(ks[0], (latent, 64))
    w2 = jax.random.normal(ks[1], (64, 36)) / 8
    c = jax.random.normal(ks[2], (3, 3, 1, 4)) / 3
    wd = jax.random.normal(ks[3], (64, 5)) / 8

    def fn(z):
        img = jnp.tanh(jax.nn.leaky_relu(z @ w1, 0.2) @ w2).reshape(-1, 6, 6, 1)
        h = jax.nn.relu(jax.lax.conv_general_dilated(img, c, (1, 1), "VALID",
                                                     dimension_numbers=("NHWC", "HWIO", "NHWC")))
        return h.reshape(z.shape[0], -1) @ wd

    return fn, (latent,)


@pytest.mark.slow
def test_few_inputs_much_tighter_than_ibp_and_sound():
    fn, in_shape = _latent_net()
    lo, hi = boxes(1, in_shape, n=4, eps=0.05)
    y = extreme_points(fn, lo, hi, jax.random.PRNGKey(3), n_random=20_000)
    b, box = forward_linear(fn, lo, hi), ibp(fn, lo, hi)
    assert_inside(y, b)
    width, ibp_width = float(jnp.mean(b.upper - b.lower)), float(jnp.mean(box.upper - box.lower))
    assert width < 0.5 * ibp_width, (width, ibp_width)
    # the bounds hug the sampled range: within 3x of the observed spread
    assert width < 3 * float(jnp.mean(y.max(0) - y.min(0)))


@pytest.mark.parametrize("arch", [("mlp", 1, "tanh", None), ("cnn", 2, "leaky", "max")])
def test_zero_width_box_collapses_to_forward_pass(arch):
    fn, in_shape = build(arch)
    x, _ = boxes(arch[1], in_shape, eps=0.0)
    b, y = forward_linear(fn, x, x), fn(x)
    assert bool(jnp.all(b.lower <= y)) and bool(jnp.all(y <= b.upper))
    np.testing.assert_allclose(b.lower, y, atol=1e-4)
    np.testing.assert_allclose(b.upper, y, atol=1e-4)


def test_bad_spec_and_box_are_rejected():
    fn, in_shape = build(("mlp", 0, "relu", None))
    lo, hi = boxes(0, in_shape)
    with pytest.raises(InputError, match="spec"):
        forward_linear(fn, lo, hi, jnp.ones((2, 4, 7)))
    with pytest.raises(InputError, match="lo <= hi"):
        forward_linear(fn, hi, lo)


def test_same_architecture_shares_one_compiled_program():
    (f1, in_shape), (f2, _) = _latent_net(seed=0), _latent_net(seed=1)
    lo, hi = boxes(2, in_shape, n=2, eps=0.05)
    progs = [_program(f, in_shape, jnp.float32) for f in (f1, f2)]
    assert forward_bounds._jitted(progs[0]) is forward_bounds._jitted(progs[1])
    for f in (f1, f2):  # each network gets its own weights' bounds
        assert_inside(extreme_points(f, lo, hi, jax.random.PRNGKey(5), n_random=5_000), forward_linear(f, lo, hi))
