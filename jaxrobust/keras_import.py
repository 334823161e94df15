"""Keras (2.x) HDF5 weights files -> JAX `Generator`.

A weights-only file stores no architecture, so the architecture is declared here as a list of
layers ``(kind, config)`` with kinds ``dense``, ``reshape``, ``upsample``, ``conv2d``, ``batchnorm``
and ``activation``. The weighted layers of the file (in the order of its ``layer_names`` /
``weight_names`` attributes, nested models included) are matched one by one against the weighted
layers of the declaration, checking layer type and every weight shape; any mismatch is a
`FileFormatError`. Layouts follow Keras ``channels_last``: images NHWC, conv kernels HWIO.
"""
from __future__ import annotations

import functools
import hashlib
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from .errors import FileFormatError, InputError
from .generator import Generator

# z ~ N(0, 1)^100 -> 28x28x1 in [-1, 1] (the classic Keras MNIST DCGAN generator).
DCGAN_MNIST_GENERATOR = (
    ("dense", {"units": 6272, "activation": "relu"}),
    ("reshape", {"shape": (7, 7, 128)}),
    ("upsample", {"factor": 2}),
    ("conv2d", {"filters": 128, "kernel_size": 3}),
    ("batchnorm", {"epsilon": 1e-3}),
    ("activation", {"fn": "relu"}),
    ("upsample", {"factor": 2}),
    ("conv2d", {"filters": 64, "kernel_size": 3}),
    ("batchnorm", {"epsilon": 1e-3}),
    ("activation", {"fn": "relu"}),
    ("conv2d", {"filters": 1, "kernel_size": 3}),
    ("activation", {"fn": "tanh"}),
)

_ACTIVATIONS = {"linear": lambda x: x, "relu": jax.nn.relu, "tanh": jnp.tanh, "sigmoid": jax.nn.sigmoid}
_KERAS_PREFIX = {"dense": "dense", "conv2d": "conv2d", "batchnorm": "batch_normalization"}
_KINDS = ("dense", "reshape", "upsample", "conv2d", "batchnorm", "activation")


def load_keras_dcgan_generator(path) -> Generator:
    """The Keras MNIST DCGAN generator: ``z: (B, 100) -> (B, 28, 28, 1)`` in [-1, 1]."""
    return keras_sequential_generator(path, DCGAN_MNIST_GENERATOR, latent_dim=100,
                                      output_range=(-1.0, 1.0), name="keras_dcgan_mnist_generator")


def keras_sequential_generator(path, layers, latent_dim: int, *, output_range=(-1.0, 1.0),
                               name: str | None = None) -> Generator:
    """Build a `Generator` from a Keras weights file and the declared sequential ``layers``."""
    path = Path(path)
    layers = tuple((kind, dict(cfg)) for kind, cfg in layers)
    saved = read_keras_weights(path)
    params, shape, pos = [], (int(latent_dim),), 0
    for kind, cfg in layers:
        if kind not in _KINDS:
            raise InputError(f"unknown layer kind {kind!r}; supported: {', '.join(_KINDS)}")
        act = cfg.get("fn", cfg.get("activation", "linear"))
        if act not in _ACTIVATIONS:
            raise InputError(f"unknown activation {act!r}; supported: {', '.join(_ACTIVATIONS)}")
        if kind in _KERAS_PREFIX:
            if pos >= len(saved):
                raise FileFormatError(f"{path}: has {len(saved)} weighted layers, the architecture needs more "
                                      f"(next expected: {kind})")
            layer_name, weights = saved[pos]
            pos += 1
            if not layer_name.startswith(_KERAS_PREFIX[kind]):
                raise FileFormatError(f"{path}: weighted layer {pos} is {layer_name!r}, expected a {kind} layer")
            params.append(_check_weights(path, layer_name, weights, _expected_weights(kind, cfg, shape)))
        shape = _output_shape(path, kind, cfg, shape)
    if pos != len(saved):
        extra = ", ".join(n for n, _ in saved[pos:])
        raise FileFormatError(f"{path}: layers {extra} are not part of the declared architecture")
    if len(shape) != 3:
        raise InputError(f"the declared architecture outputs shape {shape}, expected (H, W, C)")
    arch = {"keras_sequential": [[kind, _jsonable(cfg)] for kind, cfg in layers],
            "latent_dim": int(latent_dim), "file_sha256": hashlib.sha256(path.read_bytes()).hexdigest()}
    return Generator(functools.partial(_apply_layers, layers), params, int(latent_dim), shape,
                     (float(output_range[0]), float(output_range[1])), name or path.stem, arch)


