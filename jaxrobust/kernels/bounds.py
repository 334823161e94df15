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
from . import _conv, _relax
from ._graph import Graph, Node, build_graph

MARGIN_REL = 1e-5
MARGIN_ABS = 1e-6
# Bytes of CROWN coefficient tensors per chunk of examples (rough estimate). Small chunks keep the
# working set near the caches: on 2 CPU cores chunks of ~10 MLP examples ran ~1.8x faster than 256.
MEMORY_BUDGET = 2 ** 25
# Intermediate CROWN bounds are computed only for the units whose interval bounds straddle a kink, in
# blocks of at least 1/BLOCKS of the layer, as many as the example with most such units in a chunk needs
# (chunks of examples sorted by their fraction of unstable units under plain interval bounds). A block
# also holds at least BLOCK_FLOATS coefficients over the chunk, so that small chunks (batch 1) of
# networks with cheap rows do not pay the loop overhead many times for little work. Each iteration
# costs a few dozen small kernel launches besides its arithmetic, so the units are first taken
# COARSE blocks at a time while whole coarse blocks are needed (no padding), the rest in fine blocks:
# on mnist_relu_6_100, whose units are nearly all unstable, CROWN ran 1.5-2x faster (bench_bounds.py).
BLOCKS = 32
BLOCK_FLOATS = 2 ** 16
COARSE = 8
_EXAMPLES = "examples"  # vmap axis of the examples in a chunk


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
          alpha_steps: int = 20, alpha_lr: float = 0.1, sound_margin: bool = True) -> Bounds:
    """CROWN / alpha-CROWN bounds of ``spec @ fn(x)`` over the boxes ``[lo, hi]: (B, *in)``.

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
    pre = prog.prefixes() if intermediate == "crown" else {}
    return _checked(*prog.crown(prog.consts, pre, lo, hi, spec, steps, float(alpha_lr), sound_margin))


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


def margin_bounds(net, x, eps, method: str = "ibp", *, labels=None) -> jax.Array:
    """Lower bounds ``(B, C-1)`` of ``logit_y - logit_j`` (j != y) over the eps-box around ``x``.

    ``x`` must lie in ``net.domain`` (InputError otherwise, as for integer images: scale them first);
    the box ``[x - eps, x + eps]`` (eps scalar or ``(B,)``) is clipped to ``net.domain``, so it still
    contains ``x``. ``labels`` default to the network's predictions at ``x``. ``method``: "ibp",
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
        return crown(net, lo, hi, spec, alpha=method == "alpha-crown").lower
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
        self._prefixes = None
        try:
            self.arch = _Arch(self.graph)
        except TypeError:  # unhashable primitive parameters: programs of this graph only
            self.arch = None
            self.ibp, self.crown, self._prefix_program = _programs(self.graph)
        else:
            self.ibp, self.crown, self._prefix_program = _compiled(self.arch)

    def prefixes(self) -> dict:
        """`_identity_prefixes` of these constants, computed on first use and kept (they depend on the
        weights only; at batch 1 they cost more than the rest of a CROWN call)."""
        if self._prefixes is None:
            self._prefixes = self._prefix_program(self.consts, self.dtype)
        return self._prefixes


class _Arch:
    """A graph with its constants replaced by their shapes, hashed by structure: graphs that differ
    only in constant values (same architecture, other weights) are equal and share compiled programs."""

    def __init__(self, g: Graph):
        self.graph = dataclasses.replace(g, consts=[jax.ShapeDtypeStruct(jnp.shape(c), jnp.result_type(c))
                                                   for c in g.consts])
        self.key = _freeze((g.nodes, g.shapes, g.input, g.output, g.needs_bounds, g.exact, self.graph.consts))
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
            full_precision(jax.jit(functools.partial(_crown_batch, g), static_argnums=(5, 6, 7))),
            full_precision(jax.jit(functools.partial(_identity_prefixes, g), static_argnums=(1,))))


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


