"""Branch and bound on the traced graph of `bounds`: β-CROWN bounds of split subdomains, batched.

A subdomain is the input box with constraints on *branch units*, the units of the vars whose bounds
feed a relaxation (see `Layout`):

* kink units (inputs of ReLU / leaky-ReLU nodes, all with one kink ``k``) are split at the kink; a
  subdomain holds a state ``s`` per unit, int8: ``+1`` (``z >= k``), ``-1`` (``z <= k``) or ``0`` (free);
* interval units (inputs of sigmoid / tanh and max-pool nodes) are split into two intervals, at 0 when
  the interval contains it, else at its midpoint (as GenBaB does); a subdomain holds their bounds
  ``ilo, ihi`` (float32).

Per subdomain, the bounds of every var are the root bounds of the box (CROWN intermediate bounds, see
`root_bounds`) clamped by the splits and re-propagated by interval arithmetic through the graph (so a
split also tightens the vars after it). The bound of a spec row ``c . out`` is CROWN's back-substitution
(`_walk._backward_pass`) over these bounds with

* optimisable slopes ``alpha in [0, 1]`` of every ReLU-like unit and both lines of every sigmoid / tanh unit
  (α-CROWN);
* Lagrange multipliers ``beta >= 0`` of the split constraints (``s (z - k) >= 0``, ``z - ilo >= 0``,
  ``ihi - z >= 0``), added as linear terms: for any ``beta`` the bound stays sound, and the constraints of
  earlier layers reach the bound (β-CROWN, Wang et al. 2021);

both optimised with projected Adam, warm-started from the parent; every iterate is sound, so the best
bound seen is kept. Bounds are widened by ``MARGIN_REL`` times the summed magnitude of the terms plus
``MARGIN_ABS`` (`bounds` module doc). The branching score of a unit (BaBSR-like, for every relaxation) is
the largest gap between its relaxation line and the function on its interval, weighted by the
coefficient reaching the node's output.

The input set may be the box ∩ an L2 or L1 ball (``ball``): every back-substitution then concretises over
both (`_walk._Iv`), and the candidate point of a subdomain is the ball's minimiser clipped to the box.

Shapes: ``D`` subdomains, ``Hk`` kink units, ``Hi`` interval units, ``Ha`` slopes (see `Layout`).
"""
from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

from . import _relax
from ._graph import Graph
from ._walk import (
    _EXAMPLES,
    _backward_pass,
    _forward,
    _ibp_node,
    _identity_prefix,
    _Iv,
    _linear_prefix,
    _prefix_end,
    _pwl_consts,
    _window_relaxation,
    initial_slopes,
)
from .bounds import MARGIN_ABS, MARGIN_REL, _program, _round_to, full_precision
from .norms import check_norm, unit_maximiser

# Branch vars get α-CROWN intermediate bounds at the root where their bound rows times the size of the graph
# before them stay within this many floats (256x6 MLPs: ~2e6; CIFAR ResNets: ~1e8, skipped: there the
# optimisation cost minutes per query while their plain CROWN bounds take 0.2 s).
ALPHA_FLOATS = 2 ** 24
# Units of a kink var whose α-CROWN bounds are optimised together at the root; only the unstable ones are.
ALPHA_BLOCK = 64
# Kink units whose children are bounded to choose the branch (filtered smart branching); 0: BaBSR scores alone.
FSB_CANDIDATES = 4
# Interval units narrower than this (relative to 1 + |bound|) are not split further.
MIN_WIDTH = 1e-6


class Layout(NamedTuple):
    """Branch units of a graph, in flat order: ``kink`` ``((var, k const index, offset, size), ...)``,
    ``interval`` ``((var, offset, size), ...)``; ``alpha`` ``((node index, var, offset, size), ...)`` the
    optimisable slopes of the ReLU-like nodes (one per unit) and sigmoid / tanh nodes (two per unit:
    lower, upper); totals ``Hk, Hi, Ha``."""
    kink: tuple
    interval: tuple
    alpha: tuple
    Hk: int
    Hi: int
    Ha: int