def read_keras_weights(path) -> list[tuple[str, dict[str, np.ndarray]]]:
    """Weighted layers of a Keras HDF5 file in saved order: ``[(layer_name, {weight_name: array})]``.

    Weight names drop the ``:0`` suffix (``kernel``, ``bias``, ``gamma``, ``moving_mean``, ...).
    """
    import h5py

    path = Path(path)
    if not path.is_file():
        raise FileFormatError(f"{path}: no such file")
    try:
        with h5py.File(path, "r") as f:
            root = f["model_weights"] if "model_weights" in f else f
            if "layer_names" not in root.attrs:
                raise FileFormatError(f"{path}: not a Keras weights file (no layer_names attribute)")
            layers: dict[str, dict[str, np.ndarray]] = {}
            for group_name in _strings(root.attrs["layer_names"]):
                group = root[group_name]
                for weight_name in _strings(group.attrs.get("weight_names", [])):
                    parts = weight_name.split("/")
                    layer = parts[-2] if len(parts) > 1 else group_name
                    layers.setdefault(layer, {})[parts[-1].split(":")[0]] = np.asarray(group[weight_name])
    except FileFormatError:
        raise
    except (OSError, KeyError, ValueError) as e:
        raise FileFormatError(f"{path}: not a readable Keras HDF5 weights file ({e})") from None
    return list(layers.items())


def _strings(values) -> list[str]:
    return [v.decode() if isinstance(v, bytes) else str(v) for v in np.asarray(values).ravel()]


def _expected_weights(kind: str, cfg: dict, shape: tuple) -> dict[str, tuple]:
    if kind == "dense":
        return {"kernel": (shape[-1], cfg["units"]), "bias": (cfg["units"],)}
    if kind == "conv2d":
        k = cfg["kernel_size"]
        return {"kernel": (k, k, shape[-1], cfg["filters"]), "bias": (cfg["filters"],)}
    c = (shape[-1],)
    return {"gamma": c, "beta": c, "moving_mean": c, "moving_variance": c}


def _check_weights(path, layer_name, weights, expected) -> dict[str, jax.Array]:
    if set(weights) != set(expected):
        raise FileFormatError(f"{path}: layer {layer_name!r} has weights {sorted(weights)}, "
                              f"expected {sorted(expected)}")
    for key, want in expected.items():
        if weights[key].shape != tuple(want):
            raise FileFormatError(f"{path}: {layer_name}/{key} has shape {weights[key].shape}, expected {tuple(want)}")
    return {key: jnp.asarray(weights[key], jnp.float32) for key in expected}


def _output_shape(path, kind: str, cfg: dict, shape: tuple) -> tuple:
    if kind == "dense":
        return (cfg["units"],)
    if kind == "reshape":
        target = tuple(cfg["shape"])
        if math.prod(target) != math.prod(shape):
            raise InputError(f"cannot reshape {shape} to {target}")
        return target
    if kind in ("upsample", "conv2d") and len(shape) != 3:
        raise InputError(f"{kind} needs an (H, W, C) input, got {shape}")
    if kind == "upsample":
        f = cfg["factor"]
        return (shape[0] * f, shape[1] * f, shape[2])
    if kind == "conv2d":
        return shape[:2] + (cfg["filters"],)
    return shape


def _apply_layers(layers, params, z: jax.Array) -> jax.Array:
    """Run the declared layers on ``z: (B, latent_dim)``; images come out NHWC."""
    x = z
    weights = iter(params)
    for kind, cfg in layers:
        if kind == "dense":
            p = next(weights)
            x = _ACTIVATIONS[cfg.get("activation", "linear")](x @ p["kernel"] + p["bias"])
        elif kind == "reshape":
            x = x.reshape((x.shape[0],) + tuple(cfg["shape"]))
        elif kind == "upsample":
            f = cfg["factor"]
            x = jnp.repeat(jnp.repeat(x, f, axis=1), f, axis=2)
        elif kind == "conv2d":
            p = next(weights)
            x = jax.lax.conv_general_dilated(x, p["kernel"], (1, 1), "SAME",
                                             dimension_numbers=("NHWC", "HWIO", "NHWC")) + p["bias"]
            x = _ACTIVATIONS[cfg.get("activation", "linear")](x)
        elif kind == "batchnorm":
            p = next(weights)
            scale = p["gamma"] * jax.lax.rsqrt(p["moving_variance"] + cfg.get("epsilon", 1e-3))
            x = (x - p["moving_mean"]) * scale + p["beta"]
        else:
            x = _ACTIVATIONS[cfg["fn"]](x)
    return x


def _jsonable(cfg: dict) -> dict:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in cfg.items()}
