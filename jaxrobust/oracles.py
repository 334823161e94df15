"""Oracles: a verdict per (input, ε) — ROBUST (a proof), VIOLATED (a confirmed counterexample) or UNKNOWN.

An oracle answers two kinds of query on a batch ``x: (B, *shape)``, ``y: (B,)``, ``eps: (B,)``:

* ``prove``    — try to prove robustness: returns ROBUST or UNKNOWN (a complete oracle may return VIOLATED);
* ``falsify``  — try to find a counterexample: returns VIOLATED or UNKNOWN (a complete oracle may return ROBUST);
* ``minimize`` — optional: the closest counterexample it finds within ``eps`` (VIOLATED) or UNKNOWN; the search
  then takes its distance as the upper bound instead of bisecting with ``falsify``;
* ``last_resort`` — optional, like ``minimize``: for the inputs the other attacks leave without a
  counterexample up to ``eps_max``, before the search calls them censored.

All return `verdict.Verdicts` ``(status (B,) int8, counterexample (B, *shape), reason)``; counterexample rows are NaN
unless the status is VIOLATED, in which case a plain forward pass classifies them wrongly and they
lie in the ε-ball around ``x`` inside the network's domain. Balls are those of the oracle's ``norm`` (``"linf"``,
``"l2"`` or ``"l1"``, `kernels.norms`).
"""
from __future__ import annotations

import functools
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from .errors import InputError, UnsupportedOpError
from .falsify import attack_falsifier, chained, guided_minimizer, leaky_minimizer, min_norm_falsifier
from .kernels.norms import check_norm, row_norm
from .network import Network
from .subdomains import PendingStore
from .verdict import ROBUST, UNKNOWN, VIOLATED, Verdicts  # noqa: F401  (the vocabulary, re-exported)
from .verify import VerifyConfig, network_brancher, verify

BOUND_METHODS = ("ibp", "crown", "alpha-crown")


class Oracle(NamedTuple):
    """``prove(x, y, eps, key)``, ``falsify(x, y, eps, key)`` and ``minimize(x, y, eps_max, key)`` -> `Verdicts`;
    ``prove`` is None when the oracle cannot prove anything (attack only), ``minimize`` when it has no
    minimum-norm attack, ``last_resort`` when it has none; ``attacks`` names the attacks that run before an
    input is called censored; ``norm`` the norm of its balls (and of the distances the search measures); ``warm`` a
    cheaper oracle whose critical-ε search runs first, its brackets the start of this one's."""
    name: str
    prove: Callable | None
    falsify: Callable
    minimize: Callable | None = None
    attacks: tuple[str, ...] = ()
    last_resort: Callable | None = None
    norm: str = "linf"
    warm: Oracle | None = None


def bound_prover(net: Network, method: str = "crown", norm: str = "linf") -> Callable:
    """Incomplete verification: ROBUST where the lower bound of every margin ``logit_y - logit_j`` over the
    ``norm`` ball is > 0."""
    if method not in BOUND_METHODS:
        raise InputError(f"unknown bound method {method!r}; choose one of {BOUND_METHODS}")
    from .kernels.bounds import margin_bounds

    def prove(x, y, eps, key) -> Verdicts:
        lower = np.asarray(margin_bounds(net, x, eps, method=method, labels=y, norm=norm))
        ok = np.all(lower > 0, axis=-1) & np.all(np.isfinite(lower), axis=-1)
        return Verdicts(np.where(ok, ROBUST, UNKNOWN).astype(np.int8),
                        np.full(np.shape(x), np.nan, np.float32))

    return prove