def layout(g: Graph) -> Layout:
    """The branch units of ``g``: a var feeding only ReLU-like nodes with one kink is a kink var; a var
    feeding a sigmoid / tanh or max-pool node is an interval var."""
    uses: dict = {}
    for node in g.nodes:
        if node.kind in ("pwl", "sshape", "maxpool"):
            v = node.bounded()[0]
            uses.setdefault(v, []).append(node)
    kink, interval = [], []
    ok, oi = 0, 0
    for v, nodes in uses.items():
        n = math.prod(g.shape(v))
        ks = {node.extra["k"] for node in nodes if node.kind == "pwl"}
        if len(ks) == 1 and all(node.kind == "pwl" for node in nodes):
            kink.append((v, ks.pop(), ok, n))
            ok += n
        else:
            interval.append((v, oi, n))
            oi += n
    alpha, oa = [], 0
    for idx, node in enumerate(g.nodes):
        if node.kind in ("pwl", "sshape"):     # sigmoid / tanh: a lower and an upper slope per unit
            v = node.bounded()[0]
            n = math.prod(g.shape(v)) * (1 if node.kind == "pwl" else 2)
            alpha.append((idx, v, oa, n))
            oa += n
    return Layout(tuple(kink), tuple(interval), tuple(alpha), ok, oi, oa)


class DomainBounds(NamedTuple):
    """Per subdomain: ``lower (D,)`` sound lower bound of ``c . out`` (+inf: empty subdomain); ``x_star
    (D, n_in)`` the box point minimising the final linear bound (a counterexample candidate); ``branch
    (D,)`` the flat unit to split next (``< Hk``: a kink unit, else interval unit ``branch - Hk``; -1:
    none left) and ``unit_lo, unit_hi (D,)`` its bounds in the subdomain; ``alpha (D, Ha)``, ``beta
    (D, Hk + 2 Hi)`` the optimised slopes and multipliers (a warm start for the children)."""
    lower: jax.Array
    x_star: jax.Array
    branch: jax.Array
    unit_lo: jax.Array
    unit_hi: jax.Array
    alpha: jax.Array
    beta: jax.Array


class Splits(NamedTuple):
    """Split state of ``D`` subdomains: ``s (D, Hk)`` int8, ``ilo, ihi (D, Hi)`` float32."""
    s: np.ndarray
    ilo: np.ndarray
    ihi: np.ndarray


