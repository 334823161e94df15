"""Import ONNX classifiers as pure JAX `Network`s (onnxruntime is never needed).

`load_onnx` reads a file once and returns a `Network` whose ``apply(params, x)`` interprets the
ONNX graph with JAX/lax primitives (``dot_general``, ``conv_general_dilated``, ``reduce_window_*``,
``add``/``mul``, ``max`` ...), so the result is jit/vmap/grad friendly and its traced jaxpr is small
enough for bound propagation.

* Floating-point initializers become ``params`` (``dict name -> float32 array``); integer
  initializers and ``Constant`` nodes are static. Nodes whose inputs are all static (shape
  arithmetic: Shape/Gather/Unsqueeze/Concat/Slice/Cast ...) are evaluated with numpy at trace time
  and never appear in the jaxpr.
* Batching: the declared leading dimension (``1`` or symbolic) is the batch axis and is dropped from
  ``Network.input_shape``. The graph is evaluated on the whole batch at once with hard-coded batch
  sizes rewritten (a ``Reshape`` to ``[1, -1]`` becomes per-example). Graphs where the batch axis
  cannot be tracked through every op are instead run per example under `jax.vmap`.
* Normalisation ``(x - mean) / std`` outside the graph is folded into ``apply`` so the domain stays
  raw pixels; ``mean``/``std`` broadcast over the channel axis (axis 0 of one example).
  `KNOWN_NORMALIZATION` maps known file stems to their normalisation, applied automatically when
  neither ``mean`` nor ``std`` is given.
* Matrix products and convolutions request ``Precision.HIGHEST`` so results are float32-faithful
  on accelerators that would otherwise use reduced-precision (TF32/bf16) passes.
"""
from __future__ import annotations

import hashlib
import math
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from .errors import FileFormatError, InputError, UnsupportedOpError
from .network import Network

__all__ = ["KNOWN_NORMALIZATION", "SUPPORTED_OPS", "load_onnx", "onnx_summary"]

#: Normalisation applied outside the graph by known public networks, keyed by file stem.
#: The oval21 CIFAR-10 networks expect ``(x - mean) / std`` of [0, 1] pixels.
KNOWN_NORMALIZATION: dict[str, dict[str, tuple[float, ...]]] = {
    stem: {"mean": (0.485, 0.456, 0.406), "std": (0.225,)}
    for stem in ("cifar_base_kw", "cifar_deep_kw", "cifar_wide_kw")
}

_PRECISION = lax.Precision.HIGHEST


# ----------------------------------------------------------------------------------------------
# graph representation
# ----------------------------------------------------------------------------------------------
class _Node(NamedTuple):
    op: str
    label: str          # "node 'name'" or "unnamed node #i", for messages
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    attrs: dict[str, Any]


class _Graph(NamedTuple):
    nodes: tuple[_Node, ...]
    consts: dict[str, np.ndarray]   # static tensors (non-float initializers)
    input_names: tuple[str, ...]    # the graph inputs, in order
    input_shapes: tuple[tuple, ...]  # their shapes per example (ints)
    has_batch: bool                 # every input's leading declared dim is the batch axis
    output_name: str
    opset: int


class _NeedVmap(Exception):
    """The batch axis cannot be tracked through an op; fall back to per-example evaluation."""


class _Unsupported(Exception):
    """An op's attributes or inputs are outside what the importer handles."""


def _is_static(v) -> bool:
    return isinstance(v, np.ndarray)


def _float32_if_float(a: np.ndarray) -> np.ndarray:
    a = np.asarray(a)
    return a.astype(np.float32) if a.dtype.kind == "f" else a


# ----------------------------------------------------------------------------------------------
# op handlers: fn(node, ins, bat, opset) -> output value or tuple of values.
# ``ins`` are numpy arrays (static), jax arrays (dynamic) or None (omitted optional input);
# ``bat[i]`` says input i carries the batch on axis 0 (then its declared axis-0 size is 1).
# Handlers registered with static=True also compute all-static inputs with numpy themselves;
# the others are folded by running them eagerly on the constants.
# ----------------------------------------------------------------------------------------------
_OPS: dict[str, tuple[Callable, bool]] = {}


def _op(*names: str, static: bool = False):
    def register(fn):
        for n in names:
            _OPS[n] = (fn, static)
        return fn
    return register


def _attr(node: _Node, key: str, default=None):
    return node.attrs.get(key, default)


def _static_input(node: _Node, ins, i: int, what: str, default=None):
    """Input ``i`` as a numpy array (must be constant); ``default`` when omitted."""
    if i >= len(ins) or ins[i] is None:
        return default
    if not _is_static(ins[i]):
        raise _Unsupported(f"{what} (input {i}) must be a constant, but is computed at run time")
    return ins[i]


def _dshape(v, batched: bool) -> tuple[int, ...]:
    """Declared shape: the batch axis counts as size 1."""
    return (1,) + tuple(v.shape[1:]) if batched else tuple(v.shape)


