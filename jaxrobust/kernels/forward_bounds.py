"""Forward-mode linear bounds: every value of the network as affine bounds in the input box.

The input box ``[lo, hi]`` is written ``x = mid + rad ⊙ t`` with ``t ∈ [-1, 1]^n`` (``n`` input
coordinates). Each var ``v`` of the network's graph carries two affine functions of ``t``, a centre
``C(t) = ca·t + cb`` and a half-width ``D(t) = da·t + db``, with ``C − D <= v <= C + D`` everywhere on
the box. Affine layers map ``C`` through ``W`` and ``D`` through ``|W|`` (the midpoint-radius rule of
IBP applied to functions instead of numbers); ReLU-like, sigmoid and tanh units and max-pooling use the
linear relaxations of CROWN (`_relax`) on the interval of their input; other units fall back to their
interval. Intervals are the concretized affine bounds intersected with IBP's, and, for layers small
enough (`BACKWARD_FLOATS`), with CROWN's back-substitution. The output bounds are the best of the
forward affine bounds and one backward (CROWN) pass from the output or spec rows over these intervals.

Forward mode costs ``n`` forward passes instead of a backward pass per intermediate neuron, so it is the
bound of choice for networks with few inputs, such as a classifier composed with a generator over a
10-dimensional latent box, whose image-sized layers backward CROWN cannot afford.

    forward_linear(fn, lo, hi, spec=None) -> Bounds   # (B, *out) or (B, K), like `bounds.crown`

Bounds are sound up to float32 round-off, covered by the same margin as the other methods (`widen`).
Compiled programs are shared by networks of one architecture, as in `bounds`.
"""
from __future__ import annotations

import functools
import math
import weakref
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from ..errors import InputError
from . import _relax
from ._graph import Graph, Node
from ._walk import (
    _backward,
    _bind,
    _bounded_vars,
    _crown_var,
    _ibp_node,
    _identity_prefix,
    _Iv,
    _kinks,
    _linear_prefix,
    _pwl_consts,
    _refine_var,
)
from .bounds import Bounds, _box_ok, _check_box, _checked, _chunked, _program, full_precision, spec_interval, widen


class _Affine(NamedTuple):
    """Affine bounds ``C − D <= v <= C + D`` of one var of shape ``s`` (batch-1 shape), ``t ∈ [-1, 1]^n``:
    ``ca, da: (n, *s)``, ``cb, db: s``."""
    ca: jax.Array
    cb: jax.Array
    da: jax.Array
    db: jax.Array

    def interval(self) -> _Iv:
        """Concretize over the box: ``C(t) ± D(t)`` at their extreme ``t``."""
        lo = self.cb - self.db - jnp.abs(self.ca - self.da).sum(0)
        hi = self.cb + self.db + jnp.abs(self.ca + self.da).sum(0)
        return _Iv(lo=lo, hi=hi)

    @staticmethod
    def constant(iv: _Iv, n: int) -> _Affine:
        zero = jnp.zeros((n,) + iv.mid.shape, iv.mid.dtype)
        return _Affine(zero, iv.mid, zero, iv.rad)


def forward_linear(fn: Callable, lo, hi, spec=None, *, sound_margin: bool = True) -> Bounds:
    """Forward-mode linear bounds of ``fn`` (or of ``spec @ fn(x)``) over the boxes ``[lo, hi]: (B, *in)``.

    ``spec: (B, K, C)`` with ``C = prod(out)`` gives bounds ``(B, K)``; None gives ``(B, *out)``. The
    result is intersected with the interval bounds, so it is never looser than IBP.
    """
    lo, hi = _check_box(fn, lo, hi)
    prog = _program(fn, lo.shape[1:], lo.dtype)
    if spec is not None:
        spec = jnp.asarray(spec, lo.dtype)
        n_out = math.prod(prog.graph.shape(prog.graph.output))
        if spec.ndim != 3 or spec.shape[0] != lo.shape[0] or spec.shape[2] != n_out:
            raise InputError(f"spec must have shape (B, K, {n_out}) with B={lo.shape[0]}, got {spec.shape}")
    return _checked(*_jitted(prog)(prog.consts, lo, hi, spec, sound_margin))


def _jitted(prog):
    """The jitted forward-mode program of ``prog``: one per architecture (`bounds._Arch`), else per graph."""
    if prog.arch is not None:
        return _compiled(prog.arch)
    if prog not in _PER_GRAPH:
        _PER_GRAPH[prog] = _make(prog.graph)
    return _PER_GRAPH[prog]


def _make(g: Graph):
    return full_precision(jax.jit(functools.partial(_batch, g), static_argnums=(4,)))


@functools.lru_cache(maxsize=64)
def _compiled(arch):
    return _make(arch.graph)


