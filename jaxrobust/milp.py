"""Exact local robustness of feed-forward ReLU networks by mixed-integer linear programming (HiGHS).

A query is a `ReluChain` (the dense encoding of the network), an input box ``lo <= x <= hi`` and a true
label; it asks whether ``min_x z_label(x) - z_t(x) > 0`` for every target class ``t``. The bounds come from
the one bound engine (`kernels.bab.Brancher` on the chain's function, the programs branch and bound uses):

* pre-activation bounds ``l <= z <= u`` per hidden neuron: α-CROWN intermediate bounds of the engine;
* margin lower bounds and their minimisers: α-CROWN of the engine on the margin rows;
* a stably inactive neuron (``u <= 0``) is dropped, a stably active one (``l >= 0``) is ``a = z``;
* an unstable one gets the big-M encoding ``a >= z, a >= 0, a <= u d, a <= z - l (1 - d)``, ``d`` binary,
  in float64.

A query first tries cheap candidates (signed-gradient descent on each target's margin from its bound's
minimiser). Targets whose margin bound exceeds the safety margin ``tol = 1e-6 * scale + 1e-7`` (``scale``
the largest magnitude of a bound) need no MILP. For the others the bounds of the unstable neurons are
tightened by LP (`layer_bounds`), the margins re-bounded, and each remaining target, smallest margin found
first, is solved as the MILP ``min margin_t`` subject to the cut ``margin_t <= tol``, stopping at its first
feasible point: infeasibility proves ``margin_t > tol``, a feasible point is a candidate counterexample.
(On mnist-net_256x2 this was 2 to over 5 times faster than minimising each margin to optimality, or than
one MILP over the disjunction of all targets.)

ROBUST needs every target proven; VIOLATED needs a candidate that, clipped to the box and cast to
float32, is misclassified by the float32 `forward`. Anything else (time limit, a candidate the float32
network classifies correctly) is UNKNOWN.
"""
from __future__ import annotations

import contextlib
import os
import sys
import threading
import time
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from scipy import sparse
from scipy.optimize import Bounds, LinearConstraint
from scipy.optimize import milp as _scipy_milp

from .box_search import _logits
from .errors import InputError
from .kernels.attacks import box_descent
from .kernels.bab import Splits, network_brancher
from .kernels.perturb import check_eps
from .kernels.relu_chain import ReluChain, forward, relu_chain
from .network import Network, from_function
from .verdict import ROBUST, UNKNOWN, VIOLATED

# α iterations of the engine's intermediate and margin bounds
ALPHA_STEPS = 20


class MilpResult(NamedTuple):
    """Verdict of one query.

    Attributes:
      status: ROBUST (1), UNKNOWN (0) or VIOLATED (-1).
      counterexample: ``(n_0,)`` float32 point in the box misclassified by `forward`, or None.
      min_margin: ROBUST: a proven lower bound of ``min_t min_x margin_t`` (> 0; the safety margin where
        only the MILP proved it); VIOLATED: the smallest float32 margin ``z_label - z_t`` at the
        counterexample (< 0); UNKNOWN: the best proven lower bound (<= the safety margin).
      time_s: wall-clock seconds.
      nodes: branch-and-bound nodes reported by HiGHS, summed over the MILPs solved (scipy reports none
        for a MILP proved infeasible, so a ROBUST verdict usually has 0).
    """

    status: int
    counterexample: np.ndarray | None
    min_margin: float
    time_s: float
    nodes: int


class MilpBatch(NamedTuple):
    """Verdicts of a batch: ``status (B,) int8``, ``counterexample (B, *shape) float32`` (NaN where not
    VIOLATED), ``min_margin (B,)`` and ``time_s (B,)`` float64 (see `MilpResult`)."""

    status: np.ndarray
    counterexample: np.ndarray
    min_margin: np.ndarray
    time_s: np.ndarray


