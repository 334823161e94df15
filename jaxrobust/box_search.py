"""Branch and bound over one input box: prove ``C @ net(x) > d`` on the box or find a point violating a row.

`decide_box` picks neuron splitting (`verify_box`: β-CROWN subdomains of the graph engine, `kernels.bab`, with
MILP-refined root bounds on deep ReLU MLPs and an exact LP at leaves) or input splitting (`verify_box_inputs`,
for networks of few inputs). Both return a `BoxResult`; `verify.verify` and `verify.verify_property` build
the boxes and specs. ``cfg`` is a `verify.VerifyConfig`.

With ``ball = (center (n_0,), eps, norm)``, an L2 or L1 ball, the set is the box ∩ the ball: every bound
concretises over both, candidate points are projected into the ball, and the LP of a leaf holds the ball's
constraints (L1 exactly, as linear constraints; L2 by tangent cuts at the LP's minimiser until it lies in the
ball, UNKNOWN if `L2_CUTS` do not get there).
"""
from __future__ import annotations

import functools
import math
import time
from typing import TYPE_CHECKING, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from .errors import UnsupportedOpError
from .kernels.attacks import box_descent
from .kernels.bab import MIN_WIDTH, Brancher, DomainBounds, Splits
from .kernels.bounds import MARGIN_ABS, MARGIN_REL, crown
from .kernels.forward_bounds import forward_linear
from .kernels.norms import project
from .network import Network
from .subdomains import STALE, Pending, children, compact, resume_pool, take_lowest
from .verdict import ROBUST, UNKNOWN, VIOLATED

if TYPE_CHECKING:
    from .verify import VerifyConfig

# Signed-gradient steps from every open subdomain's minimiser before it is checked as a counterexample.
DESCENT_STEPS = 5
# Dense ReLU networks with at least this many hidden layers get MILP-refined root bounds (``refine``).
REFINE_MIN_LAYERS = 3
# Networks with at most this many inputs are verified by input splitting under ``split="auto"``.
INPUT_SPLIT_DIMS = 20
# Error allowed for the float64 affine forms of an LP leaf, relative to their magnitude (float64 composition
# errs by ~1e-13 relative on these networks), and absolute.
LEAF_REL = 1e-9
LEAF_ABS = 1e-12
# Tangent cuts of an L2 ball added to the LP of a leaf before it is left undecided.
L2_CUTS = 50


class BoxResult(NamedTuple):
    status: int
    counterexample: np.ndarray | None   # (n_0,) flat input
    domains: int
    bound_evals: int
    lower: float
    stage: str
    pending: Pending | None = None      # the pool left, to resume over a smaller set (`subdomains`)


def decide_box(net: Network, brancher: Brancher, box, C, d, cfg: VerifyConfig, *, deadline: float,
               inner=None, report=None, ball=None, resume: Pending | None = None) -> BoxResult:
    """`verify_box_inputs` when ``cfg.split`` asks for input splitting (``"auto"``: networks with at most
    `INPUT_SPLIT_DIMS` inputs), else `verify_box` (neuron splitting). ``report(domains, lower)``, if given,
    is called after every round of the search with the subdomains bounded so far and the lowest pending bound.
    ``resume``: the pool of a query over a set covering this one (neuron splitting only; see `subdomains`)."""
    n_in = math.prod(net.input_shape)
    if cfg.split == "inputs" or (cfg.split == "auto" and n_in <= INPUT_SPLIT_DIMS):
        return verify_box_inputs(net, box, C, d, cfg, deadline=deadline, inner=inner, report=report, ball=ball)
    return verify_box(net, brancher, box, C, d, cfg, deadline=deadline, inner=inner, report=report, ball=ball,
                      resume=resume)


def _into(xs, in_lo, in_hi, ball):
    """Points ``xs: (k, n_0)`` moved into the inner box (and the ball, if any: projected onto it, then clipped to the
    box, which holds the ball's center, so the points stay in the ball)."""
    xs = np.clip(xs, in_lo, in_hi)
    if ball is None:
        return xs
    center, eps, norm = ball
    c = np.broadcast_to(center, xs.shape)
    moved = project(jnp.asarray(xs), jnp.asarray(c), jnp.full(len(xs), eps * (1 - 1e-6), jnp.float32), norm)
    return np.clip(np.asarray(moved), in_lo, in_hi)


