"""Flatten the jaxpr of a network into a small graph that the bound propagators interpret.

``build_graph(fn, in_shape, dtype)`` traces ``fn`` on one example (batch 1), inlines every call
primitive (``jit``/``pjit``, ``closed_call``, ``custom_jvp_call``, ``custom_vjp_call``, ``checkpoint``),
folds every equation whose inputs do not depend on the network input into a constant, and
classifies the remaining (input-dependent, "bounded") equations:

* ``linear``  -- affine in its bounded operands with the other operands fixed (dot_general, conv,
  mul/div by a constant, add/sub, reshape, transpose, broadcast, slicing, padding, reductions by
  summation, concatenate/stack/tile/split/unstack of any mix of bounded and constant operands, ...).
  Interval and backward rules are derived generically from the primitive itself.
* ``pwl``     -- ``y = v + phi(x - k)`` with ``phi(t) = a_p t (t >= 0), a_n t (t < 0)``: ReLU
  (``max(x, 0)``), ``max/min`` with a constant, leaky ReLU / PReLU (``max(x, a x)``, ``where(x >= 0, x, a x)``).
* ``sshape``  -- ``logistic`` and ``tanh``.
* ``maxpool`` -- ``reduce_window_max``; ``max2`` -- max/min of two bounded operands.
* ``monotone`` -- other elementwise/reducing ops nondecreasing in every bounded operand (exp, log,
  sqrt, reduce_max, clamp, ...): interval rule only, CROWN concretizes their output box.
* ``abs``, ``pow`` (integer_pow/square), ``mul2`` (product of two bounded operands): interval rule only.

Anything else raises `UnsupportedOpError` naming the primitive, after the ``jax.named_scope`` it was traced
in (the ONNX importer names each node's scope by op type and node name). Products (``dot_general``, convolutions)
are re-bound at ``Precision.HIGHEST``, whatever precision the network asked for.
"""
from __future__ import annotations

import dataclasses
import itertools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.extend import core as jcore

from ..errors import UnsupportedOpError

CALLS = {"pjit", "jit", "closed_call", "core_call", "custom_jvp_call", "custom_vjp_call",
         "custom_vjp_call_jaxpr", "remat", "checkpoint", "remat2", "custom_lin"}
ALIAS = {"copy", "copy_p", "stop_gradient", "reduce_precision", "optimization_barrier"}
# Linear in their bounded operands; the listed operand positions (``"rest"``: every position >= 1)
# hold constants that add to the output (zeroed to obtain the linear part).
STRUCTURAL = {"reshape", "transpose", "broadcast_in_dim", "squeeze", "expand_dims", "slice",
              "dynamic_slice", "gather", "reduce_sum", "reduce_window_sum", "convert_element_type",
              "rev", "neg", "cumsum", "add", "sub", "add_any", "concatenate", "stack", "tile", "split",
              "unstack", "pad", "select_n", "dynamic_update_slice"}
ADDITIVE = {"add": "all", "sub": "all", "add_any": "all", "concatenate": "all", "stack": "all", "pad": "all",
            "select_n": "rest", "dynamic_update_slice": (0, 1)}
MULTIPLICATIVE = {"mul", "div", "dot_general", "conv_general_dilated"}
MONOTONE = {"exp", "exp2", "log", "log1p", "expm1", "sqrt", "cbrt", "erf", "atan", "asinh", "sinh",
            "reduce_max", "reduce_min", "reduce_window_min", "cummax", "cummin", "floor", "ceil",
            "round", "sign", "clamp", "max", "min", "logistic", "tanh", "reduce_window_max"}
COMPARE = {"ge", "gt", "le", "lt"}
# Ops through which an exact affine image of the input stays exact under the midpoint-radius rule.
_COPYING = {"reshape", "transpose", "squeeze", "expand_dims", "slice", "dynamic_slice",
            "convert_element_type", "rev", "neg", "mul", "div", "add", "sub", "pad", "select_n"}
_MIXING = {"dot_general", "conv_general_dilated", "reduce_sum", "reduce_window_sum", "cumsum"}


@dataclasses.dataclass
class Node:
    """One bounded equation. ``ins``: ``('b', var)`` bounded, ``('c', const index)`` constant or
    ``('z', shape, dtype)`` zeros (an additive constant removed from the linear part)."""
    kind: str
    prim: Any
    params: dict
    ins: tuple
    outs: tuple
    extra: dict = dataclasses.field(default_factory=dict)

    def bounded(self):
        return [r[1] for r in self.ins if r[0] == "b"]


