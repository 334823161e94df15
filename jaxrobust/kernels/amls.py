"""Adaptive multilevel splitting (AMLS; Webb, Rainforth, Teh & Kumar, ICLR 2019): ``P(score(X) > threshold)``
for ``X`` drawn from a perturbation distribution of `kernels.perturb`, with no model of the score's tail.

Per input, ``N`` particles are drawn from the perturbation distribution. Each level ``k`` sets
``L_k = min(q_k, threshold)``, ``q_k`` the score of the ``(round(ρN) + 1)``-th best particle, keeps the
particles with score ``> L_k`` (a fraction ``P_k``, about ρ), copies uniformly chosen survivors over
the others and moves every particle ``M`` times with Metropolis–Hastings moves that leave the
perturbation distribution restricted to ``{score > L_k}`` invariant. It ends at the level where
``L_k = threshold``: ``p̂ = Π_k P_k`` (levels ≈ log p / log ρ, forward passes ``N (1 + M (levels − 1))``).

Perturbations as maps of Gaussian latents ``z ~ N(0, I)`` (the same laws as `perturb.SAMPLERS`):

* ``"linf"``     ``lo + Φ(z) (hi − lo)`` on the box ``[x − eps, x + eps] ∩ domain`` (latent size d);
* ``"gaussian"`` ``clip(x + eps z)`` (latent size d);
* ``"l2"``       ``clip(x + eps Φ(z_d)^(1/d) g / |g|)``, ``g = z_{0..d-1}`` (latent size d + 1).

Latents and proposals come from `perturb.random_normal`: ``rng="hash"`` (default; a counter-based hash through
the inverse error function, |z| <= 5.3, several times cheaper) or ``"threefry"`` (`jax.random.normal`).

Moves: preconditioned Crank–Nicolson proposals ``z' = √(1 − β²) z + β ξ`` are reversible with respect to
``N(0, I)``, so for the restricted target the Metropolis–Hastings ratio is the indicator of
``score(z') > L_k``. The step ``β`` of each input adapts after every move toward an acceptance rate
of ``TARGET_ACCEPTANCE`` (over its N particles) and carries over to the next level.

Interval: ``log p̂ ± z_{(1+c)/2} σ`` with ``σ² = Σ_k (1 − P_k) / (P_k N)``, the asymptotic variance of
``log p̂`` for independent, perfectly mixed particles (Cérou & Guyader 2007); poorly mixed particles
(low acceptance, few moves) make the true spread wider. A run that reaches ``max_levels`` before the
threshold is flagged ``capped``: its ``log10_p`` is the estimate of ``P(score > L_last) ≥ p``, an
upper bound, and its interval is ``(-inf, upper]``.

Randomness: input ``b`` runs on the key ``fold_in(key, offset + b)`` (its global index), so a batch
gives each input's one-at-a-time result.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from functools import partial
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.scipy.special import ndtr, ndtri
from jax.tree_util import Partial

from ..errors import InputError
from .norms import l1_ball
from .perturb import RNGS, SAMPLERS, check_domain, check_eps, check_x, random_normal

TARGET_ACCEPTANCE = 0.25
BETA_INIT = 0.5
BETA_MIN = 1e-4


class AmlsConfig(NamedTuple):
    """Options; the defaults spread ``log10 p̂`` 3x less than the paper's N = 1000, M = 100 for the same forward
    passes on an MNIST MLP (``benchmarks/bench_amls.py``): the variance falls as 1/N, the cost grows as N·M."""
    particles: int = 10_000   # N
    rho: float = 0.1          # fraction of particles kept per level (the paper's quantile ρ)
    steps: int = 10           # M: Metropolis–Hastings moves of every particle per level
    max_levels: int = 50      # levels before a run stops, capped (its estimate then an upper bound)
    confidence: float = 0.95  # level of the interval
    rng: str = "hash"         # normal generator of the latents and proposals (`perturb.random_normal`)


class AmlsResult(NamedTuple):
    """Per-input arrays ``(B,)``, per-level ``(B, max_levels)`` (NaN past the last level)."""
    log10_p: jax.Array         # log10 p̂ (-inf when no particle passes the threshold; an upper bound if capped)
    log10_low: jax.Array       # interval (see the module docstring); -inf when capped
    log10_high: jax.Array      # NaN where log10_p is -inf
    levels: jax.Array          # int: levels computed, the last one included
    capped: jax.Array          # bool: stopped at max_levels below the threshold
    forward_passes: jax.Array  # int: score evaluations, N (1 + M (levels − 1))
    thresholds: jax.Array      # (B, max_levels): L_k
    acceptance: jax.Array      # (B, max_levels): mean acceptance rate of the moves at level k (NaN at the last)


# --- perturbations as maps of Gaussian latents: flat x (d,), latents z (N, D) -> samples (N, d) ----------------
def _clip(v, domain):
    return v if domain is None else jnp.clip(v, domain[0], domain[1])


def _linf(z, x, eps, domain):
    lo, hi = x - eps, x + eps
    if domain is not None:
        lo, hi = jnp.maximum(lo, domain[0]), jnp.minimum(hi, domain[1])
    return jnp.minimum(lo + ndtr(z) * jnp.maximum(hi - lo, 0), hi)


def _gaussian(z, x, sigma, domain):
    return _clip(x + sigma * z, domain)


def _l2(z, x, eps, domain):
    g = z[:, :-1]
    g = g / jnp.maximum(jnp.linalg.norm(g, axis=1, keepdims=True), jnp.finfo(z.dtype).tiny)
    r = eps * ndtr(z[:, -1:]) ** (1.0 / x.size)
    return _clip(x + r * g, domain)


def _l1(z, x, eps, domain):
    return _clip(x + eps * l1_ball(z), domain)


LATENT_MAPS: dict[str, tuple[Callable, int]] = {"linf": (_linf, 0), "gaussian": (_gaussian, 0), "l2": (_l2, 1),
                                                 "l1": (_l1, 1)}


def latent_size(sampler: str, input_size: int) -> int:
    """Latent dimension ``D`` of ``sampler`` for inputs of ``input_size`` coordinates."""
    return input_size + LATENT_MAPS[sampler][1]


def to_samples(sampler: str, z, x, eps, domain=None) -> jax.Array:
    """Perturbations ``(N, *x.shape)`` of one input ``x`` from latents ``z: (N, D)`` (``N(0, I)`` latents give
    the law of `perturb.SAMPLERS[sampler]`); ``domain`` as flat ``(lo, hi)`` or None."""
    fn = LATENT_MAPS[sampler][0]
    return fn(z, x.reshape(-1), eps, domain).reshape((z.shape[0],) + x.shape)


# --- Metropolis–Hastings moves at one level ---------------------------------------------------------------------
def constrained_moves(f, key, z, s, level, beta, steps: int, rng: str = "hash"):
    """``steps`` pCN Metropolis–Hastings moves of particles ``z: (N, D)`` with scores ``s = f(z): (N,)``, leaving
    ``N(0, I)`` restricted to ``{f > level}`` invariant; ``beta`` (scalar) adapts after each move; ``rng``:
    the proposals' normal generator. Returns ``(z, s, beta, mean acceptance rate)``."""
    def move(t, carry):
        z, s, beta, accepted = carry
        xi = random_normal(jax.random.fold_in(key, t), z.shape, z.dtype, rng)
        zp = jnp.sqrt(1 - beta ** 2) * z + beta * xi
        sp = f(zp)
        ok = sp > level
        rate = jnp.mean(ok)
        beta = jnp.clip(beta * jnp.exp(rate - TARGET_ACCEPTANCE), BETA_MIN, 1.0)
        return jnp.where(ok[:, None], zp, z), jnp.where(ok, sp, s), beta, accepted + rate

    z, s, beta, accepted = lax.fori_loop(0, steps, move, (z, s, beta, jnp.zeros((), z.dtype)))
    return z, s, beta, accepted / steps


