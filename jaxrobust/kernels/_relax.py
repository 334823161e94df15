"""Sound linear relaxations ``a_l x + b_l <= f(x) <= a_u x + b_u`` on ``x in [l, u]`` (elementwise).

Every function returns ``(a_l, b_l, a_u, b_u)`` broadcastable to the shape of ``l``.
"""
from __future__ import annotations

import jax.numpy as jnp
from jax import lax

# Slack added to the intercepts of the sigmoid/tanh lines: covers the float32 error of evaluating the
# function at the touching points (values are O(1); the error is a few ulp ~ 1e-7).
S_SLACK = 1e-6


def pwl(k, v, an, ap, l, u, theta=None):
    """Relaxation of ``y = v + phi(x - k)``, ``phi(t) = ap*t (t >= 0), an*t (t < 0)``.

    On an unstable kink (``l < k < u``) one side is the chord, the other a line through the kink with
    slope ``an + theta*(ap - an)``, ``theta in [0, 1]`` (default: CROWN's adaptive choice
    ``theta = [u - k >= k - l]``). ``theta`` may carry extra leading dims (one slope per spec row).
    """
    lo_t, hi_t = l - k, u - k
    phi = lambda t: jnp.where(t >= 0, ap * t, an * t)
    unstable = (lo_t < 0) & (hi_t > 0)
    width = jnp.where(unstable, hi_t - lo_t, 1.0)
    chord = jnp.clip((phi(hi_t) - phi(lo_t)) / width, jnp.minimum(an, ap), jnp.maximum(an, ap))
    chord_b = phi(lo_t) - chord * lo_t
    if theta is None:
        theta = (hi_t >= -lo_t).astype(l.dtype)
    kink = an + theta * (ap - an)
    convex = an <= ap
    stable = jnp.where(lo_t >= 0, ap, an)
    a_l = jnp.where(unstable, jnp.where(convex, kink, chord), stable)
    a_u = jnp.where(unstable, jnp.where(convex, chord, kink), stable)
    b_l = jnp.where(unstable & ~convex, chord_b, 0.0)
    b_u = jnp.where(unstable & convex, chord_b, 0.0)
    return a_l, b_l + v - a_l * k, a_u, b_u + v - a_u * k


_S_FUNCS = {
    # f, f', f'(0), z_k: the z >= 0 with f'(z) = k
    "logistic": (lax.logistic, lambda z: lax.logistic(z) * lax.logistic(-z), 0.25,
                 lambda k: 2.0 * jnp.arctanh(jnp.sqrt(jnp.clip(1.0 - 4.0 * k, 0.0, 1.0)))),
    "tanh": (jnp.tanh, lambda z: 1.0 - jnp.tanh(z) ** 2, 1.0,
             lambda k: jnp.arctanh(jnp.sqrt(jnp.clip(1.0 - k, 0.0, 1.0)))),
}


def sshape(name, l, u, theta=None):
    """Relaxation of ``logistic`` or ``tanh`` (convex for x < 0, concave for x > 0).

    Slopes: by default the chord on the convex side of a one-signed interval and on both sides of a mixed
    one, the tangent at the midpoint on the other side; with ``theta = (t_l, t_u)`` (each in [0, 1],
    broadcastable to ``l``, extra leading dims allowed) the lower / upper slope ``k_min + t (k_max - k_min)``
    between the smallest and largest derivative on ``[l, u]`` (α-CROWN for S-shaped units; `sshape_theta`
    gives the default slopes' ``t``). For any slope ``k`` the intercept is the exact extremum of
    ``f(z) - k z`` over ``[l, u]``: its only critical points are ``+-z_k`` (``f'(z_k) = k``), so the
    extremum is attained at ``l``, ``u`` or ``clip(+-z_k, l, u)``; every slope gives a sound line.
    """
    f, df, d0, zk = _S_FUNCS[name]
    if theta is None:
        a_l, a_u = _sshape_slopes(name, l, u)
    else:
        k_min, k_max = _slope_range(name, l, u)
        a_l, a_u = (k_min + t * (k_max - k_min) for t in theta)

    def extremes(k):
        # the extremum's derivative in k is -(its point) (envelope theorem): no gradient through the points,
        # whose own derivative is infinite at k = 0 and k = f'(0)
        z = lax.stop_gradient(zk(k))
        pts = lax.stop_gradient(jnp.stack(jnp.broadcast_arrays(l, u, jnp.clip(z, l, u), jnp.clip(-z, l, u))))
        vals = f(pts) - k * pts
        return vals.min(0), vals.max(0)

    b_l = extremes(a_l)[0]
    b_u = extremes(a_u)[1]
    slack = S_SLACK * (1.0 + jnp.maximum(jnp.abs(l), jnp.abs(u)) * jnp.maximum(a_l, a_u))
    return a_l, b_l - slack, a_u, b_u + slack


def _sshape_slopes(name, l, u):
    """The default lower and upper slopes of `sshape`."""
    f, df, d0, _ = _S_FUNCS[name]
    m = 0.5 * (l + u)
    d = u - l
    chord = jnp.where(d > 1e-6, (f(u) - f(l)) / jnp.where(d > 1e-6, d, 1.0), df(m))
    a_u = jnp.clip(jnp.where(l >= 0, df(m), chord), 0.0, d0)
    a_l = jnp.clip(jnp.where(u <= 0, df(m), chord), 0.0, d0)
    return a_l, a_u


def _slope_range(name, l, u):
    """Smallest and largest derivative of the S-shaped function on ``[l, u]`` (its derivative peaks at 0)."""
    df = _S_FUNCS[name][1]
    return jnp.minimum(df(l), df(u)), df(jnp.clip(0.0, l, u))


def sshape_theta(name, l, u):
    """``(t_l, t_u)`` that make `sshape` use its default slopes on ``[l, u]``."""
    k_min, k_max = _slope_range(name, l, u)
    width = jnp.where(k_max > k_min, k_max - k_min, 1.0)
    return tuple(jnp.clip((a - k_min) / width, 0.0, 1.0) for a in _sshape_slopes(name, l, u))


def max2(lx, ux, ly, uy):
    """Relaxation of ``max(x, y)`` as selection coefficients.

    Lower: ``max >= x`` if ``lx >= ly`` else ``y``. Upper: the dominating operand when one dominates,
    else the constant ``max(ux, uy)``. Returns ``(px_l, py_l, px_u, py_u, c_u)``.
    """
    px_l = (lx >= ly).astype(lx.dtype)
    ex_x = lx >= uy
    ex_y = ~ex_x & (ly >= ux)
    c_u = jnp.where(ex_x | ex_y, 0.0, jnp.maximum(ux, uy))
    return px_l, 1.0 - px_l, ex_x.astype(lx.dtype), ex_y.astype(lx.dtype), c_u


def window_max(lw, uw):
    """Relaxation of a max over the last axis (pooling windows) ``lw, uw: (..., W)``.

    Returns ``(sel_l, sel_u, c_u)``: ``max >= sel_l . x`` and ``max <= sel_u . x + c_u``.
    """
    j = jnp.argmax(lw, axis=-1)
    sel_l = (jnp.arange(lw.shape[-1]) == j[..., None]).astype(lw.dtype)
    others = jnp.max(jnp.where(sel_l > 0, -jnp.inf, uw), axis=-1)
    exact = jnp.max(lw, axis=-1) >= others
    sel_u = sel_l * exact[..., None]
    c_u = jnp.where(exact, 0.0, jnp.max(uw, axis=-1))
    return sel_l, sel_u, c_u
