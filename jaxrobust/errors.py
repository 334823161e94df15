"""Exception types. Every user-facing failure is one of these, with a message naming the problem."""


class JaxRobustError(Exception):
    """Base class of all jaxrobust errors (the CLI prints these as one line)."""


class InputError(JaxRobustError, ValueError):
    """Bad user input: wrong shape or dtype, NaN/inf, ε < 0, label out of range, bad option."""


class UnsupportedOpError(JaxRobustError, NotImplementedError):
    """A network contains an operation (ONNX op or JAX primitive) that jaxrobust cannot handle."""


class FileFormatError(JaxRobustError, ValueError):
    """A file is missing, corrupt or not in the expected format."""