# --- one input -------------------------------------------------------------------------------------------------
class _State(NamedTuple):
    key: jax.Array
    z: jax.Array
    s: jax.Array
    beta: jax.Array
    k: jax.Array
    log_p: jax.Array
    var: jax.Array     # Σ (1 − P_k) / P_k
    done: jax.Array
    capped: jax.Array
    thresholds: jax.Array
    acceptance: jax.Array


def _one(score, sampler, cfg: AmlsConfig, shape, key, x, eps, threshold, aux, domain):
    """AMLS for one input ``x: (d,)`` (flat) of ``shape``; returns the fields of `AmlsResult` but the interval."""
    n, keep = cfg.particles, _kept(cfg)
    f = lambda z: score(to_samples(sampler, z, x, eps, domain).reshape((n,) + shape), aux)
    key, k0 = jax.random.split(key)
    z = random_normal(k0, (n, latent_size(sampler, x.size)), x.dtype, cfg.rng)
    nan = jnp.full((cfg.max_levels,), jnp.nan, x.dtype)
    zero = jnp.zeros((), x.dtype)
    st = _State(key, z, f(z), jnp.asarray(BETA_INIT, x.dtype), jnp.zeros((), jnp.int32), zero, zero,
                jnp.zeros((), bool), jnp.zeros((), bool), nan, nan)

    def level(st: _State) -> _State:
        top, idx = lax.top_k(st.s, keep + 1)
        lk = jnp.minimum(top[keep], threshold)
        alive = st.s > lk
        m = jnp.sum(alive)
        frac = m / n
        final = (lk >= threshold) | (m == 0)
        capped = ~final & (st.k + 1 >= cfg.max_levels)
        key, kr, km = jax.random.split(st.key, 3)

        def split_and_move(_):
            pick = idx[jax.random.randint(kr, (n,), 0, jnp.maximum(m, 1))]  # survivors lead top_k's indices
            src = jnp.where(alive, jnp.arange(n), pick)
            return constrained_moves(f, km, st.z[src], st.s[src], lk, st.beta, cfg.steps, cfg.rng)

        z, s, beta, acc = lax.cond(final | capped, lambda _: (st.z, st.s, st.beta, jnp.full((), jnp.nan, x.dtype)),
                                   split_and_move, None)
        return _State(key, z, s, beta, st.k + 1, st.log_p + jnp.log(frac), st.var + (1 - frac) / frac,
                      final | capped, capped, st.thresholds.at[st.k].set(lk), st.acceptance.at[st.k].set(acc))

    st = lax.while_loop(lambda st: ~st.done, level, st)
    return st.log_p, st.var / n, st.k, st.capped, st.thresholds, st.acceptance


