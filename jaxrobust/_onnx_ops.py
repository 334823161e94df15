"""ONNX op handlers for elementwise, activation, constant, matrix-product and shape ops, and what every
handler shares: the node record, the failure signals and the input/attribute helpers.

A handler is ``fn(node, ins, bat, opset) -> value or tuple of values``. ``ins`` are numpy arrays (static), jax
arrays (dynamic) or None (omitted optional input); ``bat[i]`` says input i carries the batch on axis 0 (then its
declared axis-0 size is 1). Handlers registered with ``static=True`` also compute all-static inputs with numpy
themselves; the others are folded by running them eagerly on the constants.
"""
from __future__ import annotations

import math
import operator
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

PRECISION = lax.Precision.HIGHEST


class Node(NamedTuple):
    op: str
    label: str          # "node 'name'" or "unnamed node #i", for messages
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    attrs: dict[str, Any]


class NeedVmap(Exception):
    """The batch axis cannot be tracked through an op; fall back to per-example evaluation."""


class Unsupported(Exception):
    """An op's attributes or inputs are outside what the importer handles."""


def is_static(v) -> bool:
    return isinstance(v, np.ndarray)


def float32_if_float(a: np.ndarray) -> np.ndarray:
    a = np.asarray(a)
    return a.astype(np.float32) if a.dtype.kind == "f" else a


def op_table():
    """``(table, op)``: an empty table ``{ONNX op name: (handler, static)}`` and the decorator
    ``@op(*names, static=False)`` that registers a handler in it."""
    table: dict[str, tuple[Callable, bool]] = {}

    def op(*names: str, static: bool = False):
        def register(fn):
            for n in names:
                table[n] = (fn, static)
            return fn
        return register
    return table, op


OPS, _op = op_table()


def attr(node: Node, key: str, default=None):
    return node.attrs.get(key, default)


def static_input(node: Node, ins, i: int, what: str, default=None):
    """Input ``i`` as a numpy array (must be constant); ``default`` when omitted."""
    if i >= len(ins) or ins[i] is None:
        return default
    if not is_static(ins[i]):
        raise Unsupported(f"{what} (input {i}) must be a constant, but is computed at run time")
    return ins[i]


def declared_shape(v, batched: bool) -> tuple[int, ...]:
    """Declared shape: the batch axis counts as size 1."""
    return (1,) + tuple(v.shape[1:]) if batched else tuple(v.shape)


def check_broadcast(ins, bat):
    """Elementwise broadcasting keeps the batch on axis 0 only if unbatched operands don't reach it."""
    if not any(bat):
        return
    rank = max(v.ndim for v, b in zip(ins, bat) if b)
    for v, b in zip(ins, bat):
        if v is None:
            continue
        if b and v.ndim != rank:
            raise NeedVmap
        if not b and (v.ndim > rank or (v.ndim == rank and v.shape[0] != 1)):
            raise NeedVmap


def _is_neutral(c, x, value: float) -> bool:
    """``c`` is a static all-``value`` tensor whose broadcasting leaves ``x``'s shape unchanged."""
    return (is_static(c) and not is_static(x) and c.ndim <= x.ndim
            and all(d == 1 for d in c.shape) and bool(np.all(c == value)))


def _binary(node, ins, bat, np_fn, jnp_fn):
    a, b = ins
    if is_static(a) and is_static(b):
        return np_fn(a, b)
    check_broadcast(ins, bat)
    return jnp_fn(a, b)


# op -> (numpy function, jax function, neutral element, commutative)
_ARITHMETIC = {"Add": (np.add, operator.add, 0.0, True), "Sub": (np.subtract, operator.sub, 0.0, False),
               "Mul": (np.multiply, operator.mul, 1.0, True)}


@_op(*_ARITHMETIC, static=True)
def _arithmetic(node, ins, bat, opset):
    """Add, Sub, Mul; a static operand of neutral elements (0, or 1 for Mul) that leaves the shape alone is
    dropped."""
    np_fn, jnp_fn, neutral, commutative = _ARITHMETIC[node.op]
    a, b = ins
    if _is_neutral(b, a, neutral):
        return a
    if commutative and _is_neutral(a, b, neutral):
        return b
    return _binary(node, ins, bat, np_fn, jnp_fn)


def _np_div(a, b):
    if a.dtype.kind in "iu" and b.dtype.kind in "iu":
        return np.trunc(a / b).astype(np.result_type(a, b))
    return a / b


@_op("Div", static=True)
def _div(node, ins, bat, opset):
    a, b = ins
    if _is_neutral(b, a, 1.0):
        return a
    if is_static(b) and not is_static(a) and b.dtype.kind == "f":
        ins = [a, (np.float32(1.0) / b).astype(np.float32)]  # division by a constant -> mul
        return _binary(node, ins, bat, np.multiply, operator.mul)
    return _binary(node, ins, bat, _np_div, operator.truediv)


