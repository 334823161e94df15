"""The two walkers of the bound engine over a traced `_graph.Graph`, and the interval and linear rules they apply.

* forward (`_forward`): interval bounds of every var, node by node (`_ibp_node`, the interval rule of each op kind),
  intersected with CROWN bounds where asked (`_refine_var`);
* backward (`_backward_pass`): CROWN back-substitution of coefficient rows ``(R, *shape)`` from a var to the input
  box, through linear nodes by their transpose (`_transpose`) and nonlinear ones by the relaxations of `_relax`
  (ReLU-like, sigmoid / tanh, max, max-pool), or by concretising their interval bounds.

IBP, CROWN and α-CROWN (`bounds`), forward bounds (`forward_bounds`), branch and bound (`bab`) and the MILP's
bounds all run on these two walkers. Shapes: one example at a time, batch dimension 1 (``vmap`` adds examples).
"""
from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from . import _conv, _relax
from ._graph import Graph, Node
from .norms import dual_norm

# Intermediate CROWN bounds are computed only for the units whose interval bounds straddle a kink, in
# blocks of at least 1/BLOCKS of the layer, as many as the example with most such units in a chunk needs
# (chunks of examples sorted by their fraction of unstable units under plain interval bounds). A block
# also holds at least BLOCK_FLOATS coefficients over the chunk, so that small chunks (batch 1) of
# networks with cheap rows do not pay the loop overhead many times for little work. Each iteration
# costs a few dozen small kernel launches besides its arithmetic, so the units are first taken
# COARSE blocks at a time while whole coarse blocks are needed (no padding), the rest in fine blocks:
# on mnist_relu_6_100, whose units are nearly all unstable, CROWN ran 1.5-2x faster (bench_bounds.py).
# No block holds more than BLOCK_MAX_FLOATS coefficients (a CNN's conv layers: tens of thousands of units
# by tens of thousands of upstream values).
BLOCKS = 32
BLOCK_FLOATS = 2 ** 16
BLOCK_MAX_FLOATS = 2 ** 25
COARSE = 8
_EXAMPLES = "examples"  # vmap axis of the examples in a chunk
PREFIX_ROWS = 1024      # identity rows per step of `_identity_prefix`


def _bounded_vars(g: Graph, ball: bool = False) -> set:
    """The vars that get CROWN bounds: those that need bounds, less those whose interval bounds are exact
    (with a ``ball``, the box hull's interval bounds are not: only the input itself is left out) and the
    outputs of monotone units (`Graph.images`)."""
    return g.needs_bounds - g.images - ({g.input} if ball else g.exact)


def _kinks(g: Graph, ball: bool = False):
    """``{var: const index of k}`` for the vars that need CROWN bounds and feed kinks at one ``k``."""
    out = {}
    for n in g.nodes:
        if n.kind == "pwl":
            v = n.bounded()[0]
            out[v] = n.extra["k"] if out.get(v, n.extra["k"]) == n.extra["k"] else None
    return {v: k for v, k in out.items() if k is not None and v in _bounded_vars(g, ball)}


class _Iv:
    """An interval held as ``(lo, hi)`` and/or ``(mid, rad)``; the other form is derived on demand. The input's may
    also hold ``ball = (center, eps, norm)``: the set is then the box ∩ that Lp ball (`norms`), over which the
    backward pass concretises with both the box and the dual norm."""

    def __init__(self, lo=None, hi=None, mid=None, rad=None, ball=None):
        self._lo, self._hi, self._mid, self._rad = lo, hi, mid, rad
        self.ball = ball

    @property
    def lo(self):
        if self._lo is None:
            self._lo = self._mid - self._rad
        return self._lo

    @property
    def hi(self):
        if self._hi is None:
            self._hi = self._mid + self._rad
        return self._hi

    @property
    def mid(self):
        if self._mid is None:
            self._mid = 0.5 * (self._lo + self._hi)
        return self._mid

    @property
    def rad(self):
        if self._rad is None:
            self._rad = jnp.maximum(self._hi - self.mid, self.mid - self._lo)
        return self._rad


