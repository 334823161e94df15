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

from .box_search import _logits, decide_box
from .errors import InputError
from .falsify import attack_falsifier
from .kernels.bab import network_brancher
from .kernels.bounds import robustness_spec
from .kernels.norms import check_norm, row_norm
from .kernels.perturb import check_eps
from .network import Network
from .subdomains import PendingStore, query_key
from .verdict import ROBUST, UNKNOWN, VIOLATED

STAGES = ("forward", "attack", "crown", "bab", "lp", "timeout", "domains", "memory", "lp-unknown")


class VerifyConfig(NamedTuple):
    timeout: float = 60.0          # seconds per query (wall clock)
    max_domains: int = 10 ** 7     # subdomains bounded per query
    max_pool_bytes: int = 2 ** 30  # memory of pending subdomains per query
    batch: int = 512               # subdomains per bounding call (a fixed, jitted shape)
    steps: int = 10                # α/β Adam iterations per subdomain batch (warm-started from the parent)
    root_steps: int = 100          # α iterations on the whole box
    intermediate_steps: int = 20   # α iterations for the hidden layers' bounds on the whole box
    split: str = "auto"            # "neurons", "inputs" (input splitting) or "auto" (box_search.INPUT_SPLIT_DIMS)
    fsb: int = 4                   # kink units whose children are bounded to pick a branch (0: BaBSR scores)
    refine: float = 0.25           # share of the time left for MILP-refined hidden-layer bounds (deep ReLU MLPs)
    refine_layers: int = 2         # hidden layers refined, from the second
    resume: bool = False           # complete oracle: a query over a smaller ball resumes an earlier timed-out pool
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


def robustness_specs(label: int, num_classes: int):
    """Rows ``C: (C-1, C)`` float32, ``d: (C-1,)`` of ``logit_label - logit_j > 0``, ascending ``j != label``
    (`kernels.bounds.robustness_spec` of one label)."""
    return np.asarray(robustness_spec(np.array([label]), num_classes)[0]), np.zeros(num_classes - 1)


def verify(net: Network, x, y, eps, cfg: VerifyConfig | None = None, *, key=None,
           progress: bool = False, norm: str = "linf", pending: PendingStore | None = None) -> VerifyResult:
    """Decide robustness of every query ``x: (B, *input_shape)``, ``y: (B,)``, ``eps`` scalar or ``(B,)`` over the
    ``norm`` ball (``"linf"``, ``"l2"`` or ``"l1"``) ∩ ``net.domain``; ``cfg`` default `VerifyConfig()`.

    L2 and L1 balls: the search runs on the ball's box hull with every bound concretised over the ball too (its
    dual norm); leaves are decided by LPs over the ball (`box_search`), counterexamples projected into it.

    ``pending``: a query left undecided on time keeps its pool of subdomains there, and a later query of the same
    input over a set inside it resumes from that pool (`subdomains`; what the complete oracle does across its
    bisection steps)."""
    x = np.asarray(net.check_inputs(x), np.float32)
    B = len(x)
    y = np.asarray(net.check_labels(y, B))
    radius = np.asarray(eps, np.float64)
    eps = np.asarray(check_eps(eps, B), np.float32)
    radius = np.broadcast_to(radius, (B,)).reshape((B,) + (1,) * (x.ndim - 1))
    cfg = VerifyConfig() if cfg is None else cfg
    check_config(cfg)
    norm = check_norm(norm)
    key = jax.random.PRNGKey(cfg.seed) if key is None else key
    brancher = network_brancher(net)
    outer, inner = float32_boxes(x - radius, x + radius, net.domain)
    status = np.full(B, UNKNOWN, np.int8)
    cex = np.full(x.shape, np.nan, np.float32)
    time_s, lower = np.zeros(B), np.full(B, -np.inf)
    domains, evals = np.zeros(B, np.int64), np.zeros(B, np.int64)
    stage = np.full(B, "", dtype=object)

    t0 = time.perf_counter()
    wrong = _logits(net, x).argmax(-1) != y
    status[wrong], cex[wrong], stage[wrong] = VIOLATED, x[wrong], "forward"
    rest = np.flatnonzero(~wrong)
    if len(rest) and cfg.attack_steps > 0:
        falsify = attack_falsifier(net, steps=cfg.attack_steps, restarts=cfg.attack_restarts,
                                   targets=cfg.attack_targets, norm=norm)
        v = falsify(x[rest], y[rest], eps[rest], key)
        found = v.status == VIOLATED
        if found.any():                       # keep those still wrong once rounded into the real ball
            pts = np.clip(v.counterexample[found], inner[0][rest[found]], inner[1][rest[found]])
            still = _logits(net, pts).argmax(-1) != y[rest[found]]
            hit = rest[found][still]
            status[hit], cex[hit], stage[hit] = VIOLATED, pts[still], "attack"
    time_s[:] = (time.perf_counter() - t0) / B

    todo = np.flatnonzero(status == UNKNOWN)
    if len(todo):
        bar = _progress(progress, len(todo), "query")
        report = None if bar is None else bar.report
        for i in todo:
            t1 = time.perf_counter()
            if bar is not None:
                bar.begin()
            C, d = robustness_specs(int(y[i]), net.num_classes)
            ball = None if norm == "linf" else (x[i].reshape(-1), float(eps[i]), norm)
            box = (outer[0][i].reshape(-1), outer[1][i].reshape(-1))
            qkey = None if pending is None else query_key(x[i], y[i], norm)
            resume = None if pending is None else pending.get(qkey, *box, ball, C, d)
            r = decide_box(net, brancher, box, C, d, cfg, deadline=t1 + max(cfg.timeout - time_s[i], 0.0),
                           inner=(inner[0][i].reshape(-1), inner[1][i].reshape(-1)), report=report, ball=ball,
                           resume=resume)
            if pending is not None and r.pending is not None:
                pending.put(qkey, r.pending)
            if bar is not None:
                bar.update(1)
            status[i], stage[i], domains[i], evals[i], lower[i] = r.status, r.stage, r.domains, r.bound_evals, r.lower
            if r.counterexample is not None:
                cex[i] = r.counterexample.reshape(x.shape[1:])
                if norm != "linf" and not _in_ball(cex[i], x[i], eps[i], norm):   # never VIOLATED outside it
                    status[i], stage[i], cex[i] = UNKNOWN, "lp-unknown", np.nan
            time_s[i] += time.perf_counter() - t1
        if bar is not None:
            bar.close()
    return VerifyResult(status, cex, time_s, domains, evals, lower, stage.astype(str))


