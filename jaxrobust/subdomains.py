"""Pending subdomains of branch and bound: compact storage, the pool's operations, and pools kept across queries.

A pool is a dict of arrays with one row per pending subdomain (see `box_search.verify_box`): ``s`` kink-unit
states, ``ilo, ihi`` interval-unit bounds, ``t`` spec row, ``b`` sound lower bound, ``br`` unit to branch on
(-1: none left, `STALE`: not bounded over the current box yet), ``ul, uh`` its bounds, ``a, be`` the slopes and
multipliers (float16, a warm start).

**Resuming.** A query that runs out of time leaves a pool none of whose subdomains is proved; those proved or
found empty are gone. Over a smaller set — a box inside the first around the same ball centre, a ball no larger,
the same spec rows — every dropped subdomain stays proved (its bound holds on a superset), so the pending ones
cover all that is left to prove, and their bounds stay sound lower bounds there. After a timeout the critical-ε
search only queries smaller radii; `PendingStore` keeps each input's last pool so such a query starts from it
(`resume_pool`) instead of from the root.
"""
from __future__ import annotations

import hashlib
from collections import OrderedDict
from typing import NamedTuple

import numpy as np

from .kernels.bab import split_point

STALE = -2     # ``br`` of a subdomain whose bounds come from a larger set: bound again before it is split


class Compact(NamedTuple):
    """How a pending subdomain is stored: by the ``Hk`` kink units unstable at the root only (``free``: their
    full index; the others are never split, and their slopes and multipliers do not enter any bound), the
    ``Hi`` interval units, the slopes at ``alpha_keep`` and the multipliers at ``beta_keep``; ``full_hk`` the
    number of kink units."""
    Hk: int
    Hi: int
    full_hk: int
    free: np.ndarray
    alpha_keep: np.ndarray
    beta_keep: np.ndarray

    @staticmethod
    def expand(a, keep, width):
        """Compact ``a: (D, len(keep))`` as ``(D, width)``, zeros elsewhere."""
        out = np.zeros((len(a), width), a.dtype)
        out[:, keep] = a
        return out

    def branch(self, br):
        """Full branch indices (`kernels.bab.DomainBounds.branch`) as compact ones (-1 stays -1)."""
        kink = (br >= 0) & (br < self.full_hk)
        return np.where(br < 0, -1, np.where(kink, np.searchsorted(self.free, br), br - self.full_hk + self.Hk))


def kink_units(brancher, root):
    """Flat ``(lo, hi, k)`` of every kink unit of ``brancher`` (`kernels.bab.Brancher`): its root bounds and kink."""
    g = brancher.graph
    parts = [(np.asarray(root[v][0]).reshape(-1), np.asarray(root[v][1]).reshape(-1),
              np.broadcast_to(np.asarray(brancher.consts[k]), g.shape(v)).reshape(-1))
             for v, k, _, _ in brancher.layout.kink]
    return tuple(np.concatenate(p) for p in zip(*parts)) if parts else (np.zeros(0, np.float32),) * 3


def compact(brancher, root) -> Compact:
    """The `Compact` storage of ``brancher``'s subdomains of a box with root bounds ``root``."""
    lay, g = brancher.layout, brancher.graph
    lo, hi, k = kink_units(brancher, root)
    free = np.flatnonzero((lo < k) & (hi > k))
    kink_off = {v: (off, n) for v, _, off, n in lay.kink}
    alpha = []
    for idx, v, off, n in lay.alpha:
        if g.nodes[idx].kind == "pwl" and v in kink_off:     # one slope per kink unit: those that are free
            ko, kn = kink_off[v]
            alpha.append(off + free[(free >= ko) & (free < ko + kn)] - ko)
        else:
            alpha.append(off + np.arange(n))
    alpha = np.concatenate(alpha) if alpha else np.zeros(0, np.int64)
    beta = np.concatenate([free, lay.Hk + np.arange(2 * lay.Hi)])
    return Compact(len(free), lay.Hi, lay.Hk, free, alpha, beta)


def take_lowest(pool: dict, k: int, among=None):
    """The ``k`` pending subdomains of ``pool`` with the lowest bounds ``pool["b"]`` (among the rows where the mask
    ``among`` holds, if given), and the rest."""
    b = pool["b"] if among is None else np.where(among, pool["b"], np.inf)
    order = np.argsort(b, kind="stable")
    if among is not None:
        k = min(k, int(among.sum()))
    take, left = order[:k], order[k:]
    return {n: v[take] for n, v in pool.items()}, {n: v[left] for n, v in pool.items()}