def _bind(node: Node, consts, xs, *, prim=None, absolute=False):
    """Evaluate ``node``'s primitive with ``xs`` at its bounded operands; list of outputs. Zero operands and
    products take the bounded operands' dtype where it is wider (float64 where an exact leaf runs the float32
    graph in float64)."""
    xs = list(xs)
    dtype = jnp.result_type(*xs) if xs else None
    xs = iter(xs)
    absmap = node.extra.get("abs", {}) if absolute else {}
    args = []
    for i, r in enumerate(node.ins):
        if r[0] == "b":
            args.append(next(xs))
        elif r[0] == "c":
            args.append(consts[absmap.get(i, r[1])])
        else:
            args.append(jnp.zeros(r[1], r[2] if dtype is None else jnp.promote_types(r[2], dtype)))
    prim = prim or node.prim
    params = node.params
    if dtype is not None and params.get("preferred_element_type") is not None:
        params = dict(params, preferred_element_type=jnp.promote_types(params["preferred_element_type"], dtype))
    out = prim.bind(*args, **params)
    return list(out) if prim.multiple_results else [out]


def _pwl_consts(node, consts):
    return [consts[node.extra[k]] for k in ("k", "v", "an", "ap")]


def _ibp_node(node: Node, consts, ivs):
    """Interval rule of one node: list of output intervals."""
    kind = node.kind
    if kind == "linear":
        name = node.prim.name
        centers = _bind(node, consts, [iv.mid for iv in ivs])
        if name == "neg":
            radii = [ivs[0].rad]
        else:
            radii = _bind(node, consts, [iv.rad for iv in ivs], absolute=True,
                          prim=lax.add_p if name == "sub" else None)
        offsets = node.extra.get("offset", [None] * len(centers))
        return [_Iv(mid=c if o is None else c + consts[o], rad=r) for c, r, o in zip(centers, radii, offsets)]
    if kind == "pwl":
        k, v, an, ap = _pwl_consts(node, consts)
        l, u = ivs[0].lo, ivs[0].hi
        y = lambda x: v + jnp.where(x >= k, ap * (x - k), an * (x - k))
        cand = [y(l), y(u), y(jnp.clip(k, l, u))]
        return [_Iv(lo=functools.reduce(jnp.minimum, cand), hi=functools.reduce(jnp.maximum, cand))]
    if kind in ("monotone", "sshape", "maxpool", "max2"):
        return [_Iv(lo=a, hi=b) for a, b in zip(_bind(node, consts, [iv.lo for iv in ivs]),
                                               _bind(node, consts, [iv.hi for iv in ivs]))]
    if kind in ("abs", "pow"):
        l, u = ivs[0].lo, ivs[0].hi
        y = node.extra.get("y", 1)
        if kind == "pow" and y % 2 == 1:
            return [_Iv(lo=l ** y, hi=u ** y)]
        alo = jnp.where(l >= 0, l, jnp.where(u <= 0, -u, 0.0))
        ahi = jnp.maximum(-l, u)
        return [_Iv(lo=alo ** y, hi=ahi ** y)]
    if kind == "mul2":
        (a, b) = ivs
        prods = [x * y for x in (a.lo, a.hi) for y in (b.lo, b.hi)]
        return [_Iv(lo=functools.reduce(jnp.minimum, prods), hi=functools.reduce(jnp.maximum, prods))]
    if kind == "constant":
        c = consts[node.ins[0][1]]
        return [_Iv(lo=c, hi=c)]
    raise AssertionError(kind)


def _forward(g: Graph, consts, lo, hi, prefixes=None, ball=None):
    """Bounds of every var for one example (``lo, hi: (1, *in)``; ``ball``: None or ``(center (1, *in), eps,
    norm)``, the input set is then the box ∩ the ball), with CROWN bounds for the vars in ``prefixes`` (see
    `_identity_prefixes`). Returns ``(ivs, rel)``: ``ivs`` the tightest bounds (interval and CROWN
    intersected), propagated forward; ``rel`` the bounds the relaxations use (see `_refine_var`)."""
    ivs = {g.input: _Iv(lo=lo, hi=hi, ball=ball)}
    rel = dict(ivs)
    kinks = _kinks(g, ball is not None) if prefixes else {}
    for node in g.nodes:
        for v, iv in zip(node.outs, _ibp_node(node, consts, [ivs[b] for b in node.bounded()])):
            ivs[v] = rel[v] = iv
            if prefixes and v in prefixes:
                ivs[v], rel[v] = _refine_var(g, consts, rel, iv, v, prefixes[v], kinks.get(v))
    return ivs, rel


