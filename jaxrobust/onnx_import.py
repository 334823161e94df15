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

This module parses the graph and interprets it; the per-op handlers live in `jaxrobust._onnx_ops` (elementwise,
matrix-product and shape ops) and `jaxrobust._onnx_layer_ops` (convolution, pooling, reductions, normalisation,
padding).
"""
from __future__ import annotations

import hashlib
import math
from collections import Counter
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from . import _onnx_layer_ops, _onnx_ops
from ._onnx_ops import NeedVmap, Node, Unsupported, float32_if_float, is_static
from .errors import FileFormatError, InputError, UnsupportedOpError
from .network import Network

__all__ = ["KNOWN_NORMALIZATION", "SUPPORTED_OPS", "load_onnx", "onnx_summary"]

#: Normalisation applied outside the graph by known public networks, keyed by file stem.
#: The oval21 CIFAR-10 networks expect ``(x - mean) / std`` of [0, 1] pixels.
KNOWN_NORMALIZATION: dict[str, dict[str, tuple[float, ...]]] = {
    stem: {"mean": (0.485, 0.456, 0.406), "std": (0.225,)}
    for stem in ("cifar_base_kw", "cifar_deep_kw", "cifar_wide_kw")
}

_OPS = {**_onnx_ops.OPS, **_onnx_layer_ops.OPS}  # ONNX op name -> (handler, handles static inputs)
SUPPORTED_OPS = frozenset(_OPS)


class _Graph(NamedTuple):
    nodes: tuple[Node, ...]
    consts: dict[str, np.ndarray]   # static tensors (non-float initializers)
    input_names: tuple[str, ...]    # the graph inputs, in order
    input_shapes: tuple[tuple, ...]  # their shapes per example (ints)
    has_batch: bool                 # every input's leading declared dim is the batch axis
    output_name: str
    opset: int


# ----------------------------------------------------------------------------------------------
# interpreter
# ----------------------------------------------------------------------------------------------
def _eval_node(node: Node, ins: list, bat: list[bool], opset: int) -> tuple:
    fn, handles_static = _OPS[node.op]
    try:
        if not handles_static and ins and all(v is None or is_static(v) for v in ins):
            with jax.ensure_compile_time_eval():
                out = fn(node, ins, bat, opset)
            out = tuple(float32_if_float(np.asarray(o)) for o in (out if isinstance(out, tuple) else (out,)))
        else:
            out = fn(node, ins, bat, opset)
    except (NeedVmap, UnsupportedOpError, FileFormatError):
        raise
    except Unsupported as e:
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
                if any(bat) and not is_static(value):
                    in_batch.add(name)
    y = env[g.output_name]
    if batched and g.output_name not in in_batch:
        raise NeedVmap
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
        nodes.append(Node(n.op_type, label, tuple(n.input), tuple(n.output), attrs))

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
            except NeedVmap:
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
