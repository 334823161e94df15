"""Attacks as falsifiers: counterexamples that a plain forward pass confirms, as `verdict.Verdicts`.

Gradient attacks see only the active units of a ReLU network: where most units of a layer are off (on
mnist-net_256x2, 3 of 256 first-layer units are active at test image 61), the counterexamples lie across
kinks the gradient knows nothing of, and PGD, targeted PGD and the minimum-norm attack fail at every radius.
Two attacks see past them: the minimum-norm attack on gradients that leak through inactive ReLUs
(`leaky_minimizer`, `kernels.surrogate`; as cheap as the attack itself), and the bound-guided attack
(`guided_falsifier`), which starts from the minimisers of α-CROWN's linear lower bounds of every margin, whose
relaxation includes the inactive unstable units, and descends from there; `guided_minimizer` runs it at
shrinking radii (costly). `chained` runs them in turn: the oracles' last resort before an input is called censored.

``falsify(x, y, eps, key)`` and ``minimize(x, y, eps, key)`` take a batch ``x: (B, *shape)``, ``y: (B,)``,
``eps: (B,)`` and return VIOLATED rows with their counterexample (inside the ε-ball and the domain) or
UNKNOWN rows with NaN.
"""
from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from .box_search import _logits
from .kernels.attacks import box_descent
from .kernels.bab import Splits, network_brancher
from .kernels.bounds import margin_bounds, robustness_spec
from .kernels.norms import check_norm, row_norm
from .kernels.surrogate import kinks, leaky_gradients
from .network import Network
from .verdict import UNKNOWN, VIOLATED, Verdicts


def attack_falsifier(net: Network, *, steps: int = 40, restarts: int = 1, targets: int = 9,
                     norm: str = "linf") -> Callable:
    """PGD in ``norm`` as a falsifier: a margin-loss attack (``restarts`` random starts), then for the inputs it did
    not break a multi-targeted attack on the ``targets`` most likely wrong classes (0 = skip). Successes are
    confirmed by a forward pass."""
    from .kernels.attacks import pgd
    targets = min(targets, net.num_classes - 1)

    def falsify(x, y, eps, key) -> Verdicts:
        r = pgd(net, x, y, eps, key=key, steps=steps, restarts=restarts, loss="margin", norm=norm)
        found, x_adv = np.array(r.success), np.array(r.x_adv)
        rest = np.flatnonzero(~found)
        if targets > 0 and len(rest):
            t = padded_call(lambda *a: pgd(net, *a[:3], key=a[3], steps=steps, restarts=targets, loss="targeted",
                                           norm=norm),
                            x[rest], y[rest], eps[rest], jax.random.fold_in(key, 1), size=len(x))
            found[rest], x_adv[rest] = np.asarray(t.success), np.asarray(t.x_adv)
        return _verdicts(found, x_adv)

    return falsify


def min_norm_falsifier(net: Network, *, steps: int = 60, norm: str = "linf") -> Callable:
    """`kernels.minnorm.min_norm` (margin loss, ``steps`` steps, ``norm``) as a ``minimize`` oracle: the closest
    counterexample found within ``eps`` per input, confirmed by a forward pass."""
    from .kernels.minnorm import min_norm

    def minimize(x, y, eps, key) -> Verdicts:
        r = min_norm(net, x, y, eps, key=key, steps=steps, norm=norm)
        return _verdicts(np.asarray(r.success), np.asarray(r.x_adv))

    return minimize