def _check_broadcast(ins, bat):
    """Elementwise broadcasting keeps the batch on axis 0 only if unbatched operands don't reach it."""
    if not any(bat):
        return
    rank = max(v.ndim for v, b in zip(ins, bat) if b)
    for v, b in zip(ins, bat):
        if v is None:
            continue
        if b and v.ndim != rank:
            raise _NeedVmap
        if not b and (v.ndim > rank or (v.ndim == rank and v.shape[0] != 1)):
            raise _NeedVmap


def _is_neutral(c, x, value: float) -> bool:
    """``c`` is a static all-``value`` tensor whose broadcasting leaves ``x``'s shape unchanged."""
    return (_is_static(c) and not _is_static(x) and c.ndim <= x.ndim
            and all(d == 1 for d in c.shape) and bool(np.all(c == value)))


def _binary(node, ins, bat, np_fn, jnp_fn):
    a, b = ins
    if _is_static(a) and _is_static(b):
        return np_fn(a, b)
    _check_broadcast(ins, bat)
    return jnp_fn(a, b)


@_op("Add", static=True)
def _add(node, ins, bat, opset):
    a, b = ins
    if _is_neutral(b, a, 0.0):
        return a
    if _is_neutral(a, b, 0.0):
        return b
    return _binary(node, ins, bat, np.add, lambda x, y: x + y)


@_op("Sub", static=True)
def _sub(node, ins, bat, opset):
    a, b = ins
    if _is_neutral(b, a, 0.0):
        return a
    return _binary(node, ins, bat, np.subtract, lambda x, y: x - y)


@_op("Mul", static=True)
def _mul(node, ins, bat, opset):
    a, b = ins
    if _is_neutral(b, a, 1.0):
        return a
    if _is_neutral(a, b, 1.0):
        return b
    return _binary(node, ins, bat, np.multiply, lambda x, y: x * y)


def _np_div(a, b):
    if a.dtype.kind in "iu" and b.dtype.kind in "iu":
        return np.trunc(a / b).astype(np.result_type(a, b))
    return a / b


@_op("Div", static=True)
def _div(node, ins, bat, opset):
    a, b = ins
    if _is_neutral(b, a, 1.0):
        return a
    if _is_static(b) and not _is_static(a) and b.dtype.kind == "f":
        ins = [a, (np.float32(1.0) / b).astype(np.float32)]  # division by a constant -> mul
        return _binary(node, ins, bat, np.multiply, lambda x, y: x * y)
    return _binary(node, ins, bat, _np_div, lambda x, y: x / y)


@_op("Relu")
def _relu(node, ins, bat, opset):
    return jnp.maximum(ins[0], 0)


@_op("LeakyRelu")
def _leaky_relu(node, ins, bat, opset):
    x, alpha = ins[0], float(_attr(node, "alpha", 0.01))
    if 0.0 <= alpha <= 1.0:
        return jnp.maximum(x, alpha * x)
    return jnp.where(x >= 0, x, alpha * x)


@_op("Sigmoid")
def _sigmoid(node, ins, bat, opset):
    return jax.nn.sigmoid(ins[0])


@_op("Tanh")
def _tanh(node, ins, bat, opset):
    return jnp.tanh(ins[0])


@_op("Neg")
def _neg(node, ins, bat, opset):
    return -ins[0]


@_op("Exp")
def _exp(node, ins, bat, opset):
    return jnp.exp(ins[0])


@_op("Softmax", "LogSoftmax")
def _softmax(node, ins, bat, opset):
    x = ins[0]
    if opset < 13:  # coerced to 2-D at `axis`: normalise over all trailing axes
        axis = int(_attr(node, "axis", 1)) % x.ndim
        axes = tuple(range(axis, x.ndim))
    else:
        axis = int(_attr(node, "axis", -1)) % x.ndim
        axes = (axis,)
    if bat[0] and 0 in axes:
        raise _NeedVmap
    fn = jax.nn.softmax if node.op == "Softmax" else jax.nn.log_softmax
    return fn(x, axis=axes)


@_op("Clip")
def _clip(node, ins, bat, opset):
    x = ins[0]
    if opset < 11:
        lo, hi = _attr(node, "min"), _attr(node, "max")
    else:
        lo = ins[1] if len(ins) > 1 else None
        hi = ins[2] if len(ins) > 2 else None
    if any(b for b in bat[1:]):
        raise _NeedVmap
    if lo is not None:
        x = jnp.maximum(x, lo)
    if hi is not None:
        x = jnp.minimum(x, hi)
    return x


@_op("Identity", "Dropout", static=True)
def _identity(node, ins, bat, opset):
    if len(node.outputs) > 1 and node.outputs[1]:
        raise _Unsupported("the mask output is not supported")
    return ins[0]


@_op("Constant", static=True)
def _constant(node, ins, bat, opset):
    for key in ("value", "value_float", "value_floats", "value_int", "value_ints"):
        if key in node.attrs:
            v = np.asarray(node.attrs[key])
            if key in ("value_float", "value_floats"):
                v = v.astype(np.float32)
            elif key in ("value_int", "value_ints"):
                v = v.astype(np.int64)
            return _float32_if_float(v)
    raise _Unsupported(f"Constant attribute {sorted(node.attrs)} is not supported")


