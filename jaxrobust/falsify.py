"""Attacks as falsifiers: counterexamples that a plain forward pass confirms, as `verdict.Verdicts`.

``falsify(x, y, eps, key)`` and ``minimize(x, y, eps, key)`` take a batch ``x: (B, *shape)``, ``y: (B,)``,
``eps: (B,)`` and return VIOLATED rows with their counterexample (inside the ε-ball and the domain) or
UNKNOWN rows with NaN.
"""
from __future__ import annotations

from collections.abc import Callable

import jax
import numpy as np

from .network import Network
from .verdict import UNKNOWN, VIOLATED, Verdicts


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
    return type(v)(*(None if a is None else np.asarray(a)[:m] for a in v))
