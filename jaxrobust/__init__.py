"""jaxrobust: robustness of neural-network classifiers in JAX.

The package root re-exports the model layer; kernels live in `jaxrobust.kernels`, drivers in
`jaxrobust.critical_eps`, `jaxrobust.roma`, `jaxrobust.generative` and `jaxrobust.distributions`.
"""
from .errors import FileFormatError, InputError, JaxRobustError, UnsupportedOpError
from .network import Network, content_hash, from_flax, from_function
from .weights import load_network, save_network

__version__ = "0.1.0"
__all__ = ["FileFormatError", "InputError", "JaxRobustError", "UnsupportedOpError", "Network", "content_hash",
           "from_flax", "from_function", "load_network", "save_network"]
