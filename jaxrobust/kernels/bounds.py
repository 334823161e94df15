"""Sound output bounds of any JAX network over input boxes: IBP, CROWN and alpha-CROWN.

All methods share one call shape::

    ibp(fn, lo, hi)                         -> Bounds(lower, upper)      # (B, *out)
    crown(fn, lo, hi, spec=None, ...)       -> Bounds(lower, upper)      # (B, *out) or (B, K)

``fn`` maps a batch ``(B, *in_shape) -> (B, *out)`` (a `Network`, or ``lambda x: net.apply(p, x)``);
``lo, hi: (B, *in_shape)``. ``fn`` is traced once on a single example (batch 1) and its jaxpr is
interpreted (see `_graph`); examples are processed independently with ``vmap`` (CROWN in chunks
of examples bounded by `MEMORY_BUDGET`). The interpreted graph is cached per ``(fn, in_shape,
dtype)`` (weakly on ``fn``); its jitted programs take the network constants as arguments and are
shared by every graph of the same structure, so networks of one architecture compile once.

Intermediate CROWN bounds are computed, like auto_LiRPA's, only for the units that interval bounds
leave unstable; the relaxations use the interval bounds of the stable units and the CROWN bounds of the
others (so the adaptive slopes match auto_LiRPA's), interval propagation the intersection of both.

CROWN propagates, backwards from the output, a coefficient tensor of shape ``(rows, *node_shape)``.
Lower and upper bounds use the same rows with a sign trick: ``upper(c . y) = -lower(-c . y)``, so a
spec ``S: (K, C)`` becomes ``2K`` rows that all compute lower bounds. Linear equations are handled
uniformly by ``jax.linear_transpose`` of the primitive (vmapped over the rows), so convolutions
never form a dense matrix; nonlinear ones through the relaxations in `_relax`, or, lacking one,
by concretizing their interval bounds (always sound).

Soundness against float32 round-off: every returned bound is widened outward by
``MARGIN_REL * scale + MARGIN_ABS`` where ``scale`` is the largest ``|bound|`` of that example (see
`widen`). Float32 has unit round-off 6e-8; the error of a bound is a few round-offs per layer times
``sqrt(fan-in)`` (random-walk accumulation) relative to the magnitudes involved, i.e. ~1e-6 of the
bound scale for networks of ~10 layers with fan-in <= 10^4, so 1e-5 leaves an order of magnitude of
headroom. Relative to the example's scale (not to ``|bound|``) so that a bound that crosses zero,
as a margin does at the critical epsilon, is widened as much as the terms that cancelled in it.
This is an engineering margin for realistic networks, not a worst-case interval-arithmetic proof.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import weakref
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

from ..errors import InputError
from ._graph import Graph, Node, build_graph
from ._walk import (
    _EXAMPLES,
    _backward,
    _forward,
    _identity_prefixes,
    _kinks,
    _linear_prefix,
    _prefix_end,
    initial_slopes,
)
from .norms import check_norm

MARGIN_REL = 1e-5
MARGIN_ABS = 1e-6
# Bytes of CROWN coefficient tensors per chunk of examples (rough estimate). Small chunks keep the
# working set near the caches: on 2 CPU cores chunks of ~10 MLP examples ran ~1.8x faster than 256.
MEMORY_BUDGET = 2 ** 25


class Bounds(NamedTuple):
    """Elementwise ``lower <= value <= upper``."""
    lower: jax.Array
    upper: jax.Array


# ---------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------
def ibp(fn: Callable, lo, hi, *, sound_margin: bool = True) -> Bounds:
    """Interval bound propagation: bounds ``(B, *out)`` of ``fn`` over the boxes ``[lo, hi]: (B, *in)``.

    Affine layers use the midpoint-radius form (center through ``W``, radius through ``|W|``).
    ``sound_margin=False`` skips the round-off widening (only for comparisons with other tools).
    """
    lo, hi = _check_box(fn, lo, hi)
    prog = _program(fn, lo.shape[1:], lo.dtype)
    return _checked(*prog.ibp(prog.consts, lo, hi, sound_margin))


def crown(fn: Callable, lo, hi, spec=None, *, intermediate: str = "crown", alpha: bool = False,
          alpha_steps: int = 20, alpha_lr: float = 0.1, sound_margin: bool = True, ball=None) -> Bounds:
    """CROWN / alpha-CROWN bounds of ``spec @ fn(x)`` over the boxes ``[lo, hi]: (B, *in)`` (∩ ``ball``).

    Args:
      spec: ``(B, K, C)`` with ``C = prod(out)``; bounds are on ``spec[b] @ fn(x)[b].ravel()``,
        shape ``(B, K)``. None: bounds on the outputs themselves, shape ``(B, *out)``.
      intermediate: how pre-activation bounds are obtained: ``"crown"`` (back-substitution to the
        input, intersected with interval bounds) or ``"ibp"``.
      alpha: optimize the slopes through the kink of every ReLU-like unit (one per spec row and
        neuron, intermediate bounds fixed) with Adam to tighten the bounds; returns the elementwise
        best bounds found over all iterations (each is sound for any slope in range).
      alpha_steps, alpha_lr: Adam iterations and learning rate.
      sound_margin: see `ibp`.
      ball: None, or ``(center (B, *in), eps (B,) or scalar, norm)`` with ``norm`` in `norms.NORMS`: the bounds hold
        over each box ∩ its Lp ball; every linear bound, intermediate ones included, is concretised over both
        the box and the ball (dual norm) and the larger taken. Pass the ball's box hull ∩ the domain as the box.

    Final bounds are also intersected with the interval bounds, so they are never looser than IBP.
    """
    if intermediate not in ("crown", "ibp"):
        raise InputError(f"intermediate must be 'crown' or 'ibp', got {intermediate!r}")
    lo, hi = _check_box(fn, lo, hi)
    if spec is not None:
        spec = jnp.asarray(spec, lo.dtype)
        if spec.ndim != 3 or spec.shape[0] != lo.shape[0]:
            raise InputError(f"spec must have shape (B, K, C) with B={lo.shape[0]}, got {spec.shape}")
    prog = _program(fn, lo.shape[1:], lo.dtype)
    n_out = math.prod(prog.graph.shape(prog.graph.output))
    if spec is not None and spec.shape[2] != n_out:
        raise InputError(f"spec has {spec.shape[2]} columns but the network has {n_out} outputs")
    steps = int(alpha_steps) if alpha else 0
    pre = prog.prefixes(ball is not None) if intermediate == "crown" else {}
    norm = None
    if ball is not None:
        center, eps, norm = ball
        norm = check_norm(norm)
        center = jnp.asarray(center, lo.dtype)
        if center.shape != lo.shape:
            raise InputError(f"the ball's center must have the box's shape {lo.shape}, got {center.shape}")
        concrete = not isinstance(eps, jax.core.Tracer)
        eps = np.asarray(eps, np.float64) if concrete else eps
        if eps.shape not in ((), (lo.shape[0],)):
            raise InputError(f"the ball's eps must be a scalar or have shape ({lo.shape[0]},), got {eps.shape}")
        if concrete and not np.all(np.isfinite(eps) & (eps >= 0)):
            raise InputError("the ball's eps must be finite and >= 0")
        eps = _round_to(jnp.broadcast_to(jnp.asarray(eps), (lo.shape[0],)), lo.dtype, down=False)
        ball = (center, eps)
    return _checked(*prog.crown(prog.consts, pre, lo, hi, spec, ball, steps, float(alpha_lr), sound_margin, norm))


def robustness_spec(labels, num_classes: int) -> jax.Array:
    """Spec ``(B, C-1, C)`` whose rows give the margins ``logit_y - logit_j`` for ``j != y`` (ascending j).

    Concrete labels must be integers in ``[0, num_classes)`` (InputError otherwise)."""
    labels = jnp.asarray(labels)
    if not isinstance(labels, jax.core.Tracer):
        _check_labels(labels, num_classes)
    j = jnp.arange(num_classes - 1)[None, :]
    j = j + (j >= labels[:, None])
    eye = jnp.eye(num_classes, dtype=jnp.float32)
    return eye[labels][:, None, :] - eye[j]


def margin_bounds(net, x, eps, method: str = "ibp", *, labels=None, norm: str = "linf") -> jax.Array:
    """Lower bounds ``(B, C-1)`` of ``logit_y - logit_j`` (j != y) over the ``norm`` ball of radius eps around ``x``.

    ``x`` must lie in ``net.domain`` (InputError otherwise, as for integer images: scale them first);
    the ball (eps scalar or ``(B,)``) is intersected with ``net.domain``, so it still contains ``x``. ``norm``:
    ``"linf"``, ``"l2"`` or ``"l1"`` (`norms.check_norm`); IBP bounds the ball's box hull, CROWN concretises
    over the ball too. ``labels`` default to the network's predictions at ``x``. ``method``: "ibp",
    "crown" or "alpha-crown". All margins positive proves robustness of every example.
    """
    if not isinstance(x, jax.core.Tracer):
        x = net.check_inputs(x)
    x = jnp.asarray(x, jnp.float32)
    eps = jnp.asarray(eps, x.dtype)
    if eps.ndim == 1:
        eps = eps.reshape((-1,) + (1,) * (x.ndim - 1))
    lo = jnp.clip(x - eps, *net.domain)
    hi = jnp.clip(x + eps, *net.domain)
    if labels is None:
        labels = jnp.argmax(net(x), axis=-1)
    spec = robustness_spec(labels, net.num_classes)
    if method == "ibp":
        b = ibp(net, lo, hi)
        return spec_interval(spec, b.lower.reshape(len(x), -1), b.upper.reshape(len(x), -1)).lower
    if method in ("crown", "alpha-crown"):
        norm = check_norm(norm)
        ball = None if norm == "linf" else (x, eps.reshape(-1) * jnp.ones(len(x), x.dtype), norm)
        return crown(net, lo, hi, spec, alpha=method == "alpha-crown", ball=ball).lower
    raise InputError(f"method must be 'ibp', 'crown' or 'alpha-crown', got {method!r}")


def spec_interval(spec, lower, upper) -> Bounds:
    """Interval bounds ``(B, K)`` of ``spec @ y`` for ``y in [lower, upper]: (B, C)``, ``spec: (B, K, C)``."""
    pos, neg = jnp.maximum(spec, 0), jnp.minimum(spec, 0)
    mv = lambda a, b: jnp.einsum("bkc,bc->bk", a, b)
    return Bounds(mv(pos, lower) + mv(neg, upper), mv(pos, upper) + mv(neg, lower))


def widen(b: Bounds) -> Bounds:
    """Widen ``b`` (leading batch axis) by ``MARGIN_REL * scale + MARGIN_ABS``, scale = max |bound| per example."""
    axes = tuple(range(1, b.lower.ndim))
    scale = jnp.maximum(jnp.abs(b.lower), jnp.abs(b.upper)).max(axis=axes, keepdims=True)
    m = MARGIN_REL * scale + MARGIN_ABS
    return Bounds(b.lower - m, b.upper + m)


# ---------------------------------------------------------------------------------------------
# Programs (cached per function and input shape)
# ---------------------------------------------------------------------------------------------
class _Program:
    """A function's bounded graph, its constants and the jitted programs shared by its architecture."""

    def __init__(self, fn, in_shape, dtype):
        self.graph = build_graph(lambda x: fn(x), in_shape, dtype)
        self.consts = [jnp.asarray(c) for c in self.graph.consts]
        self.dtype = jnp.dtype(dtype)
        self._prefixes = {}
        try:
            self.arch = _Arch(self.graph)
        except TypeError:  # unhashable primitive parameters: programs of this graph only
            self.arch = None
            self.ibp, self.crown, self._prefix_program = _programs(self.graph)
        else:
            self.ibp, self.crown, self._prefix_program = _compiled(self.arch)

    def prefixes(self, ball: bool = False) -> dict:
        """`_identity_prefixes` of these constants (for box ∩ ball inputs with ``ball``), computed on first use
        and kept (they depend on the weights only; at batch 1 they cost more than the rest of a CROWN call)."""
        if ball not in self._prefixes:
            self._prefixes[ball] = self._prefix_program(self.consts, self.dtype, ball)
        return self._prefixes[ball]


