"""Critical ε per input by batched bisection over an oracle (Bosman et al., JAIR 2025).

For each input the search keeps two monotone brackets, advanced together in one batched oracle
call per step (every input has its own brackets):

* proof bracket  ``[lower, p_hi]``: ``lower`` is the largest ε proved ROBUST, ``p_hi`` the smallest ε
  where a proof failed;
* falsification bracket ``[c_lo, upper]``: ``upper`` is the distance (in the oracle's norm: L∞, L2 or L1) of the
  closest confirmed counterexample, ``c_lo`` the largest ε where the search for one failed.

Robustness is monotone in ε, so a proof at ε holds below it and a counterexample at distance d
is one for every ε >= d. With a complete oracle both brackets meet; with an incomplete one a gap
``[lower, upper]`` may remain. The falsification bracket is warm-started by an attack at ``eps_max``
(the distance of what it finds is an upper bound). An oracle with a minimum-norm attack (``minimize``) makes
that first query with it and closes the bracket at the distance found (one query instead of a bisection). An
oracle with a ``warm`` oracle (the complete one: CROWN proofs and the minimum-norm attack) runs that search first
and starts from its brackets, so its costly queries only bisect what the cheap ones left open.

Status per input: ``exact`` (upper − lower <= tol, or adjacent grid values), ``gap``, ``censored``
(no counterexample up to ``eps_max``: ``upper`` is NaN), ``misclassified`` (wrong at ε = 0: both 0),
``error`` (the oracle failed: both NaN, never 0).
"""
from __future__ import annotations

import time
from collections.abc import Sequence
from typing import NamedTuple

import jax
import numpy as np

from .errors import InputError, JaxRobustError
from .falsify import padded_call
from .kernels.norms import check_norm
from .network import Network
from .oracles import Oracle, distance
from .verdict import ROBUST, VIOLATED

STATUSES = ("exact", "gap", "censored", "misclassified", "error")


class SearchConfig(NamedTuple):
    """``tol`` for a continuous search on ``[0, eps_max]``, or a sorted ``grid`` of ε values (then ``tol`` is unused)."""
    eps_max: float = 0.5
    tol: float = 0.001
    grid: tuple | None = None
    max_steps: int = 40
    seed: int = 0


class CriticalEps(NamedTuple):
    """Per-input results, arrays of length N."""
    eps_lower: np.ndarray       # (N,) largest ε proved robust (0 = only ε = 0, by the forward pass)
    eps_upper: np.ndarray       # (N,) distance of the closest counterexample (on a grid: the smallest grid
                                #      value it lies within); NaN if none found
    status: np.ndarray          # (N,) str, one of STATUSES
    counterexample: np.ndarray  # (N, *shape), NaN rows where none
    predicted: np.ndarray       # (N,) label predicted at ε = 0
    time_s: np.ndarray          # (N,) oracle time attributed to each input
    queries: np.ndarray         # (N,) oracle queries made
    errors: dict                # data index -> message, for inputs whose status is "error"