def milp_verify(chain: ReluChain, lo, hi, label: int, *, time_limit: float = 60.0,
                targets=None) -> MilpResult:
    """Decide ``z_label - z_t > 0`` on the box ``lo, hi: (n_0,)`` for all ``t != label`` (or ``targets``)."""
    t0 = time.perf_counter()
    ws = [np.asarray(w, np.float64) for w in chain.weights]
    bs = [np.asarray(b, np.float64) for b in chain.biases]
    lo, hi = _check_box(lo, hi, ws[0].shape[1])
    n_out = ws[-1].shape[0]
    label, targets = _check_targets(label, targets, n_out)
    if not time_limit > 0:
        raise InputError(f"time_limit must be > 0, got {time_limit}")
    deadline = t0 + time_limit
    lo32, hi32 = _float32_inside(lo, hi)
    c_rows = np.zeros((len(targets), n_out))
    c_rows[:, label] = 1.0
    c_rows[np.arange(len(targets)), targets] = -1.0

    def result(status, margin, x=None, nodes=0):
        return MilpResult(status, x, float(margin), time.perf_counter() - t0, nodes)

    eng = _Engine(chain, lo, hi)

    def falsify(cands):
        """First candidate row of ``cands: (m, n_0)`` misclassified by the float32 network, with its margin."""
        x = np.clip(cands.astype(np.float32), lo32, hi32)
        m = (_logits(eng.net, x) @ c_rows.T).min(axis=1)
        i = int(np.argmin(m))
        return (x[i], m[i]) if m[i] < 0 else (None, None)

    # cheap candidates: per target, signed-gradient descent from the minimiser of its margin bound
    m_low, x_star = eng.margins(c_rows)
    cands, m_att = _candidates(eng.net, x_star, c_rows, lo32, hi32)
    x, m = falsify(cands)
    if x is not None:
        return result(VIOLATED, m, x)
    if np.all(m_low > _tolerance(eng.bounds, m_low)):
        return result(ROBUST, m_low.min())
    bounds = layer_bounds(chain, lo, hi, lp=True, deadline=deadline, engine=eng)
    m_low = np.maximum(m_low, eng.margins(c_rows, bounds)[0])
    tol = _tolerance(bounds, m_low)
    proven = np.where(m_low > tol, m_low, np.nan)
    # most likely violated first: smallest margin found by the descent
    open_ = [i for i in np.argsort(m_att, kind="stable") if np.isnan(proven[i])]
    if not open_:
        return result(ROBUST, proven.min())
    enc = _Encoding(ws, bs, bounds, lo, hi)
    nodes = 0
    for i in open_:
        left = deadline - time.perf_counter()
        if left <= 0:
            break
        res = enc.solve(c_rows[i], tol, left)
        nodes += res.nodes
        if res.x is not None:
            x, m = falsify(res.x[None])
            if x is not None:
                return result(VIOLATED, m, x, nodes)
        elif res.infeasible:
            proven[i] = max(tol, m_low[i])
    if np.isnan(proven).any():
        return result(UNKNOWN, np.where(np.isnan(proven), m_low, proven).min(), nodes=nodes)
    return result(ROBUST, proven.min(), nodes=nodes)


def milp_verify_batch(net: Network, x, y, eps, *, time_limit: float = 60.0) -> MilpBatch:
    """`milp_verify` on each of ``x: (B, *input_shape)``, ``y: (B,)`` with L∞ radius ``eps`` (scalar or
    ``(B,)``, taken as float32 like the other oracles); boxes are clipped to ``net.domain``.
    ``time_limit`` is per query."""
    x = net.check_inputs(x)
    n = len(x)
    y = net.check_labels(y, n)
    e = np.asarray(check_eps(eps, n), np.float64)
    chain = relu_chain(net, net.input_shape)
    flat = x.reshape(n, -1).astype(np.float64)
    lo = np.maximum(flat - e[:, None], net.domain[0])
    hi = np.minimum(flat + e[:, None], net.domain[1])
    out = MilpBatch(np.zeros(n, np.int8), np.full(x.shape, np.nan, np.float32), np.zeros(n), np.zeros(n))
    for b in range(n):
        r = milp_verify(chain, lo[b], hi[b], int(y[b]), time_limit=time_limit)
        out.status[b], out.min_margin[b], out.time_s[b] = r.status, r.min_margin, r.time_s
        if r.counterexample is not None:
            out.counterexample[b] = r.counterexample.reshape(x.shape[1:])
    return out


