"""Oracles: a verdict per (input, ε) — ROBUST (a proof), VIOLATED (a confirmed counterexample) or UNKNOWN.

An oracle answers two kinds of query on a batch ``x: (B, *shape)``, ``y: (B,)``, ``eps: (B,)``:

* ``prove``    — try to prove robustness: returns ROBUST or UNKNOWN (a complete oracle may return VIOLATED);
* ``falsify``  — try to find a counterexample: returns VIOLATED or UNKNOWN (a complete oracle may return ROBUST).

Both return ``Verdicts(status (B,) int8, counterexample (B, *shape))``; counterexample rows are NaN
unless the status is VIOLATED, in which case a plain forward pass classifies them wrongly and they
lie in the ε-ball around ``x`` inside the network's domain.
"""
from __future__ import annotations

from typing import Callable, NamedTuple

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
    """``prove(x, y, eps, key)`` and ``falsify(x, y, eps, key)`` -> `Verdicts`; ``prove`` is None when the
    oracle cannot prove anything (attack only)."""
    name: str
    prove: Callable | None
    falsify: Callable


def attack_falsifier(net: Network, *, steps: int = 40, restarts: int = 1) -> Callable:
    """PGD (margin loss, random start) as a falsifier; successes are confirmed by a forward pass."""
    from .kernels.attacks import pgd

    def falsify(x, y, eps, key) -> Verdicts:
        r = pgd(net, x, y, eps, key=key, steps=steps, restarts=restarts, loss="margin")
        found = np.asarray(r.success)
        cex = np.where(found.reshape((-1,) + (1,) * (x.ndim - 1)), np.asarray(r.x_adv), np.nan)
        return Verdicts(np.where(found, VIOLATED, UNKNOWN).astype(np.int8), cex.astype(np.float32))

    return falsify


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


def make_oracle(net: Network, kind: str, *, attack_steps: int = 40, restarts: int = 1, **options) -> Oracle:
    """Oracle by name: ``attack`` (falsify only), ``ibp``/``crown``/``alpha-crown`` (bounds + attack),
    ``complete`` (branch and bound)."""
    falsify = attack_falsifier(net, steps=attack_steps, restarts=restarts)
    if kind == "attack":
        return Oracle(kind, None, falsify)
    if kind in BOUND_METHODS:
        return Oracle(kind, bound_prover(net, kind), falsify)
    if kind == "complete":
        from .verify import complete_oracle
        return complete_oracle(net, **options)
    raise InputError(f"unknown oracle {kind!r}; choose attack, ibp, crown, alpha-crown or complete")


@jax.jit
def _linf_dist(a, b):
    return jnp.max(jnp.abs(a - b).reshape(a.shape[0], -1), axis=1)


def linf_distance(a, b) -> np.ndarray:
    """``max |a - b|`` per row: ``(B, *shape), (B, *shape) -> (B,)``."""
    return np.asarray(_linf_dist(jnp.asarray(a), jnp.asarray(b)))
