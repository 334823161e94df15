"""Perturbation sampling around a batch of inputs, chunked over samples.

Samplers (one input ``x: shape``, one key, one radius ``eps``; ``domain = (lo, hi)`` or None):

* ``"linf"``     uniform on the box ``[x - eps, x + eps] ∩ [lo, hi]`` (the L∞ ball clipped to the domain);
* ``"l2"``       uniform in the L2 ball: Gaussian direction normalised, radius ``eps * U^(1/d)``,
                 then clipped to the domain (clipping only moves coordinates toward ``x``, so the
                 norm stays ``<= eps``);
* ``"l1"``       uniform in the L1 ball (`norms.l1_ball` of ``n + 1`` normals), then clipped to the domain;
* ``"gaussian"`` ``x + eps * N(0, I)`` clipped to the domain (``eps`` is the standard deviation).

Randomness scheme
-----------------
Sample ``i`` of input ``b`` is drawn from the per-sample key ``fold_in(fold_in(key, offset + b), i)``,
where ``offset + b`` is the input's global index and ``i`` the global sample index. A sample depends
only on (key, global input index, sample index): drawing ``n`` samples at once, in chunks of any
size, for a sub-batch (with ``offset``) or sharded over devices gives bit-identical samples.

Within a sample, the built-in samplers turn the per-sample key into one value per coordinate with
``rng``:

* ``"hash"`` (default of ``"linf"``): a counter-based integer hash, two keyed multiply–xorshift
  rounds of the coordinate index (``bits = mix(mix(φ·j + k0) ^ k1)`` with the key words ``k0, k1``);
  the top 23 bits are the mantissa of a float in ``[1, 2)``, minus 1: uniform on ``[0, 1)`` in steps
  of 2^-23 (normals by the inverse error function). About 12 integer operations per coordinate,
  ~7x cheaper than threefry, which costs more than the forward pass of a small MLP.
* ``"threefry"`` (default of ``"l2"`` and ``"gaussian"``): ``jax.random.uniform`` /
  ``jax.random.normal`` with the per-sample key.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.tree_util import Partial

from ..errors import InputError
from ..network import Network
from .norms import l1_ball

Sampler = Callable[[jax.Array, jax.Array, jax.Array, Any], jax.Array]
REDUCTIONS = ("sum", "mean", "min", "max", "any", "all")


# --- validation ---------------------------------------------------------------------------------
def is_concrete(a) -> bool:
    """True when ``a`` holds values (not a tracer inside `jit`/`vmap`)."""
    return not isinstance(a, jax.core.Tracer)


def check_x(x, what: str = "inputs", *, values: bool = True) -> jax.Array:
    """Validate a batch ``x: (B, *shape)`` (numeric, at least 1-d, finite); return it as float32.
    ``values=False`` leaves the finiteness check to a later `check_values`."""
    if not hasattr(x, "dtype"):
        x = jnp.asarray(x)
    if not (jnp.issubdtype(x.dtype, jnp.floating) or jnp.issubdtype(x.dtype, jnp.integer)):
        raise InputError(f"{what} must be numeric, got dtype {x.dtype}")
    if x.ndim < 1 or x.shape[0] == 0:
        raise InputError(f"{what} must have a non-empty leading batch dimension, got shape {x.shape}")
    x = jnp.asarray(x, jnp.float32)
    if values:
        check_values(x, what=what)
    return x


def check_eps(eps, batch: int, what: str = "eps") -> jax.Array:
    """Validate a radius: scalar or ``(B,)``, finite, ``>= 0``; return it broadcast to ``(B,)`` float32."""
    e = _f32(eps)
    if e.ndim != 0 and e.shape != (batch,):
        raise InputError(f"{what} must be a scalar or have shape ({batch},), got {e.shape}")
    check_values(eps=e, eps_what=what)
    if isinstance(e, np.ndarray):
        return jnp.asarray(np.broadcast_to(e, (batch,)))
    return jnp.broadcast_to(e, (batch,))


def check_values(x=None, *, eps=None, domain=None, y=None, num_classes: int | None = None,
                 what: str = "inputs", eps_what: str = "eps") -> None:
    """The value checks of a call at once: ``x`` finite (and inside ``domain``, up to 1e-6), ``eps``
    finite and ``>= 0``, labels ``y`` in ``[0, num_classes)``. On the host for numpy arguments, else in
    one compiled reduction and one device round trip; tracers (inside `jit`) are not checked.
    Raises `InputError` for the first failure."""
    x, eps, y = (a if a is not None and is_concrete(a) else None for a in (x, eps, y))
    args = (x, eps, domain if x is not None else None, y)
    if any(isinstance(a, jax.Array) for a in jax.tree_util.tree_leaves(args)):
        flags = jax.device_get(_device_flags(*args, num_classes=num_classes))
    else:
        flags = _value_flags(np, *args, num_classes=num_classes)
    errors = [lambda: f"{what} contain NaN or inf",
              lambda: f"{eps_what} must be finite, got NaN or inf",
              lambda: f"{eps_what} must be >= 0, got min {float(np.min(eps)):.4g}",
              lambda: f"{what} lie outside the domain",
              lambda: f"labels must lie in [0, {num_classes}), got range [{int(np.min(y))}, {int(np.max(y))}]"]
    for ok, message in zip(flags, errors):
        if not ok:
            raise InputError(message())


def _value_flags(xp, x, eps, domain, y, num_classes):
    """``(5,)`` booleans of `check_values` (True where the argument is None); ``xp``: numpy or jax.numpy."""
    true = xp.asarray(True)
    return xp.stack([
        true if x is None else xp.all(xp.isfinite(x)),
        true if eps is None else xp.all(xp.isfinite(eps)),
        true if eps is None else xp.all(eps >= 0),
        true if domain is None else xp.all((x >= domain[0] - 1e-6) & (x <= domain[1] + 1e-6)),
        true if y is None else xp.all((y >= 0) & (y < num_classes)),
    ])


_device_flags = jax.jit(partial(_value_flags, jnp), static_argnames=("num_classes",))


def _f32(a):
    """``a`` as float32: a JAX array if it is one, else a numpy array (no device work)."""
    return jnp.asarray(a, jnp.float32) if isinstance(a, jax.Array) else np.asarray(a, np.float32)


def check_domain(domain) -> tuple[jax.Array, jax.Array] | None:
    """``None`` or ``(lo, hi)`` (scalars or arrays broadcastable to one input) as float32 arrays (numpy
    unless given as JAX arrays)."""
    if domain is None:
        return None
    try:
        lo, hi = domain
    except (TypeError, ValueError):
        raise InputError(f"domain must be None or a pair (lo, hi), got {domain!r}") from None
    lo, hi = _f32(lo), _f32(hi)
    if is_concrete(lo) and is_concrete(hi) and bool(np.any(jax.device_get(lo > hi))):
        raise InputError("domain must satisfy lo <= hi")
    return lo, hi


# --- per-coordinate random numbers ---------------------------------------------------------------
RNGS = ("hash", "threefry")
_GOLDEN, _M1, _M2 = 0x9E3779B9, 0x7FEB352D, 0x846CA68B


def _mix(h):
    """Multiply–xorshift bijection of uint32."""
    h = (h ^ (h >> 16)) * jnp.uint32(_M1)
    h = (h ^ (h >> 15)) * jnp.uint32(_M2)
    return h ^ (h >> 16)


def hash_bits(key, size: int) -> jax.Array:
    """``(size,)`` uint32: keyed hash of the coordinate indices ``0 .. size-1`` (one key)."""
    w = jax.random.key_data(key).astype(jnp.uint32).ravel()
    k1 = w[1] if w.shape[0] > 1 else jnp.uint32(0)
    j = lax.iota(jnp.uint32, size)
    return _mix(_mix(j * jnp.uint32(_GOLDEN) + w[0]) ^ k1)


def random_uniform(key, shape, dtype=jnp.float32, rng: str = "hash") -> jax.Array:
    """Uniform ``[0, 1)`` of ``shape`` from one key (steps of 2^-23 for ``"hash"``)."""
    if rng == "threefry":
        return jax.random.uniform(key, shape, dtype)
    h = hash_bits(key, math.prod(shape)).reshape(shape)
    one = lax.bitcast_convert_type((h >> 9) | jnp.uint32(0x3F800000), jnp.float32)  # [1, 2), 23 bits
    return (one - 1.0).astype(dtype)


def random_normal(key, shape, dtype=jnp.float32, rng: str = "hash") -> jax.Array:
    """Standard normal of ``shape`` from one key (``"hash"``: ``√2·erfinv(v)``, ``v`` on the odd
    multiples of 2^-23 in (-1, 1), so |z| <= 5.3)."""
    if rng == "threefry":
        return jax.random.normal(key, shape, dtype)
    h = hash_bits(key, math.prod(shape)).reshape(shape)
    v = ((h >> 9).astype(jnp.int32) * 2 + (1 - (1 << 23))).astype(dtype) * jnp.asarray(2.0 ** -23, dtype)
    return jnp.asarray(math.sqrt(2.0), dtype) * lax.erf_inv(v)


# --- samplers: one input, one key ---------------------------------------------------------------
def _clip(v, domain):
    return v if domain is None else jnp.clip(v, domain[0], domain[1])


def uniform_linf(key, x, eps, domain=None, rng: str = "hash"):
    """Uniform sample of the box ``[x - eps, x + eps] ∩ domain``. ``x: shape -> shape``."""
    lo, hi = x - eps, x + eps
    if domain is not None:
        lo, hi = jnp.maximum(lo, domain[0]), jnp.minimum(hi, domain[1])
    u = random_uniform(key, x.shape, x.dtype, rng)
    # = clip(lo + u·(hi - lo), lo, hi) bit for bit: lo + u·w >= lo for w >= 0, rounding may overshoot hi,
    # and an empty box (x outside the domain, hi < lo) gives hi
    return jnp.minimum(lo + u * jnp.maximum(hi - lo, 0), hi)


def uniform_l2(key, x, eps, domain=None, rng: str = "threefry"):
    """Uniform sample of the L2 ball of radius ``eps`` around ``x``, clipped to the domain."""
    kd, kr = jax.random.split(key)
    g = random_normal(kd, x.shape, x.dtype, rng)
    g = g / jnp.maximum(jnp.linalg.norm(g.ravel()), jnp.finfo(x.dtype).tiny)
    r = eps * random_uniform(kr, (), x.dtype, rng) ** (1.0 / x.size)
    return _clip(x + r * g, domain)


def uniform_l1(key, x, eps, domain=None, rng: str = "threefry"):
    """Uniform sample of the L1 ball of radius ``eps`` around ``x``, clipped to the domain."""
    z = random_normal(key, (1, x.size + 1), x.dtype, rng)
    return _clip(x + eps * l1_ball(z).reshape(x.shape), domain)


def gaussian(key, x, sigma, domain=None, rng: str = "threefry"):
    """``x + sigma * N(0, I)`` clipped to the domain."""
    return _clip(x + sigma * random_normal(key, x.shape, x.dtype, rng), domain)


SAMPLERS: dict[str, Sampler] = {"linf": uniform_linf, "l2": uniform_l2, "l1": uniform_l1, "gaussian": gaussian}
ELEMENTWISE = ("linf", "gaussian")  # coordinate j of a sample depends on coordinate j of the input only
_BOUND = {(name, rng): partial(f, rng=rng) for name, f in SAMPLERS.items() for rng in RNGS}
_BOUND.update({(name, None): f for name, f in SAMPLERS.items()})


def _sampler_fn(sampler, rng: str | None = None) -> Sampler:
    """A sampler ``(key, x, eps, domain) -> sample``; ``rng`` applies to the built-in ones (None: the
    sampler's default)."""
    if rng is not None and rng not in RNGS:
        raise InputError(f"unknown rng {rng!r}; choose one of {RNGS}")
    if callable(sampler):
        return sampler
    if sampler not in SAMPLERS:
        raise InputError(f"unknown sampler {sampler!r}; choose one of {sorted(SAMPLERS)} or pass a function")
    return _BOUND[sampler, rng]


def draw(sampler: Sampler, key, x, eps, batch_idx, sample_idx, domain=None) -> jax.Array:
    """Samples ``(B, c, *shape)`` for inputs ``x: (B, *shape)``, radii ``eps: (B,)``, global input
    indices ``batch_idx: (B,)`` and global sample indices ``sample_idx: (c,)`` (no validation)."""
    def per_input(kb, xb, eb):
        return jax.vmap(lambda i: sampler(jax.random.fold_in(kb, i), xb, eb, domain))(sample_idx)

    kbs = jax.vmap(lambda b: jax.random.fold_in(key, b))(batch_idx)
    return jax.vmap(per_input)(kbs, x, eps)


# --- public drivers -------------------------------------------------------------------------------
def sample(key, x, eps, n: int, *, sampler="linf", domain=None, offset=0, start=0, rng=None) -> jax.Array:
    """Draw samples ``n`` around every input: ``x: (B, *shape)``, ``eps`` scalar or ``(B,)`` ->
    ``(B, n, *shape)``. Samples ``start .. start + n - 1`` of inputs ``offset .. offset + B - 1``;
    ``rng``: ``"hash"``, ``"threefry"`` or None for the sampler's default (see the module docstring)."""
    x = check_x(x)
    eps = check_eps(eps, x.shape[0])
    if int(n) < 0:
        raise InputError(f"n must be >= 0, got {n}")
    return _sample(_sampler_fn(sampler, rng), key, x, eps, check_domain(domain), offset, start, int(n))


@partial(jax.jit, static_argnames=("sampler", "n"))
def _sample(sampler, key, x, eps, domain, offset, start, n):
    b_idx = offset + jnp.arange(x.shape[0])
    return draw(sampler, key, x, eps, b_idx, start + jnp.arange(n), domain)


def map_samples(fn, key, x, eps, n: int, chunk: int, *, sampler="linf", reduce: str | None = None,
                domain=None, offset=0, rng=None):
    """Apply ``fn`` to ``n`` samples around every input, ``chunk`` samples at a time.

    Each chunk runs as two compiled stages dispatched asynchronously from a host loop: drawing the
    samples ``(B, chunk, *shape)`` into a buffer, then evaluating ``fn`` on that buffer and writing (or
    folding) its outputs into a donated result buffer. Kept apart, the sampler's elementwise work is
    not fused into the operand of ``fn``'s first matrix product, which then runs at full speed on the
    materialized buffer. Two sample buffers alternate (step ``i`` overwrites the donated samples of
    step ``i - 2``) and the host stays within two steps of the device, so no memory is allocated per
    step, at most two chunks of samples exist at a time, and ``n`` may be 10^6 per input. Call it
    outside `jit` (under a trace the loop is unrolled).

    Args:
      fn: ``samples (B, c, *shape) -> pytree of arrays with leading dims (B, c)``; or a `Network`,
        which yields logits ``(B, c, num_classes)`` and supplies the default domain. Data that changes
        between calls (labels, parameters) is best bound with `jax.tree_util.Partial`, so the
        compiled stages are reused.
      key: PRNG key; see the module docstring for how samples derive from it.
      x: inputs ``(B, *shape)``.  eps: radius (or σ for ``"gaussian"``), scalar or ``(B,)``.
      n: samples per input.  chunk: samples per input per step (any value gives the same samples).
      sampler: ``"linf"``, ``"l2"``, ``"gaussian"`` or a function ``(key, x, eps, domain) -> sample``.
      reduce: None returns every per-sample output ``(B, n, ...)``; ``"sum"``, ``"mean"``, ``"min"``,
        ``"max"``, ``"any"``, ``"all"`` reduce over the samples and return ``(B, ...)``.
      domain: ``(lo, hi)`` to clip samples to; defaults to ``fn.domain`` for a Network, else None.
      offset: global index of ``x[0]`` (to reproduce the samples of a larger batch), or an int array
        ``(B,)`` of the global indices of all inputs (any order, gaps allowed).
      rng: per-coordinate generator of the built-in samplers, ``"hash"`` or ``"threefry"``; None
        takes the sampler's default (``"hash"`` for ``"linf"``, ``"threefry"`` for the others).
    """
    x = check_x(x)
    eps = check_eps(eps, x.shape[0])
    n, chunk = int(n), int(chunk)
    if n < 1 or chunk < 1:
        raise InputError(f"n and chunk must be >= 1, got n={n}, chunk={chunk}")
    if reduce is not None and reduce not in REDUCTIONS:
        raise InputError(f"unknown reduce {reduce!r}; choose None or one of {REDUCTIONS}")
    if isinstance(fn, Network):
        if tuple(x.shape[1:]) != tuple(fn.input_shape):
            raise InputError(f"inputs must have shape (B, {fn.input_shape}), got {tuple(x.shape)}")
        if domain is None:
            domain = fn.domain
    else:
        fn = fn if isinstance(fn, Partial) else Partial(fn)
    shape, domain, chunk = tuple(x.shape[1:]), check_domain(domain), min(chunk, n)
    flat = isinstance(sampler, str) and sampler in ELEMENTWISE
    if flat:
        # these give the same values on an input's flat vector of coordinates, on which the generated
        # loop runs over all of them at once instead of over the last axis; fn sees them reshaped
        x = x.reshape(x.shape[0], -1)
        if domain is not None:
            domain = tuple(b if b.ndim == 0 else jnp.broadcast_to(b, shape).reshape(-1) for b in domain)
    sampler = _sampler_fn(sampler, rng)
    b_idx = offset + jnp.arange(x.shape[0]) if jnp.ndim(offset) == 0 else jnp.asarray(offset)
    one = jax.eval_shape(sampler, key, jax.ShapeDtypeStruct(x.shape[1:], x.dtype), jax.ShapeDtypeStruct((), eps.dtype),
                         domain)
    samples = jax.ShapeDtypeStruct((x.shape[0], chunk) + one.shape, one.dtype)
    shape = shape if flat else one.shape
    state = _init_state(fn, samples, shape, n, reduce)
    buffers = [jnp.zeros(samples.shape, samples.dtype) for _ in range(2)]
    for i, start in enumerate(range(0, n, chunk)):
        # step i's samples overwrite step i - 2's, already evaluated: no allocation per step
        s = _draw_chunk(sampler, key, x, eps, domain, b_idx, start, chunk, buffers[i % 2])
        state = _evaluate_chunk(fn, s, state, start, n, shape, reduce)
        buffers[i % 2] = s
        jax.block_until_ready(buffers[(i + 1) % 2])  # stay within two steps of the device
    if reduce is None:
        return jax.tree_util.tree_map(lambda a: a[:, :n], state)
    return jax.tree_util.tree_map(lambda a: a / n, state) if reduce == "mean" else state


def _apply(fn, s, shape):
    """``fn`` on samples ``(B, c, ...)`` seen as ``(B, c, *shape)``; a Network sees one batch ``(B·c, *shape)``."""
    if isinstance(fn, Network):
        return fn(s.reshape((-1,) + shape)).reshape(s.shape[:2] + (-1,))
    return fn(s.reshape(s.shape[:2] + shape))


def _identity(reduce, dtype):
    """Neutral element of a reduction for ``dtype``."""
    if reduce in ("sum", "mean", "any"):
        return jnp.zeros((), dtype)
    if reduce == "all" or (dtype == jnp.bool_ and reduce == "min"):
        return jnp.ones((), dtype)
    if dtype == jnp.bool_:
        return jnp.zeros((), dtype)
    if jnp.issubdtype(dtype, jnp.floating):
        return jnp.asarray(jnp.inf if reduce == "min" else -jnp.inf, dtype)
    info = jnp.iinfo(dtype)
    return jnp.asarray(info.max if reduce == "min" else info.min, dtype)


def _prep(a, reduce):
    """Per-sample output as accumulated: bool counts as int32 for sums, anything as bool for any/all."""
    if reduce in ("sum", "mean") and a.dtype == jnp.bool_:
        return a.astype(jnp.int32)
    if reduce in ("any", "all"):
        return a.astype(jnp.bool_)
    return a


_COMBINE = {"sum": jnp.add, "mean": jnp.add, "min": jnp.minimum, "max": jnp.maximum,
            "any": jnp.logical_or, "all": jnp.logical_and}
_REDUCE = {"sum": jnp.sum, "mean": jnp.sum, "min": jnp.min, "max": jnp.max, "any": jnp.any, "all": jnp.all}


def _init_state(fn, samples: jax.ShapeDtypeStruct, shape, n: int, reduce):
    """The result buffer ``(B, ceil(n / c) · c, ...)`` per output of ``fn`` on ``samples (B, c, ...)``
    seen as ``(B, c, *shape)``, or the reduction's identity ``(B, ...)``."""
    out = _outputs.eval_shape(fn, samples, shape, reduce)
    if reduce is None:
        chunk = samples.shape[1]
        return jax.tree_util.tree_map(
            lambda o: jnp.zeros((o.shape[0], -(-n // chunk) * chunk) + o.shape[2:], o.dtype), out)
    return jax.tree_util.tree_map(lambda o: jnp.full((o.shape[0],) + o.shape[2:], _identity(reduce, o.dtype)), out)


@partial(jax.jit, static_argnames=("shape", "reduce"))
def _outputs(fn, s, shape, reduce):
    """``fn``'s outputs on samples ``s`` as accumulated; `_init_state` takes their shapes (traced once)."""
    return jax.tree_util.tree_map(lambda a: _prep(a, reduce), _apply(fn, s, shape))


@partial(jax.jit, static_argnames=("sampler", "chunk"), donate_argnames=("buffer",), keep_unused=True)
def _draw_chunk(sampler, key, x, eps, domain, b_idx, start, chunk, buffer):
    """Samples ``start .. start + chunk - 1`` of every input, ``(B, chunk, *shape)``, written over the
    donated ``buffer`` of that shape."""
    return draw(sampler, key, x, eps, b_idx, start + jnp.arange(chunk), domain)


@partial(jax.jit, static_argnames=("shape", "reduce"), donate_argnames=("state",))
def _evaluate_chunk(fn, s, state, start, n, shape, reduce):
    """``fn`` on one chunk of samples seen as ``(B, c, *shape)``, written into (reduce None) or folded into
    the donated ``state``."""
    out = _apply(fn, s, shape)
    if reduce is None:
        return jax.tree_util.tree_map(lambda buf, o: lax.dynamic_update_slice_in_dim(buf, o, start, 1),
                                      state, out)
    valid = start + jnp.arange(s.shape[1]) < n

    def fold(acc, o):
        o = _prep(o, reduce)
        o = jnp.where(valid.reshape((1, -1) + (1,) * (o.ndim - 2)), o, _identity(reduce, o.dtype))
        return _COMBINE[reduce](acc, _REDUCE[reduce](o, axis=1))

    return jax.tree_util.tree_map(fold, state, out)