class _Engine:
    """The bound engine on a chain's function over the float64 box ``lo, hi: (n_0,)`` (rounded outward to
    float32): ``bounds`` the α-CROWN pre-activation bounds ``[(l, u), ...]`` (float64, one pair per hidden
    layer), ``margins(c, bounds)`` the α-CROWN lower bounds ``(T,)`` of ``c @ z_L`` and their minimisers."""

    def __init__(self, chain: ReluChain, lo, hi):
        self.net = chain_network(chain)
        self.brancher = network_brancher(self.net)
        self.lo, self.hi = round32(lo, -1)[None], round32(hi, 1)[None]
        self.root = self.brancher.root_bounds(self.lo, self.hi, ALPHA_STEPS)
        self.vars = [v for v, _, _, _ in self.brancher.layout.kink]
        self.bounds = hidden_bounds(self.root, self.vars)

    def margins(self, c, bounds=None):
        root = intersect_root(self.root, self.vars, bounds or ())
        sp = self.brancher.initial(root, len(c))
        r = self.brancher.bound(root, self.lo, self.hi, jnp.asarray(c, jnp.float32),
                                Splits(*(jnp.asarray(a) for a in sp)), steps=ALPHA_STEPS, candidates=0)
        lower = np.asarray(r.lower, np.float64)
        return np.where(np.isnan(lower), -np.inf, lower), np.asarray(r.x_star, np.float32)


def chain_network(chain: ReluChain) -> Network:
    """The chain as a `Network` on flat inputs ``(B, n_0)`` (its own function, for the bound engine)."""
    return from_function(lambda p, x: forward(ReluChain(*p), x), (tuple(chain.weights), tuple(chain.biases)),
                         (chain.widths[0],), chain.widths[-1], domain=(-np.inf, np.inf), name="relu-chain")


def layer_bounds(chain: ReluChain, lo, hi, *, lp: bool = False, deadline: float | None = None,
                 engine: _Engine | None = None) -> list:
    """Pre-activation bounds ``(l, u)``, each ``(n_k,)`` float64, of the hidden layers ``k = 1..L-1`` of the
    chain on the box ``lo, hi: (n_0,)``: the engine's α-CROWN bounds; with ``lp`` the neurons still unstable
    are tightened layer by layer by LP over the triangle relaxation of the earlier layers (until
    ``deadline``, a `time.perf_counter` value)."""
    lo, hi = np.asarray(lo, np.float64), np.asarray(hi, np.float64)
    out = list((engine or _Engine(chain, lo, hi)).bounds)
    if lp:
        ws = [np.asarray(w, np.float64) for w in chain.weights]
        bs = [np.asarray(b, np.float64) for b in chain.biases]
        for k in range(1, len(out)):
            out[k] = _lp_tighten(ws[:k + 1], bs[:k + 1], out[:k], lo, hi, *out[k], deadline)
    return out


def hidden_bounds(root: dict, kink_vars) -> list:
    """The engine's root bounds ``root`` (var -> ``(l, u)`` float32) of the hidden layers ``kink_vars`` as
    ``[(l, u), ...]``, each ``(n_k,)`` float64."""
    return [tuple(np.asarray(b, np.float64).reshape(-1) for b in root[v]) for v in kink_vars]