def leaky_minimizer(net: Network, *, steps: int = 60, slope: float = 0.01, targets: int = 9,
                    norm: str = "linf") -> Callable | None:
    """The minimum-norm attack (``targets`` wrong classes side by side, ``steps`` steps) on the gradients of
    `kernels.surrogate.leaky_gradients` (``slope`` through inactive ReLUs) as a ``minimize`` oracle, each point
    confirmed by a full-precision forward pass of ``net`` itself; None when ``net`` has no kink to rewrite."""
    from .kernels.minnorm import min_norm
    if not kinks(net):
        return None
    leaky = leaky_gradients(net, slope)
    targets = min(targets, net.num_classes - 1)

    def attack(x, y, eps, key) -> Verdicts:
        r = min_norm(leaky, x, y, eps, key=key, steps=steps, targets=targets, norm=norm)
        pts = np.asarray(r.x_adv)
        return _verdicts(np.asarray(r.success) & (_logits(net, pts).argmax(-1) != np.asarray(y)), pts)

    def minimize(x, y, eps, key) -> Verdicts:
        eps = np.broadcast_to(np.asarray(eps, np.float32), (len(x),))
        return padded_call(attack, np.asarray(x), np.asarray(y), eps, key, size=len(x) if len(x) > 64 else 64)

    return minimize


def chained(*minimizers) -> Callable | None:
    """``minimize`` oracles (None entries skipped) tried in turn, each on the inputs those before it left
    UNKNOWN; None when there are none."""
    minimizers = [m for m in minimizers if m is not None]
    if not minimizers:
        return None

    def minimize(x, y, eps, key) -> Verdicts:
        eps = np.broadcast_to(np.asarray(eps, np.float32), (len(x),))
        status, cex = np.full(len(x), UNKNOWN, np.int8), np.full(np.shape(x), np.nan, np.float32)
        for i, m in enumerate(minimizers):
            rest = np.flatnonzero(status != VIOLATED)
            if not len(rest):
                break
            v = m(x[rest], y[rest], eps[rest], jax.random.fold_in(key, i))
            status[rest], cex[rest] = v.status, v.counterexample
        return Verdicts(status, cex)

    return minimize


def guided_minimizer(net: Network, norm: str = "linf") -> Callable:
    """`guided_ladder` as a ``minimize`` oracle, one input at a time: the counterexample of the smallest radius
    ``eps / 2^k`` (then bisected) that holds one. Costly (up to 13 α-CROWN bounds per input): the last resort
    for inputs every other attack leaves without a counterexample up to ``eps``."""
    ladder = guided_ladder(net, norm=norm)

    def minimize(x, y, eps, key) -> Verdicts:
        eps = np.broadcast_to(np.asarray(eps, np.float32), (len(x),))
        found, x_adv = np.zeros(len(x), bool), np.full(np.shape(x), np.nan, np.float32)
        for i in range(len(x)):
            found[i], x_adv[i] = ladder(x[i], y[i], float(eps[i]))
        return _verdicts(found, x_adv)

    return minimize


def guided_falsifier(net: Network, *, steps: int = 100, alpha_steps: int = 20, norm: str = "linf") -> Callable:
    """The bound-guided attack as a falsifier. Per input (one at a time, shapes repeat): α-CROWN lower
    bounds (``alpha_steps`` iterations, intermediate bounds included) of every margin ``logit_y - logit_j``
    over the ε-ball of ``norm`` ∩ domain; from each bound's minimiser, ``steps`` steepest-descent steps of size
    ε/50 (L∞: signed) on that margin within the ball; a point a full-precision forward pass misclassifies is a
    counterexample."""
    brancher = network_brancher(net)
    rows = list(robustness_spec(np.arange(net.num_classes), net.num_classes))  # margin rows (C-1, C) of each label
    shape = (1,) + tuple(net.input_shape)

    def one(x, y, eps):
        lo = jnp.asarray(np.clip(x - eps, *net.domain), jnp.float32).reshape(shape)
        hi = jnp.asarray(np.clip(x + eps, *net.domain), jnp.float32).reshape(shape)
        c = rows[int(y)]
        ball = None if norm == "linf" else (jnp.asarray(x, jnp.float32).reshape(shape), eps, norm)
        root = brancher.root_bounds(lo, hi, alpha_steps, ball=ball)
        sp = brancher.initial(root, len(c))
        r = brancher.bound(root, lo, hi, c, Splits(*(jnp.asarray(a) for a in sp)), steps=alpha_steps, candidates=0,
                           ball=ball)
        xs = jnp.asarray(r.x_star).reshape((len(c),) + shape[1:])
        if ball is None:
            pts = box_descent(net, xs, c, lo[0], hi[0], (hi[0] - lo[0]) / 50, steps=steps)
        else:
            pts = box_descent(net, xs, c, lo[0], hi[0], eps / 50, steps=steps, ball=(ball[0][0], eps), norm=norm)
        pts = np.asarray(pts)
        bad = _logits(net, pts).argmax(-1) != int(y)
        return (True, pts[np.argmax(bad)]) if bad.any() else (False, np.full(shape[1:], np.nan, np.float32))

    def falsify(x, y, eps, key) -> Verdicts:
        eps = np.broadcast_to(np.asarray(eps, np.float32), (len(x),))
        found, x_adv = zip(*(one(x[i], y[i], eps[i]) for i in range(len(x)))) if len(x) else ((), ())
        return _verdicts(np.array(found, bool), np.array(x_adv, np.float32).reshape(np.shape(x)))

    falsify.one = one
    return falsify


