"""Saving and loading networks, and resolving a network name or path to a `Network`.

Zoo networks are stored as one msgpack file: architecture dict, parameters, domain, name and the
content hash, which is checked on load (a corrupt or edited file is an error, never a silent change).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import flax.serialization
import jax
import numpy as np

from . import zoo
from .errors import FileFormatError, InputError
from .network import Network

FORMAT = "jaxrobust-network/1"
BUNDLED_DIR = Path(__file__).parent / "_data"
BUNDLED = {
    "mnist-mlp": "mnist-mlp.msgpack",
    "mnist-mlp-pgd": "mnist-mlp-pgd.msgpack",
    "mnist-certified": "mnist-certified.msgpack",
}
DEFAULT_NETWORK = "mnist-mlp"


def save_network(net: Network, path) -> str:
    """Write a zoo network to ``path`` (msgpack) atomically; return its content hash."""
    if not (isinstance(net.arch, dict) and "zoo" in net.arch):
        raise InputError(f"only zoo networks can be saved as weights (network {net.name!r} has arch {net.arch!r})")
    record = {
        "format": FORMAT,
        "arch": json.dumps(net.arch["zoo"]),
        "name": net.name,
        "domain": list(net.domain),
        "hash": net.hash,
        "params": flax.serialization.to_state_dict(jax.tree_util.tree_map(np.asarray, net.params)),
    }
    path = Path(path)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_bytes(flax.serialization.msgpack_serialize(record))
    os.replace(tmp, path)
    return net.hash


def load_weights(path) -> Network:
    """Read a network written by `save_network`, verifying its content hash."""
    path = Path(path)
    if not path.is_file():
        raise FileFormatError(f"network file not found: {path}")
    try:
        record = flax.serialization.msgpack_restore(path.read_bytes())
        if record.get("format") != FORMAT:
            raise ValueError(f"format {record.get('format')!r}")
        a = json.loads(record["arch"])
        template = zoo.init(a, jax.random.PRNGKey(0)).params
        params = flax.serialization.from_state_dict(template, record["params"])
        net = zoo.network(a, jax.tree_util.tree_map(np.asarray, params), name=record["name"],
                          domain=tuple(record["domain"]))
    except FileFormatError:
        raise
    except Exception as e:  # msgpack, key or shape errors all mean the file is not a valid network
        raise FileFormatError(f"{path} is not a valid jaxrobust network file ({type(e).__name__}: {e})") from None
    if net.hash != record["hash"]:
        raise FileFormatError(f"{path}: content hash mismatch (stored {record['hash']}, computed {net.hash}); "
                              "the file is corrupt")
    return net


def load_network(spec: str | os.PathLike, **onnx_options) -> Network:
    """Resolve a bundled name (``mnist-mlp``, ``mnist-mlp-pgd``), an ``.onnx`` file or a weights file."""
    s = str(spec)
    if s in BUNDLED:
        return load_weights(BUNDLED_DIR / BUNDLED[s]).replace(name=s)
    path = Path(s)
    if path.suffix.lower() == ".onnx":
        from .onnx_import import load_onnx
        return load_onnx(path, **onnx_options)
    if path.suffix.lower() in (".msgpack", ".jrnet"):
        return load_weights(path)
    if not path.exists():
        raise FileFormatError(f"no network {s!r}: not a bundled name ({', '.join(BUNDLED)}) and no such file")
    raise FileFormatError(f"{s}: unknown network file type {path.suffix!r} (expected .onnx or .msgpack)")
