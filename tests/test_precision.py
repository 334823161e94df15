"""Every product of a proof runs at full float32 precision: the lowered bound programs (IBP, CROWN,
α-CROWN, forward-mode, branch and bound) carry ``Precision.HIGHEST`` on every dot and convolution, even for a
network that asks for default precision (TF32 / bf16 passes on GPUs and TPUs)."""
import jax
import jax.numpy as jnp
import numpy as np

from jaxrobust.kernels.bab import Brancher
from jaxrobust.kernels.bounds import _program
from jaxrobust.kernels.forward_bounds import _jitted
from jaxrobust.network import from_function


def default_precision_net():
    k = jax.random.normal(jax.random.PRNGKey(0), (3, 3, 1, 2))
    w = jax.random.normal(jax.random.PRNGKey(1), (32, 3))

    def apply(p, x):
        h = jax.lax.conv_general_dilated(x, p[0], (1, 1), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                         precision=jax.lax.Precision.DEFAULT)
        return jnp.dot(jax.nn.relu(h).reshape(len(x), -1), p[1], precision=jax.lax.Precision.DEFAULT)
    return from_function(apply, (k, w), (6, 6, 1), 3)


def products(text):
    lines = [ln for ln in text.splitlines() if "stablehlo.dot_general" in ln or "stablehlo.convolution" in ln]
    assert lines
    return lines


def assert_highest(lowered):
    bad = [ln.strip()[:120] for ln in products(lowered.as_text()) if "HIGHEST" not in ln]
    assert not bad, bad


def test_the_network_itself_lowers_at_default_precision():
    """The check can fail: the plain forward pass of this network has no HIGHEST products."""
    net = default_precision_net()
    lines = products(jax.jit(net.__call__).lower(jnp.zeros((2, 6, 6, 1))).as_text())
    assert not any("HIGHEST" in ln for ln in lines)


def test_bound_programs_lower_at_highest_precision():
    net = default_precision_net()
    prog = _program(net, net.input_shape, jnp.float32)
    lo = jnp.zeros((2, 6, 6, 1))
    hi = lo + 0.1
    assert_highest(prog.ibp.lower(prog.consts, lo, hi, True))
    ball = (lo + 0.05, jnp.full((2,), 0.05))
    for steps in (0, 3):
        assert_highest(prog.crown.lower(prog.consts, prog.prefixes(), lo, hi, None, None, steps, 0.1, True, None))
        assert_highest(prog.crown.lower(prog.consts, prog.prefixes(True), lo, hi, None, ball, steps, 0.1, True,
                                        "l2"))
    assert_highest(_jitted(prog).lower(prog.consts, lo, hi, None, True))
    br = Brancher(net, net.input_shape)
    root = br.root_bounds(lo[:1], hi[:1])
    sp = br.initial(root, 4)
    c = jnp.asarray(np.eye(3, dtype=np.float32)[[0, 1, 2, 0]])
    assert_highest(br._bound.lower(br.consts, root, lo[:1], hi[:1], c, *map(jnp.asarray, sp), None, None, steps=2,
                                   candidates=2))
    assert_highest(br._bound.lower(br.consts, root, lo[:1], hi[:1], c, *map(jnp.asarray, sp), None,
                                   (lo[:1] + 0.05, jnp.float32(0.05)), steps=2, candidates=2, norm="l1"))
    assert_highest(br._leaf.lower(br.consts, root, lo[:1], hi[:1], jnp.asarray(sp.s[0])))