# Largest coefficient tensor (floats) of a backward pass for an intermediate var's bounds (64 MiB).
BACKWARD_FLOATS = 1 << 24
# Floats of working memory per chunk of examples processed together (512 MiB).
CHUNK_FLOATS = 1 << 27
_PER_GRAPH: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _batch(g: Graph, consts, lo, hi, spec, margin):
    out_shape = g.shape(g.output)[1:]
    n_out = math.prod(out_shape)

    prefixes = _small_prefixes(g, consts, lo.dtype)

    def one(l, h, s):
        forms, ivs = _propagate(g, consts, l[None], h[None], prefixes)
        return _spec_bounds(g, consts, forms, ivs, jnp.eye(n_out, dtype=l.dtype) if s is None else s)

    chunk = min(lo.shape[0], max(1, CHUNK_FLOATS // _floats_per_example(g, lo.shape, prefixes)))
    lower, upper = _chunked(one, (lo, hi, spec), chunk)
    if spec is None:
        lower, upper = lower.reshape((-1,) + out_shape), upper.reshape((-1,) + out_shape)
    b = Bounds(lower, upper)
    return (widen(b) if margin else b), _box_ok(lo, hi)


def _spec_bounds(g: Graph, consts, forms, ivs, spec):
    """Bounds ``(K,), (K,)`` of ``spec @ out`` (``spec: (K, C)``): the best of the forward affine bounds,
    a backward (CROWN) pass from the spec rows over the forward intervals, and the output interval."""
    form, out = forms[g.output], ivs[g.output]
    n, k = form.ca.shape[0], spec.shape[0]
    s_abs = jnp.abs(spec)
    fwd = _Affine(form.ca.reshape(n, -1) @ spec.T, spec @ form.cb.reshape(-1), form.da.reshape(n, -1) @ s_abs.T,
                  s_abs @ form.db.reshape(-1)).interval()
    rows = jnp.concatenate([spec, -spec]).reshape((2 * k,) + g.shape(g.output))
    back = _backward(g, consts, ivs, _linear_prefix(g, consts, g.output, rows))
    box = spec_interval(spec[None], out.lo.reshape(1, -1), out.hi.reshape(1, -1))
    lower = jnp.maximum(jnp.maximum(fwd.lo, back[:k]), box.lower[0])
    upper = jnp.minimum(jnp.minimum(fwd.hi, -back[k:]), box.upper[0])
    return lower, upper


def _floats_per_example(g: Graph, in_shape, prefixes) -> int:
    """Rough working set of one example: the affine forms of every var and the largest backward pass."""
    n = math.prod(in_shape[1:])
    forms = 4 * (n + 1) * sum(math.prod(s) for s in g.shapes.values())
    widest = max(math.prod(s) for s in g.shapes.values())
    rows = max([2 * math.prod(g.shape(v)) for v in prefixes] + [1])
    return forms + 2 * rows * widest


def _small_prefixes(g: Graph, consts, dtype) -> dict:
    """Backward-pass prefixes (`_walk._identity_prefix`) of the relaxed vars whose CROWN bounds fit in
    `BACKWARD_FLOATS`: ``2 · size(v) · (widest var before v)`` coefficients."""
    widest, out = 0, {}
    for node in g.nodes:
        widest = max([widest] + [math.prod(g.shape(v)) for v in node.outs])
        for v in node.outs:
            size = math.prod(g.shape(v))
            if v in _bounded_vars(g) and 2 * size * widest <= BACKWARD_FLOATS:
                out[v] = _identity_prefix(g, consts, v, dtype)
    return out


def _propagate(g: Graph, consts, lo, hi, prefixes) -> tuple[dict, dict]:
    """Affine bounds ``{var: _Affine}`` and intervals ``{var: _Iv}`` of every var for one box
    ``lo, hi: (1, *in)``; the vars in ``prefixes`` (see `_small_prefixes`) are tightened by CROWN, those feeding
    a kink only at the units their forward bounds leave unstable (`_walk._refine_var`)."""
    mid, rad = 0.5 * (lo + hi), 0.5 * (hi - lo)
    n = math.prod(lo.shape)
    ca = (jnp.eye(n, dtype=lo.dtype) * rad.reshape(-1)).reshape((n,) + lo.shape)
    forms = {g.input: _Affine(ca, mid, jnp.zeros_like(ca), jnp.zeros_like(mid))}
    ivs = {g.input: _Iv(lo=lo, hi=hi)}
    kinks = _kinks(g)
    for node in g.nodes:
        ins = node.bounded()
        outs = _node(g, node, consts, [forms[v] for v in ins], [ivs[v] for v in ins], n)
        for v, form, box in zip(node.outs, outs, _ibp_node(node, consts, [ivs[v] for v in ins])):
            tight = form.interval()
            lo_v, hi_v = jnp.maximum(tight.lo, box.lo), jnp.minimum(tight.hi, box.hi)
            if v in prefixes and v in kinks:
                iv = _Iv(lo=lo_v, hi=hi_v)
                tight, _ = _refine_var(g, consts, {**ivs, v: iv}, iv, v, prefixes[v], kinks[v])
                lo_v, hi_v = tight.lo, tight.hi
            elif v in prefixes:
                cl, cu = _crown_var(g, consts, {**ivs, v: _Iv(lo=lo_v, hi=hi_v)}, v, prefixes[v])
                lo_v, hi_v = jnp.maximum(lo_v, cl), jnp.minimum(hi_v, cu)
            ivs[v] = _Iv(lo=lo_v, hi=hi_v)
            forms[v] = form
    return forms, ivs


def _node(g: Graph, node: Node, consts, forms: list[_Affine], ivs: list[_Iv], n: int) -> list[_Affine]:
    """Affine bounds of the outputs of one node from those of its bounded operands."""
    if node.kind == "linear":
        return _linear(node, consts, forms)
    if node.kind in ("pwl", "sshape"):
        iv = ivs[0]
        if node.kind == "pwl":
            a_l, b_l, a_u, b_u = _relax.pwl(*_pwl_consts(node, consts), iv.lo, iv.hi)
        else:
            a_l, b_l, a_u, b_u = _relax.sshape(node.extra["fn"], iv.lo, iv.hi)
        return [_relaxed(forms[0], a_l, b_l, a_u, b_u)]
    if node.kind == "maxpool":
        return [_maxpool(node, forms[0], ivs[0], n, g.shape(node.outs[0]))]
    return [_Affine.constant(box, n) for box in _ibp_node(node, consts, ivs)]


def _linear(node: Node, consts, forms: list[_Affine]) -> list[_Affine]:
    """``C`` through the linear map, ``D`` through its absolute value; constant offsets go to ``cb``."""
    name = node.prim.name
    rows = lambda f, parts: jax.vmap(lambda *xs: f(list(xs)))(*parts)
    centre = lambda xs: _bind(node, consts, xs)
    if name == "neg":
        width = lambda xs: xs
    else:
        width = lambda xs: _bind(node, consts, xs, absolute=True, prim=lax.add_p if name == "sub" else None)
    ca = rows(centre, [f.ca for f in forms])
    da = rows(width, [f.da for f in forms])
    cb, db = centre([f.cb for f in forms]), width([f.db for f in forms])
    offsets = node.extra.get("offset", [None] * len(cb))
    return [_Affine(a, b if o is None else b + consts[o], d, e)
            for a, b, d, e, o in zip(ca, cb, da, db, offsets)]


def _maxpool(node: Node, x: _Affine, iv: _Iv, n: int, shape) -> _Affine:
    """Max over pooling windows (``node.extra["idx"]``: ``(out, W)`` flat input indices, ``n_in`` = padding):
    ``max >= sel_l · L`` and ``max <= sel_u · U + c_u`` (`_relax.window_max`)."""
    idx = node.extra["idx"]
    pad = jnp.full((1,), -jnp.inf, iv.lo.dtype)
    window = lambda a: jnp.concatenate([a.reshape(-1), pad])[idx]
    sel_l, sel_u, c_u = _relax.window_max(window(iv.lo), window(iv.hi))
    gather = lambda a: jnp.concatenate([a.reshape(n, -1), jnp.zeros((n, 1), a.dtype)], 1)[:, idx]
    bias = lambda a: jnp.concatenate([a.reshape(-1), jnp.zeros((1,), a.dtype)])[idx]
    low_a, low_b = (sel_l * gather(x.ca - x.da)).sum(-1), (sel_l * bias(x.cb - x.db)).sum(-1)
    up_a, up_b = (sel_u * gather(x.ca + x.da)).sum(-1), (sel_u * bias(x.cb + x.db)).sum(-1) + c_u
    return _from_bounds(low_a.reshape((n,) + shape), low_b.reshape(shape), up_a.reshape((n,) + shape),
                        up_b.reshape(shape))


def _relaxed(x: _Affine, a_l, b_l, a_u, b_u) -> _Affine:
    """Affine bounds of ``y`` given ``a_l x + b_l <= y <= a_u x + b_u`` and those of ``x``."""
    low_a, low_b = a_l * x.ca - jnp.abs(a_l) * x.da, a_l * x.cb - jnp.abs(a_l) * x.db + b_l
    up_a, up_b = a_u * x.ca + jnp.abs(a_u) * x.da, a_u * x.cb + jnp.abs(a_u) * x.db + b_u
    return _from_bounds(low_a, low_b, up_a, up_b)


def _from_bounds(low_a, low_b, up_a, up_b) -> _Affine:
    """Centre and half-width of the affine lower bound ``low_a·t + low_b`` and upper bound ``up_a·t + up_b``."""
    return _Affine(0.5 * (low_a + up_a), 0.5 * (low_b + up_b), 0.5 * (up_a - low_a), 0.5 * (up_b - low_b))