class _Arch:
    """A graph with its constants replaced by their shapes, hashed by structure: graphs that differ
    only in constant values (same architecture, other weights) are equal and share compiled programs."""

    def __init__(self, g: Graph):
        self.graph = dataclasses.replace(g, consts=[jax.ShapeDtypeStruct(jnp.shape(c), jnp.result_type(c))
                                                   for c in g.consts])
        self.key = _freeze((g.nodes, g.shapes, g.input, g.output, g.needs_bounds, g.exact, g.images,
                            self.graph.consts))
        hash(self.key)

    def __hash__(self):
        return hash(self.key)

    def __eq__(self, other):
        return isinstance(other, _Arch) and self.key == other.key


def _freeze(obj):
    """A hashable image of nested nodes, containers and numpy arrays."""
    if isinstance(obj, Node):
        return ("node", obj.kind, obj.prim, _freeze(obj.params), obj.ins, obj.outs, _freeze(obj.extra))
    if isinstance(obj, dict):
        return tuple(sorted((k, _freeze(v)) for k, v in obj.items()))
    if isinstance(obj, (list, tuple)):
        return tuple(_freeze(v) for v in obj)
    if isinstance(obj, (set, frozenset)):
        return frozenset(obj)
    if isinstance(obj, np.ndarray):
        return (obj.shape, obj.dtype.str, obj.tobytes())
    if isinstance(obj, jax.ShapeDtypeStruct):
        return (obj.shape, jnp.dtype(obj.dtype).str)
    return obj