@_op("Relu")
def _relu(node, ins, bat, opset):
    return jnp.maximum(ins[0], 0)


@_op("LeakyRelu")
def _leaky_relu(node, ins, bat, opset):
    x, alpha = ins[0], float(attr(node, "alpha", 0.01))
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
        axis = int(attr(node, "axis", 1)) % x.ndim
        axes = tuple(range(axis, x.ndim))
    else:
        axis = int(attr(node, "axis", -1)) % x.ndim
        axes = (axis,)
    if bat[0] and 0 in axes:
        raise NeedVmap
    fn = jax.nn.softmax if node.op == "Softmax" else jax.nn.log_softmax
    return fn(x, axis=axes)


@_op("Clip")
def _clip(node, ins, bat, opset):
    x = ins[0]
    if opset < 11:
        lo, hi = attr(node, "min"), attr(node, "max")
    else:
        lo = ins[1] if len(ins) > 1 else None
        hi = ins[2] if len(ins) > 2 else None
    if any(b for b in bat[1:]):
        raise NeedVmap
    if lo is not None:
        x = jnp.maximum(x, lo)
    if hi is not None:
        x = jnp.minimum(x, hi)
    return x


@_op("Identity", "Dropout", static=True)
def _identity(node, ins, bat, opset):
    if len(node.outputs) > 1 and node.outputs[1]:
        raise Unsupported("the mask output is not supported")
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
            return float32_if_float(v)
    raise Unsupported(f"Constant attribute {sorted(node.attrs)} is not supported")


@_op("ConstantOfShape", static=True)
def _constant_of_shape(node, ins, bat, opset):
    shape = static_input(node, ins, 0, "shape")
    value = attr(node, "value", np.zeros(1, np.float32))
    return np.full(tuple(int(d) for d in shape), float32_if_float(value).reshape(-1)[0])


@_op("MatMul")
def _matmul(node, ins, bat, opset):
    a, b = ins
    ba, bb = bat
    if ba or bb:
        ok = ((ba and not bb and a.ndim == 2)
              or (ba and a.ndim >= 3 and (b.ndim < a.ndim or (b.ndim == a.ndim and (bb or b.shape[0] == 1))))
              or (bb and not ba and b.ndim >= 3 and (a.ndim < b.ndim or a.shape[0] == 1)))
        if not ok:
            raise NeedVmap
    return jnp.matmul(a, b, precision=PRECISION)


@_op("Gemm")
def _gemm(node, ins, bat, opset):
    a, b = ins[0], ins[1]
    c = ins[2] if len(ins) > 2 else None
    trans_a, trans_b = int(attr(node, "transA", 0)), int(attr(node, "transB", 0))
    alpha, beta = float(attr(node, "alpha", 1.0)), float(attr(node, "beta", 1.0))
    if bat[1] or (bat[0] and trans_a):
        raise NeedVmap
    dims = (((0 if trans_a else 1,), (1 if trans_b else 0,)), ((), ()))
    y = lax.dot_general(a, b, dims, precision=PRECISION)
    if alpha != 1.0:
        y = y * np.float32(alpha)
    if c is None or beta == 0.0:
        return y
    if beta != 1.0:
        c = c * np.float32(beta)
    check_broadcast([y, c], [bat[0], len(bat) > 2 and bat[2]])
    return y + c


def _reshape(x, batched: bool, target: tuple[int, ...]):
    """Reshape to a declared target shape; a batched tensor must keep the batch as axis 0."""
    target = tuple(int(d) for d in target)
    if not batched:
        return x.reshape(target)
    if target[0] != 1:
        raise NeedVmap
    return x.reshape((x.shape[0],) + target[1:])


@_op("Reshape", static=True)
def _reshape_op(node, ins, bat, opset):
    x = ins[0]
    shape = [int(d) for d in static_input(node, ins, 1, "target shape")] if opset >= 5 \
        else list(attr(node, "shape"))
    dshape = declared_shape(x, bat[0])
    if not attr(node, "allowzero", 0):
        shape = [dshape[i] if d == 0 else d for i, d in enumerate(shape)]
    if -1 in shape:
        known = math.prod(d for d in shape if d != -1)
        shape[shape.index(-1)] = math.prod(dshape) // known if known else 0
    return _reshape(x, bat[0], tuple(shape))


@_op("Flatten", static=True)
def _flatten(node, ins, bat, opset):
    x = ins[0]
    dshape = declared_shape(x, bat[0])
    axis = int(attr(node, "axis", 1))
    axis = axis + len(dshape) if axis < 0 else axis
    return _reshape(x, bat[0], (math.prod(dshape[:axis]), math.prod(dshape[axis:])))


