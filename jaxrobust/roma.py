"""RoMA (Levy & Katz): probabilistic local robustness of a black-box classifier, one batched pipeline.

Per input ``x0`` with label ``l0``: ``n`` perturbations in the L∞ ε-ball (clipped to the domain), a
forward pass, and per sample the highest softmax confidence among the labels other than ``l0``. On
device, vmapped over inputs: Anderson–Darling normality test, Box-Cox with the MLE λ (Yeo-Johnson as
fallback), re-test, and ``plr = 1 − P(c > δ)`` from the fitted normal (`kernels.stats.roma_statistics`).

Honest outputs: an input the network misclassifies gets status ``misclassified`` and NaN plr (it is no
evidence of robustness either way and stays out of plr aggregates); a fitted tail below what ``n`` samples
can resolve (``1/n``) is reported as that bound, ``tail_bound`` True (``log10_tail = log10(1/n)``,
``plr = 1 − 1/n``), not as an extrapolation to 10^-9000; ε = 0 and a ball as wide as the domain warn.

Beside the paper's parametric estimate, the sound direct Monte Carlo estimate of
``P(confident misclassification) = P(c > δ)`` with its exact Clopper–Pearson upper bound.

Memory and speed: each step draws and evaluates `samples_per_step` samples of every input of a batch
(at most ``cfg.chunk``; about ``STEP_FLOATS`` sample coordinates in all), sampler and network as
separate compiled stages (`kernels.perturb.map_samples`); only the per-sample confidences
``(inputs, n)`` are kept, and inputs are processed ``batch`` at a time, so ``batch · n`` floats bound
the memory (n = 10^6 works with a small batch).
"""
from __future__ import annotations

import math
import time
import warnings
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.tree_util import Partial
from scipy import stats as sps

from .errors import InputError
from .kernels.perturb import map_samples
from .kernels.stats import RomaStatus, clopper_pearson, roma_statistics
from .network import Network
from .rare_events import COLUMNS as ESTIMATE_COLUMNS
from .rare_events import EstimatorConfig, config_entries, estimate_columns
from .rare_events import check_config as check_estimators

# sample coordinates drawn and evaluated per step, all inputs together (16 MiB of float32): enough work to
# amortise the two dispatches of a step, few enough for the samples to stay in the last-level cache
STEP_FLOATS = 1 << 22
STATUS_NAMES = {RomaStatus.NORMAL: "normal", RomaStatus.BOXCOX: "normal after Box-Cox",
                RomaStatus.YEOJOHNSON: "normal after Yeo-Johnson", RomaStatus.FAIL: "FAIL"}
MISCLASSIFIED = "misclassified"


class RomaConfig(NamedTuple):
    eps: float = 0.04
    delta: float = 0.6
    samples: int = 10_000
    sampler: str = "linf"
    significance: float = 0.05   # Anderson–Darling level
    confidence: float = 0.95     # Clopper–Pearson upper bound level
    chunk: int = 1000            # at most this many samples per input per step (does not change the samples)
    seed: int = 0


class RomaResult(NamedTuple):
    """Per-input arrays ``(N,)``."""
    plr: np.ndarray            # 1 − P(c > δ) from the fitted normal; NaN when status is FAIL or misclassified
    log10_tail: np.ndarray     # log10 P(c > δ), finite where plr rounds to 1; at least log10(1/n) (see tail_bound)
    tail_bound: np.ndarray     # bool: the fitted tail is below 1/n, so plr and log10_tail are that bound
    lmbda: np.ndarray          # Box-Cox λ (NaN if not applicable)
    lmbda_yj: np.ndarray       # Yeo-Johnson λ where that fallback ran
    ad_before: np.ndarray      # Anderson–Darling A² of the raw confidences
    ad_after: np.ndarray       # A² after Box-Cox
    status: np.ndarray         # str: normal / normal after Box-Cox / normal after Yeo-Johnson / FAIL / misclassified
    n_adversarial: np.ndarray  # samples with wrong-label confidence > δ
    mc_estimate: np.ndarray    # n_adversarial / n
    mc_upper: np.ndarray       # one-sided Clopper–Pearson upper bound on P(c > δ) at `confidence`
    mean: np.ndarray
    std: np.ndarray
    time_s: np.ndarray         # wall time per input (its share of the batch)