@dataclasses.dataclass
class Graph:
    nodes: list
    consts: list            # arrays, passed to the jitted programs as arguments
    shapes: dict            # var -> shape (batch-1 shapes)
    input: int
    output: int
    needs_bounds: set       # vars whose bounds feed a relaxation
    exact: set              # vars whose interval (midpoint-radius) bounds are exact
    images: set = dataclasses.field(default_factory=set)  # vars left to their intervals (`_monotone_images`)

    def shape(self, v):
        return self.shapes[v]

    def producer_index(self, v) -> int:
        """Index of the node that outputs var ``v``."""
        return next(i for i, n in enumerate(self.nodes) if v in n.outs)


class _Builder:
    def __init__(self):
        self.consts, self.nodes, self.shapes = [], [], {}
        self.producer = {}           # bounded var -> node
        self.preds = {}              # boolean var -> (cmp, x var, constant)
        self.counter = itertools.count()
        self.const_ids = {}

    def const(self, value):
        key = id(value)
        if key in self.const_ids and self.consts[self.const_ids[key]] is value:
            return self.const_ids[key]
        self.consts.append(value)
        self.const_ids[key] = len(self.consts) - 1
        return len(self.consts) - 1

    def new_var(self, shape):
        v = next(self.counter)
        self.shapes[v] = tuple(shape)
        return v

    # ------------------------------------------------------------------ tracing
    def run(self, jaxpr, consts, args, scope=""):
        """Interpret ``jaxpr``; ``scope``: the name stack of the call it is inlined from (for messages)."""
        env = {}

        def read(a):
            if isinstance(a, jcore.Literal):
                return ("c", jnp.asarray(a.val, dtype=a.aval.dtype))
            return env[a]

        for var, c in zip(jaxpr.constvars, consts):
            env[var] = ("c", c)
        for var, a in zip(jaxpr.invars, args):
            env[var] = a
        for eqn in jaxpr.eqns:
            ins = [read(a) for a in eqn.invars]
            name = eqn.primitive.name
            if name in CALLS:
                sub, sub_consts = _sub_jaxpr(eqn)
                outs = self.run(sub, sub_consts, ins, _scope(scope, eqn))
            elif all(t == "c" for t, _ in ins):
                vals = eqn.primitive.bind(*[v for _, v in ins], **eqn.params)
                outs = [("c", v) for v in (vals if eqn.primitive.multiple_results else [vals])]
            else:
                try:
                    outs = self.bounded_eqn(eqn, ins)
                except UnsupportedOpError as e:
                    where = _scope(scope, eqn)
                    if not where:
                        raise
                    raise UnsupportedOpError(f"{where}: {e}") from None
            for var, o in zip(eqn.outvars, outs):
                if not isinstance(var, jcore.DropVar):
                    env[var] = o
        return [read(a) for a in jaxpr.outvars]

    def bounded_eqn(self, eqn, ins):
        name, params = eqn.primitive.name, eqn.params
        shapes = [tuple(v.aval.shape) for v in eqn.outvars]
        bpos = [i for i, (t, _) in enumerate(ins) if t == "b"]
        if any(t == "p" for t, _ in ins):
            return self.select_pattern(eqn, ins, shapes)
        if any(not jnp.issubdtype(eqn.invars[i].aval.dtype, jnp.floating) for i in bpos):
            raise UnsupportedOpError(f"primitive '{name}' on a non-float input-dependent value")
        if name in ALIAS:
            return ins[:1] if len(ins) == 1 else ins
        if name in COMPARE and len(bpos) == 1:
            v = self.new_var(shapes[0])
            other = ins[1 - bpos[0]][1]
            cmp = name if bpos[0] == 0 else {"ge": "le", "gt": "lt", "le": "ge", "lt": "gt"}[name]
            self.preds[v] = (cmp, ins[bpos[0]][1], other)
            return [("p", v)]
        if not all(jnp.issubdtype(v.aval.dtype, jnp.floating) for v in eqn.outvars):
            raise UnsupportedOpError(f"primitive '{name}' with a non-float input-dependent output")
        if name in ("max", "min") and len(bpos) == 1:
            node = self.max_const(name, ins, bpos[0], shapes[0])
        elif name in ("max", "min"):
            node = self.max_bounded(eqn, ins, shapes[0])
        elif ((name in MULTIPLICATIVE and len(bpos) == 1 and not (name == "div" and bpos[0] == 1))
              or (name in STRUCTURAL and not (name == "select_n" and 0 in bpos))):
            node = self.linear(eqn, ins, bpos)
        elif name == "mul":
            node = Node("mul2", eqn.primitive, params, self.refs(ins), ())
        elif name in ("logistic", "tanh"):
            node = Node("sshape", eqn.primitive, params, self.refs(ins), (), {"fn": name})
        elif name == "reduce_window_max":
            node = Node("maxpool", eqn.primitive, params, self.refs(ins), ())
            node.extra["idx"] = _window_index(self.shapes[ins[0][1]], shapes[0], params)
        elif name in MONOTONE:
            node = Node("monotone", eqn.primitive, params, self.refs(ins), ())
        elif name == "abs":
            node = Node("abs", eqn.primitive, params, self.refs(ins), ())
        elif name in ("integer_pow", "square") and params.get("y", 2) > 0:
            node = Node("pow", eqn.primitive, params, self.refs(ins), (), {"y": params.get("y", 2)})
        else:
            raise UnsupportedOpError(f"primitive '{name}' is not supported by bound propagation "
                                     f"(input-dependent operands at positions {bpos})")
        node.outs = tuple(self.new_var(s) for s in shapes)
        self.nodes.append(node)
        for v in node.outs:
            self.producer[v] = node
        return [("b", v) for v in node.outs]

    def refs(self, ins):
        return tuple(("b", v) if t == "b" else ("c", self.const(v)) for t, v in ins)

    def linear(self, eqn, ins, bpos):
        name = eqn.primitive.name
        add = ADDITIVE.get(name, ())
        additive = [i for i in range(len(ins)) if ins[i][0] == "c" and (
            add == "all" or (add == "rest" and i >= 1) or (isinstance(add, tuple) and i in add))]
        refs = list(self.refs(ins))
        extra = {}
        if additive:
            zero_args = [jnp.zeros(v.aval.shape, v.aval.dtype) if t == "b" else val
                         for (t, val), v in zip(ins, eqn.invars)]
            off = eqn.primitive.bind(*zero_args, **eqn.params)
            off = list(off) if eqn.primitive.multiple_results else [off]
            extra["offset"] = [self.const(o) if np.any(np.asarray(o) != 0) else None for o in off]
            for i in additive:
                refs[i] = ("z", tuple(eqn.invars[i].aval.shape), eqn.invars[i].aval.dtype)
        if name in MULTIPLICATIVE:
            ci = next(i for i, (t, _) in enumerate(ins) if t == "c")
            extra["abs"] = {ci: self.const(jnp.abs(ins[ci][1]))}
        params = eqn.params
        if "precision" in params:   # products of a proof at full float32 precision (GPUs default to TF32)
            params = dict(params, precision=(lax.Precision.HIGHEST, lax.Precision.HIGHEST))
        return Node("linear", eqn.primitive, params, tuple(refs), (), extra)

    def max_const(self, name, ins, b, shape):
        """``max/min(x, c)`` with a constant ``c``: a kink at ``c`` with value ``c``."""
        c = jnp.broadcast_to(ins[1 - b][1], shape)
        an, ap = (0.0, 1.0) if name == "max" else (1.0, 0.0)
        return self.pwl_node(ins[b][1], c, c, an, ap)

    def max_bounded(self, eqn, ins, shape):
        """``max/min(x, y)``: leaky ReLU when ``y = s * x`` (or vice versa), else a general max."""
        is_max = eqn.primitive.name == "max"
        (_, x), (_, y) = ins
        for a, b in ((x, y), (y, x)):
            s = self.slope(b, a)
            if s is not None:
                lo, hi = jnp.minimum(1.0, s), jnp.maximum(1.0, s)
                return self.pwl_node(a, 0.0, 0.0, lo if is_max else hi, hi if is_max else lo)
        node = Node("max2", eqn.primitive, eqn.params, self.refs(ins), (), {"sign": 1.0 if is_max else -1.0})
        if not (shape == self.shapes[x] == self.shapes[y]):
            node.kind = "monotone"
        return node

    def slope(self, ref, x):
        """``s`` when bounded var ``ref`` is ``s * x`` for a constant ``s`` (``x`` itself: 1), else None."""
        if ref == x:
            return jnp.float32(1.0)
        node = self.producer.get(ref)
        if node is None or node.kind != "linear" or node.prim.name != "mul" or node.bounded() != [x]:
            return None
        return next(self.consts[r[1]] for r in node.ins if r[0] == "c")

    def select_pattern(self, eqn, ins, shapes):
        """``select_n(x <> 0, ...)`` whose cases are multiples of ``x``: a two-slope function of ``x``."""
        name = eqn.primitive.name
        err = UnsupportedOpError(f"primitive '{name}' on a comparison of input-dependent values "
                                 "(only where(x >= 0, x, a*x)-style activations are supported)")
        if name != "select_n" or len(ins) != 3 or ins[0][0] != "p":
            raise err
        cmp, x, other = self.preds[ins[0][1]]
        if np.any(np.asarray(other) != 0):
            raise err
        slopes = []
        for t, v in ins[1:]:
            if t == "c":
                s = jnp.float32(0.0) if not np.any(np.asarray(v) != 0) else None
            else:
                s = self.slope(v, x) if t == "b" else None
            if s is None:
                raise err
            slopes.append(s)
        an, ap = slopes if cmp in ("ge", "gt") else slopes[::-1]
        node = self.pwl_node(x, 0.0, 0.0, an, ap)
        node.outs = (self.new_var(shapes[0]),)
        self.nodes.append(node)
        self.producer[node.outs[0]] = node
        return [("b", node.outs[0])]

    def pwl_node(self, x, k, v, an, ap):
        ids = {key: self.const(jnp.asarray(val, jnp.float32)) for key, val in
               (("k", k), ("v", v), ("an", an), ("ap", ap))}
        return Node("pwl", None, {}, (("b", x),), (), ids)