def children(cmp: Compact, par: dict) -> dict:
    """The two children of each parent subdomain in ``par`` (pool fields), split on its branch unit: a kink
    unit to ``+1`` / ``-1``, an interval unit at `split_point` of its bounds; the children's multipliers
    of the new constraint start at 0, the rest from the parent."""
    P = len(par["t"])
    two = lambda a: np.concatenate([a, a])
    ch = {k: two(par[k]) for k in ("s", "ilo", "ihi", "t", "b", "a", "be")}
    br = par["br"]
    rows = np.arange(P)
    kink = br < cmp.Hk
    k_rows, kb = rows[kink], br[kink]
    ch["s"][k_rows, kb], ch["s"][P + k_rows, kb] = 1, -1
    ch["be"][k_rows, kb] = ch["be"][P + k_rows, kb] = 0
    i_rows, ib = rows[~kink], br[~kink] - cmp.Hk
    p = split_point(par["ul"][~kink], par["uh"][~kink])
    ch["ihi"][i_rows, ib], ch["ilo"][P + i_rows, ib] = p, p
    ch["ilo"][i_rows, ib] = np.maximum(ch["ilo"][i_rows, ib], par["ul"][~kink])
    ch["ihi"][P + i_rows, ib] = np.minimum(ch["ihi"][P + i_rows, ib], par["uh"][~kink])
    for off in (cmp.Hk, cmp.Hk + cmp.Hi):
        ch["be"][i_rows, off + ib] = ch["be"][P + i_rows, off + ib] = 0
    return ch


class Pending(NamedTuple):
    """The pool of a query stopped undecided (every field of it, compact for ``cmp``), with the set it was
    searched over: the float32 box ``lo, hi (n_0,)`` and ``ball`` ``(center (n_0,), eps, norm)`` or None, and
    the spec ``C (T, n_L)``, ``d (T,)``."""
    pool: dict
    cmp: Compact
    lo: np.ndarray
    hi: np.ndarray
    ball: tuple | None
    C: np.ndarray
    d: np.ndarray

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.pool.values())

    def covers(self, lo, hi, ball, C, d) -> bool:
        """Whether the set ``lo, hi`` (∩ ``ball``) lies inside this one's, with the same spec rows."""
        same_ball = (ball is None) == (self.ball is None) and (ball is None or (
            ball[2] == self.ball[2] and float(ball[1]) <= float(self.ball[1])
            and np.array_equal(np.asarray(ball[0]).reshape(-1), np.asarray(self.ball[0]).reshape(-1))))
        return bool(same_ball and np.shape(C) == self.C.shape and np.array_equal(C, self.C)
                    and np.array_equal(d, self.d) and np.all(np.asarray(lo) >= self.lo)
                    and np.all(np.asarray(hi) <= self.hi))


def resume_pool(p: Pending, brancher, root, cmp: Compact, open_rows) -> dict:
    """The pending subdomains of ``p`` as a pool over a set it covers, whose root bounds are ``root`` and storage
    ``cmp``: rows proved at the root (``open_rows (T,)`` False) dropped, subdomains whose splits contradict the
    root bounds (empty) dropped, splits of units the root fixes dropped, interval bounds clipped to the root's;
    their old bounds kept (sound: see the module doc), every one `STALE`."""
    lay = brancher.layout
    q = p.pool
    keep = open_rows[q["t"]]
    s = p.cmp.expand(q["s"][keep], p.cmp.free, lay.Hk)
    lo, hi, k = kink_units(brancher, root)
    keep_rows = ~np.any(((s < 0) & (lo > k)) | ((s > 0) & (hi < k)), axis=1)
    ilo, ihi = q["ilo"][keep], q["ihi"][keep]
    if lay.Hi:
        unsplit = brancher.initial(root, 1)         # the interval units' root bounds
        ilo, ihi = np.maximum(ilo, unsplit.ilo[0]), np.minimum(ihi, unsplit.ihi[0])
        keep_rows &= ~np.any(ilo > ihi, axis=1)
    a = p.cmp.expand(q["a"][keep], p.cmp.alpha_keep, lay.Ha)[:, cmp.alpha_keep]
    be = p.cmp.expand(q["be"][keep], p.cmp.beta_keep, lay.Hk + 2 * lay.Hi)[:, cmp.beta_keep]
    n = int(keep_rows.sum())
    return {"s": s[keep_rows][:, cmp.free], "ilo": ilo[keep_rows], "ihi": ihi[keep_rows],
            "t": q["t"][keep][keep_rows], "b": q["b"][keep][keep_rows], "br": np.full(n, STALE, np.int64),
            "ul": np.zeros(n, np.float32), "uh": np.zeros(n, np.float32), "a": a[keep_rows], "be": be[keep_rows]}


def query_key(x, y, norm: str) -> bytes:
    """What identifies the queries of one input: its float32 bytes, its label and the norm."""
    h = hashlib.sha1(np.ascontiguousarray(x, np.float32).tobytes())
    h.update(f"{int(y)}|{norm}".encode())
    return h.digest()


class PendingStore:
    """The last `Pending` pool of each input (`query_key`), at most ``max_bytes`` in all, the oldest dropped first."""

    def __init__(self, max_bytes: int = 2 ** 28):
        self.max_bytes, self._items = max_bytes, OrderedDict()

    def get(self, key: bytes, lo, hi, ball, C, d) -> Pending | None:
        """The pool of ``key`` if it covers the set ``lo, hi`` (∩ ``ball``) with the spec ``C, d``, else None."""
        p = self._items.get(key)
        return p if p is not None and p.covers(lo, hi, ball, C, d) else None

    def put(self, key: bytes, p: Pending):
        self._items.pop(key, None)
        if p.nbytes > self.max_bytes:
            return
        self._items[key] = p
        while sum(v.nbytes for v in self._items.values()) > self.max_bytes:
            self._items.popitem(last=False)