def _in_ball(p, x, eps, norm) -> bool:
    """Whether ``||p - x||_p <= eps``, in float64."""
    return float(row_norm(np.asarray(p, np.float64)[None] - np.asarray(x, np.float64)[None], norm)[0]) <= float(eps)


def _progress(enabled: bool, total, unit: str):
    """A tqdm bar on stderr (None unless ``enabled``) whose ``report(domains, lower)`` shows the search of the
    query begun last (``begin()``): subdomains bounded, lowest pending bound, seconds spent on it."""
    if not enabled:
        return None
    from tqdm.auto import tqdm
    bar = tqdm(total=total, desc="verify", unit=unit)
    start = [time.perf_counter()]

    def begin():
        start[0] = time.perf_counter()

    def report(domains, low):
        bar.set_postfix_str(f"subdomains {domains}, bound {low:.4g}, {time.perf_counter() - start[0]:.1f} s")
        if total is None:
            bar.update(1)

    bar.begin, bar.report = begin, report
    return bar


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


class PropertyResult(NamedTuple):
    """Outcome of a VNN-LIB property: ``result`` is ``sat`` (violated; ``x``/``y`` hold the counterexample
    and its outputs), ``unsat`` (proved) or ``unknown``/``timeout``."""
    result: str
    x: np.ndarray | None        # (n_0,) flat input
    y: np.ndarray | None        # (n_L,) outputs at x
    time_s: float
    domains: int
    stage: str


def verify_property(net: Network, prop, cfg: VerifyConfig | None = None, *, progress: bool = False) -> PropertyResult:
    """Decide a VNN-LIB `vnnlib.Property` whose unsafe region is a union of half-spaces ``a . y <= b``
    (one comparison per disjunct, as in robustness properties) over exactly its input box.

    The box is the question: it is not intersected with ``net.domain``, so a box reaching outside the
    domain is verified as written (a counterexample may lie outside the domain); a box whose bounds
    have no float32 point between them is refused with an InputError naming the input."""
    cfg = VerifyConfig() if cfg is None else cfg
    check_config(cfg)
    t0 = time.perf_counter()
    brancher = network_brancher(net)
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
        out = _logits(net, xs.reshape((1,) + tuple(net.input_shape)))[0].astype(np.float32)
        return PropertyResult("sat", xs, out, time.perf_counter() - t0, 0, stage)

    if cfg.attack_steps > 0:
        xa = np.asarray(_box_attack(net, jnp.asarray(lo), jnp.asarray(hi), jnp.asarray(C), jnp.asarray(d),
                                    jax.random.PRNGKey(cfg.seed), cfg.attack_steps, max(cfg.attack_restarts, 4)))
        out = _logits(net, xa.reshape((1,) + tuple(net.input_shape)))[0]
        if np.any(C.astype(np.float64) @ out <= d):
            return found(xa, "attack")
    bar = _progress(progress, None, "round")
    r = decide_box(net, brancher, outer, C, d, cfg, deadline=t0 + cfg.timeout, inner=(lo, hi),
                   report=None if bar is None else bar.report)
    if bar is not None:
        bar.close()
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


def check_config(cfg: VerifyConfig):
    if not cfg.timeout > 0:
        raise InputError(f"timeout must be > 0 seconds, got {cfg.timeout}")
    if cfg.batch < 2 or cfg.batch % 2:
        raise InputError(f"batch must be an even number >= 2, got {cfg.batch}")
    if cfg.split not in ("auto", "neurons", "inputs"):
        raise InputError(f"split must be 'auto', 'neurons' or 'inputs', got {cfg.split!r}")
    if cfg.max_domains < 1 or cfg.steps < 0 or cfg.root_steps < 0:
        raise InputError("max_domains must be >= 1 and steps, root_steps >= 0")
    if cfg.fsb < 0:
        raise InputError(f"fsb must be >= 0, got {cfg.fsb}")
    if not 0 <= cfg.refine < 1 or cfg.refine_layers < 0:
        raise InputError(f"refine must lie in [0, 1) and refine_layers be >= 0, got {cfg.refine}, {cfg.refine_layers}")
