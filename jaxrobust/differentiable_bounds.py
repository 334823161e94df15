"""Output bounds that are differentiable in the network parameters, for certified training.

``interval_bounds(apply, params, lo, hi)`` (IBP) and ``spec_lower_bounds(apply, params, lo, hi, spec, beta=...)``
(IBP, CROWN-IBP or their mix) take the same ``apply(params, x: (B, *in)) -> (B, C)`` as an optax loop, and
``jax.grad`` flows through them to ``params``.

Why not `kernels.bounds`: its graph builder folds and inspects the network's constants while it builds a
graph (it converts them with ``np.asarray``, e.g. to drop zero offsets), so it cannot take parameters traced by
``jax.grad`` or ``jax.jit``. Here the jaxpr of ``apply`` is traced with the parameters as *inputs* and
interpreted with whatever values they hold (tracers included), with the op classes of `kernels._graph`:

* forward (IBP, Gowal et al. 2018): each input-dependent value is an interval ``(center, radius)``; affine
  ops map the center and take ``|W|`` of the radius, monotone ops map both ends;
* backward (CROWN-IBP, Zhang et al. 2020): linear bounds of the spec rows are back-substituted through the
  recorded affine ops (their transposes), the IBP bounds relaxing every ``max/min(x, k)`` with the engine's
  rule (`kernels._relax.pwl`: upper chord, lower slope 0 or 1, whichever leaves the smaller area); any other
  nonlinear op is replaced by its interval. Without relaxations the same pass folds the spec into the affine
  ops after the last nonlinearity (Gowal et al.'s elision of the last layer) and gives the IBP margins.

No round-off margin is added: these bounds train networks; certify them with `kernels.bounds`.
"""
from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.extend import core as jcore

from .errors import UnsupportedOpError
from .kernels import _relax
from .kernels._graph import ADDITIVE, ALIAS, CALLS, MONOTONE, MULTIPLICATIVE, STRUCTURAL, _sub_jaxpr
from .kernels.bounds import Bounds


class _Iv(NamedTuple):
    """An input-dependent value in ``[c - r, c + r]``; ``id`` names it on the tape."""
    c: jax.Array
    r: jax.Array
    id: int


class _Linear(NamedTuple):
    """``outs = fn(*ins) + offsets`` (None: no offsets), ``fn`` linear in the intervals ``ins``."""
    ins: tuple
    outs: tuple
    in_avals: tuple
    out_shapes: tuple
    fn: Callable
    offsets: list | None


class _Kink(NamedTuple):
    """``out = k + s * relu(s * (x - k))``: ``max(x, k)`` (s = 1) or ``min(x, k)`` (s = -1), ``x in [lo, hi]``."""
    x: int
    out: int
    k: jax.Array
    s: float
    lo: jax.Array
    hi: jax.Array


class _Box(NamedTuple):
    """Outputs known only by their intervals ``[lo, hi]`` (any other nonlinear op)."""
    outs: tuple
    lo: list
    hi: list


@partial(jax.jit, static_argnames="apply")
def interval_bounds(apply: Callable, params, lo, hi) -> Bounds:
    """IBP bounds ``(B, C)`` of ``apply(params, x)`` over the boxes ``[lo, hi]: (B, *in)``."""
    out, _ = _forward(apply, params, lo, hi)
    return Bounds(out.c - out.r, out.c + out.r)


def spec_lower_bounds(apply: Callable, params, lo, hi, spec, *, beta=0.0) -> jax.Array:
    """Lower bounds ``(B, K)`` of ``spec[b] @ apply(params, x)[b]`` over ``[lo, hi]: (B, *in)``, ``spec: (B, K, C)``.

    ``beta * CROWN-IBP + (1 - beta) * IBP``, as Zhang et al. mix them. The CROWN pass (a training step of
    ERAN's convSmall cost ~40x that of IBP on 2 CPU cores) is skipped only for a Python ``beta == 0``; a traced
    ``beta`` runs both passes (a ``lax.cond`` between them cost more under ``jax.grad`` than it saved).
    """
    if isinstance(beta, (int, float)) and beta == 0:
        return _margins(apply, params, lo, hi, spec, False)[0]
    ibp, crown = _margins(apply, params, lo, hi, spec, True)
    return beta * crown + (1 - beta) * ibp


