"""Statistics kernels for RoMA and robustness-distribution analysis (pure JAX, jittable, batched).

Every function that takes a sample takes an array of shape ``(..., n)``: the last axis is the sample,
leading axes are independent inputs (images) and are vmapped over. Results have shape ``(...)``
unless stated. ``n`` is static (it fixes critical values and iteration constants at trace time).
Computation is in the floating dtype of the input (float32 by default, float64 with
``jax_enable_x64``); integer input is promoted to the default float dtype. SciPy is the reference the
tests compare against; each function names the SciPy call it equals.

Modules: ``_normality`` (Anderson-Darling), ``_power`` (Box-Cox / Yeo-Johnson transforms and MLE),
``_intervals`` (Beta quantiles, Clopper-Pearson, sample sizes), ``_fits`` (normal tails, log-normal, ECDF, KS),
``_roma`` (the RoMA per-input procedure), ``_sample`` (validation, per-row vmapping, sorting through
order-preserving integer keys, much faster on XLA:CPU).
"""
from ._fits import ecdf, ks_lognormal, ks_statistic, lognormal_fit, normal_tail
from ._intervals import beta_ppf, clopper_pearson, samples_needed, samples_needed_half_width
from ._normality import SIGNIFICANCE_LEVELS, anderson_normal, is_normal
from ._power import boxcox, boxcox_llf, boxcox_mle, yeojohnson, yeojohnson_llf, yeojohnson_mle
from ._roma import RomaStats, RomaStatus, roma_statistics

__all__ = [
    "SIGNIFICANCE_LEVELS", "RomaStats", "RomaStatus", "anderson_normal", "beta_ppf", "boxcox", "boxcox_llf",
    "boxcox_mle", "clopper_pearson", "ecdf", "is_normal", "ks_lognormal", "ks_statistic", "lognormal_fit",
    "normal_tail", "roma_statistics", "samples_needed", "samples_needed_half_width", "yeojohnson", "yeojohnson_llf",
    "yeojohnson_mle",
]
