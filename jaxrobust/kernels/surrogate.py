"""Surrogate gradients for attacks: the same forward pass, gradients that pass through inactive ReLUs.

A gradient attack sees only the active units of a ReLU network: where most units of a layer are off (on
mnist-net_256x2, 3 of 256 first-layer units are active at test image 61), the input gradient ignores every unit
a counterexample would have to switch on, and PGD and the minimum-norm attack fail at every radius.
`leaky_gradients` rewrites the network's jaxpr so that each ``max(x, k)`` / ``min(x, k)`` with one
input-dependent operand (ReLU, ReLU6, clipping) keeps its value but passes ``slope`` times the incoming gradient
on its inactive side, as a leaky ReLU would: the attack then moves towards switching helpful units on. Values
are unchanged, so a point the rewritten network misclassifies is misclassified by the network itself (callers
re-check with the original anyway).
"""
from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
from jax.extend import core as jcore

from ..network import Network
from ._graph import CALLS, _sub_jaxpr


def leaky_gradients(net: Network, slope: float = 0.01) -> Network:
    """``net`` with gradients of slope ``slope`` (instead of 0) through the inactive side of its kinks;
    ``apply(params, x: (B, *input_shape)) -> (B, num_classes)`` as before, values unchanged."""
    slope = float(slope)

    def apply(params, x):
        closed, leaves = _traced(net.apply, params, x)
        return _run(closed.jaxpr, closed.consts, [*leaves, x], [False] * len(leaves) + [True], slope)[0]

    return Network(apply, net.params, net.input_shape, net.num_classes, net.domain, net.name, net.arch)


def kinks(net: Network) -> int:
    """How many kinks `leaky_gradients` rewrites in ``net``'s jaxpr (0: it changes nothing)."""
    count = [0]

    def counting(x, k, is_max, slope):
        count[0] += 1
        return jnp.maximum(x, k) if is_max else jnp.minimum(x, k)

    x = jax.ShapeDtypeStruct((1,) + tuple(net.input_shape), jnp.float32)
    closed, leaves = _traced(net.apply, net.params, x)
    jax.eval_shape(lambda ls, v: _run(closed.jaxpr, closed.consts, [*ls, v], [False] * len(ls) + [True], 0.0,
                                      counting), leaves, x)
    return count[0]


def _traced(apply, params, x):
    """The jaxpr of ``apply`` with the parameters' leaves and ``x`` as inputs, and the leaves."""
    leaves, tree = jax.tree_util.tree_flatten(params)
    return jax.make_jaxpr(lambda ls, v: apply(jax.tree_util.tree_unflatten(tree, ls), v))(leaves, x), leaves


def _run(jaxpr, consts, args, dynamic, slope, kink=None) -> list:
    """Evaluate ``jaxpr`` with ``kink`` (default `_leaky`) in place of every max / min of one input-dependent
    operand; ``dynamic[i]``: whether ``args[i]`` depends on the network input."""
    kink = _leaky if kink is None else kink
    env = dict(zip(jaxpr.constvars, consts)) | dict(zip(jaxpr.invars, args))
    dyn = {v for v, d in zip(jaxpr.invars, dynamic) if d}

    def read(a):
        return a.val if isinstance(a, jcore.Literal) else env[a]

    for eqn in jaxpr.eqns:
        ins = [read(a) for a in eqn.invars]
        flags = [not isinstance(a, jcore.Literal) and a in dyn for a in eqn.invars]
        name = eqn.primitive.name
        if name in CALLS:
            outs = _run(*_sub_jaxpr(eqn), ins, flags, slope, kink)
        elif name in ("max", "min") and sum(flags) == 1:
            i = flags.index(True)
            x = ins[i]
            k = jnp.broadcast_to(jnp.asarray(ins[1 - i], x.dtype), jnp.shape(x))
            outs = [kink(x, k, name == "max", slope)]
        else:
            out = eqn.primitive.bind(*ins, **eqn.params)
            outs = list(out) if eqn.primitive.multiple_results else [out]
        if any(flags):
            dyn.update(eqn.outvars)
        env.update(zip(eqn.outvars, outs))
    return [read(a) for a in jaxpr.outvars]


@partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _leaky(x, k, is_max: bool, slope: float):
    """``max(x, k)`` (``is_max``) or ``min(x, k)``, shapes equal; its gradient in ``x`` is ``slope`` where inactive."""
    return jnp.maximum(x, k) if is_max else jnp.minimum(x, k)


def _leaky_fwd(x, k, is_max, slope):
    return (jnp.maximum(x, k) if is_max else jnp.minimum(x, k)), (x > k) if is_max else (x < k)


def _leaky_bwd(is_max, slope, active, g):
    return g * jnp.where(active, 1.0, slope).astype(g.dtype), jnp.where(active, 0.0, g).astype(g.dtype)


_leaky.defvjp(_leaky_fwd, _leaky_bwd)