def full_precision(fn):
    """``fn`` (a jitted program) traced and run with every matrix product and convolution at full float32
    precision (``jax.default_matmul_precision("highest")``): GPUs and TPUs otherwise take float32
    products in TF32 or bf16 passes, whose error the round-off margin does not cover."""
    def within(method):
        def call(*args, **kwargs):
            with jax.default_matmul_precision("highest"):
                return method(*args, **kwargs)
        return call

    run = functools.wraps(fn)(within(fn))
    run.lower = within(fn.lower)        # for inspecting the compiled program
    run._cache_size = fn._cache_size     # compiled variants (shared by an architecture's networks)
    return run


def _programs(g: Graph):
    """Jitted ``(ibp, crown, prefixes)`` of ``g`` with its constants as the first argument."""
    return (full_precision(jax.jit(functools.partial(_ibp_batch, g), static_argnums=(3,))),
            full_precision(jax.jit(functools.partial(_crown_batch, g), static_argnums=(6, 7, 8, 9))),
            full_precision(jax.jit(functools.partial(_identity_prefixes, g), static_argnums=(1, 2))))


@functools.lru_cache(maxsize=64)
def _compiled(arch: _Arch):
    return _programs(arch.graph)


_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _program(fn, in_shape, dtype) -> _Program:
    key = (tuple(in_shape), jnp.dtype(dtype).name)
    try:
        per_fn = _CACHE.setdefault(fn, {})
    except TypeError:
        per_fn = {}
    if key not in per_fn:
        prog = _Program(fn, in_shape, dtype)
        if any(isinstance(c, jax.core.Tracer) for c in prog.consts):
            return prog
        per_fn[key] = prog
    return per_fn[key]