def intersect_root(root: dict, kink_vars, bounds) -> dict:
    """``root`` with the float64 hidden-layer bounds ``bounds = [(l, u), ...]`` (each ``(n_k,)``, one pair per
    var of ``kink_vars``) intersected in, rounded outward to float32 so the result stays sound."""
    root = dict(root)
    for v, (l, u) in zip(kink_vars, bounds):
        shape = root[v][0].shape
        root[v] = (jnp.maximum(root[v][0], round32(l, -1).reshape(shape)),
                   jnp.minimum(root[v][1], round32(u, 1).reshape(shape)))
    return root


def round32(a, direction: int) -> jax.Array:
    """float64 ``a`` as float32 rounded down (``direction < 0``) or up."""
    a = np.asarray(a)
    r = a.astype(np.float32)
    bad = r > a if direction < 0 else r < a
    return jnp.asarray(np.where(bad, np.nextafter(r, np.float32(direction * np.inf)), r))


def _candidates(net: Network, x_star, c, lo32, hi32, steps: int = 50):
    """Signed-gradient descent of every margin row ``c[t]`` from its bound's minimiser ``x_star[t]`` in the box;
    the points ``(T, n_0)`` and their float32 margins ``(T,)``."""
    lo, hi = jnp.asarray(lo32), jnp.asarray(hi32)
    pts = np.asarray(box_descent(net, jnp.asarray(x_star), jnp.asarray(c, jnp.float32), lo, hi, (hi - lo) / 4,
                                 steps=steps, decay=0.93))
    return pts, np.sum(_logits(net, pts) * c, axis=1)


def _tolerance(bounds, m_low) -> float:
    """Safety margin ``1e-6 * scale + 1e-7``, ``scale`` the largest magnitude of a hidden or margin bound."""
    finite = np.abs(m_low[np.isfinite(m_low)])
    scale = max([1.0, float(finite.max()) if finite.size else 0.0]
                + [float(np.abs(np.r_[l, u]).max()) for l, u in bounds])
    return 1e-6 * scale + 1e-7


def _lp_tighten(ws, bs, bounds, lo, hi, l, u, deadline, *, integer: bool = False, solve_limit: float | None = None):
    """Tighter ``l, u: (n_L,)`` for the unstable outputs of the chain ``ws, bs``: min and max of each over the
    triangle relaxation of its hidden layers (``bounds``) by LP, or with ``integer`` over their exact MILP
    encoding (each solve within ``solve_limit`` seconds; a solve out of time gives its dual bound). Loosened
    by ``1e-6 (1 + |value|)`` for the solver's tolerances."""
    enc = _Encoding(ws, bs, bounds, lo, hi)
    cons = [] if enc.a is None else [LinearConstraint(enc.a, enc.r_lo, enc.r_hi)]
    l, u = l.copy(), u.copy()
    for j in np.flatnonzero((l < 0) & (u > 0)):
        if deadline is not None and time.perf_counter() > deadline:
            break
        obj = np.zeros(enc.n_var)
        obj[enc.last] = ws[-1][j][enc.last_keep]
        for sign in (-1.0, 1.0):
            opts = {} if solve_limit is None else {"time_limit": float(solve_limit)}
            if deadline is not None:
                opts["time_limit"] = max(1e-3, min(opts.get("time_limit", np.inf), deadline - time.perf_counter()))
            r = _milp(sign * obj, bounds=enc.bounds, constraints=cons,
                      integrality=enc.integrality if integer else None, options=opts)
            best = r.get("mip_dual_bound") if integer else (r.fun if r.status == 0 else None)
            if best is None or not np.isfinite(best):
                continue
            v = sign * best + bs[-1][j]
            if sign < 0:
                u[j] = min(u[j], v + 1e-6 * (1 + abs(v)))
                if u[j] <= 0:
                    break
            else:
                l[j] = max(l[j], v - 1e-6 * (1 + abs(v)))
    return l, u