@_op("ConstantOfShape", static=True)
def _constant_of_shape(node, ins, bat, opset):
    shape = _static_input(node, ins, 0, "shape")
    value = _attr(node, "value", np.zeros(1, np.float32))
    return np.full(tuple(int(d) for d in shape), _float32_if_float(value).reshape(-1)[0])


@_op("MatMul")
def _matmul(node, ins, bat, opset):
    a, b = ins
    ba, bb = bat
    if ba or bb:
        ok = ((ba and not bb and a.ndim == 2)
              or (ba and a.ndim >= 3 and (b.ndim < a.ndim or (b.ndim == a.ndim and (bb or b.shape[0] == 1))))
              or (bb and not ba and b.ndim >= 3 and (a.ndim < b.ndim or a.shape[0] == 1)))
        if not ok:
            raise _NeedVmap
    return jnp.matmul(a, b, precision=_PRECISION)


@_op("Gemm")
def _gemm(node, ins, bat, opset):
    a, b = ins[0], ins[1]
    c = ins[2] if len(ins) > 2 else None
    trans_a, trans_b = int(_attr(node, "transA", 0)), int(_attr(node, "transB", 0))
    alpha, beta = float(_attr(node, "alpha", 1.0)), float(_attr(node, "beta", 1.0))
    if bat[1] or (bat[0] and trans_a):
        raise _NeedVmap
    dims = (((0 if trans_a else 1,), (1 if trans_b else 0,)), ((), ()))
    y = lax.dot_general(a, b, dims, precision=_PRECISION)
    if alpha != 1.0:
        y = y * np.float32(alpha)
    if c is None or beta == 0.0:
        return y
    if beta != 1.0:
        c = c * np.float32(beta)
    _check_broadcast([y, c], [bat[0], len(bat) > 2 and bat[2]])
    return y + c


def _reshape(x, batched: bool, target: tuple[int, ...]):
    """Reshape to a declared target shape; a batched tensor must keep the batch as axis 0."""
    target = tuple(int(d) for d in target)
    if not batched:
        return x.reshape(target)
    if target[0] != 1:
        raise _NeedVmap
    return x.reshape((x.shape[0],) + target[1:])


@_op("Reshape", static=True)
def _reshape_op(node, ins, bat, opset):
    x = ins[0]
    shape = [int(d) for d in _static_input(node, ins, 1, "target shape")] if opset >= 5 \
        else list(_attr(node, "shape"))
    dshape = _dshape(x, bat[0])
    if not _attr(node, "allowzero", 0):
        shape = [dshape[i] if d == 0 else d for i, d in enumerate(shape)]
    if -1 in shape:
        known = math.prod(d for d in shape if d != -1)
        shape[shape.index(-1)] = math.prod(dshape) // known if known else 0
    return _reshape(x, bat[0], tuple(shape))


@_op("Flatten", static=True)
def _flatten(node, ins, bat, opset):
    x = ins[0]
    dshape = _dshape(x, bat[0])
    axis = int(_attr(node, "axis", 1))
    axis = axis + len(dshape) if axis < 0 else axis
    return _reshape(x, bat[0], (math.prod(dshape[:axis]), math.prod(dshape[axis:])))


def _squeeze_axes(node, ins, opset, i: int = 1):
    axes = _attr(node, "axes") if opset < 13 else _static_input(node, ins, i, "axes")
    return None if axes is None else [int(a) for a in np.asarray(axes).reshape(-1)]


@_op("Unsqueeze", static=True)
def _unsqueeze(node, ins, bat, opset):
    x = ins[0]
    axes = _squeeze_axes(node, ins, opset)
    rank = x.ndim + len(axes)
    axes = sorted(a % rank for a in axes)
    shape = list(_dshape(x, bat[0]))
    for a in axes:
        shape.insert(a, 1)
    if bat[0] and 0 in axes:
        raise _NeedVmap
    return _reshape(x, bat[0], tuple(shape))


@_op("Squeeze", static=True)
def _squeeze(node, ins, bat, opset):
    x = ins[0]
    dshape = _dshape(x, bat[0])
    axes = _squeeze_axes(node, ins, opset)
    axes = [i for i, d in enumerate(dshape) if d == 1] if axes is None else [a % x.ndim for a in axes]
    if bat[0] and 0 in axes:
        raise _NeedVmap
    return _reshape(x, bat[0], tuple(d for i, d in enumerate(dshape) if i not in axes))


@_op("Transpose", static=True)
def _transpose(node, ins, bat, opset):
    x = ins[0]
    perm = tuple(int(p) for p in _attr(node, "perm", range(x.ndim - 1, -1, -1)))
    if bat[0] and perm[0] != 0:
        raise _NeedVmap
    return np.transpose(x, perm) if _is_static(x) else lax.transpose(x, perm)


@_op("Shape", static=True)
def _shape(node, ins, bat, opset):
    dshape = _dshape(ins[0], bat[0])
    start, end = _attr(node, "start", 0), _attr(node, "end", None)
    return np.asarray(dshape[slice(start, end)], dtype=np.int64)


@_op("Size", static=True)
def _size(node, ins, bat, opset):
    return np.asarray(math.prod(_dshape(ins[0], bat[0])), dtype=np.int64)