def guided_ladder(net: Network, *, rungs: int = 8, refine: int = 4, norm: str = "linf") -> Callable:
    """``(x, y, eps) -> (found, point)``: `guided_falsifier` at radii ``eps / 2^k`` for k = ``rungs`` … 0 until
    one succeeds, skipping the rungs CROWN proves robust (one batched bound over all rungs; they hold no
    counterexample), then ``refine`` bisection steps between the last failing radius and the distance of the
    counterexample pulled towards ``x`` (`_pull_in`); the counterexample of the smallest radius that held one."""
    one = guided_falsifier(net, norm=norm).one

    def ladder(x, y, eps):
        radii = eps / 2.0 ** np.arange(rungs, -1, -1)
        xs = np.broadcast_to(x, (len(radii),) + np.shape(x))
        lower = np.asarray(margin_bounds(net, xs, radii.astype(np.float32), "crown",
                                         labels=np.full(len(radii), y), norm=norm))
        proved = np.all(lower > 0, axis=1)
        below = float(radii[proved].max()) if proved.any() else 0.0
        for r in radii[radii > below]:
            found, point = one(x, y, r)
            if found:
                point, above = _pull_in(net, x, y, point, norm)
                for _ in range(refine):
                    mid = (below + above) / 2
                    f, p = one(x, y, mid)
                    if f:
                        point, above = _pull_in(net, x, y, p, norm)
                    else:
                        below = mid
                return True, point
            below = r
        return False, np.full(np.shape(x), np.nan, np.float32)

    return ladder


def _pull_in(net: Network, x, y, point, norm: str, n: int = 64):
    """The counterexample ``x + t (point - x)`` of least ``t`` among ``n`` evenly spaced ``t`` in (0, 1] (on the
    segment, each coordinate between ``x``'s and ``point``'s, so inside the ball and the domain), confirmed by a
    forward pass, and its distance to ``x``."""
    t = np.arange(1, n + 1, dtype=np.float32) / n
    pts = (x + t.reshape((-1,) + (1,) * np.ndim(x)) * (point - x)).astype(np.float32)
    pts = np.clip(pts, np.minimum(x, point), np.maximum(x, point))   # round-off never leaves the segment's box
    pts[-1] = point
    bad = _logits(net, pts).argmax(-1) != int(y)
    best = pts[np.argmax(bad)]
    return best, float(np.asarray(row_norm(jnp.asarray(best - x)[None], check_norm(norm)))[0])


def _verdicts(found, x_adv) -> Verdicts:
    """VIOLATED rows with their points, UNKNOWN rows with NaN."""
    cex = np.where(found.reshape((-1,) + (1,) * (x_adv.ndim - 1)), x_adv, np.nan)
    return Verdicts(np.where(found, VIOLATED, UNKNOWN).astype(np.int8), cex.astype(np.float32))


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