class Brancher:
    """Branch and bound programs of one network over one input shape (see module doc).

    ``root_bounds(lo, hi)`` -> root bounds of every var; ``bound(root, lo, hi, c, splits, init, steps)``
    -> `DomainBounds`; ``leaf(root, lo, hi, s)`` -> exact affine forms for the LP of a subdomain whose
    kink units are all stable.
    """

    def __init__(self, fn, in_shape, dtype=jnp.float32):
        prog = _program(fn, tuple(in_shape), dtype)
        self.graph, self.consts = prog.graph, prog.consts
        self.layout = layout(self.graph)
        self.pure_kink = all(n.kind in ("linear", "pwl") for n in self.graph.nodes)
        root, self._bound, self._leaf = (_programs(self.graph) if prog.arch is None
                                         else _compiled_programs(prog.arch))
        def root_bounds(lo, hi, steps=20, ball=None):
            b, norm = _ball_args(ball, lo.dtype)
            return root(self.consts, prog.prefixes(ball is not None), lo, hi, b, steps=steps, norm=norm)

        self.root_bounds = root_bounds

    def initial(self, root, D: int) -> Splits:
        """Splits of ``D`` unsplit subdomains: free kink units, interval units at their root bounds."""
        ilo, ihi = (np.tile(np.asarray(a), (D, 1)) for a in _root_intervals(self.layout, root, jnp.float32))
        return Splits(np.zeros((D, self.layout.Hk), np.int8), ilo, ihi)

    def bound(self, root, lo, hi, c, splits: Splits, init=None, *, steps: int = 10,
              candidates: int = FSB_CANDIDATES, ball=None) -> DomainBounds:
        """β-CROWN lower bounds of ``c[d] . out`` (``c: (D, n_out)``) over the subdomains ``splits`` of the box
        ``lo, hi: (1, *in)`` (∩ ``ball = (center (1, *in), eps, norm)``, an Lp ball, if given: then ``root`` must
        come from ``root_bounds`` with the same ball); ``init``: None (adaptive slopes, zero multipliers) or
        ``(alpha, beta)``. The unit to branch on: the best BaBSR-like score, or among the ``candidates``
        best-scored kink units the one whose worse child bound is highest (filtered smart branching; 0: scores
        alone)."""
        b, norm = _ball_args(ball, lo.dtype)
        return self._bound(self.consts, root, lo, hi, c, *splits, init, b, steps=steps, candidates=int(candidates),
                           norm=norm)

    def leaf(self, root, lo, hi, s):
        """For one subdomain whose kink units are all stable: ``(units, out)``, ``units`` a list per kink var of
        ``(A (n, n_in), a0 (n,))`` float64 numpy with the var's units ``= A x + a0``, ``out`` likewise for the
        outputs. With every unit stable the network is affine on the subdomain; the forms are composed in
        float64 (the float32 weights are exact there), so their error is ~1e-13 relative, not float32's ~1e-6."""
        cpu = jax.devices("cpu")[0]     # float64 on the host whatever the accelerator (TPUs have none)

        def f64(a):
            a = np.asarray(a)
            return jax.device_put(a.astype(np.float64) if np.issubdtype(a.dtype, np.floating) else a, cpu)

        with jax.enable_x64(True), jax.default_device(cpu):
            out = self._leaf(*jax.tree_util.tree_map(f64, (self.consts, root, lo, hi, s)))
        return jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), out)


def _programs(g: Graph):
    """Jitted ``(root, bound, leaf)`` of ``g`` with its constants as the first argument."""
    lay = layout(g)
    return (full_precision(jax.jit(functools.partial(_root, g, lay), static_argnames=("steps", "norm"))),
            full_precision(jax.jit(functools.partial(_bound, g, lay),
                                   static_argnames=("steps", "candidates", "norm"))),
            full_precision(jax.jit(functools.partial(_leaf, g, lay))))


@functools.lru_cache(maxsize=16)
def _compiled_programs(arch):
    """`_programs` shared by the networks of one architecture (`bounds._Arch`: other weights, same graph)."""
    return _programs(arch.graph)


_BRANCHERS: dict = {}
_KEEP = 4


def network_brancher(net) -> Brancher:
    """The branch-and-bound programs of the `Network` ``net`` (`Brancher`; the last `_KEEP` kept by content
    hash). Building it traces the network, so an unsupported operation is reported here, before any work."""
    key = (net.hash, tuple(net.input_shape))
    if key not in _BRANCHERS:
        while len(_BRANCHERS) >= _KEEP:
            _BRANCHERS.pop(next(iter(_BRANCHERS)))
        _BRANCHERS[key] = Brancher(net, net.input_shape)
    return _BRANCHERS[key]


def _ball_args(ball, dtype):
    """``(arrays, norm)`` of a ball ``(center (1, *in), eps, norm)`` for the jitted programs; ``(None, None)`` for
    none."""
    if ball is None:
        return None, None
    center, eps, norm = ball
    eps = _round_to(jnp.asarray(eps).reshape(()), dtype, down=False)
    return (jnp.asarray(center, dtype), eps), check_norm(norm)


def _input_ball(b, norm):
    """The ``ball`` of the input `_Iv` from `_ball_args` arrays ``b`` (or None)."""
    return None if b is None else (b[0], b[1], norm)