def build_graph(fn, in_shape, dtype=jnp.float32) -> Graph:
    """Trace ``fn: (1, *in_shape) -> (1, *out)`` and return its bounded graph (see module doc)."""
    with jax.ensure_compile_time_eval():
        closed = jax.make_jaxpr(fn)(jax.ShapeDtypeStruct((1, *in_shape), dtype))
        b = _Builder()
        x = b.new_var((1, *in_shape))
        outs = b.run(closed.jaxpr, closed.consts, [("b", x)])
    if len(outs) != 1:
        raise UnsupportedOpError(f"the network function must return one array, got {len(outs)} outputs")
    kind, out = outs[0]
    if kind != "b":
        out_shape = tuple(np.shape(out))
        node = Node("constant", None, {}, (("c", b.const(jnp.asarray(out, dtype))),), (b.new_var(out_shape),))
        b.nodes.append(node)
        out = node.outs[0]
    nodes = _dead_code_elimination(b.nodes, out)
    needs = {r[1] for n in nodes if n.kind not in ("linear", "constant") for r in n.ins if r[0] == "b"}
    return Graph(nodes, b.consts, b.shapes, x, out, needs, _exact_vars(nodes, x, b.shapes, b.consts),
                 _monotone_images(nodes, b.consts))


def _dead_code_elimination(nodes, out):
    live, kept = {out}, []
    for n in reversed(nodes):
        if live.intersection(n.outs):
            kept.append(n)
            live.update(n.bounded())
    return kept[::-1]


