"""A feed-forward ReLU network as a chain of dense affine maps, for complete verification.

``relu_chain(fn, in_shape)`` interprets the traced graph of ``fn`` (see `_graph`): every ReLU must
be fed by an affine function of the previous ReLU layer (or of the input) alone, which holds for
MLPs and for CNNs built from convolutions, average pooling, flattening and normalisation. The
affine segments (convolutions included) are materialised as dense matrices by differentiating
them, so branch and bound and the MILP encoding see one uniform structure::

    z_1 = W_1 x + b_1,  a_i = relu(z_i),  z_{i+1} = W_{i+1} a_i + b_{i+1},  out = z_L

Networks with skip connections, max-pooling or other activations raise `UnsupportedOpError`.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ..errors import UnsupportedOpError
from ._graph import Graph, build_graph
from ._walk import _bind


class ReluChain(NamedTuple):
    """Dense chain: ``weights[i]: (n_{i+1}, n_i)``, ``biases[i]: (n_{i+1},)``; ReLU between consecutive maps."""
    weights: tuple
    biases: tuple

    @property
    def widths(self) -> tuple:
        """``(n_0, n_1, ..., n_L)``: input size, hidden layer sizes, number of outputs."""
        return (self.weights[0].shape[1],) + tuple(w.shape[0] for w in self.weights)


def forward(chain: ReluChain, x):
    """Logits ``(B, n_L)`` of flattened inputs ``x: (B, n_0)``."""
    a = x
    for i, (w, b) in enumerate(zip(chain.weights, chain.biases)):
        a = a @ w.T + b
        if i < len(chain.weights) - 1:
            a = jnp.maximum(a, 0.0)
    return a


def pre_activations(chain: ReluChain, x):
    """Hidden pre-activations ``[z_1, ..., z_{L-1}]``, each ``(B, n_i)``, of flattened inputs ``x: (B, n_0)``."""
    out, a = [], x
    for w, b in zip(chain.weights[:-1], chain.biases[:-1]):
        z = a @ w.T + b
        out.append(z)
        a = jnp.maximum(z, 0.0)
    return out


def relu_chain(fn, in_shape, dtype=jnp.float32) -> ReluChain:
    """Extract the dense chain of ``fn: (1, *in_shape) -> (1, C)`` (see module doc)."""
    g = build_graph(lambda x: fn(x), tuple(in_shape), dtype)
    consts = [jnp.asarray(c) for c in g.consts]
    anchors = [g.input]
    for node in g.nodes:
        if node.kind == "linear":
            continue
        if node.kind != "pwl" or not _is_relu(node, consts):
            what = node.prim.name if node.prim is not None else node.kind
            raise UnsupportedOpError(f"branch and bound supports feed-forward ReLU networks; found '{what}'")
        anchors.append(node)
    weights, biases = [], []
    src = g.input
    for node in anchors[1:] + [None]:
        dst = g.output if node is None else node.bounded()[0]
        w, b = _affine(g, consts, src, dst)
        weights.append(w)
        biases.append(b)
        if node is not None:
            src = node.outs[0]
    return ReluChain(tuple(weights), tuple(biases))


def _is_relu(node, consts) -> bool:
    vals = [np.asarray(consts[node.extra[k]]) for k in ("k", "v", "an", "ap")]
    return all(np.all(v == t) for v, t in zip(vals, (0.0, 0.0, 0.0, 1.0)))


def _affine(g: Graph, consts, src, dst):
    """Dense ``(W, b)`` of the linear nodes mapping var ``src`` to var ``dst`` (flattened)."""
    src_shape, n_in = g.shape(src), math.prod(g.shape(src))

    def seg(v):
        env = {src: v.reshape(src_shape)}
        for node in g.nodes:
            if node.kind != "linear" or not node.bounded() or not all(b in env for b in node.bounded()):
                continue
            if any(o in env for o in node.outs):
                continue
            outs = _bind(node, consts, [env[b] for b in node.bounded()])
            offsets = node.extra.get("offset", [None] * len(outs))
            for o, val, off in zip(node.outs, outs, offsets):
                env[o] = val if off is None else val + consts[off]
            if dst in env:
                break
        if dst not in env:
            raise UnsupportedOpError("branch and bound supports feed-forward ReLU networks "
                                     "(a layer depends on more than the previous layer)")
        return env[dst].reshape(-1)

    zero = jnp.zeros((n_in,), jnp.float32)
    b = seg(zero)
    w = jax.jacfwd(seg)(zero)
    return w, b
