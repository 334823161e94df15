"""Complete verification of local robustness: attack → CROWN / α-CROWN → branch and bound (β-CROWN).

Per query ``(x, y, ε)`` (or a VNN-LIB property: a box and linear output specs) the cascade stops at
the first stage that decides it:

1. forward pass: ``x`` itself misclassified → VIOLATED;
2. PGD (margin, then multi-targeted) in the ε-box → VIOLATED, counterexample re-checked;
3. α-CROWN on the whole box, one spec row ``c_t . out > d_t`` per wrong class → rows proved drop out;
4. branch and bound on ReLU splits (`kernels.bab`): subdomains of the remaining rows are bounded
   ``batch`` at a time in one jitted β-CROWN call, the lowest bounds first; each is split on the
   neuron with the highest BaBSR-like score; the minimiser of every subdomain's linear bound is
   checked by a forward pass (a counterexample search inside each subdomain);
5. a subdomain without free unstable neurons is linear: an exact LP (HiGHS) decides it.

ROBUST is returned only when every subdomain of every row is proved; VIOLATED only with a point of
the box that a plain forward pass of the network maps into the unsafe region; otherwise UNKNOWN
(time, subdomain or memory budget exhausted). Work is deterministic for a given seed; only the
time budget depends on the machine.
"""
from __future__ import annotations

import functools
import time
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from .errors import InputError
from .kernels.bab import box_bounds, domain_bounds
from .kernels.bounds import MARGIN_ABS, MARGIN_REL
from .kernels.perturb import check_eps
from .kernels.relu_chain import ReluChain, relu_chain
from .network import Network
from .oracles import ROBUST, UNKNOWN, VIOLATED, Oracle, Verdicts, attack_falsifier

STAGES = ("forward", "attack", "crown", "bab", "lp", "timeout", "domains", "memory", "lp-unknown")


class VerifyConfig(NamedTuple):
    timeout: float = 60.0          # seconds per query (wall clock)
    max_domains: int = 10 ** 7     # subdomains bounded per query
    max_pool_bytes: int = 2 ** 28  # memory of pending subdomains per query
    batch: int = 512               # subdomains per bounding call (a fixed, jitted shape)
    steps: int = 10                # α/β Adam iterations per subdomain batch (warm-started from the parent)
    root_steps: int = 100          # α iterations on the whole box
    intermediate_steps: int = 20   # α iterations for the hidden layers' bounds on the whole box
    attack_steps: int = 40
    attack_restarts: int = 1
    attack_targets: int = 9
    seed: int = 0


class VerifyResult(NamedTuple):
    """Per query ``(B,)`` arrays; ``counterexample (B, *input_shape)`` is NaN where not VIOLATED."""
    status: np.ndarray         # int8: ROBUST / UNKNOWN / VIOLATED
    counterexample: np.ndarray
    time_s: np.ndarray
    domains: np.ndarray        # subdomains bounded (the root box counts once per spec row)
    bound_evals: np.ndarray    # bound propagations: subdomains x (Adam steps + 1)
    lower: np.ndarray          # smallest proved lower bound of the spec rows at the end (-inf: none)
    stage: np.ndarray          # str: the stage that decided (STAGES)


_CHAINS: dict = {}


def network_chain(net: Network) -> ReluChain:
    """The dense `ReluChain` of ``net`` (cached by content hash)."""
    key = (net.hash, tuple(net.input_shape))
    if key not in _CHAINS:
        _CHAINS.clear()
        _CHAINS[key] = relu_chain(net, net.input_shape)
    return _CHAINS[key]


def robustness_specs(label: int, num_classes: int):
    """Rows ``C: (C-1, C)``, ``d: (C-1,)`` of ``logit_label - logit_j > 0``, ascending ``j != label``."""
    eye = np.eye(num_classes, dtype=np.float32)
    return np.stack([eye[label] - eye[j] for j in range(num_classes) if j != label]), np.zeros(num_classes - 1)