def _wrong_label_confidence(net: Network, labels, samples):
    """Highest softmax probability among labels ≠ label: ``samples (B, c, *shape), labels (B,) -> (B, c)``."""
    b, c = samples.shape[:2]
    p = jax.nn.softmax(net(samples.reshape((b * c,) + samples.shape[2:])), axis=-1).reshape(b, c, -1)
    mask = jax.nn.one_hot(labels, p.shape[-1], dtype=bool)[:, None, :]
    return jnp.max(jnp.where(mask, -jnp.inf, p), axis=-1)


def wrong_label_confidence(net: Network):
    """``f(samples (B, c, *shape), labels (B,)) -> (B, c)``: highest softmax probability among labels ≠ label."""
    return lambda samples, labels: _wrong_label_confidence(net, labels, samples)


def confidences(net: Network, x, y, cfg: RomaConfig, *, indices=None) -> jax.Array:
    """Wrong-label confidences ``(B, n)`` of ``cfg.samples`` perturbations of each ``x: (B, *shape)``.

    ``indices: (B,)`` are the inputs' global ids (default ``0..B-1``): a sample depends only on
    (seed, input id, sample index), not on which inputs share the batch. Each step evaluates
    `samples_per_step` samples of every input.
    """
    indices = jnp.arange(len(x)) if indices is None else jnp.asarray(indices, jnp.int32)
    chunk = samples_per_step(cfg, len(x), math.prod(x.shape[1:]))
    return map_samples(Partial(_wrong_label_confidence, net, jnp.asarray(y)), jax.random.PRNGKey(cfg.seed), x,
                       cfg.eps, cfg.samples, chunk, sampler=cfg.sampler, domain=net.domain, offset=indices)