def squeeze_axes(node, ins, opset, i: int = 1):
    axes = attr(node, "axes") if opset < 13 else static_input(node, ins, i, "axes")
    return None if axes is None else [int(a) for a in np.asarray(axes).reshape(-1)]


@_op("Unsqueeze", static=True)
def _unsqueeze(node, ins, bat, opset):
    x = ins[0]
    axes = squeeze_axes(node, ins, opset)
    rank = x.ndim + len(axes)
    axes = sorted(a % rank for a in axes)
    shape = list(declared_shape(x, bat[0]))
    for a in axes:
        shape.insert(a, 1)
    if bat[0] and 0 in axes:
        raise NeedVmap
    return _reshape(x, bat[0], tuple(shape))


@_op("Squeeze", static=True)
def _squeeze(node, ins, bat, opset):
    x = ins[0]
    dshape = declared_shape(x, bat[0])
    axes = squeeze_axes(node, ins, opset)
    axes = [i for i, d in enumerate(dshape) if d == 1] if axes is None else [a % x.ndim for a in axes]
    if bat[0] and 0 in axes:
        raise NeedVmap
    return _reshape(x, bat[0], tuple(d for i, d in enumerate(dshape) if i not in axes))


@_op("Transpose", static=True)
def _transpose(node, ins, bat, opset):
    x = ins[0]
    perm = tuple(int(p) for p in attr(node, "perm", range(x.ndim - 1, -1, -1)))
    if bat[0] and perm[0] != 0:
        raise NeedVmap
    return np.transpose(x, perm) if is_static(x) else lax.transpose(x, perm)


@_op("Shape", static=True)
def _shape(node, ins, bat, opset):
    dshape = declared_shape(ins[0], bat[0])
    start, end = attr(node, "start", 0), attr(node, "end", None)
    return np.asarray(dshape[slice(start, end)], dtype=np.int64)


@_op("Size", static=True)
def _size(node, ins, bat, opset):
    return np.asarray(math.prod(declared_shape(ins[0], bat[0])), dtype=np.int64)


@_op("Gather", static=True)
def _gather(node, ins, bat, opset):
    x = ins[0]
    idx = static_input(node, ins, 1, "indices").astype(np.int64)
    axis = int(attr(node, "axis", 0)) % x.ndim
    idx = np.where(idx < 0, idx + x.shape[axis], idx)
    if is_static(x):
        return np.take(x, idx, axis=axis)
    if bat[0] and axis == 0:
        raise NeedVmap
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
        starts, ends = attr(node, "starts"), attr(node, "ends")
        axes, steps = attr(node, "axes"), None
    else:
        starts = static_input(node, ins, 1, "starts")
        ends = static_input(node, ins, 2, "ends")
        axes = static_input(node, ins, 3, "axes")
        steps = static_input(node, ins, 4, "steps")
    starts, ends = [int(s) for s in starts], [int(e) for e in ends]
    axes = list(range(len(starts))) if axes is None else [int(a) % x.ndim for a in axes]
    steps = [1] * len(starts) if steps is None else [int(s) for s in steps]
    dshape = declared_shape(x, bat[0])
    for axis, start, end, step in zip(axes, starts, ends, steps):
        r = range(dshape[axis])[slice(start, end, step)]
        if bat[0] and axis == 0:
            if list(r) != [0]:
                raise NeedVmap
            continue
        if is_static(x):
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
    x, to = ins[0], int(attr(node, "to"))
    if to not in _ONNX_DTYPES:
        raise Unsupported(f"Cast to ONNX dtype {to} is not supported")
    dtype = np.dtype(_ONNX_DTYPES[to])
    if dtype.kind == "f":
        dtype = np.dtype(np.float32)  # computation is float32 throughout
    if is_static(x):
        return x.astype(dtype)
    return x if x.dtype == dtype else x.astype(dtype)


@_op("Range", static=True)
def _range(node, ins, bat, opset):
    start, limit, delta = (static_input(node, ins, i, n) for i, n in enumerate(("start", "limit", "delta")))
    return np.arange(start, limit, delta).astype(np.result_type(start, limit, delta))


@_op("Concat", static=True)
def _concat(node, ins, bat, opset):
    axis = int(attr(node, "axis")) % ins[0].ndim
    if all(is_static(v) for v in ins):
        return np.concatenate(ins, axis=axis)
    if any(bat):
        if axis == 0:
            raise NeedVmap
        n = next(v.shape[0] for v, b in zip(ins, bat) if b)
        ins = [v if b else jnp.broadcast_to(v, (n,) + v.shape[1:]) for v, b in zip(ins, bat)]
    return jnp.concatenate(ins, axis=axis)