@partial(jax.jit, static_argnames=("apply", "relax"))
def _margins(apply, params, lo, hi, spec, relax: bool):
    """IBP margins and, when ``relax``, CROWN-IBP margins (else None), both ``(B, K)``."""
    out, tape = _forward(apply, params, lo, hi)
    spec = jnp.asarray(spec, out.c.dtype)
    return _backward(tape, out, spec, relax=False), _backward(tape, out, spec, relax=True) if relax else None


# ---------------------------------------------------------------------------------------------
# Forward interval pass, recording a tape for the backward pass
# ---------------------------------------------------------------------------------------------
def _forward(apply, params, lo, hi):
    lo, hi = jnp.asarray(lo, jnp.float32), jnp.asarray(hi, jnp.float32)
    abstract = jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(jnp.shape(a), jnp.result_type(a)), params)
    closed = jax.make_jaxpr(apply)(abstract, jax.ShapeDtypeStruct(lo.shape, lo.dtype))
    tape = _Tape(lo, hi)
    (out,) = tape.run(closed.jaxpr, closed.consts, [*jax.tree_util.tree_leaves(params), tape.input])
    if not isinstance(out, _Iv):
        raise UnsupportedOpError("the network output does not depend on its input")
    return out, tape


class _Tape:
    """The interpreter: intervals of the input-dependent values, and the entries the backward pass needs."""

    def __init__(self, lo, hi):
        self.entries = []
        self.count = 0
        self.input = self.interval((lo + hi) / 2, (hi - lo) / 2)

    def interval(self, c, r) -> _Iv:
        self.count += 1
        return _Iv(c, r, self.count - 1)

    def run(self, jaxpr, consts, args):
        env = dict(zip(jaxpr.constvars, consts)) | dict(zip(jaxpr.invars, args))

        def read(a):
            return jnp.asarray(a.val, a.aval.dtype) if isinstance(a, jcore.Literal) else env[a]

        for eqn in jaxpr.eqns:
            ins = [read(a) for a in eqn.invars]
            env.update(zip(eqn.outvars, self.equation(eqn, ins)))
        return [read(a) for a in jaxpr.outvars]

    def equation(self, eqn, ins) -> list:
        name = eqn.primitive.name
        if name in CALLS:
            return self.run(*_sub_jaxpr(eqn), ins)
        if not any(isinstance(v, _Iv) for v in ins):
            return _bind(eqn, ins)
        if name in ALIAS:
            return list(ins)
        if name in MULTIPLICATIVE or name in STRUCTURAL:
            return self.linear(eqn, ins)
        if name in MONOTONE:
            return self.monotone(eqn, ins)
        raise UnsupportedOpError(f"certified training cannot bound the primitive '{name}' on input-dependent values")

    def linear(self, eqn, ins) -> list:
        name = eqn.primitive.name
        pos = [i for i, v in enumerate(ins) if isinstance(v, _Iv)]
        add = ADDITIVE.get(name, ())
        additive = [i for i in range(len(ins)) if i not in pos and (
            add == "all" or (add == "rest" and i >= 1) or (isinstance(add, tuple) and i in add))]
        if name in MULTIPLICATIVE and (len(pos) != 1 or (name == "div" and pos != [0])):
            raise UnsupportedOpError(f"certified training cannot bound '{name}' of two input-dependent values")
        fixed = [jnp.zeros_like(v) if i in additive else v for i, v in enumerate(ins)]

        def fn(*xs):  # the linear part: the op with its additive constants zeroed
            args = list(fixed)
            for i, x in zip(pos, xs):
                args[i] = x
            return _bind(eqn, args)

        centers = _bind(eqn, [v.c if isinstance(v, _Iv) else v for v in ins])
        if name in MULTIPLICATIVE:
            radii = _bind(eqn, [v.r if isinstance(v, _Iv) else jnp.abs(v) for v in ins])
        elif name in ("neg", "sub"):
            radii = [jnp.broadcast_to(sum(ins[i].r for i in pos), centers[0].shape)]
        else:  # structural ops and sums: nonnegative coefficients
            radii = fn(*[ins[i].r for i in pos])
        offsets = _bind(eqn, [jnp.zeros_like(v.c) if isinstance(v, _Iv) else v for v in ins]) if additive else None
        outs = [self.interval(c, r) for c, r in zip(centers, radii)]
        avals = tuple(jax.ShapeDtypeStruct(ins[i].c.shape, ins[i].c.dtype) for i in pos)
        self.entries.append(_Linear(tuple(ins[i].id for i in pos), tuple(o.id for o in outs), avals,
                                    tuple(c.shape for c in centers), fn, offsets))
        return outs

    def monotone(self, eqn, ins) -> list:
        los = _bind(eqn, [v.c - v.r if isinstance(v, _Iv) else v for v in ins])
        his = _bind(eqn, [v.c + v.r if isinstance(v, _Iv) else v for v in ins])
        outs = [self.interval((a + b) / 2, (b - a) / 2) for a, b in zip(los, his)]
        pos = [i for i, v in enumerate(ins) if isinstance(v, _Iv)]
        if eqn.primitive.name in ("max", "min") and len(pos) == 1:
            x, k = ins[pos[0]], jnp.broadcast_to(ins[1 - pos[0]], outs[0].c.shape)
            s = 1.0 if eqn.primitive.name == "max" else -1.0
            self.entries.append(_Kink(x.id, outs[0].id, k, s, x.c - x.r, x.c + x.r))
        else:
            self.entries.append(_Box(tuple(o.id for o in outs), los, his))
        return outs