def make_oracle(net: Network, kind: str, *, attack_steps: int = 40, restarts: int = 1, targets: int = 9,
                min_norm_steps: int = 60, guided: bool = True, leaky: bool = True, norm: str = "linf",
                **options) -> Oracle:
    """Oracle by name: ``attack`` (falsify only: a minimum-norm attack of ``min_norm_steps`` steps, or
    bisection with PGD when 0), ``ibp``/``crown``/``alpha-crown`` (bounds + attack), ``complete`` (branch and
    bound, warm-started by CROWN and the minimum-norm attack unless ``min_norm_steps`` is 0), over balls of
    ``norm`` (``"linf"``, ``"l2"``, ``"l1"``). The last resort for inputs the gradient attacks leave without a
    counterexample up to ``eps_max``: with ``leaky`` the minimum-norm attack on leaky ReLU gradients
    (`falsify.leaky_minimizer`), then with ``guided`` the bound-guided attack (`falsify.guided_minimizer`) on
    what it leaves (not for ``complete``, whose branch and bound searches the same minimisers)."""
    if kind not in ("attack", "complete", *BOUND_METHODS):
        raise InputError(f"unknown oracle {kind!r}; choose attack, ibp, crown, alpha-crown or complete")
    norm = check_norm(norm)
    if kind == "complete":
        warm = None
        if min_norm_steps:    # CROWN proofs beside the minimum-norm attack
            base = make_oracle(net, "crown", attack_steps=attack_steps, restarts=restarts, targets=targets,
                               guided=False, leaky=leaky, norm=norm)     # its last resort: the leaky attack
            named = _named(("min-norm",), norm) + (base.attacks[-1:] if base.last_resort else ())
            warm = base._replace(minimize=min_norm_falsifier(net, steps=min_norm_steps, norm=norm), attacks=named)
        return complete_oracle(net, attack_steps=attack_steps, attack_restarts=restarts, attack_targets=targets,
                               norm=norm, warm=warm, **options)
    guided = guided and _boundable(net)
    leaky_last = leaky_minimizer(net, steps=min_norm_steps or 60, targets=targets, norm=norm) if leaky else None
    last = chained(leaky_last, guided_minimizer(net, norm) if guided else None)
    falsify = attack_falsifier(net, steps=attack_steps, restarts=restarts, targets=targets, norm=norm)
    tail = (("min-norm-leaky",) if leaky_last else ()) + (("bound-guided",) if guided else ())
    attacks = ("pgd-margin",) + (("pgd-targeted",) if targets else ()) + tail
    if kind == "attack" and min_norm_steps:
        return Oracle(kind, None, falsify, min_norm_falsifier(net, steps=min_norm_steps, norm=norm),
                      _named(("min-norm",) + tail, norm), last, norm)
    return Oracle(kind, None if kind == "attack" else bound_prover(net, kind, norm), falsify, None,
                  _named(attacks, norm), last, norm)


def _named(attacks: tuple, norm: str) -> tuple:
    """The attacks' names as stored, the norm appended for L2 and L1 balls (``pgd-margin-l2``)."""
    return attacks if norm == "linf" else tuple(f"{a}-{norm}" for a in attacks)


def _boundable(net: Network) -> bool:
    """Whether the bound engine can trace ``net`` (attacks alone need only its gradients)."""
    try:
        network_brancher(net)
    except UnsupportedOpError:
        return False
    return True


@functools.partial(jax.jit, static_argnums=(2,))
def _dist(a, b, norm):
    return row_norm(a - b, norm)


def distance(a, b, norm: str = "linf") -> np.ndarray:
    """``||a - b||_p`` per row: ``(B, *shape), (B, *shape) -> (B,)``."""
    return np.asarray(_dist(jnp.asarray(a), jnp.asarray(b), check_norm(norm)))


def complete_oracle(net: Network, norm: str = "linf", warm: Oracle | None = None, **options) -> Oracle:
    """Oracle whose ``prove`` runs the whole cascade over ``norm`` balls (ROBUST, VIOLATED or UNKNOWN on budget)
    and whose ``falsify`` is the attack alone; ``warm``: see `Oracle`. ``options``: fields of `VerifyConfig`. With
    ``resume`` a query after a timeout over a smaller ball of the same input resumes the pending subdomains of the
    timed-out one (`subdomains`)."""
    cfg = VerifyConfig(**options)
    norm = check_norm(norm)
    network_brancher(net)       # an unsupported operation is reported now, before any attack or bisection
    pending = PendingStore() if cfg.resume else None

    def prove(x, y, eps, key) -> Verdicts:
        r = verify(net, x, y, eps, cfg, key=key, norm=norm, pending=pending)
        return Verdicts(r.status, r.counterexample, r.stage)

    falsify = attack_falsifier(net, steps=cfg.attack_steps, restarts=cfg.attack_restarts,
                               targets=cfg.attack_targets, norm=norm)
    attacks = (("min-norm",) if warm is not None else ()) + ("pgd-margin",) + \
        (("pgd-targeted",) if cfg.attack_targets else ()) + ("branch-and-bound",)
    return Oracle("complete", prove, falsify, None, _named(attacks, norm), norm=norm, warm=warm)