def verify_box(net: Network, brancher: Brancher, box, C, d, cfg: VerifyConfig, *, deadline: float,
               inner=None, report=None, ball=None, resume: Pending | None = None) -> BoxResult:
    """Prove ``C @ net(x) > d`` for all ``x`` in the flat box ``box = (lo, hi)``, each ``(n_0,)``, or find
    ``x`` in ``inner`` (default the box itself) violating a row.

    ``C: (T, n_L)``, ``d: (T,)``. Runs stages 3–5 of the module doc until ``deadline`` (perf_counter), from the
    pool ``resume`` (a `subdomains.Pending` covering this box) instead of the root box if given.
    """
    shape = (1,) + tuple(net.input_shape)
    lo, hi = (jnp.asarray(b, jnp.float32).reshape(shape) for b in box)
    in_lo, in_hi = (np.asarray(b, np.float32).reshape(-1) for b in (box if inner is None else inner))
    box_lo, box_hi = (jnp.asarray(b).reshape(shape[1:]) for b in (in_lo, in_hi))
    C, d = np.asarray(C, np.float32), np.asarray(d, np.float32)
    bb = None if ball is None else (jnp.asarray(ball[0], jnp.float32).reshape(shape), ball[1], ball[2])
    root = brancher.root_bounds(lo, hi, cfg.intermediate_steps, ball=bb)
    lay = brancher.layout
    batch = cfg.batch

    def violating(xs, rows):
        """Candidates ``xs: (D, n_0)`` of the spec rows ``rows`` and the points a few signed-gradient steps on
        those rows take them to (`box_descent`), rounded into the inner box; returns ``(points, bad)``, ``bad``
        marking those a plain forward pass maps into the unsafe region (any spec row)."""
        n = len(xs)
        size, within = ((box_hi - box_lo) / 8, {}) if ball is None else (
            ball[1] / 8, {"ball": (bb[0][0], ball[1]), "norm": ball[2]})
        step = lambda x, c: np.asarray(box_descent(net, jnp.asarray(x).reshape((-1,) + shape[1:]), jnp.asarray(c),
                                                   box_lo, box_hi, size, steps=DESCENT_STEPS, decay=0.7, **within))
        moved = np.concatenate([step(x, c).reshape(len(x), -1)
                                for x, c in zip(_batches(xs, batch), _batches(C[rows], batch))])[:n]
        xs = _into(np.concatenate([xs, moved]), in_lo, in_hi, ball)
        out = np.concatenate([_logits(net, x.reshape((-1,) + shape[1:])) for x in _batches(xs, batch)])[:len(xs)]
        return xs, np.any(out @ C.T.astype(np.float64) <= d, axis=1)

    cmp = compact(brancher, root)
    pace = _Pace(batch)

    def bound(sp: Splits, rows, init, steps):
        """Bounds of ``len(rows) <= batch`` subdomains stored compactly (`subdomains.Compact`): `DomainBounds` as numpy,
        compact, lower shifted by ``d``. Batches are padded to 16, batch / 4 or batch rows, so only three
        shapes are compiled."""
        n = len(rows)
        size = pace.size(n)
        t0 = time.perf_counter()
        pad = lambda a: np.concatenate([a, np.repeat(a[:1], size - n, 0)])
        sp = sp._replace(s=cmp.expand(sp.s, cmp.free, lay.Hk))
        if init is not None:
            init = (cmp.expand(init[0], cmp.alpha_keep, lay.Ha), cmp.expand(init[1], cmp.beta_keep, lay.Hk + 2 * lay.Hi))
            init = tuple(jnp.asarray(pad(a), jnp.float32) for a in init)
        r = brancher.bound(root, lo, hi, jnp.asarray(pad(C[rows])), Splits(*(jnp.asarray(pad(a)) for a in sp)),
                           init, steps=steps, candidates=cfg.fsb, ball=bb)
        r = DomainBounds(*(np.asarray(a)[:n] for a in r))
        pace.seconds[size] = time.perf_counter() - t0
        lower = np.where(np.isnan(r.lower), -np.inf, r.lower)      # a NaN bound proves nothing
        return r._replace(lower=lower - d[rows], branch=cmp.branch(r.branch),
                          alpha=r.alpha[:, cmp.alpha_keep].astype(np.float16),
                          beta=r.beta[:, cmp.beta_keep].astype(np.float16))

    T = len(C)
    n_domains, n_evals = T, T * (cfg.root_steps + 1)
    root_sp = brancher.initial(root, T)
    root_sp = root_sp._replace(s=root_sp.s[:, cmp.free])
    r = bound(root_sp, np.arange(T), None, cfg.root_steps)
    xs, bad = violating(r.x_star, np.arange(T))
    if bad.any():
        return BoxResult(VIOLATED, xs[np.argmax(bad)], n_domains, n_evals, float(r.lower.min()), "bab")
    open_rows = r.lower <= 0
    refined = _refined_root(net, brancher, root, lo, hi, cfg, deadline) if open_rows.any() else None
    if refined is not None:         # the bounds and the units left free change: bound the root box again
        root, cmp = refined, compact(brancher, refined)
        root_sp = brancher.initial(root, T)
        root_sp = root_sp._replace(s=root_sp.s[:, cmp.free])
        r = bound(root_sp, np.arange(T), None, cfg.root_steps)
        n_domains, n_evals = n_domains + T, n_evals + T * (cfg.root_steps + 1)
        open_rows = r.lower <= 0
    if not open_rows.any():
        return BoxResult(ROBUST, None, n_domains, n_evals, float(r.lower.min()), "crown")

    # pending subdomains (`subdomains`): splits, spec row, lower bound, unit to branch on and its bounds, warm start
    keep = lambda a: a[open_rows]
    if resume is not None:      # what a query over a larger set left open covers all that is open here
        pool = resume_pool(resume, brancher, root, cmp, open_rows)
    else:
        pool = {"s": keep(root_sp.s), "ilo": keep(root_sp.ilo), "ihi": keep(root_sp.ihi), "t": np.flatnonzero(open_rows),
                "b": keep(r.lower), "br": keep(r.branch), "ul": keep(r.unit_lo), "uh": keep(r.unit_hi),
                "a": keep(r.alpha), "be": keep(r.beta)}
    proved_min = float(r.lower[~open_rows].min()) if (~open_rows).any() else np.inf
    undecided = np.inf          # lowest bound of leaves that could not be decided
    per_domain = cmp.Hk + 8 * cmp.Hi + 2 * len(cmp.alpha_keep) + 2 * len(cmp.beta_keep) + 32
    max_pool = max(1, cfg.max_pool_bytes // per_domain)
    stage = "bab"

    def stop(status, why, xs=None, pending=()):
        """The result when stopping early; ``lower`` is the smallest bound of the undecided subdomains; out of time
        or subdomains, with no leaf left undecided, the pool goes with it (`subdomains.Pending`)."""
        b = np.concatenate([pool["b"], *pending])
        keep = None
        if status == UNKNOWN and why in ("timeout", "domains") and undecided == np.inf:
            keep = Pending(pool, cmp, np.asarray(box[0], np.float32).reshape(-1),
                           np.asarray(box[1], np.float32).reshape(-1), ball, C, d)
        return BoxResult(status, xs, n_domains, n_evals, float(b.min()) if len(b) else -np.inf, why, keep)

    def absorb(doms, steps):
        """Bound the subdomains ``doms`` (pool fields, ``b`` sound lower bounds already known) and add the open
        ones to the pool; the `BoxResult` if a candidate point is a counterexample, else None."""
        nonlocal pool, n_domains, n_evals, proved_min
        r = bound(Splits(doms["s"], doms["ilo"], doms["ihi"]), doms["t"], (doms["a"], doms["be"]), steps)
        b = np.maximum(r.lower, doms["b"])
        n_domains += len(b)
        n_evals += len(b) * (steps + 1)
        open_ = b <= 0
        cand = np.flatnonzero(open_ & np.isfinite(b))
        if len(cand):
            pts, bad = violating(r.x_star[cand], doms["t"][cand])
            if bad.any():
                return stop(VIOLATED, "bab", pts[np.argmax(bad)], (b,))
        if (~open_).any():
            proved_min = min(proved_min, float(b[~open_].min()))
        new = dict(doms, b=b, br=r.branch, ul=r.unit_lo, uh=r.unit_hi, a=r.alpha, be=r.beta)
        pool = {k: np.concatenate([pool[k], new[k][open_]]) for k in pool}
        return None

    while len(pool["t"]):
        if report is not None:
            report(n_domains, float(pool["b"].min()))
        if time.perf_counter() > deadline:
            return stop(UNKNOWN, "timeout")
        if n_domains >= cfg.max_domains:
            return stop(UNKNOWN, "domains")
        if len(pool["t"]) > max_pool:
            return stop(UNKNOWN, "memory")
        exhausted = pool["br"] == -1
        if exhausted.any():
            for j in np.flatnonzero(exhausted):
                if time.perf_counter() > deadline:
                    return stop(UNKNOWN, "timeout")
                t = pool["t"][j]
                s_full = cmp.expand(pool["s"][j][None], cmp.free, lay.Hk)[0]
                verdict, xs = (_lp_leaf(brancher, root, lo, hi, s_full, C[t], d[t], ball)
                               if brancher.pure_kink else (UNKNOWN, None))
                if verdict == VIOLATED:
                    xs, bad = violating(xs, np.full(len(xs), t))
                    if bad.any():
                        return stop(VIOLATED, "lp", xs[np.argmax(bad)])
                if verdict != ROBUST:    # within round-off of 0, or not piecewise linear: go on with the rest
                    undecided = min(undecided, float(pool["b"][j]))
            stage = "lp"
            pool = {k: v[~exhausted] for k, v in pool.items()}
            continue
        stale = pool["br"] == STALE
        if stale.any():             # resumed subdomains: bounded over this set first, the lowest first
            doms, pool = take_lowest(pool, pace.fits(deadline), among=stale)
            done = absorb(doms, cfg.steps)
        else:
            par, pool = take_lowest(pool, pace.fits(deadline) // 2)
            done = absorb(children(cmp, par), cfg.steps)
        if done is not None:
            return done
    if undecided < np.inf:
        return BoxResult(UNKNOWN, None, n_domains, n_evals, undecided, "lp-unknown")
    return BoxResult(ROBUST, None, n_domains, n_evals, proved_min, stage)


def _refined_root(net: Network, brancher: Brancher, root, lo, hi, cfg: VerifyConfig, deadline: float):
    """``root`` with the unstable units of hidden layers 2 … ``cfg.refine_layers + 1`` tightened by MILP
    (`milp.refine_bounds`) within ``cfg.refine`` of the time left, for dense ReLU networks of at least
    `REFINE_MIN_LAYERS` hidden layers; None for other networks or when nothing tightened."""
    chain = _deep_chain(net) if cfg.refine > 0 and cfg.refine_layers > 0 else None
    kink = [v for v, _, _, _ in brancher.layout.kink]
    if chain is None or [math.prod(root[v][0].shape) for v in kink] != list(chain.widths[1:-1]):
        return None
    from .milp import hidden_bounds, intersect_root, refine_bounds
    bounds = hidden_bounds(root, kink)
    budget = cfg.refine * max(0.0, deadline - time.perf_counter())
    new = refine_bounds(chain, bounds, np.asarray(lo, np.float64).reshape(-1), np.asarray(hi, np.float64).reshape(-1),
                        layers=cfg.refine_layers, deadline=time.perf_counter() + budget)
    if all(np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1]) for a, b in zip(bounds, new)):
        return None
    return intersect_root(root, kink, new)


