"""ONNX op handlers for layers over spatial or reduced axes: Conv, pooling, ReduceMean/ReduceSum,
BatchNormalization and Pad (the handler contract is in `jaxrobust._onnx_ops`)."""
from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np
from jax import lax

from ._onnx_ops import PRECISION, NeedVmap, Unsupported, attr, is_static, op_table, squeeze_axes, static_input

OPS, _op = op_table()


def _spatial_pads(node, in_sp, kernel, strides, dilations, *, ceil_mode: bool = False):
    """Per spatial axis ``(lo, hi, extra)``: explicit/auto pads and extra high padding for ceil_mode."""
    n = len(in_sp)
    auto_pad = attr(node, "auto_pad", "NOTSET")
    eff = [(k - 1) * d + 1 for k, d in zip(kernel, dilations)]
    if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        pads = []
        for size, e, s in zip(in_sp, eff, strides):
            total = max((-(-size // s) - 1) * s + e - size, 0)
            small = total // 2
            pads.append((small, total - small) if auto_pad == "SAME_UPPER" else (total - small, small))
    elif auto_pad in ("NOTSET", "VALID"):
        p = [0] * (2 * n) if auto_pad == "VALID" else list(attr(node, "pads", [0] * (2 * n)))
        pads = list(zip(p[:n], p[n:]))
    else:
        raise Unsupported(f"auto_pad={auto_pad!r} is not supported")
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
    strides = tuple(int(s) for s in attr(node, "strides", [1] * n))
    dilations = tuple(int(d) for d in attr(node, "dilations", [1] * n))
    return strides, dilations


@_op("Conv")
def _conv(node, ins, bat, opset):
    x, w = ins[0], ins[1]
    b = ins[2] if len(ins) > 2 else None
    if bat[1] or (len(bat) > 2 and bat[2]):
        raise NeedVmap
    kernel = tuple(w.shape[2:])
    strides, dilations = _window_params(node, kernel)
    pads = _spatial_pads(node, x.shape[2:], kernel, strides, dilations)
    y = lax.conv_general_dilated(x, w, strides, [(lo, hi) for lo, hi, _ in pads],
                                 rhs_dilation=dilations,
                                 feature_group_count=int(attr(node, "group", 1)),
                                 precision=PRECISION)
    if b is not None:
        y = y + b.reshape((1, -1) + (1,) * len(kernel))
    return y


def _pool(node, ins):
    x = ins[0]
    if len(node.outputs) > 1 and node.outputs[1]:
        raise Unsupported("the Indices output is not supported")
    kernel = tuple(int(k) for k in attr(node, "kernel_shape"))
    strides, dilations = _window_params(node, kernel)
    pads = _spatial_pads(node, x.shape[2:], kernel, strides, dilations,
                         ceil_mode=bool(attr(node, "ceil_mode", 0)))
    window = dict(window_dimensions=(1, 1) + kernel, window_strides=(1, 1) + strides,
                  padding=((0, 0), (0, 0)) + tuple((lo, hi + extra) for lo, hi, extra in pads),
                  window_dilation=(1, 1) + dilations)
    return x, kernel, strides, dilations, pads, window


@_op("MaxPool")
def _max_pool(node, ins, bat, opset):
    if int(attr(node, "storage_order", 0)):
        raise Unsupported("storage_order=1 is not supported")
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
    include_pad = bool(attr(node, "count_include_pad", 0))
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
    axes = squeeze_axes(node, ins, 13 if axes_from_input else 1)
    if axes is None or not axes:
        if attr(node, "noop_with_empty_axes", 0):
            return x
        axes = list(range(x.ndim))
    axes = tuple(sorted(a % x.ndim for a in axes))
    if bat[0] and 0 in axes:
        raise NeedVmap
    keepdims = bool(attr(node, "keepdims", 1))
    y = jnp.sum(x, axis=axes, keepdims=keepdims)
    if node.op == "ReduceMean":
        y = y * np.float32(1.0 / math.prod(x.shape[a] for a in axes))
    return y


@_op("BatchNormalization")
def _batch_norm(node, ins, bat, opset):
    x, scale, bias, mean, var = ins[:5]
    if any(bat[1:5]):
        raise NeedVmap
    if int(attr(node, "training_mode", 0)) or (len(node.outputs) > 1 and any(node.outputs[1:])):
        raise Unsupported("only inference mode (a single output) is supported")
    eps = np.float32(attr(node, "epsilon", 1e-5))
    mul = scale * lax.rsqrt(var + eps) if not is_static(var) else scale / np.sqrt(var + eps)
    shift = bias - mean * mul
    shape = (1, -1) + (1,) * (x.ndim - 2)
    return x * mul.reshape(shape) + shift.reshape(shape)


@_op("Pad")
def _pad(node, ins, bat, opset):
    x = ins[0]
    mode = attr(node, "mode", "constant")
    if opset < 11:
        pads, axes = list(attr(node, "pads")), None
        value = np.asarray(attr(node, "value", 0.0), x.dtype)
    else:
        pads = [int(p) for p in static_input(node, ins, 1, "pads")]
        v = ins[2] if len(ins) > 2 and ins[2] is not None and ins[2].size else np.zeros((), np.float32)
        value = v.reshape(()).astype(x.dtype)  # a constant or a parameter
        axes = static_input(node, ins, 3, "axes")
    axes = list(range(x.ndim)) if axes is None else [int(a) % x.ndim for a in axes]
    n = len(axes)
    widths = [(0, 0)] * x.ndim
    for i, a in enumerate(axes):
        widths[a] = (int(pads[i]), int(pads[i + n]))
    if bat[0] and widths[0] != (0, 0):
        raise NeedVmap
    if all(w == (0, 0) for w in widths):
        return x
    if mode == "constant":
        return lax.pad(x, value, [(lo, hi, 0) for lo, hi in widths])
    if mode in ("reflect", "edge", "wrap") and min(min(w) for w in widths) >= 0:
        return jnp.pad(x, widths, mode=mode)
    raise Unsupported(f"Pad mode {mode!r} with pads {pads} is not supported")
