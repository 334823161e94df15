"""Exact LP leaves of branch and bound: the affine forms of a subdomain whose ReLUs are all fixed are composed in
float64, and the LP minimum is certified by weak duality, so margins far below the float32 round-off margin
are decided (mnist-net_256x2 image 30 at its published certified ε was left undecided before)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.optimize import linprog

from jaxrobust.box_search import _dual_bound, _lp_leaf
from jaxrobust.kernels.bab import Brancher
from jaxrobust.kernels.bounds import MARGIN_REL
from jaxrobust.network import from_function
from jaxrobust.verdict import ROBUST, VIOLATED

WIDTHS = (12, 16, 16, 4)


def mlp(seed=0):
    keys = jax.random.split(jax.random.PRNGKey(seed), 2 * len(WIDTHS))
    ws = [jax.random.normal(keys[2 * i], (a, b)) / np.sqrt(a) for i, (a, b) in enumerate(zip(WIDTHS, WIDTHS[1:]))]
    bs = [0.1 * jax.random.normal(keys[2 * i + 1], (b,)) for i, b in enumerate(WIDTHS[1:])]

    def apply(p, x):
        for i, (w, b) in enumerate(zip(*p)):
            x = x @ w + b
            if i < len(WIDTHS) - 2:
                x = jax.nn.relu(x)
        return x
    net = from_function(apply, (ws, bs), (WIDTHS[0],), WIDTHS[-1], domain=(-np.inf, np.inf))
    return net, [np.asarray(w, np.float64) for w in ws], [np.asarray(b, np.float64) for b in bs]


def pattern(ws, bs, x):
    """Signs ``(H,)`` of the hidden pre-activations at ``x`` and the exact float64 forms ``[(A, a)]`` of every
    hidden layer and of the output under that pattern."""
    M, m, signs, forms = np.eye(len(x)), np.zeros(len(x)), [], []
    for i, (w, b) in enumerate(zip(ws, bs)):
        M, m = w.T @ M, w.T @ m + b
        forms.append((M, m))
        if i < len(ws) - 1:
            on = M @ x + m >= 0
            signs.append(np.where(on, 1, -1))
            M, m = M * on[:, None], m * on
    return np.concatenate(signs).astype(np.int8), forms


def leaf_setup(seed=0, radius=0.3):
    net, ws, bs = mlp(seed)
    x = np.asarray(jax.random.normal(jax.random.PRNGKey(seed + 100), (WIDTHS[0],)), np.float64)
    s, forms = pattern(ws, bs, x)
    lo, hi = (jnp.asarray((x + r)[None], jnp.float32) for r in (-radius, radius))
    br = Brancher(net, net.input_shape)
    return br, br.root_bounds(lo, hi, 0), lo, hi, s, forms


def exact_minimum(forms, s, c, lo, hi):
    """``min c . out`` over the box and the pattern's constraints, from the test's own float64 forms."""
    rows, rhs, off = [], [], 0
    for A, a in forms[:-1]:
        sg = s[off:off + len(a)].astype(np.float64)
        rows.append(-sg[:, None] * A)
        rhs.append(sg * a)
        off += len(a)
    A_out, a_out = forms[-1]
    box = np.stack([np.asarray(lo, np.float64)[0], np.asarray(hi, np.float64)[0]], 1)
    res = linprog(c @ A_out, A_ub=np.concatenate(rows), b_ub=np.concatenate(rhs), bounds=box, method="highs")
    assert res.status == 0
    return res.fun + c @ a_out, np.abs(c @ A_out) @ np.abs(box).max(1) + abs(c @ a_out)


def test_leaf_forms_are_float64_exact():
    """The forms agree with a float64 numpy composition to ~1e-15 relative; the float32 program's err by ~1e-7,
    which is what the check would see if the leaf ran in float32."""
    br, root, lo, hi, s, forms = leaf_setup()
    units, (A_out, a_out) = br.leaf(root, lo, hi, s)
    assert A_out.dtype == np.float64
    for (A, a), (M, m) in zip(units + [(A_out, a_out)], forms):
        assert np.abs(A - M).max() <= 1e-12 * np.abs(M).max()
        assert np.abs(a - m).max() <= 1e-12 * max(np.abs(m).max(), 1.0)
    _, (A32, _) = br._leaf(br.consts, root, lo, hi, jnp.asarray(s))
    assert np.abs(np.asarray(A32, np.float64) - forms[-1][0]).max() > 1e-12 * np.abs(forms[-1][0]).max()


@pytest.mark.parametrize("seed", range(5))
def test_dual_bound_is_sound_for_any_multipliers_and_tight_for_the_solvers(seed):
    rng = np.random.default_rng(seed)
    n, m = 8, 12
    A, obj = rng.normal(size=(m, n)), rng.normal(size=n)
    b = A @ rng.uniform(-0.5, 0.5, n) + rng.uniform(0.0, 0.5, m)      # feasible
    lo, hi = -np.ones(n), np.ones(n)
    res = linprog(obj, A_ub=A, b_ub=b, bounds=np.stack([lo, hi], 1), method="highs")
    assert res.status == 0
    scale = np.abs(obj).sum() + np.abs(b).sum()
    tight = _dual_bound(obj, A, b, lo, hi, res)
    assert res.fun - 1e-9 * scale <= tight <= res.fun + 1e-12 * scale
    for _ in range(20):     # any multipliers y >= 0 (here random, some of the wrong sign) give a lower bound
        res.ineqlin.marginals = rng.normal(size=m) * rng.uniform(0, 3)
        assert _dual_bound(obj, A, b, lo, hi, res) <= res.fun + 1e-12 * scale


@pytest.mark.parametrize("seed", range(3))
def test_leaf_decides_margins_far_below_the_float32_round_off_margin(seed):
    """With ``d`` a hair (1e-6 of the objective's scale, a tenth of the float32 margin) below the exact minimum of
    ``c . out`` over the leaf, the leaf is ROBUST; a hair above it, never ROBUST."""
    br, root, lo, hi, s, forms = leaf_setup(seed)
    for t in range(1, WIDTHS[-1]):
        c = np.zeros(WIDTHS[-1])
        c[0], c[t] = 1.0, -1.0
        low, scale = exact_minimum(forms, s, c, lo, hi)
        hair = 0.1 * MARGIN_REL * scale
        assert _lp_leaf(br, root, lo, hi, s, c, low - hair)[0] == ROBUST
        verdict, pts = _lp_leaf(br, root, lo, hi, s, c, low + hair)
        assert verdict != ROBUST
        if verdict == VIOLATED:     # its candidates lie in the box
            assert np.all(pts >= np.asarray(lo)) and np.all(pts <= np.asarray(hi))