@functools.lru_cache(maxsize=4)
def _deep_chain(net: Network):
    """The dense ReLU chain of ``net`` if it is one with at least `REFINE_MIN_LAYERS` hidden layers, else None."""
    from .kernels.relu_chain import relu_chain
    try:
        chain = relu_chain(net, net.input_shape)
    except UnsupportedOpError:
        return None
    return chain if len(chain.weights) - 1 >= REFINE_MIN_LAYERS else None


def verify_box_inputs(net: Network, box, C, d, cfg: VerifyConfig, *, deadline: float, inner=None,
                      report=None, ball=None) -> BoxResult:
    """`verify_box` by input splitting: every sub-box is bounded with its own intermediate bounds, by forward-mode
    linear bounds (`kernels.forward_bounds`: their cost grows with the inputs, not with the width of hidden layers,
    so a classifier composed with a generator fits in memory) or, over an L2 / L1 ball, by CROWN (α-CROWN on the
    whole box); the open sub-box with the lowest bound is halved along the coordinate with the
    largest width times |gradient| of its spec row at its centre. Its centre and the vertex the gradient
    points away from are checked as counterexamples. For networks with few inputs (latent spaces)."""
    shape = tuple(net.input_shape)
    lo, hi = (np.asarray(b, np.float32).reshape(1, -1) for b in box)
    in_lo, in_hi = (np.asarray(b, np.float32).reshape(-1) for b in (box if inner is None else inner))
    C, d = np.asarray(C, np.float32), np.asarray(d, np.float32)
    batch = cfg.batch
    grad = _row_gradient(net)

    pace = _Pace(batch)

    def bound(los, his, rows, steps):
        n = len(rows)
        size = pace.size(n)
        t0 = time.perf_counter()
        pad = lambda a: np.concatenate([a, np.repeat(a[:1], size - n, 0)])
        box = (pad(los).reshape((-1,) + shape), pad(his).reshape((-1,) + shape), pad(C[rows])[:, None])
        if ball is None:        # forward mode: n_0 passes, never a backward pass per unit of a wide hidden layer
            b = forward_linear(net, *box).lower
        else:
            sub = (np.broadcast_to(ball[0], (size, ball[0].size)).reshape((-1,) + shape), ball[1], ball[2])
            b = crown(net, *box, alpha=steps > 0, alpha_steps=max(steps, 1), ball=sub).lower
        mid = pad((los + his) / 2)
        g = np.asarray(grad(jnp.asarray(mid).reshape((-1,) + shape), jnp.asarray(pad(C[rows]))))[:n].reshape(n, -1)
        cands = np.concatenate([mid[:n], np.where(g > 0, los, his)])
        cands = _into(cands, in_lo, in_hi, ball)
        out = _logits(net, cands.reshape((-1,) + shape))
        viol = np.any(out @ C.T.astype(np.float64) <= d, axis=1)
        width = his - los
        score = np.where(width > MIN_WIDTH * (1 + np.maximum(np.abs(los), np.abs(his))),
                         width * (np.abs(g) + 1e-6), -np.inf)
        b = np.where(np.isnan(np.asarray(b)[:n, 0]), -np.inf, np.asarray(b)[:n, 0])   # NaN proves nothing
        pace.seconds[size] = time.perf_counter() - t0
        return b - d[rows], cands[np.argmax(viol)] if viol.any() else None, score

    T = len(C)
    rows = np.arange(T)
    b, cex, score = bound(np.repeat(lo, T, 0), np.repeat(hi, T, 0), rows, cfg.root_steps)
    n_domains, n_evals = T, T * (cfg.root_steps + 1)
    if cex is not None:
        return BoxResult(VIOLATED, cex, n_domains, n_evals, float(b.min()), "bab")
    open_ = b <= 0
    if not open_.any():
        return BoxResult(ROBUST, None, n_domains, n_evals, float(b.min()), "crown")
    pool = {"lo": np.repeat(lo, open_.sum(), 0), "hi": np.repeat(hi, open_.sum(), 0), "t": rows[open_],
            "b": b[open_], "sc": score[open_]}
    proved_min = float(b[~open_].min()) if (~open_).any() else np.inf
    undecided = np.inf
    while len(pool["t"]):
        low = float(pool["b"].min())
        if report is not None:
            report(n_domains, low)
        if time.perf_counter() > deadline:
            return BoxResult(UNKNOWN, None, n_domains, n_evals, low, "timeout")
        if n_domains >= cfg.max_domains:
            return BoxResult(UNKNOWN, None, n_domains, n_evals, low, "domains")
        leaf = np.all(pool["sc"] == -np.inf, axis=1)
        if leaf.any():
            undecided = min(undecided, float(pool["b"][leaf].min()))
            pool = {k: v[~leaf] for k, v in pool.items()}
            continue
        par, pool = take_lowest(pool, pace.fits(deadline) // 2)
        P = len(par["t"])
        dim = np.argmax(par["sc"], axis=1)
        mid = (par["lo"][np.arange(P), dim] + par["hi"][np.arange(P), dim]) / 2
        clo, chi = np.concatenate([par["lo"], par["lo"]]), np.concatenate([par["hi"], par["hi"]])
        chi[np.arange(P), dim] = mid
        clo[P + np.arange(P), dim] = mid
        ct = np.concatenate([par["t"], par["t"]])
        b, cex, score = bound(clo, chi, ct, 0)
        b = np.maximum(b, np.concatenate([par["b"], par["b"]]))
        n_domains += 2 * P
        n_evals += 2 * P
        if cex is not None:
            return BoxResult(VIOLATED, cex, n_domains, n_evals, low, "bab")
        open_ = b <= 0
        if (~open_).any():
            proved_min = min(proved_min, float(b[~open_].min()))
        new = {"lo": clo, "hi": chi, "t": ct, "b": b, "sc": score}
        pool = {k: np.concatenate([pool[k], new[k][open_]]) for k in pool}
    if undecided < np.inf:
        return BoxResult(UNKNOWN, None, n_domains, n_evals, undecided, "lp-unknown")
    return BoxResult(ROBUST, None, n_domains, n_evals, proved_min, "bab")


class _Pace:
    """Padded batch shapes (16, ``batch / 4``, ``batch`` rows, so only three are compiled) and the last call's
    seconds at each; `fits` is the largest shape whose call the time left allows, so that a query ends near its
    deadline. A shape's time is estimated by its last call or, if less, linearly from another shape's (a first
    call may include compilation)."""

    def __init__(self, batch: int):
        self.sizes, self.seconds = (16, batch // 4, batch), {}

    def size(self, n: int) -> int:
        return next(s for s in self.sizes if s >= n)

    def fits(self, deadline: float) -> int:
        left = deadline - time.perf_counter()
        ok = [s for s in self.sizes if min((self.seconds[m] * s / m for m in self.seconds), default=0.0) <= left]
        return max(ok, default=self.sizes[0])


def _logits(net: Network, x) -> np.ndarray:
    """The plain forward pass that confirms counterexamples, at full float32 precision on every device;
    float64 numpy ``(B, n_out)``."""
    with jax.default_matmul_precision("highest"):
        return np.asarray(net(jnp.asarray(x)), np.float64)


@functools.lru_cache(maxsize=4)
def _row_gradient(net: Network):
    """Jitted ``(x (D, *in), c (D, n_out)) -> d(c . net(x))/dx`` per row."""
    return jax.jit(jax.vmap(jax.grad(lambda x, c: c @ net(x[None])[0])))


def _batches(a, batch: int) -> list:
    """``a`` in consecutive pieces of ``batch`` rows, padded (repeating row 0) to a multiple of 16 rows when
    shorter than 16, else of ``batch`` rows, so that jitted shapes repeat."""
    n = len(a)
    pad = -n % 16 if n <= 16 else -n % batch
    if pad:
        a = np.concatenate([a, np.repeat(a[:1], pad, 0)])
    return [a[i:i + batch] for i in range(0, len(a), batch)]


def _lp_leaf(brancher: Brancher, root, lo, hi, s, c, d, ball=None):
    """Exact ``min c . out - d`` over a subdomain whose kink units are all stable (the network is affine on it):
    an LP (HiGHS) in the input over the box (∩ ``ball``, see the module doc) and the split constraints, loosened by
    the float64 error of their affine forms (`LEAF_REL`). Over a box the minimum is certified by weak duality
    (`_dual_bound`), so a margin as small as ~1e-7 of the objective's scale is proved; over a ball, where the
    LP is reformulated, it must exceed the engine's round-off margin. Returns ``(ROBUST | VIOLATED | UNKNOWN,
    candidates (k, n_0) or None)``: for VIOLATED the minimiser and that of the LP with the constraints tightened
    by the slack instead (a point strictly inside the subdomain, for where round-off puts the first just
    outside)."""
    units, (A_out, a_out) = brancher.leaf(root, lo, hi, jnp.asarray(s))
    lo64, hi64 = np.asarray(lo, np.float64).reshape(-1), np.asarray(hi, np.float64).reshape(-1)
    top = np.maximum(np.abs(lo64), np.abs(hi64))
    rows, rhs, slacks = [], [], []
    for (v, k, off, n), (A, a0) in zip(brancher.layout.kink, units):
        sv = s[off:off + n]
        kk = np.broadcast_to(np.asarray(brancher.consts[k], np.float64), brancher.graph.shape(v)).reshape(-1)
        slack = LEAF_REL * (np.abs(A) @ top + np.abs(a0) + np.abs(kk)) + LEAF_ABS
        for sign in (1, -1):   # sign * (A x + a0 - k) >= 0  <=>  -sign A x <= sign (a0 - k) + slack
            m = sv == sign
            rows.append(-sign * A[m])
            rhs.append(sign * (a0[m] - kk[m]) + slack[m])
            slacks.append(slack[m])
    obj = np.asarray(c, np.float64) @ A_out
    const = float(np.asarray(c, np.float64) @ a_out) - float(d)
    A_ub = np.concatenate(rows) if rows else np.zeros((0, len(lo64)))
    b_ub = np.concatenate(rhs) if rows else np.zeros(0)
    scale = np.abs(obj) @ top + abs(const)
    # the objective's float64 error; over a ball also the solver's own tolerances (its minimum is not certified)
    enough = LEAF_REL * scale + LEAF_ABS if ball is None else MARGIN_REL * scale + MARGIN_ABS
    res = _ball_lp(obj, A_ub, b_ub, lo64, hi64, ball, enough - const)
    if res is None:
        return UNKNOWN, None
    if res.status == 2:
        return ROBUST, None
    if res.status != 0:
        return UNKNOWN, None
    low = res.fun if ball is not None else _dual_bound(obj, A_ub, b_ub, lo64, hi64, res)
    if low + const > enough:
        return ROBUST, None
    pts = [res.x]
    if rows:
        inner = _ball_lp(obj, A_ub, b_ub - 2 * np.concatenate(slacks), lo64, hi64, ball)
        if inner is not None and inner.status == 0:
            pts.append(inner.x)
    return VIOLATED, np.clip(np.stack(pts), lo64, hi64).astype(np.float32)


def _dual_bound(obj, A_ub, b_ub, lo, hi, res) -> float:
    """A lower bound of ``min obj . x`` s.t. ``A_ub x <= b_ub``, ``lo <= x <= hi`` that does not rely on the LP
    solver's tolerances: weak duality with its multipliers ``y >= 0`` (any ``y`` is sound),
    ``obj . x >= (obj + A_ubᵀ y) . x - y . b_ub``, minimised over the box, less a float64 round-off margin."""
    y = np.maximum(-np.asarray(res.ineqlin.marginals, np.float64), 0.0) if len(b_ub) else np.zeros(0)
    g = obj + A_ub.T @ y
    terms = np.where(g > 0, g * lo, np.where(g < 0, g * hi, 0.0))
    rhs = y * b_ub
    return float(terms.sum() - rhs.sum() - 1e-12 * (np.abs(terms).sum() + np.abs(rhs).sum()))


def _ball_lp(obj, A_ub, b_ub, lo, hi, ball, enough=np.inf):
    """``min obj . x`` s.t. ``A_ub x <= b_ub``, ``lo <= x <= hi`` (∩ ``ball``) by HiGHS: the scipy result, its ``x``
    the input part. For an L2 ball the cuts stop early once the minimum exceeds ``enough`` (its minimiser may then
    lie outside the ball); None if they do not reach the ball."""
    from scipy.optimize import linprog
    n = len(lo)
    if ball is None:
        return linprog(obj, A_ub=A_ub, b_ub=b_ub, bounds=np.stack([lo, hi], 1), method="highs")
    center, eps, norm = np.asarray(ball[0], np.float64).reshape(-1), float(ball[1]), ball[2]
    if norm == "l1":                # |x_i - c_i| <= t_i, sum t <= eps over variables (x, t)
        eye = np.eye(n)
        A = np.block([[A_ub, np.zeros((len(A_ub), n))], [eye, -eye], [-eye, -eye],
                      [np.zeros((1, n)), np.ones((1, n))]])
        b = np.concatenate([b_ub, center, -center, [eps]])
        res = linprog(np.concatenate([obj, np.zeros(n)]), A_ub=A, b_ub=b,
                      bounds=np.concatenate([np.stack([lo, hi], 1), np.tile([0.0, eps], (n, 1))]), method="highs")
        if res.status == 0:
            res.x = res.x[:n]
        return res
    cuts, cut_b = np.zeros((0, n)), np.zeros(0)
    for _ in range(L2_CUTS):        # tangent planes g . (x - c) <= eps, ||g|| = 1, at each minimiser outside the ball
        res = linprog(obj, A_ub=np.concatenate([A_ub, cuts]), b_ub=np.concatenate([b_ub, cut_b]),
                      bounds=np.stack([lo, hi], 1), method="highs")
        if res.status != 0:
            return res
        off = res.x - center
        r = np.linalg.norm(off)
        if r <= eps * (1 + 1e-6) or res.fun > enough:
            return res
        g = off / r
        cuts, cut_b = np.concatenate([cuts, g[None]]), np.concatenate([cut_b, [g @ center + eps]])
    return None