def _root(g: Graph, lay: Layout, consts, pre, lo, hi, b, steps: int, norm=None):
    """Bounds ``{var: (lo, hi)}`` (batch-1 shapes) of every var over the box ``lo, hi: (1, *in)`` (∩ the ball of
    `_ball_args` arrays ``b`` and ``norm``, if given): CROWN
    intermediate bounds (``pre``: `_walk._identity_prefixes`) intersected with interval ones; then, with
    ``steps``, the branch vars (inputs of ReLU-like, sigmoid / tanh and max-pool nodes) within `ALPHA_FLOATS`,
    in order, by α-CROWN (``steps`` Adam iterations on slopes per bound row), re-propagated forward by
    interval arithmetic."""
    prefixes = {v: (acc, bias, _prefix_end(g, v)) for v, (acc, bias) in pre.items()}

    ball = _input_ball(b, norm)

    def one(l, h):
        return {v: (iv.lo, iv.hi) for v, iv in _forward(g, consts, l[None], h[None], prefixes, ball)[0].items()}

    root = jax.tree_util.tree_map(lambda a: a[0], jax.vmap(one, axis_name=_EXAMPLES)(lo, hi))
    if not steps:
        return root
    branch_vars = [(v, n) for v, _, _, n in lay.kink] + [(v, n) for v, _, n in lay.interval]
    kink_k = {v: k for v, k, _, _ in lay.kink}
    for v, n in sorted(branch_vars, key=lambda e: -1 if e[0] == g.input else g.producer_index(e[0])):
        if v == g.input:
            continue
        before = g.producer_index(v)
        upstream = math.prod(g.shape(g.input)) + sum(math.prod(g.shape(u)) for node in g.nodes[:before]
                                                     for u in node.outs)
        if 2 * n * upstream > ALPHA_FLOATS:
            continue
        ivs = {u: _Iv(lo=a, hi=h, ball=ball if u == g.input else None) for u, (a, h) in root.items()}
        theta = initial_slopes(g, consts, ivs, 2 * n, before)
        if not theta:
            continue
        state = _identity_prefix(g, consts, v, lo.dtype)

        def run(th, ivs=ivs, state=state):
            r = _backward_pass(g, consts, ivs, state, th)
            return r.bound - (MARGIN_REL * r.mag + MARGIN_ABS)

        shape = g.shape(v)
        l, u = root[v]
        if v in kink_k:
            kk = jnp.broadcast_to(consts[kink_k[v]], shape).reshape(-1)
            unstable = (l.reshape(-1) < kk) & (u.reshape(-1) > kk)
            best = _ascend_unstable(run, theta, state, unstable, steps)
        else:
            best, _ = _ascend(run, theta, steps, _clip_slopes)
        root[v] = (jnp.maximum(l, best[:n].reshape(shape)), jnp.minimum(u, -best[n:].reshape(shape)))
        free = jnp.zeros((lay.Hk,), jnp.int8)
        ivs, _ = _sub_ivs(g, lay, consts, root, lo, hi, free, *_root_intervals(lay, root, lo.dtype), ball)
        root = {w: (iv.lo, iv.hi) for w, iv in ivs.items()}
    return root


def _clip_slopes(theta):
    return jax.tree_util.tree_map(lambda a: jnp.clip(a, 0.0, 1.0), theta)