def _crown_batch(g: Graph, consts, pre, lo, hi, spec, steps, lr, margin):
    """CROWN bounds; ``pre``: `_identity_prefixes` for CROWN intermediate bounds, ``{}`` for interval ones."""
    out_shape = g.shape(g.output)[1:]
    n_out = math.prod(out_shape)
    rows = 2 * (n_out if spec is None else spec.shape[1])
    prefixes = {v: (acc, bias, _prefix_end(g, v)) for v, (acc, bias) in pre.items()}

    def one(l, h, s):
        s = jnp.eye(n_out, dtype=l.dtype) if s is None else s
        return _crown_one(g, consts, l[None], h[None], s, prefixes, steps, lr)

    chunk = min(lo.shape[0], max(1, MEMORY_BUDGET // _bytes_per_example(g, rows, prefixes, steps)))
    chunk = -(-lo.shape[0] // -(-lo.shape[0] // chunk))  # as many chunks, evenly filled (least padding)
    order = None
    if prefixes and _kinks(g) and lo.shape[0] > chunk:  # with one chunk, its order changes nothing
        order = jnp.argsort(jax.vmap(functools.partial(_unstable_fraction, g, consts))(lo, hi))
    lower, upper = _chunked(one, (lo, hi, spec), chunk, order)
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


def _kinks(g: Graph):
    """``{var: const index of k}`` for the vars that need CROWN bounds and feed kinks at one ``k``."""
    out = {}
    for n in g.nodes:
        if n.kind == "pwl":
            v = n.bounded()[0]
            out[v] = n.extra["k"] if out.get(v, n.extra["k"]) == n.extra["k"] else None
    return {v: k for v, k in out.items() if k is not None and v in g.needs_bounds - g.exact}


def _unstable_fraction(g: Graph, consts, lo, hi):
    """Largest fraction, over the vars in `_kinks`, of units whose interval bounds straddle the kink,
    for one example ``lo, hi: in_shape`` (the key by which `_crown_batch` sorts the examples)."""
    ivs = _forward(g, consts, lo[None], hi[None])[0]
    return jnp.max(jnp.stack([jnp.mean((ivs[v].lo < consts[k]) & (ivs[v].hi > consts[k]))
                              for v, k in _kinks(g).items()]))


# ---------------------------------------------------------------------------------------------
# Interval propagation
# ---------------------------------------------------------------------------------------------
class _Iv:
    """An interval held as ``(lo, hi)`` and/or ``(mid, rad)``; the other form is derived on demand."""

    def __init__(self, lo=None, hi=None, mid=None, rad=None):
        self._lo, self._hi, self._mid, self._rad = lo, hi, mid, rad

    @property
    def lo(self):
        if self._lo is None:
            self._lo = self._mid - self._rad
        return self._lo

    @property
    def hi(self):
        if self._hi is None:
            self._hi = self._mid + self._rad
        return self._hi

    @property
    def mid(self):
        if self._mid is None:
            self._mid = 0.5 * (self._lo + self._hi)
        return self._mid

    @property
    def rad(self):
        if self._rad is None:
            self._rad = jnp.maximum(self._hi - self.mid, self.mid - self._lo)
        return self._rad


def _bind(node: Node, consts, xs, *, prim=None, absolute=False):
    """Evaluate ``node``'s primitive with ``xs`` at its bounded operands; list of outputs."""
    xs = iter(xs)
    absmap = node.extra.get("abs", {}) if absolute else {}
    args = []
    for i, r in enumerate(node.ins):
        if r[0] == "b":
            args.append(next(xs))
        elif r[0] == "c":
            args.append(consts[absmap.get(i, r[1])])
        else:
            args.append(jnp.zeros(r[1], r[2]))
    prim = prim or node.prim
    out = prim.bind(*args, **node.params)
    return list(out) if prim.multiple_results else [out]


def _pwl_consts(node, consts):
    return [consts[node.extra[k]] for k in ("k", "v", "an", "ap")]


def _ibp_node(node: Node, consts, ivs):
    """Interval rule of one node: list of output intervals."""
    kind = node.kind
    if kind == "linear":
        name = node.prim.name
        centers = _bind(node, consts, [iv.mid for iv in ivs])
        if name == "neg":
            radii = [ivs[0].rad]
        else:
            radii = _bind(node, consts, [iv.rad for iv in ivs], absolute=True,
                          prim=lax.add_p if name == "sub" else None)
        offsets = node.extra.get("offset", [None] * len(centers))
        return [_Iv(mid=c if o is None else c + consts[o], rad=r) for c, r, o in zip(centers, radii, offsets)]
    if kind == "pwl":
        k, v, an, ap = _pwl_consts(node, consts)
        l, u = ivs[0].lo, ivs[0].hi
        y = lambda x: v + jnp.where(x >= k, ap * (x - k), an * (x - k))
        cand = [y(l), y(u), y(jnp.clip(k, l, u))]
        return [_Iv(lo=functools.reduce(jnp.minimum, cand), hi=functools.reduce(jnp.maximum, cand))]
    if kind in ("monotone", "sshape", "maxpool", "max2"):
        return [_Iv(lo=a, hi=b) for a, b in zip(_bind(node, consts, [iv.lo for iv in ivs]),
                                               _bind(node, consts, [iv.hi for iv in ivs]))]
    if kind in ("abs", "pow"):
        l, u = ivs[0].lo, ivs[0].hi
        y = node.extra.get("y", 1)
        if kind == "pow" and y % 2 == 1:
            return [_Iv(lo=l ** y, hi=u ** y)]
        alo = jnp.where(l >= 0, l, jnp.where(u <= 0, -u, 0.0))
        ahi = jnp.maximum(-l, u)
        return [_Iv(lo=alo ** y, hi=ahi ** y)]
    if kind == "mul2":
        (a, b) = ivs
        prods = [x * y for x in (a.lo, a.hi) for y in (b.lo, b.hi)]
        return [_Iv(lo=functools.reduce(jnp.minimum, prods), hi=functools.reduce(jnp.maximum, prods))]
    if kind == "constant":
        c = consts[node.ins[0][1]]
        return [_Iv(lo=c, hi=c)]
    raise AssertionError(kind)


def _forward(g: Graph, consts, lo, hi, prefixes=None):
    """Bounds of every var for one example (``lo, hi: (1, *in)``), with CROWN bounds for the vars in
    ``prefixes`` (see `_identity_prefixes`). Returns ``(ivs, rel)``: ``ivs`` the tightest bounds
    (interval and CROWN intersected), propagated forward; ``rel`` the bounds the relaxations use (see
    `_refine_var`)."""
    ivs = {g.input: _Iv(lo=lo, hi=hi)}
    rel = dict(ivs)
    kinks = _kinks(g) if prefixes else {}
    for node in g.nodes:
        for v, iv in zip(node.outs, _ibp_node(node, consts, [ivs[b] for b in node.bounded()])):
            ivs[v] = rel[v] = iv
            if prefixes and v in prefixes:
                ivs[v], rel[v] = _refine_var(g, consts, rel, iv, v, prefixes[v], kinks.get(v))
    return ivs, rel


# ---------------------------------------------------------------------------------------------
# Backward (CROWN) propagation
# ---------------------------------------------------------------------------------------------
def _identity_prefixes(g: Graph, consts, dtype):
    """Backward-pass prefixes ``{var: (acc, bias)}`` (see `_linear_prefix`) from the identity on each var
    that needs CROWN bounds; they depend on the weights only, so they are shared by every example."""
    return {v: _identity_prefix(g, consts, v, dtype)[:2] for v in g.needs_bounds - g.exact}


def _identity_prefix(g: Graph, consts, v, dtype):
    """`_linear_prefix` from the rows ``[I; -I]`` on var ``v``: the start of a backward pass that gives
    lower bounds of every unit of ``v`` (first half) and of their negatives (second half)."""
    n = math.prod(g.shape(v))
    eye = jnp.eye(n, dtype=dtype)
    return _linear_prefix(g, consts, v, jnp.concatenate([eye, -eye]).reshape((2 * n,) + g.shape(v)))


def _crown_var(g: Graph, consts, ivs, v, prefix):
    """CROWN bounds of the bounded var ``v`` (shape of ``v``) by back-substitution to the input."""
    shape = g.shape(v)
    n = math.prod(shape)
    res = _backward(g, consts, ivs, prefix)
    return res[:n].reshape(shape), -res[n:].reshape(shape)


def _refine_var(g: Graph, consts, rel, iv, v, prefix, kink):
    """Bounds of the bounded var ``v`` from its interval bounds ``iv`` and CROWN (`_crown_var`).

    Returns ``(tight, relax)``. For a var feeding a kink at ``consts[kink]``, only the units whose
    interval bounds straddle the kink get CROWN rows (see `BLOCKS`); ``relax`` keeps the interval
    bounds of the stable units and the CROWN bounds of the others, as auto_LiRPA does, so that the
    adaptive slopes agree with it; ``tight`` is the intersection.
    """
    shape = g.shape(v)
    n = math.prod(shape)
    if kink is None:
        cl, cu = _crown_var(g, consts, rel, v, prefix)
        tight = _Iv(lo=jnp.maximum(iv.lo, cl), hi=jnp.minimum(iv.hi, cu))
        return tight, tight
    flo, fhi = iv.lo.reshape(-1), iv.hi.reshape(-1)
    k = jnp.broadcast_to(consts[kink], shape).reshape(-1)
    stable = (flo >= k) | (fhi <= k)

    # blocks of units, unstable first, until every example of the chunk has all its unstable units
    blk = _block_units(g, v, lax.axis_size(_EXAMPLES))
    order = jnp.argsort(stable)
    acc, bias, last = prefix

    def blocks(start, size, count, c):
        def block(j, c):
            sel = lax.dynamic_slice(order, (start + j * size,), (size,))
            rows = jnp.concatenate([sel, sel + n])
            res = _backward(g, consts, rel, ({u: t[rows] for u, t in acc.items()}, bias[rows], last))
            return c[0].at[sel].set(res[:size]), c[1].at[sel].set(-res[size:])
        return lax.fori_loop(0, count, block, c)

    need = lax.pmax(jnp.sum(~stable), _EXAMPLES)
    big = min(n, COARSE * blk)
    c, done = (flo, fhi), 0
    if big > blk:
        done = need // big * big
        c = blocks(0, big, need // big, c)
    cl, cu = blocks(done, blk, -(-(need - done) // blk), c)
    cl, cu = jnp.where(stable, flo, cl), jnp.where(stable, fhi, cu)
    relax = _Iv(lo=cl.reshape(shape), hi=cu.reshape(shape))
    tight = _Iv(lo=jnp.maximum(flo, cl).reshape(shape), hi=jnp.minimum(fhi, cu).reshape(shape))
    return tight, relax


def _block_units(g: Graph, v, chunk: int) -> int:
    """Units of ``v`` per block of `_refine_var` for chunks of ``chunk`` examples (see `BLOCKS`)."""
    n = math.prod(g.shape(v))
    upstream = [g.input] + [u for node in g.nodes[:g.producer_index(v)] for u in node.outs]
    row = sum(math.prod(g.shape(u)) for u in upstream)
    return min(n, max(-(-n // BLOCKS), -(-BLOCK_FLOATS // (2 * chunk * row))))


def _sum_rows(t):
    return t.reshape(t.shape[0], -1).sum(axis=1)


def _prefix_end(g: Graph, start) -> int:
    """Index of the first nonlinear node that a backward pass from ``start`` reaches (-1: none)."""
    live = {start}
    idx = g.producer_index(start)
    while idx >= 0:
        node = g.nodes[idx]
        if live & set(node.outs):
            if node.kind != "linear":
                break
            live = (live - set(node.outs)) | set(node.bounded())
        idx -= 1
    return idx


def _linear_prefix(g: Graph, consts, start, lam):
    """Run the backward pass from ``start`` through linear nodes only, up to `_prefix_end`; these steps
    do not depend on the example, so they are shared by the batch.

    Returns the state ``(acc, bias, idx)`` that `_backward` resumes from.
    """
    R = lam.shape[0]
    acc, bias = {start: lam}, jnp.zeros((R,), lam.dtype)
    end = _prefix_end(g, start)
    for idx in range(g.producer_index(start), end, -1):
        node = g.nodes[idx]
        if any(o in acc for o in node.outs):
            bias = _linear_step(g, consts, node, acc, bias, R)
    return acc, bias, end


def _linear_step(g: Graph, consts, node, acc, bias, R):
    lams = [acc.pop(o, None) for o in node.outs]
    dtype = next(t for t in lams if t is not None).dtype
    lams = [jnp.zeros((R,) + g.shape(o), dtype) if t is None else t for t, o in zip(lams, node.outs)]
    for t, o in zip(lams, node.extra.get("offset", [])):
        if o is not None:
            bias = bias + t.reshape(R, -1) @ jnp.broadcast_to(consts[o], t.shape[1:]).reshape(-1)
    for v, ct in zip(node.bounded(), _transpose(g, node, consts, lams)):
        acc[v] = ct if v not in acc else acc[v] + ct
    return bias


class Backward(NamedTuple):
    """A backward pass over ``R`` rows: lower bounds ``bound (R,)``; ``mag (R,)`` the summed magnitude of the
    terms added into them (for the round-off margin); ``lam_x (R, *in)`` the input coefficients (None if the
    rows do not depend on the input); ``record`` ``{node index: (R, *out)}`` the coefficients reaching
    the output of every nonlinear node (only with ``record=True``)."""
    bound: jax.Array
    mag: jax.Array
    lam_x: jax.Array | None
    record: dict


def _backward(g: Graph, consts, ivs, state, theta=None):
    """Lower bounds ``(R,)`` of ``lam[r] . start`` over the input box (see `_backward_pass`)."""
    return _backward_pass(g, consts, ivs, state, theta).bound


def _backward_pass(g: Graph, consts, ivs, state, theta=None, extra=None, record=False) -> Backward:
    """Back-substitution resuming from ``state = _linear_prefix(g, consts, start, lam)`` (``lam: (R,
    *shape(start))``) to the input box ``ivs[g.input]``, relaxing nonlinear nodes on the bounds ``ivs``.

    ``theta``: optional ``{node index: slopes}``: ``(R, *shape)`` kink slopes of ReLU-like nodes, ``(t_l, t_u)``
    each ``(R, *shape)`` slope fractions of sigmoid / tanh nodes (`_relax.sshape`). ``extra``: optional
    ``{var: (coef (R, *shape), bias (R,))}`` linear terms added to the bounded function (Lagrangian terms
    of constraints that hold on the box, as branch and bound adds for its splits); each var must be
    the input of a nonlinear node or the input itself. Returns a `Backward`.
    """
    acc, bias, last = state
    acc = dict(acc)
    R = bias.shape[0]
    mag = jnp.abs(bias)
    rec = {}

    def add(v, t):
        acc[v] = t if v not in acc else acc[v] + t

    for v, (coef, b) in (extra or {}).items():
        add(v, coef)
        bias, mag = bias + b, mag + jnp.abs(b)
    for idx in range(last, -1, -1):
        node = g.nodes[idx]
        if not any(o in acc for o in node.outs):
            continue
        before = bias
        kind, ins = node.kind, node.bounded()
        if kind == "linear":
            bias = _linear_step(g, consts, node, acc, bias, R)
            mag = mag + jnp.abs(bias - before)
            continue
        lams = [acc.pop(o, None) for o in node.outs]
        t = lams[0] if len(lams) == 1 else None
        pos, neg = (jnp.maximum(t, 0), jnp.minimum(t, 0)) if t is not None else (None, None)
        if t is None:
            kind = "concretize"
        elif record:
            rec[idx] = t
        if kind in ("pwl", "sshape"):
            iv = ivs[ins[0]]
            if kind == "pwl":
                th = None if theta is None else theta.get(idx)
                a_l, b_l, a_u, b_u = _relax.pwl(*_pwl_consts(node, consts), iv.lo, iv.hi, th)
            else:
                th = None if theta is None else theta.get(idx)
                a_l, b_l, a_u, b_u = _relax.sshape(node.extra["fn"], iv.lo, iv.hi, th)
            add(ins[0], pos * a_l + neg * a_u)
            bias = bias + _sum_rows(pos * b_l + neg * b_u)
        elif kind == "max2":
            s = node.extra["sign"]
            (x, y), ps, ng = ins, jnp.maximum(s * t, 0), jnp.minimum(s * t, 0)
            bx, by = ivs[x], ivs[y]
            if s > 0:
                coefs = _relax.max2(bx.lo, bx.hi, by.lo, by.hi)
            else:
                coefs = _relax.max2(-bx.hi, -bx.lo, -by.hi, -by.lo)
            px_l, py_l, px_u, py_u, c_u = coefs
            add(x, s * (ps * px_l + ng * px_u))
            add(y, s * (ps * py_l + ng * py_u))
            bias = bias + _sum_rows(ng * c_u)
        elif kind == "maxpool":
            x = ins[0]
            idx_w = node.extra["idx"]
            n_in = math.prod(g.shape(x))
            sel_l, sel_u, c_u = _window_relaxation(node, ivs[x])
            lam_w = pos.reshape(R, -1, 1) * sel_l + neg.reshape(R, -1, 1) * sel_u
            bias = bias + (neg.reshape(R, -1) @ c_u)
            lam_x = jnp.zeros((R, n_in + 1), bias.dtype).at[:, idx_w].add(lam_w)
            add(x, lam_x[:, :n_in].reshape((R,) + g.shape(x)))
        else:
            for t, o in zip(lams, node.outs):
                if t is not None:
                    bias = bias + _sum_rows(jnp.maximum(t, 0) * ivs[o].lo + jnp.minimum(t, 0) * ivs[o].hi)
        mag = mag + jnp.abs(bias - before)
    lam_x = acc.get(g.input)
    if lam_x is None:
        return Backward(bias, mag, None, rec)
    x = ivs[g.input]
    flat = lam_x.reshape(R, -1)
    mid, rad = x.mid.reshape(-1), x.rad.reshape(-1)
    lin = flat @ mid - jnp.abs(flat) @ rad
    return Backward(bias + lin, mag + jnp.abs(flat) @ (jnp.abs(mid) + rad), lam_x, rec)


def _window_relaxation(node: Node, iv):
    """`_relax.window_max` of a max-pool node on its input bounds ``iv``: ``(sel_l, sel_u, c_u)`` per window."""
    pad = jnp.full((1,), -jnp.inf, iv.lo.dtype)
    idx_w = node.extra["idx"]
    lw = jnp.concatenate([iv.lo.reshape(-1), pad])[idx_w]
    uw = jnp.concatenate([iv.hi.reshape(-1), pad])[idx_w]
    return _relax.window_max(lw, uw)


def _transpose(g: Graph, node: Node, consts, lams):
    """Coefficients on the bounded operands of a linear node, ``lams``: one ``(R, *out)`` per output."""
    ins = node.bounded()
    dtype = lams[0].dtype
    if node.prim.name == "conv_general_dilated" and node.ins[0][0] == "b" and _conv.supported(node.params):
        return [_conv.transpose(lams[0], consts[node.ins[1][1]], node.params, g.shape(ins[0]))]
    f = lambda *xs: tuple(_bind(node, consts, xs))
    ft = jax.linear_transpose(f, *[jax.ShapeDtypeStruct(g.shape(v), dtype) for v in ins])
    return jax.vmap(lambda *ts: ft(tuple(ts)))(*lams)


def _crown_one(g: Graph, consts, lo, hi, spec, prefixes, steps, lr):
    """Bounds ``(K,), (K,)`` of ``spec @ out`` for one example ``lo, hi: (1, *in)``, ``spec: (K, C)``."""
    ivs, rel = _forward(g, consts, lo, hi, prefixes)
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


def initial_slopes(g: Graph, consts, ivs, R, before: int | None = None) -> dict:
    """The default relaxation slopes as optimisable parameters for ``R`` rows: ``{node index: theta}`` for the
    ReLU-like (CROWN's adaptive choice) and sigmoid / tanh nodes (`_relax.sshape_theta`) before node index
    ``before`` (all: None), on the bounds ``ivs``."""
    theta = {}
    for idx, node in enumerate(g.nodes[:before]):
        if node.kind not in ("pwl", "sshape"):
            continue
        iv = ivs[node.bounded()[0]]
        if node.kind == "pwl":
            k = consts[node.extra["k"]]
            t0 = (iv.hi - k >= k - iv.lo).astype(iv.lo.dtype)
            theta[idx] = jnp.broadcast_to(t0, (R,) + t0.shape)
        else:
            theta[idx] = tuple(jnp.broadcast_to(t, (R,) + t.shape)
                               for t in _relax.sshape_theta(node.extra["fn"], iv.lo, iv.hi))
    return theta