@_op("Gather", static=True)
def _gather(node, ins, bat, opset):
    x = ins[0]
    idx = _static_input(node, ins, 1, "indices").astype(np.int64)
    axis = int(_attr(node, "axis", 0)) % x.ndim
    idx = np.where(idx < 0, idx + x.shape[axis], idx)
    if _is_static(x):
        return np.take(x, idx, axis=axis)
    if bat[0] and axis == 0:
        raise _NeedVmap
    if idx.ndim == 0:
        return lax.index_in_dim(x, int(idx), axis, keepdims=False)
    flat = idx.reshape(-1)
    if idx.ndim == 1 and flat.size and np.array_equal(flat, np.arange(flat[0], flat[0] + flat.size)):
        return lax.slice_in_dim(x, int(flat[0]), int(flat[0]) + flat.size, axis=axis)
    return jnp.take(x, idx, axis=axis)


@_op("Slice", static=True)
def _slice(node, ins, bat, opset):
    x = ins[0]
    if opset < 10:
        starts, ends = _attr(node, "starts"), _attr(node, "ends")
        axes, steps = _attr(node, "axes"), None
    else:
        starts = _static_input(node, ins, 1, "starts")
        ends = _static_input(node, ins, 2, "ends")
        axes = _static_input(node, ins, 3, "axes")
        steps = _static_input(node, ins, 4, "steps")
    starts, ends = [int(s) for s in starts], [int(e) for e in ends]
    axes = list(range(len(starts))) if axes is None else [int(a) % x.ndim for a in axes]
    steps = [1] * len(starts) if steps is None else [int(s) for s in steps]
    dshape = _dshape(x, bat[0])
    for axis, start, end, step in zip(axes, starts, ends, steps):
        r = range(dshape[axis])[slice(start, end, step)]
        if bat[0] and axis == 0:
            if list(r) != [0]:
                raise _NeedVmap
            continue
        if _is_static(x):
            x = np.take(x, np.asarray(r, dtype=np.int64), axis=axis)
        elif len(r) == 0:
            x = lax.slice_in_dim(x, 0, 0, axis=axis)
        elif step > 0:
            x = lax.slice_in_dim(x, r.start, r[-1] + 1, step, axis)
        else:
            x = lax.rev(lax.slice_in_dim(x, r[-1], r.start + 1, -step, axis), (axis,))
    return x


_ONNX_DTYPES = {1: np.float32, 2: np.uint8, 3: np.int8, 5: np.int16, 6: np.int32, 7: np.int64,
                9: np.bool_, 10: np.float16, 11: np.float64, 12: np.uint32, 13: np.uint64}


@_op("Cast", static=True)
def _cast(node, ins, bat, opset):
    x, to = ins[0], int(_attr(node, "to"))
    if to not in _ONNX_DTYPES:
        raise _Unsupported(f"Cast to ONNX dtype {to} is not supported")
    dtype = np.dtype(_ONNX_DTYPES[to])
    if dtype.kind == "f":
        dtype = np.dtype(np.float32)  # computation is float32 throughout
    if _is_static(x):
        return x.astype(dtype)
    return x if x.dtype == dtype else x.astype(dtype)


@_op("Range", static=True)
def _range(node, ins, bat, opset):
    start, limit, delta = (_static_input(node, ins, i, n) for i, n in enumerate(("start", "limit", "delta")))
    return np.arange(start, limit, delta).astype(np.result_type(start, limit, delta))


@_op("Concat", static=True)
def _concat(node, ins, bat, opset):
    axis = int(_attr(node, "axis")) % ins[0].ndim
    if all(_is_static(v) for v in ins):
        return np.concatenate(ins, axis=axis)
    if any(bat):
        if axis == 0:
            raise _NeedVmap
        n = next(v.shape[0] for v, b in zip(ins, bat) if b)
        ins = [v if b else jnp.broadcast_to(v, (n,) + v.shape[1:]) for v, b in zip(ins, bat)]
    return jnp.concatenate(ins, axis=axis)


