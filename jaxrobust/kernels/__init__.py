"""Pure-function kernels: perturbation sampling, bound propagation, attacks, statistics, sharding.

Each is a function of arrays and static configuration, batched over inputs, with randomness through
explicit `jax.random` keys. Public names are re-exported here from the modules.
"""
from .attacks import AttackResult, fgsm, margin, pgd, random_search
from .bounds import Bounds, crown, ibp, margin_bounds, robustness_spec, spec_interval, widen
from .forward_bounds import forward_linear
from .minnorm import MinNormResult, min_norm
from .perturb import gaussian, map_samples, sample, uniform_l1, uniform_l2, uniform_linf
from .sharding import batch_mesh, batch_sharding, map_sharded, replicate, shard_batch, unpad
from .stats import (
                    RomaStats,
                    RomaStatus,
                    anderson_normal,
                    beta_ppf,
                    boxcox,
                    boxcox_llf,
                    boxcox_mle,
                    clopper_pearson,
                    ecdf,
                    is_normal,
                    ks_lognormal,
                    ks_statistic,
                    lognormal_fit,
                    normal_tail,
                    roma_statistics,
                    samples_needed,
                    samples_needed_half_width,
                    yeojohnson,
                    yeojohnson_llf,
                    yeojohnson_mle,
)

__all__ = [
    "AttackResult", "fgsm", "margin", "pgd", "random_search",
    "Bounds", "crown", "ibp", "margin_bounds", "robustness_spec", "spec_interval", "widen", "forward_linear",
    "MinNormResult", "min_norm",
    "gaussian", "map_samples", "sample", "uniform_l1", "uniform_l2", "uniform_linf",
    "batch_mesh", "batch_sharding", "map_sharded", "replicate", "shard_batch", "unpad",
    "RomaStats", "RomaStatus", "anderson_normal", "beta_ppf", "boxcox", "boxcox_llf", "boxcox_mle",
    "clopper_pearson", "ecdf", "is_normal", "ks_lognormal", "ks_statistic", "lognormal_fit", "normal_tail",
    "roma_statistics", "samples_needed", "samples_needed_half_width", "yeojohnson", "yeojohnson_llf",
    "yeojohnson_mle",
]