def _exact_vars(nodes, x, shapes, consts):
    """Vars whose midpoint-radius interval is exact: ``x``, injective scalings/copies of it ("C"), or
    one summing map of those followed by copies/scalings ("A"); and the elementwise ReLU-like, sigmoid or
    tanh image of such a var, or copies of that ("E": exact per unit, as the interval rules of these units
    are, but not through any further sum)."""
    state = {x: "C"}
    for n in nodes:
        b = n.bounded()
        if len(b) != 1 or b[0] not in state or len(n.outs) != 1:
            continue
        if n.kind in ("pwl", "sshape"):
            state[n.outs[0]] = "E"
            continue
        if n.kind != "linear":
            continue
        s, name = state[b[0]], n.prim.name
        if s == "E":
            if name in ("reshape", "squeeze", "expand_dims", "transpose", "convert_element_type"):
                state[n.outs[0]] = "E"
            continue
        same_size = int(np.prod(shapes[n.outs[0]])) == int(np.prod(shapes[b[0]]))
        if name in _MIXING and _fan_in(n, shapes, consts) == 1:
            name = "mul"
        if name in _COPYING and same_size:
            state[n.outs[0]] = s
        elif name in _COPYING or name in ("gather", "broadcast_in_dim", "tile") or (name in _MIXING and s == "C"):
            state[n.outs[0]] = "A"
    return set(state)


