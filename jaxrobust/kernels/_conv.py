"""Fast transpose of a strided convolution applied to many coefficient rows.

``jax.linear_transpose`` of a strided convolution is a convolution of the zero-dilated cotangent,
which XLA's CPU backend runs far below peak (wasted multiplications by the inserted zeros and very
few output channels). Here one GEMM over the output channels produces every (tap, phase, input
channel) product at once; the ``ceil(K/s)^d`` taps of each output phase are then added with
shifted pads (sub-pixel decomposition) and the phases interleaved (depth-to-space), then cropped.

For one spatial dim with stride ``s``, kernel ``K``, low padding ``p``:
``x_bar[i] = sum_j y_bar[q - j] W[j s + r]`` where ``i + p = q s + r`` (``0 <= r < s``), ``0 <= j < ceil(K/s)``.
"""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np


def supported(params) -> bool:
    """Whether the fast path applies (input bounded, no dilation, no groups, non-negative low padding)."""
    return (all(d == 1 for d in params["lhs_dilation"]) and all(d == 1 for d in params["rhs_dilation"])
            and params["feature_group_count"] == 1 and params["batch_group_count"] == 1
            and all(lo >= 0 for lo, _ in params["padding"]))


def transpose(lam, w, params, in_shape):
    """Cotangents ``(R, *in_shape)`` of the convolution input for ``lam: (R, *out_shape)``, kernel ``w``."""
    dn = params["dimension_numbers"]
    strides = tuple(params["window_strides"])
    nd = len(strides)
    R = lam.shape[0]
    # canonical layouts: lam -> (R*N, *O, C_out), w -> (C_out, C_in, *K)
    lam = jnp.transpose(lam, (0, 1 + dn.out_spec[0]) + tuple(1 + d for d in dn.out_spec[2:]) + (1 + dn.out_spec[1],))
    N, out_sp, c_out = lam.shape[1], lam.shape[2:-1], lam.shape[-1]
    lam = lam.reshape((R * N,) + out_sp + (c_out,))
    w = jnp.transpose(w, dn.rhs_spec)
    c_in, ksz = w.shape[1], w.shape[2:]
    kmax = tuple(-(-k // s) for k, s in zip(ksz, strides))
    # tap (j, r) of each dim holds W[j s + r] (zero beyond K): one GEMM over C_out for all taps
    w = jnp.pad(w, [(0, 0), (0, 0)] + [(0, km * s - k) for km, s, k in zip(kmax, strides, ksz)])
    w = w.reshape((c_out, c_in) + tuple(x for km, s in zip(kmax, strides) for x in (km, s)))
    perm = [0] + [2 + 2 * d for d in range(nd)] + [3 + 2 * d for d in range(nd)] + [1]
    w = jnp.transpose(w, perm)                                # (C_out, *kmax, *s, C_in)
    t = jnp.dot(lam, w.reshape(c_out, -1), precision=params.get("precision"))
    t = t.reshape((R * N,) + out_sp + kmax + strides + (c_in,))
    # phase r: z_r[q] = sum_j t[q - j, j, r]
    z = 0
    for j in np.ndindex(*kmax):
        tj = t[(slice(None),) * (1 + nd) + j]
        z = z + jnp.pad(tj, [(0, 0)] + [(a, km - 1 - a) for a, km in zip(j, kmax)] + [(0, 0)] * (nd + 1))
    q = z.shape[1:1 + nd]
    # (RN, *q, *r, C_in) -> (RN, q1, r1, q2, r2, ..., C_in) -> (RN, *(q s), C_in)
    perm = [0] + [x for d in range(nd) for x in (1 + d, 1 + nd + d)] + [1 + 2 * nd]
    z = jnp.transpose(z, perm).reshape((R * N,) + tuple(a * s for a, s in zip(q, strides)) + (c_in,))
    in_sp = tuple(in_shape[d] for d in dn.lhs_spec[2:])
    extra = [max(0, lo + size - full) for (lo, _), size, full in zip(params["padding"], in_sp, z.shape[1:-1])]
    z = jnp.pad(z, [(0, 0)] + [(0, e) for e in extra] + [(0, 0)])
    z = z[(slice(None),) + tuple(slice(lo, lo + size) for (lo, _), size in zip(params["padding"], in_sp))]
    z = z.reshape((R, N) + in_sp + (c_in,))
    # canonical (R, N, *I, C_in) -> the input's own layout
    canon = (dn.lhs_spec[0],) + tuple(dn.lhs_spec[2:]) + (dn.lhs_spec[1],)
    inv = np.argsort((0,) + tuple(1 + d for d in canon))
    return jnp.transpose(z, tuple(inv))
