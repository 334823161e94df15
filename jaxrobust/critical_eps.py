"""Critical ε per input by batched bisection over an oracle (Bosman et al., JAIR 2025).

For each input the search keeps two monotone brackets, advanced together in one batched oracle
call per step (every input has its own brackets):

* proof bracket  ``[lower, p_hi]``: ``lower`` is the largest ε proved ROBUST, ``p_hi`` the smallest ε
  where a proof failed;
* falsification bracket ``[c_lo, upper]``: ``upper`` is the L∞ distance of the closest confirmed
  counterexample, ``c_lo`` the largest ε where the search for one failed.

Robustness is monotone in ε, so a proof at ε holds below it and a counterexample at distance d
is one for every ε >= d. With a complete oracle both brackets meet; with an incomplete one a gap
``[lower, upper]`` may remain. The falsification bracket is warm-started by an attack at ``eps_max``
(the distance of what it finds is an upper bound). An oracle with a minimum-norm attack (``minimize``) makes
that first query with it and closes the bracket at the distance found (one query instead of a bisection).

Status per input: ``exact`` (upper − lower <= tol, or adjacent grid values), ``gap``, ``censored``
(no counterexample up to ``eps_max``: ``upper`` is NaN), ``misclassified`` (wrong at ε = 0: both 0),
``error`` (the oracle failed: both NaN, never 0).
"""
from __future__ import annotations

import inspect
import time
from collections.abc import Sequence
from typing import NamedTuple

import jax
import numpy as np

from .errors import InputError, JaxRobustError
from .falsify import padded_call
from .network import Network
from .oracles import Oracle, linf_distance
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


def search(net: Network, oracle: Oracle, x, y, cfg: SearchConfig = SearchConfig(), *,  # noqa: B008  (immutable)
           batch_size: int = 256, indices: Sequence[int] | None = None) -> CriticalEps:
    """Critical ε of every input in ``x: (N, *input_shape)`` with labels ``y: (N,)``.

    ``indices`` (global data indices, default ``range(N)``) seed the per-query randomness so a result does
    not depend on which other inputs share the batch.
    """
    x = net.check_inputs(x)
    n = len(x)
    y = net.check_labels(y, n)
    if not cfg.eps_max > 0 or (cfg.grid is None and not cfg.tol > 0):
        raise InputError(f"eps_max and tol must be > 0 (got {cfg.eps_max}, {cfg.tol})")
    if cfg.grid is not None:
        g = np.asarray(cfg.grid, float)
        if g.ndim != 1 or g.size < 1 or np.any(np.diff(g) <= 0) or g[0] <= 0:
            raise InputError("grid must be a strictly increasing sequence of positive ε values")
        cfg = cfg._replace(eps_max=float(g[-1]))
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
                    bv = b[vio]
                    d = linf_distance(v.counterexample[vio], x[bv])
                    if cfg.grid is not None:  # on a grid, upper is the smallest grid value holding a counterexample
                        g = np.asarray(cfg.grid)
                        d = g[np.minimum(np.searchsorted(g, d - 1e-6), len(g) - 1)]
                    closer = np.isnan(upper[bv]) | (d < upper[bv])
                    upper[bv[closer]] = d[closer]
                    cex[bv[closer]] = v.counterexample[vio][closer]
                    p_hi[bv] = np.minimum(p_hi[bv], d)
                    if kind == "falsify" and minimizing:  # a minimum-norm attack closes the falsify bracket
                        c_lo[bv] = upper[bv]
                unk = ~rob & ~vio
                if kind == "prove":
                    p_hi[b[unk]] = np.minimum(p_hi[b[unk]], q[b][unk])
                else:
                    c_lo[b[unk]] = np.maximum(c_lo[b[unk]], q[b][unk])
                    censored[b[unk & (q[b] >= cfg.eps_max)]] = True

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


def columns(image_shape) -> dict:
    """Column schema of the ``critical_eps`` table; counterexamples are stored as dataset images
    ``image_shape = (H, W, C)``, so networks with different input layouts share one file."""
    return {"label": ("i8", ()), "predicted": ("i8", ()), "eps_lower": ("f8", ()), "eps_upper": ("f8", ()),
            "status": ("str", ()), "oracle": ("str", ()), "time_s": ("f8", ()), "queries": ("i8", ()),
            "network_name": ("str", ()), "error": ("str", ()), "counterexample": ("f4", tuple(image_shape))}


def run(net: Network, dataset, indices, oracle_kind: str, cfg: SearchConfig, out, *, resume: bool = False,
        chunk: int = 64, batch_size: int = 256, progress: bool = True, oracle_options: dict | None = None):
    """Search critical ε for ``dataset`` rows ``indices`` (positions) and append one row per input to ``out``.

    Rows are keyed by the image ids ``dataset.indices[indices]`` (positions in the original split).

    Inputs are processed in chunks of ``chunk``; each finished chunk is committed, so a killed run resumed
    with ``resume=True`` skips what is stored and adds exactly the missing rows. Returns the `ResultStore`.
    """
    from tqdm.auto import tqdm

    from .data import from_network_input, to_network_input
    from .oracles import make_oracle
    from .store import ResultStore

    store = ResultStore(out, TABLE, columns(dataset.image_shape))
    # the effective oracle options (defaults included) key the rows, so a change of method is a new config
    defaults = {k: p.default for k, p in inspect.signature(make_oracle).parameters.items() if p.kind == p.KEYWORD_ONLY}
    config = {"oracle": oracle_kind, **cfg._asdict(), "options": {**defaults, **(oracle_options or {})}}
    chash = store.save_config(config)
    positions = np.asarray(indices, dtype=int)
    todo = store.pending(net.hash, dataset, positions, chash, resume)
    oracle = make_oracle(net, oracle_kind, **(oracle_options or {}))
    finished = store.read(("network", "config", "eps_upper", "status"))
    mine = (finished["network"] == net.hash) & (finished["config"] == chash) & (finished["status"] != "error")
    medians = [e for e in finished["eps_upper"][mine] if e > 0]
    bar = tqdm(total=len(positions), initial=len(positions) - len(todo), unit="input", disable=not progress,
               desc=f"critical ε ({oracle_kind})")
    for s in range(0, len(todo), chunk):
        pos = todo[s:s + chunk]
        ids = dataset.indices[pos]
        x = to_network_input(dataset.x[pos], net.input_shape)
        r = search(net, oracle, x, dataset.y[pos], cfg, batch_size=batch_size, indices=ids)
        m = len(ids)
        store.append({"network": [net.hash] * m, "dataset": [dataset.name] * m, "split": [dataset.split] * m,
                      "index": ids, "config": [chash] * m, "label": dataset.y[pos], "predicted": r.predicted,
                      "eps_lower": r.eps_lower, "eps_upper": r.eps_upper, "status": r.status,
                      "oracle": [oracle_kind] * m, "time_s": r.time_s, "queries": r.queries,
                      "network_name": [net.name] * m, "error": [r.errors.get(int(i), "") for i in ids],
                      "counterexample": from_network_input(r.counterexample, dataset.image_shape)})
        medians.extend(r.eps_upper[(r.eps_upper > 0)])
        bar.update(m)
        bar.set_postfix(median_eps=f"{np.median(medians):.4f}" if medians else "-")
    bar.close()
    return store