def _check_labels(labels, num_classes: int):
    """InputError unless ``labels`` are integers in ``[0, num_classes)``."""
    a = np.asarray(labels)
    if a.dtype.kind not in "iu" or (a.size and (a.min() < 0 or a.max() >= num_classes)):
        raise InputError(f"labels must be integers in [0, {num_classes}), got {a.dtype}"
                         + (f" in [{a.min()}, {a.max()}]" if a.size else ""))


def _check_box(fn, lo, hi):
    """Shapes and dtype of a box; its values are checked by the bound programs (see `_checked`).

    The box takes the dtype ``fn`` computes in (`_compute_dtype`); a wider box is rounded outward to it,
    so it still contains every point of the given box.
    """
    lo, hi = jnp.asarray(lo), jnp.asarray(hi)
    if lo.shape != hi.shape or lo.ndim < 1:
        raise InputError(f"lo and hi must have the same shape (B, *in_shape), got {lo.shape} and {hi.shape}")
    dtype = _compute_dtype(fn, lo.shape[1:])
    return _round_to(lo, dtype, down=True), _round_to(hi, dtype, down=False)


def _round_to(a, dtype, down: bool):
    """``a`` in ``dtype``, rounded down (up) where the cast is inexact; under tracing a plain cast."""
    if a.dtype == dtype:
        return a
    b = a.astype(dtype)
    if not jnp.issubdtype(a.dtype, jnp.floating) or isinstance(a, jax.core.Tracer):
        return b
    off = b.astype(a.dtype) > a if down else b.astype(a.dtype) < a
    return jnp.where(off, jnp.nextafter(b, jnp.asarray(-jnp.inf if down else jnp.inf, dtype)), b)