def _next_query(a: np.ndarray, b: np.ndarray, cfg: SearchConfig) -> np.ndarray:
    """A point strictly inside each ``(a, b)`` to query next, or NaN when the bracket has converged."""
    if cfg.grid is None:
        return np.where(b - a > cfg.tol, (a + b) / 2, np.nan)
    g = np.asarray(cfg.grid)
    i = np.searchsorted(g, a, side="right")
    j = np.searchsorted(g, b, side="left") - 1
    return np.where(i <= j, g[np.clip((i + j) // 2, 0, len(g) - 1)], np.nan)


def check_config(cfg: SearchConfig) -> SearchConfig:
    """``cfg`` validated (`InputError`), with ``eps_max`` set to the last grid value on a grid."""
    if not cfg.eps_max > 0 or (cfg.grid is None and not cfg.tol > 0):
        raise InputError(f"eps_max and tol must be > 0 (got {cfg.eps_max}, {cfg.tol})")
    if cfg.max_steps < 1:
        raise InputError(f"max_steps must be >= 1, got {cfg.max_steps}")
    if cfg.grid is not None:
        g = np.asarray(cfg.grid, float)
        if g.ndim != 1 or g.size < 1 or np.any(np.diff(g) <= 0) or g[0] <= 0:
            raise InputError("grid must be a strictly increasing sequence of positive ε values")
        cfg = cfg._replace(eps_max=float(g[-1]))
    return cfg


def search(net: Network, oracle: Oracle, x, y, cfg: SearchConfig = SearchConfig(), *,  # noqa: B008  (immutable)
           batch_size: int = 256, indices: Sequence[int] | None = None) -> CriticalEps:
    """Critical ε of every input in ``x: (N, *input_shape)`` with labels ``y: (N,)``.

    ``indices`` (global data indices, default ``range(N)``) seed the per-query randomness so a result does
    not depend on which other inputs share the batch.
    """
    x = net.check_inputs(x)
    n = len(x)
    y = net.check_labels(y, n)
    cfg = check_config(cfg)
    indices = np.arange(n) if indices is None else np.asarray(indices)

    pred = _predict(net, x, batch_size)
    correct = pred == y
    lower, p_hi = np.zeros(n), np.full(n, cfg.eps_max)
    upper, c_lo = np.full(n, np.nan), np.zeros(n)
    cex = np.full(x.shape, np.nan, np.float32)
    time_s, queries = np.zeros(n), np.zeros(n, int)
    censored, failed = np.zeros(n, bool), np.zeros(n, bool)
    errors: dict[int, str] = {}
    key = jax.random.PRNGKey(cfg.seed)
    if oracle.warm is not None:     # its brackets (sound: a proof and a confirmed counterexample) are the start
        w = search(net, oracle.warm, x, y, cfg, batch_size=batch_size, indices=indices)
        usable = (w.status != "error") & correct
        lower[usable], time_s[:], queries[:] = w.eps_lower[usable], w.time_s, w.queries
        upper[usable], cex[usable] = w.eps_upper[usable], w.counterexample[usable]
        c_lo[usable] = np.where(np.isnan(upper[usable]), cfg.eps_max, upper[usable])   # falsify bracket closed
        censored[usable] = np.isnan(upper[usable])

    def found(bv, points, closes_bracket: bool):
        """Counterexamples ``points`` of the inputs ``bv``: the closer ones become the upper bounds; a
        minimising attack's also close the falsify bracket."""
        d = distance(points, x[bv], oracle.norm)
        if cfg.grid is not None:  # on a grid, upper is the smallest grid value holding a counterexample
            g = np.asarray(cfg.grid)
            d = g[np.minimum(np.searchsorted(g, d - 1e-6), len(g) - 1)]
        closer = np.isnan(upper[bv]) | (d < upper[bv])
        upper[bv[closer]] = d[closer]
        cex[bv[closer]] = points[closer]
        p_hi[bv] = np.minimum(p_hi[bv], d)
        if closes_bracket:
            c_lo[bv] = upper[bv]

    def last_resort(bv, k):
        """The oracle's last attack on the inputs ``bv`` left without a counterexample up to ``eps_max``; the
        inputs it does not break either."""
        if oracle.last_resort is None or not len(bv):
            return bv
        t0 = time.perf_counter()
        v = oracle.last_resort(x[bv], y[bv], np.full(len(bv), cfg.eps_max, np.float32), k)
        time_s[bv] += (time.perf_counter() - t0) / len(bv)
        vio = v.status == VIOLATED
        if vio.any():
            found(bv[vio], v.counterexample[vio], True)
        return bv[~vio]

    for step in range(cfg.max_steps):
        hi_c = np.where(np.isnan(upper), cfg.eps_max, upper)
        q_prove = _next_query(lower, np.minimum(p_hi, hi_c), cfg) if oracle.prove else np.full(n, np.nan)
        first = np.isnan(upper) & ~censored & (c_lo == 0)
        q_fals = np.where(first, cfg.eps_max, np.where(censored, np.nan, _next_query(c_lo, hi_c, cfg)))
        q_prove[~correct | failed], q_fals[~correct | failed] = np.nan, np.nan
        jobs = [(kind, np.flatnonzero(~np.isnan(q)), q) for kind, q in (("prove", q_prove), ("falsify", q_fals))]
        if not any(len(ids) for _, ids, _ in jobs):
            break
        minimizing = step == 0 and oracle.minimize is not None  # first falsify query: at eps_max
        for kind, ids, q in jobs:
            fn = oracle.prove if kind == "prove" else oracle.minimize if minimizing else oracle.falsify
            for s in range(0, len(ids), batch_size):
                b = ids[s:s + batch_size]
                t0 = time.perf_counter()
                k = jax.random.fold_in(jax.random.fold_in(key, step), int(kind == "falsify"))
                try:
                    v = padded_call(fn, x[b], y[b], q[b], jax.random.fold_in(k, int(indices[b[0]])), batch_size)
                except JaxRobustError:
                    raise
                except Exception as e:  # noqa: BLE001  an oracle failure is recorded per input, never reported as ε = 0
                    failed[b] = True
                    errors.update({int(i): f"{type(e).__name__}: {e}" for i in indices[b]})
                    continue
                time_s[b] += (time.perf_counter() - t0) / len(b)
                queries[b] += 1
                rob, vio = v.status == ROBUST, v.status == VIOLATED
                lower[b] = np.where(rob, np.maximum(lower[b], q[b]), lower[b])
                c_lo[b] = np.where(rob, np.maximum(c_lo[b], q[b]), c_lo[b])
                if vio.any():
                    found(b[vio], v.counterexample[vio], kind == "falsify" and minimizing)
                unk = ~rob & ~vio
                if kind == "prove":
                    p_hi[b[unk]] = np.minimum(p_hi[b[unk]], q[b][unk])
                else:
                    c_lo[b[unk]] = np.maximum(c_lo[b[unk]], q[b][unk])
                    censored[last_resort(b[unk & (q[b] >= cfg.eps_max)], jax.random.fold_in(k, 2))] = True

    status = np.where(np.isnan(upper), "censored",
                      np.where(np.isnan(_next_query(lower, np.nan_to_num(upper, nan=np.inf), cfg)), "exact", "gap"))
    status = np.where(correct, status, "misclassified")
    status = np.where(failed, "error", status).astype(object)
    lower = np.where(failed, np.nan, np.where(correct, lower, 0.0))
    upper = np.where(failed, np.nan, np.where(correct, upper, 0.0))
    return CriticalEps(lower, upper, status, cex, pred, time_s, queries, errors)


def _predict(net: Network, x, batch_size):
    return np.concatenate([np.asarray(net(x[i:i + batch_size])).argmax(-1)
                           for i in range(0, len(x), batch_size)]) if len(x) else np.zeros(0, int)


TABLE = "critical_eps"
CSV_COLUMNS = ("network", "dataset", "split", "index", "label", "eps_lower", "eps_upper", "status", "oracle",
               "time_s", "network_name", "predicted", "queries", "config")
# the attack options of every oracle (`oracles.make_oracle`), stated here so that the rows' key names each one
ATTACK_OPTIONS = {"attack_steps": 40, "restarts": 1, "targets": 9, "min_norm_steps": 60, "guided": True,
                  "leaky": True, "norm": "linf"}
ORACLES = ("attack", "ibp", "crown", "alpha-crown", "complete")


def columns(image_shape) -> dict:
    """Column schema of the ``critical_eps`` table; counterexamples are stored as dataset images
    ``image_shape = (H, W, C)``, so networks with different input layouts share one file."""
    return {"label": ("i8", ()), "predicted": ("i8", ()), "eps_lower": ("f8", ()), "eps_upper": ("f8", ()),
            "status": ("str", ()), "oracle": ("str", ()), "time_s": ("f8", ()), "queries": ("i8", ()),
            "network_name": ("str", ()), "error": ("str", ()), "counterexample": ("f4", tuple(image_shape))}


def full_options(kind: str, options: dict | None = None) -> dict:
    """Every option of oracle ``kind`` with its value: `ATTACK_OPTIONS`, and for ``complete`` the budgets of
    `verify.VerifyConfig`, overridden by ``options``; an unknown name is an `InputError`."""
    from .verify import VerifyConfig
    if kind not in ORACLES:
        raise InputError(f"unknown oracle {kind!r}; choose one of {', '.join(ORACLES)}")
    budgets = {k: v for k, v in VerifyConfig()._asdict().items() if not k.startswith("attack_")} \
        if kind == "complete" else {}
    full = {**ATTACK_OPTIONS, **budgets}
    unknown = sorted(set(options or {}) - set(full))
    if unknown:
        raise InputError(f"unknown option {unknown[0]!r} of the {kind} oracle; known: {', '.join(sorted(full))}")
    full = {**full, **(options or {})}
    full["norm"] = check_norm(full["norm"])
    return full


class _Task:
    """``compute(chunk) -> {TABLE: rows}`` of `run` on JAX's default device; the oracle is built once per
    process."""

    def __init__(self, net: Network, kind: str, options: dict, cfg: SearchConfig, batch_size: int, dataset: tuple):
        self.net, self.kind, self.options, self.cfg, self.batch_size = net, kind, options, cfg, batch_size
        self.dataset, self._oracle = dataset, None  # dataset: (name, split, image_shape)

    def __getstate__(self):
        return {**self.__dict__, "_oracle": None}

    def config(self) -> dict:
        """What keys the rows: the search, the oracle, every option and the attacks that run before an input
        is called censored."""
        return {"oracle": self.kind, **self.cfg._asdict(), "options": self.options,
                "attacks": list(self.oracle.attacks)}

    @property
    def oracle(self) -> Oracle:
        if self._oracle is None:
            from .oracles import make_oracle
            self._oracle = make_oracle(self.net, self.kind, **self.options)
        return self._oracle

    def __call__(self, chunk) -> dict:
        from .data import from_network_input
        name, split, image_shape = self.dataset
        r = search(self.net, self.oracle, chunk.x, chunk.y, self.cfg, batch_size=self.batch_size, indices=chunk.ids)
        m = len(chunk)
        return {TABLE: {"network": [self.net.hash] * m, "dataset": [name] * m, "split": [split] * m,
                        "index": chunk.ids, "label": chunk.y, "predicted": r.predicted, "eps_lower": r.eps_lower,
                        "eps_upper": r.eps_upper, "status": r.status, "oracle": [self.kind] * m, "time_s": r.time_s,
                        "queries": r.queries, "network_name": [self.net.name] * m,
                        "error": [r.errors.get(int(i), "") for i in chunk.ids],
                        "counterexample": from_network_input(r.counterexample, image_shape)}}


def run(net: Network, dataset, indices, oracle_kind: str, cfg: SearchConfig, out, *, resume: bool = False,
        chunk: int = 64, batch_size: int = 256, progress: bool = True, oracle_options: dict | None = None,
        devices: int | None = None, workers: int | None = None, ray_address: str | None = None):
    """Search critical ε for ``dataset`` rows ``indices`` (positions) and append one row per input to ``out``.

    Rows are keyed by the image ids ``dataset.indices[indices]`` (positions in the original split) and by the
    configuration: the search, the oracle and every oracle option (`oracle_options`).

    Inputs are processed in chunks of ``chunk`` by `runner.ResumableRun`: each finished chunk is committed,
    so a killed run resumed with ``resume=True`` skips what is stored and adds exactly the missing rows.
    ``devices``: local devices that run chunks side by side (default all); ``workers`` / ``ray_address``: Ray
    workers (see `runner`). Returns the `ResultStore`.
    """
    from .runner import ResumableRun, check_scale

    check_scale(devices, workers, ray_address)
    cfg, options = check_config(cfg), full_options(oracle_kind, oracle_options)
    if chunk < 1 or batch_size < 1:
        raise InputError(f"chunk and batch_size must be >= 1, got {chunk}, {batch_size}")
    task = _Task(net, oracle_kind, options, cfg, batch_size, (dataset.name, dataset.split, tuple(dataset.image_shape)))
    config = task.config()      # an unsupported network or option fails here, before the file is touched
    run = ResumableRun(out, {TABLE: columns(dataset.image_shape)}, config, resume=resume, progress=progress,
                       desc=f"critical ε ({oracle_kind})", devices=devices, workers=workers, ray_address=ray_address)
    chunks, done = run.input_chunks(net, dataset, indices, chunk)
    found = []

    def postfix(rows):
        e = rows[TABLE]["eps_upper"]
        found.extend(e[e > 0])
        return {"median_eps": f"{np.median(found):.4f}" if found else "-"}

    run.map(chunks, task, done=done, after=postfix)
    return run.stores[TABLE]
