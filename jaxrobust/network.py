"""The `Network` value: a pure classifier function plus its parameters and input specification.

Every method of jaxrobust takes a `Network`. It is a pytree whose only leaves are the parameters,
so it passes through `jit`, `vmap` and `grad` like any array container.

Conventions
-----------
* ``net.apply(params, x)`` maps a batch ``x: (B, *input_shape)`` of inputs in the network's
  *domain* (e.g. pixels in [0, 1]) to logits ``(B, num_classes)``. Any preprocessing
  (normalisation) happens inside ``apply``.
* ``net(x)`` is ``net.apply(net.params, x)``.
* ``domain`` is the box ``(lo, hi)`` every valid input lies in; perturbations are clipped to it.
* `with_preprocessing` puts a per-channel normalisation ``(x - mean) / std`` in front of ``apply``:
  inputs, radii and bounds stay in the domain's (pixel) space.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from .errors import InputError

ApplyFn = Callable[[Any, jax.Array], jax.Array]


@jax.tree_util.register_pytree_node_class
@dataclasses.dataclass(frozen=True, eq=False)
class Network:
    """A classifier ``apply(params, x) -> logits`` with its parameters and input specification.

    Attributes:
      apply: pure function ``(params, x: (B, *input_shape)) -> (B, num_classes)``.
      params: pytree of arrays.
      input_shape: shape of one input, without the batch dimension.
      num_classes: number of logits.
      domain: ``(lo, hi)`` bounds of valid inputs (scalars).
      name: human-readable name.
      arch: JSON-serialisable description of the architecture; together with the parameters it
        determines the content hash. For imported files it holds the file's own digest.
    """

    apply: ApplyFn
    params: Any
    input_shape: tuple[int, ...]
    num_classes: int
    domain: tuple[float, float] = (0.0, 1.0)
    name: str = "network"
    arch: Any = None

    # --- pytree protocol: params are the only children ---------------------------------
    def tree_flatten(self):
        aux = (self.apply, self.input_shape, self.num_classes, self.domain, self.name,
               _freeze(self.arch))
        return (self.params,), aux

    @classmethod
    def tree_unflatten(cls, aux, children):
        apply, input_shape, num_classes, domain, name, arch = aux
        return cls(apply, children[0], input_shape, num_classes, domain, name, _thaw(arch))

    # --- convenience -------------------------------------------------------------------
    def __call__(self, x: jax.Array) -> jax.Array:
        """Logits of a batch ``x: (B, *input_shape) -> (B, num_classes)``."""
        return self.apply(self.params, x)

    def single(self, x: jax.Array) -> jax.Array:
        """Logits of one input ``x: input_shape -> (num_classes,)``."""
        return self.apply(self.params, x[None])[0]

    def replace(self, **changes) -> Network:
        return dataclasses.replace(self, **changes)

    @property
    def num_params(self) -> int:
        return int(sum(np.size(leaf) for leaf in jax.tree_util.tree_leaves(self.params)))

    @property
    def hash(self) -> str:
        """Content hash (16 hex digits) of architecture + parameters; identifies the network in results."""
        return content_hash(self.arch, self.params)

    def check_inputs(self, x, what: str = "inputs") -> np.ndarray:
        """Validate a batch against the input specification; return it as float32 numpy.

        Raises `InputError` naming the problem (shape, dtype, NaN/inf, outside the domain).
        """
        return check_batch(x, self.input_shape, self.domain, what)

    def check_labels(self, y, n: int, what: str = "labels") -> np.ndarray:
        """Validate integer labels ``y: (n,)`` in ``[0, num_classes)``; return them as numpy."""
        y = np.asarray(y)
        if y.shape != (n,) or y.dtype.kind not in "iu" or (n and (y.min() < 0 or y.max() >= self.num_classes)):
            raise InputError(f"{what} must be integers in [0, {self.num_classes}) of shape ({n},); "
                             f"got {y.dtype} {y.shape}" + (f" in [{y.min()}, {y.max()}]" if y.size else ""))
        return y


def content_hash(arch: Any, params: Any) -> str:
    """SHA-256 over a canonical JSON of ``arch`` and the raw bytes of every parameter leaf."""
    h = hashlib.sha256()
    h.update(json.dumps(arch, sort_keys=True, default=str).encode())
    leaves, treedef = jax.tree_util.tree_flatten(params)
    h.update(str(treedef).encode())
    for leaf in leaves:
        a = np.ascontiguousarray(np.asarray(leaf))
        h.update(str(a.dtype).encode() + str(a.shape).encode())
        h.update(a.tobytes())
    return h.hexdigest()[:16]


def check_batch(x, input_shape, domain, what: str = "inputs") -> np.ndarray:
    """Validate ``x: (B, *input_shape)`` (dtype, shape, finiteness, domain); return float32 numpy."""
    a = np.asarray(x)
    if a.dtype.kind in "iub":
        raise InputError(f"{what} must be floating point in the network's domain {tuple(domain)}, got {a.dtype} "
                         "(scale integer images first, e.g. x / 255)")
    if a.dtype.kind != "f":
        raise InputError(f"{what} must be numeric, got dtype {a.dtype}")
    if a.ndim != len(input_shape) + 1 or tuple(a.shape[1:]) != tuple(input_shape):
        raise InputError(f"{what} must have shape (B, {', '.join(map(str, input_shape))}), "
                         f"got {tuple(a.shape)}")
    a = a.astype(np.float32, copy=False)
    bad = ~np.isfinite(a)
    if bad.any():
        idx = np.argwhere(bad.reshape(len(a), -1).any(axis=1)).ravel()[:5].tolist()
        raise InputError(f"{what} contain NaN or inf (first offending rows: {idx})")
    lo, hi = domain
    tol = 1e-6
    if a.size and (a.min() < lo - tol or a.max() > hi + tol):
        raise InputError(f"{what} lie outside the network's domain [{lo}, {hi}] "
                         f"(min {a.min():.4g}, max {a.max():.4g})")
    return a


def from_function(fn: Callable[[Any, jax.Array], jax.Array], params: Any, input_shape, num_classes: int,
                  *, domain=(0.0, 1.0), name: str = "function", arch: Any = None) -> Network:
    """Wrap a pure JAX function ``fn(params, x: (B, *input_shape)) -> (B, C)``."""
    return Network(fn, params, tuple(int(d) for d in input_shape), int(num_classes),
                   (float(domain[0]), float(domain[1])), name,
                   arch if arch is not None else {"function": getattr(fn, "__qualname__", str(fn))})


def from_flax(module, params: Any, input_shape, num_classes: int | None = None, *,
              domain=(0.0, 1.0), name: str | None = None, arch: Any = None) -> Network:
    """Wrap a Flax linen module (``params`` = the ``{'params': ...}`` variables) or an nnx module.

    For nnx modules ``params`` may be None: the module's state is split off and becomes the params.
    The number of classes is inferred with `jax.eval_shape` when not given.
    """
    input_shape = tuple(int(d) for d in input_shape)
    try:
        from flax import nnx
        is_nnx = isinstance(module, nnx.Module)
    except ImportError:  # pragma: no cover - older flax
        is_nnx = False
    if is_nnx:
        graphdef, state = nnx.split(module)

        def apply(p, x):
            return nnx.merge(graphdef, p)(x)

        params = state if params is None else params
        default_arch = {"nnx": type(module).__qualname__}
    else:
        def apply(p, x):
            return module.apply(p, x)

        default_arch = {"linen": repr(module)}
    if num_classes is None:
        out = jax.eval_shape(apply, params, jax.ShapeDtypeStruct((1,) + input_shape, jnp.float32))
        num_classes = int(out.shape[-1])
    return Network(apply, params, input_shape, int(num_classes), (float(domain[0]), float(domain[1])),
                   name or type(module).__name__, arch if arch is not None else default_arch)


@dataclasses.dataclass(frozen=True)
class _Normalized:
    """``apply(params, (x - mean) / std)``; ``mean``, ``std`` are tuples broadcast along ``axis`` of one
    example (None: scalars). Hashable and equal for equal parts, so jitted callers share compilations."""
    apply: Any
    mean: tuple
    std: tuple
    axis: int | None
    ndim: int

    def __call__(self, params, x):
        shape = [1] * (self.ndim + 1)
        if self.axis is not None:
            shape[self.axis + 1] = -1
        mean = jnp.asarray(self.mean, jnp.float32).reshape(shape)
        inv_std = (1.0 / jnp.asarray(self.std, jnp.float32)).reshape(shape)
        return self.apply(params, (jnp.asarray(x, jnp.float32) - mean) * inv_std)


def with_preprocessing(net: Network, *, mean=None, std=None, domain=None) -> Network:
    """``net`` fed with ``(x - mean) / std`` of raw inputs ``x`` in ``domain`` (default: ``net.domain``).

    ``mean`` and ``std`` are scalars or one value per channel: the channel axis of one example is the
    first axis of ``input_shape`` with that many entries (``(3, 32, 32)``), else the last (``(32, 32, 3)``).
    The normalisation becomes part of the network function (and of its content hash), so attacks, bounds
    and radii all work on raw inputs. Raises `InputError` for values that do not fit the input shape,
    non-positive ``std`` or an empty domain.
    """
    domain = net.domain if domain is None else check_domain(domain)
    if mean is None and std is None:
        return net.replace(domain=domain)
    m = _channel_values(0.0 if mean is None else mean, "mean")
    s = _channel_values(1.0 if std is None else std, "std")
    if min(s) <= 0:
        raise InputError(f"std must be positive, got {list(s)}")
    k = max(len(m), len(s))
    if len(m) not in (1, k) or len(s) not in (1, k):
        raise InputError(f"mean has {len(m)} values and std {len(s)}; give one value or one per channel")
    axis = None
    if k > 1:
        shape = net.input_shape
        axis = 0 if shape and shape[0] == k else len(shape) - 1 if shape and shape[-1] == k else None
        if axis is None:
            raise InputError(f"{k} channel values (mean/std) do not fit the input shape {shape}: neither its first "
                             f"nor its last axis has {k} entries")
        m, s = m * (k // len(m)), s * (k // len(s))
    apply = _Normalized(net.apply, m, s, axis, len(net.input_shape))
    arch = {"network": net.arch, "mean": list(m), "std": list(s), "domain": list(domain)}
    return net.replace(apply=apply, domain=domain, arch=arch)


def preprocessing_of(net: Network) -> dict | None:
    """``{"mean": [...], "std": [...]}`` of a network made by `with_preprocessing`, else None."""
    return {"mean": list(net.apply.mean), "std": list(net.apply.std)} if isinstance(net.apply, _Normalized) else None


def _channel_values(v, what: str) -> tuple:
    a = np.asarray(v, dtype=np.float64).reshape(-1)
    if a.size == 0 or not np.all(np.isfinite(a)):
        raise InputError(f"{what} must be finite numbers, got {v!r}")
    return tuple(float(x) for x in a)


def check_domain(domain) -> tuple[float, float]:
    """``(lo, hi)`` as floats with ``lo < hi``, both finite; `InputError` otherwise."""
    try:
        lo, hi = (float(v) for v in domain)
    except (TypeError, ValueError):
        raise InputError(f"the domain must be two numbers LO,HI, got {domain!r}") from None
    if not (np.isfinite(lo) and np.isfinite(hi) and lo < hi):
        raise InputError(f"the domain must be finite with LO < HI, got [{lo}, {hi}]")
    return lo, hi


def _freeze(obj):
    """Make a JSON-like object hashable (pytree aux data must be hashable)."""
    if isinstance(obj, dict):
        return ("__dict__", tuple(sorted((k, _freeze(v)) for k, v in obj.items())))
    if isinstance(obj, (list, tuple)):
        return ("__list__", tuple(_freeze(v) for v in obj))
    return obj


def _thaw(obj):
    if isinstance(obj, tuple) and len(obj) == 2 and obj[0] == "__dict__":
        return {k: _thaw(v) for k, v in obj[1]}
    if isinstance(obj, tuple) and len(obj) == 2 and obj[0] == "__list__":
        return [_thaw(v) for v in obj[1]]
    return obj