def _kept(cfg: AmlsConfig) -> int:
    return int(round(cfg.rho * cfg.particles))


@partial(jax.jit, static_argnames=("sampler", "cfg"))
def _amls(score, sampler, cfg, key, x, eps, threshold, aux, domain, idx):
    keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(idx)
    flat = x.reshape(x.shape[0], -1)
    log_p, var, k, capped, thresholds, acceptance = jax.vmap(
        lambda kb, xb, eb, tb, ab: _one(score, sampler, cfg, x.shape[1:], kb, xb, eb, tb, ab, domain))(
        keys, flat, eps, threshold, aux)
    half = ndtri(0.5 + cfg.confidence / 2) * jnp.sqrt(var)
    ln10 = math.log(10)
    log10_p = log_p / ln10
    low = jnp.where(capped, -jnp.inf, (log_p - half) / ln10)
    forward = cfg.particles * (1 + cfg.steps * (k - 1))
    return AmlsResult(log10_p, low, (log_p + half) / ln10, k, capped, forward, thresholds, acceptance)


def check_config(cfg: AmlsConfig) -> None:
    """`InputError` for options AMLS cannot run with."""
    if int(cfg.particles) != cfg.particles or cfg.particles < 2:
        raise InputError(f"AMLS needs particles >= 2, got {cfg.particles}")
    if not 0 < cfg.rho < 1 or not 1 <= _kept(cfg) <= cfg.particles - 1:
        raise InputError(f"AMLS needs 0 < rho < 1 keeping between 1 and particles - 1 particles per level, got "
                         f"rho={cfg.rho} with {cfg.particles} particles")
    if int(cfg.steps) != cfg.steps or cfg.steps < 1:
        raise InputError(f"AMLS needs steps >= 1, got {cfg.steps}")
    if int(cfg.max_levels) != cfg.max_levels or cfg.max_levels < 1:
        raise InputError(f"AMLS needs max_levels >= 1, got {cfg.max_levels}")
    if not 0 < cfg.confidence < 1:
        raise InputError(f"AMLS needs 0 < confidence < 1, got {cfg.confidence}")
    if cfg.rng not in RNGS:
        raise InputError(f"AMLS rng must be one of {RNGS}, got {cfg.rng!r}")


def amls(score: Callable[[jax.Array, Any], jax.Array], key, x, eps, threshold, aux=None, *,
         cfg: AmlsConfig | None = None, sampler: str = "linf", domain=None, offset=0) -> AmlsResult:
    """Estimate ``P(score(X) > threshold)`` for every input, ``X`` from ``sampler`` around it.

    Args:
      score: ``(samples (N, *shape), aux_b) -> (N,)``, ``aux_b`` one input's slice of ``aux``; best a
        `jax.tree_util.Partial` (or a pytree function) so the compiled kernel is reused across calls.
      key: PRNG key.  x: inputs ``(B, *shape)``.  eps: radius (σ for ``"gaussian"``), scalar or ``(B,)``.
      threshold: scalar or ``(B,)``.  aux: pytree of arrays with leading dimension ``B`` (e.g. labels).
      cfg: `AmlsConfig` (default ``AmlsConfig()``).  sampler: ``"linf"``, ``"l2"``, ``"l1"`` or ``"gaussian"``.
      domain: ``(lo, hi)`` samples are clipped to, or None.
      offset: global index of ``x[0]``, or an int array ``(B,)`` of the inputs' global indices (seeds).
    Returns an `AmlsResult` of device arrays.
    """
    cfg = AmlsConfig() if cfg is None else AmlsConfig(*cfg)
    check_config(cfg)
    if not isinstance(sampler, str) or sampler not in LATENT_MAPS:
        raise InputError(f"AMLS needs a built-in sampler, one of {sorted(SAMPLERS)}; got {sampler!r}")
    x = check_x(x)
    b = x.shape[0]
    eps = check_eps(eps, b)
    t = jnp.asarray(threshold, jnp.float32)
    if t.shape not in ((), (b,)):
        raise InputError(f"threshold must be a scalar or have shape ({b},), got {t.shape}")
    if not bool(jnp.all(jnp.isfinite(t))):
        raise InputError("threshold must be finite")
    domain = check_domain(domain)
    if domain is not None:
        domain = tuple(jnp.broadcast_to(v, x.shape[1:]).reshape(-1) for v in domain)
    idx = offset + jnp.arange(b) if jnp.ndim(offset) == 0 else jnp.asarray(offset)
    score = score if isinstance(score, Partial) else Partial(score)
    return _amls(score, sampler, cfg, key, x, eps, jnp.broadcast_to(t, (b,)), aux, domain, idx)