def _identity_prefixes(g: Graph, consts, dtype, ball: bool = False):
    """Backward-pass prefixes ``{var: (acc, bias)}`` (see `_linear_prefix`) from the identity on each var
    that needs CROWN bounds (`_bounded_vars`); they depend on the weights only, so they are shared by every
    example. Where the pass meets a nonlinear node at once (the var is a ReLU's output, say) the prefix is
    the identity itself, kept as ``(None, None)`` and built a block of rows at a time by `_refine_var`."""
    return {v: _identity_prefix(g, consts, v, dtype)[:2] if _prefix_end(g, v) < g.producer_index(v)
            else (None, None) for v in _bounded_vars(g, ball)}


def _identity_prefix(g: Graph, consts, v, dtype):
    """`_linear_prefix` from the rows ``[I; -I]`` on var ``v``: the start of a backward pass that gives
    lower bounds of every unit of ``v`` (first half) and of their negatives (second half). The identity is
    propagated `PREFIX_ROWS` rows at a time (a dense ``I`` over a conv layer's units would take gigabytes);
    the prefix is linear in its rows, so the ``-I`` half is the negated ``I`` half."""
    shape = g.shape(v)
    n = math.prod(shape)
    m = min(n, PREFIX_ROWS)
    count = -(-n // m)

    def rows(start):  # the last step's rows past n (of -I) are cut off below
        acc, bias, _ = _linear_prefix(g, consts, v, _identity_rows(start + jnp.arange(m), shape, dtype))
        return acc, bias

    def both(t):  # (count, m, ...) -> [rows of I; rows of -I]
        half = t.reshape((count * m,) + t.shape[2:])[:n]
        return jnp.concatenate([half, -half])

    acc, bias = lax.map(rows, jnp.arange(count) * m)
    return {u: both(t) for u, t in acc.items()}, both(bias), _prefix_end(g, v)


def _identity_rows(rows, shape, dtype):
    """Rows ``rows: (R,)`` of ``[I; -I]`` over a var of shape ``shape``: ``(R, *shape)``."""
    n = math.prod(shape)
    sign = jnp.where(rows < n, 1.0, -1.0).astype(dtype)[:, None]
    return (jax.nn.one_hot(rows % n, n, dtype=dtype) * sign).reshape(rows.shape + shape)


def _crown_var(g: Graph, consts, ivs, v, prefix):
    """CROWN bounds of the bounded var ``v`` (shape of ``v``) by back-substitution to the input."""
    shape = g.shape(v)
    n = math.prod(shape)
    res = _backward(g, consts, ivs, prefix)
    return res[:n].reshape(shape), -res[n:].reshape(shape)


def _refine_var(g: Graph, consts, rel, iv, v, prefix, kink):
    """Bounds of the bounded var ``v`` from its interval bounds ``iv`` and CROWN, its rows back-substituted
    a block of units at a time (see `BLOCKS`: a pooled conv layer's rows at once took gigabytes).

    Returns ``(tight, relax)``. For a var feeding a kink at ``consts[kink]``, only the units whose
    interval bounds straddle the kink get CROWN rows, unless the kink's output needs bounds too; ``relax``
    keeps the interval bounds of the stable units and the CROWN bounds of the others, as auto_LiRPA does,
    so that the adaptive slopes agree with it. ``tight`` is the intersection (for any other var, both are).
    """
    shape = g.shape(v)
    n = math.prod(shape)
    flo, fhi = iv.lo.reshape(-1), iv.hi.reshape(-1)
    stable = jnp.zeros((n,), bool)
    if kink is not None:
        k = jnp.broadcast_to(consts[kink], shape).reshape(-1)
        stable = (flo >= k) | (fhi <= k)
    # every unit when the kink's output needs bounds too (a ReLU before max-pooling, whose upper relaxation
    # takes the pool's largest upper bound, that of a stable unit as much as of any other)
    every = kink is None or any(node.kind == "pwl" and node.bounded()[0] == v and node.outs[0] in g.needs_bounds
                                for node in g.nodes)
    need = n if every else lax.pmax(jnp.sum(~stable), _EXAMPLES)

    # blocks of units, unstable first, until every example of the chunk has all its unstable units
    blk, big = _block_units(g, v, lax.axis_size(_EXAMPLES))
    order = jnp.argsort(stable)
    acc, bias, last = prefix

    def state(rows):  # the prefix's rows; an identity prefix's (None) made here
        if acc is None:
            return {v: _identity_rows(rows, shape, flo.dtype)}, jnp.zeros(rows.shape, flo.dtype), last
        return {u: t[rows] for u, t in acc.items()}, bias[rows], last

    def blocks(start, size, count, c):
        def block(j, c):
            sel = lax.dynamic_slice(order, (start + j * size,), (size,))
            res = _backward(g, consts, rel, state(jnp.concatenate([sel, sel + n])))
            return c[0].at[sel].set(res[:size]), c[1].at[sel].set(-res[size:])
        return lax.fori_loop(0, count, block, c)

    c, done = (flo, fhi), 0
    if big > blk:
        done = need // big * big
        c = blocks(0, big, need // big, c)
    cl, cu = blocks(done, blk, -(-(need - done) // blk), c)
    tight = _Iv(lo=jnp.maximum(flo, cl).reshape(shape), hi=jnp.minimum(fhi, cu).reshape(shape))
    if kink is None:
        return tight, tight
    return tight, _Iv(lo=jnp.where(stable, flo, cl).reshape(shape), hi=jnp.where(stable, fhi, cu).reshape(shape))


def _block_units(g: Graph, v, chunk: int) -> tuple[int, int]:
    """Units of ``v`` per fine and per coarse block of `_refine_var` for chunks of ``chunk`` examples (see
    `BLOCKS`); no block holds more than `BLOCK_MAX_FLOATS` coefficients over the chunk."""
    n = math.prod(g.shape(v))
    upstream = [g.input] + [u for node in g.nodes[:g.producer_index(v)] for u in node.outs]
    row = 2 * chunk * sum(math.prod(g.shape(u)) for u in upstream)
    cap = max(1, BLOCK_MAX_FLOATS // row)
    blk = min(n, cap, max(-(-n // BLOCKS), -(-BLOCK_FLOATS // row)))
    return blk, min(n, COARSE * blk, max(blk, cap))


def _sum_rows(t):
    return t.reshape(t.shape[0], -1).sum(axis=1)


def _prefix_end(g: Graph, start) -> int:
    """Index of the first nonlinear node that a backward pass from ``start`` reaches (-1: none)."""
    live = {start}
    idx = g.producer_index(start)
    while idx >= 0:
        node = g.nodes[idx]
        if live & set(node.outs):
            if node.kind != "linear":
                break
            live = (live - set(node.outs)) | set(node.bounded())
        idx -= 1
    return idx


def _linear_prefix(g: Graph, consts, start, lam):
    """Run the backward pass from ``start`` through linear nodes only, up to `_prefix_end`; these steps
    do not depend on the example, so they are shared by the batch.

    Returns the state ``(acc, bias, idx)`` that `_backward` resumes from.
    """
    R = lam.shape[0]
    acc, bias = {start: lam}, jnp.zeros((R,), lam.dtype)
    end = _prefix_end(g, start)
    for idx in range(g.producer_index(start), end, -1):
        node = g.nodes[idx]
        if any(o in acc for o in node.outs):
            bias = _linear_step(g, consts, node, acc, bias, R)
    return acc, bias, end


def _linear_step(g: Graph, consts, node, acc, bias, R):
    lams = [acc.pop(o, None) for o in node.outs]
    dtype = next(t for t in lams if t is not None).dtype
    lams = [jnp.zeros((R,) + g.shape(o), dtype) if t is None else t for t, o in zip(lams, node.outs)]
    for t, o in zip(lams, node.extra.get("offset", [])):
        if o is not None:
            bias = bias + t.reshape(R, -1) @ jnp.broadcast_to(consts[o], t.shape[1:]).reshape(-1)
    for v, ct in zip(node.bounded(), _transpose(g, node, consts, lams)):
        acc[v] = ct if v not in acc else acc[v] + ct
    return bias


class Backward(NamedTuple):
    """A backward pass over ``R`` rows: lower bounds ``bound (R,)``; ``mag (R,)`` the summed magnitude of the
    terms added into them (for the round-off margin); ``lam_x (R, *in)`` the input coefficients (None if the
    rows do not depend on the input); ``record`` ``{node index: (R, *out)}`` the coefficients reaching
    the output of every nonlinear node (only with ``record=True``)."""
    bound: jax.Array
    mag: jax.Array
    lam_x: jax.Array | None
    record: dict


def _backward(g: Graph, consts, ivs, state, theta=None):
    """Lower bounds ``(R,)`` of ``lam[r] . start`` over the input box (see `_backward_pass`)."""
    return _backward_pass(g, consts, ivs, state, theta).bound


def _backward_pass(g: Graph, consts, ivs, state, theta=None, extra=None, record=False) -> Backward:
    """Back-substitution resuming from ``state = _linear_prefix(g, consts, start, lam)`` (``lam: (R,
    *shape(start))``) to the input box ``ivs[g.input]``, relaxing nonlinear nodes on the bounds ``ivs``.

    ``theta``: optional ``{node index: slopes}``: ``(R, *shape)`` kink slopes of ReLU-like nodes, ``(t_l, t_u)``
    each ``(R, *shape)`` slope fractions of sigmoid / tanh nodes (`_relax.sshape`). ``extra``: optional
    ``{var: (coef (R, *shape), bias (R,))}`` linear terms added to the bounded function (Lagrangian terms
    of constraints that hold on the box, as branch and bound adds for its splits); each var must be
    the input of a nonlinear node or the input itself. Returns a `Backward`.
    """
    acc, bias, last = state
    acc = dict(acc)
    R = bias.shape[0]
    mag = jnp.abs(bias)
    rec = {}

    def add(v, t):
        acc[v] = t if v not in acc else acc[v] + t

    for v, (coef, b) in (extra or {}).items():
        add(v, coef)
        bias, mag = bias + b, mag + jnp.abs(b)
    for idx in range(last, -1, -1):
        node = g.nodes[idx]
        if not any(o in acc for o in node.outs):
            continue
        before = bias
        kind, ins = node.kind, node.bounded()
        if kind == "linear":
            bias = _linear_step(g, consts, node, acc, bias, R)
            mag = mag + jnp.abs(bias - before)
            continue
        lams = [acc.pop(o, None) for o in node.outs]
        t = lams[0] if len(lams) == 1 else None
        pos, neg = (jnp.maximum(t, 0), jnp.minimum(t, 0)) if t is not None else (None, None)
        if t is None:
            kind = "concretize"
        elif record:
            rec[idx] = t
        if kind in ("pwl", "sshape"):
            iv = ivs[ins[0]]
            if kind == "pwl":
                th = None if theta is None else theta.get(idx)
                a_l, b_l, a_u, b_u = _relax.pwl(*_pwl_consts(node, consts), iv.lo, iv.hi, th)
            else:
                th = None if theta is None else theta.get(idx)
                a_l, b_l, a_u, b_u = _relax.sshape(node.extra["fn"], iv.lo, iv.hi, th)
            add(ins[0], pos * a_l + neg * a_u)
            bias = bias + _sum_rows(pos * b_l + neg * b_u)
        elif kind == "max2":
            s = node.extra["sign"]
            (x, y), ps, ng = ins, jnp.maximum(s * t, 0), jnp.minimum(s * t, 0)
            bx, by = ivs[x], ivs[y]
            if s > 0:
                coefs = _relax.max2(bx.lo, bx.hi, by.lo, by.hi)
            else:
                coefs = _relax.max2(-bx.hi, -bx.lo, -by.hi, -by.lo)
            px_l, py_l, px_u, py_u, c_u = coefs
            add(x, s * (ps * px_l + ng * px_u))
            add(y, s * (ps * py_l + ng * py_u))
            bias = bias + _sum_rows(ng * c_u)
        elif kind == "maxpool":
            x = ins[0]
            idx_w = node.extra["idx"]
            n_in = math.prod(g.shape(x))
            sel_l, sel_u, c_u = _window_relaxation(node, ivs[x])
            lam_w = pos.reshape(R, -1, 1) * sel_l + neg.reshape(R, -1, 1) * sel_u
            bias = bias + (neg.reshape(R, -1) @ c_u)
            lam_x = jnp.zeros((R, n_in + 1), bias.dtype).at[:, idx_w].add(lam_w)
            add(x, lam_x[:, :n_in].reshape((R,) + g.shape(x)))
        else:
            for t, o in zip(lams, node.outs):
                if t is not None:
                    bias = bias + _sum_rows(jnp.maximum(t, 0) * ivs[o].lo + jnp.minimum(t, 0) * ivs[o].hi)
        mag = mag + jnp.abs(bias - before)
    lam_x = acc.get(g.input)
    if lam_x is None:
        return Backward(bias, mag, None, rec)
    x = ivs[g.input]
    flat = lam_x.reshape(R, -1)
    mid, rad = x.mid.reshape(-1), x.rad.reshape(-1)
    lin = flat @ mid - jnp.abs(flat) @ rad
    mag = mag + jnp.abs(flat) @ (jnp.abs(mid) + rad)
    if x.ball is not None:  # min of lam . x over the ball: lam . center - eps ||lam||_dual
        center, eps, norm = x.ball
        q = eps * dual_norm(flat, norm)
        lin = jnp.maximum(lin, flat @ center.reshape(-1) - q)
        mag = mag + jnp.abs(flat) @ jnp.abs(center.reshape(-1)) + q
    return Backward(bias + lin, mag, lam_x, rec)


def _window_relaxation(node: Node, iv):
    """`_relax.window_max` of a max-pool node on its input bounds ``iv``: ``(sel_l, sel_u, c_u)`` per window."""
    pad = jnp.full((1,), -jnp.inf, iv.lo.dtype)
    idx_w = node.extra["idx"]
    lw = jnp.concatenate([iv.lo.reshape(-1), pad])[idx_w]
    uw = jnp.concatenate([iv.hi.reshape(-1), pad])[idx_w]
    return _relax.window_max(lw, uw)


def _transpose(g: Graph, node: Node, consts, lams):
    """Coefficients on the bounded operands of a linear node, ``lams``: one ``(R, *out)`` per output."""
    ins = node.bounded()
    dtype = lams[0].dtype
    if node.prim.name == "conv_general_dilated" and node.ins[0][0] == "b" and _conv.supported(node.params):
        return [_conv.transpose(lams[0], consts[node.ins[1][1]], node.params, g.shape(ins[0]))]
    f = lambda *xs: tuple(_bind(node, consts, xs))
    ft = jax.linear_transpose(f, *[jax.ShapeDtypeStruct(g.shape(v), dtype) for v in ins])
    return jax.vmap(lambda *ts: ft(tuple(ts)))(*lams)


def initial_slopes(g: Graph, consts, ivs, R, before: int | None = None) -> dict:
    """The default relaxation slopes as optimisable parameters for ``R`` rows: ``{node index: theta}`` for the
    ReLU-like (CROWN's adaptive choice) and sigmoid / tanh nodes (`_relax.sshape_theta`) before node index
    ``before`` (all: None), on the bounds ``ivs``."""
    theta = {}
    for idx, node in enumerate(g.nodes[:before]):
        if node.kind not in ("pwl", "sshape"):
            continue
        iv = ivs[node.bounded()[0]]
        if node.kind == "pwl":
            k = consts[node.extra["k"]]
            t0 = (iv.hi - k >= k - iv.lo).astype(iv.lo.dtype)
            theta[idx] = jnp.broadcast_to(t0, (R,) + t0.shape)
        else:
            theta[idx] = tuple(jnp.broadcast_to(t, (R,) + t.shape)
                               for t in _relax.sshape_theta(node.extra["fn"], iv.lo, iv.hi))
    return theta
