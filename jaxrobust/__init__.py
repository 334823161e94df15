"""jaxrobust: robustness of neural-network classifiers in JAX."""
from .errors import FileFormatError, InputError, JaxRobustError, UnsupportedOpError
from .network import Network, content_hash, from_flax, from_function

__version__ = "0.1.0"
