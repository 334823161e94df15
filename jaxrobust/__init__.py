"""jaxrobust: robustness of neural-network classifiers in JAX. ``import jaxrobust as jr`` gives the user API
below (40 names); everything else lives in the submodules (`jaxrobust.kernels`, `jaxrobust.critical_eps`,
`jaxrobust.roma`, `jaxrobust.generative`, `jaxrobust.distributions`, ...). ``jr.verify`` is the complete
verifier function; its module is reached with ``from jaxrobust.verify import ...``.

Statuses are names: critical ε rows ``exact`` / ``gap`` / ``censored`` / ``misclassified`` / ``error``, RoMA
inputs ``normal`` / ... / ``FAIL``, verifier verdicts `Status` (``ROBUST`` / ``VIOLATED`` / ``UNKNOWN``; the
verifier's ``int8`` arrays name themselves with `status_names`).
"""
from __future__ import annotations

import importlib

from .errors import InputError, JaxRobustError
from .loading import load_network
from .network import Network, from_flax, from_function, with_preprocessing
from .verify import VerifyConfig, verify, verify_property  # eager: the function shadows its module's name

# name -> (module, attribute): imported on first use, so `import jaxrobust` stays quick
_LAZY = {
    "save_network": ("weights", "save_network"), "load_dataset": ("data", "load_dataset"),
    "to_network_input": ("data", "to_network_input"),
    **{k: ("kernels", k) for k in ("ibp", "crown", "margin_bounds", "fgsm", "pgd", "min_norm")},
    "load_vnnlib": ("vnnlib", "load"), "Status": ("verdict", "Status"), "status_names": ("verdict", "status_names"),
    "make_oracle": ("oracles", "make_oracle"), "search_critical_eps": ("critical_eps", "search"),
    "SearchConfig": ("critical_eps", "SearchConfig"), "lognormal_fit": ("distributions", "lognormal_fit"),
    "compare_distributions": ("distributions", "compare"), "correlations": ("distributions", "correlations"),
    "summarize": ("distributions", "summarize"), "probabilistic_robustness": ("roma", "roma"),
    "RomaConfig": ("roma", "RomaConfig"), "categorical_robustness": ("roma", "categorical"),
    "compose": ("generative", "compose"), "global_correctness": ("generative", "global_correctness"),
    "global_robustness": ("generative", "global_robustness"), "load_generators": ("gan", "load_generators"),
    **{k: ("training", k) for k in ("loss", "adversarial_loss", "make_step")},
}


def __getattr__(name):
    if name in _LAZY:
        module, attr = _LAZY[name]
        value = getattr(importlib.import_module(f".{module}", __name__), attr)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'jaxrobust' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))


__version__ = "0.3.6"


def alpha_crown(fn, lo, hi, spec=None, **options):
    """α-CROWN bounds of ``spec @ fn(x)`` over the boxes ``[lo, hi]: (B, *in)``: `crown` with optimised slopes."""
    from .kernels import crown
    return crown(fn, lo, hi, spec, alpha=True, **options)


__all__ = [
    # networks and data
    "Network", "load_network", "save_network", "from_flax", "from_function", "with_preprocessing", "load_dataset",
    "to_network_input",
    # bounds and attacks
    "ibp", "crown", "alpha_crown", "margin_bounds", "fgsm", "pgd", "min_norm",
    # complete verification
    "verify", "verify_property", "VerifyConfig", "load_vnnlib", "Status", "status_names",
    # critical ε and its distributions
    "make_oracle", "search_critical_eps", "SearchConfig", "lognormal_fit", "compare_distributions", "correlations",
    "summarize",
    # RoMA
    "probabilistic_robustness", "RomaConfig", "categorical_robustness",
    # global robustness with generative models
    "compose", "global_correctness", "global_robustness", "load_generators",
    # training losses
    "loss", "adversarial_loss", "make_step",
    # errors
    "JaxRobustError", "InputError",
]