def verify(net: Network, x, y, eps, cfg: VerifyConfig | None = None, *, key=None,
           progress: bool = False) -> VerifyResult:
    """Decide L∞ robustness of every query ``x: (B, *input_shape)``, ``y: (B,)``, ``eps`` scalar or ``(B,)``
    (boxes clipped to ``net.domain``); ``cfg`` default `VerifyConfig()`."""
    x = np.asarray(net.check_inputs(x), np.float32)
    B = len(x)
    y = np.asarray(net.check_labels(y, B))
    radius = np.asarray(eps, np.float64)
    eps = np.asarray(check_eps(eps, B), np.float32)
    radius = np.broadcast_to(radius, (B,)).reshape((B,) + (1,) * (x.ndim - 1))
    cfg = VerifyConfig() if cfg is None else cfg
    _check_config(cfg)
    key = jax.random.PRNGKey(cfg.seed) if key is None else key
    outer, inner = float32_boxes(x - radius, x + radius, net.domain)
    status = np.full(B, UNKNOWN, np.int8)
    cex = np.full(x.shape, np.nan, np.float32)
    time_s, lower = np.zeros(B), np.full(B, -np.inf)
    domains, evals = np.zeros(B, np.int64), np.zeros(B, np.int64)
    stage = np.full(B, "", dtype=object)

    t0 = time.perf_counter()
    wrong = np.asarray(net(x)).argmax(-1) != y
    status[wrong], cex[wrong], stage[wrong] = VIOLATED, x[wrong], "forward"
    rest = np.flatnonzero(~wrong)
    if len(rest) and cfg.attack_steps > 0:
        falsify = attack_falsifier(net, steps=cfg.attack_steps, restarts=cfg.attack_restarts,
                                   targets=cfg.attack_targets)
        v = falsify(x[rest], y[rest], eps[rest], key)
        found = v.status == VIOLATED
        if found.any():                       # keep those still wrong once rounded into the real ball
            pts = np.clip(v.counterexample[found], inner[0][rest[found]], inner[1][rest[found]])
            still = np.asarray(net(pts)).argmax(-1) != y[rest[found]]
            hit = rest[found][still]
            status[hit], cex[hit], stage[hit] = VIOLATED, pts[still], "attack"
    time_s[:] = (time.perf_counter() - t0) / B

    todo = np.flatnonzero(status == UNKNOWN)
    if len(todo):
        chain = network_chain(net)
        it = todo
        if progress:
            from tqdm.auto import tqdm
            it = tqdm(todo, desc="verify", unit="query")
        for i in it:
            t1 = time.perf_counter()
            C, d = robustness_specs(int(y[i]), net.num_classes)
            r = verify_box(net, chain, (outer[0][i].reshape(-1), outer[1][i].reshape(-1)), C, d, cfg,
                           deadline=t1 + max(cfg.timeout - time_s[i], 0.0),
                           inner=(inner[0][i].reshape(-1), inner[1][i].reshape(-1)))
            status[i], stage[i], domains[i], evals[i], lower[i] = r.status, r.stage, r.domains, r.bound_evals, r.lower
            if r.counterexample is not None:
                cex[i] = r.counterexample.reshape(x.shape[1:])
            time_s[i] += time.perf_counter() - t1
    return VerifyResult(status, cex, time_s, domains, evals, lower, stage.astype(str))


def float32_boxes(lo, hi, domain=None):
    """The real box ``[lo, hi]`` (float64 arrays), intersected with ``domain`` unless None, as float32 boxes
    ``(outer, inner)``, each ``(lo, hi)``: ``outer`` contains every real point of it (proofs are made on it),
    ``inner`` only points of it (counterexamples are rounded into it)."""
    lo, hi = np.asarray(lo, np.float64), np.asarray(hi, np.float64)
    if domain is not None:
        lo, hi = np.clip(lo, *domain), np.clip(hi, *domain)

    def rounded(v, down):
        f = v.astype(np.float32)
        off = f > v if down else f < v
        return np.where(off, np.nextafter(f, np.float32(-np.inf if down else np.inf)), f).astype(np.float32)

    return (rounded(lo, True), rounded(hi, False)), (rounded(lo, False), rounded(hi, True))


class BoxResult(NamedTuple):
    status: int
    counterexample: np.ndarray | None   # (n_0,) flat input
    domains: int
    bound_evals: int
    lower: float
    stage: str