def _spatial_pads(node, in_sp, kernel, strides, dilations, *, ceil_mode: bool = False):
    """Per spatial axis ``(lo, hi, extra)``: explicit/auto pads and extra high padding for ceil_mode."""
    n = len(in_sp)
    auto_pad = _attr(node, "auto_pad", "NOTSET")
    eff = [(k - 1) * d + 1 for k, d in zip(kernel, dilations)]
    if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        pads = []
        for size, e, s in zip(in_sp, eff, strides):
            total = max((-(-size // s) - 1) * s + e - size, 0)
            small = total // 2
            pads.append((small, total - small) if auto_pad == "SAME_UPPER" else (total - small, small))
    elif auto_pad in ("NOTSET", "VALID"):
        p = [0] * (2 * n) if auto_pad == "VALID" else list(_attr(node, "pads", [0] * (2 * n)))
        pads = list(zip(p[:n], p[n:]))
    else:
        raise _Unsupported(f"auto_pad={auto_pad!r} is not supported")
    out = []
    for size, (lo, hi), e, s in zip(in_sp, pads, eff, strides):
        extra = 0
        if ceil_mode:
            span = size + lo + hi - e
            n_out = -(-span // s) + 1
            if (n_out - 1) * s >= size + lo:  # the last window must start inside the input or left pad
                n_out -= 1
            extra = max((n_out - 1) * s + e - (size + lo + hi), 0)
        out.append((int(lo), int(hi), int(extra)))
    return out


def _window_params(node, kernel):
    n = len(kernel)
    strides = tuple(int(s) for s in _attr(node, "strides", [1] * n))
    dilations = tuple(int(d) for d in _attr(node, "dilations", [1] * n))
    return strides, dilations


@_op("Conv")
def _conv(node, ins, bat, opset):
    x, w = ins[0], ins[1]
    b = ins[2] if len(ins) > 2 else None
    if bat[1] or (len(bat) > 2 and bat[2]):
        raise _NeedVmap
    kernel = tuple(w.shape[2:])
    strides, dilations = _window_params(node, kernel)
    pads = _spatial_pads(node, x.shape[2:], kernel, strides, dilations)
    y = lax.conv_general_dilated(x, w, strides, [(lo, hi) for lo, hi, _ in pads],
                                 rhs_dilation=dilations,
                                 feature_group_count=int(_attr(node, "group", 1)),
                                 precision=_PRECISION)
    if b is not None:
        y = y + b.reshape((1, -1) + (1,) * len(kernel))
    return y


def _pool(node, ins):
    x = ins[0]
    if len(node.outputs) > 1 and node.outputs[1]:
        raise _Unsupported("the Indices output is not supported")
    kernel = tuple(int(k) for k in _attr(node, "kernel_shape"))
    strides, dilations = _window_params(node, kernel)
    pads = _spatial_pads(node, x.shape[2:], kernel, strides, dilations,
                         ceil_mode=bool(_attr(node, "ceil_mode", 0)))
    window = dict(window_dimensions=(1, 1) + kernel, window_strides=(1, 1) + strides,
                  padding=((0, 0), (0, 0)) + tuple((lo, hi + extra) for lo, hi, extra in pads),
                  window_dilation=(1, 1) + dilations)
    return x, kernel, strides, dilations, pads, window


@_op("MaxPool")
def _max_pool(node, ins, bat, opset):
    if int(_attr(node, "storage_order", 0)):
        raise _Unsupported("storage_order=1 is not supported")
    x, *_, window = _pool(node, ins)
    return lax.reduce_window(x, np.array(-np.inf, x.dtype), lax.max, **window)


def _window_counts(size, k, s, d, lo, hi, extra, include_pad):
    """Number of counted elements in each window along one axis (pads counted if include_pad)."""
    n_out = (size + lo + hi + extra - ((k - 1) * d + 1)) // s + 1
    first, last = (-lo, size + hi) if include_pad else (0, size)
    pos = np.arange(n_out)[:, None] * s - lo + np.arange(k)[None, :] * d
    return ((pos >= first) & (pos < last)).sum(axis=1)


@_op("AveragePool")
def _average_pool(node, ins, bat, opset):
    x, kernel, strides, dilations, pads, window = _pool(node, ins)
    y = lax.reduce_window(x, np.array(0, x.dtype), lax.add, **window)
    include_pad = bool(_attr(node, "count_include_pad", 0))
    counts = [_window_counts(size, k, s, d, lo, hi, extra, include_pad)
              for size, k, s, d, (lo, hi, extra) in zip(x.shape[2:], kernel, strides, dilations, pads)]
    count = counts[0]
    for c in counts[1:]:
        count = np.multiply.outer(count, c)
    if np.all(count == count.flat[0]):
        return y * np.float32(1.0 / count.flat[0])
    return y * (1.0 / count.astype(np.float32))[None, None]


@_op("GlobalAveragePool", "GlobalMaxPool")
def _global_pool(node, ins, bat, opset):
    x = ins[0]
    axes = tuple(range(2, x.ndim))
    if node.op == "GlobalMaxPool":
        return jnp.max(x, axis=axes, keepdims=True)
    return jnp.sum(x, axis=axes, keepdims=True) * np.float32(1.0 / math.prod(x.shape[2:]))


@_op("ReduceMean", "ReduceSum")
def _reduce(node, ins, bat, opset):
    x = ins[0]
    axes_from_input = (node.op == "ReduceSum" and opset >= 13) or opset >= 18
    axes = _squeeze_axes(node, ins, 13 if axes_from_input else 1)
    if axes is None or not axes:
        if _attr(node, "noop_with_empty_axes", 0):
            return x
        axes = list(range(x.ndim))
    axes = tuple(sorted(a % x.ndim for a in axes))
    if bat[0] and 0 in axes:
        raise _NeedVmap
    keepdims = bool(_attr(node, "keepdims", 1))
    y = jnp.sum(x, axis=axes, keepdims=keepdims)
    if node.op == "ReduceMean":
        y = y * np.float32(1.0 / math.prod(x.shape[a] for a in axes))
    return y


@_op("BatchNormalization")
def _batch_norm(node, ins, bat, opset):
    x, scale, bias, mean, var = ins[:5]
    if any(bat[1:5]):
        raise _NeedVmap
    if int(_attr(node, "training_mode", 0)) or (len(node.outputs) > 1 and any(node.outputs[1:])):
        raise _Unsupported("only inference mode (a single output) is supported")
    eps = np.float32(_attr(node, "epsilon", 1e-5))
    mul = scale * lax.rsqrt(var + eps) if not _is_static(var) else scale / np.sqrt(var + eps)
    shift = bias - mean * mul
    shape = (1, -1) + (1,) * (x.ndim - 2)
    return x * mul.reshape(shape) + shift.reshape(shape)


@_op("Pad")
def _pad(node, ins, bat, opset):
    x = ins[0]
    mode = _attr(node, "mode", "constant")
    if opset < 11:
        pads, axes = list(_attr(node, "pads")), None
        value = np.asarray(_attr(node, "value", 0.0), x.dtype)
    else:
        pads = [int(p) for p in _static_input(node, ins, 1, "pads")]
        v = ins[2] if len(ins) > 2 and ins[2] is not None and ins[2].size else np.zeros((), np.float32)
        value = v.reshape(()).astype(x.dtype)  # a constant or a parameter
        axes = _static_input(node, ins, 3, "axes")
    axes = list(range(x.ndim)) if axes is None else [int(a) % x.ndim for a in axes]
    n = len(axes)
    widths = [(0, 0)] * x.ndim
    for i, a in enumerate(axes):
        widths[a] = (int(pads[i]), int(pads[i + n]))
    if bat[0] and widths[0] != (0, 0):
        raise _NeedVmap
    if all(w == (0, 0) for w in widths):
        return x
    if mode == "constant":
        return lax.pad(x, value, [(lo, hi, 0) for lo, hi in widths])
    if mode in ("reflect", "edge", "wrap") and min(min(w) for w in widths) >= 0:
        return jnp.pad(x, widths, mode=mode)
    raise _Unsupported(f"Pad mode {mode!r} with pads {pads} is not supported")


SUPPORTED_OPS = frozenset(_OPS)


# ----------------------------------------------------------------------------------------------
# interpreter
# ----------------------------------------------------------------------------------------------
def _eval_node(node: _Node, ins: list, bat: list[bool], opset: int) -> tuple:
    fn, handles_static = _OPS[node.op]
    try:
        if not handles_static and ins and all(v is None or _is_static(v) for v in ins):
            with jax.ensure_compile_time_eval():
                out = fn(node, ins, bat, opset)
            out = tuple(_float32_if_float(np.asarray(o)) for o in (out if isinstance(out, tuple) else (out,)))
        else:
            out = fn(node, ins, bat, opset)
    except (_NeedVmap, UnsupportedOpError, FileFormatError):
        raise
    except _Unsupported as e:
        raise UnsupportedOpError(f"ONNX {node.op} {node.label}: {e}") from None
    except Exception as e:  # malformed graph: shape mismatch, missing attribute ...
        raise FileFormatError(f"ONNX {node.op} {node.label} could not be evaluated: "
                              f"{type(e).__name__}: {e}") from e
    return out if isinstance(out, tuple) else (out,)


def _run(g: _Graph, params: dict, xs: tuple, batched: bool) -> jax.Array:
    """Evaluate the graph on one array per graph input, each of its declared shape (axis 0 = batch when
    ``batched``)."""
    env: dict[str, Any] = dict(g.consts)
    env.update(params)
    env.update(zip(g.input_names, xs))
    in_batch = set(g.input_names) if batched else set()
    for node in g.nodes:
        ins = [env[n] if n else None for n in node.inputs]
        bat = [n in in_batch for n in node.inputs]
        with jax.named_scope(f"ONNX {node.op} {node.label}"):
            outs = _eval_node(node, ins, bat, g.opset)
        for name, value in zip(node.outputs, outs):
            if name:
                env[name] = value
                if any(bat) and not _is_static(value):
                    in_batch.add(name)
    y = env[g.output_name]
    if batched and g.output_name not in in_batch:
        raise _NeedVmap
    return y


def _make_apply(g: _Graph, mean, inv_std, per_example: bool):
    """``apply(params, x: (B, *input_shape)) -> (B, C)`` for the graph, with normalisation folded in. A graph
    with several inputs takes their flattened values concatenated in order, ``x: (B, n_1 + n_2 + ...)``."""
    sizes = [math.prod(s) for s in g.input_shapes]

    def inputs(x, lead: tuple):
        """``x: (*lead, *input_shape)`` normalised and cut into one array per graph input."""
        x = jnp.asarray(x, jnp.float32)
        if mean is not None:
            x = x - mean
        if inv_std is not None:
            x = x * inv_std
        if len(sizes) == 1:
            return (x.reshape(lead + g.input_shapes[0]),)
        parts = jnp.split(x.reshape(lead + (-1,)), np.cumsum(sizes)[:-1], axis=-1)
        return tuple(p.reshape(lead + s) for p, s in zip(parts, g.input_shapes))

    if per_example:
        def one(params, xi):
            y = _run(g, params, inputs(xi, (1,) if g.has_batch else ()), batched=False)
            return y.reshape(-1)

        def apply(params, x):
            return jax.vmap(one, in_axes=(None, 0))(params, x)
    else:
        def apply(params, x):
            y = _run(g, params, inputs(x, x.shape[:1]), batched=True)
            return y if y.ndim == 2 else y.reshape(y.shape[0], -1)
    return apply


# ----------------------------------------------------------------------------------------------
# loading
# ----------------------------------------------------------------------------------------------
def _read_model(path) -> tuple[Any, bytes]:
    import onnx

    p = Path(path)
    try:
        data = p.read_bytes()
    except OSError as e:
        raise FileFormatError(f"cannot read ONNX file {p}: {e.strerror or e}") from None
    try:
        model = onnx.load_model_from_string(data)
        if any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer):
            model = onnx.load(str(p))
    except Exception as e:
        raise FileFormatError(f"{p} is not a valid ONNX model: {type(e).__name__}: {e}") from None
    if not model.graph.node:
        raise FileFormatError(f"{p} is not a valid ONNX model: the graph has no nodes")
    return model, data


def _dims(value_info) -> tuple:
    t = value_info.type.tensor_type
    return tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in t.shape.dim)


def _opset(model) -> int:
    return max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=1)


def _graph_inputs(model) -> list:
    inits = {t.name for t in model.graph.initializer}
    return [i for i in model.graph.input if i.name not in inits]


def _parse(model, where: str) -> tuple[_Graph, dict[str, np.ndarray]]:
    """Graph structure and float initializers (the params) of a model."""
    from onnx import helper, numpy_helper

    graph = model.graph
    inputs = _graph_inputs(model)
    if not inputs:
        raise FileFormatError(f"{where}: the graph has no input")
    if not graph.output:
        raise FileFormatError(f"{where}: the graph has no output")
    declared = [_dims(i) for i in inputs]
    batch = [len(d) >= 2 and (isinstance(d[0], str) or d[0] == 1) for d in declared]
    has_batch = all(batch)
    shapes = []
    for i, d in zip(inputs, declared):
        per_example = d[1:] if has_batch else d
        if not d or not all(isinstance(k, int) and k > 0 for k in per_example) or (any(batch) and not has_batch):
            raise FileFormatError(f"{where}: input {i.name!r} has shape {list(d)}; all dimensions except a "
                                  "leading batch dimension (on every input or none) must be fixed")
        shapes.append(tuple(per_example))

    nodes = []
    known = {i.name for i in inputs} | {""} | {t.name for t in graph.initializer}
    for i, n in enumerate(graph.node):
        label = f"node {n.name!r}" if n.name else f"unnamed node #{i}"
        if n.domain not in ("", "ai.onnx") or n.op_type not in _OPS:
            op = n.op_type if n.domain in ("", "ai.onnx") else f"{n.domain}.{n.op_type}"
            raise UnsupportedOpError(f"{where}: ONNX op {op!r} ({label}) is not supported; "
                                     f"supported ops: {', '.join(sorted(_OPS))}")
        missing = [name for name in n.input if name not in known]
        if missing:
            raise FileFormatError(f"{where}: {n.op_type} {label} uses tensors {missing} that no earlier "
                                  "node, initializer or graph input provides")
        known.update(n.output)
        attrs = {}
        for a in n.attribute:
            v = helper.get_attribute_value(a)
            if isinstance(v, bytes):
                v = v.decode()
            elif a.type == a.TENSOR:
                v = numpy_helper.to_array(v)
            attrs[a.name] = v
        nodes.append(_Node(n.op_type, label, tuple(n.input), tuple(n.output), attrs))

    params, consts = {}, {}
    for t in graph.initializer:
        a = numpy_helper.to_array(t)
        if a.dtype.kind == "f":
            params[t.name] = a.astype(np.float32)
        else:
            consts[t.name] = a
    if graph.output[0].name not in known:
        raise FileFormatError(f"{where}: graph output {graph.output[0].name!r} is never computed")
    g = _Graph(tuple(nodes), consts, tuple(i.name for i in inputs), tuple(shapes), has_batch,
               graph.output[0].name, _opset(model))
    return g, params


def _normalization(mean, std, input_shape: tuple[int, ...]):
    """``(mean, 1/std)`` as float32 arrays broadcasting over one example (channel axis 0), or None."""
    out = []
    for what, v in (("mean", mean), ("std", std)):
        if v is None:
            out.append(None)
            continue
        a = np.asarray(v, dtype=np.float32).reshape(-1)
        if what == "std" and (a.size == 0 or np.any(~(a > 0)) or not np.all(np.isfinite(a))):
            raise InputError(f"std must be positive and finite, got {v}")
        if a.size == 1:
            a = a.reshape(())
        elif input_shape and a.size == input_shape[0]:
            a = a.reshape((a.size,) + (1,) * (len(input_shape) - 1))
        else:
            raise InputError(f"{what} has {a.size} values but the channel axis of the input shape "
                             f"{input_shape} (axis 0 of one example) has "
                             f"{input_shape[0] if input_shape else 'no'} entries")
        if what == "mean":
            out.append(None if not np.any(a) else a)
        else:
            out.append(None if np.all(a == 1) else (np.float32(1) / a).astype(np.float32))
    return tuple(out)


def load_onnx(path, *, mean=None, std=None, domain=(0.0, 1.0), name: str | None = None) -> Network:
    """Load an ONNX classifier as a pure-JAX `Network`.

    Args:
      path: ONNX file. Its declared input ``(1 or batch, *input_shape)`` fixes
        ``Network.input_shape``; a graph with several inputs takes their flattened values concatenated in
        the graph's order, ``input_shape = (n_1 + n_2 + ...,)`` (as VNN-LIB numbers them). The first graph
        output gives the logits ``(B, num_classes)``.
      mean, std: optional normalisation ``(x - mean) / std`` applied before the graph, scalars or
        one value per channel (axis 0 of one example, e.g. 3 for ``(3, 32, 32)``). When both are
        None, the entry of `KNOWN_NORMALIZATION` for the file's stem (if any) is used; pass
        ``mean=0, std=1`` to disable it.
      domain: ``(lo, hi)`` of valid raw inputs (before normalisation).
      name: network name; defaults to the file stem.

    Returns:
      `Network` with ``params`` = float initializers (``dict name -> float32 array``),
      ``apply(params, x: (B, *input_shape)) -> (B, C)`` for any batch size ``B``, and
      ``arch = {"onnx": sha256 of the file, "mean": ..., "std": ...}``.

    Raises:
      FileFormatError: the file is missing, unreadable or not a usable ONNX model.
      UnsupportedOpError: the graph has an op (or op attribute) this importer cannot express.
      InputError: ``mean``/``std`` do not fit the input shape.
    """
    path = Path(path)
    model, data = _read_model(path)
    g, np_params = _parse(model, str(path))
    sizes = [math.prod(s) for s in g.input_shapes]
    input_shape = g.input_shapes[0] if len(sizes) == 1 else (sum(sizes),)
    if mean is None and std is None and path.stem in KNOWN_NORMALIZATION:
        mean, std = KNOWN_NORMALIZATION[path.stem]["mean"], KNOWN_NORMALIZATION[path.stem]["std"]
    norm_mean, inv_std = _normalization(mean, std, input_shape)
    params = {k: jnp.asarray(v) for k, v in np_params.items()}
    spec = (jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), params),
            jax.ShapeDtypeStruct((2,) + input_shape, jnp.float32))

    # Evaluate the whole batch at once when the batch axis can be tracked, else vmap per example.
    apply = None
    try:
        if g.has_batch:
            try:
                apply = _make_apply(g, norm_mean, inv_std, per_example=False)
                out = jax.eval_shape(apply, *spec)
            except _NeedVmap:
                apply = None
        if apply is None:
            apply = _make_apply(g, norm_mean, inv_std, per_example=True)
            out = jax.eval_shape(apply, *spec)
    except (UnsupportedOpError, FileFormatError) as e:
        raise type(e)(f"{path}: {e}") from None

    arch = {"onnx": hashlib.sha256(data).hexdigest(),
            "mean": None if mean is None else np.asarray(mean, np.float64).reshape(-1).tolist(),
            "std": None if std is None else np.asarray(std, np.float64).reshape(-1).tolist()}
    return Network(apply, params, input_shape, int(out.shape[1]),
                   (float(domain[0]), float(domain[1])), name or path.stem, arch)