def _ascend_unstable(run, theta, state, unstable, steps: int):
    """`_ascend` on the rows ``[I; -I]`` of a kink var's ``n`` units (``run(theta, state=...)``, ``theta`` and the
    backward ``state`` with ``2n`` rows) for its ``unstable (n,)`` units only, ``ALPHA_BLOCK`` units at a time
    (rows are independent problems): ``(2n,)`` lower bounds, -inf for the stable units, whose bounds a
    relaxation never uses."""
    acc, bias, last = state
    n = bias.shape[0] // 2
    blk = min(n, ALPHA_BLOCK)
    order = jnp.argsort(~unstable)

    def block(j, best):
        sel = lax.dynamic_slice(order, (j * blk,), (blk,))   # the last block's start is clamped: overlap only
        rows = jnp.concatenate([sel, sel + n])
        sub = ({w: t[rows] for w, t in acc.items()}, bias[rows], last)
        b, _ = _ascend(lambda th: run(th, state=sub), jax.tree_util.tree_map(lambda a: a[rows], theta), steps,
                       _clip_slopes)
        return best.at[rows].set(b)

    blocks = -(-jnp.sum(unstable) // blk)
    return lax.fori_loop(0, blocks, block, jnp.full((2 * n,), -jnp.inf, bias.dtype))


def _root_intervals(lay: Layout, root, dtype):
    """The interval units' root bounds as flat ``(ilo, ihi)``, each ``(Hi,)`` (the bounds of an unsplit subdomain)."""
    if not lay.interval:
        return jnp.zeros((0,), dtype), jnp.zeros((0,), dtype)
    return tuple(jnp.concatenate([root[v][i].reshape(-1) for v, _, _ in lay.interval]) for i in (0, 1))


def _sub_ivs(g: Graph, lay: Layout, consts, root, lo, hi, s, ilo, ihi, ball=None):
    """Bounds ``{var: _Iv}`` of one subdomain (batch-1 shapes) and whether it is empty: the root bounds
    clamped by the splits, re-propagated forward by interval arithmetic and intersected with the root; the
    input's holds ``ball`` (see `_walk._Iv`)."""
    clamp = {}
    for v, k, off, n in lay.kink:
        shape = g.shape(v)
        sv = s[off:off + n].reshape(shape)
        kk = jnp.broadcast_to(consts[k], shape).astype(lo.dtype)
        clamp[v] = (jnp.where(sv > 0, kk, -jnp.inf), jnp.where(sv < 0, kk, jnp.inf))
    for v, off, n in lay.interval:
        clamp[v] = (ilo[off:off + n].reshape(g.shape(v)), ihi[off:off + n].reshape(g.shape(v)))
    empty = jnp.zeros((), bool)

    def tighten(v, iv):
        nonlocal empty
        l, h = jnp.maximum(iv.lo, root[v][0]), jnp.minimum(iv.hi, root[v][1])
        if v in clamp:
            l, h = jnp.maximum(l, clamp[v][0]), jnp.minimum(h, clamp[v][1])
        empty = empty | jnp.any(l > h)
        return _Iv(lo=jnp.minimum(l, h), hi=h)

    ivs = {g.input: tighten(g.input, _Iv(lo=lo, hi=hi))}
    ivs[g.input].ball = ball
    for node in g.nodes:
        for v, iv in zip(node.outs, _ibp_node(node, consts, [ivs[b] for b in node.bounded()])):
            ivs[v] = tighten(v, iv)
    return ivs, empty


def _split_terms(g: Graph, lay: Layout, consts, root, s, ilo, ihi, beta):
    """Lagrangian terms ``{var: (coef (1, *shape), bias (1,))}`` of the split constraints with multipliers
    ``beta (Hk + 2 Hi,)`` (made >= 0)."""
    beta = jnp.maximum(beta, 0)
    extra = {}
    for v, k, off, n in lay.kink:
        sv = s[off:off + n].astype(beta.dtype)
        b = beta[off:off + n] * sv
        kk = jnp.broadcast_to(consts[k], g.shape(v)).reshape(-1)
        extra[v] = (-b.reshape((1,) + g.shape(v)), jnp.sum(b * kk)[None])
    for v, off, n in lay.interval:
        lo_v, hi_v = ilo[off:off + n], ihi[off:off + n]
        rl, ru = root[v][0].reshape(-1), root[v][1].reshape(-1)
        bl = beta[lay.Hk + off:lay.Hk + off + n] * (lo_v > rl)
        bh = beta[lay.Hk + lay.Hi + off:lay.Hk + lay.Hi + off + n] * (hi_v < ru)
        extra[v] = ((bh - bl).reshape((1,) + g.shape(v)), jnp.sum(bl * lo_v - bh * hi_v)[None])
    return extra


def _thetas(lay: Layout, g: Graph, alpha, rows: int = 1):
    """Flat slopes ``alpha (rows, Ha)`` (or ``(Ha,)`` for one row) as the ``theta`` of `_walk._backward_pass`."""
    alpha = alpha.reshape(rows, -1)
    out = {}
    for idx, v, off, n in lay.alpha:
        shape = (rows,) + g.shape(v)
        a = alpha[:, off:off + n]
        out[idx] = a.reshape(shape) if g.nodes[idx].kind == "pwl" else tuple(
            t.reshape(shape) for t in jnp.split(a, 2, axis=1))
    return out


def _flat_slopes(lay: Layout, theta: dict, rows: int):
    """Inverse of `_thetas`: ``(rows, Ha)``."""
    parts = []
    for idx, *_ in lay.alpha:
        t = theta[idx]
        parts += [a.reshape(rows, -1) for a in (t if isinstance(t, tuple) else (t,))]
    return jnp.concatenate(parts, axis=1) if parts else jnp.zeros((rows, 0))


def _bound(g: Graph, lay: Layout, consts, root, lo, hi, c, s, ilo, ihi, init, b, *, steps: int,
           candidates: int, norm=None) -> DomainBounds:
    out_shape = g.shape(g.output)
    ball = _input_ball(b, norm)

    def one(c1, s1, ilo1, ihi1, a0, b0):
        ivs, empty = _sub_ivs(g, lay, consts, root, lo, hi, s1, ilo1, ihi1, ball)
        state = _linear_prefix(g, consts, g.output, c1.reshape((1,) + out_shape))

        def run(params, record=False):
            alpha, beta = params
            extra = _split_terms(g, lay, consts, root, s1, ilo1, ihi1, beta)
            r = _backward_pass(g, consts, ivs, state, _thetas(lay, g, alpha), extra, record)
            return r.bound[0] - (MARGIN_REL * r.mag[0] + MARGIN_ABS), r

        if a0 is None:
            a0 = _flat_slopes(lay, initial_slopes(g, consts, ivs, 1), 1)[0].astype(lo.dtype)
            b0 = jnp.zeros((lay.Hk + 2 * lay.Hi,), lo.dtype)
        project = lambda p: (jnp.clip(p[0], 0.0, 1.0), jnp.maximum(p[1], 0.0))
        best, params = _ascend(lambda p: run(p)[0], (a0, b0), steps, project)
        _, r = run(params, record=True)
        lam_x = r.lam_x.reshape(-1) if r.lam_x is not None else jnp.zeros(lo.size, lo.dtype)
        x_star = _minimiser(lam_x, ivs[g.input].lo.reshape(-1), ivs[g.input].hi.reshape(-1), ball)
        scores = _scores(g, lay, consts, ivs, r.record, params[0])
        branch = jnp.where(jnp.max(scores) > -jnp.inf, jnp.argmax(scores), -1) if scores.size else jnp.int32(-1)
        if candidates and lay.Hk:           # filtered smart branching among the best-scored kink units
            def child(j, sign):
                s2 = s1.at[j].set(sign)
                ivs2, empty2 = _sub_ivs(g, lay, consts, root, lo, hi, s2, ilo1, ihi1, ball)
                extra = _split_terms(g, lay, consts, root, s2, ilo1, ihi1, params[1])
                r2 = _backward_pass(g, consts, ivs2, state, _thetas(lay, g, params[0]), extra)
                return jnp.where(empty2, jnp.inf, r2.bound[0] - (MARGIN_REL * r2.mag[0] + MARGIN_ABS))

            top_sc, top = lax.top_k(scores[:lay.Hk], min(candidates, lay.Hk))
            est = jax.vmap(lambda j: jnp.minimum(child(j, 1), child(j, -1)))(top)
            pick = top[jnp.argmax(jnp.where(top_sc > -jnp.inf, est, -jnp.inf))]
            branch = jnp.where((branch >= 0) & (branch < lay.Hk), pick, branch)
        units = [(ivs[v].lo.reshape(-1), ivs[v].hi.reshape(-1)) for v, *_ in lay.kink + lay.interval]
        if units:
            j = jnp.maximum(branch, 0)
            u_lo, u_hi = jnp.concatenate([a for a, _ in units])[j], jnp.concatenate([b for _, b in units])[j]
        else:
            u_lo = u_hi = jnp.zeros((), lo.dtype)
        return (jnp.where(empty, jnp.inf, best), x_star, branch.astype(jnp.int32), u_lo, u_hi,
                params[0], params[1])

    a0, b0 = (None, None) if init is None else init
    axes = (0, 0, 0, 0, None if a0 is None else 0, None if b0 is None else 0)
    return DomainBounds(*jax.vmap(one, in_axes=axes)(c, s, ilo, ihi, a0, b0))


def _minimiser(lam, lo, hi, ball):
    """A point ``(n_0,)`` of the box ``[lo, hi]`` (∩ ``ball``) where ``lam . x`` is low: the box's minimiser, or the
    ball's (``center - eps * argmax of lam . d over the unit ball``) clipped to the box, which stays in the ball."""
    if ball is None:
        return jnp.where(lam >= 0, lo, hi)
    center, eps, norm = ball
    return jnp.clip(center.reshape(-1) - eps * unit_maximiser(lam[None], norm)[0], lo, hi)


def _ascend(run, params, steps, project, lr_alpha=0.1, lr_beta=0.05):
    """Projected Adam ascent on ``sum(run(params))`` (sound bounds, any shape); the elementwise best values
    seen and the final params (the children of a subdomain restart from them). ``params``: a pair
    (slopes, multipliers) with learning rates ``lr_alpha, lr_beta``, or one tree of slopes."""
    best = run(params)
    if not steps:
        return best, params
    if isinstance(params, tuple):
        opt = optax.multi_transform({"a": optax.adam(lr_alpha), "b": optax.adam(lr_beta)}, ("a", "b"))
    else:
        opt = optax.adam(lr_alpha)

    def step(carry, _):
        p, state, best = carry
        (_, val), grad = jax.value_and_grad(lambda q: _total(run(q)), has_aux=True)(p)
        upd, state = opt.update(jax.tree_util.tree_map(jnp.negative, grad), state, p)
        return (project(optax.apply_updates(p, upd)), state, jnp.fmax(best, val)), None

    (params, _, best), _ = lax.scan(step, (params, opt.init(params), best), None, length=steps)
    return jnp.fmax(best, run(params)), params


def _total(val):
    return jnp.sum(val), val


def _gap(f, a_l, b_l, a_u, b_u, pts, lower_ends: bool = False):
    """Distances ``(gap_l, gap_u)`` between ``f`` and its lower / upper line: the largest over the points
    ``pts`` (a stacked array), for ``gap_l`` with ``lower_ends`` the smaller of those at the first two points
    (the interval's ends: for a kink, BaBSR's choice, which splits far fewer subdomains on ReLU networks
    than the largest gap). A heuristic only."""
    vals = f(pts)
    below = vals - (a_l * pts + b_l)
    gap_l = jnp.minimum(below[0], below[1]) if lower_ends else jnp.max(below, axis=0)
    return gap_l, jnp.max(a_u * pts + b_u - vals, axis=0)


def _scores(g: Graph, lay: Layout, consts, ivs, record, alpha):
    """Branching scores ``(Hk + Hi,)``: for each unit, the coefficient reaching its node times the gap of the
    relaxation on its interval; ``-inf`` for units that cannot be split."""
    kink = {v: jnp.zeros(g.shape(v), ivs[v].lo.dtype) for v, _, _, _ in lay.kink}
    inter = {v: jnp.zeros(g.shape(v), ivs[v].lo.dtype) for v, _, _ in lay.interval}
    thetas = _thetas(lay, g, alpha)
    for idx, t in record.items():
        node = g.nodes[idx]
        if node.kind not in ("pwl", "sshape", "maxpool"):
            continue
        v = node.bounded()[0]
        l, u = ivs[v].lo, ivs[v].hi
        t = t[0]
        if node.kind == "pwl":
            k, val, an, ap = _pwl_consts(node, consts)
            rel = _relax.pwl(k, val, an, ap, l, u, thetas[idx][0])
            f = lambda x: val + jnp.where(x >= k, ap * (x - k), an * (x - k))
            pts = jnp.stack([l, u, jnp.clip(k, l, u)])
        elif node.kind == "sshape":
            rel = _relax.sshape(node.extra["fn"], l, u, tuple(a[0] for a in thetas[idx]))
            f = jax.nn.sigmoid if node.extra["fn"] == "logistic" else jnp.tanh
            pts = l + (u - l) * jnp.linspace(0.0, 1.0, 9).reshape((-1,) + (1,) * l.ndim)
        else:
            sel_l, sel_u, _ = _window_relaxation(node, ivs[v])
            loose = jnp.abs(t.reshape(-1)) * (jnp.sum(sel_u, -1) == 0)
            n_in = math.prod(g.shape(v))
            per_in = jnp.zeros((n_in + 1,), l.dtype).at[node.extra["idx"]].max(
                jnp.broadcast_to(loose[:, None], node.extra["idx"].shape))
            inter[v] = inter[v] + per_in[:n_in].reshape(g.shape(v)) * (u - l)
            continue
        gl, gu = _gap(f, *rel, pts, lower_ends=node.kind == "pwl")
        sc = jnp.maximum(t, 0) * gl + jnp.maximum(-t, 0) * gu
        if v in kink:
            kink[v] = kink[v] + sc
        else:
            inter[v] = inter[v] + sc
    out = []
    for v, k, _, _ in lay.kink:
        kk = consts[k]
        unstable = (ivs[v].lo < kk) & (ivs[v].hi > kk)
        out.append(jnp.where(unstable, kink[v], -jnp.inf).reshape(-1))
    for v, _, _ in lay.interval:
        l, u = ivs[v].lo, ivs[v].hi
        wide = u - l > MIN_WIDTH * (1.0 + jnp.maximum(jnp.abs(l), jnp.abs(u)))
        out.append(jnp.where(wide, inter[v] + 1e-12 * (u - l), -jnp.inf).reshape(-1))
    return jnp.concatenate(out) if out else jnp.zeros((0,), jnp.float32)


def split_point(lo, hi):
    """Where an interval unit ``[lo, hi]`` is split: 0 when inside, else the midpoint."""
    return np.where((lo < 0) & (hi > 0), 0.0, 0.5 * (lo + hi)).astype(np.float32)


def _leaf(g: Graph, lay: Layout, consts, root, lo, hi, s):
    ivs, _ = _sub_ivs(g, lay, consts, root, lo, hi, s, *_root_intervals(lay, root, lo.dtype))
    n_in = lo.size

    def affine(v):
        state = _identity_prefix(g, consts, v, lo.dtype)
        r = _backward_pass(g, consts, ivs, state)
        n = math.prod(g.shape(v))
        A = jnp.zeros((2 * n, n_in), lo.dtype) if r.lam_x is None else r.lam_x.reshape(2 * n, -1)
        # lower bound = A x0-part: bias = bound - lin; recover the constant from the bound at the box centre
        mid, rad = ivs[g.input].mid.reshape(-1), ivs[g.input].rad.reshape(-1)
        const = r.bound - (A @ mid - jnp.abs(A) @ rad)
        return A[:n], const[:n]

    return [affine(v) for v, _, _, _ in lay.kink], affine(g.output)