def _monotone_images(nodes, consts):
    """Outputs of nondecreasing elementwise units (ReLU-like with both slopes >= 0, sigmoid, tanh) and of
    max-pooling. Given its input's bounds ``[l, u]`` such an output's interval ``[f(l), f(u)]`` is exact, and
    no CROWN bound of it is tighter when ``[l, u]`` are CROWN bounds: a relaxation's upper line is
    nondecreasing and lies above ``f(u)`` at ``u`` (likewise below). So these vars get no CROWN rows (a
    pooled conv layer's ``2 x units`` rows back to the input), and a kink feeding one gets CROWN rows for
    all its units, stable ones included (`_walk._refine_var`)."""
    out = set()
    for n in nodes:
        if n.kind == "pwl":
            slopes = [consts[n.extra[k]] for k in ("an", "ap")]   # traced slopes: not known to be >= 0
            if any(isinstance(a, jax.core.Tracer) or np.any(np.asarray(a) < 0) for a in slopes):
                continue
        elif n.kind not in ("sshape", "maxpool"):
            continue
        out.update(n.outs)
    return out


def _fan_in(node, shapes, consts):
    """Number of input entries each output entry of a summing linear node depends on (upper bound)."""
    name, p = node.prim.name, node.params
    pos = next(i for i, r in enumerate(node.ins) if r[0] == "b")
    if name == "dot_general":
        contract = p["dimension_numbers"][0][pos]
        return int(np.prod([shapes[node.ins[pos][1]][d] for d in contract]))
    if name == "conv_general_dilated" and pos == 0:
        w = np.shape(consts[node.ins[1][1]])
        return int(np.prod(w)) // w[p["dimension_numbers"].rhs_spec[0]]
    if name == "reduce_window_sum":
        return int(np.prod(p["window_dimensions"]))
    if name == "reduce_sum":
        return int(np.prod([shapes[node.ins[0][1]][d] for d in p["axes"]]))
    return 2


def _window_index(in_shape, out_shape, params):
    """Flat input index of every (output, window offset) of a ``reduce_window``; padding -> ``size``.

    Returns an int32 array ``(prod(out_shape), prod(window))``.
    """
    win, strides = params["window_dimensions"], params["window_strides"]
    pads, bdil, wdil = params["padding"], params["base_dilation"], params["window_dilation"]
    size = int(np.prod(in_shape))
    grids = np.meshgrid(*[np.arange(o) for o in out_shape], indexing="ij")
    offs = np.meshgrid(*[np.arange(w) for w in win], indexing="ij")
    valid = np.ones((int(np.prod(out_shape)), int(np.prod(win))), bool)
    flat = np.zeros_like(valid, dtype=np.int64)
    for d in range(len(in_shape)):
        pos = grids[d].reshape(-1, 1) * strides[d] + offs[d].reshape(1, -1) * wdil[d] - pads[d][0]
        valid &= (pos >= 0) & (pos % bdil[d] == 0) & (pos // bdil[d] < in_shape[d])
        flat = flat * in_shape[d] + np.clip(pos // bdil[d], 0, in_shape[d] - 1)
    return np.where(valid, flat, size).astype(np.int32)


def _scope(outer: str, eqn) -> str:
    """The name stack of ``eqn`` below ``outer`` (``jax.named_scope`` names: ONNX nodes, Flax modules)."""
    inner = str(getattr(eqn.source_info, "name_stack", "") or "")
    return "/".join(p for p in (outer, inner) if p)


def _sub_jaxpr(eqn):
    for key in ("jaxpr", "call_jaxpr", "fun_jaxpr"):
        j = eqn.params.get(key)
        if j is None:
            continue
        if isinstance(j, jcore.ClosedJaxpr):
            return j.jaxpr, j.consts
        if isinstance(j, jcore.Jaxpr):
            return j, []
    raise UnsupportedOpError(f"call primitive '{eqn.primitive.name}' without a readable sub-jaxpr")