def _compute_dtype(fn, in_shape):
    """The floating dtype of ``fn``'s output on a float32 input: float32 unless the network computes in
    float64 (its parameters are float64 under ``jax_enable_x64``). Cached per function."""
    key = ("dtype", tuple(in_shape))
    try:
        per_fn = _CACHE.setdefault(fn, {})
    except TypeError:
        per_fn = {}
    if key not in per_fn:
        out = jax.eval_shape(fn, jax.ShapeDtypeStruct((1, *in_shape), jnp.float32))
        dt = jnp.dtype(out.dtype)
        per_fn[key] = dt if jnp.issubdtype(dt, jnp.floating) else jnp.dtype(jnp.float32)
    return per_fn[key]


def _box_ok(lo, hi):
    """Whether ``lo <= hi`` with finite entries everywhere; computed inside the programs, where it fuses
    with their first pass over the box instead of costing a dispatch and a device round trip of its own."""
    return jnp.all((lo <= hi) & jnp.isfinite(lo) & jnp.isfinite(hi))


def _checked(bounds, ok):
    """``bounds`` of a program that also returned `_box_ok`; InputError if the box was invalid (not
    checked under tracing, where the value is unknown)."""
    if not isinstance(ok, jax.core.Tracer) and not bool(ok):
        raise InputError("the box must satisfy lo <= hi with finite entries")
    return bounds


def _ibp_batch(g: Graph, consts, lo, hi, margin):
    def one(l, h):
        iv = _forward(g, consts, l[None], h[None])[0][g.output]
        return iv.lo[0], iv.hi[0]

    b = Bounds(*jax.vmap(one)(lo, hi))
    return (widen(b) if margin else b), _box_ok(lo, hi)


