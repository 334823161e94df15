"""Oracles: a verdict per (input, ε) — ROBUST (a proof), VIOLATED (a confirmed counterexample) or UNKNOWN.

An oracle answers two kinds of query on a batch ``x: (B, *shape)``, ``y: (B,)``, ``eps: (B,)``:

* ``prove``    — try to prove robustness: returns ROBUST or UNKNOWN (a complete oracle may return VIOLATED);
* ``falsify``  — try to find a counterexample: returns VIOLATED or UNKNOWN (a complete oracle may return ROBUST);
* ``minimize`` — optional: the closest counterexample it finds within ``eps`` (VIOLATED) or UNKNOWN; the search
  then takes its distance as the upper bound instead of bisecting with ``falsify``.

Both return ``Verdicts(status (B,) int8, counterexample (B, *shape))``; counterexample rows are NaN
unless the status is VIOLATED, in which case a plain forward pass classifies them wrongly and they
lie in the ε-ball around ``x`` inside the network's domain.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from .errors import InputError
from .network import Network

ROBUST, UNKNOWN, VIOLATED = 1, 0, -1
BOUND_METHODS = ("ibp", "crown", "alpha-crown")


class Verdicts(NamedTuple):
    status: np.ndarray          # (B,) int8: ROBUST / UNKNOWN / VIOLATED
    counterexample: np.ndarray  # (B, *shape) float32, NaN where not VIOLATED


class Oracle(NamedTuple):
    """``prove(x, y, eps, key)``, ``falsify(x, y, eps, key)`` and ``minimize(x, y, eps_max, key)`` -> `Verdicts`;
    ``prove`` is None when the oracle cannot prove anything (attack only), ``minimize`` when it has no
    minimum-norm attack."""
    name: str
    prove: Callable | None
    falsify: Callable
    minimize: Callable | None = None


def attack_falsifier(net: Network, *, steps: int = 40, restarts: int = 1, targets: int = 9) -> Callable:
    """PGD as a falsifier: a margin-loss attack (``restarts`` random starts), then for the inputs it did not
    break a multi-targeted attack on the ``targets`` most likely wrong classes (0 = skip). Successes are
    confirmed by a forward pass."""
    from .kernels.attacks import pgd
    targets = min(targets, net.num_classes - 1)

    def falsify(x, y, eps, key) -> Verdicts:
        r = pgd(net, x, y, eps, key=key, steps=steps, restarts=restarts, loss="margin")
        found, x_adv = np.array(r.success), np.array(r.x_adv)
        rest = np.flatnonzero(~found)
        if targets > 0 and len(rest):
            t = padded_call(lambda *a: pgd(net, *a[:3], key=a[3], steps=steps, restarts=targets, loss="targeted"),
                            x[rest], y[rest], eps[rest], jax.random.fold_in(key, 1), size=len(x))
            found[rest], x_adv[rest] = np.asarray(t.success), np.asarray(t.x_adv)
        cex = np.where(found.reshape((-1,) + (1,) * (x.ndim - 1)), x_adv, np.nan)
        return Verdicts(np.where(found, VIOLATED, UNKNOWN).astype(np.int8), cex.astype(np.float32))

    return falsify


def min_norm_falsifier(net: Network, *, steps: int = 60) -> Callable:
    """`kernels.minnorm.min_norm` (margin loss, ``steps`` steps) as a ``minimize`` oracle: the closest
    counterexample found within ``eps`` per input, confirmed by a forward pass."""
    from .kernels.minnorm import min_norm

    def minimize(x, y, eps, key) -> Verdicts:
        r = min_norm(net, x, y, eps, key=key, steps=steps)
        found = np.asarray(r.success)
        cex = np.where(found.reshape((-1,) + (1,) * (x.ndim - 1)), np.asarray(r.x_adv), np.nan)
        return Verdicts(np.where(found, VIOLATED, UNKNOWN).astype(np.int8), cex.astype(np.float32))

    return minimize


def padded_call(fn, x, y, eps, key, size: int):
    """``fn(x, y, eps, key)`` on a batch padded (repeating row 0) to a power of two of at most ``size`` rows, so
    jitted shapes repeat across calls; the outputs (a NamedTuple of arrays) are cut back to ``len(x)``."""
    m = len(x)
    p = min(size, 1 << max(m - 1, 0).bit_length()) if m < size else m
    if p > m:
        pad = lambda a: np.concatenate([a, np.repeat(a[:1], p - m, axis=0)])  # noqa: E731
        x, y, eps = pad(x), pad(y), pad(eps)
    v = fn(x, y, np.asarray(eps, np.float32), key)
    return type(v)(*(np.asarray(a)[:m] for a in v))


def bound_prover(net: Network, method: str = "crown") -> Callable:
    """Incomplete verification: ROBUST where the lower bound of every margin ``logit_y - logit_j`` is > 0."""
    if method not in BOUND_METHODS:
        raise InputError(f"unknown bound method {method!r}; choose one of {BOUND_METHODS}")
    from .kernels.bounds import margin_bounds

    def prove(x, y, eps, key) -> Verdicts:
        lower = np.asarray(margin_bounds(net, x, eps, method=method, labels=y))
        ok = np.all(lower > 0, axis=-1) & np.all(np.isfinite(lower), axis=-1)
        return Verdicts(np.where(ok, ROBUST, UNKNOWN).astype(np.int8),
                        np.full(np.shape(x), np.nan, np.float32))

    return prove


def make_oracle(net: Network, kind: str, *, attack_steps: int = 40, restarts: int = 1, targets: int = 9,
                min_norm_steps: int = 60, **options) -> Oracle:
    """Oracle by name: ``attack`` (falsify only: a minimum-norm attack of ``min_norm_steps`` steps, or
    bisection with PGD when 0), ``ibp``/``crown``/``alpha-crown`` (bounds + attack), ``complete`` (branch and
    bound)."""
    falsify = attack_falsifier(net, steps=attack_steps, restarts=restarts, targets=targets)
    if kind == "attack":
        return Oracle(kind, None, falsify, min_norm_falsifier(net, steps=min_norm_steps) if min_norm_steps else None)
    if kind in BOUND_METHODS:
        return Oracle(kind, bound_prover(net, kind), falsify)
    if kind == "complete":
        from .verify import complete_oracle
        return complete_oracle(net, attack_steps=attack_steps, attack_restarts=restarts, attack_targets=targets,
                               **options)
    raise InputError(f"unknown oracle {kind!r}; choose attack, ibp, crown, alpha-crown or complete")


@jax.jit
def _linf_dist(a, b):
    return jnp.max(jnp.abs(a - b).reshape(a.shape[0], -1), axis=1)


def linf_distance(a, b) -> np.ndarray:
    """``max |a - b|`` per row: ``(B, *shape), (B, *shape) -> (B,)``."""
    return np.asarray(_linf_dist(jnp.asarray(a), jnp.asarray(b)))