def verify_box(net: Network, chain: ReluChain, box, C, d, cfg: VerifyConfig, *, deadline: float,
               inner=None) -> BoxResult:
    """Prove ``C @ net(x) > d`` for all ``x`` in the flat box ``box = (lo, hi)``, each ``(n_0,)``, or find
    ``x`` in ``inner`` (default the box itself) violating a row.

    ``C: (T, n_L)``, ``d: (T,)``. Runs stages 3–5 of the module doc until ``deadline`` (perf_counter).
    """
    lo, hi = (jnp.asarray(b, jnp.float32) for b in box)
    in_lo, in_hi = (np.asarray(b, np.float32) for b in (box if inner is None else inner))
    C, d = np.asarray(C, np.float32), np.asarray(d, np.float32)
    widths = chain.widths[1:-1]
    H = int(sum(widths))
    lowers, uppers = box_bounds(chain, lo, hi, steps=cfg.intermediate_steps)
    shape = (-1,) + tuple(net.input_shape)

    batch = cfg.batch

    def violating(xs):
        """``xs: (D, n_0)`` rounded into the inner box, and which of them a plain forward pass maps into
        the unsafe region (any spec row)."""
        xs = np.clip(xs, in_lo, in_hi)
        n = len(xs)
        pad = -n % 16 if n <= 16 else -n % batch
        xp = np.concatenate([xs, np.repeat(xs[:1], pad, 0)]) if pad else xs
        out = np.concatenate([np.asarray(net(jnp.asarray(xp[i:i + batch]).reshape(shape)), np.float64)
                              for i in range(0, len(xp), batch)])[:n]
        return xs, np.any(out @ C.T.astype(np.float64) <= d, axis=1)

    def bound(splits, rows, init, steps):
        """Bounds of ``len(rows) <= batch`` subdomains: lower, x*, branch, alpha, beta. Batches are padded
        to 16, batch / 4 or batch rows, so only three shapes are compiled."""
        n = len(rows)
        size = next(s for s in (16, batch // 4, batch) if s >= n)
        pad = lambda a: np.concatenate([a, np.repeat(a[:1], size - n, 0)])
        parts = np.split(pad(splits), np.cumsum(widths)[:-1], axis=1)
        init = None if init is None else tuple(jnp.asarray(pad(a), jnp.float32) for a in init)
        r = domain_bounds(chain, lo, hi, lowers, uppers, tuple(jnp.asarray(p) for p in parts),
                          jnp.asarray(pad(C[rows])), init, steps=steps)
        lower = np.asarray(r.lower)[:n] - d[rows]
        return lower, np.asarray(r.x_star)[:n], np.asarray(r.branch)[:n], \
            np.asarray(r.alpha)[:n].astype(np.float16), np.asarray(r.beta)[:n].astype(np.float16)

    T = len(C)
    n_domains, n_evals = T, T * (cfg.root_steps + 1)
    root = bound(np.zeros((T, H), np.int8), np.arange(T), None, cfg.root_steps)
    root_b, root_x = root[0], root[1]
    root_x, bad = violating(root_x)
    if bad.any():
        return BoxResult(VIOLATED, root_x[np.argmax(bad)], n_domains, n_evals, float(root_b.min()), "bab")
    open_rows = root_b <= 0
    if not open_rows.any():
        return BoxResult(ROBUST, None, n_domains, n_evals, float(root_b.min()), "crown")

    # pending subdomains: split states, spec row, lower bound, neuron to branch on, warm start (alpha, beta)
    pool = {"s": np.zeros((int(open_rows.sum()), H), np.int8), "t": np.flatnonzero(open_rows),
            "b": root_b[open_rows], "br": root[2][open_rows], "a": root[3][open_rows], "be": root[4][open_rows]}
    proved_min = float(root_b[~open_rows].min()) if (~open_rows).any() else np.inf
    undecided = np.inf          # lowest bound of subdomains whose exact LP minimum is within round-off of 0
    max_pool = max(1, cfg.max_pool_bytes // (5 * max(H, 1)))
    stage = "bab"

    def stop(status, why, xs=None, pending=()):
        """The result when stopping early; ``lower`` is the smallest bound of the undecided subdomains."""
        b = np.concatenate([pool["b"], *pending])
        return BoxResult(status, xs, n_domains, n_evals, float(b.min()) if len(b) else -np.inf, why)

    while len(pool["t"]):
        if time.perf_counter() > deadline:
            return stop(UNKNOWN, "timeout")
        if n_domains >= cfg.max_domains:
            return stop(UNKNOWN, "domains")
        if len(pool["t"]) > max_pool:
            return stop(UNKNOWN, "memory")
        exhausted = pool["br"] < 0
        if exhausted.any():
            for j in np.flatnonzero(exhausted):
                if time.perf_counter() > deadline:
                    return stop(UNKNOWN, "timeout")
                t = pool["t"][j]
                verdict, xs = _lp_subdomain(chain, lo, hi, lowers, uppers, pool["s"][j], C[t], d[t])
                if verdict == VIOLATED:
                    xs, bad = violating(xs[None])
                    if bad[0]:
                        return stop(VIOLATED, "lp", xs[0])
                if verdict != ROBUST:    # within round-off of 0: undecidable in float32, go on with the rest
                    undecided = min(undecided, float(pool["b"][j]))
            stage = "lp"
            pool = {k: v[~exhausted] for k, v in pool.items()}
            continue
        order = np.argsort(pool["b"], kind="stable")
        take, left = order[:batch // 2], order[batch // 2:]
        par = {k: v[take] for k, v in pool.items()}
        pool = {k: v[left] for k, v in pool.items()}
        P = len(take)
        cs = np.concatenate([par["s"], par["s"]])
        cs[np.arange(P), par["br"]] = 1
        cs[P + np.arange(P), par["br"]] = -1
        ct = np.concatenate([par["t"], par["t"]])
        be = np.concatenate([par["be"], par["be"]])
        be[np.arange(2 * P), np.concatenate([par["br"], par["br"]])] = 0
        b, xs, br, al, be = bound(cs, ct, (np.concatenate([par["a"], par["a"]]), be), cfg.steps)
        b = np.maximum(b, np.concatenate([par["b"], par["b"]]))
        n_domains += 2 * P
        n_evals += 2 * P * (cfg.steps + 1)
        open_ = b <= 0
        if open_.any():
            cand = np.flatnonzero(open_)
            pts, bad = violating(xs[cand])
            if bad.any():
                return stop(VIOLATED, "bab", pts[np.argmax(bad)], (b,))
        if (~open_).any():
            proved_min = min(proved_min, float(b[~open_].min()))
        new = {"s": cs, "t": ct, "b": b, "br": br, "a": al, "be": be}
        pool = {k: np.concatenate([pool[k], new[k][open_]]) for k in pool}
    if undecided < np.inf:
        return BoxResult(UNKNOWN, None, n_domains, n_evals, undecided, "lp-unknown")
    return BoxResult(ROBUST, None, n_domains, n_evals, proved_min, stage)


class PropertyResult(NamedTuple):
    """Outcome of a VNN-LIB property: ``result`` is ``sat`` (violated; ``x``/``y`` hold the counterexample
    and its outputs), ``unsat`` (proved) or ``unknown``/``timeout``."""
    result: str
    x: np.ndarray | None        # (n_0,) flat input
    y: np.ndarray | None        # (n_L,) outputs at x
    time_s: float
    domains: int
    stage: str


def verify_property(net: Network, prop, cfg: VerifyConfig | None = None) -> PropertyResult:
    """Decide a VNN-LIB `vnnlib.Property` whose unsafe region is a union of half-spaces ``a . y <= b``
    (one comparison per disjunct, as in robustness properties) over exactly its input box.

    The box is the question: it is not intersected with ``net.domain``, so a box reaching outside the
    domain is verified as written (a counterexample may lie outside the domain); a box whose bounds
    have no float32 point between them is refused with an InputError naming the input."""
    cfg = VerifyConfig() if cfg is None else cfg
    _check_config(cfg)
    t0 = time.perf_counter()
    n0 = int(np.prod(net.input_shape))
    if prop.lower.size != n0 or prop.n_outputs != net.num_classes:
        raise InputError(f"the property has {prop.lower.size} inputs and {prop.n_outputs} outputs; the network "
                         f"takes {n0} inputs and has {net.num_classes} outputs")
    if any(a.shape[0] != 1 for a, _ in prop.disjuncts):
        raise InputError("only unsafe regions that are unions of single comparisons (a . y <= b) are supported")
    outer, (lo, hi) = float32_boxes(prop.lower, prop.upper)
    empty = np.flatnonzero(lo > hi)
    if len(empty):
        i = int(empty[0])
        raise InputError(f"the property's bounds of X_{i} ({prop.lower[i]!r} <= X_{i} <= {prop.upper[i]!r}) "
                         "hold no float32 value")
    C = np.concatenate([a for a, _ in prop.disjuncts]).astype(np.float32)
    d = np.concatenate([b for _, b in prop.disjuncts]).astype(np.float32)

    def found(xs, stage):
        out = np.asarray(net(jnp.asarray(xs).reshape((1,) + tuple(net.input_shape))))[0]
        return PropertyResult("sat", xs, out, time.perf_counter() - t0, 0, stage)

    if cfg.attack_steps > 0:
        xa = np.asarray(_box_attack(net, jnp.asarray(lo), jnp.asarray(hi), jnp.asarray(C), jnp.asarray(d),
                                    jax.random.PRNGKey(cfg.seed), cfg.attack_steps, max(cfg.attack_restarts, 4)))
        out = np.asarray(net(jnp.asarray(xa).reshape((1,) + tuple(net.input_shape))), np.float64)[0]
        if np.any(C.astype(np.float64) @ out <= d):
            return found(xa, "attack")
    r = verify_box(net, network_chain(net), outer, C, d, cfg, deadline=t0 + cfg.timeout, inner=(lo, hi))
    if r.status == VIOLATED:
        return found(r.counterexample, r.stage)._replace(domains=r.domains)
    result = "unsat" if r.status == ROBUST else ("timeout" if r.stage == "timeout" else "unknown")
    return PropertyResult(result, None, None, time.perf_counter() - t0, r.domains, r.stage)


@functools.partial(jax.jit, static_argnums=(6, 7))
def _box_attack(net: Network, lo, hi, C, d, key, steps: int, restarts: int):
    """Signed-gradient descent on ``min_t (C @ net(x) - d)_t`` over the box ``[lo, hi]: (n_0,)`` from
    ``restarts`` random starts; the best point ``(n_0,)``."""
    shape = (restarts,) + tuple(net.input_shape)
    objective = lambda xs: jnp.min(net(xs.reshape(shape)) @ C.T - d, axis=-1)
    xs = lo + jax.random.uniform(key, (restarts, lo.size)) * (hi - lo)
    size = (hi - lo) / 4

    def step(i, xs):
        g = jax.grad(lambda v: jnp.sum(objective(v)))(xs)
        return jnp.clip(xs - size * (1 - i / steps) * jnp.sign(g), lo, hi)

    xs = jax.lax.fori_loop(0, steps, step, xs)
    return xs[jnp.argmin(objective(xs))]


def _lp_subdomain(chain: ReluChain, lo, hi, lowers, uppers, split, c, d):
    """Exact ``min c . out - d`` over a subdomain whose neurons are all fixed (by the box bounds or the
    split): an LP in the input. Returns ``(ROBUST | VIOLATED | UNKNOWN, minimiser or None)``."""
    from scipy.optimize import linprog

    lo64, hi64 = np.asarray(lo, np.float64), np.asarray(hi, np.float64)
    n0 = lo64.size
    A, a0 = np.eye(n0), np.zeros(n0)
    rows, rhs = [], []
    offset = 0
    for k, (w, b) in enumerate(zip(chain.weights, chain.biases)):
        w, b = np.asarray(w, np.float64), np.asarray(b, np.float64)
        A, a0 = w @ A, w @ a0 + b
        if k == len(chain.weights) - 1:
            break
        n = w.shape[0]
        s = split[offset:offset + n]
        l, u = np.asarray(lowers[k]), np.asarray(uppers[k])
        active = (l >= 0) | (s > 0)
        inactive = ((u <= 0) | (s < 0)) & ~active
        if np.any((l >= 0) & (s < 0)) or np.any((u <= 0) & (s > 0)):
            return ROBUST, None                   # contradictory split: empty subdomain
        rows += [-A[active], A[inactive]]
        rhs += [a0[active], -a0[inactive]]
        A, a0 = A * active[:, None], a0 * active
        offset += n
    obj = np.asarray(c, np.float64) @ A
    const = float(np.asarray(c, np.float64) @ a0) - float(d)
    res = linprog(obj, A_ub=np.concatenate(rows), b_ub=np.concatenate(rhs), bounds=np.stack([lo64, hi64], 1),
                  method="highs")
    if res.status == 2:
        return ROBUST, None
    if res.status != 0:
        return UNKNOWN, None
    value = res.fun + const
    scale = np.abs(obj) @ np.maximum(np.abs(lo64), np.abs(hi64)) + abs(const)
    if value > MARGIN_REL * scale + MARGIN_ABS:
        return ROBUST, None
    return VIOLATED, np.clip(res.x, lo64, hi64).astype(np.float32)


def _check_config(cfg: VerifyConfig):
    if not cfg.timeout > 0:
        raise InputError(f"timeout must be > 0 seconds, got {cfg.timeout}")
    if cfg.batch < 2 or cfg.batch % 2:
        raise InputError(f"batch must be an even number >= 2, got {cfg.batch}")
    if cfg.max_domains < 1 or cfg.steps < 0 or cfg.root_steps < 0:
        raise InputError("max_domains must be >= 1 and steps, root_steps >= 0")


def complete_oracle(net: Network, **options) -> Oracle:
    """Oracle whose ``prove`` runs the whole cascade (ROBUST, VIOLATED or UNKNOWN on budget) and whose
    ``falsify`` is the attack alone. ``options``: fields of `VerifyConfig`."""
    cfg = VerifyConfig(**options)

    def prove(x, y, eps, key) -> Verdicts:
        r = verify(net, x, y, eps, cfg, key=key)
        return Verdicts(r.status, r.counterexample)

    falsify = attack_falsifier(net, steps=cfg.attack_steps, restarts=cfg.attack_restarts,
                               targets=cfg.attack_targets)
    return Oracle("complete", prove, falsify)