def _crown_batch(g: Graph, consts, pre, lo, hi, spec, ball, steps, lr, margin, norm):
    """CROWN bounds; ``pre``: `_identity_prefixes` for CROWN intermediate bounds, ``{}`` for interval ones;
    ``ball``: None or ``(center (B, *in), eps (B,))`` of a ``norm`` ball (see `crown`)."""
    out_shape = g.shape(g.output)[1:]
    n_out = math.prod(out_shape)
    rows = 2 * (n_out if spec is None else spec.shape[1])
    prefixes = {v: (acc, bias, _prefix_end(g, v)) for v, (acc, bias) in pre.items()}

    def one(l, h, s, b):
        s = jnp.eye(n_out, dtype=l.dtype) if s is None else s
        b = None if b is None else (b[0][None], b[1], norm)
        return _crown_one(g, consts, l[None], h[None], s, prefixes, steps, lr, b)

    chunk = min(lo.shape[0], max(1, MEMORY_BUDGET // _bytes_per_example(g, rows, prefixes, steps)))
    chunk = -(-lo.shape[0] // -(-lo.shape[0] // chunk))  # as many chunks, evenly filled (least padding)
    order = None
    if prefixes and _kinks(g) and lo.shape[0] > chunk:  # with one chunk, its order changes nothing
        order = jnp.argsort(jax.vmap(functools.partial(_unstable_fraction, g, consts))(lo, hi))
    lower, upper = _chunked(one, (lo, hi, spec, ball), chunk, order)
    if spec is None:
        lower, upper = lower.reshape((-1,) + out_shape), upper.reshape((-1,) + out_shape)
    b = Bounds(lower, upper)
    return (widen(b) if margin else b), _box_ok(lo, hi)


def _chunked(fn, args, chunk, order=None):
    """``vmap(fn)`` over the examples of ``args`` (leading axis ``B``) in chunks of ``chunk`` examples,
    taken in ``order`` (a permutation of ``B``; None: as given); vmap axis name `_EXAMPLES`."""
    B = jax.tree_util.tree_leaves(args)[0].shape[0]
    n = -(-B // chunk)
    order = jnp.arange(B) if order is None else order
    idx = jnp.concatenate([order, jnp.full((n * chunk - B,), order[-1])]).reshape(n, chunk)
    run = jax.vmap(fn, axis_name=_EXAMPLES)
    _, out = lax.scan(lambda _, i: (None, run(*jax.tree_util.tree_map(lambda a: a[i], args))), None, idx)
    inv = jnp.argsort(order)
    return jax.tree_util.tree_map(lambda o: o.reshape((n * chunk,) + o.shape[2:])[inv], out)


def _bytes_per_example(g: Graph, rows, prefixes, steps):
    """Rough peak memory of one example: coefficient rows (spec rows, or those of the vars with CROWN
    bounds) times the widest node, a few copies."""
    width = max(math.prod(s) for s in g.shapes.values())
    need = [2 * math.prod(g.shape(v)) for v in prefixes]
    copies = 4 if steps else 2
    return 4 * copies * width * max([rows] + need)


def _unstable_fraction(g: Graph, consts, lo, hi):
    """Largest fraction, over the vars in `_kinks`, of units whose interval bounds straddle the kink,
    for one example ``lo, hi: in_shape`` (the key by which `_crown_batch` sorts the examples)."""
    ivs = _forward(g, consts, lo[None], hi[None])[0]
    return jnp.max(jnp.stack([jnp.mean((ivs[v].lo < consts[k]) & (ivs[v].hi > consts[k]))
                              for v, k in _kinks(g).items()]))


def _crown_one(g: Graph, consts, lo, hi, spec, prefixes, steps, lr, ball=None):
    """Bounds ``(K,), (K,)`` of ``spec @ out`` for one example ``lo, hi: (1, *in)``, ``spec: (K, C)`` (∩ ``ball``,
    see `_walk._forward`)."""
    ivs, rel = _forward(g, consts, lo, hi, prefixes, ball)
    shape = g.shape(g.output)
    K = spec.shape[0]
    state = _linear_prefix(g, consts, g.output, jnp.concatenate([spec, -spec]).reshape((2 * K,) + shape))
    bound = lambda theta: _backward(g, consts, rel, state, theta)
    res = bound(None)
    if steps:
        res = jnp.maximum(res, _optimize_alpha(g, consts, rel, bound, 2 * K, steps, lr))
    out = ivs[g.output]
    ib = spec_interval(spec[None], out.lo.reshape(1, -1), out.hi.reshape(1, -1))
    return jnp.maximum(res[:K], ib.lower[0]), jnp.minimum(-res[K:], ib.upper[0])


def _optimize_alpha(g: Graph, consts, ivs, bound, R, steps, lr):
    """Adam over the relaxation slopes (`initial_slopes`, in [0, 1]); the best bounds ``(R,)`` seen."""
    theta = initial_slopes(g, consts, ivs, R)
    opt = optax.adam(lr)

    def loss(t):
        r = bound(t)
        return -jnp.sum(r), r

    def step(carry, _):
        t, state, best = carry
        (_, r), grad = jax.value_and_grad(loss, has_aux=True)(t)
        updates, state = opt.update(grad, state, t)
        t = jax.tree_util.tree_map(lambda a: jnp.clip(a, 0.0, 1.0), optax.apply_updates(t, updates))
        return (t, state, jnp.fmax(best, r)), None

    best = jnp.full((R,), -jnp.inf, ivs[g.input].lo.dtype)
    (t, _, best), _ = lax.scan(step, (theta, opt.init(theta), best), None, length=steps)
    return jnp.fmax(best, bound(t))


