"""Adversarial attacks (falsifiers): FGSM, PGD (L∞ / L2 / L1) and a black-box random search.

Uniform call shape ``attack(fn, x, y, eps, *, key=..., ...) -> AttackResult``:

* ``fn``: batched classifier ``(B, *shape) -> (B, C)`` logits — a `Network` or any JAX callable;
* ``x: (B, *shape)`` inputs, ``y: (B,)`` integer labels, ``eps`` scalar or ``(B,)`` radius;
* ``domain``: ``(lo, hi)`` box of valid inputs (default ``fn.domain`` for a Network, else none).

The jitted programs take a Network's ``apply`` as a static argument and its ``params`` as traced
arguments, so networks that share ``apply`` and parameter shapes (e.g. one classifier composed
with the per-class generators of a set) share one compilation. A plain callable is static itself.

Every result is re-checked: the returned point is projected onto ball ∩ domain and its margin
comes from a plain forward pass of ``fn`` at exactly that point, so ``success`` is a confirmed
misclassification (``margin < 0``).

Step loops: on CPU a rolled `lax.fori_loop` around convolutions ran 2-3x slower than the
unrolled loop, while for dense networks the rolled loop is as fast and compiles faster
(see ``benchmarks/bench_attacks.py``). ``unroll=None`` therefore fully unrolls the PGD step loop
when ``fn`` contains a convolution and keeps it rolled otherwise. Gradients are those of the
batch-summed loss (one backward pass for the batch), never ``vmap(grad)``.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from functools import partial
from typing import Any, NamedTuple

import jax
import jax.extend.core
import jax.numpy as jnp
from jax import lax

from ..errors import InputError
from ..network import Network
from .norms import ascent, check_norm, project
from .perturb import SAMPLERS, check_domain, check_eps, check_values, check_x, draw

LOSSES = ("margin", "ce", "targeted")
SCHEDULES = ("constant", "cosine", "step")


class AttackResult(NamedTuple):
    """Outcome of an attack on a batch.

    Attributes:
      x_adv: ``(B, *shape)`` best point found, inside ball ∩ domain.
      success: ``(B,)`` bool, ``margin < 0`` (confirmed by a forward pass at ``x_adv``).
      margin: ``(B,)`` ``logit_y - max_{j != y} logit_j`` at ``x_adv``; negative = misclassified.
    """

    x_adv: jax.Array
    success: jax.Array
    margin: jax.Array


# --- small pure helpers ---------------------------------------------------------------------------
def margin(logits: jax.Array, y: jax.Array) -> jax.Array:
    """``logits: (B, C)``, ``y: (B,)`` -> ``(B,)`` ``logit_y - max_{j != y} logit_j``."""
    onehot = jax.nn.one_hot(y, logits.shape[-1], dtype=jnp.bool_)
    z_y = jnp.sum(jnp.where(onehot, logits, 0.0), axis=-1)
    return z_y - jnp.max(jnp.where(onehot, -jnp.inf, logits), axis=-1)


def attack_loss(logits: jax.Array, y: jax.Array, kind: str, target: jax.Array | None = None) -> jax.Array:
    """Per-example loss to *maximise*: ``"margin"`` (CW, ``-margin``), ``"ce"`` (cross-entropy) or
    ``"targeted"`` (``logit_target - logit_y`` for ``target: (B,)``)."""
    if kind == "margin":
        return -margin(logits, y)
    z_y = jnp.take_along_axis(logits, y[:, None], axis=-1)[:, 0]
    if kind == "targeted":
        return jnp.take_along_axis(logits, target[:, None], axis=-1)[:, 0] - z_y
    return jax.nn.logsumexp(logits, axis=-1) - z_y


def _bcast(v: jax.Array, like: jax.Array) -> jax.Array:
    """``(B,)`` -> ``(B, 1, ..., 1)`` broadcastable against ``like: (B, *shape)``."""
    return v.reshape(v.shape + (1,) * (like.ndim - 1))


def step_sizes(alpha: jax.Array, steps: int, schedule: str) -> jax.Array:
    """``(steps, B)`` step sizes from base ``alpha: (B,)``: ``"constant"``; ``"cosine"``
    (``alpha * (1 + cos(pi t / steps)) / 2``); ``"step"`` (halved at 1/2 and again at 3/4 of the steps)."""
    t = jnp.arange(steps, dtype=jnp.float32)
    if schedule == "constant":
        f = jnp.ones_like(t)
    elif schedule == "cosine":
        f = 0.5 * (1.0 + jnp.cos(jnp.pi * t / steps))
    else:
        f = jnp.where(t >= steps / 2, 0.5, 1.0) * jnp.where(t >= 3 * steps / 4, 0.5, 1.0)
    return f[:, None] * alpha[None, :]


# --- validation --------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class _Closed:
    """``apply(params, x) = fn(x)`` for a plain callable ``fn`` (no parameters)."""
    fn: Callable

    def __call__(self, params, x):
        return self.fn(x)


def _split(fn) -> tuple[Callable, Any]:
    """``(apply, params)`` with ``fn(x) == apply(params, x)``; ``apply`` is hashable."""
    if isinstance(fn, Network):
        return fn.apply, fn.params
    return _Closed(fn), None


def _signature(apply, params, shape, dtype):
    """(number of classes, whether ``apply`` contains a convolution) for inputs ``shape``; cached per
    ``apply`` and parameter shapes."""
    leaves, treedef = jax.tree_util.tree_flatten(params)
    specs = tuple(jax.ShapeDtypeStruct(a.shape, a.dtype) if hasattr(a, "dtype") else
                  jax.ShapeDtypeStruct(jnp.shape(a), jnp.result_type(a)) for a in leaves)
    return _traced_signature(apply, treedef, specs, tuple(shape), dtype)


@functools.lru_cache(maxsize=128)
def _traced_signature(apply, treedef, specs, shape, dtype):
    params = jax.tree_util.tree_unflatten(treedef, specs)
    closed = jax.make_jaxpr(apply)(params, jax.ShapeDtypeStruct(shape, dtype))
    out = closed.out_avals
    if len(out) != 1 or out[0].ndim != 2 or out[0].shape[0] != shape[0]:
        raise InputError(f"fn must map (B, *shape) to logits (B, C); got outputs "
                         f"{[tuple(o.shape) for o in out]} for inputs {shape}")
    return int(out[0].shape[1]), _has_conv(closed.jaxpr)


def _has_conv(jaxpr) -> bool:
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "conv_general_dilated":
            return True
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            if _has_conv(sub):
                return True
    return False


def _prepare(fn, x, y, eps, domain):
    """Validate inputs; return ``(apply, params, x, y, eps (B,), domain, has_conv)`` (see `_split`)."""
    if not callable(fn):
        raise InputError(f"fn must be callable, got {type(fn).__name__}")
    x = check_x(x, values=False)
    if isinstance(fn, Network):
        if tuple(x.shape[1:]) != tuple(fn.input_shape):
            raise InputError(f"inputs must have shape (B, {', '.join(map(str, fn.input_shape))}), "
                             f"got {tuple(x.shape)}")
        if domain is None:
            domain = fn.domain
    domain = check_domain(domain)
    B = x.shape[0]
    apply, params = _split(fn)
    num_classes, has_conv = _signature(apply, params, x.shape, x.dtype)
    y = jnp.asarray(y)
    if y.shape != (B,) or not jnp.issubdtype(y.dtype, jnp.integer):
        raise InputError(f"labels must be integers of shape ({B},), got {y.dtype} {y.shape}")
    eps = check_eps(eps, B)
    check_values(x, domain=domain, y=y, num_classes=num_classes)
    return apply, params, x, y.astype(jnp.int32), eps, domain, has_conv


def _option(value, allowed, what):
    if value not in allowed:
        raise InputError(f"unknown {what} {value!r}; choose one of {allowed}")
    return value


def _recheck(fn, x_adv, x, y, eps, norm, domain) -> AttackResult:
    """``fn``: ``x -> logits`` (parameters bound)."""
    x_adv = project(x_adv, x, eps, norm, domain)
    m = margin(fn(x_adv), y)
    return AttackResult(x_adv, m < 0, m)


# --- FGSM ----------------------------------------------------------------------------------------------
def fgsm(fn, x, y, eps, *, loss: str = "ce", domain=None) -> AttackResult:
    """Fast gradient sign method: ``x + eps * sign(grad loss)`` projected onto ball ∩ domain."""
    apply, params, x, y, eps, domain, _ = _prepare(fn, x, y, eps, domain)
    return _fgsm(apply, params, x, y, eps, domain, _option(loss, ("margin", "ce"), "loss"))


@partial(jax.jit, static_argnames=("apply", "loss"))
def _fgsm(apply, params, x, y, eps, domain, loss):
    fn = partial(apply, params)
    g = jax.grad(lambda xa: jnp.sum(attack_loss(fn(xa), y, loss)))(x)
    return _recheck(fn, x + _bcast(eps, x) * jnp.sign(g), x, y, eps, "linf", domain)


# --- PGD -----------------------------------------------------------------------------------------------
def pgd(fn, x, y, eps, *, key, steps: int = 40, step_size=None, restarts: int = 1, norm: str = "linf",
        loss: str = "margin", domain=None, schedule: str = "constant", unroll=None,
        keep_best: bool = True) -> AttackResult:
    """Projected gradient descent with a random start, keeping the best point over steps and restarts.

    Args:
      fn, x, y, eps, domain: see the module docstring.
      key: PRNG key; restart ``r`` starts input ``b`` at the sample ``fold_in(fold_in(fold_in(key, r), b), 0)``
        of `perturb` (uniform in the ball ∩ domain), so results do not depend on the batch split.
      steps: gradient steps per restart.
      step_size: scalar or ``(B,)``; default ``2.5 * eps / steps``.
      restarts: independent random starts, run side by side as one batch of ``restarts * B``.
      norm: ``"linf"`` (signed-gradient steps), ``"l2"`` (normalised-gradient steps) or ``"l1"`` (sparse steps on
        the largest 1 % of the gradient's coordinates the domain does not block; `norms.ascent`).
      loss: ``"margin"`` (CW), ``"ce"`` (cross-entropy) or ``"targeted"`` (multi-targeted: restart ``r``
        maximises ``logit_t - logit_y`` for the ``(r mod (C-1))``-th most likely wrong class ``t`` at ``x``;
        it escapes the local optima a single margin loss locks into, so use ``restarts`` ≈ classes to try).
      schedule: ``"constant"``, ``"cosine"`` or ``"step"`` (see `step_sizes`).
      unroll: unroll factor of the step loop; None picks full unrolling for convolutional ``fn``
        and a rolled loop otherwise.
      keep_best: keep the lowest-margin iterate of every restart (a select over the batch at each
        step: 5-10% of the time of an MLP attack at batch 256 on CPU, see
        ``benchmarks/bench_attacks.py``). False keeps each restart's final iterate, as torchattacks and
        adversarial training do; the best restart is picked either way.
    Returns:
      `AttackResult` with the lowest-margin point kept (re-checked by a forward pass).
    """
    apply, params, x, y, eps, domain, has_conv = _prepare(fn, x, y, eps, domain)
    steps, restarts = int(steps), int(restarts)
    if steps < 1 or restarts < 1:
        raise InputError(f"steps and restarts must be >= 1, got steps={steps}, restarts={restarts}")
    alpha = 2.5 * eps / steps if step_size is None else check_eps(step_size, x.shape[0], "step_size")
    if unroll is None:
        unroll = steps if has_conv else 1
    return _pgd(apply, params, x, y, eps, alpha, key, domain, steps, restarts, check_norm(norm),
                _option(loss, LOSSES, "loss"), _option(schedule, SCHEDULES, "schedule"), int(unroll),
                bool(keep_best))


@partial(jax.jit, static_argnames=("apply", "steps", "restarts", "norm", "loss", "schedule", "unroll", "keep_best"))
def _pgd(apply, params, x, y, eps, alpha, key, domain, steps, restarts, norm, loss, schedule, unroll, keep_best):
    fn = partial(apply, params)
    B, R = x.shape[0], restarts
    tile = lambda a: jnp.concatenate([a] * R, axis=0)  # noqa: E731  (R*B, ...)
    xr, yr, er = tile(x), tile(y), tile(eps)
    sampler = SAMPLERS[norm]
    b_idx, zero = jnp.arange(B), jnp.zeros((1,), jnp.int32)
    x0 = jnp.concatenate([draw(sampler, jax.random.fold_in(key, r), x, eps, b_idx, zero, domain)[:, 0]
                          for r in range(R)], axis=0)
    lr = jnp.concatenate([step_sizes(alpha, steps, schedule)] * R, axis=1)  # (steps, R*B)
    tr = None
    if loss == "targeted":
        z0 = fn(x)
        wrong = jnp.where(jax.nn.one_hot(y, z0.shape[-1], dtype=jnp.bool_), -jnp.inf, z0)
        order = jnp.argsort(-wrong, axis=-1)  # most likely wrong class first
        tr = jnp.concatenate([order[:, r % (z0.shape[-1] - 1)] for r in range(R)])

    def objective(xa):
        z = fn(xa)
        return jnp.sum(attack_loss(z, yr, loss, tr)), z

    grad_fn = jax.grad(objective, has_aux=True)

    def body(t, carry):
        xa, best_x, best_m = carry
        g, z = grad_fn(xa)
        if keep_best:
            m = margin(z, yr)
            better = m < best_m
            best_x = jnp.where(_bcast(better, xa), xa, best_x)
            best_m = jnp.where(better, m, best_m)
        xa = project(xa + _bcast(lr[t], xa) * ascent(g, norm, xa, domain), xr, er, norm, domain)
        return xa, best_x, best_m

    init = (x0, x0 if keep_best else None, jnp.full((R * B,), jnp.inf, jnp.float32))
    xa, best_x, best_m = lax.fori_loop(0, steps, body, init, unroll=unroll)
    m = margin(fn(xa), yr)
    best_x = xa if best_x is None else jnp.where(_bcast(m < best_m, xa), xa, best_x)
    best_m = jnp.minimum(m, best_m)
    pick = jnp.argmin(best_m.reshape(R, B), axis=0)  # (B,)
    best_x = best_x.reshape((R, B) + x.shape[1:])[pick, b_idx]
    return _recheck(fn, best_x, x, y, eps, norm, domain)


# --- descent from given points ------------------------------------------------------------------------
@partial(jax.jit, static_argnames=("steps", "norm"))
def box_descent(fn, xs, c, lo, hi, step, *, steps: int, decay: float = 1.0, ball=None,
                norm: str = "linf") -> jax.Array:
    """Signed-gradient descent of ``c[d] . fn(xs[d])`` per row from the given points, projected on the box.

    ``fn`` a `Network` (a pytree); ``xs: (D, *in)``; ``c: (D, n_out)``; ``lo, hi`` broadcast against one
    input; ``step`` likewise, multiplied by ``decay ** t`` at step ``t``. With ``ball = (center (*in), eps)`` of
    an L2 or L1 ``norm``, steps are that norm's steepest descent (`norms.ascent`) of length ``step`` (a scalar),
    projected on the ball ∩ box. Returns the iterate of lowest objective per row ``(D, *in)`` (the start
    included), for a forward pass to confirm.
    """
    obj = lambda x: jnp.sum(fn(x) * c, axis=-1)  # (D,)

    def move(x, g, size):
        if ball is None:
            return jnp.clip(x - size * jnp.sign(g), lo, hi)
        box = (jnp.broadcast_to(lo, x.shape[1:]), jnp.broadcast_to(hi, x.shape[1:]))
        center = jnp.broadcast_to(ball[0], x.shape)
        return project(x - size * ascent(g, norm, x, box), center, jnp.full(x.shape[:1], ball[1], x.dtype), norm,
                       box)

    def body(t, carry):
        x, best, best_v = carry
        v, vjp = jax.vjp(obj, x)
        better = v < best_v
        best, best_v = jnp.where(_bcast(better, x), x, best), jnp.where(better, v, best_v)
        x = move(x, vjp(jnp.ones_like(v))[0], step * decay ** t.astype(x.dtype))
        return x, best, best_v

    x, best, best_v = lax.fori_loop(0, steps, body, (xs, xs, jnp.full(xs.shape[:1], jnp.inf, xs.dtype)))
    return jnp.where(_bcast(obj(x) < best_v, x), x, best)


# --- black-box random search ---------------------------------------------------------------------------
_MILESTONES = (0.001, 0.005, 0.02, 0.05, 0.1, 0.2, 0.4, 0.6, 0.8)


def random_search(fn, x, y, eps, *, key, queries: int = 1000, p_init: float = 0.1,
                  domain=None) -> AttackResult:
    """Black-box L∞ random local search on the margin loss (Square-attack-like, coordinate version).

    Starts at a random vertex ``x ± eps`` of the box; each iteration re-draws a random fraction
    ``p`` of the coordinates to ``x ± eps`` and keeps the candidate when the margin drops. ``p``
    starts at ``p_init`` and halves at fixed fractions of the budget. Uses ``queries`` forward
    passes per input (the initial point included) plus one for the re-check; no gradients.
    Input ``b`` at iteration ``t`` draws from ``fold_in(fold_in(key, b), t)``.
    """
    apply, params, x, y, eps, domain, _ = _prepare(fn, x, y, eps, domain)
    queries = int(queries)
    if queries < 1:
        raise InputError(f"queries must be >= 1, got {queries}")
    if not 0.0 < float(p_init) <= 1.0:
        raise InputError(f"p_init must lie in (0, 1], got {p_init}")
    return _random_search(apply, params, x, y, eps, key, domain, queries, float(p_init))


@partial(jax.jit, static_argnames=("apply", "queries", "p_init"))
def _random_search(apply, params, x, y, eps, key, domain, queries, p_init):
    fn = partial(apply, params)
    B, e = x.shape[0], _bcast(eps, x)
    kb = jax.vmap(lambda b: jax.random.fold_in(key, b))(jnp.arange(B))
    d = math.prod(x.shape[1:])

    def proposal(t, p):
        """Per input: random signs ``(B, *shape)`` and a mask of ~``p * d`` coordinates (at least one)."""
        def one(k):
            ks, km, kj = jax.random.split(jax.random.fold_in(k, t), 3)
            mask = jax.random.bernoulli(km, p, (d,)) | (jnp.arange(d) == jax.random.randint(kj, (), 0, d))
            return jax.random.rademacher(ks, x.shape[1:], x.dtype), mask.reshape(x.shape[1:])
        return jax.vmap(one)(kb)

    cur = project(x + e * proposal(0, 1.0)[0], x, eps, "linf", domain)
    cur_m = margin(fn(cur), y)
    edges = jnp.asarray([math.ceil(f * queries) for f in _MILESTONES], jnp.int32)

    def body(t, carry):
        cur, cur_m = carry
        p = p_init * 0.5 ** jnp.sum(t >= edges).astype(jnp.float32)
        sign, mask = proposal(t, p)
        cand = project(jnp.where(mask, x + e * sign, cur), x, eps, "linf", domain)
        m = margin(fn(cand), y)
        better = m < cur_m
        return jnp.where(_bcast(better, cur), cand, cur), jnp.where(better, m, cur_m)

    cur, _ = lax.fori_loop(1, queries, body, (cur, cur_m))
    return _recheck(fn, cur, x, y, eps, "linf", domain)