def onnx_summary(path_or_model) -> dict:
    """Static description of an ONNX model (path or ``onnx.ModelProto``), for listings.

    Returns a dict with ``input_name``, ``input_shape`` / ``output_shape`` (declared, symbolic
    dimensions as strings) of the first input, ``inputs`` (name -> declared shape of every graph input),
    ``opset``, ``ops`` (op type -> count, in order of first use),
    ``num_nodes``, ``num_params`` (elements of floating-point initializers), ``unsupported_ops``
    (op types `load_onnx` cannot import) and, for a path, ``path`` and ``sha256``.
    """
    info: dict[str, Any] = {}
    if isinstance(path_or_model, (str, Path)):
        model, data = _read_model(path_or_model)
        info.update(path=str(path_or_model), sha256=hashlib.sha256(data).hexdigest())
    else:
        model = path_or_model
    from onnx import TensorProto

    graph = model.graph
    inputs = _graph_inputs(model)
    ops = Counter(n.op_type if n.domain in ("", "ai.onnx") else f"{n.domain}.{n.op_type}"
                  for n in graph.node)
    float_types = {TensorProto.FLOAT, TensorProto.DOUBLE, TensorProto.FLOAT16, TensorProto.BFLOAT16}
    info.update(
        name=graph.name,
        input_name=inputs[0].name if inputs else None,
        input_shape=list(_dims(inputs[0])) if inputs else None,
        inputs={i.name: list(_dims(i)) for i in inputs},
        output_shape=list(_dims(graph.output[0])) if graph.output else None,
        opset=_opset(model),
        producer=f"{model.producer_name} {model.producer_version}".strip(),
        ops=dict(ops),
        num_nodes=len(graph.node),
        num_params=int(sum(math.prod(t.dims) for t in graph.initializer if t.data_type in float_types)),
        unsupported_ops=sorted(op for op in ops if op not in _OPS),
    )
    return info