def refine_bounds(chain: ReluChain, bounds, lo, hi, *, layers: int, deadline: float,
                  solve_limit: float = 1.0) -> list:
    """``bounds`` (`layer_bounds`) with the unstable units of hidden layers 2 … ``layers + 1`` tightened in
    order by MILP over the exact encoding of the layers before them (each solve within ``solve_limit``
    seconds, all before ``deadline``), as complete verifiers refine the intermediate bounds of deep MLPs."""
    ws = [np.asarray(w, np.float64) for w in chain.weights]
    bs = [np.asarray(b, np.float64) for b in chain.biases]
    lo, hi = np.asarray(lo, np.float64), np.asarray(hi, np.float64)
    out = list(bounds)
    for k in range(1, min(layers + 1, len(out))):
        if time.perf_counter() > deadline:
            break
        out[k] = _lp_tighten(ws[:k + 1], bs[:k + 1], out[:k], lo, hi, *out[k], deadline, integer=True,
                             solve_limit=solve_limit)
    return out


class _Solve(NamedTuple):
    x: np.ndarray | None      # (n_0,) input of a feasible point, if one was found
    infeasible: bool          # HiGHS proved the cut margin <= tol infeasible
    nodes: int


class _Encoding:
    """The MILP of the chain on a box, shared by all targets: variables ``[x, a_1, d_1, ..., a_{L-1}, d_{L-1}]``."""

    def __init__(self, ws, bs, bounds, lo, hi):
        n0 = ws[0].shape[1]
        var_lo, var_hi, integ, blocks, r_lo, r_hi = [lo], [hi], [np.zeros(n0)], [], [], []
        prev = np.arange(n0)                      # variable index of each kept unit of the previous layer
        prev_keep = np.ones(n0, bool)             # units of the previous layer that are kept (not stably 0)
        n_var, n_row = n0, 0
        for k, (l, u) in enumerate(bounds):
            keep = u > 0
            w, b, l, u = ws[k][keep][:, prev_keep], bs[k][keep], l[keep], u[keep]
            unstable = l < 0
            n, m = len(u), int(unstable.sum())
            a_idx, d_idx = n_var + np.arange(n), n_var + n + np.arange(m)
            n_var += n + m
            var_lo += [np.maximum(l, 0), np.zeros(m)]
            var_hi += [u, np.ones(m)]
            integ += [np.zeros(n), np.ones(m)]
            wr, wc = np.nonzero(w)
            uj = np.flatnonzero(unstable)
            # rows [0, n): a - w.prev, = b (active) or >= b (unstable)
            # rows [n, n+m): a - w.prev - l d <= b - l ; rows [n+m, n+2m): a - u d <= 0
            sel = np.isin(wr, uj)
            row_of = np.full(n, -1)
            row_of[uj] = np.arange(m)
            r = np.r_[wr, np.arange(n), n + row_of[wr[sel]], n + np.arange(m), n + np.arange(m),
                      n + m + np.arange(m), n + m + np.arange(m)]
            c = np.r_[prev[wc], a_idx, prev[wc[sel]], a_idx[uj], d_idx, a_idx[uj], d_idx]
            v = np.r_[-w[wr, wc], np.ones(n), -w[wr[sel], wc[sel]], np.ones(m), -l[uj], np.ones(m), -u[uj]]
            blocks.append((n_row + r, c, v))
            r_lo += [b, np.full(2 * m, -np.inf)]
            r_hi += [np.where(unstable, np.inf, b), b[uj] - l[uj], np.zeros(m)]
            n_row += n + 2 * m
            prev, prev_keep = a_idx, keep
        self.n0, self.n_var, self.last, self.last_keep = n0, n_var, prev, prev_keep
        self.w_out, self.b_out = ws[-1], bs[-1]
        self.bounds = Bounds(np.concatenate(var_lo), np.concatenate(var_hi))
        self.integrality = np.concatenate(integ)
        self.a = None
        if n_row:
            r, c, v = (np.concatenate(t) for t in zip(*blocks))
            self.a = sparse.csr_matrix((v, (r, c)), shape=(n_row, n_var))
            self.r_lo, self.r_hi = np.concatenate(r_lo), np.concatenate(r_hi)

    def solve(self, c_row, tol, time_limit) -> _Solve:
        """``min m`` subject to ``m <= tol`` for the margin ``m = c_row @ z_L`` (``c_row: (n_L,)``), stopping at
        the first feasible point."""
        obj = np.zeros(self.n_var)
        obj[self.last] = (c_row @ self.w_out)[self.last_keep]
        cons = [LinearConstraint(sparse.csr_matrix(obj), -np.inf, tol - float(c_row @ self.b_out))]
        if self.a is not None:
            cons.append(LinearConstraint(self.a, self.r_lo, self.r_hi))
        r = _milp(obj, integrality=self.integrality, bounds=self.bounds, constraints=cons,
                  options={"time_limit": float(time_limit), "mip_rel_gap": 1e30})
        return _Solve(None if r.x is None else r.x[:self.n0], r.status == 2, int(r.get("mip_node_count") or 0))


