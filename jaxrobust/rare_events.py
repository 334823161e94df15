"""RoMA's confident misclassification ``P(c > δ)`` (``c``: highest softmax probability among the wrong labels),
or with ``delta=None`` the misclassification ``P(max_{j≠y} logit_j > logit_y)``, under RoMA's perturbations,
estimated without a model of the tail: adaptive multilevel splitting (`kernels.amls`) and plain Monte Carlo
with its exact Clopper–Pearson interval.

Scores: ``log c`` (a log-softmax, so deep tails do not underflow to 0) against ``log δ``; the logit margin
``max_{j≠y} logit_j − logit_y`` against 0. Keys: RoMA's samples come from ``PRNGKey(seed)``; Monte Carlo uses ``fold_in(PRNGKey(seed), 1)``
and AMLS ``fold_in(PRNGKey(seed), 2)``, so the three estimates are independent; an input's estimate depends
on its global index, not on the batch it runs in.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.tree_util import Partial

from .errors import InputError
from .kernels.amls import LATENT_MAPS, AmlsConfig, AmlsResult, amls, latent_size
from .kernels.amls import check_config as check_amls
from .kernels.perturb import check_eps, check_x, map_samples
from .kernels.stats import clopper_pearson
from .network import Network

ESTIMATORS = ("roma", "mc", "amls")
GROUP_FLOATS = 1 << 24  # latent coordinates of the AMLS particles of the inputs run at once: 64 MiB per array


class EstimatorConfig(NamedTuple):
    estimators: tuple = ("roma",)   # any of ESTIMATORS
    mc_samples: int = 1_000_000     # samples per input of the plain Monte Carlo estimate
    amls: AmlsConfig = AmlsConfig()


class MonteCarloResult(NamedTuple):
    """Per-input arrays ``(B,)``."""
    count: np.ndarray   # samples with c > δ
    p: np.ndarray       # count / n
    low: np.ndarray     # two-sided Clopper–Pearson interval at `confidence`
    high: np.ndarray


def parse_estimators(text: str) -> tuple:
    """``"roma,mc,amls"`` -> ``("roma", "mc", "amls")``: known names, no repeats, in the order of `ESTIMATORS`."""
    names = [s.strip() for s in str(text).split(",") if s.strip()]
    bad = sorted(set(names) - set(ESTIMATORS))
    if not names or bad:
        raise InputError(f"unknown estimator {', '.join(bad) or repr(text)}; choose a comma list of {ESTIMATORS}")
    return tuple(e for e in ESTIMATORS if e in names)


def check_config(cfg: EstimatorConfig) -> None:
    """`InputError` for an estimator list or option that cannot run."""
    if not cfg.estimators or set(cfg.estimators) - set(ESTIMATORS):
        raise InputError(f"estimators must be a non-empty subset of {ESTIMATORS}, got {cfg.estimators}")
    if "mc" in cfg.estimators and (int(cfg.mc_samples) != cfg.mc_samples or not 1 <= cfg.mc_samples < 2 ** 31):
        raise InputError(f"mc_samples must be an integer in [1, 2^31), got {cfg.mc_samples}")
    if "amls" in cfg.estimators:
        check_amls(cfg.amls)


def config_entries(cfg: EstimatorConfig) -> dict:
    """The entries a stored configuration gains beyond RoMA's: none for RoMA alone (so its rows keep their
    key), else the estimator list and the options of the estimators in it."""
    if cfg.estimators == ("roma",):
        return {}
    out = {"estimators": list(cfg.estimators)}
    if "mc" in cfg.estimators:
        out["mc_samples"] = int(cfg.mc_samples)
    if "amls" in cfg.estimators:
        out["amls"] = cfg.amls._asdict()
    return out


def score(net: Network, samples, labels, softmax: bool = True) -> jax.Array:
    """Samples ``(*lead, *input_shape)``, labels broadcastable to ``lead`` -> ``lead``: the highest log-softmax
    among the wrong labels (``softmax``), else the margin ``max_{j≠label} logit_j − logit_label``."""
    lead = samples.shape[:samples.ndim - len(net.input_shape)]
    out = net(samples.reshape((-1,) + tuple(net.input_shape)))
    out = (jax.nn.log_softmax(out, axis=-1) if softmax else out).reshape(lead + (-1,))
    mask = jax.nn.one_hot(jnp.broadcast_to(labels, lead), out.shape[-1], dtype=bool)
    wrong = jnp.max(jnp.where(mask, -jnp.inf, out), axis=-1)
    return wrong if softmax else wrong - jnp.sum(jnp.where(mask, out, 0), axis=-1)


def _threshold(delta, seed) -> float:
    """The score threshold of ``delta`` (None: misclassification); validates ``delta`` and ``seed``."""
    if delta is not None and not 0 < delta <= 1:
        raise InputError(f"delta must be in (0, 1] or None (misclassification), got {delta}")
    if int(seed) != seed:
        raise InputError(f"seed must be an integer, got {seed}")
    return 0.0 if delta is None else math.log(delta)


def _log_confidence(net, samples, labels):
    return score(net, samples, labels, softmax=True)


def _margin(net, samples, labels):
    return score(net, samples, labels, softmax=False)


def _scorer(net: Network, delta) -> Partial:
    """``(samples, labels) -> scores`` of the event of ``delta``."""
    return Partial(_margin if delta is None else _log_confidence, net)


def _exceeds(scorer, labels, threshold, samples):
    """``(B, c, *shape) -> (B, c)`` bool: the score exceeds the threshold."""
    return scorer(samples, labels[:, None]) > threshold


def monte_carlo(net: Network, x, y, eps, delta: float | None, n: int, chunk: int, *, sampler: str = "linf",
                seed: int = 0, indices=None, confidence: float = 0.95, rng: str | None = None) -> MonteCarloResult:
    """Plain Monte Carlo estimate of ``P(c > δ)`` (``delta=None``: of misclassification) from ``n`` perturbations
    of every input ``x: (B, *shape)``, labels ``y: (B,)``, ``chunk`` samples per input per step (memory; the
    samples do not depend on it); ``indices``: the inputs' global ids (default ``0..B-1``); ``rng``: the samples'
    per-coordinate generator (`perturb.map_samples`; None: the sampler's default)."""
    t = _threshold(delta, seed)
    if int(n) != n or not 1 <= n < 2 ** 31:
        raise InputError(f"n must be an integer in [1, 2^31), got {n}")
    y = jnp.asarray(y, jnp.int32)
    offset = 0 if indices is None else jnp.asarray(indices, jnp.int32)
    key = jax.random.fold_in(jax.random.PRNGKey(seed), 1)
    k = map_samples(Partial(_exceeds, _scorer(net, delta), y, jnp.float32(t)), key, x, eps, int(n), chunk,
                    sampler=sampler, domain=net.domain, offset=offset, reduce="sum", rng=rng)
    k = np.asarray(k, np.int64)
    low, high = clopper_pearson(k, n, confidence)     # float64 on the host
    return MonteCarloResult(k, k / n, np.asarray(low, np.float64), np.asarray(high, np.float64))


def amls_estimate(net: Network, x, y, eps, delta: float | None, cfg: AmlsConfig | None = None, *,
                  sampler: str = "linf", seed: int = 0, indices=None) -> AmlsResult:
    """AMLS estimate of ``P(c > δ)`` (``delta=None``: of misclassification) for every input ``x: (B, *shape)``
    with labels ``y: (B,)`` (see `kernels.amls.amls`); ``indices``: the inputs' global ids (default ``0..B-1``).
    Inputs run in groups whose particles hold at most ``GROUP_FLOATS`` latent coordinates (the last group
    padded, so every group has one compiled shape)."""
    t = _threshold(delta, seed)
    cfg = AmlsConfig() if cfg is None else cfg
    x = check_x(x)
    b = x.shape[0]
    eps, y = check_eps(eps, b), jnp.asarray(y, jnp.int32)
    ids = jnp.arange(b) if indices is None else jnp.asarray(indices, jnp.int32)
    key = jax.random.fold_in(jax.random.PRNGKey(seed), 2)
    size = latent_size(sampler, math.prod(x.shape[1:])) if sampler in LATENT_MAPS else 1
    g = max(1, min(b, GROUP_FLOATS // (int(cfg.particles) * size)))
    parts = []
    for s in range(0, b, g):
        rows = jnp.minimum(jnp.arange(s, s + g), b - 1)
        r = amls(_scorer(net, delta), key, x[rows], eps[rows], t, y[rows], cfg=cfg, sampler=sampler,
                 domain=net.domain, offset=ids[rows])
        parts.append(jax.tree_util.tree_map(lambda a: a[:min(g, b - s)], r))
    return jax.tree_util.tree_map(lambda *a: jnp.concatenate(a), *parts)


# --- rows of the RoMA table ---------------------------------------------------------------------------------------
COLUMNS = {"mc_samples": ("i8", ()), "mc_count": ("i8", ()), "mc_p": ("f8", ()), "mc_low": ("f8", ()),
           "mc_high": ("f8", ()), "amls_log10_p": ("f8", ()), "amls_log10_low": ("f8", ()),
           "amls_log10_high": ("f8", ()), "amls_levels": ("i8", ()), "amls_capped": ("bool", ()),
           "amls_acceptance": ("f8", ()), "amls_min_acceptance": ("f8", ()), "amls_forward": ("i8", ())}


def estimate_columns(net: Network, x, y, eps, delta: float, cfg: EstimatorConfig, chunk: int, *,
                     sampler: str = "linf", seed: int = 0, indices=None, confidence: float = 0.95) -> dict:
    """`COLUMNS` for inputs ``x: (B, *shape)``: the estimates of the estimators in ``cfg`` other than RoMA, fill
    values (-1, NaN, False) for the others. ``chunk``: Monte Carlo samples per input per step."""
    b = len(x)
    out = {c: np.full(b, {"i8": -1, "f8": np.nan, "bool": False}[t]) for c, (t, _) in COLUMNS.items()}
    if "mc" in cfg.estimators:
        r = monte_carlo(net, x, y, eps, delta, cfg.mc_samples, chunk, sampler=sampler, seed=seed, indices=indices,
                        confidence=confidence)
        out.update(mc_samples=np.full(b, cfg.mc_samples), mc_count=r.count, mc_p=r.p, mc_low=r.low, mc_high=r.high)
    if "amls" in cfg.estimators:
        r = jax.device_get(amls_estimate(net, x, y, eps, delta, cfg.amls, sampler=sampler, seed=seed,
                                         indices=indices))
        acc = np.asarray(r.acceptance, np.float64)
        moved = np.isfinite(acc)
        m = moved.sum(axis=1)  # levels with moves: levels - 1
        out.update(amls_log10_p=r.log10_p, amls_log10_low=r.log10_low, amls_log10_high=r.log10_high,
                   amls_levels=r.levels, amls_capped=r.capped, amls_forward=r.forward_passes,
                   amls_acceptance=np.where(m > 0, np.where(moved, acc, 0).sum(axis=1) / np.maximum(m, 1), np.nan),
                   amls_min_acceptance=np.where(m > 0, np.where(moved, acc, np.inf).min(axis=1), np.nan))
    return {c: np.asarray(v) for c, v in out.items()}