def _bind(eqn, args) -> list:
    out = eqn.primitive.bind(*args, **eqn.params)
    return list(out) if eqn.primitive.multiple_results else [out]


# ---------------------------------------------------------------------------------------------
# Backward pass: linear lower bounds of the spec rows, coefficients (K, B, *shape) per interval
# ---------------------------------------------------------------------------------------------
def _backward(tape: _Tape, out: _Iv, spec, relax: bool) -> jax.Array:
    coef = {out.id: jnp.moveaxis(spec, 1, 0).reshape((spec.shape[1],) + out.c.shape)}
    bias = jnp.zeros(spec.shape[1::-1], spec.dtype)           # (K, B)

    def dot(a, b):  # (K, B, ...) . (B, ...) -> (K, B)
        return jnp.sum(a * b, axis=tuple(range(2, a.ndim)))

    def accumulate(i, a):
        coef[i] = coef[i] + a if i in coef else a

    for e in reversed(tape.entries):
        if isinstance(e, _Linear):
            if not any(o in coef for o in e.outs):
                continue
            a = [coef.pop(o) if o in coef else jnp.zeros(bias.shape[:1] + s, bias.dtype)
                 for o, s in zip(e.outs, e.out_shapes)]
            if e.offsets is not None:
                bias = bias + sum(dot(ai, off) for ai, off in zip(a, e.offsets))
            transpose = jax.linear_transpose(e.fn, *e.in_avals)
            for i, ct in zip(e.ins, jax.vmap(lambda *c: transpose(list(c)))(*a)):
                accumulate(i, ct)
        elif isinstance(e, _Kink):
            if e.out not in coef:
                continue
            a = coef.pop(e.out)
            if not relax:
                lo, hi = (e.k + e.s * jax.nn.relu(e.s * (v - e.k)) for v in (e.lo, e.hi))   # monotone in x
                bias = bias + dot(jnp.maximum(a, 0), lo) + dot(jnp.minimum(a, 0), hi)
                continue
            an, ap = (0.0, 1.0) if e.s > 0 else (1.0, 0.0)        # max(x, k) = k + relu(x - k), min likewise
            a_l, b_l, a_u, b_u = _relax.pwl(e.k, e.k, an, ap, e.lo, e.hi)    # the engine's relaxation
            pos, neg = jnp.maximum(a, 0), jnp.minimum(a, 0)
            bias = bias + dot(pos, b_l) + dot(neg, b_u)
            accumulate(e.x, pos * a_l + neg * a_u)
        else:
            for o, lo, hi in zip(e.outs, e.lo, e.hi):
                if o in coef:
                    a = coef.pop(o)
                    bias = bias + dot(jnp.maximum(a, 0), lo) + dot(jnp.minimum(a, 0), hi)
    x = tape.input
    if x.id in coef:
        a = coef[x.id]
        bias = bias + dot(a, x.c) - dot(jnp.abs(a), x.r)
    return bias.T