def _milp(*args, **kwargs):
    """`scipy.optimize.milp` with the process's standard output sent to the null device while it runs: some HiGHS
    releases print a debug line (``HighsMipSolverData::transformNewIntegerFeasibleSolution``) there for every new
    incumbent, whatever their output options, thousands of lines per verification query."""
    with _stdout_silenced():
        return _scipy_milp(*args, **kwargs)


_SILENCE = {"lock": threading.Lock(), "depth": 0, "saved": None}


@contextlib.contextmanager
def _stdout_silenced():
    """File descriptor 1 on the null device inside, restored when the last thread inside leaves."""
    with _SILENCE["lock"]:
        if _SILENCE["depth"] == 0:
            sys.stdout.flush()
            _SILENCE["saved"] = os.dup(1)
            with open(os.devnull, "w") as null:
                os.dup2(null.fileno(), 1)
        _SILENCE["depth"] += 1
    try:
        yield
    finally:
        with _SILENCE["lock"]:
            _SILENCE["depth"] -= 1
            if _SILENCE["depth"] == 0:
                os.dup2(_SILENCE["saved"], 1)
                os.close(_SILENCE["saved"])


def _check_box(lo, hi, n0: int):
    lo, hi = np.asarray(lo, np.float64), np.asarray(hi, np.float64)
    if lo.shape != (n0,) or hi.shape != (n0,):
        raise InputError(f"box bounds must have shape ({n0},), got {lo.shape} and {hi.shape}")
    if not (np.all(np.isfinite(lo)) and np.all(np.isfinite(hi))):
        raise InputError("box bounds contain NaN or inf")
    if np.any(lo > hi):
        raise InputError(f"box is empty: lo > hi at {np.flatnonzero(lo > hi)[:5].tolist()}")
    return lo, hi


def _check_targets(label, targets, n_out: int):
    if not float(label).is_integer() or not 0 <= int(label) < n_out:
        raise InputError(f"label must be an integer in [0, {n_out}), got {label}")
    label = int(label)
    if targets is None:
        return label, [t for t in range(n_out) if t != label]
    t = np.asarray(targets).reshape(-1)
    if t.size == 0 or t.dtype.kind not in "iu" or t.min() < 0 or t.max() >= n_out or np.any(t == label):
        raise InputError(f"targets must be a non-empty list of classes in [0, {n_out}) other than the label "
                         f"{label}, got {t.tolist()}")
    return label, sorted(set(t.tolist()))


def _float32_inside(lo, hi):
    """The float32 box ``[lo32, hi32]`` inside the float64 box ``[lo, hi]``."""
    lo32, hi32 = lo.astype(np.float32), hi.astype(np.float32)
    lo32 = np.where(lo32 < lo, np.nextafter(lo32, np.float32(np.inf)), lo32)
    hi32 = np.where(hi32 > hi, np.nextafter(hi32, np.float32(-np.inf)), hi32)
    if np.any(lo32 > hi32):
        raise InputError(f"box holds no float32 point at {np.flatnonzero(lo32 > hi32)[:5].tolist()}")
    return lo32, hi32