def samples_per_step(cfg: RomaConfig, batch: int, input_size: int) -> int:
    """Samples of each of ``batch`` inputs of ``input_size`` coordinates evaluated per step:
    ``min(cfg.chunk, STEP_FLOATS // (batch · input_size))``, at least 1."""
    return max(1, min(cfg.chunk, STEP_FLOATS // (batch * input_size)))


def check_config(net: Network, cfg: RomaConfig) -> None:
    """`InputError` for a bad configuration; a warning for ε = 0 or a ball as wide as the network's domain."""
    if not cfg.eps >= 0 or not 0 < cfg.delta <= 1 or cfg.samples < 3 or cfg.chunk < 1:
        raise InputError(f"need eps >= 0, 0 < delta <= 1, samples >= 3 and chunk >= 1 (got {cfg.eps}, {cfg.delta}, "
                         f"{cfg.samples}, {cfg.chunk})")
    lo, hi = net.domain
    if cfg.eps == 0:
        warnings.warn("RoMA with eps = 0: every sample is the input itself, the statistics say nothing about "
                      "robustness", stacklevel=3)
    elif 2 * cfg.eps >= hi - lo:
        warnings.warn(f"RoMA with eps = {cfg.eps:g}: the ball is at least as wide as the domain [{lo:g}, {hi:g}], "
                      "so samples are clipped to the domain's boundary", stacklevel=3)


def roma(net: Network, x, y, cfg: RomaConfig | None = None, *, indices: Sequence[int] | None = None,
         batch: int | None = None) -> RomaResult:
    """RoMA statistics of every input ``x: (N, *input_shape)`` with labels ``y: (N,)``.

    ``cfg`` defaults to ``RomaConfig()``; ``indices`` are the inputs' global ids (they seed the
    samples); ``batch`` inputs are processed at a time (default: as many as keep ``batch · samples``
    under 2^25 confidences), on JAX's default device.
    """
    cfg = RomaConfig() if cfg is None else cfg
    x = net.check_inputs(x)
    n = len(x)
    y = net.check_labels(y, n)
    check_config(net, cfg)
    indices = np.arange(n) if indices is None else np.asarray(indices)
    batch = batch or max(1, min(256, (1 << 25) // cfg.samples))
    floor = -math.log10(cfg.samples)  # the smallest tail that n samples resolve: 1/n
    parts = []
    for s in range(0, n, batch):
        t0 = time.perf_counter()
        m = min(batch, n - s)
        p = min(batch, 1 << (m - 1).bit_length())  # pad to a power of two: few compiled shapes
        rows = np.concatenate([np.arange(s, s + m), np.full(p - m, s)])
        conf = confidences(net, x[rows], y[rows], cfg, indices=indices[rows])
        st = roma_statistics(conf, cfg.delta, cfg.significance)
        st = st._replace(**{f: np.asarray(v)[:m] for f, v in st._asdict().items()})
        wrong = np.asarray(net(x[s:s + m])).argmax(-1) != y[s:s + m]
        bound = (st.log10_tail < floor) & ~wrong
        nan = lambda a: np.where(wrong, np.nan, a)  # noqa: E731
        k = st.n_adversarial
        _, upper = clopper_pearson(k, cfg.samples, cfg.confidence, side="upper")
        status = np.array([STATUS_NAMES[RomaStatus(int(c))] for c in st.status], object)
        parts.append({"plr": nan(np.where(bound, 1 - 10.0 ** floor, st.plr)),
                      "log10_tail": nan(np.where(bound, floor, st.log10_tail)), "tail_bound": bound,
                      "lmbda": st.lmbda, "lmbda_yj": st.lmbda_yj, "ad_before": st.ad_before, "ad_after": st.ad_after,
                      "status": np.where(wrong, MISCLASSIFIED, status).astype(object),
                      "n_adversarial": k, "mc_estimate": k / cfg.samples, "mc_upper": upper, "mean": st.mean,
                      "std": st.std, "time_s": np.full(m, (time.perf_counter() - t0) / m)})
    if not parts:
        return RomaResult(*(np.zeros(0) for _ in RomaResult._fields))
    return RomaResult(**{f: np.concatenate([np.asarray(p[f]) for p in parts]) for f in RomaResult._fields})


TABLE = "roma"
CSV_COLUMNS = ("index", "label", "plr", "log10_tail", "lambda", "status", "n_adversarial", "mc_upper",
               "network_name", "eps", "delta", "samples", "tail_bound", "mc_estimate", "ad_before", "ad_after",
               "time_s")
COLUMNS = {"label": ("i8", ()), "eps": ("f8", ()), "delta": ("f8", ()), "samples": ("i8", ()),
           "plr": ("f8", ()), "log10_tail": ("f8", ()), "tail_bound": ("bool", ()), "lambda": ("f8", ()),
           "lambda_yj": ("f8", ()), "ad_before": ("f8", ()), "ad_after": ("f8", ()), "status": ("str", ()),
           "n_adversarial": ("i8", ()), "mc_estimate": ("f8", ()), "mc_upper": ("f8", ()), "mean": ("f8", ()),
           "std": ("f8", ()), "time_s": ("f8", ()), "network_name": ("str", ()), **ESTIMATE_COLUMNS}


def config_key(cfg: RomaConfig, estimators: EstimatorConfig | None = None) -> dict:
    """The stored configuration of a run: RoMA's options, and those of the other estimators when there are any
    (RoMA alone keeps the key of rows stored before they existed)."""
    return {"method": "roma", **cfg._asdict(), **config_entries(estimators or EstimatorConfig())}


class _Task:
    """``compute(chunk) -> {TABLE: rows}`` of `run` (a `runner.Chunk`) on JAX's default device."""

    def __init__(self, net: Network, cfg: RomaConfig, dataset: tuple, estimators: EstimatorConfig):
        self.net, self.cfg, self.dataset, self.estimators = net, cfg, dataset, estimators  # dataset: (name, split)

    def __call__(self, chunk) -> dict:
        with warnings.catch_warnings():  # `run` has given the configuration's warnings once
            warnings.simplefilter("ignore", UserWarning)
            r = roma(self.net, chunk.x, chunk.y, self.cfg, indices=chunk.ids)
        m, cfg = len(chunk), self.cfg
        return {TABLE: {"network": [self.net.hash] * m, "dataset": [self.dataset[0]] * m,
                        "split": [self.dataset[1]] * m, "index": chunk.ids, "label": chunk.y, "eps": [cfg.eps] * m,
                        "delta": [cfg.delta] * m, "samples": [cfg.samples] * m, "plr": r.plr,
                        "log10_tail": r.log10_tail, "tail_bound": r.tail_bound, "lambda": r.lmbda,
                        "lambda_yj": r.lmbda_yj, "ad_before": r.ad_before, "ad_after": r.ad_after, "status": r.status,
                        "n_adversarial": r.n_adversarial, "mc_estimate": r.mc_estimate, "mc_upper": r.mc_upper,
                        "mean": r.mean, "std": r.std, "time_s": r.time_s, "network_name": [self.net.name] * m,
                        **estimate_columns(self.net, chunk.x, chunk.y, cfg.eps, cfg.delta, self.estimators,
                                           samples_per_step(cfg, m, math.prod(chunk.x.shape[1:])),
                                           sampler=cfg.sampler, seed=cfg.seed, indices=chunk.ids,
                                           confidence=cfg.confidence)}}


def run(net: Network, dataset, indices, cfg: RomaConfig, out, *, resume: bool = False, chunk: int = 64,
        progress: bool = True, devices: int | None = None, workers: int | None = None,
        ray_address: str | None = None, estimators: EstimatorConfig | None = None):
    """RoMA for ``dataset`` rows ``indices`` (positions), one row per input appended to the HDF5 ``out``
    (table ``roma``) by `runner.ResumableRun`, committed every ``chunk`` inputs; ``resume`` skips stored rows.
    ``estimators`` (`rare_events.EstimatorConfig`) adds Monte Carlo and AMLS estimates of ``P(c > δ)`` to the rows.
    ``devices``: local devices that run chunks side by side (default all); ``workers`` / ``ray_address``: Ray
    workers. Returns the store."""
    from .runner import ResumableRun, check_scale

    check_scale(devices, workers, ray_address)
    check_config(net, cfg)
    estimators = estimators or EstimatorConfig()
    check_estimators(estimators)
    if chunk < 1:
        raise InputError(f"chunk must be >= 1, got {chunk}")
    run = ResumableRun(out, {TABLE: COLUMNS}, config_key(cfg, estimators), resume=resume, progress=progress,
                       desc=f"RoMA ε={cfg.eps:g}", devices=devices, workers=workers, ray_address=ray_address)
    chunks, done = run.input_chunks(net, dataset, indices, chunk)
    run.map(chunks, _Task(net, cfg, (dataset.name, dataset.split), estimators), done=done)
    return run.stores[TABLE]


class ClassSummary(NamedTuple):
    label: int
    n: int                 # inputs of this class, misclassified ones included
    complete: float        # fraction of the correctly classified inputs whose confidences were normal (after a transform)
    plr_mean: float
    plr_var: float
    mc_upper_mean: float
    t_p: float             # Welch t-test of this class's plr against all other classes
    binom_p: float         # binomial test: this class's completeness against the overall rate
    misclassified: int     # inputs of this class the network misclassifies (outside every plr aggregate)


def categorical(labels, plr, status, mc_upper) -> list[ClassSummary]:
    """Per-class ("categorical") robustness: mean and variance of plr over the inputs of each class whose
    fit succeeded, completeness, and the between-class tests (Welch t-test of the class against the rest;
    exact binomial test of the class's completeness against the overall completeness). Misclassified
    inputs are counted, and left out of every other figure."""
    labels, plr, status = np.asarray(labels), np.asarray(plr, float), np.asarray(status)
    seen = status != MISCLASSIFIED
    ok = seen & (status != STATUS_NAMES[RomaStatus.FAIL])
    overall = ok.sum() / seen.sum() if seen.any() else np.nan
    out = []
    with warnings.catch_warnings():  # scipy's notes on degenerate samples (all plr equal): the p-value says it
        warnings.simplefilter("ignore", RuntimeWarning)
        for c in np.unique(labels):
            m = labels == c
            a, b = plr[m & ok], plr[~m & ok]
            t_p = float(sps.ttest_ind(a, b, equal_var=False).pvalue) if a.size >= 2 and b.size >= 2 else np.nan
            n_seen = int((m & seen).sum())
            bp = float(sps.binomtest(int(ok[m].sum()), n_seen, overall).pvalue) if 0 < overall < 1 and n_seen else 1.0
            out.append(ClassSummary(int(c), int(m.sum()), float(ok[m].sum() / n_seen) if n_seen else np.nan,
                                    float(a.mean()) if a.size else np.nan,
                                    float(a.var(ddof=1)) if a.size > 1 else np.nan,
                                    float(np.mean(np.asarray(mc_upper)[m & seen])) if n_seen else np.nan, t_p, bp,
                                    int((m & ~seen).sum())))
    return out


def compare_models(plr_a, plr_b) -> dict:
    """Paired comparison of two networks on the same inputs and seeds: means and the Wilcoxon signed-rank
    test (inputs where either fit failed are dropped). Pass ``log10_tail`` values where plr rounds to 1."""
    a, b = np.asarray(plr_a, float), np.asarray(plr_b, float)
    ok = np.isfinite(a) & np.isfinite(b)
    d = a[ok] - b[ok]
    with warnings.catch_warnings():  # ties and small samples: scipy notes them, the p-value accounts for them
        warnings.simplefilter("ignore", (RuntimeWarning, UserWarning))
        p = float(sps.wilcoxon(a[ok], b[ok]).pvalue) if ok.sum() >= 2 and np.any(d != 0) else 1.0
    return {"n": int(ok.sum()), "mean_a": float(a[ok].mean()) if ok.any() else np.nan,
            "mean_b": float(b[ok].mean()) if ok.any() else np.nan, "wilcoxon_p": p}
